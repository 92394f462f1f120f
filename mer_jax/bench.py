r"""Throughput benchmark of a method's compiled train step and evaluation forward.

    python -m mer_jax.bench --config configs/dqf_mosei.py:synthetic --steps 20

Prints one JSON line: train and evaluation compile seconds, checkpoint save seconds,
the training loop's epoch seconds and `epoch_overhead_fraction` (validation + checkpoint
writes over an epoch's wall time, measured on `--loop_epochs` real epochs), train steps/s
and samples/s (median of repeats with min/max), evaluation samples/s, parameter counts
(`num_params`, `num_params_text_encoder` and `num_params_without_text_encoder`),
achieved FLOP/s of the train step against an fp32 matmul rate measured in the same run,
peak device memory where the backend reports it, and the device kind and count. For
two-stage methods the last stage (the student) is measured, with the frozen teacher's
outputs computed once for the split as the trainer does (`teacher_cache`; per step with
`--config.train.cache_teacher=False`).

FLOPs: `train_step_flops` counts the matrix products (dot_general, convolutions) of the
step's jaxpr, a scanned layer once per layer (`matmul_flops`); `train_step_xla_flops`
is XLA's `cost_analysis()` (every op, but a while-loop body once, so a scanned stack
counts as one layer). `teacher_forward_flops` is the frozen teacher's forward on one
batch; with the teacher cache, `train_step_flops_teacher_counted` adds it to the step (the
work of the per-step form), and `fraction_of_matmul_rate_teacher_counted` is that count
per step time over the matmul rate, so the cache shows as a gain.

Ratios measured in the same run: `eval_batched_speedup`, the 7 fixed combinations
evaluated one compiled call per scenario against all in one vmapped call, and
`input_wait_fraction`, the on-device batch gather timed alone over the train step (an
upper bound on the wait: the gather is dispatched asynchronously ahead of the step), and
with `--config.num_seeds=K`, `seeds_time_ratio`: the step of K seeds stacked in one
vmapped program over the step of one seed (K when compute-bound, less when one seed
leaves the device idle).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time

import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from mer_jax import cli, config_lib, evaluate, parallel, trainer
from mer_jax.data import missing, pipeline
from mer_jax.methods import build_stages, text_encoder
from mer_jax.methods.base import StageContext
from mer_jax.trainer import (
    Predictor,
    init_train_state,
    make_optimizer,
    make_train_step,
    teacher_outputs,
)


def _timed(fn, repeats: int) -> list[float]:
  """Seconds of `repeats` calls of `fn`, each waited for (`jax.block_until_ready` on its
  result), after one untimed call that is waited for too: JAX dispatches asynchronously,
  so an unwaited warm-up would still run inside the first timed call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - started)
  return times


def matmul_flops_per_second(size: int = 1024, repeats: int = 5) -> float:
  """Measured fp32 matmul rate of the default device (the roofline reference)."""
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  return 2 * size**3 / float(np.median(_timed(lambda: matmul(a), repeats)))


def _xla_flops(compiled) -> float | None:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  return float(analysis["flops"]) if analysis and "flops" in analysis else None


