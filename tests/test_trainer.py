"""The loop's parts against independent references: learning-rate schedules and optimiser
updates against optax's own, one compiled step for any run length, packed checkpoints,
the checkpoint write policy (and resuming from it bit-exactly), selection protocols and
per-stage learning rates."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import Toy, random_batch, tiny_spec, toy_train_config

from mer_jax import parallel, trainer
from mer_jax.methods.base import Stage, StageContext

SPEC = tiny_spec("regression")
SPLITS = {"train": random_batch(SPEC, 32, seed=0), "valid": random_batch(SPEC, 16, seed=1)}


def optax_schedule(kind, peak, total, warmup):
  """The schedules as optax builds them (mer_jax's definition before they moved into the
  optimiser state)."""
  if kind == "constant":
    schedule = optax.constant_schedule(peak)
    if warmup:
      schedule = optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), schedule],
                                      [warmup])
    return schedule
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0 if warmup else peak, peak, max(warmup, 1),
                                              max(total, max(warmup, 1) + 1), peak * 0.01)
  return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)),
                               optax.linear_schedule(peak, 0.0, max(total - warmup, 1))],
                              [max(warmup, 1)])


@pytest.mark.parametrize("kind", trainer.SCHEDULES)
@pytest.mark.parametrize("total, warmup", [(1, 0), (2, 0), (12, 0), (12, 3), (5, 5)])
def test_schedules_equal_optax(kind, total, warmup):
  counts = np.arange(total + 3)
  ours = jax.vmap(lambda c: trainer.learning_rate_at(kind, 0.1, c, total, warmup))(counts)
  reference = optax_schedule(kind, 0.1, total, warmup)
  np.testing.assert_allclose(ours, [reference(c) for c in counts], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_optimizer_updates_equal_optax(name):
  train_config = toy_train_config(optimizer=name, schedule="cosine", warmup_epochs=1,
                                  weight_decay=0.01, grad_clip=0.5).train
  steps_per_epoch, epochs, peak = 3, 2, 0.05
  schedule = optax_schedule("cosine", peak, steps_per_epoch * epochs, steps_per_epoch)
  reference = {"adamw": optax.adamw(schedule, weight_decay=0.01),
               "adam": optax.adam(schedule),
               "sgd": optax.chain(optax.add_decayed_weights(0.01),
                                  optax.sgd(schedule, momentum=0.9))}[name]
  reference = optax.chain(optax.clip_by_global_norm(0.5), reference)
  ours = trainer.make_optimizer(train_config, steps_per_epoch, epochs, learning_rate=peak)
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "b": jnp.zeros(2)}
  ours_state, reference_state = ours.init(params), reference.init(params)
  ours_params = reference_params = params
  for _ in range(steps_per_epoch * epochs + 1):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    updates, ours_state = ours.update(grads, ours_state, ours_params)
    ours_params = optax.apply_updates(ours_params, updates)
    updates, reference_state = reference.update(grads, reference_state, reference_params)
    reference_params = optax.apply_updates(reference_params, updates)
  chex.assert_trees_all_close(ours_params, reference_params, rtol=1e-5, atol=1e-7)


def toy_stage(name="", num_epochs=3, **fields):
  model = Toy()

  def loss_fn(params, method_state, batch, key, context):
    del key, context
    out = model.apply({"params": params}, batch, train=True)["output"]
    loss = jnp.mean(jnp.abs(out - batch["label"]))
    return loss, ({"loss_task": loss}, method_state)

  return Stage(name=name, model=model, loss_fn=loss_fn, num_epochs=num_epochs, **fields)


def test_one_compiled_step_serves_runs_of_any_length():
  stage, mesh = toy_stage(), parallel.make_mesh(1)
  texts = []
  for epochs in (1, 3):
    tx = trainer.make_optimizer(toy_train_config(schedule="cosine").train, 4, epochs)
    batch = parallel.shard_batch(dict(SPLITS["train"], index=np.arange(32)), mesh)
    state = parallel.replicate(trainer.init_train_state(stage, tx, batch, jax.random.key(0)),
                               mesh)
    step = trainer.make_train_step(stage, tx, jax.random.key(1), StageContext(), mesh)
    texts.append(step.trace(state, batch).lower().as_text())
    assert int(jax.tree.leaves(
        [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(
            x, trainer.ScheduleState)) if isinstance(s, trainer.ScheduleState)][0].total_steps
    )[0]) == 4 * epochs
  assert texts[0] == texts[1]
  # The parameter initialisation, too, is one program (the length is set outside it),
  # traced and compiled once for both runs.
  assert trainer._init_params_program(stage)._cache_size() == 1


def test_packed_checkpoint_round_trip_and_layout_errors(tmp_path):
  mesh = parallel.make_mesh(2)
  state = {"params": {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)},
           "count": jnp.int32(7), "fixed": jnp.array([True, False])}
  packed = trainer._pack(state)
  assert sorted(packed) == ["bool", "float32", "int32"]  # one array per dtype
  chex.assert_shape(packed["float32"], (9,))
  manager = trainer._manager(str(tmp_path / "latest"))
  trainer._save(manager, 3, parallel.replicate(state, mesh))
  manager.wait_until_finished()
  target = parallel.replicate(jax.tree.map(jnp.zeros_like, state), mesh)
  restored = trainer.restore_latest(str(tmp_path / "latest"), target)
  chex.assert_trees_all_equal(restored, state)
  assert restored["params"]["w"].sharding == target["params"]["w"].sharding
  nested = trainer.read_checkpoint(str(tmp_path / "latest"))
  np.testing.assert_array_equal(nested["params"]["w"], state["params"]["w"])
  other = dict(target, params={"w": jnp.zeros((3, 2)), "b": jnp.zeros(3)})
  with pytest.raises(trainer.CheckpointError, match=r"params/w float32\[2, 3\].*\[3, 2\]"):
    trainer.restore_latest(str(tmp_path / "latest"), other)


def test_optimizer_state_is_flat_and_format_2_checkpoints_restore(tmp_path, monkeypatch):
  train_config = toy_train_config(optimizer="adamw", grad_clip=0.5).train
  tx = trainer.make_optimizer(train_config, 3, 2)
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  adam_state = tx.init(params)[1][0]  # (clip, (adam, decay, schedule))
  chex.assert_shape([adam_state.mu, adam_state.nu], (9,))  # one vector, not one per array
  # A format-2 checkpoint held the per-parameter state of the same transformations.
  per_array = optax.chain(optax.clip_by_global_norm(0.5), optax.chain(
      optax.scale_by_adam(), optax.add_decayed_weights(1e-4),
      trainer.scale_by_schedule_length("constant", 1e-3, 6, 0)))
  clip_state, (adam, decay, schedule) = per_array.init(params)
  adam = adam._replace(mu={"w": jnp.arange(6.0).reshape(2, 3) + 10, "b": jnp.arange(3.0) + 20})
  old_opt_state = (clip_state, (adam, decay, schedule))
  old_state = {"params": params, "opt_state": old_opt_state}
  monkeypatch.setattr(trainer, "CHECKPOINT_FORMAT", 2)
  manager = trainer._manager(str(tmp_path / "latest"))
  trainer._save(manager, 1, old_state)
  manager.wait_until_finished()
  monkeypatch.undo()
  target = {"params": jax.tree.map(jnp.zeros_like, params), "opt_state": tx.init(params)}
  restored = trainer.restore_latest(str(tmp_path / "latest"), target)
  chex.assert_trees_all_equal(restored["params"], params)
  # ravel order: the dict's sorted keys, "b" then "w".
  np.testing.assert_array_equal(restored["opt_state"][1][0].mu,
                                np.r_[20.0, 21, 22, np.arange(6.0) + 10])
  # A format-3 checkpoint of per-array state is another model, named as such.
  manager = trainer._manager(str(tmp_path / "other"))
  trainer._save(manager, 1, old_state)
  manager.wait_until_finished()
  with pytest.raises(trainer.CheckpointError, match="opt_state/1/0/mu"):
    trainer.restore_latest(str(tmp_path / "other"), target)


class Recorder:
  """Records the checkpoint ids `trainer._save` writes, per kind."""

  def __init__(self, monkeypatch):
    self.saved = []
    save = trainer._save

    def recording(manager, save_id, state):
      self.saved.append((os.path.basename(str(manager.directory)), save_id))
      return save(manager, save_id, state)

    monkeypatch.setattr(trainer, "_save", recording)

  def ids(self, kind):
    return [i for k, i in self.saved if k == kind]


def run(stage, workdir, **train):
  config = toy_train_config(**train)
  mesh = parallel.make_mesh(2)
  return trainer.train_stage(stage, config, SPLITS, SPEC, mesh, str(workdir))


@pytest.mark.slow
def test_checkpoint_every_epochs_keeps_the_best_on_device(tmp_path, monkeypatch):
  recorder = Recorder(monkeypatch)
  stage = toy_stage(num_epochs=5)
  params, _ = run(stage, tmp_path / "policy", checkpoint_every_epochs=2)
  # 4 steps per epoch: epoch ends at steps 4, 8, ... -> ids 2 * step + 1.
  assert recorder.ids("latest") == [17, 33, 41]  # epochs 2, 4 and the last
  assert set(recorder.ids("best")) <= {17, 33, 41}
  log = [r for r in trainer_log(tmp_path / "policy") if "val/loss" in r]
  best_epoch = log[-1]["best_epoch"]
  best = trainer.read_checkpoint(trainer.checkpoint_dir(str(tmp_path / "policy"), "", "best"))
  assert int(best["epoch"]) == best_epoch
  chex.assert_trees_all_equal(params, best["params"])
  # Every epoch written: the same training, the same final params.
  every, _ = run(stage, tmp_path / "every")
  chex.assert_trees_all_equal(params, every)


@pytest.mark.slow
def test_a_crash_loses_at_most_one_interval_and_resumes_bit_exactly(tmp_path, monkeypatch):
  stage = toy_stage(num_epochs=5)
  straight, _ = run(stage, tmp_path / "straight", checkpoint_every_epochs=2)
  validate = trainer.validate
  calls = []

  def crash_in_epoch_4(*args, **kwargs):
    calls.append(1)
    if len(calls) == 4:
      raise KeyboardInterrupt  # as a kill: nothing after this point is written
    return validate(*args, **kwargs)

  monkeypatch.setattr(trainer, "validate", crash_in_epoch_4)
  with pytest.raises(KeyboardInterrupt):
    run(stage, tmp_path / "crashed", checkpoint_every_epochs=2)
  monkeypatch.setattr(trainer, "validate", validate)
  latest = trainer.read_checkpoint(trainer.checkpoint_dir(str(tmp_path / "crashed"), "",
                                                          "latest"))
  assert int(latest["epoch"]) == 2  # epoch 3 was lost, epoch 4 never finished
  resumed, _ = run(stage, tmp_path / "crashed", checkpoint_every_epochs=2)
  chex.assert_trees_all_equal(resumed, straight)


def test_checkpoint_every_seconds_writes_mid_epoch(tmp_path, monkeypatch):
  recorder = Recorder(monkeypatch)
  run(toy_stage(num_epochs=1), tmp_path, checkpoint_every_seconds=1e-9)
  # After steps 1-3 (mid-epoch ids 2 * step) and at the end of the epoch (step 4).
  assert recorder.ids("latest") == [2, 4, 6, 9]


def trainer_log(workdir):
  import json

  with open(os.path.join(workdir, "log.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_last_selection_and_stage_learning_rate(tmp_path):
  stage = toy_stage(num_epochs=2, selection="last", learning_rate=0.0)
  params, _ = run(stage, tmp_path / "frozen")
  # A zero rate trains nothing: the stage's own rate replaced config.train's 1e-2.
  initial = trainer.init_train_state(stage, optax.identity(), SPLITS["train"],
                                     jax.random.split(jax.random.fold_in(
                                         jax.random.key(0), 0))[0]).params
  chex.assert_trees_all_close(params, initial)
  records = [r for r in trainer_log(tmp_path / "frozen") if "val/loss" in r]
  assert [r["best_epoch"] for r in records] == [1, 2]  # "last": every epoch is kept


@pytest.mark.parametrize("kind, names", [
    ("fixed", ["L", "A", "V", "LA", "LV", "AV", "LAV"]), ("full", ["LAV"]),
    ("frame", ["frame0.3_LAV"])])
@pytest.mark.slow
def test_selection_scenarios(kind, names):
  stage, mesh = toy_stage(), parallel.make_mesh(1)
  params = stage.model.init(jax.random.key(0), SPLITS["valid"])["params"]
  predictor = trainer.Predictor(stage, mesh, 16, on_device=False)
  loss = lambda out, label: np.abs(out - label)
  results = trainer.validate(predictor, params, {}, SPLITS["valid"], SPEC, scenarios=kind,
                             task_loss_fn=loss, frame_rate=0.3, scenarios_per_call=8)
  assert list(results) == names
  full = predictor.predict_split(params, {}, SPLITS["valid"],
                                 modality_mask=np.ones((16, 3), bool))["output"]
  if kind == "full":
    np.testing.assert_allclose(results["LAV"]["loss"], np.mean(loss(full, SPLITS["valid"]
                                                                    ["label"])), rtol=1e-6)
  if kind == "frame":  # frames replaced by zeros change the outputs
    assert results["frame0.3_LAV"]["loss"] != pytest.approx(
        float(np.mean(loss(full, SPLITS["valid"]["label"]))))
