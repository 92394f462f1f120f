"""A sweep process for tests/test_sweep.py: `run_sweep` with `fake_trial`, a trial
function that trains nothing (its value is a closed form of the config) but behaves as a
run does: it keeps its epochs in its folder and resumes from them, reports every epoch to
the hook, and can hang in one trial (to be killed there).

    python tests/sweep_driver.py WORKDIR SPACE TRIALS [STORAGE]

With $SWEEP_HANG_TRIAL=n, trial folder `trials/n` hangs after its first epoch (after
writing `hanging` into that folder); $SWEEP_EPOCH_SECONDS slows every epoch down.
"""

import math
import os
import sys
import time

EPOCHS = 3
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "configs", "dqf_mosei.py")


def score(config) -> float:
  """The fake validation value: best at lr 1e-3 and a large aux_weight."""
  return -(math.log10(config.train.learning_rate) + 3.0) ** 2 + config.loss.aux_weight


def _lines(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return f.read().split()


def fake_trial(config, workdir, *, on_epoch=None):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "calls"), "a") as f:
    f.write(f"{os.getpid()}\n")
  progress = os.path.join(workdir, "epochs")
  done = len(_lines(progress))  # a resumed trial goes on from its last epoch
  hang = os.environ.get("SWEEP_HANG_TRIAL")
  for epoch in range(done + 1, EPOCHS + 1):
    time.sleep(float(os.environ.get("SWEEP_EPOCH_SECONDS", "0")))
    with open(progress, "a") as f:
      f.write(f"{epoch}\n")
    if on_epoch is not None:
      on_epoch({"selection": score(config) * epoch / EPOCHS, "global_epoch": epoch})
    if hang is not None and os.path.basename(workdir) == hang:
      with open(os.path.join(workdir, "hanging"), "w") as f:
        f.write("1")
      time.sleep(3600)
  return score(config)


def load_config(variant="tiny"):
  from mer_jax import compare

  return compare.load_config_file(CONFIG, variant)


if __name__ == "__main__":
  from mer_jax import sweep

  workdir, space, trials = sys.argv[1], sys.argv[2], int(sys.argv[3])
  storage = sys.argv[4] if len(sys.argv) > 4 else None
  # A long heartbeat: on a loaded machine a process waiting on the SQLite lock must not
  # see its running trial failed as stale by the other one (a killed process's trials
  # are reclaimed by its pid on this host, not by the heartbeat).
  sweep.run_sweep(load_config(), space, workdir=workdir, trials=trials, storage=storage,
                  trial_fn=fake_trial, heartbeat_seconds=120)
