"""The compiled training loop: optimiser, train/eval steps over the data mesh,
validation-based model selection, orbax checkpoints with resume, logging.

One `train_stage` call trains one `methods.base.Stage`. The step (missing-modality
protocol, forward, losses, gradients, optimiser update) is one jitted function whose
batch is sharded along the mesh's "data" axis and whose state is replicated, so any
device count computes the same global-batch losses.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import signal
import threading
import time
from collections.abc import Mapping
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from jax.flatten_util import ravel_pytree

from mer_jax import metrics as metrics_lib
from mer_jax import parallel
from mer_jax.data import missing
from mer_jax.data.pipeline import DEVICE_MEMORY_SHARE, Batcher, placement
from mer_jax.methods.base import Stage, StageContext
from mer_jax.run_log import RunLogger


class TrainState(flax.struct.PyTreeNode):
  """Everything a resumed run needs, as arrays (checkpointed whole)."""

  step: jax.Array
  epoch: jax.Array  # epochs completed
  params: flax.core.FrozenDict | dict
  opt_state: optax.OptState
  method_state: dict
  best_value: jax.Array  # best validation selection value so far (higher is better)
  best_epoch: jax.Array


# ----------------------------------------------------------------------------- optimiser

SCHEDULES = ("constant", "cosine", "linear")


class ScheduleState(NamedTuple):
  """Step count and schedule length of `scale_by_schedule_length`.

  The length lives in the optimiser state, not in the compiled program, so runs of any
  number of epochs share one compilation (and its persistent cache entry).
  """

  count: jax.Array
  total_steps: jax.Array
  warmup_steps: jax.Array


def learning_rate_at(kind: str, peak: float, count, total_steps, warmup_steps):
  """The rate of step `count` (traced) of optax's schedule of that kind, as mer_jax
  builds it: "constant" (linear warm-up, then `peak`), "cosine" (linear warm-up, then
  `optax.cosine_decay_schedule` to 1% of `peak`) and "linear" (warm-up, then linear to 0).
  """
  count = jnp.asarray(count, jnp.float32)
  total = jnp.maximum(jnp.asarray(total_steps, jnp.float32), 1.0)
  warmup = jnp.asarray(warmup_steps, jnp.float32)
  if kind == "constant":
    ramp = peak * count / jnp.maximum(warmup, 1.0)
    return jnp.where(count < warmup, ramp, peak)
  # optax needs at least one warm-up step and one decay step after it; without warm-up
  # the first step runs at `peak` (optax's linear schedule from peak to peak).
  ramp_steps = jnp.maximum(warmup, 1.0)
  start = jnp.where(warmup > 0, 0.0, peak)
  ramp = start + (peak - start) * count / ramp_steps
  if kind == "cosine":
    decay_steps = jnp.maximum(total, ramp_steps + 1.0) - ramp_steps
    progress = jnp.minimum(count - ramp_steps, decay_steps) / decay_steps
    alpha = 0.01
    decayed = peak * ((1 - alpha) * 0.5 * (1 + jnp.cos(jnp.pi * progress)) + alpha)
    return jnp.where(count < ramp_steps, ramp, decayed)
  if kind == "linear":
    ramp = peak * count / ramp_steps
    decay_steps = jnp.maximum(total - warmup, 1.0)
    decayed = peak * (1 - jnp.minimum(count - ramp_steps, decay_steps) / decay_steps)
    return jnp.where(count < ramp_steps, ramp, decayed)
  raise ValueError(f"config.train.schedule must be one of {SCHEDULES}, got {kind!r}")


def scale_by_schedule_length(kind: str, peak: float, total_steps: int,
                             warmup_steps: int) -> optax.GradientTransformation:
  """`optax.scale_by_learning_rate` of a schedule whose length is optimiser state."""

  def init(params):
    del params
    return ScheduleState(jnp.zeros([], jnp.int32), jnp.asarray(total_steps, jnp.int32),
                         jnp.asarray(warmup_steps, jnp.int32))

  def update(updates, state, params=None):
    del params
    rate = learning_rate_at(kind, peak, state.count, state.total_steps, state.warmup_steps)
    updates = jax.tree.map(lambda u: jnp.asarray(-rate, u.dtype) * u, updates)
    return updates, state._replace(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


def with_schedule_length(opt_state, total_steps: int):
  """`opt_state` with its schedules' length set to `total_steps` (a resumed run whose
  `config.train.num_epochs` changed follows the new length); stacked seeds keep their
  seed axis."""
  return jax.tree.map(
      lambda x: x._replace(total_steps=jnp.full_like(x.total_steps, total_steps))
      if isinstance(x, ScheduleState) else x,
      opt_state, is_leaf=lambda x: isinstance(x, ScheduleState))


def make_optimizer(train_config, steps_per_epoch: int, num_epochs: int, *,
                   learning_rate: float | None = None, grad_clip: float | None = None):
  """`_optimizer` of these settings, built once per process: runs with equal settings
  get the same transformation, and so the same traced train step (`_train_step_program`).
  """
  settings = json.dumps(train_config.to_dict() if hasattr(train_config, "to_dict")
                        else dict(train_config), sort_keys=True, default=repr)
  return _optimizer(settings, steps_per_epoch, num_epochs, learning_rate, grad_clip)


@functools.lru_cache(maxsize=16)
def _optimizer(settings: str, steps_per_epoch: int, num_epochs: int,
               learning_rate: float | None, grad_clip: float | None):
  """optax optimiser from `config.train` (optimizer, schedule, warmup, clipping).

  `learning_rate` overrides `config.train.learning_rate` (a stage's own rate, e.g.
  `config.teacher.learning_rate`), `grad_clip` `config.train.grad_clip` (a stage's own
  clip, e.g. `config.teacher.grad_clip`; 0 disables). The schedule's length
  (steps_per_epoch x num_epochs) is optimiser state (`ScheduleState`), not a
  compile-time constant.

  With `text_encoder_learning_rate` > 0 the `text_encoder` subtree of the params (a BERT
  text branch, `methods.text_encoder`) gets the same optimiser and schedule shape at that
  peak rate (`optax.multi_transform`); clipping stays global over all params.
  """
  train_config = ml_collections.ConfigDict(json.loads(settings))
  if train_config.schedule not in SCHEDULES:
    raise ValueError(f"config.train.schedule must be one of {SCHEDULES}, got "
                     f"{train_config.schedule!r}")
  total_steps = max(1, steps_per_epoch * num_epochs)
  warmup_steps = int(train_config.warmup_epochs * steps_per_epoch)
  name = train_config.optimizer

  def make_tx(peak):
    # optax.adamw / adam / sgd, with the learning rate applied last by the schedule.
    schedule = scale_by_schedule_length(train_config.schedule, peak, total_steps, warmup_steps)
    if name == "adamw":
      return optax.chain(optax.scale_by_adam(),
                         optax.add_decayed_weights(train_config.weight_decay), schedule)
    if name == "adam":
      return optax.chain(optax.scale_by_adam(), schedule)
    if name == "sgd":
      return optax.chain(optax.add_decayed_weights(train_config.weight_decay),
                         optax.trace(decay=train_config.momentum), schedule)
    raise ValueError(f"config.train.optimizer must be adamw, adam or sgd, got {name!r}")

  tx = make_tx(train_config.learning_rate if learning_rate is None else learning_rate)
  clip = train_config.grad_clip if grad_clip is None else grad_clip
  encoder_rate = float(train_config.get("text_encoder_learning_rate", 0.0) or 0.0)
  if not encoder_rate:
    return flat_optimizer(optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx)

  def labels(params):
    return {k: jax.tree.map(lambda _, k=k: "text_encoder" if k == "text_encoder" else "rest",
                            v) for k, v in params.items()}

  tx = optax.multi_transform({"text_encoder": flat_optimizer(make_tx(encoder_rate)),
                              "rest": flat_optimizer(tx)}, labels)
  return optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx


def flat_optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` applied to the parameters raveled into one vector (`ravel_pytree`).

  Every transformation mer_jax uses is elementwise or a global norm, so the update is the
  same; but the step holds ~30 optimiser ops in total instead of ~30 per parameter array
  (11,000 of the 14,500 operations of a DQF step with 361 arrays), which is most of the
  step's trace and compile time, and of its run time when XLA does not fuse them.
  """

  def init(params):
    return tx.init(ravel_pytree(params)[0])

  def update(updates, state, params=None):
    flat_updates, unravel = ravel_pytree(updates)
    flat_params = None if params is None else ravel_pytree(params)[0]
    flat_updates, state = tx.update(flat_updates, state, flat_params)
    return unravel(flat_updates), state

  return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------- checkpoints

