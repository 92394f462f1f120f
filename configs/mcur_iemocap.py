r"""MCUR (teacher + student) on IEMOCAP, MulT-style 4 emotions x binary (multilabel_binary).

    python -m mer_jax.train --config configs/mcur_iemocap.py:synthetic --workdir /tmp/mcur_iemocap

Variants: `:synthetic` (IEMOCAP-shaped generated data, a few CPU minutes), `:tiny`
(seconds, for tests); none = the real MulT `iemocap_data.pkl` in `--config.data.dir`.
Metrics are per emotion (accuracy and weighted F1), averaged over the four emotions.
"""

from mer_jax import config_lib
from mer_jax.methods import mcur


def get_config(arg=None):
  variant = config_lib.parse_variant(arg)
  config = mcur.base_config()

  # Data: MulT IEMOCAP (GloVe 300 / COVAREP 74 / Facet 35, 20 steps), 4 x 2 logits.
  config.data.source = "mult"
  config.data.name = "iemocap"
  config.data.task = "multilabel_binary"

  # Model: the official CMAD blocks at CMAD's IEMOCAP size (Sec. 6.1-6.2: D = 30, 4
  # Perceiver layers) with 5 heads of 5 and a kernel-1 text projection (MulT's, for GloVe
  # features): Table 9's 624,654 parameters (docs/methods.md). Text: GloVe features (A.3).
  mcur.scale_backbone(config.model, width=30, heads=5)
  config.model.perceiver_depth = 4
  config.model.kernel_sizes = (1, 1, 1)

  # A.2.3, IEMOCAP: Adam, teacher lr 1e-3, student lr 8e-4, alpha = 0.2, beta = 0.01,
  # gamma = 0.1, zeta = 100, tau = 0.2.
  config.train.optimizer = "adam"
  config.teacher.learning_rate = 1e-3
  config.train.learning_rate = 8e-4
  config.train.batch_size = 120
  config.loss.dkd_alpha = 0.2
  config.loss.vib_beta = 0.01
  config.loss.cl_weight = 0.1
  config.loss.sugr_weight = 100.0
  config.loss.temperature = 0.2

  # :synthetic: the uncertainty-weighted SUGR (zeta = 100) converges more slowly than the
  # teacher's plain cross-entropy, so the student gets more (sub-second) epochs.
  mcur.apply_variant(config, variant, student_epochs=30)
  return config_lib.finalize(config)
