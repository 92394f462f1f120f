r"""DQF (Dual-Query Fusion) on CMU-MOSEI sentiment regression.

    python -m mer_jax.train --config configs/dqf_mosei.py:synthetic --workdir /tmp/dqf_mosei

Variants: `:synthetic` (embedded MOSEI-shaped data, no download), `:tiny` (seconds,
for tests); none = the paper's experiment (dqf.txt Sec. 4.2): the MERBench MOSEI
features (Baichuan-13B text, wav2vec 2.0 audio, CLIP ViT faces, frame-level) in
`--config.data.dir`, momentum SGD at a fixed 1e-5.
"""

from mer_jax import config_lib
from mer_jax.methods import dqf


def get_config(arg=None):
  variant = config_lib.parse_variant(arg)
  config = config_lib.base_config()

  # Data: MERBench MOSEI, labels in [-3, 3]. Sec. 4.2 uses the MERBench features for
  # both datasets; frame-level sequences are average-pooled to at most 50 steps, the
  # length every modality shares (Eq. 5 needs one).
  config.data.source = "merbench"
  config.data.name = "mosei"
  config.data.task = "regression"
  # config.data.features stays () = the source's default extractors, and MERBench's are
  # DQF's (Baichuan-13B-Base-FRA, wav2vec2-large-960h-FRA, clip-vit-large-patch14-FRA).
  # Another source reads no max_lengths: --config.data.max_lengths="()" with it.
  config.data.max_lengths = dqf.MERBENCH_MAX_LENGTHS if not variant else ()

  # Model, losses, optimiser, protocols: mer_jax.methods.dqf.configure (dqf.txt Sec. 4.2).
  dqf.configure(config, variant)
  return config_lib.finalize(config)
