r"""EASE on MOSEI: the three loss weights of Eq. 13 over the values of its sensitivity study.

    python -m mer_jax.sweep --config configs/ease_mosei.py --space configs/sweeps/ease_mosei.py \
        --config.data.dir=/data/MOSEI/Processed \
        --config.model.text_encoder_path=/models/bert-base-uncased \
        --trials 60 --sampler tpe --workdir runs/sweep_ease_mosei

EASE (Fig. 7) varies each of lambda_1 (UCMI), lambda_2 (UCSA alignment) and lambda_3
(MIPC consistency) over {0.05, 0.1, 0.2, 0.5, 1, 2} and reports 0.5 / 0.2 / 0.5. The full
grid is 216 trials (`--sampler=grid`); TPE over the same lists needs fewer.
"""

WEIGHTS = [0.05, 0.1, 0.2, 0.5, 1.0, 2.0]


def get_space():
  return {
      "loss.lambda_ucmi": WEIGHTS,  # lambda_1
      "loss.lambda_align": WEIGHTS,  # lambda_2
      "loss.lambda_consist": WEIGHTS,  # lambda_3
  }
