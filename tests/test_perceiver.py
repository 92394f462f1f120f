"""Perceiver encoder and the shared MCUR/CMAD backbone: shapes, padding invariance,
frame-order invariance, absent modalities, the vmapped Perceivers matching three
separate ones, attention with an inner width of its own, scanned layer stacks against
the unrolled ones, and the whole official-architecture forward against numpy."""

import functools

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from helpers import random_batch, tiny_spec

from mer_jax.data import missing
from mer_jax.nn.attention import (
    CrossAttentionLayer,
    ModalityProjection,
    MultiHeadAttention,
    Standardize,
    TransformerEncoder,
    absorbed_attention,
    absorbed_projections_are_cheaper,
    attention_mask,
    exact_gelu,
    masked_softmax,
)
from mer_jax.nn.fusion import PerceiverFusion
from mer_jax.nn.perceiver import Perceiver
from mer_jax.nn.stack import stack_unrolled_params

PERCEIVER = dict(num_latents=3, depth=2, cross_heads=1, latent_heads=2, mlp_dim=16, dropout=0.0)


def sequence(batch_size=3, length=7, width=8, real=(7, 4, 1), seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch_size, length, width)).astype(np.float32)
  mask = np.arange(length)[None] < np.asarray(real)[:, None]
  return x, mask


def init(module, *args, seed=0, **kwargs):
  """Params of `module` without compiling its initialisers (the RNG programs dominate a
  CPU test's time): shapes from `jax.eval_shape`, values drawn in numpy, LayerNorms at
  their initial scale 1 and bias 0."""
  shapes = jax.eval_shape(
      lambda: module.init({"params": jax.random.key(seed)}, *args, train=False,
                          **kwargs)["params"])
  rng = np.random.default_rng(seed)

  def fill(node):
    if "scale" in node:
      return {k: (np.ones if k == "scale" else np.zeros)(v.shape, np.float32)
              for k, v in node.items()}
    return {k: fill(v) if isinstance(v, dict) else
            (0.4 * rng.normal(size=v.shape)).astype(np.float32) for k, v in node.items()}

  return fill(shapes)


