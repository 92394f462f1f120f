r"""CM-ARR on IEMOCAP: the three loss weights and the learning rate.

    python -m mer_jax.sweep --config configs/cmarr_iemocap.py \
        --space configs/sweeps/cmarr_iemocap.py --trials 40 --workdir runs/sweep_cmarr_iemocap

The paper fixes alpha = 1, beta = 0.1, lambda = 10 without reporting a search; the log
ranges span a decade around each. Selection is on the validation split of
`config.data.fold`; cross-validate the best configuration with `mer_jax.crossval`.
"""

from mer_jax import sweep


def get_space():
  return {
      "train.learning_rate": sweep.log_uniform(1e-4, 3e-3),
      "loss.udcl_weight": sweep.log_uniform(0.1, 3.0),  # alpha
      "loss.spcl_weight": sweep.log_uniform(0.01, 1.0),  # beta
      "loss.rec_weight": sweep.log_uniform(1.0, 30.0),  # lambda
  }
