"""Several seeds in one program (`trainer.train_stage` with `seed_workdirs`, behind
`config.num_seeds`): each stacked seed equals its own single-seed run, also for a
student stage reading a stacked frozen teacher; a pre-empted stacked run resumes
bit-exactly; a non-finite step names the seed it came from."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Toy, random_batch, tiny_spec, toy_train_config

from mer_jax import parallel, trainer
from mer_jax.methods.base import Stage, StageContext

SPEC = tiny_spec("regression")
SEEDS = 3
POISON_ROW = 5


def toy_stage(name="", *, student=False, poison=False):
  """A stage whose loss uses its key (per-seed noise), an optional frozen teacher
  (distillation towards its outputs) and an optional NaN at one row from epoch 2."""
  model = Toy()

  def loss_fn(params, method_state, batch, key, context):
    out = model.apply({"params": params}, batch, train=True)["output"]
    noise = 0.05 * jax.random.normal(key, out.shape)
    loss = jnp.mean(jnp.abs(out + noise - batch["label"]))
    if student:
      teacher = model.apply({"params": context.frozen}, batch)["output"]
      loss = loss + jnp.mean((out - teacher) ** 2)
    if poison:
      poisoned = (context.epoch >= 1) & jnp.any(batch["index"] == POISON_ROW)
      loss = loss + jnp.where(poisoned, jnp.nan, 0.0)
    return loss, ({"loss_task": loss}, method_state)

  return Stage(name=name, model=model, loss_fn=loss_fn, num_epochs=3)


def toy_config(seed=0):
  config = toy_train_config()
  config.seed = seed
  return config


SPLITS = {"train": random_batch(SPEC, 32, seed=0), "valid": random_batch(SPEC, 16, seed=1)}


def epoch_records(workdir):
  with open(os.path.join(workdir, "log.jsonl")) as f:
    return [r for r in map(json.loads, f) if "val/loss" in r]


def train_seeds(stages, workdir, mesh):
  """Trains `stages` for seeds 0..SEEDS-1 stacked; returns the last stage's stacked
  params and the seed folders."""
  seed_dirs = [os.path.join(workdir, f"seed{s}") for s in range(SEEDS)]
  context = StageContext()
  for index, stage in enumerate(stages):
    params, state = trainer.train_stage(stage, toy_config(), SPLITS, SPEC, mesh, workdir,
                                        stage_index=index, context=context,
                                        seed_workdirs=seed_dirs)
    context = StageContext(frozen=params, frozen_state=state)
  return params, seed_dirs


def train_single(stages, seed, workdir, mesh):
  context = StageContext()
  for index, stage in enumerate(stages):
    params, state = trainer.train_stage(stage, toy_config(seed), SPLITS, SPEC, mesh, workdir,
                                        stage_index=index, context=context)
    context = StageContext(frozen=params, frozen_state=state)
  return params


@pytest.mark.slow
def test_stacked_seeds_equal_their_single_runs_through_a_teacher_stage(tmp_path):
  mesh = parallel.make_mesh(2)
  stages = [toy_stage("teacher"), toy_stage("student", student=True)]
  stacked, seed_dirs = train_seeds(stages, str(tmp_path / "stacked"), mesh)
  chex_shapes = {x.shape[0] for x in jax.tree.leaves(stacked)}
  assert chex_shapes == {SEEDS}
  for seed in range(SEEDS):
    single_dir = str(tmp_path / f"single{seed}")
    single = train_single(stages, seed, single_dir, mesh)
    one = jax.tree.map(lambda x, seed=seed: np.asarray(x)[seed], stacked)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 one, single)
    for stage in ("teacher", "student"):
      # The seed folder holds what the single run wrote: its checkpoints and its log.
      for kind in ("best", "latest"):
        mine = trainer.restore_latest(trainer.checkpoint_dir(seed_dirs[seed], stage, kind),
                                      None)
        theirs = trainer.restore_latest(trainer.checkpoint_dir(single_dir, stage, kind), None)
        assert int(mine["step"]) == int(theirs["step"])
        assert int(mine["best_epoch"]) == int(theirs["best_epoch"])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     mine["params"], theirs["params"])
    mine = [(r["stage"], r["epoch"], r["val/loss"], r["train/loss"])
            for r in epoch_records(seed_dirs[seed])]
    theirs = [(r["stage"], r["epoch"], r["val/loss"], r["train/loss"])
              for r in epoch_records(single_dir)]
    assert len(mine) == 6
    for a, b in zip(mine, theirs, strict=True):
      assert a[:2] == b[:2] and a[2:] == pytest.approx(b[2:], rel=1e-5, abs=1e-6)
  # Different seeds, different models.
  first = jax.tree.leaves(stacked)[0]
  assert not np.allclose(first[0], first[1])


class _PreemptAfter(trainer.PreemptionGuard):
  """A SIGTERM that arrives after the `steps`-th train step."""

  steps = 0

  def __init__(self):
    super().__init__()
    self._checks = 0

  @property
  def requested(self):
    self._checks += 1
    return self._checks == type(self).steps

  @requested.setter
  def requested(self, value):
    del value


def test_preempted_stacked_run_resumes_bit_exactly(tmp_path, monkeypatch):
  mesh = parallel.make_mesh(2)
  stage = [toy_stage()]
  straight, _ = train_seeds(stage, str(tmp_path / "straight"), mesh)
  workdir = str(tmp_path / "preempted")
  _PreemptAfter.steps = 6  # mid-epoch 2 (4 steps per epoch)
  monkeypatch.setattr(trainer, "PreemptionGuard", _PreemptAfter)
  with pytest.raises(trainer.Preempted) as raised:
    train_seeds(stage, workdir, mesh)
  assert raised.value.step == 6
  _PreemptAfter.steps = 0  # never again
  resumed, seed_dirs = train_seeds(stage, workdir, mesh)
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)
  # Each seed logs every epoch once: the resumed run continued the stacked checkpoint.
  assert [r["epoch"] for r in epoch_records(seed_dirs[1])] == [1, 2, 3]


def test_nonfinite_names_the_seed(tmp_path):
  mesh = parallel.make_mesh(2)
  with pytest.raises(trainer.NonFiniteError) as raised:
    train_seeds([toy_stage(poison=True)], str(tmp_path), mesh)
  # Every seed meets the poisoned row in epoch 2; the first to meet it is named.
  from mer_jax.data.pipeline import Batcher

  batcher = Batcher(SPLITS["train"], 8, mesh, on_device=False)
  steps = [4 + int(np.flatnonzero((batcher.epoch_rows(s, 1) == POISON_ROW).any(1))[0]) + 1
           for s in range(SEEDS)]
  seed = int(np.argmin(steps))
  assert f"toy seed {seed}] non-finite loss or gradient at step {min(steps)}" in str(
      raised.value)