def with_random_norms(params, seed=1):
  """`params` with every LayerNorm's scale and bias drawn away from 1 and 0, so that a
  reference also checks where a norm's affine part is applied."""
  rng = np.random.default_rng(seed)

  def draw(path, a):
    if path[-1].key == "scale":
      return (1 + 0.5 * rng.normal(size=a.shape)).astype(np.float32)
    return (0.3 * rng.normal(size=a.shape)).astype(np.float32) if path[-1].key == "bias" \
        and path[-2].key.startswith("norm") else a

  return jax.tree_util.tree_map_with_path(draw, params)


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
  # Scanned layers: one array per parameter kind with a leading depth axis.
  assert sorted(params) == ["latents", "layers", "norm_out"]
  assert sorted(params["layers"]) == ["cross", "latent0"]
  chex.assert_shape(params["layers"]["cross"]["attn"]["query"]["kernel"], (2, 8, 1, 8))
  # The final LayerNorm normalises each output vector (unit scale, zero bias at init).
  np.testing.assert_allclose(out.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(out.std(-1), 1.0, atol=1e-2)


def test_shared_weights_use_one_set_of_blocks():
  x, mask = sequence(batch_size=1, length=3, real=(3,))
  params = jax.eval_shape(lambda: init(Perceiver(**PERCEIVER, share_weights=True), x, mask))
  # No depth axis: the one set of layer weights is applied by every layer.
  assert sorted(params) == ["latents", "layers_0", "norm_out"]
  chex.assert_shape(params["layers_0"]["cross"]["attn"]["query"]["kernel"], (8, 1, 8))


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
  apply = jax.jit(lambda p, key, train: module.apply({"params": p}, x, mask, train=train,
                                                     rngs={"dropout": key}),
                  static_argnums=2)
  a = apply(params, jax.random.key(3), False)
  b = apply(params, jax.random.key(4), False)
  c = apply(params, jax.random.key(3), True)
  chex.assert_trees_all_close(a, b)
  assert not np.allclose(a, c, atol=1e-3)


BACKBONE = dict(width=8, kernel_sizes=(3, 1, 1), num_latents=2, perceiver_depth=1,
                cross_heads=1, latent_heads=2, perceiver_mlp_dim=16, fusion_layers=1,
                fusion_heads=2, fusion_mlp_dim=16, mlp_layers=2)


@pytest.fixture(scope="module")
def backbone():
  """(module, params, batch) of one backbone with unequal modality lengths."""
  spec = tiny_spec(lengths=(6, 9, 4))
  batch = random_batch(spec, batch_size=3, real_lengths=([6, 2, 1], [9, 5, 3], [1, 4, 2]))
  module = PerceiverFusion(**BACKBONE)
  return module, init(module, batch), batch


@pytest.mark.slow
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


@pytest.mark.slow
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


# ------------------------------------------------------- attention width, scan, references


def np_layer_norm(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_dense(x, p):
  return x @ p["kernel"] + p.get("bias", 0.0)


def np_attention(queries, keys, p, mask=None):
  """Multi-head attention from the flax param layout: (B, Tq, D) x (B, Tk, E) -> (B, Tq, D)."""
  def project(x, q):
    out = np.einsum("bte,ehd->bthd", x, q["kernel"])
    return out + q["bias"] if "bias" in q else out
  q, k, v = project(queries, p["query"]), project(keys, p["key"]), project(keys, p["value"])
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(mask[:, None, None, :], logits, -1e30)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  h = np.einsum("bhqk,bkhd->bqhd", weights, v)
  return np.einsum("bqhd,hdo->bqo", h, p["out"]["kernel"]) + p["out"]["bias"]


def np_feed_forward(x, p, activation):
  h = np_dense(x, p["in"])
  if activation == "geglu":
    value, gate = np.split(h, 2, axis=-1)
    h = value * 0.5 * gate * (1 + scipy.special.erf(gate / np.sqrt(2)))
  else:
    h = np.maximum(h, 0.0)
  return np_dense(h, p["out"])


def np_perceiver(x, mask, p):
  """Pre-norm GEGLU Perceiver with scanned params (leading depth axis)."""
  x = np.where(mask[..., None], x, 0.0)
  h = np.broadcast_to(p["latents"], (x.shape[0],) + p["latents"].shape)
  layers = p["layers"]
  for i in range(jax.tree.leaves(layers)[0].shape[0]):
    layer = jax.tree.map(lambda a, i=i: a[i], layers)
    cross = layer["cross"]
    h = h + np_attention(np_layer_norm(h, cross["norm_q"]), np_layer_norm(x, cross["norm_k"]),
                         cross["attn"], mask)
    h = h + np_feed_forward(np_layer_norm(h, cross["norm_ff"]), cross["ff"], "geglu")
    latent = layer["latent0"]
    a = np_layer_norm(h, latent["norm_attn"])
    h = h + np_attention(a, a, latent["attn"])
    h = h + np_feed_forward(np_layer_norm(h, latent["norm_ff"]), latent["ff"], "geglu")
  return np_layer_norm(h.mean(1), p["norm_out"])


def np_conv_same(x, p):
  kernel = p["kernel"]  # (k, in, out)
  pad = (kernel.shape[0] - 1) // 2
  padded = np.pad(x, ((0, 0), (pad, kernel.shape[0] - 1 - pad), (0, 0)))
  out = sum(padded[:, j:j + x.shape[1]] @ kernel[j] for j in range(kernel.shape[0]))
  return out + p.get("bias", 0.0)


def np_backbone(batch, p, *, absent_modality):
  """The official CMAD backbone (bias-free projections and Perceiver q/k/v, post-norm ReLU
  fusion, Linear -> ReLU fused layer) computed independently in numpy (float64)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  tokens, present = [], []
  for index, name in enumerate(("text", "audio", "vision")):
    mask = batch[f"{name}_mask"] & batch["modality_mask"][:, index:index + 1]
    x = np.where(mask[..., None], batch[name], 0.0)
    x = np.where(mask[..., None], np_conv_same(x, p[f"proj_{name}"]["conv"]), 0.0)
    own = jax.tree.map(lambda a, i=index: a[i], p["perceivers"])
    tokens.append(np_perceiver(x, mask, own))
    present.append(mask.any(1))
  h, present = np.stack(tokens, 1), np.stack(present, 1)
  key_mask = present if absent_modality == "mask" else None
  layers = p["fusion"]["layers"]
  for i in range(jax.tree.leaves(layers)[0].shape[0]):
    layer = jax.tree.map(lambda a, i=i: a[i], layers)
    h = np_layer_norm(h + np_attention(h, h, layer["attn"], key_mask), layer["norm_attn"])
    h = np_layer_norm(h + np_feed_forward(h, layer["ff"], "relu"), layer["norm_ff"])
  if absent_modality == "mask":
    h = np.where(present[..., None], h, 0.0)
  return np.maximum(np_dense(h.reshape(len(h), -1), p["mlp0"]), 0.0)


OFFICIAL = dict(width=8, kernel_sizes=(3, 1, 1), projection_bias=False, num_latents=3,
                perceiver_depth=2, cross_heads=2, cross_head_dim=5, latent_heads=2,
                latent_head_dim=5, perceiver_mlp_dim=12, perceiver_qkv_bias=False,
                fusion_layers=2, fusion_heads=2, fusion_mlp_dim=20, fusion_activation="relu",
                fusion_norm="post", fusion_dropout=0.1, mlp_layers=1, fused_activation="relu",
                fused_dropout=0.3, activate_fused=True, position_embedding=False,
                modality_embedding=False)


@pytest.fixture(scope="module")
def official():
  """(module, params, batch) of the official-architecture backbone, sample 2 without audio."""
  spec = tiny_spec(lengths=(6, 9, 4))
  batch = random_batch(spec, batch_size=3, real_lengths=([6, 2, 1], [9, 5, 3], [1, 4, 2]))
  batch["modality_mask"] = np.array([[True, True, True], [True, True, False],
                                     [True, False, True]])
  module = PerceiverFusion(**OFFICIAL)
  return module, init(module, batch), batch


@pytest.mark.parametrize("absent_modality", ["zero", "mask"])
def test_backbone_forward_matches_a_numpy_reference(official, absent_modality):
  module, params, batch = official
  module = module.clone(absent_modality=absent_modality)
  # The Perceivers' key norms are split into one standardisation of the frames and each
  # layer's scale and bias folded into its kernels: drawn norms check both.
  params = with_random_norms(params)
  out = jax.jit(lambda p, b: module.apply({"params": p}, b, train=False))(params, batch)
  np.testing.assert_allclose(out["fused"], np_backbone(batch, params,
                                                       absent_modality=absent_modality),
                             rtol=2e-4, atol=2e-5)
  # The inner width (2 heads x 5) is independent of D = 8; the Perceiver has no q/k/v bias.
  attn = params["perceivers"]["layers"]["cross"]["attn"]
  chex.assert_shape(attn["query"]["kernel"], (3, 2, 8, 2, 5))
  assert "bias" not in attn["query"] and "bias" in attn["out"]
  assert "pos_text" not in params and "modality_embedding" not in params


@pytest.mark.parametrize("absent_modality,embeddings", [("zero", False), ("mask", True)])
@pytest.mark.slow
def test_backbone_under_several_masks_equals_one_forward_per_masked_batch(
    official, absent_modality, embeddings):
  """`scenario_modality_mask`: every modality encoded once, an absent one once per call;
  each of the 7 combinations as the forward on its `apply_modality_mask`ed batch, and
  (official architecture) as numpy."""
  module, params, batch = official
  module = module.clone(absent_modality=absent_modality, position_embedding=embeddings,
                        modality_embedding=embeddings)
  if embeddings:
    params = init(module, batch)
  combinations = np.stack([missing.fixed_modality_mask(3, c) for c in range(7)], axis=1)
  apply = jax.jit(lambda p, b, **kw: module.apply({"params": p}, b, train=False, **kw))
  out = jax.device_get(apply(params, batch, scenario_modality_mask=combinations))
  chex.assert_shape(out["fused"], (3 * 7, 8))
  fused = out["fused"].reshape(3, 7, 8)
  forward = jax.jit(lambda p, b: module.apply({"params": p}, b, train=False)["fused"])
  for index in range(7):
    masked = missing.apply_modality_mask(batch, combinations[:, index])
    np.testing.assert_allclose(fused[:, index], forward(params, masked), rtol=1e-5, atol=1e-6,
                               err_msg=f"combination {index}")
    if not embeddings:
      np.testing.assert_allclose(fused[:, index],
                                 np_backbone(jax.device_get(masked), params,
                                             absent_modality=absent_modality),
                                 rtol=2e-4, atol=2e-5)
  assert not np.allclose(fused[:, 0], fused[:, 6], atol=1e-4)  # L alone vs LAV


@pytest.mark.slow
def test_absent_modality_modes(official):
  module, params, batch = official
  for mode in ("zero", "mask"):
    apply = jax.jit(lambda b, m=mode: module.clone(absent_modality=m).apply(
        {"params": params}, b, train=False))
    a = apply(batch)
    # An absent modality's stored features never reach the output...
    audio, vision = batch["audio"].copy(), batch["vision"].copy()
    audio[2] += 5.0  # sample 2 has no audio, sample 1 no vision
    vision[1] -= 3.0
    b = apply(dict(batch, audio=audio, vision=vision))
    chex.assert_trees_all_close(a["fused"], b["fused"], atol=1e-5)
    # ...but only "mask" removes its (constant) token from the fusion.
    zeroed = np.asarray(a["tokens"][2, 1])
    assert np.allclose(zeroed, 0.0) == (mode == "mask")


def test_attention_inner_width_matches_numpy():
  rng = np.random.default_rng(5)
  queries = rng.normal(size=(2, 3, 8)).astype(np.float32)
  keys = rng.normal(size=(2, 5, 6)).astype(np.float32)
  key_mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  mask = attention_mask(np.ones((2, 3), bool), key_mask)
  for qkv_bias in (True, False):
    module = MultiHeadAttention(num_heads=3, head_dim=4, qkv_bias=qkv_bias)
    params = init(module, queries, keys, mask=mask)
    chex.assert_shape(params["key"]["kernel"], (6, 3, 4))
    assert ("bias" in params["query"]) == qkv_bias
    got = module.apply({"params": params}, queries, keys, mask=mask, train=False)
    want = np_attention(queries.astype(np.float64), keys.astype(np.float64),
                        jax.tree.map(lambda a: np.asarray(a, np.float64), params), key_mask)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)



@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.slow
def test_absorbed_and_projected_attention_agree_with_numpy_and_in_gradients(qkv_bias):
  rng = np.random.default_rng(7)
  queries = rng.normal(size=(2, 3, 8)).astype(np.float32)  # 3 queries, head dim 6
  keys = rng.normal(size=(2, 11, 5)).astype(np.float32)
  values = rng.normal(size=(2, 11, 5)).astype(np.float32)
  key_mask = np.array([[1] * 4 + [0] * 7, [0] * 11], bool)  # sample 1: no real key
  mask = attention_mask(np.ones((2, 3), bool), key_mask)
  module = MultiHeadAttention(num_heads=2, head_dim=6, qkv_bias=qkv_bias, dropout=0.3)
  params = init(module, queries, keys, mask=mask)
  if qkv_bias:  # non-zero biases, so that q . bk and bv are exercised
    params = jax.tree.map(lambda a: a + 0.1 * jnp.arange(a.size).reshape(a.shape) / a.size,
                          params)
  assert absorbed_projections_are_cheaper(3, 11, 5, 5, 2, 6)
  assert not absorbed_projections_are_cheaper(11, 11, 16, 16, 2, 6)  # self-attention

  def apply(absorb, p, train, v=values):
    return module.clone(absorb=absorb).apply({"params": p}, queries, keys, v, mask=mask,
                                             train=train, rngs={"dropout": jax.random.key(3)})

  projected, absorbed = apply(False, params, False), apply(True, params, False)
  np.testing.assert_allclose(absorbed, projected, rtol=1e-5, atol=1e-5)
  np64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  np.testing.assert_allclose(
      apply(True, params, False, keys),
      np_attention(queries.astype(np.float64), keys.astype(np.float64), np64, key_mask),
      rtol=1e-4, atol=1e-5)
  # Training: the same dropout mask on the same weights; gradients of every param equal.
  np.testing.assert_allclose(apply(True, params, True), apply(False, params, True),
                             rtol=1e-5, atol=1e-5)
  loss = lambda absorb: jax.grad(lambda p: jnp.sum(apply(absorb, p, True) ** 2))(params)
  absorbed_grads, projected_grads = loss(True), loss(False)
  chex.assert_trees_all_close(absorbed_grads, projected_grads, rtol=1e-4, atol=1e-5)
  if qkv_bias:  # q . bk shifts all logits of a query alike: no gradient reaches bk
    np.testing.assert_array_equal(absorbed_grads["key"]["bias"], 0.0)
    np.testing.assert_allclose(projected_grads["key"]["bias"], 0.0, atol=1e-5)
    assert np.abs(absorbed_grads["value"]["bias"]).min() > 1e-3


@pytest.mark.parametrize("case", ["masked", "no mask", "keys are values"])
def test_absorbed_attention_backward_equals_autodiff_of_its_formula(case):
  """The written-out backward of `absorbed_attention` against JAX's own transposition of
  the same formula: a query row with no real key (uniform weights, no gradient through
  the masked logits), a mask per head, no mask, and keys that are the values (the
  Perceiver's frames, whose two gradients add)."""
  rng = np.random.default_rng(5)
  queries = rng.normal(size=(2, 3, 2, 5)).astype(np.float32)  # (B, Tq, H, E)
  keys = rng.normal(size=(2, 7, 5)).astype(np.float32)
  values = keys if case == "keys are values" else rng.normal(size=(2, 7, 4)).astype(
      np.float32)
  mask = rng.random((2, 3, 2, 7)) < 0.6
  mask[1, 0] = False  # query 0 of sample 1: no real key in either head
  mask[0, :, :, 0] = True
  mask = None if case == "no mask" else mask

  def formula(queries, keys, values):
    weights = masked_softmax(jnp.einsum("bqhe,bke->bqhk", queries, keys), mask)
    return jnp.einsum("bqhk,bke->bqhe", weights, values)

  cotangent = rng.normal(size=(2, 3, 2, values.shape[-1])).astype(np.float32)
  if case == "keys are values":
    got, vjp = jax.vjp(lambda q, f: absorbed_attention(q, f, f, mask), queries, keys)
    want, want_vjp = jax.vjp(lambda q, f: formula(q, f, f), queries, keys)
  else:
    got, vjp = jax.vjp(lambda *a: absorbed_attention(*a, mask), queries, keys, values)
    want, want_vjp = jax.vjp(formula, queries, keys, values)
  chex.assert_shape(got, (2, 3, 2, values.shape[-1]))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  for grad, want_grad in zip(vjp(cotangent), want_vjp(cotangent), strict=True):
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-5)
    assert np.abs(grad).max() > 1e-2
  if mask is not None:  # the all-masked row: uniform weights, its queries get no gradient
    np.testing.assert_allclose(got[1, 0], np.broadcast_to(values[1].mean(0), (2, values.shape[-1])),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(vjp(cotangent)[0][1, 0], 0.0)


def test_exact_gelu_is_the_erf_form_in_values_and_gradients():
  x = np.concatenate([np.linspace(-9, 9, 721), [-30.0, 30.0, 0.0]]).astype(np.float32)
  want = 0.5 * x.astype(np.float64) * (1 + scipy.special.erf(x / np.sqrt(2.0)))
  # In the negative tail 1 + erf cancels: the error is |x| float32 epsilons at most, as
  # in PyTorch's F.gelu (the same form); elsewhere float32 rounding.
  error = np.abs(np.asarray(exact_gelu(x), np.float64) - want)
  assert np.all(error <= 1e-6 * np.abs(want) + np.abs(x) * np.finfo(np.float32).eps), \
      error.max()
  np.testing.assert_allclose(exact_gelu(x), jax.nn.gelu(x, approximate=False), rtol=1e-5,
                             atol=1.1e-6)
  # d/dx x Phi(x) = Phi(x) + x phi(x)
  cdf = 0.5 * (1 + scipy.special.erf(x / np.sqrt(2.0)))
  want_grad = cdf + x * np.exp(-0.5 * x.astype(np.float64) ** 2) / np.sqrt(2 * np.pi)
  np.testing.assert_allclose(jax.vmap(jax.grad(exact_gelu))(x), want_grad, rtol=1e-5,
                             atol=1e-6)


def test_key_norm_folded_into_the_absorbed_kernels_matches_numpy_and_in_gradients():
  rng = np.random.default_rng(11)
  queries = rng.normal(size=(2, 3, 8)).astype(np.float32)
  keys = (2 + 3 * rng.normal(size=(2, 11, 5))).astype(np.float32)  # far from standardised
  key_mask = np.array([[1] * 6 + [0] * 5, [0] * 11], bool)  # sample 1: no real key
  layer = CrossAttentionLayer(num_heads=2, mlp_dim=4, head_dim=6, use_feedforward=False)
  params = with_random_norms(init(layer, queries, keys, key_mask=key_mask))
  standardized_keys = Standardize().apply({}, keys)
  # The split the fold rests on: a LayerNorm is its standardisation, scaled and shifted.
  np.testing.assert_allclose(
      standardized_keys * params["norm_k"]["scale"] + params["norm_k"]["bias"],
      flax.linen.LayerNorm().apply({"params": params["norm_k"]}, keys), rtol=1e-5, atol=1e-5)
  np64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  want = queries + np_attention(np_layer_norm(queries.astype(np.float64), np64["norm_q"]),
                                np_layer_norm(keys.astype(np.float64), np64["norm_k"]),
                                np64["attn"], key_mask)
  assert absorbed_projections_are_cheaper(3, 11, 5, 5, 2, 6)  # the layer folds the norm
  got = layer.apply({"params": params}, queries, keys, key_mask=key_mask, train=False)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  standardized = layer.clone(standardized_keys=True).apply(
      {"params": params}, queries, standardized_keys, key_mask=key_mask, train=False)
  np.testing.assert_allclose(standardized, got, rtol=1e-5, atol=1e-5)

  # The fold against the norm applied to the keys, in the values and in the gradients of
  # every param, the norm's scale and bias included.
  attention = MultiHeadAttention(num_heads=2, head_dim=6, qkv_bias=True)
  mask = attention_mask(np.ones((2, 3), bool), key_mask)

  def loss(absorb, p, norm):
    out = attention.clone(absorb=absorb).apply({"params": p}, queries, standardized_keys,
                                               mask=mask, train=False, key_norm=norm)
    return jnp.sum(out ** 2 * jnp.arange(out.size).reshape(out.shape) / out.size)

  attn, norm = params["attn"], params["norm_k"]
  folded = jax.value_and_grad(functools.partial(loss, True), argnums=(0, 1))(attn, norm)
  applied = jax.value_and_grad(functools.partial(loss, False), argnums=(0, 1))(attn, norm)
  chex.assert_trees_all_close(folded, applied, rtol=1e-4, atol=1e-5)
  assert np.abs(folded[1][1]["bias"]).max() > 1e-3  # the norm's bias gets a gradient


@pytest.mark.parametrize("kernel_size", [1, 2, 3, 4])
def test_modality_projection_equals_a_same_convolution(kernel_size):
  rng = np.random.default_rng(kernel_size)
  x = rng.normal(size=(2, 7, 5)).astype(np.float32)
  frame_mask = np.array([[1] * 7, [1] * 4 + [0] * 3], bool)
  module = ModalityProjection(6, kernel_size)
  params = module.init(jax.random.key(0), x, frame_mask)["params"]
  params = jax.tree.map(lambda a: a + 0.1, params)  # a non-zero bias
  chex.assert_shape(params["conv"]["kernel"], (kernel_size, 5, 6))
  conv = flax.linen.Conv(6, (kernel_size,), padding="SAME")

  def reference(p, x):  # nn.Conv itself (lax's convolution) with the same params
    zeroed = jnp.where(frame_mask[..., None], x, 0.0)
    return jnp.where(frame_mask[..., None], conv.apply({"params": p["conv"]}, zeroed), 0.0)

  got = module.apply({"params": params}, x, frame_mask)
  np.testing.assert_allclose(got, reference(params, x), rtol=1e-5, atol=1e-5)
  if kernel_size % 2:
    np.testing.assert_allclose(got[0], np_conv_same(x[:1], params["conv"])[0], rtol=1e-5,
                               atol=1e-5)
  loss = lambda f: jax.grad(lambda p, x: jnp.sum(jnp.sin(f(p, x))), argnums=(0, 1))(params, x)
  chex.assert_trees_all_close(
      loss(lambda p, x: module.apply({"params": p}, x, frame_mask)), loss(reference),
      rtol=1e-4, atol=1e-5)

def _unrolled(params, depth, name="layers", axis=0):
  """Scanned params (`name` with the layer axis at `axis`) -> the unrolled `name_{i}`."""
  out = {k: v for k, v in params.items() if k != name}
  for i in range(depth):
    out[f"{name}_{i}"] = jax.tree.map(lambda a, i=i: jnp.take(a, i, axis=axis), params[name])
  return out


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.slow
def test_scanned_transformer_encoder_equals_the_unrolled_one(norm):
  x, mask = sequence()
  scanned = TransformerEncoder(3, 2, 16, norm=norm, activation="relu", head_dim=3)
  params = init(scanned, x, mask)
  chex.assert_shape(params["layers"]["attn"]["query"]["kernel"], (3, 8, 2, 3))
  unrolled = _unrolled(params, 3)
  apply = lambda m, p: m.apply({"params": p}, x, mask, train=False)
  chex.assert_trees_all_close(jax.jit(functools.partial(apply, scanned))(params),
                              jax.jit(functools.partial(apply, scanned.clone(scan=False)))(
                                  unrolled), atol=1e-5)
  chex.assert_trees_all_close(stack_unrolled_params(unrolled, 3), params)
  if norm == "post":  # with remat: the same values and gradients
    loss = lambda m: jax.jit(jax.value_and_grad(lambda p: jnp.sum(apply(m, p) ** 2)))(params)
    chex.assert_trees_all_close(loss(scanned), loss(scanned.clone(remat=True)), atol=1e-5)


@pytest.mark.slow
def test_scanned_perceiver_and_backbone_equal_the_unrolled_ones(official):
  x, mask = sequence()
  scanned = Perceiver(**PERCEIVER)
  params = init(scanned, x, mask)
  apply = lambda m, p: m.apply({"params": p}, x, mask, train=False)
  chex.assert_trees_all_close(
      jax.jit(functools.partial(apply, scanned))(params),
      jax.jit(functools.partial(apply, scanned.clone(scan=False)))(_unrolled(params, 2)),
      atol=1e-5)
  module, params, batch = official
  # the vmapped Perceivers' depth axis is axis 1, under the modality axis
  unrolled = dict(params, fusion=_unrolled(params["fusion"], 2),
                  perceivers=_unrolled(params["perceivers"], 2, axis=1))
  apply = lambda m, p: m.apply({"params": p}, batch, train=False)
  chex.assert_trees_all_close(
      jax.jit(functools.partial(apply, module))(params),
      jax.jit(functools.partial(apply, module.clone(scan=False)))(unrolled), atol=1e-5)
