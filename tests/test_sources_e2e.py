""":tiny training runs through `mer_jax.train.run` on fixture files of every real-data
format: the same arrays written as MMSA, MulT and npz train the same DQF model (equal
results); MCUR on MulT and npz IEMOCAP; CM-ARR on MMIN and MERBench folds; and a
cross-dataset evaluation of the shared run with adapted feature widths.

Each run uses the shapes and sizes of the synthetic preset its config trains on, so that
its compiled programs are shared with the other tests' runs (persistent compilation cache).
"""

import importlib.util
import json
import os
import pickle
import shutil

import numpy as np
import pytest
from conftest import REPO
from test_sources import (
  MERBENCH_FEATURES,
  write_merbench,
  write_mmin,
  write_mult,
  write_npz,
)

from mer_jax import evaluate, train
from mer_jax.data import pipeline
from mer_jax.metrics import PRIMARY_METRIC

pytestmark = pytest.mark.slow

E2E_DIMS, E2E_LENGTHS = (768, 74, 35), (50, 50, 50)  # the synthetic MOSEI preset's shapes
IEMOCAP_DIMS, IEMOCAP_LENGTHS = (300, 74, 35), (20, 20, 20)  # the synthetic IEMOCAP preset's
E2E_SIZES = {"train": 64, "valid": 32, "test": 32}  # the :tiny sizes


def load_run_config(config_file, **data):
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, "configs", config_file))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  # Fewer evaluation scenarios (not compiled into anything): the runs check the data path.
  # Validation keeps the config's scenarios: its forward is then the final evaluation's.
  config.eval.missing_rates = ()
  config.eval.frame_rates = ()
  with config.unlocked():
    for key, value in data.items():
      config.data[key] = value
  return config


def check_run(workdir, results, source, dims, lengths):
  """The run trained on the fixture (its DataSpec is in config.json) and evaluated every
  fixed combination with finite primary metrics in range."""
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)["data"]
  assert saved["source"] == source
  assert tuple(saved["spec"]["dims"]) == dims and tuple(saved["spec"]["lengths"]) == lengths
  metric = PRIMARY_METRIC[saved["task"]]
  for name in ("L", "A", "V", "LA", "LV", "AV", "LAV"):
    assert 0.0 <= results[name][metric] <= 1.0, (name, results[name])


def same_arrays_in_three_layouts(root):
  """One MOSEI-shaped dataset (the :tiny sizes, every frame real, as the MulT pickles
  have them) written as an MMSA aligned_50.pkl, a MulT mosei_senti_data.pkl and npz files;
  returns {source: data dir} and the arrays."""
  rng = np.random.default_rng(5)
  splits = {}
  for split, num in E2E_SIZES.items():
    splits[split] = {name: rng.normal(size=(num, length, width)).astype(np.float32)
                     for name, width, length in zip(("text", "audio", "vision"), E2E_DIMS,
                                                    E2E_LENGTHS, strict=True)}
    splits[split]["label"] = np.round(rng.uniform(-3, 3, num), 1).astype(np.float32)
  mmsa = {split: {"text": a["text"], "audio": a["audio"], "vision": a["vision"],
                  "regression_labels": a["label"],
                  "id": np.asarray([f"{split}{i}" for i in range(len(a["label"]))], object)}
          for split, a in splits.items()}
  mult = {split: {"text": a["text"], "audio": a["audio"], "vision": a["vision"],
                  "labels": a["label"].reshape(-1, 1, 1),
                  "id": np.asarray([[f"{split}{i}".encode(), b"0", b"0"]
                                    for i in range(len(a["label"]))])}
          for split, a in splits.items()}
  for folder, name, data in (("mmsa", "aligned_50.pkl", mmsa),
                             ("mult", "mosei_senti_data.pkl", mult)):
    os.makedirs(root / folder)
    with open(root / folder / name, "wb") as f:
      pickle.dump(data, f)
  os.makedirs(root / "npz")
  for split, arrays in splits.items():
    np.savez(root / "npz" / f"{split}.npz", **arrays)
  return {source: str(root / source) for source in ("mmsa", "mult", "npz")}, splits


