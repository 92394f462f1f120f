r"""CM-ARR (cross-modal alignment, reconstruction and refinement) on IEMOCAP, 4 emotions.

    python -m mer_jax.train --config configs/cmarr_iemocap.py:synthetic --workdir /tmp/cmarr
    python -m mer_jax.crossval --config configs/cmarr_iemocap.py --workdir /tmp/cmarr_cv \
        --config.data.dir=/path/to/features

Variants: `:synthetic` (embedded IEMOCAP-shaped data, no download, a few minutes on a
CPU), `:tiny` (seconds, for tests); none = the real features in `--config.data.dir`
with the paper's hyper-parameters (cm_arr.txt Sec. 4.2). `config.data.fold` selects one
of the `config.data.num_folds` leave-one-session-out folds; `mer_jax.crossval` runs all
of them (on synthetic data a fold only changes the data seed).
"""

from mer_jax import config_lib
from mer_jax.methods import cmarr


def get_config(arg=None):
  variant = config_lib.parse_variant(arg)
  config = config_lib.base_config()

  # Data: MMIN-format IEMOCAP (BERT-base text, wav2vec2-base speech, Denseface 342
  # video), 4 classes (hap = happy + excited), 5-fold leave-one-session-out.
  config.data.source = "mmin"
  config.data.name = "iemocap"
  config.data.task = "classification"
  config.data.num_folds = 5

  # Model, losses, optimiser, protocol and variants: mer_jax.methods.cmarr.configure
  # (cm_arr.txt Sec. 4.2).
  cmarr.configure(config, variant)
  return config_lib.finalize(config)