# A checkpoint holds the train state packed into one flat array per dtype ("state") and
# the list of its leaves ("layout": name, shape, dtype in tree order). orbax's cost is
# per array (about 6 ms each on a 2-core host: 33 s for DQF's 5,409 arrays), so a packed
# state saves in well under a second whatever the model's depth.
# Format 3: the optimiser state is one vector per kind (`flat_optimizer`). Format 2 held
# one array per parameter, packed in the same order: its buffers are format 3's bytes.
CHECKPOINT_FORMAT = 3


class CheckpointError(ValueError):
  """A checkpoint that does not fit the run restoring it (another model or format)."""


def checkpoint_dir(workdir: str, stage_name: str, kind: str) -> str:
  """`DIR/checkpoints/[stage/]{latest,best}`."""
  parts = [os.path.abspath(workdir), "checkpoints"] + ([stage_name] if stage_name else [])
  return os.path.join(*parts, kind)


def _manager(path: str) -> ocp.CheckpointManager:
  # Orbax writes into a temporary folder and renames it when complete, so a kill
  # mid-save leaves the previous checkpoint intact.
  # On several processes orbax names its save barriers after the step, so the "best" and
  # "latest" managers saving the same step at once need distinct barrier prefixes.
  prefix = "_".join(re.sub(r"\W", "_", part) for part in path.split(os.sep)[-2:])
  options = ocp.CheckpointManagerOptions(
      max_to_keep=1, create=True, cleanup_tmp_directories=True,
      multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix))
  return ocp.CheckpointManager(path, options=options)


def _leaf_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def state_layout(tree) -> list[list]:
  """[[name, shape, dtype], ...] of every leaf of `tree` (arrays or ShapeDtypeStructs),
  in tree order."""
  def describe(leaf):
    leaf = leaf if hasattr(leaf, "dtype") else np.asarray(leaf)
    return [list(leaf.shape), str(np.dtype(leaf.dtype))]

  return [[_leaf_name(path), *describe(leaf)]
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


@jax.jit
def _pack(tree) -> dict[str, jax.Array]:
  """The leaves of `tree` raveled and concatenated, one array per dtype."""
  groups: dict[str, list] = {}
  for leaf in jax.tree.leaves(tree):
    groups.setdefault(str(leaf.dtype), []).append(jnp.ravel(leaf))
  return {dtype: jnp.concatenate(parts) for dtype, parts in groups.items()}


def _unpack(buffers: Mapping[str, np.ndarray], layout) -> list[np.ndarray]:
  """The leaves (host arrays, in tree order) that `_pack` packed."""
  offsets = dict.fromkeys(buffers, 0)
  leaves = []
  for _, shape, dtype in layout:
    size = int(np.prod(shape, dtype=np.int64))
    start = offsets[dtype]
    leaves.append(np.asarray(buffers[dtype][start:start + size]).reshape(shape))
    offsets[dtype] = start + size
  return leaves


def _save_id(state: TrainState, *, epoch_end: bool) -> int:
  """Checkpoint number: increases with every save, also when a pre-empted step is
  saved again at the end of its epoch."""
  return 2 * _host_int(state.step) + int(epoch_end)


def _save(manager: ocp.CheckpointManager, save_id: int, state: TrainState):
  """Starts writing `state` as checkpoint `save_id` (asynchronously: the next save, or
  `wait_until_finished`, waits for it) unless that id is already committed.

  A run killed between the `best` and the `latest` save of an epoch leaves `best`
  one checkpoint ahead; the resumed run recomputes the same state (ids are a function
  of the step), so the committed checkpoint is kept instead of failing on it.
  """
  if save_id in manager.all_steps():
    return
  layout = {"format": CHECKPOINT_FORMAT, "leaves": state_layout(state)}
  manager.save(save_id, args=ocp.args.Composite(state=ocp.args.StandardSave(_pack(state)),
                                                layout=ocp.args.JsonSave(layout)),
               force=True)


def _read_layout(manager: ocp.CheckpointManager, path: str, step: int) -> dict:
  """The JSON layout of checkpoint `step`; a clear error for other formats."""
  item = os.path.join(path, str(step))
  if not os.path.isdir(os.path.join(item, "layout")):
    raise CheckpointError(
        f"{item} is not a checkpoint of this mer_jax version (format {CHECKPOINT_FORMAT}: "
        "packed state + layout; it was probably written before layers were scanned and "
        "checkpoints packed, 2026-12). Train again in a new --workdir")
  return manager.restore(step, args=ocp.args.Composite(layout=ocp.args.JsonRestore()))["layout"]


def _read_buffers(manager: ocp.CheckpointManager, step: int, layout: dict,
                  abstract_buffers=None):
  """The packed buffers of checkpoint `step`.

  Without `abstract_buffers` they come back on this process's first device, whatever
  mesh wrote them (a run trained on several processes read by one).
  """
  if abstract_buffers is None:
    sizes: dict[str, int] = {}
    for _, shape, dtype in layout["leaves"]:
      sizes[dtype] = sizes.get(dtype, 0) + int(np.prod(shape, dtype=np.int64))
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract_buffers = {dtype: jax.ShapeDtypeStruct((size,), np.dtype(dtype), sharding=local)
                        for dtype, size in sizes.items()}
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_buffers)))
  return restored["state"]


def _optimiser_sizes(layout) -> tuple[list, dict]:
  """(the leaves outside the optimiser state, {dtype: elements} of the optimiser's)."""
  others, sizes = [], {}
  for name, shape, dtype in layout:
    if name.startswith("opt_state/"):
      sizes[dtype] = sizes.get(dtype, 0) + int(np.prod(shape, dtype=np.int64))
    else:
      others.append([name, shape, dtype])
  return others, sizes


