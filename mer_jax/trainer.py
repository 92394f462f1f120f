"""The compiled training loop: optimiser, train/eval steps over the data mesh,
validation-based model selection, orbax checkpoints with resume, logging.

One `train_stage` call trains one `methods.base.Stage`. The step (missing-modality
protocol, forward, losses, gradients, optimiser update) is one jitted function whose
batch is sharded along the mesh's "data" axis and whose state is replicated, so any
device count computes the same global-batch losses.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from mer_jax import metrics as metrics_lib
from mer_jax import parallel
from mer_jax.data import missing
from mer_jax.data.pipeline import Batcher
from mer_jax.methods.base import Stage, StageContext


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


def make_optimizer(train_config, steps_per_epoch: int, num_epochs: int):
  """optax optimiser from `config.train` (optimizer, schedule, warmup, clipping).

  With `text_encoder_learning_rate` > 0 the `text_encoder` subtree of the params (a BERT
  text branch, `methods.text_encoder`) gets the same optimiser and schedule shape at that
  peak rate (`optax.multi_transform`); clipping stays global over all params.
  """
  total_steps = max(1, steps_per_epoch * num_epochs)
  warmup_steps = int(train_config.warmup_epochs * steps_per_epoch)

  def make_schedule(peak):
    if train_config.schedule == "constant":
      schedule = optax.constant_schedule(peak)
      if warmup_steps:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup_steps), schedule], [warmup_steps])
      return schedule
    if train_config.schedule == "cosine":
      # optax needs at least one decay step after the warm-up (a one-step run has none).
      return optax.warmup_cosine_decay_schedule(
          0.0 if warmup_steps else peak, peak, max(warmup_steps, 1),
          max(total_steps, max(warmup_steps, 1) + 1), peak * 0.01)
    if train_config.schedule == "linear":
      return optax.join_schedules([
          optax.linear_schedule(0.0, peak, max(warmup_steps, 1)),
          optax.linear_schedule(peak, 0.0, max(total_steps - warmup_steps, 1))],
          [max(warmup_steps, 1)])
    raise ValueError("config.train.schedule must be constant, cosine or linear, got "
                     f"{train_config.schedule!r}")

  def make_tx(peak):
    schedule = make_schedule(peak)
    name = train_config.optimizer
    if name == "adamw":
      return optax.adamw(schedule, weight_decay=train_config.weight_decay)
    if name == "adam":
      return optax.adam(schedule)
    if name == "sgd":
      return optax.chain(optax.add_decayed_weights(train_config.weight_decay),
                         optax.sgd(schedule, momentum=train_config.momentum))
    raise ValueError(f"config.train.optimizer must be adamw, adam or sgd, got {name!r}")

  tx = make_tx(train_config.learning_rate)
  encoder_rate = float(train_config.get("text_encoder_learning_rate", 0.0) or 0.0)
  if encoder_rate:
    def labels(params):
      return {k: jax.tree.map(lambda _, k=k: "text_encoder" if k == "text_encoder" else "rest",
                              v) for k, v in params.items()}

    tx = optax.multi_transform({"text_encoder": make_tx(encoder_rate), "rest": tx}, labels)
  if train_config.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(train_config.grad_clip), tx)
  return tx


# ----------------------------------------------------------------------------- logging


class JsonlLogger:
  """Appends one JSON object per line to `DIR/log.jsonl` (resumed runs append)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "log.jsonl")

  def write(self, record: Mapping):
    if jax.process_index() != 0:
      return
    record = {k: (v.item() if isinstance(v, (np.ndarray, np.generic, jax.Array)) else v)
              for k, v in record.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- checkpoints


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


def _save_id(state: TrainState, *, epoch_end: bool) -> int:
  """Checkpoint number: increases with every save, also when a pre-empted step is
  saved again at the end of its epoch."""
  return 2 * _host_int(state.step) + int(epoch_end)


def _save(manager: ocp.CheckpointManager, save_id: int, state: TrainState):
  """Saves `state` as checkpoint `save_id` unless that id is already committed.

  A run killed between the `best` and the `latest` save of an epoch leaves `best`
  one checkpoint ahead; the resumed run recomputes the same state (ids are a function
  of the step), so the committed checkpoint is kept instead of failing on it.
  """
  if save_id in manager.all_steps():
    return
  manager.save(save_id, args=ocp.args.StandardSave(state), force=True)


def restore_latest(path: str, target):
  """Restores the newest checkpoint under `path` into the structure/shardings of
  `target`, or returns None when there is none."""
  # Every process must take the same branch: the manager below synchronises them.
  if not parallel.agree(os.path.isdir(path)):
    return None
  manager = _manager(path)
  step = manager.latest_step()
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  manager.close()
  return restored


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

  def __init__(self, stage: Stage, mesh, batch_size: int, *, on_device: bool):
    self.stage = stage
    self.mesh = mesh
    self.batch_size = batch_size
    self.on_device = on_device
    self._cached = None

    def one_scenario(params, method_state, batch, modality_mask, frame_rates, noise_intensity,
                     key):
      frame_key, noise_key = jax.random.split(key)
      batch = missing.apply_modality_mask(batch, modality_mask)
      batch = missing.apply_frame_masking(frame_key, batch, frame_rates)
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

    self._forward = jax.jit(forward)

  def _batcher(self, split: Mapping[str, np.ndarray]) -> Batcher:
    # One resident copy per split, reused by every scenario evaluated on it.
    if self._cached is None or self._cached[0] is not split:
      self._cached = (split, Batcher(split, self.batch_size, self.mesh, on_device=self.on_device))
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
    frame_rates = jnp.asarray(frame_rates, jnp.float32).reshape(num_scenarios, 3)
    noise_intensities = jnp.asarray(noise_intensities, jnp.float32).reshape(num_scenarios)
    chunks = []
    for i, rows in enumerate(batcher.ordered_rows()):
      batch = batcher.batch(rows)
      batch.pop("index")
      batch["scenario_modality_mask"] = parallel.shard_batch(modality_masks[rows], self.mesh)
      chunks.append(self._forward(params, method_state, batch, frame_rates, noise_intensities,
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


def selection_value(results: Mapping[str, Mapping[str, float]], metric: str) -> float:
  """Higher-is-better validation score: the mean of `metric` over the scenarios."""
  value = float(np.mean([r[metric] for r in results.values()]))
  return -value if metric in metrics_lib.LOWER_IS_BETTER else value


def validate(predictor: Predictor, params, method_state, split, spec, *, scenarios: str,
             task_loss_fn) -> dict[str, dict[str, float]]:
  """Metrics and mean task loss on the validation split, per fixed combination
  (`scenarios="fixed"`) or on full modalities only (`"full"`)."""
  combos = list(range(7)) if scenarios == "fixed" else [6]
  num_rows = len(split["label"])
  outputs = predictor.predict_scenarios(
      params, method_state, split,
      modality_masks=np.stack([missing.fixed_modality_mask(num_rows, c) for c in combos]),
      frame_rates=np.zeros((len(combos), 3), np.float32),
      noise_intensities=np.zeros(len(combos), np.float32),
      keys=jax.random.split(jax.random.key(0), len(combos)))["output"]
  results = {}
  for index, combo in enumerate(combos):
    result = metrics_lib.compute_metrics(outputs[index], split["label"], spec.task,
                                         label_range=spec.label_range)
    result["loss"] = float(np.mean(task_loss_fn(outputs[index], split["label"])))
    results[missing.COMBINATION_NAMES[combo]] = result
  return results


# ----------------------------------------------------------------------------- training


def init_train_state(stage: Stage, tx, example_batch, key) -> TrainState:
  """Fresh parameters, optimiser and method state of a stage (vmap it over keys for
  stacked seeds)."""
  params = jax.jit(lambda k: stage.model.init({"params": k, "dropout": k}, example_batch,
                                              train=False)["params"])(key)
  return TrainState(
      step=jnp.zeros((), jnp.int32), epoch=jnp.zeros((), jnp.int32), params=params,
      opt_state=tx.init(params), method_state=stage.init_state(),
      best_value=jnp.asarray(-jnp.inf, jnp.float32), best_epoch=jnp.asarray(-1, jnp.int32))


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

  def lower(self, state, batch):
    return self._jitted.lower(state, batch, *self._constants)


def make_train_step(stage: Stage, tx, train_key, context: StageContext, mesh, *,
                    seed_axis: bool = False):
  """The compiled step `(state, batch) -> (state, metrics)`: missing protocol, forward,
  losses, gradients and optimiser update in one XLA program over the mesh.

  With `seed_axis`, the state, the batch (K, B, ...), the key and the frozen teacher
  carry a leading axis of K seeds and the step is `jax.vmap`ped over it: K independent
  models train in one program (`config.num_seeds`).
  """

  def train_step(state: TrainState, batch, train_key, frozen, frozen_state):
    key = jax.random.fold_in(train_key, state.step)
    ctx = StageContext(frozen=frozen, frozen_state=frozen_state, epoch=state.epoch)
    (loss, (step_metrics, method_state)), grads = jax.value_and_grad(
        stage.loss_fn, has_aux=True)(state.params, state.method_state, batch, key, ctx)
    grad_norm = optax.global_norm(grads)
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
  jitted = jax.jit(jax.vmap(train_step) if seed_axis else train_step, donate_argnums=(0,),
                   in_shardings=(replicated, parallel.data_sharding(mesh, int(seed_axis)),
                                 replicated, replicated, replicated),
                   out_shardings=(replicated, replicated))
  constants = parallel.replicate((train_key, context.frozen, context.frozen_state), mesh)
  return _BoundStep(jitted, *constants)


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


def train_stage(stage: Stage, config, splits, spec, mesh, workdir: str, *,
                stage_index: int = 0, context: StageContext | None = None,
                logger: JsonlLogger | None = None, seed_workdirs=None):
  """Trains one stage, resuming from `DIR/checkpoints/[stage/]latest` when present.

  Returns (params, method_state) of the best validation epoch. Raises `Preempted`
  after a SIGTERM/SIGINT (the state is checkpointed first) and, with
  `config.train.on_nonfinite = "stop"`, `NonFiniteError` when a loss or gradient
  went NaN/inf (detected at log steps and epoch ends, without a per-step host sync).

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
  logger = logger or JsonlLogger(workdir)
  train_config = config.train
  if stage.grad_clip is not None:
    train_config = ml_collections.ConfigDict(dict(train_config.to_dict(),
                                                  grad_clip=stage.grad_clip))
  on_nonfinite = train_config.get("on_nonfinite", "stop")
  if on_nonfinite not in ON_NONFINITE:
    raise ValueError(f"config.train.on_nonfinite must be one of {ON_NONFINITE}, got "
                     f"{on_nonfinite!r}")
  stacked = seed_workdirs is not None
  seeds = [config.seed + k for k in range(len(seed_workdirs))] if stacked else [config.seed]
  for seed_dir in seed_workdirs or ():
    os.makedirs(seed_dir, exist_ok=True)
  seed_loggers = [JsonlLogger(d) for d in seed_workdirs] if stacked else [logger]
  # One seed's values, or the seeds' values on a leading axis.
  per_seed = (lambda values: jnp.asarray(np.asarray(values))) if stacked else (
      lambda values: jnp.asarray(values[0]))
  tag = stage.name or config.method
  batcher = Batcher(splits["train"], train_config.batch_size, mesh,
                    on_device=config.data.on_device)
  steps_per_epoch = batcher.steps_per_epoch()
  tx = make_optimizer(train_config, steps_per_epoch, stage.num_epochs)

  keys = [jax.random.split(jax.random.fold_in(jax.random.key(seed), stage_index))
          for seed in seeds]
  example = {k: v[:2] for k, v in batcher.arrays.items()}
  if stacked:
    train_key = jnp.stack([k[1] for k in keys])
    state = jax.jit(jax.vmap(lambda key: init_train_state(stage, tx, example, key)))(
        jnp.stack([k[0] for k in keys]))
  else:
    train_key = keys[0][1]
    state = init_train_state(stage, tx, example, keys[0][0])
  state = parallel.replicate(state, mesh)

  latest_path = checkpoint_dir(workdir, stage.name, "latest")
  best_path = checkpoint_dir(workdir, stage.name, "best")
  restored = restore_latest(latest_path, state)
  if restored is not None:
    state = restored
    logger.write({"event": "resume", "stage": tag, "epoch": _host_int(state.epoch),
                  "step": _host_int(state.step)})
  # Stacked seeds keep their per-seed best states in memory (each seed's best epoch
  # differs); a single seed's best is the state at its best epoch, on disk.
  best_state = restore_latest(best_path, state) if stacked else None

  train_step = make_train_step(stage, tx, train_key, context, mesh, seed_axis=stacked)
  end_epoch = None
  if stage.end_epoch:
    end_epoch = jax.jit(jax.vmap(stage.end_epoch, in_axes=(0, None)) if stacked
                        else stage.end_epoch)

  predictor = Predictor(stage, mesh, config.eval.batch_size, on_device=config.data.on_device)
  metric = train_config.selection_metric or metrics_lib.PRIMARY_METRIC[spec.task]
  loss_of = lambda out, lab: np.asarray(task_loss(jnp.asarray(out), jnp.asarray(lab), spec.task))

  latest = _manager(latest_path)
  best = _manager(best_path)

  def check_finite(accumulator):
    """Stops the run at the first non-finite step since the epoch began."""
    if on_nonfinite != "stop":
      return
    first, terms = jax.device_get((accumulator["first_nonfinite_step"],
                                   accumulator["nonfinite_terms"]))
    first = np.ravel(first)
    index = int(np.argmin(first))  # the seed that went non-finite first
    if int(first[index]) == _NO_STEP:
      return
    terms = _nonfinite_terms({k: np.ravel(v)[index] for k, v in terms.items()})
    where = f"{tag} seed {seeds[index]}" if stacked else tag
    latest.wait_until_finished()
    good = latest.latest_step()
    checkpoint = (os.path.join(latest_path, str(good)) if good is not None else
                  f"none yet under {latest_path} (the first epoch had not finished)")
    logger.write({"event": "nonfinite", "stage": where, "step": int(first[index]),
                  "terms": terms, "checkpoint": checkpoint})
    raise NonFiniteError(stage=where, step=int(first[index]), terms=terms,
                         checkpoint=checkpoint)

  def epoch_rows(epoch):
    if stacked:  # (steps, K, batch): step i draws every seed's own batch i
      return np.stack([batcher.epoch_rows(seed, epoch) for seed in seeds], axis=1)
    return batcher.epoch_rows(config.seed, epoch)

  start_epoch = _host_int(state.epoch)
  # A run pre-empted mid-epoch resumes at the next step of that epoch's fixed order.
  step = _host_int(state.step)
  skip_steps = step - start_epoch * steps_per_epoch
  preemption = PreemptionGuard()
  try:
    for epoch in range(start_epoch, stage.num_epochs):
      rows = epoch_rows(epoch)[skip_steps:]
      skip_steps = 0
      bar = tqdm.tqdm(rows, desc=f"{tag} epoch {epoch + 1}/{stage.num_epochs}",
                      disable=not train_config.progress or jax.process_index() != 0,
                      leave=False)
      started, accumulator = time.time(), None
      for step_rows in bar:
        state, step_metrics = train_step(state, batcher.batch(step_rows))
        if preemption.requested:
          _save(latest, _save_id(state, epoch_end=False), state)
          latest.wait_until_finished()
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
          rate = (bar.n + 1) * train_config.batch_size / max(time.time() - started, 1e-9)
          bar.set_postfix(loss=f"{np.mean(host['loss']):.4f}", samples_per_s=f"{rate:.0f}")
          for index, seed_logger in enumerate(seed_loggers):
            seed_logger.write({"stage": tag, "step": step, "epoch": epoch,
                               **{f"train/{k}": np.ravel(v)[index] for k, v in host.items()}})
      epoch_sums = None
      if accumulator is not None:
        check_finite(accumulator)
        epoch_sums = jax.device_get(accumulator["sums"])
      seconds = time.time() - started

      if end_epoch is not None:
        state = state.replace(method_state=end_epoch(state.method_state, jnp.int32(epoch)))

      best_values = np.ravel(jax.device_get(state.best_value)).astype(np.float64)
      best_epochs = np.ravel(jax.device_get(state.best_epoch)).copy()
      improved = np.zeros(len(seeds), bool)
      records = []
      for index in range(len(seeds)):
        params, method_state = ((_take_seed((state.params, state.method_state),
                                            jnp.int32(index))) if stacked
                                else (state.params, state.method_state))
        results = validate(predictor, params, method_state, splits["valid"], spec,
                           scenarios=train_config.selection_scenarios, task_loss_fn=loss_of)
        value = selection_value(results, metric)
        improved[index] = value > best_values[index]
        if improved[index]:
          best_values[index], best_epochs[index] = value, epoch
        epoch_means = {"loss": float("nan")}
        if epoch_sums is not None:
          seed_sums = {k: float(np.ravel(v)[index]) for k, v in epoch_sums.items()}
          epoch_means = {k: v / len(rows) for k, v in seed_sums.items()}
          epoch_means["skipped_steps"] = int(round(seed_sums["skipped"]))
        val_loss = float(np.mean([r["loss"] for r in results.values()]))
        records.append({
            "stage": tag, "epoch": epoch + 1, "step": step,
            "epoch_seconds": seconds,
            "samples_per_second": len(rows) * train_config.batch_size / max(seconds, 1e-9),
            **{f"train/{k}": v for k, v in epoch_means.items()},
            "val/loss": val_loss,
            f"val/{metric}": float(np.mean([r[metric] for r in results.values()])),
            **{f"val/{name}/{metric}": r[metric] for name, r in results.items()},
            "selection": value, "best_epoch": int(best_epochs[index]) + 1})
      state = state.replace(best_value=per_seed(best_values.astype(np.float32)),
                            best_epoch=per_seed(best_epochs.astype(np.int32)),
                            epoch=per_seed(np.full(len(seeds), epoch + 1, np.int32)))
      # Host-made scalars carry no mesh: lay them out like the step's output so that the
      # next epoch reuses the compiled step.
      state = parallel.replicate(state, mesh)
      for index, (seed_logger, record) in enumerate(zip(seed_loggers, records, strict=True)):
        seed_logger.write(record)
        if jax.process_index() == 0 and train_config.progress:
          tqdm.tqdm.write(f"[{tag}{f' seed {seeds[index]}' if stacked else ''}] epoch "
                          f"{epoch + 1}/{stage.num_epochs} train loss "
                          f"{record['train/loss']:.4f} val loss {record['val/loss']:.4f} "
                          f"val {metric} {record[f'val/{metric}']:.4f}"
                          + (" *" if improved[index] else ""))
      if improved.any():
        if stacked:
          best_state = _select_seeds(jnp.asarray(improved), state,
                                     state if best_state is None else best_state)
        _save(best, _save_id(state, epoch_end=True), best_state if stacked else state)
      _save(latest, _save_id(state, epoch_end=True), state)
      latest.wait_until_finished()
      best.wait_until_finished()
    if preemption.requested:  # arrived during validation or saving: all is on disk
      raise Preempted(_host_int(state.step), preemption.signal_name)
  finally:
    preemption.restore()
    latest.close()
    best.close()
  if stacked:
    best_state = state if best_state is None else best_state
    _save_seed_checkpoints(state, best_state, stage, seed_workdirs)
    return best_state.params, best_state.method_state
  final = restore_latest(best_path, state) or state
  return final.params, final.method_state


def load_stage_params(workdir: str, stage: Stage, example_batch, *, checkpoint: str = "best"):
  """(params, method_state, epoch) of a trained stage, from its best or latest checkpoint."""
  path = checkpoint_dir(workdir, stage.name, checkpoint)
  params = jax.eval_shape(lambda: stage.model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(0)}, example_batch,
      train=False)["params"])
  manager = _manager(path)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"no {checkpoint} checkpoint in {path}: train first with "
                            "python -m mer_jax.train --workdir ...")
  restored = manager.restore(step, args=ocp.args.StandardRestore())
  manager.close()
  if not isinstance(restored, Mapping):
    restored = restored.__dict__
  del params
  return restored["params"], restored["method_state"], int(restored["epoch"])
