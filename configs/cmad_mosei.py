r"""CMAD (teacher + student) on CMU-MOSEI sentiment regression.

    python -m mer_jax.train --config configs/cmad_mosei.py:synthetic --workdir /tmp/cmad_mosei

Variants: `:synthetic` (MOSEI-shaped generated data, a few CPU minutes), `:tiny` (seconds,
for tests); none = the real MMSA `aligned_50.pkl` in `--config.data.dir`, with the
official model and training (YetZzzzzz/CMAD README commands), BERT-base fine-tuned inside
teacher and student:

    python -m mer_jax.train --config configs/cmad_mosei.py --workdir /tmp/cmad_mosei \
      --config.data.dir=/data/MOSEI --config.model.text_encoder_path=/models/bert-base-uncased

Ablations: `--config.loss.use_cafd=False` (w/o CAFD), `--config.loss.cafd_mode=mse_only`
(Sec. 7.3), `--config.loss.use_mar=False` (w/o MAR), `--config.loss.mar_difficulty=student`
(CMAD_t); see docs/methods.md.
"""

from mer_jax import config_lib
from mer_jax.methods import cmad


def get_config(arg=None):
  variant = config_lib.parse_variant(arg)
  config = cmad.base_config()

  # Data: MMSA MOSEI (BERT 768 / COVAREP 74 / Facet 35, aligned to 50 frames).
  config.data.source = "mmsa"
  config.data.name = "mosei"
  config.data.task = "regression"

  # Model: the official student_model.py (base config): D = 96, 16 heads of 16, 5
  # Perceiver layers, 7,437,569 parameters besides BERT (docs/methods.md).
  config.model.text_encoder = "bert"  # fine-tuned inside teacher and student

  # Sec. 6.2 / README commands, MOSEI: AdamW 2e-5, batch 128, G = 20, delta = 0.1,
  # gamma = 1, phi = 7, tau = 0.2, rho = 20; 80 epochs per stage.
  config.train.learning_rate = 2e-5
  config.train.batch_size = 128
  config.loss.mar_epochs = 20
  config.loss.cafd_weight = 0.1
  config.loss.aux_weight = 1.0
  config.loss.phi = 7.0

  cmad.apply_variant(config, variant)
  return config_lib.finalize(config)