def _check_layout(path: str, saved, expected, saved_format: int = CHECKPOINT_FORMAT):
  """Raises CheckpointError naming the first leaf where two layouts differ.

  A format-2 checkpoint (per-parameter optimiser state) restores into format 3 when
  everything else matches: the packed bytes are the same, in the same order."""
  if saved == expected:
    return
  if saved_format == 2 and _optimiser_sizes(saved) == _optimiser_sizes(expected):
    return
  padded = max(len(saved), len(expected)) + 1
  saved_leaves = list(saved) + [None] * (padded - len(saved))
  expected_leaves = list(expected) + [None] * (padded - len(expected))
  index = next(i for i in range(padded) if saved_leaves[i] != expected_leaves[i])
  mine, theirs = saved_leaves[index], expected_leaves[index]
  describe = lambda leaf: "nothing" if leaf is None else f"{leaf[0]} {leaf[2]}{leaf[1]}"
  raise CheckpointError(
      f"{path} holds a different model: leaf {index} is {describe(mine)} in the checkpoint "
      f"but {describe(theirs)} in this run ({len(saved)} vs {len(expected)} leaves). It was "
      "written with another config or mer_jax version; use a new --workdir")


def _nested(layout, leaves) -> dict:
  """Nested dicts {name: ...} of the leaves, from their layout names."""
  tree: dict = {}
  for (name, _, _), leaf in zip(layout, leaves, strict=True):
    node = tree
    *parents, last = name.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = leaf
  return tree


def restore_latest(path: str, target):
  """Restores the newest checkpoint under `path` into the structure and shardings of
  `target`, or returns None when there is none. With `target=None`, returns nested
  dicts of host arrays named as the state's fields (`read_checkpoint`).

  Raises:
    CheckpointError: the checkpoint was written for another model or format.
  """
  # Every process must take the same branch: the manager below synchronises them.
  if not parallel.agree(os.path.isdir(path)):
    return None
  manager = _manager(path)
  step = manager.latest_step()
  if step is None:
    return None
  try:
    layout = _read_layout(manager, path, step)
    if target is None:
      buffers = _read_buffers(manager, step, layout)
      return _nested(layout["leaves"], _unpack(buffers, layout["leaves"]))
    # The layouts are compared before any buffer is read: orbax would refuse a buffer
    # of another size with its own message, which names no leaf.
    expected = state_layout(target)
    _check_layout(os.path.join(path, str(step)), layout["leaves"], expected,
                  layout.get("format", CHECKPOINT_FORMAT))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, jax.eval_shape(_pack, target))
    sharding = parallel.replicated(target_mesh(target))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            abstract)
    buffers = _read_buffers(manager, step, layout, abstract)
  finally:
    manager.close()
  leaves = _unpack(parallel.fetch(buffers), expected)
  restored = jax.tree.unflatten(jax.tree.structure(target), leaves)
  return parallel.replicate(restored, target_mesh(target))


def target_mesh(tree):
  """The mesh the (replicated) arrays of `tree` live on."""
  for leaf in jax.tree.leaves(tree):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      return sharding.mesh
  return parallel.make_mesh(1)


def read_checkpoint(path: str) -> dict | None:
  """The newest checkpoint under `path` as nested dicts of host arrays (`step`, `epoch`,
  `params`, `opt_state`, `method_state`, ...), or None when there is none."""
  return restore_latest(path, None)


# ----------------------------------------------------------------------------- pre-emption

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: try again (resume) later.


class Preempted(Exception):
  """Raised after a SIGTERM/SIGINT once the current step is checkpointed."""

  def __init__(self, step: int, signal_name: str):
    super().__init__(f"{signal_name} received: checkpoint written at step {step}; run the "
                     "same command again to resume")
    self.step = step


class PreemptionGuard:
  """Turns SIGTERM/SIGINT into a flag that the loop checks after each step, so the
  step in flight finishes and is checkpointed before the process exits."""

  def __init__(self):
    self.requested = False
    self.signal_name = ""
    self._previous = {}
    if threading.current_thread() is not threading.main_thread():
      return  # signal handlers can only be installed from the main thread
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    self.signal_name = signal.Signals(signum).name

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


# ----------------------------------------------------------------------------- non-finite

ON_NONFINITE = ("stop", "skip")
_NO_STEP = np.iinfo(np.int32).max  # "no non-finite step so far"


class NonFiniteError(FloatingPointError):
  """A loss or gradient went NaN/inf and `config.train.on_nonfinite` is "stop"."""

  def __init__(self, *, stage: str, step: int, terms, checkpoint: str):
    super().__init__(
        f"[{stage}] non-finite loss or gradient at step {step}: {', '.join(terms)} went NaN/inf "
        f"(the update was not applied). Last good checkpoint: {checkpoint}. Resuming repeats "
        "this step (runs are deterministic): fix the data or hyper-parameters, or resume with "
        "--config.train.on_nonfinite=skip to skip such updates and count them in the log")
    self.step = step
    self.terms = tuple(terms)
    self.checkpoint = checkpoint


def _start_accumulator(step_metrics):
  """Running sums of the step metrics since the epoch began, and the first step whose
  loss or gradient was non-finite with the metrics that were non-finite in it."""
  first = step_metrics.pop("nonfinite_step")
  return {"sums": step_metrics, "first_nonfinite_step": first,
          "nonfinite_terms": {k: ~jnp.isfinite(v) for k, v in step_metrics.items()}}


def _accumulate(accumulator, step_metrics):
  step = _start_accumulator(step_metrics)
  earlier = accumulator["first_nonfinite_step"] <= step["first_nonfinite_step"]
  return {"sums": jax.tree.map(jnp.add, accumulator["sums"], step["sums"]),
          "first_nonfinite_step": jnp.minimum(accumulator["first_nonfinite_step"],
                                              step["first_nonfinite_step"]),
          "nonfinite_terms": jax.tree.map(lambda a, b: jnp.where(earlier, a, b),
                                          accumulator["nonfinite_terms"],
                                          step["nonfinite_terms"])}


_start_accumulator_jit = jax.jit(_start_accumulator)
_accumulate_jit = jax.jit(_accumulate)


def _nonfinite_terms(terms: Mapping[str, np.ndarray]) -> list[str]:
  """Names of the non-finite metrics, the loss terms first."""
  bad = [k for k, v in terms.items() if bool(v) and k != "skipped"]
  return sorted(bad, key=lambda k: (k in ("loss", "grad_norm"), k))


# ----------------------------------------------------------------------------- forward


