r"""MCUR A.2.3: the grid searched during the student's training on MOSEI.

    python -m mer_jax.sweep --config configs/mcur_mosei.py --space configs/sweeps/mcur_mosei.py \
        --config.model.text_encoder_path=/models/bert-base-uncased \
        --trials 180 --workdir runs/sweep_mcur_mosei

The student's learning rate x gamma (MCB-CL weight) x zeta (SUGR weight): 5 x 6 x 6 = 180
trials, every combination once (`--sampler=auto` is the grid sampler for lists). The
teacher keeps A.2.3's 2e-5 (its rate is pinned: otherwise it would follow
train.learning_rate), beta stays 0.01, mu1 = mu2 = 1. The paper picked lr 2e-5, gamma
0.2, zeta 5 for MOSEI (configs/mcur_mosei.py). `--sampler=tpe --trials 50` searches the
same lists with fewer trials.
"""


def get_space():
  return {
      "teacher.learning_rate": [2e-5],
      "train.learning_rate": [1e-5, 2e-5, 4e-5, 8e-4, 1e-3],
      "loss.cl_weight": [0.1, 0.2, 0.5, 1.0, 2.0, 5.0],  # gamma
      "loss.sugr_weight": [1.0, 2.0, 5.0, 10.0, 20.0, 100.0],  # zeta
  }
