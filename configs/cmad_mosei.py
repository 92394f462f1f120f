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

  if variant == "synthetic":
    # Small enough for two CPU cores: both stages and the evaluation in a few minutes.
    config.model.width = 32
    config.model.num_latents = 4
    config.model.perceiver_depth = 1
    config.model.latent_heads = 4
    config.model.perceiver_mlp_dim = 64
    config.model.fusion_heads = 4
    config.model.fusion_mlp_dim = 64
    config.train.batch_size = 64
    config.train.learning_rate = 1e-3
    config.train.schedule = "cosine"
    config.train.num_epochs = 12
    config.teacher.num_epochs = 8
    config.loss.mar_epochs = 4
  config_lib.apply_variant(config, variant)
  if variant == "tiny":
    config.model.width = 16
    config.model.num_latents = 2
    config.model.perceiver_depth = 1
    config.model.latent_heads = 2
    config.model.perceiver_mlp_dim = 32
    config.model.fusion_layers = 1
    config.model.fusion_heads = 2
    config.model.fusion_mlp_dim = 32
    config.model.dropout = 0.0  # wiring tests: dropout's RNG doubles the CPU compile time
    config.train.learning_rate = 1e-3
    config.teacher.num_epochs = 1
    config.loss.mar_epochs = 1
  return config_lib.finalize(config)
