"""Method registry: `config.method` -> the module that builds its stages."""

from __future__ import annotations

import importlib
import json

METHODS = ("dqf", "mcur", "cmad", "cmarr", "ease")

_ALL_TASKS = ("regression", "classification", "multilabel_binary")
# Tasks each method's loss wiring implements (checked by config_lib.validate_config
# before anything compiles). Beyond the papers' own tasks, noted per line, the task
# losses, contrastive categories and anchors are defined for every task layout.
SUPPORTED_TASKS = {
    "dqf": _ALL_TASKS,  # paper: MOSI/MOSEI regression, MELD classification
    "mcur": _ALL_TASKS,  # paper: all three
    "cmad": _ALL_TASKS,  # paper: regression and IEMOCAP multilabel-binary
    "cmarr": _ALL_TASKS,  # paper: classification; regression uses sign classes for SupCon
    "ease": _ALL_TASKS,  # paper: regression; anchors use the class / first present emotion
}


def build_stages(config, spec):
  """Stages of `config.method` for a dataset described by `spec` (see base.Stage).

  With `config.model.text_encoder = "bert"` every stage gets a fine-tuned BERT text
  branch (`methods.text_encoder`): the method is built for text of the encoder's width.
  With `config.dtype = "bfloat16"` every stage computes in bfloat16 with float32 params
  and float32 losses (`base.with_compute_dtype`).
  """
  if config.method not in METHODS:
    raise ValueError(f"config.method must be one of {METHODS}, got {config.method!r}")
  # Built once per process and config: runs of one config (seeds, sweep trials, a resumed
  # or longer run) get the same stage objects, and so reuse every program traced and
  # compiled for them (the trainer's caches are keyed by stage).
  key = (_build_fields(config), spec)
  if key not in _BUILT:
    _BUILT[key] = _build(config, spec)
    while len(_BUILT) > 16:
      _BUILT.pop(next(iter(_BUILT)))
  return list(_BUILT[key])


_BUILT: dict = {}
# Config fields no method's `build` reads: configs that differ only in them build equal
# stages (the seed reaches the programs as keys, the data as arrays and `spec`).
_NOT_BUILT_FROM = ("seed", "num_seeds", "seeds_in_one_program", "num_devices", "data", "eval",
                   "log")


def _build_fields(config) -> str:
  fields = {k: v for k, v in config.to_dict().items() if k not in _NOT_BUILT_FROM}
  return json.dumps(fields, sort_keys=True, default=repr)


def _build(config, spec) -> tuple:
  module = importlib.import_module(f"mer_jax.methods.{config.method}")
  from mer_jax.methods import text_encoder
  from mer_jax.methods.base import with_compute_dtype

  if text_encoder.uses_text_encoder(config):
    stages = text_encoder.build_with_text_encoder(module.build, config, spec)
  else:
    stages = module.build(config, spec)
  return tuple(with_compute_dtype(stage, config.get("dtype", "float32")) for stage in stages)
