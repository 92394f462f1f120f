"""The command-line programs, run as a user would, on the run `python -m mer_jax.train`
trained (`conftest.cli_run`): `evaluate --checkpoint best` reproduces the run's own
evaluation and writes embeddings and t-SNE; `predict` writes what the Python API returns
for an npz with a modality absent; a misspelt override fails."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, subprocess_env

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("tiny_run")]


def run_cli(*args, num_devices=1, check=True):
  result = subprocess.run([sys.executable, "-m", *args], cwd=REPO,
                          env=subprocess_env(num_devices), capture_output=True, text=True,
                          timeout=900)
  if check and result.returncode != 0:
    raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stderr[-4000:]}")
  return result


def test_train_cli_writes_the_run_outputs(cli_run):
  for path in ("config.json", "log.jsonl", "eval/results.json", "eval/results.csv",
               "eval/robustness.png"):
    assert os.path.exists(os.path.join(cli_run, path)), path
  with open(os.path.join(cli_run, "config.json")) as f:
    config = json.load(f)
  assert config["method"] == "dqf" and config["data"]["spec"]["dims"] == [768, 74, 35]


def test_evaluate_cli_reproduces_the_run_and_writes_embeddings(cli_run, tmp_path):
  with open(os.path.join(cli_run, "eval", "results.json")) as f:
    trained = json.load(f)
  # A copy: the session's run folder stays as training left it.
  workdir = str(tmp_path / "run")
  subprocess.run(["cp", "-r", cli_run, workdir], check=True)
  result = run_cli("mer_jax.evaluate", "--workdir", workdir, "--embeddings",
                   "--checkpoint", "best", num_devices=4)
  with open(os.path.join(workdir, "eval", "results.json")) as f:
    again = json.load(f)
  assert set(again) == set(trained)
  for scenario, metrics in trained.items():
    for metric, value in metrics.items():
      if isinstance(value, float):
        np.testing.assert_allclose(again[scenario][metric], value, rtol=1e-6, atol=1e-9,
                                   err_msg=f"{scenario}/{metric}")
  # The console ends with the headline table and the output paths, not the summary JSON.
  lines = result.stdout.splitlines()
  assert lines[0].split()[:2] == ["test", "acc2_non0"] and lines[1].split()[0] == "dqf"
  assert lines[1].split()[1] == f"{again['L']['acc2_non0']:.4f}"
  assert f"results     {workdir}/eval/results.json" in lines
  with np.load(os.path.join(workdir, "eval", "embeddings.npz")) as data:
    assert data["LAV"].shape[0] == data["labels"].shape[0] == 32
    assert set(("L", "A", "V", "LA", "LV", "AV", "LAV")) <= set(data.files)
    assert not np.allclose(data["L"], data["LAV"])  # the scenarios reach the embeddings
  assert os.path.getsize(os.path.join(workdir, "eval", "tsne.png")) > 1000


def test_predict_cli_equals_the_python_api_and_ignores_absent_inputs(cli_run, tmp_path):
  from mer_jax.predict import Model

  rng = np.random.default_rng(0)
  inputs = {"text": rng.normal(size=(3, 10, 768)).astype(np.float32),
            "vision": rng.normal(size=(3, 50, 35)).astype(np.float32),
            "vision_lengths": np.array([50, 20, 5]), "id": np.array(["a", "b", "c"])}
  np.savez(tmp_path / "in.npz", **inputs)
  out = tmp_path / "out.json"
  run_cli("mer_jax.predict", "--workdir", cli_run, "--input", str(tmp_path / "in.npz"),
          "--output", str(out))
  records = json.loads(out.read_text())
  assert [r["id"] for r in records] == ["a", "b", "c"]
  for record in records:
    assert record["available"] == ["text", "vision"]
    p = record["probability_positive"]
    assert 0 < p < 1
    expected_entropy = -(p * np.log(p) + (1 - p) * np.log(1 - p))
    assert record["entropy"] == pytest.approx(expected_entropy, rel=1e-4)

  model = Model(cli_run)
  api = model(inputs)
  np.testing.assert_allclose([r["score"] for r in records], [r["score"] for r in api],
                             rtol=1e-5, atol=1e-6)
  # Audio flagged absent through zero lengths gives the same predictions.
  with_empty_audio = model(dict(inputs, audio=rng.normal(size=(3, 50, 74)).astype(np.float32),
                                audio_lengths=np.zeros(3, int)))
  np.testing.assert_allclose([r["score"] for r in api],
                             [r["score"] for r in with_empty_audio], atol=1e-5)
  with pytest.raises(ValueError, match="'text'.*768"):
    model({"text": inputs["text"][:, :, :10]})


def test_misspelt_override_is_an_error(tmp_path):
  result = run_cli("mer_jax.train", "--config", "configs/dqf_mosei.py:tiny", "--workdir",
                   str(tmp_path), "--config.train.num_epoch=3", check=False)
  assert result.returncode != 0
  assert "num_epoch" in result.stderr
  assert not os.listdir(tmp_path)  # refused before anything was written