class Predictor:
  """The compiled evaluation forward of a stage under missing-modality scenarios.

  One XLA program serves every scenario: the modality mask, the frame-drop rates per
  modality and the noise intensity are arguments, not constants, and several scenarios
  run in one call (vmapped over a scenario axis), so a whole protocol costs a few
  dispatches instead of a Python loop of them.
  """

  def __init__(self, stage: Stage, mesh, batch_size: int, *, on_device: bool,
               device_memory_share: float = DEVICE_MEMORY_SHARE, frame_mode: str = "random",
               frame_fill: str = "zero", flag_dropped: bool = False):
    self.stage = stage
    self.mesh = mesh
    self.batch_size = batch_size
    self.on_device = on_device
    self.device_memory_share = device_memory_share
    self._cached = None
    self._forward = _scenario_forward(stage, frame_mode, frame_fill, flag_dropped)
    # Scenarios that only remove whole modalities skip frame masking and noise, so that
    # a network that runs its mask-independent work once (`Stage.masks_in_network`) does.
    # Rate-0 masking is the identity unless it flags frames (flag_dropped).
    self._modality_forward = (_modality_forward(stage)
                              if stage.masks_in_network and not flag_dropped else None)

  @classmethod
  def from_config(cls, stage: Stage, mesh, config, *, batch_size: int | None = None,
                  on_device: bool | None = None) -> Predictor:
    """The predictor of a run config: `config.eval` batch size and frame masking
    (`frame_mode`, `frame_fill`), `config.missing.flag_dropped_frames`, the data placement
    (`config.data.on_device`, `device_memory_share`)."""
    placed = placement(config.data)
    if on_device is not None:
      placed["on_device"] = on_device
    return cls(stage, mesh, batch_size or config.eval.batch_size, **placed,
               frame_mode=config.eval.get("frame_mode", "random"),
               frame_fill=config.eval.get("frame_fill", "zero"),
               flag_dropped=bool(config.missing.get("flag_dropped_frames", False)))

  def _batcher(self, split: Mapping[str, np.ndarray]) -> Batcher:
    # One resident copy per split, reused by every scenario evaluated on it.
    if self._cached is None or self._cached[0] is not split:
      self._cached = (split, Batcher(split, self.batch_size, self.mesh, on_device=self.on_device,
                                     device_memory_share=self.device_memory_share))
    return self._cached[1]

  def predict_scenarios(self, params, method_state, split: Mapping[str, np.ndarray], *,
                        modality_masks: np.ndarray, frame_rates, noise_intensities,
                        keys) -> dict[str, np.ndarray]:
    """Outputs for every row of `split` under S scenarios at once, on the host.

    Args:
      modality_masks: (S, N, 3) bool, the available modalities of each row.
      frame_rates: (S, 3) frame-drop rate per modality.
      noise_intensities: (S,) Gaussian noise intensity.
      keys: (S,) PRNG keys; batch i of scenario s uses `fold_in(keys[s], i)`, so a
        scenario's outputs do not depend on which scenarios share its call.

    Returns:
      {"output": (S, N, ...), "embedding": (S, N, D)}.
    """
    batcher = self._batcher(split)
    modality_masks = np.asarray(modality_masks, bool)
    num_scenarios = modality_masks.shape[0]
    # (S, N, 3) -> (N, S, 3): rows first, so `rows` index the batch axis.
    modality_masks = np.swapaxes(modality_masks, 0, 1)
    frame_rates = np.asarray(frame_rates, np.float32).reshape(num_scenarios, 3)
    noise_intensities = np.asarray(noise_intensities, np.float32).reshape(num_scenarios)
    forward = self._forward
    if (self._modality_forward is not None and not np.any(frame_rates)
        and not np.any(noise_intensities)):
      forward = self._modality_forward
    frame_rates = jnp.asarray(frame_rates)
    noise_intensities = jnp.asarray(noise_intensities)
    chunks = []
    ordered = batcher.ordered_rows()
    for i, (rows, batch) in enumerate(zip(ordered, batcher.batches(ordered), strict=True)):
      batch.pop("index")
      batch["scenario_modality_mask"] = parallel.shard_batch(modality_masks[rows], self.mesh)
      chunks.append(forward(params, method_state, batch, frame_rates, noise_intensities,
                            keys, jnp.int32(i)))
    outputs = parallel.fetch(chunks)
    return {k: np.swapaxes(np.concatenate([c[k] for c in outputs])[:batcher.num_rows], 0, 1)
            for k in outputs[0]}

  def predict_split(self, params, method_state, split: Mapping[str, np.ndarray], *,
                    modality_mask: np.ndarray, frame_rates=(0.0, 0.0, 0.0),
                    noise_intensity: float = 0.0, key=None) -> dict[str, np.ndarray]:
    """Outputs for every row of `split` under one scenario, on the host."""
    key = jax.random.key(0) if key is None else key
    outputs = self.predict_scenarios(
        params, method_state, split, modality_masks=np.asarray(modality_mask, bool)[None],
        frame_rates=np.asarray(frame_rates, np.float32)[None],
        noise_intensities=np.asarray([noise_intensity], np.float32), keys=key[None])
    return {k: v[0] for k, v in outputs.items()}


@functools.lru_cache(maxsize=8)
def _scenario_forward(stage: Stage, frame_mode: str, frame_fill: str, flag_dropped: bool):
  """The jitted scenario-vmapped forward of a stage, one per stage object and masking
  settings in a process: a run's final evaluation reuses the program its validation
  traced and compiled (a stage rebuilt from the config is another object). Only the
  function is kept; the predictors and their resident splits are not.
  """

  def one_scenario(params, method_state, batch, modality_mask, frame_rates, noise_intensity,
                   key):
    frame_key, noise_key = jax.random.split(key)
    batch = missing.apply_modality_mask(batch, modality_mask)
    batch = missing.apply_frame_masking(frame_key, batch, frame_rates, mode=frame_mode,
                                        fill=frame_fill, flag_dropped=flag_dropped)
    batch = missing.add_noise(noise_key, batch, noise_intensity)
    out = stage.predict(params, method_state, batch)
    return {"output": out["output"], "embedding": out["embedding"]}

  def forward(params, method_state, batch, frame_rates, noise_intensity, keys, batch_index):
    # The scenario axis of the modality masks sits after the batch axis, so the masks
    # shard over the mesh like every other batch array.
    modality_masks = batch.pop("scenario_modality_mask")
    keys = jax.vmap(lambda k: jax.random.fold_in(k, batch_index))(keys)
    return jax.vmap(one_scenario, in_axes=(None, None, None, 1, 0, 0, 0), out_axes=1)(
        params, method_state, batch, modality_masks, frame_rates, noise_intensity, keys)

  return jax.jit(forward)


@functools.lru_cache(maxsize=8)
def _modality_forward(stage: Stage):
  """`_scenario_forward` for scenarios that mask whole modalities only (no frame rate,
  no noise, so nothing random) of a `Stage.masks_in_network` stage: the modality masks
  go to the network, which runs its mask-independent work once."""

  def forward(params, method_state, batch, frame_rates, noise_intensity, keys, batch_index):
    del frame_rates, noise_intensity, keys, batch_index  # the general forward's signature
    modality_masks = batch.pop("scenario_modality_mask")
    out = stage.predict(params, method_state, batch, scenario_modality_mask=modality_masks)
    return {"output": out["output"], "embedding": out["embedding"]}

  return jax.jit(forward)


def selection_value(results: Mapping[str, Mapping[str, float]], metric: str) -> float:
  """Higher-is-better validation score: the mean of `metric` over the scenarios."""
  value = float(np.mean([r[metric] for r in results.values()]))
  return -value if metric in metrics_lib.LOWER_IS_BETTER else value


