"""Hyper-parameter search (mer_jax.sweep). The study logic (grid exhaustion, resume after
a kill, a study shared by two processes, pruning, bad space files) runs with
`sweep_driver.fake_trial`, which trains nothing; one slow test runs a real `:tiny` sweep
and checks that trials are ordinary runs selected on the validation split."""

import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import optuna
import pytest
from conftest import REPO
from sweep_driver import EPOCHS, fake_trial, load_config, score

from mer_jax import run_log, sweep

GRID = {"train.learning_rate": [1e-4, 1e-3], "loss.aux_weight": [0.5, 1.0]}
DRIVER = os.path.join(REPO, "tests", "sweep_driver.py")


def write_space(path, body):
  path.write_text("from mer_jax import sweep\n\n\ndef get_space():\n  return " + body + "\n")
  return str(path)


def grid_space(tmp_path, grid=GRID):
  return write_space(tmp_path / "space.py", repr(grid))


def trials_of(workdir, study_name=sweep.STUDY_NAME):
  return optuna.load_study(study_name=study_name,
                           storage=sweep.default_storage(workdir)).get_trials()


def no_trial(*args, **kwargs):
  raise AssertionError("a finished trial was run again")


def test_grid_runs_every_point_once_then_nothing(tmp_path):
  workdir = str(tmp_path / "sweep")
  space = grid_space(tmp_path)
  result = sweep.run_sweep(load_config(), space, workdir=workdir, trials=10,
                           trial_fn=fake_trial)
  trials = trials_of(workdir)
  assert [t.state.name for t in trials] == ["COMPLETE"] * 4  # the grid, not --trials 10
  points = sorted((t.params["train.learning_rate"], t.params["loss.aux_weight"])
                  for t in trials)
  assert points == sorted((lr, w) for lr in GRID["train.learning_rate"]
                          for w in GRID["loss.aux_weight"])
  for trial in trials:
    config = sweep.apply_params(load_config(), trial.params)
    assert trial.value == pytest.approx(score(config))
    assert trial.intermediate_values == pytest.approx(
        {e: score(config) * e / EPOCHS for e in range(1, EPOCHS + 1)})
    assert trial.user_attrs["workdir"] == os.path.join(workdir, "trials", str(trial.number))
  assert result["best_params"] == {"train.learning_rate": 1e-3, "loss.aux_weight": 1.0}

  # The outputs: every trial in the CSV, the ranking in sweep.md, the best config.
  with open(os.path.join(workdir, "sweep.csv")) as f:
    rows = f.read().splitlines()
  assert rows[0].split(",")[:4] == ["trial", "state", "value", "val_acc2_non0"] and len(rows) == 5
  markdown = open(os.path.join(workdir, "sweep.md")).read()
  ranked = [line for line in markdown.splitlines() if line.startswith("| ") and "`" in line]
  values = [float(line.split("|")[3]) for line in ranked]
  assert values == sorted(values, reverse=True) and values[0] == pytest.approx(1.0)
  best = json.load(open(os.path.join(workdir, "best_config.json")))
  assert best["train"]["learning_rate"] == 1e-3 and best["loss"]["aux_weight"] == 1.0
  assert os.path.getsize(os.path.join(workdir, "sweep.png")) > 1000

  # Started again (more trials asked for): the grid is done, nothing runs.
  again = sweep.run_sweep(load_config(), space, workdir=workdir, trials=20, trial_fn=no_trial)
  assert again["best_trial"] == result["best_trial"] and len(trials_of(workdir)) == 4


def test_final_seeds_retrain_the_best_configuration(tmp_path):
  calls = []

  def trial(config, workdir, *, on_epoch=None):
    calls.append((config.num_seeds, os.path.basename(workdir)))
    return fake_trial(config, workdir, on_epoch=on_epoch)

  sweep.run_sweep(load_config(), grid_space(tmp_path, {"loss.aux_weight": [0.5, 2.0]}),
                  workdir=str(tmp_path / "sweep"), trials=2, final_seeds=3, trial_fn=trial)
  assert calls == [(1, "0"), (1, "1"), (3, "final")]


