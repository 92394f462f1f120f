"""The contract between a method file and the trainer.

A method turns (config, DataSpec) into one or more `Stage`s that the trainer runs in
order (MCUR/CMAD: teacher then student; the others: one stage). A stage owns a flax
module and a pure loss function; the trainer owns the optimiser, the loop, the
device mesh, checkpoints and evaluation. Everything a stage needs at train time
arrives as arguments, so the whole step compiles into one XLA program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

PyTree = Any


@dataclasses.dataclass(frozen=True)
class StageContext:
  """What a loss function may read besides its own params and batch.

  frozen: params of earlier stages (the teacher for a student stage), never trained.
  frozen_state: their method state.
  epoch: current epoch (traced int32), for schedules such as MAR's epoch threshold.
  """

  frozen: PyTree = None
  frozen_state: PyTree = None
  epoch: jax.Array | int = 0


def _no_state():
  return {}


@dataclasses.dataclass(frozen=True)
class Stage:
  """One trainable stage of a method.

  Attributes:
    name: checkpoint sub-folder ("" for single-stage methods, else "teacher"/"student").
    model: `model.apply({"params": p}, batch, train=bool, rngs={"dropout": key})`
      returns a dict with at least `output` (the task prediction: (B,), (B, K) or
      (B, K, 2)) and `embedding` (B, D) (the fused representation).
    loss_fn: `(params, method_state, batch, key, context) -> (loss, (metrics, new_state))`
      on the clean batch; the stage applies its own training missing-protocol with
      `key` (methods need the full-modality inputs for their auxiliary targets).
      `metrics` is a flat dict of scalars to log.
    init_state: `() -> method_state`: arrays that are not trained by the optimiser
      (EMA anchors, MAR memory); checkpointed with the params.
    end_epoch: `(method_state, epoch) -> method_state`, compiled, called after each
      epoch (MAR fixes its weights at epoch G).
    num_epochs: epochs of this stage.
    trained_with_missing: whether the stage's protocol simulates missing modalities
      (teachers train on full modalities).
  """

  name: str
  model: nn.Module
  loss_fn: Callable
  init_state: Callable[[], PyTree] = _no_state
  end_epoch: Callable | None = None
  num_epochs: int = 1
  trained_with_missing: bool = True

  def predict(self, params, method_state, batch):
    """Deterministic forward used by validation, evaluation and prediction."""
    del method_state
    return self.model.apply({"params": params}, batch, train=False)
