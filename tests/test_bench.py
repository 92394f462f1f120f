"""The benchmark runs a few steps of every method and reports every field with sane
values."""

import importlib.util
import math
import os

import pytest
from conftest import REPO

from mer_jax.bench import run_benchmark


@pytest.mark.parametrize("config_file", ["dqf_mosei.py", "mcur_mosei.py", "cmad_mosei.py",
                                         "cmarr_iemocap.py", "ease_mosei.py"])
def test_benchmark_reports_every_field(config_file):
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, "configs", config_file))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  with_seeds = config_file == "mcur_mosei.py"  # stacked seeds, stacked teachers included
  if with_seeds:
    config.num_seeds = 2
  record = run_benchmark(config, steps=2, repeats=2)
  for name in ("compile_seconds", "train_steps_per_second", "train_samples_per_second",
               "eval_samples_per_second", "matmul_flops_per_second", "train_step_flops",
               "train_flops_per_second", "fraction_of_matmul_rate",
               "eval_fixed_scenarios_seconds_loop", "eval_fixed_scenarios_seconds_batched",
               "eval_batched_speedup", "input_wait_fraction"):
    assert math.isfinite(record[name]) and record[name] > 0, name
  assert record["train_steps_per_second_min"] <= record["train_steps_per_second"]
  assert record["train_steps_per_second"] <= record["train_steps_per_second_max"]
  assert math.isclose(record["train_samples_per_second"],
                      record["train_steps_per_second"] * config.train.batch_size)
  assert math.isclose(record["eval_batched_speedup"],
                      record["eval_fixed_scenarios_seconds_loop"]
                      / record["eval_fixed_scenarios_seconds_batched"])
  assert record["num_params"] > 1000 and record["num_devices"] == 4
  assert record["method"] == config.method and record["backend"] == "cpu"
  if with_seeds:
    assert record["num_seeds"] == 2
    assert math.isfinite(record["seeds_time_ratio"]) and record["seeds_time_ratio"] > 0
  else:
    assert record["seeds_time_ratio"] is None