@pytest.mark.slow  # 12 trials through SQLite: ~10 s on a busy 2-core machine
def test_median_pruning_from_the_epoch_values(tmp_path):
  space = write_space(tmp_path / "space.py",
                      "{'train.learning_rate': sweep.log_uniform(1e-5, 1e-1)}")
  workdir = str(tmp_path / "sweep")
  sweep.run_sweep(load_config(), space, workdir=workdir, trials=9, sampler="random",
                  prune=True, trial_fn=fake_trial)
  trials = trials_of(workdir)
  assert len(trials) == 9
  pruned = [t for t in trials if t.state.name == "PRUNED"]
  assert pruned  # lr far from 1e-3 is bad from the first epoch on
  for trial in pruned:
    step = max(trial.intermediate_values)
    earlier = [t.intermediate_values[step] for t in trials
               if t.number < trial.number and t.state.name == "COMPLETE"]
    assert len(earlier) >= 5  # MedianPruner's start-up trials
    assert trial.intermediate_values[step] < np.median(earlier)
  # Without --prune every trial runs to the end.
  sweep.run_sweep(load_config(), space, workdir=str(tmp_path / "all"), trials=3,
                  sampler="random", trial_fn=fake_trial)
  assert {t.state.name for t in trials_of(str(tmp_path / "all"))} == {"COMPLETE"}


@pytest.mark.parametrize("body, message", [
    (None, "defines no get_space()"),
    ("[1, 2]", "must return a non-empty dict"),
    ("{'train.learning_rate': []}", "'train.learning_rate': expected a non-empty list"),
    ("{'train.learning_rate': sweep.uniform(1e-3, 1e-4)}", "needs low < high"),
    ("{'train.learning_rate': sweep.log_uniform(0.0, 1e-3)}", "a log range needs low > 0"),
    ("{'train.learning_rat': [1e-3]}", "'train.learning_rat': cannot set it to 0.001: no such "
                                       "config field"),
    ("{'train.optimizer': ['adamw', 'lion']}", "'train.optimizer' = 'lion': "
                                               "config.train.optimizer='lion': choose one of"),
    ("{'train.batch_size': ['large']}", "'train.batch_size': cannot set it to 'large'"),
])
def test_a_bad_space_file_names_the_file_and_the_entry(tmp_path, body, message):
  path = tmp_path / "space.py"
  if body is None:
    path.write_text("SPACE = {}\n")
  else:
    write_space(path, body)
  with pytest.raises(ValueError, match="^" + str(path).replace(".", r"\.") + ": ") as raised:
    sweep.run_sweep(load_config(), str(path), workdir=str(tmp_path / "w"), trials=2,
                    trial_fn=no_trial)
  assert message in str(raised.value)
  assert not os.path.exists(tmp_path / "w")  # refused before anything was made


def test_a_study_made_with_another_space_is_refused(tmp_path):
  workdir = str(tmp_path / "sweep")
  sweep.run_sweep(load_config(), grid_space(tmp_path, {"loss.aux_weight": [1.0]}),
                  workdir=workdir, trials=1, trial_fn=fake_trial)
  with pytest.raises(ValueError, match="made with another config or space.*loss.aux_weight"):
    sweep.run_sweep(load_config(), grid_space(tmp_path, {"loss.aux_weight": [2.0]}),
                    workdir=workdir, trials=1, trial_fn=no_trial)


def test_grid_sampler_needs_lists_and_prune_needs_one_seed(tmp_path):
  space = write_space(tmp_path / "space.py", "{'loss.aux_weight': sweep.uniform(0.1, 1.0)}")
  with pytest.raises(ValueError, match="--sampler=grid needs a list of choices"):
    sweep.run_sweep(load_config(), space, workdir=str(tmp_path / "w"), trials=1,
                    sampler="grid", trial_fn=no_trial)
  config = load_config()
  config.num_seeds = 2
  with pytest.raises(ValueError, match="--prune reads one run's"):
    sweep.run_sweep(config, space, workdir=str(tmp_path / "w"), trials=1, prune=True,
                    trial_fn=no_trial)


