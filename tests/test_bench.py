"""The benchmark runs a few steps and reports every field with sane values."""

import importlib.util
import math
import os

from conftest import REPO

from mer_jax.bench import run_benchmark


def test_benchmark_reports_every_field():
  spec = importlib.util.spec_from_file_location(
      "cfg", os.path.join(REPO, "configs", "dqf_mosei.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  record = run_benchmark(config, steps=2, repeats=2)
  for name in ("compile_seconds", "train_steps_per_second", "train_samples_per_second",
               "eval_samples_per_second", "matmul_flops_per_second", "train_step_flops",
               "train_flops_per_second", "fraction_of_matmul_rate"):
    assert math.isfinite(record[name]) and record[name] > 0, name
  assert record["train_steps_per_second_min"] <= record["train_steps_per_second"]
  assert record["train_steps_per_second"] <= record["train_steps_per_second_max"]
  assert record["train_samples_per_second"] == record["train_steps_per_second"] * 16
  assert record["num_params"] > 1000 and record["num_devices"] == 4
  assert record["method"] == "dqf" and record["backend"] == "cpu"
