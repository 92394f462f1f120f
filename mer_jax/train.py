r"""Trains a method, evaluates it under every missing-modality protocol, and writes
the run outputs of SPEC section 10.

    python -m mer_jax.train --config configs/dqf_mosei.py:synthetic --workdir /tmp/run

Overrides use the config names: `--config.train.num_epochs=3`. Starting again with
the same workdir resumes from the latest checkpoint (a finished stage is skipped).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mer_jax import evaluate, parallel
from mer_jax.data import pipeline
from mer_jax.methods import build_stages
from mer_jax.methods.base import StageContext
from mer_jax.trainer import JsonlLogger, train_stage

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/<m>_<d>.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it exists).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for multi-process runs (optional; "
                                   "SLURM/TPU are discovered automatically with --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() (implied by "
                                 "--coordinator_address).")


def write_config(config, workdir: str):
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))


def run(config, workdir: str) -> dict:
  """Trains every stage of `config.method` in `workdir`, then evaluates. Returns the
  final stage's evaluation results ({scenario: {metric: value}, "summary": ...})."""
  if config.num_seeds != 1:
    raise ValueError(f"config.num_seeds={config.num_seeds}: this trainer runs one seed per "
                     "run; start one run per seed with --config.seed")
  os.makedirs(workdir, exist_ok=True)
  splits, spec = pipeline.load_data(config.data)
  # The resolved config records the data facts so that prediction needs no data.
  with config.unlocked():
    config.data.spec = dataclasses.asdict(spec)
  write_config(config, workdir)
  mesh = parallel.make_mesh(config.num_devices)
  logger = JsonlLogger(workdir)
  logger.write({"event": "start", "method": config.method, "dataset": config.data.name,
                "num_devices": int(mesh.devices.size), "backend": jax.default_backend(),
                "num_train": len(splits["train"]["label"])})
  context = StageContext()
  for index, stage in enumerate(build_stages(config, spec)):
    params, method_state = train_stage(stage, config, splits, spec, mesh, workdir,
                                       stage_index=index, context=context, logger=logger)
    context = StageContext(frozen=params, frozen_state=method_state)
  results = evaluate.evaluate_run(workdir, config, data=(splits, spec), mesh=mesh)
  logger.write({"event": "evaluated", **{f"test/{k}": v for k, v in results["summary"].items()
                                         if isinstance(v, (int, float))}})
  return results


def main(argv):
  del argv
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required")
  if _COORDINATOR.value or _DISTRIBUTED.value:
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  results = run(_CONFIG.value, _WORKDIR.value)
  logging.info("summary: %s", json.dumps(results["summary"]))
  if jax.process_index() == 0:
    print(json.dumps(results["summary"], indent=2))


if __name__ == "__main__":
  app.run(main)