def test_validation_value_is_the_selected_checkpoints(tmp_path):
  def log(folder, values):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "log.jsonl"), "w") as f:
      for value in values:
        f.write(json.dumps({"selection": value, "best_selection": value}) + "\n")
      f.write(json.dumps({"event": "evaluated", "test/fixed/acc2_non0": 0.9}) + "\n")

  log(tmp_path / "one", [0.5, 0.7])
  assert sweep.validation_value(str(tmp_path / "one")) == 0.7
  log(tmp_path / "seeds" / "seed0", [0.4])
  log(tmp_path / "seeds" / "seed1", [0.6])
  assert sweep.validation_value(str(tmp_path / "seeds")) == pytest.approx(0.5)


def driver_env(**extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **extra)
  env.pop("XLA_FLAGS", None)
  return env


def start_driver(workdir, space, trials, storage=None, **env):
  args = [sys.executable, DRIVER, workdir, space, str(trials)] + ([storage] if storage else [])
  log = open(os.path.join(os.path.dirname(workdir), f"driver{len(env)}.log"), "a")  # noqa: SIM115
  return subprocess.Popen(args, cwd=REPO, env=driver_env(**env), stdout=log, stderr=log)


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_retraining_finished_trials(tmp_path):
  workdir = str(tmp_path / "sweep")
  space = grid_space(tmp_path)
  process = start_driver(workdir, space, 4, SWEEP_HANG_TRIAL="1")
  hanging = os.path.join(workdir, "trials", "1", "hanging")
  deadline = time.time() + 240
  while not os.path.exists(hanging):
    assert process.poll() is None and time.time() < deadline, open(
        tmp_path / "driver1.log").read()[-3000:]
    time.sleep(0.1)
  process.send_signal(signal.SIGKILL)
  process.wait()

  sweep.run_sweep(load_config(), space, workdir=workdir, trials=4, trial_fn=fake_trial)
  trials = trials_of(workdir)
  states = [t.state.name for t in trials]
  assert states.count("COMPLETE") == 4 and states[1] == "FAIL" and len(trials) == 5
  retried = [t for t in trials if t.system_attrs.get("failed_trial") == 1]
  assert len(retried) == 1 and retried[0].params == trials[1].params
  assert retried[0].user_attrs["workdir"] == os.path.join(workdir, "trials", "1")
  # Trial 0 ran once; trial 1 ran again in its folder and went on from its first epoch.
  calls = lambda n: open(os.path.join(workdir, "trials", str(n), "calls")).read().split()
  assert len(calls(0)) == 1 and len(calls(1)) == 2
  epochs = open(os.path.join(workdir, "trials", "1", "epochs")).read().split()
  assert epochs == ["1", "2", "3"]
  complete = [t for t in trials if t.state.name == "COMPLETE"]
  assert len({tuple(sorted(t.params.items())) for t in complete}) == 4


@pytest.mark.slow
def test_two_processes_share_one_study(tmp_path):
  workdir = str(tmp_path / "sweep")
  grid = {"train.learning_rate": [1e-4, 1e-3, 1e-2], "loss.aux_weight": [0.5, 1.0]}
  space = grid_space(tmp_path, grid)
  storage = f"sqlite:///{tmp_path / 'shared.db'}"
  # Slow enough epochs that the two processes' trials overlap.
  processes = [start_driver(workdir, space, 6, storage, SWEEP_EPOCH_SECONDS="0.3",
                            WORKER=str(i)) for i in range(2)]
  for process in processes:
    assert process.wait(timeout=300) == 0
  trials = optuna.load_study(study_name=sweep.STUDY_NAME, storage=storage).get_trials()
  assert [t.state.name for t in trials] == ["COMPLETE"] * 6
  assert len({tuple(sorted(t.params.items())) for t in trials}) == 6  # each point once
  assert len({t.user_attrs["pid"] for t in trials}) == 2  # both processes ran trials
  assert len({t.user_attrs["workdir"] for t in trials}) == 6
  assert os.path.exists(os.path.join(workdir, "sweep.md"))


