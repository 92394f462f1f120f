"""Method registry: `config.method` -> the module that builds its stages."""

from __future__ import annotations

import importlib

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
  module = importlib.import_module(f"mer_jax.methods.{config.method}")
  from mer_jax.methods import text_encoder
  from mer_jax.methods.base import with_compute_dtype

  if text_encoder.uses_text_encoder(config):
    stages = text_encoder.build_with_text_encoder(module.build, config, spec)
  else:
    stages = module.build(config, spec)
  return [with_compute_dtype(stage, config.get("dtype", "float32")) for stage in stages]
