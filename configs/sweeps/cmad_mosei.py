r"""CMAD on MOSEI: the hyper-parameters of the supplement's section 7.6 (Fig. 11).

    python -m mer_jax.sweep --config configs/cmad_mosei.py --space configs/sweeps/cmad_mosei.py \
        --config.model.text_encoder_path=/models/bert-base-uncased \
        --trials 50 --workdir runs/sweep_cmad_mosei

The supplement varies phi (regression auxiliary scale), gamma (auxiliary weight), sigma
(the CAFD weight, delta here) and rho (MAR scale) one at a time without listing the values;
these ranges bracket the published defaults (phi 7, gamma 1, delta 0.1, rho 20, lr 2e-5),
searched with TPE.
"""

from mer_jax import sweep


def get_space():
  return {
      "train.learning_rate": sweep.log_uniform(5e-6, 1e-4),
      "loss.phi": sweep.uniform(1.0, 10.0),
      "loss.aux_weight": sweep.log_uniform(0.1, 2.0),  # gamma
      "loss.cafd_weight": sweep.log_uniform(0.01, 1.0),  # delta (the supplement's sigma)
      "loss.mar_rho": sweep.uniform(1.0, 40.0),  # rho
  }