@pytest.mark.slow
def test_a_tiny_sweep_of_real_runs(tmp_path, monkeypatch):
  """Two `dqf_mosei:tiny` trials (seeds 0 and 1 share their compiled programs): ordinary
  run folders, the value read from the validation epochs, the hook fed by the trainer,
  the outputs; started again, nothing trains."""
  from mer_jax import train

  workdir = str(tmp_path / "sweep")
  space = grid_space(tmp_path, {"seed": [0, 1]})
  config = load_config()
  with config.unlocked():
    config.eval.missing_rates = (0.5,)
    config.eval.frame_rates = (0.0, 1.0)
  result = sweep.run_sweep(config, space, workdir=workdir, trials=2,
                           config_label="configs/dqf_mosei.py:tiny")
  trials = trials_of(workdir)
  assert [t.state.name for t in trials] == ["COMPLETE"] * 2
  for trial in trials:
    folder = trial.user_attrs["workdir"]
    assert json.load(open(os.path.join(folder, "config.json")))["seed"] == trial.params["seed"]
    with open(os.path.join(folder, "log.jsonl")) as f:
      epochs = [r for r in map(json.loads, f) if "selection" in r]
    assert trial.value == epochs[-1]["best_selection"] == max(r["selection"] for r in epochs)
    assert trial.intermediate_values == {r["epoch"]: r["selection"] for r in epochs}
    assert os.listdir(os.path.join(folder, "tensorboard"))
  best = trials[result["best_trial"]]
  assert json.load(open(os.path.join(workdir, "best_config.json"))) == json.load(
      open(os.path.join(best.user_attrs["workdir"], "config.json")))
  test = run_log.read_json(os.path.join(best.user_attrs["workdir"], "eval", "results.json"))
  markdown = open(os.path.join(workdir, "sweep.md")).read()
  assert f"## Best: trial {best.number}" in markdown
  table_line = next(line for line in markdown.splitlines()
                    if line.startswith(f"trial {best.number} "))
  assert f"{test['LAV']['acc2_non0']:.4f}" in table_line  # the best's test figures
  assert not math.isnan(result["best_value"])

  monkeypatch.setattr(train, "run", no_trial)
  again = sweep.run_sweep(config, space, workdir=workdir, trials=2)
  assert again["best_trial"] == result["best_trial"]


def test_shipped_spaces_fit_their_configs():
  """Every configs/sweeps/<name>.py loads and each of its values is accepted by
  configs/<name>.py (a renamed config field fails here); MCUR's is A.2.3's grid."""
  from mer_jax import compare

  paths = sorted(glob.glob(os.path.join(REPO, "configs", "sweeps", "*.py")))
  methods = {os.path.basename(p).split("_")[0] for p in paths}
  assert methods == {"mcur", "cmad", "cmarr", "ease", "dqf"}  # one space per method
  for path in paths:
    config = compare.load_config_file(
        os.path.join(REPO, "configs", os.path.basename(path)), "tiny")
    sweep.check_space(sweep.load_space(path), config, path)
  mcur = sweep.load_space(os.path.join(REPO, "configs", "sweeps", "mcur_mosei.py"))
  assert mcur == {"teacher.learning_rate": [2e-5],
                  "train.learning_rate": [1e-5, 2e-5, 4e-5, 8e-4, 1e-3],
                  "loss.cl_weight": [0.1, 0.2, 0.5, 1.0, 2.0, 5.0],
                  "loss.sugr_weight": [1.0, 2.0, 5.0, 10.0, 20.0, 100.0]}
  assert sweep.grid_size(mcur) == 180
