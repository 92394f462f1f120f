"""Multi-process training: two processes on localhost (CPU gloo collectives, two devices
each, `conftest.cli_run`) train the same run as one process with four devices
(`conftest.tiny_run`), step for step."""

import json
import os

import numpy as np
import pytest
from helpers import read_log

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("tiny_run")]


def _records(workdir):
  records = read_log(workdir)
  steps = {r["step"]: r["train/loss"] for r in records if "train/loss" in r and "epoch" in r
           and "val/loss" not in r}
  epochs = [r["val/loss"] for r in records if "val/loss" in r]
  return steps, epochs


def test_two_processes_equal_one_process(tiny_run, cli_run):
  single, single_results = tiny_run
  single_steps, single_epochs = _records(single)
  multi_steps, multi_epochs = _records(cli_run)
  assert len(single_steps) >= 4 and sorted(multi_steps) == sorted(single_steps)
  np.testing.assert_allclose([multi_steps[s] for s in sorted(multi_steps)],
                             [single_steps[s] for s in sorted(single_steps)], rtol=1e-5)
  np.testing.assert_allclose(multi_epochs, single_epochs, rtol=1e-5)
  assert read_log(cli_run)[0]["num_devices"] == 4
  with open(os.path.join(cli_run, "eval", "results.json")) as f:
    multi_results = json.load(f)
  assert set(multi_results) == set(single_results)
  for scenario in ("L", "LAV", "MR0.5", "frame1.0_L"):
    for metric, value in single_results[scenario].items():
      np.testing.assert_allclose(multi_results[scenario][metric], value, rtol=1e-4, atol=1e-6,
                                 err_msg=f"{scenario}/{metric}")