SELECTION_SCENARIOS = ("fixed", "full", "frame")


def selection_scenarios(kind: str, frame_rate: float = 0.5):
  """[(name, combination id, frame rates (3,))] of a validation protocol: the 7 fixed
  combinations ("fixed"), full modalities ("full"), or full modalities with every
  modality's frames dropped at `frame_rate` ("frame", LNLN's validation)."""
  if kind == "fixed":
    return [(name, index, np.zeros(3, np.float32))
            for index, name in enumerate(missing.COMBINATION_NAMES)]
  if kind == "full":
    return [("LAV", missing.FULL_COMBINATION, np.zeros(3, np.float32))]
  if kind == "frame":
    return [(f"frame{missing.format_rate(frame_rate)}_LAV", missing.FULL_COMBINATION,
             np.full(3, frame_rate, np.float32))]
  raise ValueError(f"config.train.selection_scenarios must be one of {SELECTION_SCENARIOS}, "
                   f"got {kind!r}")


def validate(predictor: Predictor, params, method_state, split, spec, *, scenarios: str,
             task_loss_fn, frame_rate: float = 0.5,
             scenarios_per_call: int = 1) -> dict[str, dict[str, float]]:
  """Metrics and mean task loss on the validation split under a selection protocol
  (`selection_scenarios`).

  The scenarios go through the predictor in one call, padded to `scenarios_per_call`
  when that wastes less than half of it, so that validation and the final evaluation
  (`evaluate.run_scenarios`) share one compiled forward.
  """
  chosen = selection_scenarios(scenarios, frame_rate)
  num_rows = len(split["label"])
  group = len(chosen)
  if group < scenarios_per_call < 2 * group:
    group = scenarios_per_call
  padded = chosen + [chosen[-1]] * (group - len(chosen))
  outputs = predictor.predict_scenarios(
      params, method_state, split,
      modality_masks=np.stack([missing.fixed_modality_mask(num_rows, c) for _, c, _ in padded]),
      frame_rates=np.stack([rates for _, _, rates in padded]),
      noise_intensities=np.zeros(group, np.float32),
      keys=jax.random.split(jax.random.key(0), group))["output"]
  results = {}
  for index, (name, _, _) in enumerate(chosen):
    result = metrics_lib.compute_metrics(outputs[index], split["label"], spec.task,
                                         label_range=spec.label_range)
    result["loss"] = float(np.mean(task_loss_fn(outputs[index], split["label"])))
    results[name] = result
  return results


# ----------------------------------------------------------------------------- training


# XLA options for programs that run once, such as parameter initialisation: their
# optimisation passes cost far more than they save (DQF's `:synthetic` initialisation
# compiled in 24 s with them, 9 s without; its run time is milliseconds either way).
RUN_ONCE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0,
                             "xla_llvm_disable_expensive_passes": True}


def init_train_state(stage: Stage, tx, example_batch, key) -> TrainState:
  """Fresh parameters, optimiser and method state of a stage; traced inline under a
  transformation.

  Called with a concrete key, the parameters are one program that runs once
  (`_init_params_program`) and the optimiser state another, small one: the optimiser
  state holds the schedule's length, so the parameter initialisation (the larger
  program: every initialiser's random numbers) is one compilation for runs of any length.
  """
  if isinstance(key, jax.core.Tracer):
    params = _init_params(stage, key, example_batch)
    opt_state = tx.init(params)
  else:
    params = _init_params_program(stage)(key, example_batch)
    opt_state = jax.jit(tx.init)(params)
  return TrainState(
      step=jnp.zeros((), jnp.int32), epoch=jnp.zeros((), jnp.int32), params=params,
      opt_state=opt_state, method_state=stage.init_state(),
      best_value=jnp.asarray(-jnp.inf, jnp.float32), best_epoch=jnp.asarray(-1, jnp.int32))


def _init_params(stage: Stage, key, example_batch):
  return stage.model.init({"params": key, "dropout": key}, example_batch, train=False)["params"]


@functools.lru_cache(maxsize=16)
def _init_params_program(stage: Stage):
  """`_init_params` jitted with `RUN_ONCE_COMPILER_OPTIONS`, one per stage in a process;
  the example batch is an argument, not a constant, so any data shares the program."""
  return jax.jit(functools.partial(_init_params, stage),
                 compiler_options=RUN_ONCE_COMPILER_OPTIONS)


def init_stacked_train_states(stage: Stage, tx, example_batch, keys) -> TrainState:
  """`init_train_state` of each key, stacked on a leading seed axis: every seed runs the
  single-seed initialisation programs, so stacked and single-seed runs share them."""
  states = [init_train_state(stage, tx, example_batch, key) for key in keys]
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


class _BoundStep:
  """A compiled step with its run constants (key, frozen teacher) bound as arguments.

  They are jit arguments, not closed-over constants, so the program holds no teacher
  weights and every seed and teacher reuses one compilation (and its persistent cache
  entry).
  """

  def __init__(self, jitted, *constants):
    self._jitted = jitted
    self._constants = constants

  def __call__(self, state, batch):
    return self._jitted(state, batch, *self._constants)

  def trace(self, state, batch):
    return self._jitted.trace(state, batch, *self._constants)


def make_train_step(stage: Stage, tx, train_key, context: StageContext, mesh, *,
                    seed_axis: bool = False):
  """The compiled step `(state, batch) -> (state, metrics)`: missing protocol, forward,
  losses, gradients and optimiser update in one XLA program over the mesh.

  With `seed_axis`, the state, the batch (K, B, ...), the key and the frozen teacher
  carry a leading axis of K seeds and the step is `jax.vmap`ped over it: K independent
  models train in one program (`config.num_seeds`).
  """
  constants = parallel.replicate(
      (train_key, context.frozen, context.frozen_state, context.teacher_outputs), mesh)
  return _BoundStep(_train_step_program(stage, tx, mesh, seed_axis), *constants)


@functools.lru_cache(maxsize=16)
def _train_step_program(stage: Stage, tx, mesh, seed_axis: bool):
  """The jitted step of a stage and optimiser on a mesh, one per process: a second run
  of the same config reuses its trace and compilation."""

  def train_step(state: TrainState, batch, train_key, frozen, frozen_state, teacher_outputs):
    key = jax.random.fold_in(train_key, state.step)
    ctx = StageContext(frozen=frozen, frozen_state=frozen_state, epoch=state.epoch,
                       teacher_outputs=teacher_outputs)
    (loss, (step_metrics, method_state)), grads = jax.value_and_grad(
        stage.loss_fn, has_aux=True)(state.params, state.method_state, batch, key, ctx)
    grad_norm = jnp.linalg.norm(ravel_pytree(grads)[0])  # one reduction, not one per array
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite loss or gradient skips the update instead of poisoning the params.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    state = state.replace(
        step=state.step + 1, params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        method_state=keep(method_state, state.method_state))
    step_metrics = dict(step_metrics, loss=loss, grad_norm=grad_norm,
                        skipped=1.0 - finite.astype(jnp.float32),
                        nonfinite_step=jnp.where(finite, _NO_STEP, state.step))
    return state, step_metrics

  replicated = parallel.replicated(mesh)
  # Fixed in/out shardings: state replaced on the host between epochs (epoch counter,
  # best value) is re-laid out to match instead of triggering a recompilation.
  return jax.jit(jax.vmap(train_step) if seed_axis else train_step, donate_argnums=(0,),
                 in_shardings=(replicated, parallel.data_sharding(mesh, int(seed_axis)),
                               replicated, replicated, replicated, replicated),
                 out_shardings=(replicated, replicated))


