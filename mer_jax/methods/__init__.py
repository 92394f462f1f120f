"""Method registry: `config.method` -> the module that builds its stages."""

from __future__ import annotations

import importlib

METHODS = ("dqf", "mcur", "cmad", "cmarr", "ease")


def build_stages(config, spec):
  """Stages of `config.method` for a dataset described by `spec` (see base.Stage)."""
  if config.method not in METHODS:
    raise ValueError(f"config.method must be one of {METHODS}, got {config.method!r}")
  module = importlib.import_module(f"mer_jax.methods.{config.method}")
  return module.build(config, spec)
