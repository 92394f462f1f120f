"""Multi-process training: two processes on localhost (CPU gloo collectives, two devices
each) train the same run as one process with four devices, step for step."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
from conftest import REPO

ARGS = ["--config", "configs/dqf_mosei.py:tiny", "--config.train.num_epochs=2",
        "--config.train.log_every_steps=1", "--config.train.progress=False",
        "--config.eval.missing_rates=(0.5,)", "--config.eval.frame_rates=()"]
TIMEOUT = 900


def _env(devices_per_process):
  cache = os.path.join(REPO, ".pytest_cache", "jax_compilation_cache_cli")
  env = dict(os.environ, JAX_PLATFORMS="cpu", MER_JAX_COMPILATION_CACHE=cache,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(extra, workdir, env, name):
  log = open(os.path.join(os.path.dirname(workdir), f"{name}.stderr"), "w")  # noqa: SIM115
  process = subprocess.Popen([sys.executable, "-m", "mer_jax.train", *ARGS, *extra,
                              "--workdir", workdir], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=log)
  return process, log.name


def _wait(process, log_path):
  try:
    code = process.wait(timeout=TIMEOUT)
  except subprocess.TimeoutExpired:
    process.kill()
    code = "timeout"
  if code != 0:
    with open(log_path) as f:
      raise AssertionError(f"{log_path}: exit {code}\n{f.read()[-4000:]}")


def _records(workdir):
  with open(os.path.join(workdir, "log.jsonl")) as f:
    records = [json.loads(line) for line in f]
  steps = {r["step"]: r["train/loss"] for r in records if "train/loss" in r and "epoch" in r
           and "val/loss" not in r}
  epochs = [r["val/loss"] for r in records if "val/loss" in r]
  return steps, epochs


def test_two_processes_equal_one_process(tmp_path):
  single = str(tmp_path / "single")
  reference, reference_log = _start([], single, _env(4), "single")
  _wait(reference, reference_log)

  multi = str(tmp_path / "multi")
  address = f"127.0.0.1:{_free_port()}"
  processes = [_start(["--coordinator_address", address, "--num_processes", "2",
                       "--process_id", str(i)], multi, _env(2), f"process{i}")
               for i in range(2)]
  for process, log_path in processes:
    _wait(process, log_path)

  single_steps, single_epochs = _records(single)
  multi_steps, multi_epochs = _records(multi)
  assert len(single_steps) >= 4 and sorted(multi_steps) == sorted(single_steps)
  np.testing.assert_allclose([multi_steps[s] for s in sorted(multi_steps)],
                             [single_steps[s] for s in sorted(single_steps)], rtol=1e-5)
  np.testing.assert_allclose(multi_epochs, single_epochs, rtol=1e-5)
  with open(os.path.join(single, "eval", "results.json")) as f:
    single_results = json.load(f)
  with open(os.path.join(multi, "eval", "results.json")) as f:
    multi_results = json.load(f)
  assert set(multi_results) == set(single_results)
  for scenario in ("L", "LAV", "MR0.5"):
    for metric, value in single_results[scenario].items():
      np.testing.assert_allclose(multi_results[scenario][metric], value, rtol=1e-4, atol=1e-6,
                                 err_msg=f"{scenario}/{metric}")
