r"""DQF on MOSEI: learning rate, dropout and the weight of the granularity heads.

    python -m mer_jax.sweep --config configs/dqf_mosei.py --space configs/sweeps/dqf_mosei.py \
        --trials 40 --prune --workdir runs/sweep_dqf_mosei

DQF reports no search; its single-stage training makes median pruning (`--prune`) on the
per-epoch validation value effective.
"""

from mer_jax import sweep


def get_space():
  return {
      "train.learning_rate": sweep.log_uniform(3e-5, 1e-3),
      "model.dropout": sweep.uniform(0.0, 0.3),
      "loss.aux_weight": sweep.log_uniform(0.1, 2.0),  # the L_n of the 7 granularity heads
  }
