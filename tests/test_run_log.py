"""What a run tells a person and a dashboard (mer_jax.run_log): the TensorBoard event
files parse back (with TensorBoard's own reader) and hold the logged values, figures
and config; the trainer's epoch records reach the console line and the on_epoch hook;
the end-of-run table holds the main metric of every stage."""

import json
import os

import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest
from helpers import Toy, random_batch, tiny_spec, toy_train_config

from mer_jax import parallel, run_log, trainer
from mer_jax.methods.base import Stage

matplotlib.use("Agg")
SPEC = tiny_spec("regression")


def read_events(folder):
  from tensorboard.backend.event_processing import event_accumulator

  accumulator = event_accumulator.EventAccumulator(folder, size_guidance={
      event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0,
      event_accumulator.TENSORS: 0})
  accumulator.Reload()
  return accumulator


def scalars(accumulator, tag):
  return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def toy_config():
  return toy_train_config(num_epochs=2)


def toy_stage(name="teacher"):
  model = Toy()

  def loss_fn(params, method_state, batch, key, context):
    del key, context
    out = model.apply({"params": params}, batch, train=True)
    task = jnp.mean(jnp.abs(out["output"] - batch["label"]))
    return task, ({"loss_task": task}, method_state)

  return Stage(name=name, model=model, loss_fn=loss_fn, num_epochs=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A toy stage trained for 2 epochs through a RunLogger with an on_epoch hook."""
  workdir = str(tmp_path_factory.mktemp("run_log"))
  config = toy_config()
  seen = []
  logger = run_log.RunLogger(workdir, config, on_epoch=seen.append)
  logger.epoch_offset = 5  # as mer_jax.train sets it for a second stage
  splits = {"train": random_batch(SPEC, 32, seed=0), "valid": random_batch(SPEC, 16, seed=1)}
  trainer.train_stage(toy_stage(), config, splits, SPEC, parallel.make_mesh(2), workdir,
                      logger=logger)
  logger.write({"event": "evaluated", "test/fixed/acc2_non0": 0.625, "test/mr/acc2_non0": 0.5})
  logger.close()
  with open(os.path.join(workdir, "log.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return workdir, records, seen


def test_epoch_records_reach_the_hook_with_the_selection_facts(trained):
  _, records, seen = trained
  epochs = [r for r in records if "selection" in r]
  assert [r["epoch"] for r in seen] == [1, 2]
  assert [r["global_epoch"] for r in seen] == [6, 7]  # epoch_offset + epoch
  for hook_record, logged in zip(seen, epochs, strict=True):
    assert hook_record["selection"] == logged["selection"]
    assert logged["selection_metric"] == "acc2_non0" and logged["num_epochs"] == 2
  # best_selection is the running maximum of the selection values.
  assert [r["best_selection"] for r in epochs] == pytest.approx(
      np.maximum.accumulate([r["selection"] for r in epochs]))


def test_tensorboard_events_hold_the_logged_values(trained):
  workdir, records, _ = trained
  events = read_events(os.path.join(workdir, "tensorboard"))
  steps = [r for r in records if "train/loss" in r and "selection" not in r]
  epochs = [r for r in records if "selection" in r]
  assert len(steps) == 4  # 4 steps per epoch, logged every 2
  assert scalars(events, "teacher/train/loss") == [
      (r["step"], pytest.approx(r["train/loss"], rel=1e-6)) for r in steps]
  assert scalars(events, "teacher/val/selection") == [
      (r["step"], pytest.approx(r["selection"], rel=1e-6)) for r in epochs]
  assert scalars(events, "teacher/train_epoch/loss") == [
      (r["step"], pytest.approx(r["train/loss"], rel=1e-6)) for r in epochs]
  assert scalars(events, "teacher/val/LA/acc2_non0") == [
      (r["step"], pytest.approx(r["val/LA/acc2_non0"], rel=1e-6)) for r in epochs]
  assert scalars(events, "test/fixed/acc2_non0") == [(epochs[-1]["step"], 0.625)]
  # The resolved config as text, and TensorBoard hparams (config + headline metrics).
  text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
  assert '"learning_rate": 0.01' in text
  assert set(events.PluginTagToContent("hparams")) >= {"_hparams_/experiment",
                                                       "_hparams_/session_start_info"}


def test_figures_are_logged_as_images(tmp_path):
  import matplotlib.pyplot as plt

  eval_dir = tmp_path / "eval" / "teacher"
  eval_dir.mkdir(parents=True)
  fig, ax = plt.subplots(figsize=(2, 1), dpi=50)
  ax.plot([0, 1], [1, 0])
  fig.savefig(eval_dir / "robustness.png")
  plt.close(fig)
  logger = run_log.RunLogger(str(tmp_path))
  logger.figures(str(tmp_path / "eval"))
  logger.close()
  images = read_events(str(tmp_path / "tensorboard")).Images("figures/eval/teacher/robustness")
  assert (images[0].width, images[0].height) == (100, 50)


def test_tensorboard_can_be_switched_off_and_seeds_are_separate_runs(tmp_path):
  config = toy_config()
  config.log.tensorboard = False
  record = {"stage": "s", "step": 2, "epoch": 1, "train/loss": 1.0}
  logger = run_log.RunLogger(str(tmp_path / "off"), config)
  logger.write(record)
  logger.close()
  assert os.listdir(tmp_path / "off") == ["log.jsonl"]
  parent = run_log.RunLogger(str(tmp_path / "on"), toy_config())
  seed_dirs = [str(tmp_path / "on" / f"seed{s}") for s in (3, 4)]
  children = parent.for_seeds(seed_dirs, [3, 4])
  assert parent.for_seeds(seed_dirs, [3, 4]) == children  # the trainer gets the same ones
  for child, loss in zip(children, (1.0, 2.0), strict=True):
    child.write(dict(record, **{"train/loss": loss}))
  parent.close()
  for seed_dir, loss in zip(seed_dirs, (1.0, 2.0), strict=True):
    assert scalars(read_events(os.path.join(seed_dir, "tensorboard")), "s/train/loss") == [
        (2, loss)]


def test_epoch_line_shows_the_metric_not_its_negated_selection():
  record = {"stage": "student", "epoch": 3, "num_epochs": 20, "train/loss": 0.51234,
            "selection_metric": "mae", "val/mae": 0.8, "selection": -0.8,
            "best_selection": -0.7, "best_epoch": 2, "epoch_seconds": 12.34}
  assert run_log.format_epoch(record, "seed 1") == (
      "[student seed 1]  epoch  3/20  train loss 0.5123  val mae 0.8000  "
      "best 0.7000 (epoch 2)  12.3 s")


def test_headline_table_of_every_stage(tmp_path):
  def results(offset):
    rows = {name: {"acc2_non0": offset + 0.01 * i, "mae": 1.0}
            for i, name in enumerate(("L", "A", "V", "LA", "LV", "AV", "LAV"))}
    rows["summary"] = {"mr/acc2_non0": offset + 0.5, "auilc/acc2_non0": offset + 0.25}
    return rows

  eval_dir = tmp_path / "eval"
  (eval_dir / "teacher").mkdir(parents=True)
  (eval_dir / "teacher" / "results.json").write_text(json.dumps(results(0.0)))
  (eval_dir / "results.json").write_text(json.dumps(results(0.1)))
  (eval_dir / "comparison.json").write_text(json.dumps({"stages": ["teacher", "student"]}))
  report = run_log.run_report(str(tmp_path), "regression", method="mcur")
  lines = report.splitlines()
  assert lines[0].split() == ["test", "acc2_non0", "L", "A", "V", "LA", "LV", "AV", "LAV",
                              "MR", "avg", "AUILC"]
  assert lines[1].split() == ["teacher"] + [f"{v:.4f}" for v in
                                            (0, .01, .02, .03, .04, .05, .06, .5, .25)]
  assert lines[2].split()[0] == "student" and lines[2].split()[-1] == "0.3500"
  assert f"results     {eval_dir}/results.json" in lines
  assert f"            {eval_dir}/results.csv" in lines


def write_results(folder, offset):
  os.makedirs(folder, exist_ok=True)
  rows = {name: {"war": offset + 0.01 * i} for i, name in enumerate(
      ("L", "A", "V", "LA", "LV", "AV", "LAV"))}
  rows["summary"] = {"mr/war": offset + 0.5}
  with open(os.path.join(folder, "results.json"), "w") as f:
    json.dump(rows, f)


def test_compare_and_crossval_print_the_headline_table(tmp_path):
  from mer_jax import compare, crossval

  workdir = str(tmp_path)
  write_results(os.path.join(workdir, "cmarr", "eval"), 0.1)
  write_results(os.path.join(workdir, "dqf", "eval"), 0.2)
  report = {"task": "classification", "seeds": [0, 1, 2], "methods": {
      "cmarr": {"workdir": os.path.join(workdir, "cmarr"), "borrowed": False},
      "dqf": {"workdir": os.path.join(workdir, "dqf"), "borrowed": True}}}
  lines = compare.format_console(report, workdir).splitlines()
  assert lines[0].split()[:6] == ["test", "war", "(mean", "of", "3", "seeds)"]
  assert lines[0].split()[-2:] == ["MR", "avg"]  # no frame-level scenarios: no AUILC
  assert lines[1].split() == ["cmarr"] + [f"{0.1 + 0.01 * i:.4f}" for i in range(7)] + [
      "0.6000"]
  assert lines[2].split()[0] == "dqf" + compare.BORROWED_MARK
  assert f"tables      {workdir}/comparison.md" in lines

  for fold, offset in ((0, 0.1), (1, 0.3)):
    write_results(os.path.join(workdir, f"fold{fold}", "eval"), offset)
  lines = crossval.format_console({"folds": [0, 1]}, workdir, "classification").splitlines()
  rows = {line.split()[0]: line.split()[1:] for line in lines[1:5]}
  assert rows["mean"][0] == "0.2000" and rows["std"][0] == "0.1000"  # L over the folds
  assert f"results     {workdir}/crossval.json" in lines


def test_data_loading_is_one_console_line(monkeypatch, capsys):
  """TFDS announces a dataset it prepares on stdout; the run says it in one stderr line."""
  import ml_collections

  from mer_jax import cli, train

  def load_data(data_config):
    print("Downloading and preparing dataset Unknown size ...")
    return {"train": {"label": np.zeros(8)}, "valid": {"label": np.zeros(4)}}, SPEC

  monkeypatch.setattr(train.pipeline, "load_data", load_data)
  monkeypatch.setattr(cli, "verbosity", lambda: 0)
  data = ml_collections.ConfigDict({"source": "npz", "name": "mine"})
  assert train.load_data(data)[1] is SPEC
  out, err = capsys.readouterr()
  assert out == ""
  assert err.startswith("data: npz mine (regression), 8 train / 4 valid (")
  monkeypatch.setattr(cli, "verbosity", lambda: 1)
  train.load_data(data)
  assert "Downloading and preparing" in capsys.readouterr().out


def test_config_json_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
  """A write cut short (here: before the rename that completes it) leaves the previous
  config.json whole, which the run's other processes and a restarted run read."""
  from helpers import load_config

  from mer_jax import train

  config = load_config()
  train.write_config(config, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["train"]["num_epochs"] == config.train.num_epochs

  def interrupted(source, target):
    raise KeyboardInterrupt

  monkeypatch.setattr(run_log.os, "replace", interrupted)
  config.train.num_epochs += 7
  with pytest.raises(KeyboardInterrupt):
    train.write_config(config, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["train"]["num_epochs"] == config.train.num_epochs - 7
  assert os.listdir(tmp_path) == ["config.json"]  # the cut-short write's file removed


def test_results_are_replaced_whole_or_not_at_all(tmp_path):
  """An evaluation that fails while writing (here: a value JSON cannot hold) leaves the
  last complete results.json and results.csv, which a restarted run and the comparison
  runner read, and no temporary file beside them."""
  from mer_jax import evaluate

  evaluate.write_results(str(tmp_path), {"L": {"mae": 0.5, "corr": 0.25}})
  with pytest.raises(TypeError):
    evaluate.write_results(str(tmp_path), {"L": {"mae": 0.75, "corr": object()}})
  with open(tmp_path / "results.json") as f:
    assert json.load(f) == {"L": {"mae": 0.5, "corr": 0.25}}
  with open(tmp_path / "results.csv") as f:
    assert f.read().splitlines() == ["scenario,corr,mae", "L,0.25,0.5"]
  assert sorted(os.listdir(tmp_path)) == ["results.csv", "results.json"]