def test_the_same_arrays_in_the_mmsa_mult_and_npz_layouts_train_the_same_model(tmp_path):
  dirs, arrays = same_arrays_in_three_layouts(tmp_path)
  runs = {}
  for source, folder in dirs.items():
    config = load_run_config("dqf_mosei.py", source=source, name="mosei", dir=folder,
                             cache_dir=str(tmp_path / "tfds"))
    splits, spec = pipeline.load_data(config.data)
    assert spec.dims == E2E_DIMS and spec.lengths == E2E_LENGTHS and spec.task == "regression"
    for split, expected in arrays.items():
      for key, value in expected.items():
        np.testing.assert_array_equal(splits[split][key], value, err_msg=f"{source} {key}")
      for name in ("text", "audio", "vision"):
        assert splits[split][f"{name}_mask"].all()
    workdir = str(tmp_path / f"run_{source}")
    runs[source] = train.run(config, workdir)
    check_run(workdir, runs[source], source, E2E_DIMS, E2E_LENGTHS)
  # One model, whatever the layout it was read from: the same results, metric by metric.
  for source in ("mult", "npz"):
    for scenario, metrics in runs["mmsa"].items():
      for metric, value in metrics.items():
        if isinstance(value, float):
          assert runs[source][scenario][metric] == pytest.approx(value, rel=1e-5, abs=1e-7), (
              source, scenario, metric)


@pytest.mark.xdist_group("tiny_run")
def test_cross_dataset_evaluation_adapts_widths(tiny_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(tiny_run[0], workdir)
  # MCUR A.5.9: the MOSEI model on SIMS-shaped features (768/33/709 x 39/400/55).
  write_npz(tmp_path / "sims", sizes=(8, 8, 8), dims=(768, 33, 709), lengths=(39, 400, 55))
  eval_data = load_run_config("dqf_mosei.py", source="npz", name="sims", dir=str(tmp_path / "sims"),
                              cache_dir=str(tmp_path / "tfds")).data
  with pytest.raises(ValueError, match="--adapt_widths"):
    evaluate.evaluate_run(workdir, eval_data=eval_data)
  cross = evaluate.evaluate_run(workdir, eval_data=eval_data, adapt_widths=True)
  for name in ("L", "A", "V", "LAV"):
    assert np.isfinite(cross[name]["mae"]) and 0.0 <= cross[name]["acc2_has0"] <= 1.0
  # The run's own evaluation is kept; the other dataset's goes beside it.
  with open(os.path.join(workdir, "eval_sims", "results.json")) as f:
    assert json.load(f)["LAV"]["mae"] == pytest.approx(cross["LAV"]["mae"])
  with open(os.path.join(workdir, "eval", "results.json")) as f:
    assert json.load(f)["LAV"]["mae"] == pytest.approx(tiny_run[1]["LAV"]["mae"])


def test_tiny_mcur_runs_on_mult_pickle_and_own_npz_features(tmp_path):
  sizes = tuple(E2E_SIZES.values())
  write_mult(tmp_path / "mult", sizes=sizes, dims=IEMOCAP_DIMS, length=IEMOCAP_LENGTHS[0])
  config = load_run_config("mcur_iemocap.py", source="mult", dir=str(tmp_path / "mult"),
                           cache_dir=str(tmp_path / "tfds"))
  workdir = str(tmp_path / "run_mult")
  check_run(workdir, train.run(config, workdir), "mult", IEMOCAP_DIMS, IEMOCAP_LENGTHS)
  write_npz(tmp_path / "mine", sizes=sizes, dims=IEMOCAP_DIMS, lengths=IEMOCAP_LENGTHS,
            task="multilabel_binary")
  config = load_run_config("mcur_iemocap.py", source="npz", name="mine",
                           dir=str(tmp_path / "mine"), cache_dir=str(tmp_path / "tfds"))
  workdir = str(tmp_path / "run_npz")
  check_run(workdir, train.run(config, workdir), "npz", IEMOCAP_DIMS, IEMOCAP_LENGTHS)


def test_tiny_cmarr_runs_on_mmin_and_merbench_folds(tmp_path):
  write_mmin(tmp_path / "mmin", per_speaker=6, dims=IEMOCAP_DIMS, max_frames=IEMOCAP_LENGTHS)
  config = load_run_config("cmarr_iemocap.py", source="mmin", dir=str(tmp_path / "mmin"),
                           cache_dir=str(tmp_path / "tfds"), num_folds=5, fold=1)
  workdir = str(tmp_path / "run_mmin")
  check_run(workdir, train.run(config, workdir), "mmin", IEMOCAP_DIMS, IEMOCAP_LENGTHS)
  src = tmp_path / "iemocap-process"
  write_merbench(src, whole=True, names_per_split=(8,), dims=IEMOCAP_DIMS,
                  max_frames=IEMOCAP_LENGTHS, classes=4)
  config = load_run_config("cmarr_iemocap.py", source="merbench", dir=str(src),
                           cache_dir=str(tmp_path / "tfds"), num_folds=5, fold=2,
                           features=MERBENCH_FEATURES)
  workdir = str(tmp_path / "run_merbench")
  check_run(workdir, train.run(config, workdir), "merbench", IEMOCAP_DIMS, IEMOCAP_LENGTHS)