def _equation_matmul_flops(eqn) -> float:
  out = eqn.outvars[0].aval
  if eqn.primitive.name == "dot_general":
    (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2.0 * np.prod(out.shape) * np.prod([lhs[d] for d in lhs_contracting])
  # conv_general_dilated: every output element sums over the kernel's spatial window and
  # its (per-group) input features.
  rhs = eqn.invars[1].aval.shape
  rhs_spec = eqn.params["dimension_numbers"].rhs_spec
  return 2.0 * np.prod(out.shape) * np.prod([rhs[d] for d in rhs_spec[1:]])


def matmul_flops(jaxpr) -> float:
  """FLOPs of the matrix products (dot_general, convolutions) of a (closed) jaxpr, as
  the program runs them: a scan's body counts `length` times, a cond its costliest
  branch, a while loop's body once (its trip count is not static).

  XLA's `cost_analysis()` counts every while-loop body once, so it undercounts a model
  whose layers run under `nn.scan` by about the depth; this count does not.
  """
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      total += _equation_matmul_flops(eqn)
      continue
    inner = [matmul_flops(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params)]
    if eqn.primitive.name == "cond":
      total += max(inner, default=0.0)
    else:
      total += sum(inner) * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
  return total


def checkpoint_save_seconds(state, repeats: int = 3) -> float:
  """Median seconds to write `state` as a checkpoint, start to commit (`trainer._save`
  then `wait_until_finished`: the packed layout the trainer writes)."""
  with tempfile.TemporaryDirectory() as folder:
    manager = trainer._manager(os.path.join(folder, "latest"))
    times = []
    for index in range(repeats):
      started = time.perf_counter()
      trainer._save(manager, index, state)
      manager.wait_until_finished()
      times.append(time.perf_counter() - started)
    manager.close()
  return float(np.median(times))


def loop_figures(stage, config, splits, spec, mesh, context, *, epochs: int = 3) -> dict:
  """The training loop itself (`trainer.train_stage`) for `epochs` epochs of the stage in
  a temporary folder: the first epoch's seconds (compilation included) and, over the
  later epochs, the epoch's seconds and `epoch_overhead_fraction`, the share of an
  epoch's wall time spent validating and writing checkpoints (blocking time: writes are
  asynchronous, and the next write waits for the last)."""
  stage = dataclasses.replace(stage, num_epochs=epochs)
  with tempfile.TemporaryDirectory() as workdir:
    started = time.perf_counter()
    trainer.train_stage(stage, config, splits, spec, mesh, workdir, context=context)
    loop_seconds = time.perf_counter() - started
    with open(os.path.join(workdir, "log.jsonl")) as f:
      records = [r for r in map(json.loads, f) if "val/loss" in r]
  overhead = lambda r: r["validation_seconds"] + r["checkpoint_seconds"]
  later = records[1:]
  return {
      "loop_epochs": epochs, "loop_seconds": loop_seconds,
      "first_epoch_seconds": records[0]["epoch_seconds"] + overhead(records[0]),
      "epoch_seconds": float(np.mean([r["epoch_seconds"] + overhead(r) for r in later])),
      "validation_seconds": float(np.mean([r["validation_seconds"] for r in later])),
      "checkpoint_write_seconds": float(np.mean([r["checkpoint_seconds"] for r in later])),
      "epoch_overhead_fraction": float(np.mean(
          [overhead(r) / (r["epoch_seconds"] + overhead(r)) for r in later])),
  }


def run_benchmark(config, *, steps: int = 10, repeats: int = 3, loop_epochs: int = 3) -> dict:
  """Measures the last stage of `config.method` on `config.data`; returns the record.

  `loop_epochs` > 1 also runs the training loop for that many epochs (`loop_figures`);
  0 skips it."""
  config_lib.validate_config(config)
  splits, spec = pipeline.load_data(config.data)
  mesh = parallel.make_mesh(config.num_devices)
  stages = build_stages(config, spec)
  batcher = pipeline.Batcher(splits["train"], config.train.batch_size, mesh,
                             **pipeline.placement(config.data))
  example = {k: v[:2] for k, v in batcher.arrays.items()}
  key = jax.random.key(config.seed)
  context = StageContext()
  for stage in stages[:-1]:  # earlier stages only provide (untrained) frozen params
    tx = make_optimizer(config.train, 1, 1)
    earlier = init_train_state(stage, tx, example, key)
    context = StageContext(frozen=earlier.params, frozen_state=earlier.method_state)
  stage = stages[-1]
  tx = make_optimizer(config.train, batcher.steps_per_epoch(), stage.num_epochs)
  state = parallel.replicate(init_train_state(stage, tx, example, key), mesh)
  cached = stage.teacher_forward is not None and config.train.get("cache_teacher", True)
  if cached:  # the frozen teacher's outputs once for the split, as the trainer does
    context = dataclasses.replace(context, teacher_outputs=teacher_outputs(stage, context,
                                                                           batcher))
  step = make_train_step(stage, tx, key, context, mesh)
  rows = batcher.epoch_rows(config.seed, 0)
  batch = batcher.batch(rows[0])

  started = time.perf_counter()
  traced = step.trace(state, batch)  # traced once: compiled and counted from one jaxpr
  compiled = traced.lower().compile()
  compile_seconds = time.perf_counter() - started
  flops = matmul_flops(traced.jaxpr)
  # The frozen teacher's forward on one batch: inside the step without the cache; with
  # it, the work the cache saves per step (counted as if it still ran, for the rate).
  teacher_flops = (matmul_flops(jax.make_jaxpr(stage.teacher_forward)(context.frozen, batch))
                   if stage.teacher_forward is not None else None)
  flops_teacher_counted = flops + (teacher_flops if cached else 0.0)
  save_seconds = checkpoint_save_seconds(state)

  def run_steps():
    nonlocal state
    for i in range(steps):
      state, metrics = step(state, batcher.batch(rows[i % len(rows)]))
    return metrics

  step_times = [t / steps for t in _timed(run_steps, repeats)]
  median = float(np.median(step_times))

  # Input wait: the on-device gather of a batch, timed alone, against the step.
  def gather_batches():
    for i in range(steps):
      jax.block_until_ready(batcher.batch(rows[i % len(rows)]))

  input_seconds = float(np.median(_timed(gather_batches, repeats))) / steps

  # K seeds in one vmapped step (`config.num_seeds`) against one seed's step.
  seeds_seconds = None
  if config.num_seeds > 1:
    seed_keys = jax.random.split(key, config.num_seeds)
    stacked = parallel.replicate(
        trainer.init_stacked_train_states(stage, tx, example, list(seed_keys)), mesh)
    teachers = jax.tree.map(lambda x: jnp.stack([x] * config.num_seeds),
                            (context.frozen, context.frozen_state))
    seeds_step = make_train_step(stage, tx, seed_keys, StageContext(*teachers), mesh,
                                 seed_axis=True)
    seed_rows = np.stack([rows] * config.num_seeds, axis=1)

    def run_seed_steps():
      nonlocal stacked
      for i in range(steps):
        stacked, metrics = seeds_step(stacked, batcher.batch(seed_rows[i % len(rows)]))
      return metrics

    seeds_seconds = float(np.median(_timed(run_seed_steps, repeats))) / steps
    del stacked

  predictor = Predictor.from_config(stage, mesh, config)
  eval_compile_seconds = _eval_compile_seconds(predictor, state, splits["test"], config)
  split = splits["test"]
  full = missing.fixed_modality_mask(len(split["label"]), 6)
  predict = lambda: predictor.predict_split(state.params, state.method_state, split,
                                            modality_mask=full)["output"]
  eval_seconds = float(np.median(_timed(predict, repeats)))

  # The 7 fixed combinations: one call per scenario (the loop the PyTorch repositories
  # run) against all of them in one vmapped call, both compiled before timing.
  protocol = ml_collections.ConfigDict(dict(config.eval))
  protocol.update(fixed=True, missing_rates=(), frame_rates=(), noise_intensities=())
  scenario_seconds = {}
  for per_call in (1, 7):
    protocol.scenarios_per_call = per_call
    scenarios = lambda: evaluate.run_scenarios(predictor, state.params, state.method_state,
                                               split, spec, protocol, key=key)
    scenario_seconds[per_call] = float(np.median(_timed(scenarios, repeats)))

  matmul_rate = matmul_flops_per_second()
  device = jax.devices()[0]
  memory = device.memory_stats() if hasattr(device, "memory_stats") else None
  return {
      "method": config.method, "dataset": config.data.name,
      "batch_size": config.train.batch_size,
      "device_kind": device.device_kind, "num_devices": int(mesh.devices.size),
      "backend": jax.default_backend(),
      **text_encoder.parameter_counts(state.params),
      "teacher_cache": cached,
      "train_compile_seconds": compile_seconds,
      "eval_compile_seconds": eval_compile_seconds,
      "checkpoint_save_seconds": save_seconds,
      "checkpoint_bytes": int(sum(x.nbytes for x in jax.tree.leaves(state))),
      "train_steps_per_second": 1 / median,
      "train_steps_per_second_min": 1 / max(step_times),
      "train_steps_per_second_max": 1 / min(step_times),
      "train_samples_per_second": config.train.batch_size / median,
      "eval_samples_per_second": len(split["label"]) / eval_seconds,
      "eval_fixed_scenarios_seconds_loop": scenario_seconds[1],
      "eval_fixed_scenarios_seconds_batched": scenario_seconds[7],
      "eval_batched_speedup": scenario_seconds[1] / scenario_seconds[7],
      "input_wait_fraction": input_seconds / median,
      "num_seeds": config.num_seeds,
      "seeds_time_ratio": seeds_seconds / median if seeds_seconds else None,
      "train_step_flops": flops,
      "train_step_xla_flops": _xla_flops(compiled),
      "teacher_forward_flops": teacher_flops,
      "train_step_flops_teacher_counted": flops_teacher_counted,
      "train_flops_per_second": flops / median,
      "matmul_flops_per_second": matmul_rate,
      "fraction_of_matmul_rate": flops / median / matmul_rate,
      "fraction_of_matmul_rate_teacher_counted": flops_teacher_counted / median / matmul_rate,
      "peak_memory_bytes": (memory or {}).get("peak_bytes_in_use"),
      **(loop_figures(stage, config, splits, spec, mesh, context, epochs=loop_epochs)
         if loop_epochs > 1 else {}),
  }


def _eval_compile_seconds(predictor, state, split, config) -> float:
  """Seconds to compile the evaluation forward of `config.eval.scenarios_per_call`
  scenarios (the program validation and evaluation share)."""
  per_call = int(config.eval.scenarios_per_call)
  batcher = predictor._batcher(split)
  batch = batcher.batch(batcher.ordered_rows()[0])
  batch.pop("index")
  num_rows = batch["label"].shape[0]
  batch["scenario_modality_mask"] = parallel.shard_batch(
      np.ones((num_rows, per_call, 3), bool), predictor.mesh)
  started = time.perf_counter()
  predictor._forward.lower(state.params, state.method_state, batch,
                           jnp.zeros((per_call, 3)), jnp.zeros(per_call),
                           jax.random.split(jax.random.key(0), per_call),
                           jnp.int32(0)).compile()
  return time.perf_counter() - started


def main(argv):
  del argv
  config = flags.FLAGS.config
  print(json.dumps(run_benchmark(config, steps=flags.FLAGS.steps,
                                 repeats=flags.FLAGS.repeats,
                                 loop_epochs=flags.FLAGS.loop_epochs)))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config file to benchmark.", lock_config=True)
  flags.DEFINE_integer("steps", 10, "Train steps per timed repeat.")
  flags.DEFINE_integer("repeats", 3, "Timed repeats (the median is reported).")
  flags.DEFINE_integer("loop_epochs", 3, "Epochs of the real training loop measured for the "
                       "epoch overhead (validation + checkpoints); 0 skips it.")
  cli.run(main, program="bench")
