"""The benchmark measures what it reports: known delays injected into the checkpoint
write and the validation show up in their fields and in the epoch overhead; parameter
and checkpoint sizes equal an independent count; stacked seeds (with stacked frozen
teachers) are timed against one seed."""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_config

from mer_jax import trainer
from mer_jax.bench import _timed, matmul_flops, run_benchmark
from mer_jax.data import pipeline
from mer_jax.methods import build_stages

pytestmark = pytest.mark.slow

FINITE_POSITIVE = ("train_compile_seconds", "eval_compile_seconds", "checkpoint_save_seconds",
                   "train_steps_per_second", "train_samples_per_second",
                   "eval_samples_per_second", "matmul_flops_per_second", "train_step_flops",
                   "train_flops_per_second", "fraction_of_matmul_rate",
                   "eval_fixed_scenarios_seconds_loop", "eval_fixed_scenarios_seconds_batched",
                   "eval_batched_speedup", "input_wait_fraction")


def slowed(monkeypatch, name, seconds):
  original = getattr(trainer, name)

  def slow(*args, **kwargs):
    time.sleep(seconds)
    return original(*args, **kwargs)

  monkeypatch.setattr(trainer, name, slow)


class Dispatched:
  """A result that is only done once waited for, as an asynchronously dispatched array."""

  def __init__(self, events, index):
    self.events, self.index = events, index

  def block_until_ready(self):
    self.events.append(f"wait {self.index}")
    return self


def test_timed_waits_for_its_warm_up_before_the_first_timed_call():
  events = []

  def dispatch():
    index = sum(event.startswith("call") for event in events)
    events.append(f"call {index}")
    return {"metrics": Dispatched(events, index)}

  assert len(_timed(dispatch, 2)) == 2
  # The warm-up (call 0) is waited for before the first timed call starts.
  assert events == ["call 0", "wait 0", "call 1", "wait 1", "call 2", "wait 2"]


def test_benchmark_measures_the_loop_and_its_sizes(monkeypatch):
  config = load_config("dqf_mosei.py", "tiny")
  slowed(monkeypatch, "_save", 0.3)  # every checkpoint write (best and latest)
  slowed(monkeypatch, "validate", 0.5)
  record = run_benchmark(config, steps=2, repeats=1, loop_epochs=2)
  for name in FINITE_POSITIVE:
    assert math.isfinite(record[name]) and record[name] > 0, name
  assert record["checkpoint_save_seconds"] >= 0.3
  assert record["validation_seconds"] >= 0.5
  # The second epoch writes `latest` (and `best` when it improved): at least one write.
  assert record["checkpoint_write_seconds"] >= 0.3
  overhead = record["validation_seconds"] + record["checkpoint_write_seconds"]
  assert record["epoch_overhead_fraction"] == pytest.approx(overhead / record["epoch_seconds"],
                                                            rel=1e-6)
  assert 0 < record["epoch_overhead_fraction"] < 1
  assert record["loop_epochs"] == 2 and record["loop_seconds"] > record["epoch_seconds"]
  # Sizes against an independent count of the shapes.
  splits, spec = pipeline.load_data(config.data)
  stage = build_stages(config, spec)[-1]
  example = {k: v[:2] for k, v in pipeline.device_arrays(splits["train"]).items()}
  params = jax.eval_shape(lambda: stage.model.init(jax.random.key(0), example,
                                                   train=False)["params"])
  assert record["num_params"] == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  tx = trainer.make_optimizer(config.train, 4, 2)
  state = jax.eval_shape(lambda: trainer.init_train_state(stage, tx, example,
                                                          jax.random.key(0)))
  assert record["checkpoint_bytes"] == sum(x.size * x.dtype.itemsize
                                           for x in jax.tree.leaves(state))
  assert record["checkpoint_bytes"] > 3 * 4 * record["num_params"]  # params + Adam's two
  assert record["num_devices"] == 4 and record["backend"] == "cpu"
  assert record["seeds_time_ratio"] is None


def test_benchmark_times_stacked_seeds_with_stacked_teachers():
  config = load_config("mcur_mosei.py", "tiny")
  config.num_seeds = 2
  record = run_benchmark(config, steps=2, repeats=2, loop_epochs=0)
  assert record["num_seeds"] == 2 and record["method"] == "mcur"
  assert math.isfinite(record["seeds_time_ratio"]) and record["seeds_time_ratio"] > 0
  assert record["train_steps_per_second_min"] <= record["train_steps_per_second"]
  assert record["train_steps_per_second"] <= record["train_steps_per_second_max"]
  assert "epoch_overhead_fraction" not in record  # loop_epochs=0 skips the loop
  # The cached teacher's forward is counted on top of the step, as if it still ran.
  assert record["teacher_cache"] and record["teacher_forward_flops"] > 0
  assert record["train_step_flops_teacher_counted"] == pytest.approx(
      record["train_step_flops"] + record["teacher_forward_flops"])
  assert record["fraction_of_matmul_rate_teacher_counted"] == pytest.approx(
      record["fraction_of_matmul_rate"] * record["train_step_flops_teacher_counted"]
      / record["train_step_flops"])


def test_matmul_flops_counts_scanned_layers_convolutions_and_gradients():
  x, w = jnp.ones((4, 6)), jnp.ones((6, 6))
  layers = lambda x: jax.lax.scan(lambda h, _: (jnp.tanh(h @ w), None), x, length=5)[0]
  assert matmul_flops(jax.make_jaxpr(layers)(x)) == 5 * 2 * 4 * 6 * 6
  # Batched contraction: (B, T, D) x (B, S, D) -> (B, T, S).
  scores = lambda q, k: jnp.einsum("btd,bsd->bts", q, k)
  assert matmul_flops(jax.make_jaxpr(scores)(jnp.ones((3, 5, 8)), jnp.ones((3, 7, 8)))) \
      == 2 * 3 * 5 * 7 * 8
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1,), "SAME",
                                                   dimension_numbers=("NWC", "WIO", "NWC"))
  signal, kernel = jnp.ones((2, 10, 5)), jnp.ones((3, 5, 7))
  forward = 2 * 2 * 10 * 7 * (3 * 5)  # each output sums over 3 taps x 5 input features
  assert matmul_flops(jax.make_jaxpr(conv)(signal, kernel)) == forward
  # The gradient with respect to both operands costs two more convolutions of that size.
  both = jax.grad(lambda x, k: conv(x, k).sum(), argnums=(0, 1))
  assert matmul_flops(jax.make_jaxpr(both)(signal, kernel)) == 3 * forward
  # A cond counts its costliest branch.
  branch = lambda x: jax.lax.cond(x.sum() > 0, lambda: x @ w @ w, lambda: x @ w)
  assert matmul_flops(jax.make_jaxpr(branch)(x)) == 2 * (2 * 4 * 6 * 6)
