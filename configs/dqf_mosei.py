r"""DQF (Dual-Query Fusion) on CMU-MOSEI sentiment regression.

    python -m mer_jax.train --config configs/dqf_mosei.py:synthetic --workdir /tmp/dqf_mosei

Variants: `:synthetic` (embedded MOSEI-shaped data, no download), `:tiny` (seconds,
for tests); none = the real MMSA `aligned_50.pkl` in `--config.data.dir`.
"""

from mer_jax import config_lib
from mer_jax.methods import dqf


def get_config(arg=None):
  variant = config_lib.parse_variant(arg)
  config = config_lib.base_config()

  # Data: MMSA MOSEI (BERT 768 / COVAREP 74 / Facet 35, aligned to 50 frames).
  config.data.source = "mmsa"
  config.data.name = "mosei"
  config.data.task = "regression"

  # Model, losses, optimiser, protocols: mer_jax.methods.dqf.configure (dqf.txt Sec. 4.2).
  dqf.configure(config, variant)
  return config_lib.finalize(config)