def teacher_outputs(stage: Stage, context: StageContext, batcher: Batcher, *,
                    seed_axis: bool = False):
  """`stage.teacher_forward` of the frozen teacher (`context.frozen`) for every row of
  the batcher's split, computed once, on the devices, in batches of the training batch
  size: `StageContext.teacher_outputs` (leading axis = the split's row; with `seed_axis`,
  the K stacked teachers' outputs (K, N, ...)). The step then gathers its rows instead
  of running the teacher (`base.frozen_teacher_outputs`)."""
  forward = stage.teacher_forward
  forward = jax.jit(jax.vmap(forward, in_axes=(0, None)) if seed_axis else forward)
  frozen = parallel.replicate(context.frozen, batcher.mesh)
  chunks = [forward(frozen, batcher.batch(rows)) for rows in batcher.ordered_rows()]
  axis = int(seed_axis)
  num_rows = batcher.num_rows
  return jax.tree.map(
      lambda *parts: jax.lax.slice_in_dim(jnp.concatenate(parts, axis=axis), 0, num_rows,
                                          axis=axis), *chunks)


def _host_int(x) -> int:
  """A scalar as a host int; of a per-seed vector, its first entry (the step and epoch
  counters of stacked seeds are equal)."""
  return int(np.ravel(jax.device_get(x))[0])


# Compiled once per structure; replicated in, replicated out, also on several processes.
_take_seed = jax.jit(lambda tree, index: jax.tree.map(lambda x: x[index], tree))


