"""The three command-line programs, run as a user would: train a tiny run, evaluate it
with embeddings, predict for an npz with a modality absent; a misspelt override fails."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

TINY_EVAL = ["--config.eval.missing_rates=(0.5,)", "--config.eval.frame_rates=(0.0,1.0)"]


def run_cli(*args, env_extra=None, check=True):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
  env.pop("XLA_FLAGS", None)
  result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
  if check and result.returncode != 0:
    raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stderr[-4000:]}")
  return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("cli_run"))
  cache = str(tmp_path_factory.getbasetemp() / "jax_cache")
  run_cli("mer_jax.train", "--config", "configs/dqf_mosei.py:tiny", "--workdir", workdir,
          *TINY_EVAL, env_extra={"MER_JAX_COMPILATION_CACHE": cache})
  return workdir, cache


def test_train_cli_writes_the_run_outputs(trained):
  workdir, _ = trained
  for path in ("config.json", "log.jsonl", "eval/results.json", "eval/results.csv",
               "eval/robustness.png"):
    assert os.path.exists(os.path.join(workdir, path)), path
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  assert config["method"] == "dqf" and config["data"]["spec"]["dims"] == [768, 74, 35]


def test_evaluate_cli_with_embeddings(trained):
  workdir, cache = trained
  result = run_cli("mer_jax.evaluate", "--workdir", workdir, "--embeddings",
                   "--checkpoint", "latest", env_extra={"MER_JAX_COMPILATION_CACHE": cache})
  # The console ends with the headline table and the output paths, not the summary JSON.
  lines = result.stdout.splitlines()
  assert lines[0].split()[:2] == ["test", "acc2_non0"] and lines[1].split()[0] == "dqf"
  assert f"results     {workdir}/eval/results.json" in lines
  with open(os.path.join(workdir, "eval", "results.json")) as f:
    assert "fixed/acc2_has0" in json.load(f)["summary"]
  with np.load(os.path.join(workdir, "eval", "embeddings.npz")) as data:
    assert data["LAV"].shape[0] == data["labels"].shape[0] == 32
    assert set(("L", "A", "V", "LA", "LV", "AV", "LAV")) <= set(data.files)
  assert os.path.getsize(os.path.join(workdir, "eval", "tsne.png")) > 1000


def test_predict_cli_with_an_absent_modality(trained, tmp_path):
  workdir, cache = trained
  rng = np.random.default_rng(0)
  inputs = {"text": rng.normal(size=(3, 10, 768)).astype(np.float32),
            "vision": rng.normal(size=(3, 50, 35)).astype(np.float32),
            "vision_lengths": np.array([50, 20, 5]), "id": np.array(["a", "b", "c"])}
  np.savez(tmp_path / "in.npz", **inputs)
  out = tmp_path / "out.json"
  run_cli("mer_jax.predict", "--workdir", workdir, "--input", str(tmp_path / "in.npz"),
          "--output", str(out), env_extra={"MER_JAX_COMPILATION_CACHE": cache})
  records = json.loads(out.read_text())
  assert [r["id"] for r in records] == ["a", "b", "c"]
  for record in records:
    assert record["available"] == ["text", "vision"]
    assert np.isfinite(record["score"])
    p = record["probability_positive"]
    assert 0 < p < 1
    expected_entropy = -(p * np.log(p) + (1 - p) * np.log(1 - p))
    assert record["entropy"] == pytest.approx(expected_entropy, rel=1e-4)


def test_python_prediction_api_matches_the_cli_and_ignores_absent_inputs(trained):
  from mer_jax.predict import Model

  workdir, _ = trained
  model = Model(workdir)
  rng = np.random.default_rng(1)
  text = rng.normal(size=(2, 50, 768)).astype(np.float32)
  only_text = model({"text": text})
  # Audio flagged absent through zero lengths must give the same predictions.
  with_empty_audio = model({"text": text, "audio": rng.normal(size=(2, 50, 74)).astype(
      np.float32), "audio_lengths": np.zeros(2, int)})
  np.testing.assert_allclose([r["score"] for r in only_text],
                             [r["score"] for r in with_empty_audio], atol=1e-5)
  with pytest.raises(ValueError, match="'text'.*768"):
    model({"text": text[:, :, :10]})


def test_misspelt_override_is_an_error(tmp_path):
  result = run_cli("mer_jax.train", "--config", "configs/dqf_mosei.py:tiny", "--workdir",
                   str(tmp_path), "--config.train.num_epoch=3", check=False)
  assert result.returncode != 0
  assert "num_epoch" in result.stderr
