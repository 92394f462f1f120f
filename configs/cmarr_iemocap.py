r"""CM-ARR (cross-modal alignment, reconstruction and refinement) on IEMOCAP, 4 emotions.

    python -m mer_jax.train --config configs/cmarr_iemocap.py:synthetic --workdir /tmp/cmarr
    python -m mer_jax.crossval --config configs/cmarr_iemocap.py --workdir /tmp/cmarr_cv \
        --config.data.dir=/path/to/features

Variants: `:synthetic` (embedded IEMOCAP-shaped data, no download, a few minutes on a
CPU), `:tiny` (seconds, for tests); none = the real features in `--config.data.dir`
with the paper's features and hyper-parameters (cm_arr.txt Sec. 3.1.1, 4.2).
`config.data.fold` selects one of the `config.data.num_folds` leave-one-session-out folds
(the whole held-out session is the test set); `mer_jax.crossval` runs all of them and
reports each fold and their mean +- std (on synthetic data a fold only changes the data
seed). Table 3's ablations: docs/methods.md, section CM-ARR.
"""

from mer_jax import config_lib
from mer_jax.methods import cmarr


def get_config(arg=None):
  variant = config_lib.parse_variant(arg)
  config = config_lib.base_config()

  # Data: MMIN-format IEMOCAP with the extractors of Sec. 3.1.1: BERT-base text (768),
  # wav2vec2-base speech (768), Denseface video (342), read from L/bert_base.h5,
  # A/wav2vec2_base.h5, V/denseface.h5; every modality is average-pooled to at most 50
  # frames on loading (the model's common length, config.model.common_length). 4 classes,
  # 5-fold leave-one-session-out: fold i tests on the whole session i+1, validation is
  # a fixed 10% of the other sessions. :synthetic / :tiny leave features and lengths to
  # the source's defaults (empty), so their configs also run on MMIN's own feature files.
  config.data.source = "mmin"
  config.data.name = "iemocap"
  config.data.task = "classification"
  config.data.num_folds = 5
  config.data.features = () if variant else ("bert_base", "wav2vec2_base", "denseface")
  config.data.max_lengths = () if variant else (50, 50, 50)

  # Model, losses, optimiser, protocol and variants: mer_jax.methods.cmarr.configure
  # (cm_arr.txt Sec. 4.2).
  cmarr.configure(config, variant)
  return config_lib.finalize(config)
