"""DQF: shapes per task, padding and missing-modality invariance, loss decreases."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from helpers import random_batch, tiny_spec

from mer_jax.methods import dqf
from mer_jax.methods.base import StageContext
from mer_jax.nn.queries import adaptive_pool_matrix, align_length


def tiny_config(kind="frame_dqf"):
  config = ml_collections.ConfigDict()
  config.method = "dqf"
  config.model = dict(width=16, num_layers=1, num_heads=2, mlp_dim=32, dropout=0.0,
                      common_length=0, kernel_sizes=(3, 1, 1), head_hidden=16)
  config.loss = dict(regression_loss="l1", aux_weight=1.0)
  config.train = dict(num_epochs=1)
  config.missing = dict(kind=kind, fill="zero")
  return config


def init(stage, batch, seed=0):
  return stage.model.init({"params": jax.random.key(seed)}, batch, train=False)["params"]


@pytest.mark.parametrize("task,shape", [("regression", ()), ("classification", (4,)),
                                        ("multilabel_binary", (4, 2))])
def test_output_shapes(task, shape):
  spec = tiny_spec(task)
  (stage,) = dqf.build(tiny_config(), spec)
  batch = random_batch(spec, batch_size=3)
  out = stage.model.apply({"params": init(stage, batch)}, batch, train=False)
  chex.assert_shape(out["output"], (3,) + shape)
  chex.assert_shape(out["aux_outputs"], (3, 7) + shape)
  chex.assert_shape(out["embedding"], (3, 7 * 16))
  chex.assert_tree_all_finite(out)


def test_padded_frames_never_change_outputs():
  spec = tiny_spec("classification")
  (stage,) = dqf.build(tiny_config(), spec)
  batch = random_batch(spec, batch_size=3, real_lengths=([3, 6, 1], [2, 5, 4], [1, 1, 4]))
  params = init(stage, batch)
  changed = dict(batch)
  for name in ("text", "audio", "vision"):
    noise = np.random.default_rng(1).normal(size=batch[name].shape).astype(np.float32) * 100
    changed[name] = np.where(batch[f"{name}_mask"][..., None], batch[name], noise)
  a = stage.model.apply({"params": params}, batch, train=False)
  b = stage.model.apply({"params": params}, changed, train=False)
  chex.assert_trees_all_close(a, b, atol=1e-5)


def test_absent_modality_input_is_ignored():
  spec = tiny_spec("regression")
  (stage,) = dqf.build(tiny_config(), spec)
  batch = random_batch(spec, batch_size=2)
  batch["modality_mask"] = np.array([[True, False, True], [True, False, True]])
  params = init(stage, batch)
  changed = dict(batch, audio=batch["audio"] + 5.0)
  a = stage.model.apply({"params": params}, batch, train=False)["output"]
  b = stage.model.apply({"params": params}, changed, train=False)["output"]
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_adaptive_pooling_matches_numpy_bins():
  matrix = adaptive_pool_matrix(5, 3)
  # torch AdaptiveAvgPool1d(3) over 5 steps uses bins [0,2), [1,4), [3,5).
  np.testing.assert_array_equal(matrix, [[1, 1, 0, 0, 0], [0, 1, 1, 1, 0], [0, 0, 0, 1, 1]])
  x = jnp.arange(10.0).reshape(1, 5, 2)
  mask = jnp.array([[True, True, True, False, False]])
  pooled, pooled_mask = align_length(x, mask, 3)
  np.testing.assert_allclose(pooled[0, :, 0], [1.0, 3.0, 0.0])  # masked mean per bin
  np.testing.assert_array_equal(pooled_mask[0], [True, True, False])


def test_short_training_lowers_the_loss():
  spec = tiny_spec("classification")
  (stage,) = dqf.build(tiny_config(kind="none"), spec)
  batch = random_batch(spec, batch_size=16, seed=3)
  # A learnable signal: the class shifts the text features.
  batch["text"] = batch["text"] + batch["label"][:, None, None].astype(np.float32)
  params = init(stage, batch)
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, key):
    (loss, _), grads = jax.value_and_grad(stage.loss_fn, has_aux=True)(
        params, {}, batch, key, StageContext())
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for i in range(30):
    params, opt_state, loss = step(params, opt_state, jax.random.key(i))
    losses.append(float(loss))
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
