r"""DQF (Dual-Query Fusion) on MELD 7-class emotion recognition.

    python -m mer_jax.train --config configs/dqf_meld.py:synthetic --workdir /tmp/dqf_meld

Variants: `:synthetic` (embedded MELD-shaped data, no download), `:tiny` (seconds,
for tests); none = the real MERBench MELD features in `--config.data.dir`.
"""

from mer_jax import config_lib
from mer_jax.methods import dqf


def get_config(arg=None):
  variant = config_lib.parse_variant(arg)
  config = config_lib.base_config()

  # Data: MERBench MELD (Baichuan-13B text, wav2vec audio, CLIP ViT faces), 7 classes.
  config.data.source = "merbench"
  config.data.name = "meld"
  config.data.task = "classification"

  # Model, losses, optimiser, protocols: mer_jax.methods.dqf.configure (dqf.txt Sec. 4.2).
  dqf.configure(config, variant)
  return config_lib.finalize(config)
