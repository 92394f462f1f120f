r"""EASE (uncertainty-calibrated elastic alignment) on CMU-MOSI sentiment regression.

    python -m mer_jax.train --config configs/ease_mosi.py:synthetic --workdir /tmp/ease_mosi

Variants: `:synthetic` (embedded MOSI-shaped data, no download, a few CPU minutes),
`:tiny` (seconds, for tests); none = the real MMSA `aligned_50.pkl` in `--config.data.dir`
with the paper's hyper-parameters (ease.txt A.3).
"""

from mer_jax import config_lib
from mer_jax.methods import ease


def get_config(arg=None):
  variant = config_lib.parse_variant(arg)
  config = config_lib.base_config()

  # Data: MMSA MOSI (BERT 768 / COVAREP 5 / Facet 20, aligned to 50 frames), labels in [-3, 3].
  config.data.source = "mmsa"
  config.data.name = "mosi"
  config.data.task = "regression"

  # Model, losses, optimiser, protocols: mer_jax.methods.ease.configure (ease.txt A.3).
  ease.configure(config, variant)
  if variant == "synthetic":
    config.data.num_train = 512
  return config_lib.finalize(config)
