r"""MCUR (teacher + student) on CMU-MOSI sentiment regression.

    python -m mer_jax.train --config configs/mcur_mosi.py:synthetic --workdir /tmp/mcur_mosi

Variants: `:synthetic` (MOSI-shaped generated data, a few CPU minutes), `:tiny` (seconds,
for tests); none = the real MMSA `aligned_50.pkl` in `--config.data.dir`, with BERT-base
fine-tuned inside teacher and student as the paper does:

    python -m mer_jax.train --config configs/mcur_mosi.py --workdir /tmp/mcur_mosi \
      --config.data.dir=/data/MOSI --config.model.text_encoder_path=/models/bert-base-uncased

Ablations (mcur.txt Table 2 / 3 / 14), e.g. `--config.loss.use_cl=False`,
`--config.loss.contrastive=supcon`; see docs/methods.md.
"""

from mer_jax import config_lib
from mer_jax.methods import mcur


def get_config(arg=None):
  variant = config_lib.parse_variant(arg)
  config = mcur.base_config()

  # Data: MMSA MOSI (BERT 768 / COVAREP 5 / Facet 20, aligned to 50 frames).
  config.data.source = "mmsa"
  config.data.name = "mosi"
  config.data.task = "regression"

  # Model: the official CMAD blocks at D = 96, 16 heads; 2 Perceiver layers (Table 9's
  # MOSI count, 112,627,841 with BERT; docs/methods.md).
  config.model.perceiver_depth = 2
  config.model.text_encoder = "bert"  # fine-tuned (A.3); needs config.model.text_encoder_path

  # A.2.3, MOSI: AdamW, lr 2e-5, gamma = 2.0, beta = 0.01, zeta = 1.0.
  config.train.learning_rate = 2e-5
  config.loss.cl_weight = 2.0
  config.loss.vib_beta = 0.01
  config.loss.sugr_weight = 1.0

  mcur.apply_variant(config, variant)
  return config_lib.finalize(config)
