r"""Trains a method, evaluates it under every missing-modality protocol, and writes
the run outputs of SPEC section 10.

    python -m mer_jax.train --config configs/dqf_mosei.py:synthetic --workdir /tmp/run

Overrides use the config names: `--config.train.num_epochs=3`. Starting again with
the same workdir resumes from the latest checkpoint (a finished stage is skipped; a
finished run with the same config returns its saved results).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import os
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from mer_jax import cli, config_lib, evaluate, parallel, run_log
from mer_jax.data import pipeline
from mer_jax.methods import build_stages
from mer_jax.methods.base import StageContext
from mer_jax.run_log import RunLogger
from mer_jax.trainer import train_stage

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/<method>_<dataset>.py[:variant]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it exists).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for multi-process runs (optional; "
                                   "SLURM/TPU are discovered automatically with --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir whose saved config differs.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() (implied by "
                                 "--coordinator_address).")


# Fields that may change between a run and its resumption: they do not change what a
# finished step computed.
RESUMABLE_CHANGES = ("train.num_epochs", "train.progress", "train.log_every_steps",
                     "train.on_nonfinite", "train.checkpoint_every_epochs",
                     "train.checkpoint_every_seconds", "num_devices", "data.on_device",
                     "data.device_memory_share", "data.cache_dir", "data.spec",
                     "log.tensorboard")


# Fields that change no result of a finished run (a run with only these changed is
# finished; the number of epochs is not among them).
NO_EFFECT_FIELDS = ("data.spec",) + tuple(f for f in RESUMABLE_CHANGES if f != "train.num_epochs")


def _comparable(config_json) -> dict:
  return {k: v for k, v in run_log.flatten_config(config_json).items()
          if not any(k == f or k.startswith(f + ".") for f in NO_EFFECT_FIELDS)}


def finished_results(config, workdir: str) -> dict | None:
  """The evaluation results of a run in `workdir` that finished with this config (fields
  that change no result aside, evaluation settings included), or None when something
  must still be trained or evaluated."""
  saved = run_log.read_json(os.path.join(workdir, "config.json"))
  results = run_log.read_json(os.path.join(workdir, "eval", "results.json"))
  if saved is None or results is None:
    return None
  if _comparable(saved) != _comparable(json.loads(config.to_json_best_effort())):
    return None
  return results


def check_workdir(config, workdir: str, *, allow_config_change: bool = False):
  """Refuses to resume a run whose saved config differs in anything that changes
  results (an accidental reuse of a workdir), unless explicitly allowed."""
  path = os.path.join(workdir, "config.json")
  if allow_config_change or not os.path.exists(path):
    return
  with open(path) as f:
    try:
      saved = run_log.flatten_config(json.load(f))
    except ValueError as error:
      raise ValueError(f"{path} is not a JSON config ({error}); repair it, or pass "
                       "--allow_config_change to rewrite it from this config") from None
  current = run_log.flatten_config(json.loads(config.to_json_best_effort()))
  differing = sorted(
      k for k in set(saved) | set(current)
      if not k.startswith("eval.") and not any(k.startswith(r) for r in RESUMABLE_CHANGES)
      and saved.get(k) != current.get(k))
  if differing:
    details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differing[:6])
    raise ValueError(f"{path} holds a run with a different config ({details}); use a new "
                     "--workdir, or pass --allow_config_change to resume it anyway")


def write_config(config, workdir: str):
  # Atomic: the run's other processes check this file while process 0 writes it, and a
  # kill mid-write must not leave a restart an empty file.
  if jax.process_index() == 0:
    run_log.write_atomic(os.path.join(workdir, "config.json"),
                         config.to_json_best_effort(indent=2))


def run(config, workdir: str, *, allow_config_change: bool = False,
        on_epoch=None) -> dict:
  """Trains every stage of `config.method` in `workdir`, then evaluates. Returns the
  final stage's evaluation results ({scenario: {metric: value}, "summary": ...}).

  `on_epoch(record)`, if given, is called after every epoch with that epoch's log
  record (`run_log.RunLogger`: `selection` is the validation value the trainer selects
  on, higher is better; `global_epoch` counts the epochs of every stage so far); it may
  raise to stop the run (the sweep's pruning). Only for `num_seeds = 1`.

  With `config.num_seeds = K > 1`, seeds `seed .. seed+K-1` are trained at once in one
  program (params and optimiser state stacked, the step `jax.vmap`ped over them); each
  gets a run folder `workdir/seed{s}` identical to a single-seed run with that seed
  (checkpoints, log, evaluation), and `workdir/eval/` reports their mean and 95% interval
  per metric. The stacked state is checkpointed in `workdir/checkpoints/` (resume).
  `config.seeds_in_one_program = False` trains the seeds one after another instead.
  """
  # Every check that needs no data runs before loading and compiling anything.
  config_lib.validate_config(config)
  check_workdir(config, workdir, allow_config_change=allow_config_change)
  if on_epoch is not None and config.num_seeds > 1:
    raise ValueError("on_epoch reads one run's epochs: config.num_seeds must be 1")
  results = finished_results(config, workdir)
  if results is not None:
    RunLogger(workdir).write({"event": "finished", "note": "eval/results.json reused"})
    run_log.status(f"{workdir}: finished with this config; its results are reused")
    return results
  data = load_data(config.data)
  config_lib.validate_config(config, data[1], num_train=len(data[0]["train"]["label"]))
  if config.num_seeds > 1:
    return _run_seeds(config, workdir, data, allow_config_change)
  return _run_one(config, workdir, data, allow_config_change, on_epoch=on_epoch)


def load_data(data_config):
  """`pipeline.load_data` with a console line saying what was loaded. TFDS's notes on a
  dataset it prepares go to stdout, which holds a command's results; they are dropped
  unless --verbosity=1 (the line says the same)."""
  started = time.time()
  quiet = contextlib.redirect_stdout(io.StringIO()) if cli.verbosity() < 1 else (
      contextlib.nullcontext())
  with quiet:
    splits, spec = pipeline.load_data(data_config)
  sizes = " / ".join(f"{len(split['label'])} {name}" for name, split in splits.items())
  run_log.status(f"data: {data_config.source} {data_config.name} ({spec.task}), {sizes} "
                 f"({time.time() - started:.1f} s)")
  return splits, spec


def _start(config, workdir: str, spec, allow_config_change: bool):
  """Checks and creates a run folder and writes its resolved config."""
  check_workdir(config, workdir, allow_config_change=allow_config_change)
  os.makedirs(workdir, exist_ok=True)
  # The resolved config records the data facts so that prediction needs no data.
  with config.unlocked():
    config.data.spec = dataclasses.asdict(spec)
  write_config(config, workdir)


def _log_start(logger: RunLogger, config, mesh, splits, **extra):
  logger.write({"event": "start", "method": config.method, "dataset": config.data.name,
                "num_devices": int(mesh.devices.size), "backend": jax.default_backend(),
                "num_train": len(splits["train"]["label"]), **extra})


def _evaluate(config, workdir: str, data, mesh, logger: RunLogger, stages=None) -> dict:
  results = evaluate.evaluate_run(workdir, config, data=data, mesh=mesh, stages=stages)
  logger.write({"event": "evaluated", **{f"test/{k}": v for k, v in results["summary"].items()
                                         if isinstance(v, (int, float))}})
  logger.figures(os.path.join(workdir, "eval"))
  return results


def _run_one(config, workdir: str, data, allow_config_change: bool, on_epoch=None) -> dict:
  splits, spec = data
  _start(config, workdir, spec, allow_config_change)
  mesh = parallel.make_mesh(config.num_devices)
  logger = RunLogger(workdir, config, on_epoch=on_epoch)
  try:
    _log_start(logger, config, mesh, splits)
    context = StageContext()
    stages = build_stages(config, spec)
    for index, stage in enumerate(stages):
      logger.epoch_offset = sum(s.num_epochs for s in stages[:index])
      params, method_state = train_stage(stage, config, splits, spec, mesh, workdir,
                                         stage_index=index, context=context, logger=logger)
      context = StageContext(frozen=params, frozen_state=method_state)
    return _evaluate(config, workdir, data, mesh, logger, stages)
  finally:
    logger.close()


def seed_configs(config) -> list:
  """The single-seed configs `seed, ..., seed + num_seeds - 1` of a `num_seeds` run."""
  configs = []
  for offset in range(config.num_seeds):
    seed_config = copy.deepcopy(config)
    with seed_config.unlocked():
      seed_config.seed = config.seed + offset
      seed_config.num_seeds = 1
    configs.append(seed_config)
  return configs


def _run_seeds(config, workdir: str, data, allow_config_change: bool) -> dict:
  """K seeds trained into `workdir/seed{s}` run folders, each evaluated, then aggregated
  into `workdir/eval`."""
  splits, spec = data
  _start(config, workdir, spec, allow_config_change)
  singles = seed_configs(config)
  seed_dirs = [os.path.join(workdir, f"seed{c.seed}") for c in singles]
  # The seeds' own loggers write into their folders (each seed a TensorBoard run); this
  # one gets the aggregate's figures.
  logger = RunLogger(workdir, config)
  try:
    if config.seeds_in_one_program:
      per_seed = _train_stacked(config, workdir, singles, seed_dirs, data,
                                allow_config_change, logger)
    else:
      per_seed = {seed_config.seed: _run_one(seed_config, seed_dir, data, allow_config_change)
                  for seed_config, seed_dir in zip(singles, seed_dirs, strict=True)}
    results = evaluate.aggregate_seeds(per_seed)
    if jax.process_index() == 0:
      evaluate.write_results(os.path.join(workdir, "eval"), results)
      evaluate.plot_robustness(os.path.join(workdir, "eval", "robustness.png"), results,
                               spec.task, title=f"{config.method} on {config.data.name}, "
                               f"mean of {config.num_seeds} seeds")
    logger.figures(os.path.join(workdir, "eval"))
  finally:
    logger.close()
  return results


def _train_stacked(config, workdir: str, singles, seed_dirs, data,
                   allow_config_change: bool, logger: RunLogger) -> dict:
  """The seeds trained at once (vmapped, `trainer.train_stage` with `seed_workdirs`),
  then each evaluated; returns {seed: results}."""
  splits, spec = data
  for seed_config, seed_dir in zip(singles, seed_dirs, strict=True):
    _start(seed_config, seed_dir, spec, allow_config_change)
  mesh = parallel.make_mesh(config.num_devices)
  _log_start(logger, config, mesh, splits, num_seeds=config.num_seeds)
  seed_loggers = logger.for_seeds(seed_dirs, [c.seed for c in singles])
  for seed_logger in seed_loggers:
    _log_start(seed_logger, config, mesh, splits, trained_with_seeds=config.num_seeds)
  context = StageContext()
  for index, stage in enumerate(build_stages(config, spec)):
    params, method_state = train_stage(stage, config, splits, spec, mesh, workdir,
                                       stage_index=index, context=context, logger=logger,
                                       seed_workdirs=seed_dirs)
    context = StageContext(frozen=params, frozen_state=method_state)
  return {seed_config.seed: _evaluate(seed_config, seed_dir, data, mesh, seed_logger)
          for seed_config, seed_dir, seed_logger in zip(singles, seed_dirs, seed_loggers,
                                                        strict=True)}


def main(argv):
  del argv
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required")
  if _COORDINATOR.value or _DISTRIBUTED.value:
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  config = _CONFIG.value
  run(config, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  if jax.process_index() == 0:
    print(run_log.run_report(_WORKDIR.value, config.data.task, method=config.method,
                             seeds=config.num_seeds))


if __name__ == "__main__":
  cli.run(main, program="train")
