r"""DQF (Dual-Query Fusion) on CMU-MOSEI sentiment regression.

    python -m mer_jax.train --config configs/dqf_mosei.py:synthetic --workdir /tmp/dqf_mosei

Variants: `:synthetic` (embedded MOSEI-shaped data, no download), `:tiny` (seconds,
for tests); none = the real MMSA `aligned_50.pkl` in `--config.data.dir`.
"""

from mer_jax import config_lib


def get_config(arg=None):
  variant = config_lib.parse_variant(arg)
  config = config_lib.base_config()
  config.method = "dqf"

  # Data: MMSA MOSEI (BERT 768 / COVAREP 74 / Facet 35, aligned to 50 frames).
  config.data.source = "mmsa"
  config.data.name = "mosei"
  config.data.task = "regression"

  # Model (DQF Sec. 4.2: six Q-UA / Q-CA layers, four heads).
  config.model.width = 64
  config.model.num_layers = 6
  config.model.num_heads = 4
  config.model.mlp_dim = 128
  config.model.dropout = 0.1
  config.model.common_length = 0  # 0 = the longest modality; unaligned data are pooled to it
  config.model.kernel_sizes = (3, 1, 1)  # Conv1D per modality (L, A, V)
  config.model.head_hidden = 64

  # Losses: L = L_task + sum over the 7 granularities of L_n (Eq. 1), MAE for regression.
  config.loss.regression_loss = "l1"
  config.loss.aux_weight = 1.0

  # Optimiser: the paper uses momentum SGD at 1e-5 for 100 epochs on real features;
  # AdamW reaches the same regime in far fewer epochs, which is what a CPU run needs.
  config.train.optimizer = "adamw"
  config.train.learning_rate = 3e-4
  config.train.weight_decay = 1e-4
  config.train.batch_size = 64
  config.train.num_epochs = 100
  config.train.schedule = "cosine"

  # Training protocol: DQF trains only on incomplete inputs, one frame rate
  # r ~ U(0, 1) per modality per batch.
  config.missing.kind = "frame_dqf"

  # Evaluation: AUILC over frame rates 0..1.0 for each of the 7 masked sets, plus the
  # fixed combinations and modality-level random missing.
  if variant == "synthetic":
    config.data.source = "synthetic"
    config.train.num_epochs = 8
    config.model.num_layers = 2
  config_lib.apply_variant(config, variant)
  if variant == "tiny":
    config.model.width = 16
    config.model.num_layers = 1
    config.model.mlp_dim = 32
    config.model.head_hidden = 16
  return config_lib.finalize(config)
