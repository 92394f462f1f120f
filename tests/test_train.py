"""End-to-end training on the tiny synthetic config: run outputs (of the shared
`conftest.tiny_run`), resume, the same validation losses on 1 and 4 devices, and several
seeds in one program."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from helpers import epoch_records, load_config, read_log, tiny_run_config

from mer_jax import train, trainer

# Every test here trains or reads the shared run (conftest.tiny_run): one xdist worker.
# The checks that read the shared run go to its worker; the seeds check trains its own.
pytestmark = pytest.mark.slow
tiny_run_group = pytest.mark.xdist_group("tiny_run")


@tiny_run_group
def test_run_writes_every_output(tiny_run):
  workdir, results = tiny_run
  for path in ("config.json", "log.jsonl", "eval/results.json", "eval/results.csv",
               "eval/robustness.png"):
    assert os.path.exists(os.path.join(workdir, path)), path
  assert os.listdir(os.path.join(workdir, "checkpoints", "latest"))
  assert os.listdir(os.path.join(workdir, "checkpoints", "best"))
  with open(os.path.join(workdir, "eval", "results.json")) as f:
    saved = json.load(f)
  expected = {"L", "A", "V", "LA", "LV", "AV", "LAV", "MR0.5", "frame0.0_L", "frame1.0_L",
              "frame0.0_LAV", "summary"}
  assert expected <= set(saved)
  assert "frame1.0_LAV" not in saved  # all three modalities fully masked is excluded
  for name in ("acc2_has0", "acc2_non0", "f1_has0", "acc7", "mae", "corr", "brier", "nll"):
    assert name in saved["LAV"]
  assert saved == json.loads(json.dumps(results))
  with open(os.path.join(workdir, "eval", "results.csv")) as f:
    assert len(f.read().strip().splitlines()) == len(saved) + 1
  records = epoch_records(workdir)
  assert [r["epoch"] for r in records] == [1, 2]
  best = trainer.read_checkpoint(trainer.checkpoint_dir(workdir, "", "best"))
  assert int(best["epoch"]) == records[-1]["best_epoch"]
  # Frame-level missing replaces frames (SPEC section 4): every audio and vision frame
  # gone is a different input from the full one, so the predictions move.
  assert saved["frame1.0_L"]["mae"] != saved["frame0.0_L"]["mae"]


@tiny_run_group
def test_restarting_a_finished_run_resumes_instead_of_retraining(tiny_run, tmp_path,
                                                                 monkeypatch):
  workdir = str(tmp_path / "run")
  shutil.copytree(tiny_run[0], workdir)
  results = tiny_run[1]
  before = len(epoch_records(workdir))
  # Same config: the saved results, without loading data or compiling anything.
  monkeypatch.setattr(train.pipeline, "load_data", lambda *a: pytest.fail("data loaded"))
  again = train.run(tiny_run_config(), workdir)
  assert set(again) == set(results) and again["LAV"] == results["LAV"]
  assert read_log(workdir)[-1]["event"] == "finished"
  monkeypatch.undo()
  # Another evaluation protocol: the trained stages are resumed, not retrained, and the
  # run is evaluated again.
  config = tiny_run_config()
  config.eval.missing_rates = (0.3,)
  again = train.run(config, workdir)
  assert len(epoch_records(workdir)) == before  # no epoch trained twice
  assert any(r.get("event") == "resume" for r in read_log(workdir))
  assert again["LAV"] == results["LAV"]
  assert "MR0.3" in again and "MR0.5" not in again


@tiny_run_group
def test_a_longer_run_continues_from_the_last_epoch(tiny_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(tiny_run[0], workdir)
  config = tiny_run_config()
  config.train.num_epochs = 3
  train.run(config, workdir)
  records = epoch_records(workdir)
  assert [r["epoch"] for r in records] == [1, 2, 3]
  assert records[:2] == epoch_records(tiny_run[0])  # epochs 1-2 were not trained again
  resumed = [r for r in read_log(workdir) if r.get("event") == "resume"]
  assert resumed and resumed[0]["epoch"] == 2


@tiny_run_group
def test_same_validation_losses_on_one_and_four_devices(tiny_run, tmp_path):
  config = tiny_run_config()
  config.num_devices = 1
  workdir = str(tmp_path / "one_device")
  one = train.run(config, workdir)
  assert read_log(workdir)[0]["num_devices"] == 1
  assert read_log(tiny_run[0])[0]["num_devices"] == 4
  np.testing.assert_allclose([r["val/loss"] for r in epoch_records(workdir)],
                             [r["val/loss"] for r in epoch_records(tiny_run[0])],
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(one["LAV"]["mae"], tiny_run[1]["LAV"]["mae"], rtol=1e-4)


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
  # Means agree to float32 rounding; a ci95 is 12.7 / sqrt(2) x the seeds' spread, so its
  # rounding is 9x theirs.
  ci95 = {k for k in results["LAV"] if k.endswith("_ci95")}
  for metric, value in results["LAV"].items():
    assert one_by_one["LAV"][metric] == pytest.approx(value, abs=1e-5 if metric in ci95
                                                      else 1e-6), metric
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