@jax.jit
def _select_seeds(improved, new, old):
  """Per seed, `new` where `improved` else `old` (trees stacked on a seed axis)."""
  return jax.tree.map(
      lambda n, o: jnp.where(improved.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old)


def _save_seed_checkpoints(state: TrainState, best_state: TrainState, stage: Stage,
                           seed_workdirs):
  """Each seed's latest and best state, unstacked, into its own run folder: the
  checkpoints a single-seed run with that seed writes, so `evaluate`, `predict` and
  the next stage read them unchanged."""
  for index, seed_dir in enumerate(seed_workdirs):
    for kind, source in (("latest", state), ("best", best_state)):
      one = _take_seed(source, jnp.int32(index))
      manager = _manager(checkpoint_dir(seed_dir, stage.name, kind))
      _save(manager, _save_id(one, epoch_end=True), one)
      manager.wait_until_finished()
      manager.close()


_copy_tree = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


class _Checkpoints:
  """A stage's `latest` and `best` checkpoints under `config.train`'s write policy.

  `latest` is written every `checkpoint_every_epochs` epochs, also mid-epoch once
  `checkpoint_every_seconds` (> 0) have passed since the last write, at the last epoch
  and on pre-emption. The best state is kept on the devices (a copy: the step donates
  the live state) and written with the next `latest`, before it, so the two on disk
  always belong together: a kill loses at most one interval, and the resumed run
  recomputes it exactly. Writes are asynchronous; the next write waits for the last.
  """

  def __init__(self, workdir: str, stage: Stage, train_config):
    self.latest_path = checkpoint_dir(workdir, stage.name, "latest")
    self.best_path = checkpoint_dir(workdir, stage.name, "best")
    self.every_epochs = max(1, int(train_config.get("checkpoint_every_epochs", 1)))
    self.every_seconds = float(train_config.get("checkpoint_every_seconds", 0.0) or 0.0)
    self.best_state = None
    self.best_unwritten = False
    self.seconds_writing = 0.0
    self._epochs_unwritten = 0
    self._last_write = time.monotonic()
    self.latest = None
    self.best = None

  def restore(self, state: TrainState) -> TrainState | None:
    """The latest state (None when the stage has not started), the best one kept."""
    restored = restore_latest(self.latest_path, state)
    if restored is not None:
      self.best_state = restore_latest(self.best_path, state)
    self.latest, self.best = _manager(self.latest_path), _manager(self.best_path)
    return restored

  def keep_best(self, state: TrainState, improved: np.ndarray, *, stacked: bool):
    """Takes `state` as the best of the seeds where `improved`."""
    if not improved.any():
      return
    if stacked and self.best_state is not None:
      self.best_state = _select_seeds(jnp.asarray(improved), state, self.best_state)
    else:
      self.best_state = _copy_tree(state)
    self.best_unwritten = True

  def write(self, state: TrainState, *, epoch_end: bool):
    started = time.monotonic()
    save_id = _save_id(state, epoch_end=epoch_end)
    if self.best_unwritten:
      _save(self.best, save_id, self.best_state)
      self.best_unwritten = False
    _save(self.latest, save_id, state)
    self._epochs_unwritten = 0
    self._last_write = time.monotonic()
    self.seconds_writing += self._last_write - started

  def has_unwritten(self) -> bool:
    """Whether the state or the best state has changed since the last write."""
    return self.best_unwritten or self._epochs_unwritten > 0

  def due_mid_epoch(self) -> bool:
    return bool(self.every_seconds) and (
        time.monotonic() - self._last_write >= self.every_seconds)

  def end_epoch(self, state: TrainState, *, last: bool):
    self._epochs_unwritten += 1
    if last or self._epochs_unwritten >= self.every_epochs or self.due_mid_epoch():
      self.write(state, epoch_end=True)

  def last_good(self) -> str:
    """The newest committed `latest` checkpoint, for messages."""
    self.latest.wait_until_finished()
    good = self.latest.latest_step()
    return (os.path.join(self.latest_path, str(good)) if good is not None else
            f"none yet under {self.latest_path} (no checkpoint had been written)")

  def close(self):
    for manager in (self.latest, self.best):
      if manager is not None:
        manager.wait_until_finished()
        manager.close()


def _check_finite(accumulator, *, tag: str, seeds, stacked: bool, checkpoints: _Checkpoints,
                  logger: RunLogger):
  """Stops the run at the first non-finite step since the epoch began."""
  first, terms = jax.device_get((accumulator["first_nonfinite_step"],
                                 accumulator["nonfinite_terms"]))
  first = np.ravel(first)
  index = int(np.argmin(first))  # the seed that went non-finite first
  if int(first[index]) == _NO_STEP:
    return
  terms = _nonfinite_terms({k: np.ravel(v)[index] for k, v in terms.items()})
  where = f"{tag} seed {seeds[index]}" if stacked else tag
  checkpoint = checkpoints.last_good()
  logger.write({"event": "nonfinite", "stage": where, "step": int(first[index]),
                "terms": terms, "checkpoint": checkpoint})
  raise NonFiniteError(stage=where, step=int(first[index]), terms=terms, checkpoint=checkpoint)


def _init_state(stage: Stage, tx, batcher: Batcher, seeds, stage_index: int, mesh, *,
                stacked: bool):
  """(fresh state, train key): one seed's, or the seeds' stacked on a leading axis."""
  keys = [jax.random.split(jax.random.fold_in(jax.random.key(seed), stage_index))
          for seed in seeds]
  example = {k: v[:2] for k, v in batcher.arrays.items()}
  if stacked:
    state = init_stacked_train_states(stage, tx, example, [k[0] for k in keys])
    return parallel.replicate(state, mesh), jnp.stack([k[1] for k in keys])
  return parallel.replicate(init_train_state(stage, tx, example, keys[0][0]), mesh), keys[0][1]


def _epoch_record(*, tag, epoch, step, seconds, num_steps, batch_size, epoch_sums, index,
                  results, metric, value, best_epoch, best_value, num_epochs):
  epoch_means = {"loss": float("nan")}
  if epoch_sums is not None:
    seed_sums = {k: float(np.ravel(v)[index]) for k, v in epoch_sums.items()}
    epoch_means = {k: v / num_steps for k, v in seed_sums.items()}
    epoch_means["skipped_steps"] = int(round(seed_sums["skipped"]))
  return {
      "stage": tag, "epoch": epoch + 1, "step": step, "epoch_seconds": seconds,
      "samples_per_second": num_steps * batch_size / max(seconds, 1e-9),
      **{f"train/{k}": v for k, v in epoch_means.items()},
      "val/loss": float(np.mean([r["loss"] for r in results.values()])),
      f"val/{metric}": float(np.mean([r[metric] for r in results.values()])),
      **{f"val/{name}/{metric}": r[metric] for name, r in results.items()},
      "selection": value, "best_epoch": int(best_epoch) + 1,
      "best_selection": float(best_value), "selection_metric": metric,
      "num_epochs": num_epochs}


def train_stage(stage: Stage, config, splits, spec, mesh, workdir: str, *,
                stage_index: int = 0, context: StageContext | None = None,
                logger: RunLogger | None = None, seed_workdirs=None):
  """Trains one stage, resuming from `DIR/checkpoints/[stage/]latest` when present.

  Returns (params, method_state) of the selected epoch (`stage.selection`: the best on
  the validation split, or the last). Raises `Preempted` after a SIGTERM/SIGINT (the
  state is checkpointed first) and, with `config.train.on_nonfinite = "stop"`,
  `NonFiniteError` when a loss or gradient went NaN/inf (detected at log steps and
  epoch ends, without a per-step host sync). Checkpoints follow `_Checkpoints`.

  With `seed_workdirs` (K folders), K models seeded `config.seed, ..., config.seed+K-1`
  train at once: params, optimiser and method state are stacked on a leading seed axis
  and one `jax.vmap`ped step updates them all; `context` then holds the K frozen
  teachers stacked the same way. Each seed draws its own batches, logs to its folder's
  `log.jsonl` and selects its own best epoch, exactly as a single-seed run with that
  seed would. The stacked state is checkpointed under `workdir` (resume); once the
  stage is done each seed's best and latest go to its folder. Returns the stacked
  (params, method_state).
  """
  from mer_jax.losses.task import task_loss

  context = context or StageContext()
  logger = logger or RunLogger(workdir, config)
  train_config = config.train
  on_nonfinite = train_config.get("on_nonfinite", "stop")
  if on_nonfinite not in ON_NONFINITE:
    raise ValueError(f"config.train.on_nonfinite must be one of {ON_NONFINITE}, got "
                     f"{on_nonfinite!r}")
  stacked = seed_workdirs is not None
  seeds = [config.seed + k for k in range(len(seed_workdirs))] if stacked else [config.seed]
  for seed_dir in seed_workdirs or ():
    os.makedirs(seed_dir, exist_ok=True)
  seed_loggers = logger.for_seeds(seed_workdirs, seeds) if stacked else [logger]
  # One seed's values, or the seeds' values on a leading axis.
  per_seed = (lambda values: jnp.asarray(np.asarray(values))) if stacked else (
      lambda values: jnp.asarray(values[0]))
  tag = stage.name or config.method
  batcher = Batcher(splits["train"], train_config.batch_size, mesh, **placement(config.data))
  steps_per_epoch = batcher.steps_per_epoch()
  tx = make_optimizer(train_config, steps_per_epoch, stage.num_epochs,
                      learning_rate=stage.learning_rate, grad_clip=stage.grad_clip)
  state, train_key = _init_state(stage, tx, batcher, seeds, stage_index, mesh, stacked=stacked)

  checkpoints = _Checkpoints(workdir, stage, train_config)
  restored = checkpoints.restore(state)
  if restored is not None:
    # A changed config.train.num_epochs (allowed on resume) changes the schedule's length.
    state = restored.replace(opt_state=with_schedule_length(
        restored.opt_state, steps_per_epoch * stage.num_epochs))
    logger.write({"event": "resume", "stage": tag, "epoch": _host_int(state.epoch),
                  "step": _host_int(state.step)})

  if (stage.teacher_forward is not None and context.frozen is not None
      and train_config.get("cache_teacher", True)):
    context = dataclasses.replace(context, teacher_outputs=teacher_outputs(
        stage, context, batcher, seed_axis=stacked))
  train_step = make_train_step(stage, tx, train_key, context, mesh, seed_axis=stacked)
  end_epoch = None
  if stage.end_epoch:
    end_epoch = jax.jit(jax.vmap(stage.end_epoch, in_axes=(0, None)) if stacked
                        else stage.end_epoch)

  predictor = Predictor.from_config(stage, mesh, config)
  metric = train_config.selection_metric or metrics_lib.PRIMARY_METRIC[spec.task]
  loss_of = lambda out, lab: np.asarray(task_loss(jnp.asarray(out), jnp.asarray(lab), spec.task))
  scenarios = stage.selection_scenarios or train_config.selection_scenarios
  check_finite = lambda accumulator: on_nonfinite == "stop" and _check_finite(
      accumulator, tag=tag, seeds=seeds, stacked=stacked, checkpoints=checkpoints,
      logger=logger)

  def epoch_rows(epoch):
    if stacked:  # (steps, K, batch): step i draws every seed's own batch i
      return np.stack([batcher.epoch_rows(seed, epoch) for seed in seeds], axis=1)
    return batcher.epoch_rows(config.seed, epoch)

  def validate_seeds(state, epoch, seconds, rows, epoch_sums):
    """Validation of every seed: (records, improved per seed, new best values/epochs)."""
    best_values = np.ravel(jax.device_get(state.best_value)).astype(np.float64)
    best_epochs = np.ravel(jax.device_get(state.best_epoch)).copy()
    improved = np.zeros(len(seeds), bool)
    records = []
    for index in range(len(seeds)):
      params, method_state = ((_take_seed((state.params, state.method_state),
                                          jnp.int32(index))) if stacked
                              else (state.params, state.method_state))
      results = validate(predictor, params, method_state, splits["valid"], spec,
                         scenarios=scenarios, task_loss_fn=loss_of,
                         frame_rate=float(train_config.get("selection_frame_rate", 0.5)),
                         scenarios_per_call=int(config.eval.get("scenarios_per_call", 1)))
      # Rounded to float32 as the state keeps it, so that the logged value, the
      # comparison and `best_selection` after a resume are one number.
      value = float(np.float32(selection_value(results, metric)))
      improved[index] = stage.selection == "last" or value > best_values[index]
      if improved[index]:
        best_values[index], best_epochs[index] = value, epoch
      records.append(_epoch_record(
          tag=tag, epoch=epoch, step=_host_int(state.step), seconds=seconds,
          num_steps=len(rows), batch_size=train_config.batch_size, epoch_sums=epoch_sums,
          index=index, results=results, metric=metric, value=value,
          best_epoch=best_epochs[index], best_value=best_values[index],
          num_epochs=stage.num_epochs))
    return records, improved, best_values, best_epochs

  start_epoch = _host_int(state.epoch)
  # A run pre-empted mid-epoch resumes at the next step of that epoch's fixed order.
  step = _host_int(state.step)
  skip_steps = step - start_epoch * steps_per_epoch
  preemption = PreemptionGuard()
  try:
    for epoch in range(start_epoch, stage.num_epochs):
      rows = epoch_rows(epoch)[skip_steps:]
      skip_steps = 0
      bar = tqdm.tqdm(batcher.batches(rows), total=len(rows),
                      desc=f"{tag} epoch {epoch + 1}/{stage.num_epochs}",
                      disable=not train_config.progress or jax.process_index() != 0,
                      leave=False)
      started, accumulator = time.time(), None
      for index_in_epoch, batch in enumerate(bar):
        state, step_metrics = train_step(state, batch)
        if preemption.requested:
          checkpoints.write(state, epoch_end=False)
          checkpoints.close()
          logger.write({"event": "preempted", "stage": tag, "step": _host_int(state.step),
                        "signal": preemption.signal_name})
          raise Preempted(_host_int(state.step), preemption.signal_name)
        accumulator = (_start_accumulator_jit(step_metrics) if accumulator is None
                       else _accumulate_jit(accumulator, step_metrics))
        # Counted on the host (every step, skipped or not, advances state.step): reading
        # state.step would wait for the step to finish instead of queueing the next.
        step += 1
        if step % train_config.log_every_steps == 0:
          check_finite(accumulator)
          host = jax.device_get(step_metrics)
          host.pop("nonfinite_step")
          rate = ((index_in_epoch + 1) * train_config.batch_size
                  / max(time.time() - started, 1e-9))
          bar.set_postfix(loss=f"{np.mean(host['loss']):.4f}", samples_per_s=f"{rate:.0f}")
          for index, seed_logger in enumerate(seed_loggers):
            seed_logger.write({"stage": tag, "step": step, "epoch": epoch,
                               **{f"train/{k}": np.ravel(v)[index] for k, v in host.items()}})
        if checkpoints.due_mid_epoch() and index_in_epoch + 1 < len(rows):
          check_finite(accumulator)  # never write a checkpoint past a non-finite step
          checkpoints.write(state, epoch_end=False)
      epoch_sums = None
      if accumulator is not None:
        check_finite(accumulator)
        epoch_sums = jax.device_get(accumulator["sums"])
      seconds = time.time() - started

      if end_epoch is not None:
        state = state.replace(method_state=end_epoch(state.method_state, jnp.int32(epoch)))
      validation_started = time.time()
      records, improved, best_values, best_epochs = validate_seeds(
          state, epoch, seconds, rows, epoch_sums)
      state = state.replace(best_value=per_seed(best_values.astype(np.float32)),
                            best_epoch=per_seed(best_epochs.astype(np.int32)),
                            epoch=per_seed(np.full(len(seeds), epoch + 1, np.int32)))
      # Host-made scalars carry no mesh: lay them out like the step's output so that the
      # next epoch reuses the compiled step.
      state = parallel.replicate(state, mesh)
      validation_seconds = time.time() - validation_started
      checkpoints.keep_best(state, improved, stacked=stacked)
      writing_before = checkpoints.seconds_writing
      checkpoints.end_epoch(state, last=epoch + 1 == stage.num_epochs)
      # The logger writes log.jsonl and TensorBoard, prints the epoch line and calls the
      # run's on_epoch hook (run_log.RunLogger), after this epoch's checkpoint write.
      for seed_logger, record in zip(seed_loggers, records, strict=True):
        record.update(validation_seconds=validation_seconds,
                      checkpoint_seconds=checkpoints.seconds_writing - writing_before)
        seed_logger.write(record)
    if preemption.requested:  # arrived during the last validation or write
      if checkpoints.has_unwritten():
        checkpoints.write(state, epoch_end=True)
      raise Preempted(_host_int(state.step), preemption.signal_name)
  finally:
    preemption.restore()
    checkpoints.close()
  best_state = checkpoints.best_state if checkpoints.best_state is not None else state
  if stacked:
    _save_seed_checkpoints(state, best_state, stage, seed_workdirs)
  return best_state.params, best_state.method_state


def _subtree(checkpoint: Mapping, name: str, like, path: str):
  """`checkpoint[name]` (nested dicts from `read_checkpoint`) in the structure of `like`,
  checked leaf by leaf against it."""
  prefix = f"{name}/"
  expected = [[prefix + leaf, shape, dtype] for leaf, shape, dtype in state_layout(like)]
  flat = jax.tree_util.tree_flatten_with_path(checkpoint.get(name, {}))[0]
  saved = [[prefix + _leaf_name(p), list(np.shape(x)), str(np.asarray(x).dtype)]
           for p, x in flat]
  # Nested dicts flatten in sorted-key order, like flax params and method state.
  _check_layout(path, sorted(saved), sorted(expected))
  by_name = {prefix + _leaf_name(p): x for p, x in flat}
  return jax.tree.unflatten(jax.tree.structure(like), [by_name[e[0]] for e in expected])


@functools.lru_cache(maxsize=8)
def _param_shapes(stage: Stage, signature: tuple):
  """The stage's parameter shapes for a batch of `signature` ((name, shape, dtype), ...),
  traced once per stage object: a run's final evaluation reads the stage it trained."""
  example = {name: jax.ShapeDtypeStruct(shape, dtype) for name, shape, dtype in signature}
  return jax.eval_shape(lambda batch: stage.model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(0)}, batch,
      train=False)["params"], example)


def load_stage_params(workdir: str, stage: Stage, example_batch, *, checkpoint: str = "best"):
  """(params, method_state, epoch) of a trained stage, from its best or latest checkpoint.

  Raises:
    FileNotFoundError: the stage has no such checkpoint.
    CheckpointError: the checkpoint holds another model (config or version).
  """
  path = checkpoint_dir(workdir, stage.name, checkpoint)
  saved = read_checkpoint(path)
  if saved is None:
    raise FileNotFoundError(f"no {checkpoint} checkpoint in {path}: train first with "
                            "python -m mer_jax.train --workdir ...")
  signature = tuple((name, tuple(x.shape), str(x.dtype))
                    for name, x in sorted(example_batch.items()))
  params = _param_shapes(stage, signature)
  return (_subtree(saved, "params", params, path),
          _subtree(saved, "method_state", stage.init_state(), path), int(saved["epoch"]))
