"""Perceiver encoder and the shared MCUR/CMAD backbone: shapes, padding invariance,
frame-order invariance, absent modalities, and the vmapped Perceivers matching three
separate ones."""

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_batch, tiny_spec

from mer_jax.nn.fusion import PerceiverFusion
from mer_jax.nn.perceiver import Perceiver

PERCEIVER = dict(num_latents=3, depth=2, cross_heads=1, latent_heads=2, mlp_dim=16, dropout=0.0)


def sequence(batch_size=3, length=7, width=8, real=(7, 4, 1), seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch_size, length, width)).astype(np.float32)
  mask = np.arange(length)[None] < np.asarray(real)[:, None]
  return x, mask


def init(module, *args, seed=0):
  return module.init({"params": jax.random.key(seed)}, *args, train=False)["params"]


@pytest.fixture(scope="module")
def perceiver():
  """(jitted apply(params, x, mask), params, x, mask) of one Perceiver, shared by tests."""
  x, mask = sequence()
  module = Perceiver(**PERCEIVER)
  params = init(module, x, mask)
  apply = jax.jit(lambda p, x, m: module.apply({"params": p}, x, m, train=False))
  return apply, params, x, mask


def test_output_shape_and_normalisation(perceiver):
  apply, params, x, mask = perceiver
  out = apply(params, x, mask)
  chex.assert_shape(out, (3, 8))
  chex.assert_tree_all_finite(out)
  chex.assert_shape(params["latents"], (3, 8))
  assert sorted(k for k in params if k.startswith("cross")) == ["cross0", "cross1"]
  # The final LayerNorm normalises each output vector (unit scale, zero bias at init).
  np.testing.assert_allclose(out.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(out.std(-1), 1.0, atol=1e-2)


def test_shared_weights_use_one_set_of_blocks():
  x, mask = sequence(batch_size=1, length=3, real=(3,))
  params = jax.eval_shape(lambda: init(Perceiver(**PERCEIVER, share_weights=True), x, mask))
  assert sorted(k for k in params if k.startswith(("cross", "latent"))) == [
      "cross0", "latent0_0", "latents"]


def test_values_at_padded_frames_never_change_the_output(perceiver):
  apply, params, x, mask = perceiver
  garbage = np.where(mask[..., None], x, 1e4 * np.random.default_rng(1).normal(size=x.shape))
  a = apply(params, x, mask)
  chex.assert_trees_all_close(a, apply(params, garbage.astype(np.float32), mask), atol=1e-5)
  # Trailing padding can also be cut off altogether (row 1 has 4 real frames).
  shorter = apply(params, x[:, :4], mask[:, :4])
  chex.assert_trees_all_close(a[1:], shorter[1:], atol=1e-5)


def test_permuting_real_frames_leaves_the_output_unchanged(perceiver):
  # Cross-attention pools over keys, so without position information the Perceiver is
  # a function of the set of real frames.
  apply, params, x, mask = perceiver
  order = np.random.default_rng(2).permutation(7)
  chex.assert_trees_all_close(apply(params, x, mask), apply(params, x[:, order], mask[:, order]),
                              atol=1e-5)


def test_sequence_without_real_frames_is_finite_and_input_independent(perceiver):
  apply, params, x, _ = perceiver
  mask = np.zeros((3, 7), bool)
  mask[2, :3] = True
  a = apply(params, x, mask)
  b = apply(params, x * 50.0 + 3.0, mask)
  chex.assert_tree_all_finite(a)
  chex.assert_trees_all_close(a[:2], b[:2], atol=1e-6)
  np.testing.assert_allclose(a[0], a[1], atol=1e-6)
  grads = jax.grad(lambda p: jnp.sum(apply(p, x, mask) ** 2))(params)
  chex.assert_tree_all_finite(grads)


def test_dropout_only_in_training():
  x, mask = sequence(batch_size=2, length=4, real=(4, 2))
  module = Perceiver(**dict(PERCEIVER, depth=1, dropout=0.5))
  params = init(module, x, mask)
  a = module.apply({"params": params}, x, mask, train=False)
  b = module.apply({"params": params}, x, mask, train=False)
  c = module.apply({"params": params}, x, mask, train=True, rngs={"dropout": jax.random.key(3)})
  chex.assert_trees_all_close(a, b)
  assert not np.allclose(a, c, atol=1e-3)


BACKBONE = dict(width=8, kernel_sizes=(3, 1, 1), num_latents=2, perceiver_depth=1,
                cross_heads=1, latent_heads=2, perceiver_mlp_dim=16, fusion_layers=1,
                fusion_heads=2, fusion_mlp_dim=16, mlp_layers=2, dropout=0.0)


@pytest.fixture(scope="module")
def backbone():
  """(module, params, batch) of one backbone with unequal modality lengths."""
  spec = tiny_spec(lengths=(6, 9, 4))
  batch = random_batch(spec, batch_size=3, real_lengths=([6, 2, 1], [9, 5, 3], [1, 4, 2]))
  module = PerceiverFusion(**BACKBONE)
  return module, init(module, batch), batch


def test_backbone_shapes_padding_and_absent_modalities(backbone):
  module, params, batch = backbone
  apply = jax.jit(lambda p, b: module.apply({"params": p}, b, train=False))
  out = apply(params, batch)
  chex.assert_shape(out["fused"], (3, 8))
  chex.assert_shape(out["tokens"], (3, 3, 8))
  chex.assert_shape(out["unimodal"], (3, 3, 8))
  np.testing.assert_array_equal(out["present"], True)

  padded = dict(batch)
  rng = np.random.default_rng(4)
  for name in ("text", "audio", "vision"):
    noise = 100 * rng.normal(size=batch[name].shape).astype(np.float32)
    padded[name] = np.where(batch[f"{name}_mask"][..., None], batch[name], noise)
  chex.assert_trees_all_close(out, apply(params, padded), atol=1e-4)

  absent = dict(batch, modality_mask=np.array([[True, False, True]] * 3))
  a = apply(params, absent)
  b = apply(params, dict(absent, audio=batch["audio"] + 7.0))
  np.testing.assert_array_equal(a["present"][:, 1], False)
  np.testing.assert_allclose(a["tokens"][:, 1], 0.0)
  chex.assert_trees_all_close(a, b, atol=1e-5)
  assert not np.allclose(a["fused"], out["fused"], atol=1e-3)


def test_vmapped_perceivers_equal_three_separate_perceivers(backbone):
  module, params, batch = backbone
  out, state = module.apply({"params": params}, batch, train=False,
                            capture_intermediates=True, mutable=["intermediates"])
  inter = flax.core.unfreeze(state["intermediates"])
  single = Perceiver(num_latents=2, depth=1, cross_heads=1, latent_heads=2, mlp_dim=16)
  for index, name in enumerate(("text", "audio", "vision")):
    # The projection's output, unpadded (B, T_m, D), plus the position embedding.
    sequence_m = inter[f"proj_{name}"]["__call__"][0] + params[f"pos_{name}"]
    own = jax.tree.map(lambda p, i=index: p[i], params["perceivers"])
    expected = single.apply({"params": own}, sequence_m, batch[f"{name}_mask"], train=False)
    chex.assert_trees_all_close(out["unimodal"][:, index], expected, atol=1e-5)
