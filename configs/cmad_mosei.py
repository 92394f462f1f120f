r"""CMAD (teacher + student) on CMU-MOSEI sentiment regression.

    python -m mer_jax.train --config configs/cmad_mosei.py:synthetic --workdir /tmp/cmad_mosei

Variants: `:synthetic` (MOSEI-shaped generated data, a few CPU minutes), `:tiny` (seconds,
for tests); none = the real MMSA `aligned_50.pkl` in `--config.data.dir`.

Ablations: `--config.loss.use_cafd=False` (w/o CAFD), `--config.loss.use_mar=False`
(w/o MAR), `--config.loss.mar_difficulty=student` (CMAD_t); see docs/methods.md.
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

  # Sec. 6.2, MOSEI: AdamW, lr 2e-5, D = 96, G = 20, delta = 0.1, gamma = 1, phi = 7,
  # batch 128; SPEC: rho = 20, tau = 0.2.
  config.model.width = 96
  config.model.perceiver_depth = 5
  config.train.learning_rate = 2e-5
  config.train.batch_size = 128
  config.loss.mar_epochs = 20
  config.loss.cafd_weight = 0.1
  config.loss.aux_weight = 1.0
  config.loss.phi = 7.0

  cmad.apply_variant(config, variant)
  return config_lib.finalize(config)
