"""Mixed precision (`config.dtype="bfloat16"`): the layers compute in bfloat16, params,
gradients, losses and method state stay float32, and the numbers stay close to float32."""

import dataclasses
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from helpers import random_batch, tiny_spec

from mer_jax import parallel
from mer_jax.methods import build_stages
from mer_jax.methods.base import StageContext, with_compute_dtype
from mer_jax.trainer import init_train_state, make_optimizer, make_train_step

SPEC = tiny_spec("regression")


def load_config(name, dtype):
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, "configs", name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.dtype = dtype
  return config


def _dtypes_in(jaxpr_text, primitive):
  """Result dtypes of every `primitive` equation in a printed jaxpr."""
  return {line.split(":")[1].split("[")[0] for line in jaxpr_text.splitlines()
          if f"= {primitive}[" in line and ":" in line}


@pytest.mark.slow
@pytest.mark.parametrize("config_file", ["dqf_mosei.py", "mcur_mosei.py", "ease_mosei.py",
                                         "cmarr_iemocap.py"])
def test_bfloat16_computes_in_bf16_and_stays_close_to_float32(config_file):
  config32 = load_config(config_file, "float32")
  spec = dataclasses.replace(SPEC, task=config32.data.task,
                             num_classes=4 if config32.data.task != "regression" else 1,
                             label_range=(-3.0, 3.0) if config32.data.task == "regression"
                             else None)
  stage32 = build_stages(config32, spec)[-1]
  stage16 = build_stages(load_config(config_file, "bfloat16"), spec)[-1]
  assert stage16.compute_dtype == "bfloat16" and stage32.compute_dtype == "float32"
  batch = random_batch(spec, batch_size=8, seed=1)
  init = lambda model, key: jax.jit(lambda k: model.init(k, batch, train=False)["params"])(key)
  params = init(stage32.model, jax.random.key(0))
  state = stage32.init_state()
  context = StageContext()
  if stage32.name == "student":  # a frozen (untrained) teacher
    teacher = build_stages(config32, spec)[0]
    context = StageContext(frozen=init(teacher.model, jax.random.key(1)),
                           frozen_state=teacher.init_state())
  key = jax.random.key(2)

  # Jitted as in the train step: one compile per program instead of one per eager op,
  # and one program per dtype (the loss, its gradient and the evaluation forward).
  # Traced once: the printed program is the one that runs.
  def loss_grad_and_output(stage):
    loss = lambda p: stage.loss_fn(p, state, batch, key, context)
    both = lambda p: (jax.value_and_grad(loss, has_aux=True)(p),
                      stage.predict(p, state, batch)["output"])
    traced = jax.jit(both).trace(params)
    return traced.lower().compile()(params), str(traced.jaxpr)

  (((loss32, (metrics32, _)), grads32), out32), text32 = loss_grad_and_output(stage32)
  (((loss16, (metrics16, state16)), grads16), out16), text16 = loss_grad_and_output(stage16)

  # The matrix products run in bfloat16 (none does in the float32 stage).
  assert "bf16" in _dtypes_in(text16, "dot_general")
  assert "bf16" not in _dtypes_in(text32, "dot_general")
  # Master params, gradients, the loss, metrics and method state stay float32.
  assert loss16.dtype == jnp.float32
  assert all(g.dtype == p.dtype == jnp.float32
             for g, p in zip(jax.tree.leaves(grads16), jax.tree.leaves(params), strict=True))
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(metrics16))
  assert jax.tree.map(lambda x: x.dtype, state16) == jax.tree.map(lambda x: x.dtype, state)
  # bfloat16 keeps 8 mantissa bits: the loss agrees to a few percent, and so does the
  # direction of the gradient.
  np.testing.assert_allclose(float(loss16), float(loss32), rtol=0.05, atol=0.02)
  flat16 = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads16)])
  flat32 = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads32)])
  assert np.all(np.isfinite(flat16))
  cosine = flat16 @ flat32 / (np.linalg.norm(flat16) * np.linalg.norm(flat32))
  assert cosine > 0.95, cosine

  assert out16.dtype == jnp.float32
  # Relative to the outputs' own scale (0.7-1.9 for these untrained models; bfloat16 is
  # off by 0.6-2.1% of it in L2), and the outputs must differ between rows: an absolute
  # tolerance of 0.05 would also accept outputs that are all near zero in both dtypes.
  scale = float(np.abs(out32).max())
  assert scale > 0 and np.std(out32) > 0.01 * scale, out32
  error = np.abs(np.asarray(out16) - np.asarray(out32))
  assert error.max() < 0.05 * scale, (error.max(), scale)
  assert np.linalg.norm(error) < 0.05 * np.linalg.norm(out32), (error, out32)


def _train(dtype, steps=15):
  # MCUR's teacher (a Perceiver with a fusion transformer) trains alone and compiles in a
  # fraction of DQF's time; the student's bfloat16 path is checked above.
  config = load_config("mcur_mosei.py", dtype)
  # At this rate the loss still falls at the last step, where dropout noise is small
  # against the fall (at 3e-3 it flattens out and the noise dominates the comparison).
  config.train.learning_rate = 1e-3
  stage = build_stages(config, SPEC)[0]
  batch = random_batch(SPEC, batch_size=16, seed=3)
  mesh = parallel.make_mesh(0)
  tx = make_optimizer(config.train, steps, 1)
  train_key = jax.random.key(4)
  state = parallel.replicate(init_train_state(stage, tx, batch, train_key), mesh)
  step = make_train_step(stage, tx, train_key, StageContext(), mesh)
  sharded = parallel.shard_batch(batch, mesh)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, sharded)
    losses.append(float(metrics["loss"]))
  return state, np.array(losses)


@pytest.mark.slow
def test_bfloat16_training_tracks_float32_with_float32_params():
  state16, losses16 = _train("bfloat16")
  _, losses32 = _train("float32")
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state16.params))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state16.opt_state)
             if jnp.issubdtype(x.dtype, jnp.floating))
  # Both fit the batch, and the bfloat16 run stays within a few percent of float32.
  assert losses32[-5:].mean() < 0.95 * losses32[:5].mean(), losses32
  assert losses16[-5:].mean() < 0.95 * losses16[:5].mean(), losses16
  np.testing.assert_allclose(losses16[-5:].mean(), losses32[-5:].mean(), rtol=0.1)


def test_unknown_dtype_is_refused():
  (stage,) = build_stages(load_config("dqf_mosei.py", "float32"), SPEC)
  with pytest.raises(ValueError, match="config.dtype='float16'"):
    with_compute_dtype(stage, "float16")
