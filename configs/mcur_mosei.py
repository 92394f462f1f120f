r"""MCUR (teacher + student) on CMU-MOSEI sentiment regression.

    python -m mer_jax.train --config configs/mcur_mosei.py:synthetic --workdir /tmp/mcur_mosei

Variants: `:synthetic` (MOSEI-shaped generated data, a few CPU minutes), `:tiny` (seconds,
for tests); none = the real MMSA `aligned_50.pkl` in `--config.data.dir`, with BERT-base
fine-tuned inside teacher and student as the paper does:

    python -m mer_jax.train --config configs/mcur_mosei.py --workdir /tmp/mcur_mosei \
      --config.data.dir=/data/MOSEI --config.model.text_encoder_path=/models/bert-base-uncased

Ablations (mcur.txt Table 2 / 3 / 14), e.g. `--config.loss.use_cl=False`,
`--config.loss.contrastive=supcon`, `--config.teacher.missing.kind=noise
--config.teacher.missing.noise_intensity=5`; see docs/methods.md.
"""

from mer_jax import config_lib
from mer_jax.methods import mcur


def get_config(arg=None):
  variant = config_lib.parse_variant(arg)
  config = mcur.base_config()

  # Data: MMSA MOSEI (BERT 768 / COVAREP 74 / Facet 35, aligned to 50 frames).
  config.data.source = "mmsa"
  config.data.name = "mosei"
  config.data.task = "regression"

  # Model: the official CMAD blocks at D = 96, 16 heads; 5 Perceiver layers (Table 9's
  # MOSEI count, 116,421,953 with BERT, implies 3 more layers than MOSI's 2).
  config.model.perceiver_depth = 5
  config.model.text_encoder = "bert"  # fine-tuned (A.3); needs config.model.text_encoder_path

  # A.2.3, MOSEI: AdamW, lr 2e-5, gamma = 0.2, beta = 0.01, zeta = 5.
  config.train.learning_rate = 2e-5
  config.loss.cl_weight = 0.2
  config.loss.vib_beta = 0.01
  config.loss.sugr_weight = 5.0

  mcur.apply_variant(config, variant)
  return config_lib.finalize(config)
