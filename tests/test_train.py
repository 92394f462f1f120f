"""End-to-end training on the tiny synthetic config: run outputs, resume, and the
same validation losses on 1 and 4 devices."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from conftest import REPO

from mer_jax import train, trainer


def load_config(name="dqf_mosei.py", arg="tiny"):
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, "configs", name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def read_log(workdir):
  with open(os.path.join(workdir, "log.jsonl")) as f:
    return [json.loads(line) for line in f]


def epoch_records(workdir):
  return [r for r in read_log(workdir) if "val/loss" in r]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("dqf_tiny"))
  results = train.run(load_config(), workdir)
  return workdir, results


def test_run_writes_every_output(finished_run):
  workdir, results = finished_run
  for path in ("config.json", "log.jsonl", "eval/results.json", "eval/results.csv",
               "eval/robustness.png"):
    assert os.path.exists(os.path.join(workdir, path)), path
  assert os.listdir(os.path.join(workdir, "checkpoints", "latest"))
  assert os.listdir(os.path.join(workdir, "checkpoints", "best"))
  with open(os.path.join(workdir, "eval", "results.json")) as f:
    saved = json.load(f)
  expected = {"L", "A", "V", "LA", "LV", "AV", "LAV", "MR0.3", "MR0.7", "frame0.0_L",
              "frame0.5_L", "frame1.0_L", "frame0.0_LAV", "frame0.5_LAV", "summary"}
  assert expected <= set(saved)
  assert "frame1.0_LAV" not in saved  # all three modalities fully masked is excluded
  for name in ("acc2_has0", "acc2_non0", "f1_has0", "acc7", "mae", "corr", "brier", "nll"):
    assert name in saved["LAV"]
  assert saved == json.loads(json.dumps(results))
  with open(os.path.join(workdir, "eval", "results.csv")) as f:
    assert len(f.read().strip().splitlines()) == len(saved) + 1
  assert len(epoch_records(workdir)) == 2


def test_restarting_a_finished_run_resumes_instead_of_retraining(finished_run, monkeypatch):
  workdir, results = finished_run
  before = len(epoch_records(workdir))
  # Same config: the saved results, without loading data or compiling anything.
  monkeypatch.setattr(train.pipeline, "load_data", lambda *a: pytest.fail("data loaded"))
  again = train.run(load_config(), workdir)
  assert set(again) == set(results) and again["LAV"] == results["LAV"]
  assert read_log(workdir)[-1]["event"] == "finished"
  monkeypatch.undo()
  # Another evaluation protocol: the trained stages are resumed, not retrained, and the
  # run is evaluated again.
  config = load_config()
  config.eval.missing_rates = (0.5,)
  again = train.run(config, workdir)
  assert len(epoch_records(workdir)) == before  # no epoch trained twice
  assert any(r.get("event") == "resume" for r in read_log(workdir))
  assert again["LAV"] == results["LAV"]
  assert "MR0.5" in again and "MR0.3" not in again


def test_interrupted_run_continues_from_its_last_epoch(tmp_path):
  workdir = str(tmp_path)
  config = load_config()
  config.train.num_epochs = 1
  train.run(config, workdir)
  config = load_config()
  config.train.num_epochs = 3
  train.run(config, workdir)
  epochs = [r["epoch"] for r in epoch_records(workdir)]
  assert epochs == [1, 2, 3]


def test_same_validation_losses_on_one_and_four_devices(tmp_path):
  losses = {}
  for devices in (1, 4):
    config = load_config()
    config.num_devices = devices
    config.eval.missing_rates = ()
    config.eval.frame_rates = ()
    workdir = str(tmp_path / f"d{devices}")
    train.run(config, workdir)
    losses[devices] = [r["val/loss"] for r in epoch_records(workdir)]
    assert read_log(workdir)[0]["num_devices"] == devices
  np.testing.assert_allclose(losses[1], losses[4], rtol=1e-4, atol=1e-5)


def test_several_seeds_each_equal_their_single_seed_run(tmp_path):
  config = load_config()
  config.num_seeds = 2
  config.eval.missing_rates = ()
  config.eval.frame_rates = ()
  results = train.run(config, str(tmp_path / "seeds"))
  # One after another: each seed is a plain single-seed run in its folder.
  config.seeds_in_one_program = False
  one_by_one = train.run(config, str(tmp_path / "one_by_one"))
  alone = one_by_one["seeds"]["1"]
  with open(tmp_path / "one_by_one" / "seed1" / "config.json") as f:
    assert json.load(f)["seed"] == 1
  assert not os.path.exists(tmp_path / "one_by_one" / "checkpoints")  # nothing stacked
  assert one_by_one["LAV"] == pytest.approx(results["LAV"], abs=1e-6)
  seeds = results["seeds"]
  assert set(seeds) == {"0", "1"}
  assert seeds["0"]["LAV"] != seeds["1"]["LAV"]  # different seeds, different models
  for metric, value in alone["LAV"].items():
    assert seeds["1"]["LAV"][metric] == pytest.approx(value, abs=1e-6), metric
  mae = [seeds[s]["LAV"]["mae"] for s in ("0", "1")]
  assert results["LAV"]["mae"] == pytest.approx(np.mean(mae))
  half_width = 12.706 * np.std(mae, ddof=1) / np.sqrt(2)  # t(0.975, 1 dof)
  assert results["LAV"]["mae_ci95"] == pytest.approx(half_width, rel=1e-3)
  assert os.path.exists(tmp_path / "seeds" / "eval" / "results.csv")
  # One program trained both: its stacked checkpoint holds a leading axis of 2 seeds, and
  # each seed folder holds the checkpoints of a single-seed run, equal to the real one's.
  stacked = trainer.restore_latest(trainer.checkpoint_dir(str(tmp_path / "seeds"), "", "latest"),
                                   None)
  assert all(x.shape[0] == 2 for x in jax.tree.leaves(stacked["params"]))
  from_seeds = trainer.restore_latest(
      trainer.checkpoint_dir(str(tmp_path / "seeds" / "seed1"), "", "best"), None)
  single_dir = str(tmp_path / "one_by_one" / "seed1")
  from_single = trainer.restore_latest(trainer.checkpoint_dir(single_dir, "", "best"), None)
  assert int(from_seeds["best_epoch"]) == int(from_single["best_epoch"])
  # Adam turns rounding-level gradient differences of near-zero parameters into
  # learning-rate-sized steps, so the tolerance is absolute at the scale of an update.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               from_seeds["params"], from_single["params"])
  assert [r["val/loss"] for r in epoch_records(str(tmp_path / "seeds" / "seed1"))] == (
      pytest.approx([r["val/loss"] for r in epoch_records(single_dir)], abs=1e-6))
