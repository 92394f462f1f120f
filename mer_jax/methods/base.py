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
import jax.numpy as jnp

PyTree = Any


@dataclasses.dataclass(frozen=True)
class StageContext:
  """What a loss function may read besides its own params and batch.

  frozen: params of earlier stages (the teacher for a student stage), never trained.
  frozen_state: their method state.
  epoch: current epoch (traced int32), for schedules such as MAR's epoch threshold.
  teacher_outputs: the frozen teacher's outputs (`Stage.teacher_forward`) for every row
    of the training split, leading axis = the row (`batch["index"]`), computed once per
    stage by the trainer; None = the loss runs the teacher on each batch.
  """

  frozen: PyTree = None
  frozen_state: PyTree = None
  epoch: jax.Array | int = 0
  teacher_outputs: PyTree = None


def frozen_teacher_outputs(context: StageContext, batch, teacher_forward: Callable):
  """The frozen teacher's outputs for `batch`: its rows of `context.teacher_outputs` when
  the trainer computed them for the split, else `teacher_forward(context.frozen, batch)`.
  Both are the same numbers (the teacher is deterministic and reads the clean batch)."""
  if context.teacher_outputs is not None:
    rows = batch["index"]
    return jax.tree.map(lambda values: values[rows], context.teacher_outputs)
  return teacher_forward(context.frozen, batch)


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
    compute_dtype: dtype of the forward computation (`with_compute_dtype`); params,
      optimiser state and method state stay float32.
    learning_rate: peak learning rate of this stage (None: `config.train.learning_rate`;
      MCUR's teacher, A.2.3, has its own).
    selection: which epoch the stage keeps: "best" on the validation split, or "last"
      (the official CMAD teacher is the last epoch of its run).
    selection_scenarios: the validation scenarios "best" selects on (None:
      `config.train.selection_scenarios`; see `trainer.validate`).
    grad_clip: this stage's global-norm gradient clip (0 disables); None =
      `config.train.grad_clip` (the official CMAD teacher clips at 1.0, its student not).
    teacher_forward: `(frozen params, batch) -> outputs` of the frozen teacher that the
      loss reads through `frozen_teacher_outputs`, set by a stage whose teacher is
      deterministic on the clean batch (MCUR, CMAD students): the trainer then computes
      them once for the training split (`config.train.cache_teacher`) instead of every
      step. None: no such teacher.
    masks_in_network: the network takes `scenario_modality_mask=` (B, S, 3) with features
      not yet masked and returns (B, S, ...) outputs, as S forwards on
      `missing.apply_modality_mask`ed batches would, running the work that does not
      depend on the mask once (`nn.scenarios`; DQF, the MCUR/CMAD backbone). The
      predictor calls it so for scenarios that mask only whole modalities.
  """

  name: str
  model: nn.Module
  loss_fn: Callable
  init_state: Callable[[], PyTree] = _no_state
  end_epoch: Callable | None = None
  num_epochs: int = 1
  trained_with_missing: bool = True
  compute_dtype: str = "float32"
  learning_rate: float | None = None
  selection: str = "best"
  selection_scenarios: str | None = None
  grad_clip: float | None = None
  teacher_forward: Callable | None = None
  masks_in_network: bool = False

  def predict(self, params, method_state, batch, **model_kwargs):
    """Deterministic forward used by validation, evaluation and prediction."""
    del method_state
    if self.compute_dtype == "float32":
      return self.model.apply({"params": params}, batch, train=False, **model_kwargs)
    with nn.intercept_methods(_float32_top_level_outputs):
      return self.model.apply({"params": cast_floating(params, self.compute_dtype)},
                              cast_features(batch, self.compute_dtype), train=False,
                              **model_kwargs)


COMPUTE_DTYPES = ("float32", "bfloat16")
SELECTIONS = ("best", "last")


def cast_floating(tree, dtype):
  """`tree` with every floating-point array cast to `dtype` (others unchanged)."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x,
      tree)


def cast_features(batch, dtype):
  """The modality features of `batch` in `dtype`; labels and masks keep their dtypes (a
  bfloat16 regression label would lose its annotation grid)."""
  from mer_jax.data.spec import MODALITIES

  return {k: (v.astype(dtype) if k in MODALITIES else v) for k, v in batch.items()}


def _float32_top_level_outputs(next_fun, args, kwargs, context):
  # A network's outputs leave it in float32, so every loss and metric reduces in float32
  # while the layers inside compute in the stage's dtype. A top-level module's parent is
  # its flax Scope, a submodule's is another Module; the layer inside a lifted transform
  # (nn.scan, nn.vmap) also has a Scope for parent, but a non-empty path (and the lifted
  # wrapper itself calls a lambda), and must keep its dtype: a scan carry may not change
  # dtype from one layer to the next.
  outputs = next_fun(*args, **kwargs)
  module = context.module
  if (context.method_name == "__call__" and not isinstance(module.parent, nn.Module)
      and not module.scope.path):
    outputs = cast_floating(outputs, jnp.float32)
  return outputs


def with_compute_dtype(stage: Stage, dtype: str) -> Stage:
  """`stage` computing its forward passes in `dtype` (mixed precision).

  The loss casts the float32 params (the optimiser's master copy; the cast is
  differentiable, so gradients arrive in float32), the frozen teacher params and the
  modality features to `dtype`; network outputs come back in float32, so the loss, its
  reductions and the metrics are float32. Method state keeps its dtypes.
  """
  if dtype not in COMPUTE_DTYPES:
    raise ValueError(f"config.dtype={dtype!r}: choose one of {COMPUTE_DTYPES}")
  if dtype == "float32":
    return stage

  def loss_fn(params, method_state, batch, key, context):
    if context.frozen is not None:
      context = dataclasses.replace(context, frozen=cast_floating(context.frozen, dtype))
    with nn.intercept_methods(_float32_top_level_outputs):
      loss, (metrics, new_state) = stage.loss_fn(
          cast_floating(params, dtype), method_state, cast_features(batch, dtype), key,
          context)
    new_state = jax.tree.map(lambda new, old: jnp.asarray(new).astype(jnp.result_type(old)),
                             new_state, method_state)
    return loss.astype(jnp.float32), (cast_floating(metrics, jnp.float32), new_state)

  teacher_forward = None
  if stage.teacher_forward is not None:
    def teacher_forward(frozen, batch):
      # As the per-step teacher inside `loss_fn`: computed in `dtype`, outputs float32.
      with nn.intercept_methods(_float32_top_level_outputs):
        return stage.teacher_forward(cast_floating(frozen, dtype), cast_features(batch, dtype))

  return dataclasses.replace(stage, loss_fn=loss_fn, compute_dtype=dtype,
                             teacher_forward=teacher_forward)
