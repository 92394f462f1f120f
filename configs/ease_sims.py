r"""EASE (uncertainty-calibrated elastic alignment) on CH-SIMS sentiment regression.

    python -m mer_jax.train --config configs/ease_sims.py:synthetic --workdir /tmp/ease_sims

Variants: `:synthetic` (embedded SIMS-shaped data, no download, a few CPU minutes),
`:tiny` (seconds, for tests); none = the paper's experiment (ease.txt A.3-A.4): the MMSA
`unaligned_39.pkl` in `--config.data.dir` with BERT-base-chinese fine-tuned on its token
ids, which needs a local BERT folder:

    python -m mer_jax.train --config configs/ease_sims.py --workdir runs/ease_sims \
        --config.data.dir=/data/SIMS/Processed \
        --config.model.text_encoder_path=/models/bert-base-chinese
"""

from mer_jax import config_lib
from mer_jax.methods import ease


def get_config(arg=None):
  variant = config_lib.parse_variant(arg)
  config = config_lib.base_config()

  # Data: MMSA SIMS, unaligned (A.4: BERT-Chinese tokens x 39, LibROSA 33 x 400, OpenFace
  # 709 x 55), labels in [-1, 1] (the anchors stretch them to the same 7 classes).
  config.data.source = "mmsa"
  config.data.name = "sims"
  config.data.file = "unaligned_39.pkl"
  config.data.task = "regression"

  # Model, losses, optimiser, protocols: mer_jax.methods.ease.configure (ease.txt A.3).
  ease.configure(config, variant)
  return config_lib.finalize(config)
