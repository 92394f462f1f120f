r"""EASE (uncertainty-calibrated elastic alignment) on CMU-MOSI sentiment regression.

    python -m mer_jax.train --config configs/ease_mosi.py:synthetic --workdir /tmp/ease_mosi

Variants: `:synthetic` (embedded MOSI-shaped data, no download, a few CPU minutes),
`:tiny` (seconds, for tests); none = the paper's experiment (ease.txt A.3-A.4): the MMSA
`unaligned_50.pkl` in `--config.data.dir` with BERT fine-tuned on its token ids, which
needs a local BERT folder:

    python -m mer_jax.train --config configs/ease_mosi.py --workdir runs/ease_mosi \
        --config.data.dir=/data/MOSI/Processed \
        --config.model.text_encoder_path=/models/bert-base-uncased
"""

from mer_jax import config_lib
from mer_jax.methods import ease


def get_config(arg=None):
  variant = config_lib.parse_variant(arg)
  config = config_lib.base_config()

  # Data: MMSA MOSI unaligned (A.4: BERT tokens x 50, COVAREP 5 x 375, Facet 20 x 500),
  # labels in [-3, 3].
  config.data.source = "mmsa"
  config.data.name = "mosi"
  config.data.file = "unaligned_50.pkl"
  config.data.task = "regression"

  # Model, losses, optimiser, protocols: mer_jax.methods.ease.configure (ease.txt A.3).
  ease.configure(config, variant)
  if variant == "synthetic":
    config.data.num_train = 512
  return config_lib.finalize(config)
