"""Tests for the reconstruction-family blocks: flows, Gaussian heads (VIB, UMC, UCMI),
RCAB and masked pooling."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mer_jax.nn.flows import AffineCoupling, ClassGaussianPrior, NormalizingFlow, flow_nll
from mer_jax.nn.gaussian import VIB, GaussianHead, UncertaintyModule, init_class_anchors
from mer_jax.nn.pooling import masked_max, masked_mean
from mer_jax.nn.reconstruction import RCAB, ChannelAttention1D, RCABStack


def _perturb(variables, key, scale=0.5):
  """Adds noise to every parameter so that zero-initialised layers are not identities."""
  leaves, treedef = jax.tree.flatten(variables)
  keys = jax.random.split(key, len(leaves))
  noisy = [leaf + scale * jax.random.normal(k, leaf.shape, leaf.dtype)
           for leaf, k in zip(leaves, keys, strict=True)]
  return jax.tree.unflatten(treedef, noisy)


def _softplus(x):
  return np.logaddexp(0.0, x)


# ----------------------------------------------------------------------------- pooling


def test_masked_mean_and_max_match_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 6, 3)).astype(np.float32)
  mask = rng.random((4, 6)) < 0.5
  mask[0] = False  # an empty sample
  mask[1] = True
  mean = masked_mean(jnp.asarray(x), jnp.asarray(mask))
  maximum = masked_max(jnp.asarray(x), jnp.asarray(mask))
  chex.assert_shape([mean, maximum], (4, 3))
  for b in range(4):
    rows = x[b][mask[b]]
    expected_mean = rows.mean(axis=0) if len(rows) else np.zeros(3)
    expected_max = rows.max(axis=0) if len(rows) else np.zeros(3)
    np.testing.assert_allclose(mean[b], expected_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(maximum[b], expected_max, rtol=1e-6, atol=1e-6)


def test_masked_pooling_ignores_nonfinite_padding_and_has_finite_gradients():
  x = jnp.array([[[1.0, 2.0], [jnp.inf, jnp.nan]], [[jnp.nan, 3.0], [4.0, 5.0]]])
  mask = jnp.array([[True, False], [False, False]])
  np.testing.assert_allclose(masked_mean(x, mask), [[1.0, 2.0], [0.0, 0.0]])
  np.testing.assert_allclose(masked_max(x, mask), [[1.0, 2.0], [0.0, 0.0]])
  finite_x = jnp.where(jnp.isfinite(x), x, 0.0)
  for pool in (masked_mean, masked_max):
    grad = jax.grad(lambda v, pool=pool: jnp.sum(pool(v, mask)))(finite_x)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[1], 0.0)


def test_masked_mean_leading_batch_dims():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
  mask = rng.random((2, 3, 5)) < 0.6
  out = masked_mean(jnp.asarray(x), jnp.asarray(mask))
  chex.assert_shape(out, (2, 3, 4))
  weights = mask[..., None].astype(np.float32)
  expected = (x * weights).sum(-2) / np.maximum(weights.sum(-2), 1.0)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- flows

FEATURES = 6


@pytest.fixture(scope="module")
def flow_and_vars():
  flow = NormalizingFlow(features=FEATURES, num_layers=4, hidden=16)
  x = jnp.zeros((2, 5, FEATURES))
  variables = flow.init(jax.random.key(0), x)
  # A moderate perturbation: large random conditioners make float32 round trips
  # ill-conditioned (values in the hundreds), which would test float32, not the flow.
  return flow, _perturb(variables, jax.random.key(1), scale=0.1)


def test_coupling_is_identity_at_init_and_keeps_its_half():
  coupling = AffineCoupling(features=FEATURES, hidden=8)
  x = jax.random.normal(jax.random.key(2), (3, 4, FEATURES))
  variables = coupling.init(jax.random.key(3), x, 1)
  z, logdet = coupling.apply(variables, x, 1)
  np.testing.assert_array_equal(z, x)
  np.testing.assert_array_equal(logdet, 0.0)
  z, logdet = coupling.apply(_perturb(variables, jax.random.key(4)), x, 1)
  chex.assert_shape(logdet, (3,))
  np.testing.assert_array_equal(z[..., 1::2], x[..., 1::2])  # parity 1 keeps odd channels
  assert np.max(np.abs(z[..., 0::2] - x[..., 0::2])) > 1e-2


@pytest.mark.slow
def test_flow_inverse_round_trip(flow_and_vars):
  flow, variables = flow_and_vars
  x = jax.random.normal(jax.random.key(5), (2, 5, FEATURES))
  mask = jnp.array([[True] * 5, [True, True, True, False, False]])
  z, logdet = flow.apply(variables, x, mask)
  chex.assert_shape(z, (2, 5, FEATURES))
  chex.assert_shape(logdet, (2,))
  assert np.max(np.abs(z - x)) > 0.1  # the perturbed flow is far from the identity
  x_back = flow.apply(variables, z, mask, method=NormalizingFlow.inverse)
  np.testing.assert_allclose(x_back, x, atol=1e-5)
  z_back, _ = flow.apply(variables, flow.apply(variables, z, method=NormalizingFlow.inverse))
  np.testing.assert_allclose(z_back, z, atol=1e-5)


def test_forward_and_inverse_share_parameters():
  flow = NormalizingFlow(features=FEATURES, num_layers=2, hidden=8)
  x = jnp.zeros((1, 3, FEATURES))
  from_forward = flow.init(jax.random.key(0), x)
  from_inverse = flow.init(jax.random.key(0), x, method=NormalizingFlow.inverse)
  chex.assert_trees_all_equal_shapes(from_forward, from_inverse)
  # One array per parameter kind with a leading layer axis (nn.scan).
  chex.assert_shape(from_forward["params"]["couplings"]["conditioner_hidden"]["kernel"],
                    (2, FEATURES, 8))
  chex.assert_shape(from_forward["params"]["couplings"]["conditioner_out"]["bias"],
                    (2, 2 * FEATURES))


def test_logdet_matches_jacobian_single_frame(flow_and_vars):
  flow, variables = flow_and_vars
  v = jax.random.normal(jax.random.key(6), (FEATURES,))
  f = lambda u: flow.apply(variables, u.reshape(1, 1, FEATURES))[0].reshape(FEATURES)
  jacobian = np.asarray(jax.jacfwd(f)(v), np.float64)
  _, expected = np.linalg.slogdet(jacobian)
  _, logdet = flow.apply(variables, v.reshape(1, 1, FEATURES))
  np.testing.assert_allclose(logdet[0], expected, rtol=1e-4, atol=1e-4)
  assert abs(expected) > 0.1


def test_logdet_matches_jacobian_with_padding(flow_and_vars):
  flow, variables = flow_and_vars
  num_frames = 4
  x = jax.random.normal(jax.random.key(7), (1, num_frames, FEATURES))
  mask = jnp.array([[True, True, True, False]])
  f = lambda u: flow.apply(variables, u.reshape(1, num_frames, FEATURES), mask)[0].reshape(-1)
  jacobian = np.asarray(jax.jacfwd(f)(x.reshape(-1)), np.float64)
  _, expected = np.linalg.slogdet(jacobian)
  z, logdet = flow.apply(variables, x, mask)
  np.testing.assert_allclose(logdet[0], expected, rtol=1e-4, atol=1e-4)
  # The padded frame passes through and its Jacobian block is the identity.
  np.testing.assert_array_equal(z[0, 3], x[0, 3])
  padded = slice(3 * FEATURES, 4 * FEATURES)
  np.testing.assert_allclose(jacobian[padded, padded], np.eye(FEATURES), atol=1e-6)
  # Real frames do not depend on one another (the flow is per frame).
  np.testing.assert_allclose(jacobian[:FEATURES, FEATURES:], 0.0, atol=1e-7)
  # logdet equals the sum of per-frame log-determinants of the real frames.
  per_frame = [flow.apply(variables, x[:, t:t + 1])[1][0] for t in range(3)]
  np.testing.assert_allclose(logdet[0], sum(per_frame), rtol=1e-5, atol=1e-5)


def test_padded_frame_content_does_not_change_real_latents(flow_and_vars):
  flow, variables = flow_and_vars
  x = jax.random.normal(jax.random.key(8), (2, 5, FEATURES))
  mask = jnp.array([[True] * 5, [True, True, False, False, False]])
  changed = x.at[1, 2:].set(100.0)
  z1, ld1 = flow.apply(variables, x, mask)
  z2, ld2 = flow.apply(variables, changed, mask)
  np.testing.assert_array_equal(z1[:, :2], z2[:, :2])
  np.testing.assert_array_equal(z1[0], z2[0])
  np.testing.assert_array_equal(ld1, ld2)


def test_flow_nll_matches_numpy(flow_and_vars):
  flow, variables = flow_and_vars
  x = jax.random.normal(jax.random.key(9), (3, 5, FEATURES))
  mask = np.array([[True] * 5, [True, False, True, False, False], [False] * 5])
  z, logdet = flow.apply(variables, x, jnp.asarray(mask))
  nll = flow_nll(z, logdet, jnp.asarray(mask))
  nll_per_dim = flow_nll(z, logdet, jnp.asarray(mask), per_dim=True)
  chex.assert_shape([nll, nll_per_dim], (3,))
  z_np, logdet_np = np.asarray(z, np.float64), np.asarray(logdet, np.float64)
  for b in range(3):
    real = z_np[b][mask[b]]
    expected = 0.5 * np.sum(real**2) + 0.5 * real.size * math.log(2 * math.pi) - logdet_np[b]
    np.testing.assert_allclose(nll[b], expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(nll_per_dim[b], expected / max(real.size, 1), rtol=1e-5,
                               atol=1e-5)
  assert logdet_np[2] == 0.0 and nll[2] == 0.0
  full = flow_nll(z, logdet)
  expected_full = 0.5 * np.sum(z_np**2 + math.log(2 * math.pi), axis=(1, 2)) - logdet_np
  np.testing.assert_allclose(full, expected_full, rtol=1e-5, atol=1e-4)


def test_flow_jit_vmap_and_finite_gradients(flow_and_vars):
  flow, variables = flow_and_vars
  x = jax.random.normal(jax.random.key(10), (2, 5, FEATURES))
  mask = jnp.array([[True] * 5, [False] * 5])

  def loss(params):
    z, logdet = flow.apply({"params": params}, x, mask)
    return jnp.mean(flow_nll(z, logdet, mask, per_dim=True))

  grads = jax.jit(jax.grad(loss))(variables["params"])
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  batched = jax.vmap(lambda xi, mi: flow.apply(variables, xi, mi))(x[:, None], mask[:, None])
  direct = flow.apply(variables, x, mask)
  np.testing.assert_allclose(batched[0][:, 0], direct[0], atol=1e-6)
  np.testing.assert_allclose(batched[1][:, 0], direct[1], atol=1e-5)


def test_flow_rejects_wrong_width():
  flow = NormalizingFlow(features=4, num_layers=2, hidden=8)
  with pytest.raises(ValueError, match="features=4"):
    flow.init(jax.random.key(0), jnp.zeros((1, 2, 5)))


def _unrolled_flow(params, x, mask, *, inverse=False):
  """The flow as a Python loop of `AffineCoupling`s, layer i with slice i of the stacked
  parameters and parity i % 2 (what the scanned stack must equal)."""
  stacked = params["couplings"]
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  coupling = AffineCoupling(FEATURES, 16)
  logdet = jnp.zeros(x.shape[:-2])
  order = range(num_layers - 1, -1, -1) if inverse else range(num_layers)
  for i in order:
    layer = {"params": jax.tree.map(lambda p, i=i: p[i], stacked)}
    if inverse:
      x = coupling.apply(layer, x, i % 2, mask, method=AffineCoupling.inverse)
    else:
      x, layer_logdet = coupling.apply(layer, x, i % 2, mask)
      logdet = logdet + layer_logdet
  return x, logdet


@pytest.mark.parametrize("remat", [False, True])
@pytest.mark.slow
def test_scanned_flow_equals_the_unrolled_layers(flow_and_vars, remat):
  """nn.scan (and nn.remat) change neither values nor gradients."""
  _, variables = flow_and_vars
  flow = NormalizingFlow(features=FEATURES, num_layers=4, hidden=16, remat=remat)
  x = jax.random.normal(jax.random.key(40), (2, 5, FEATURES))
  mask = jnp.array([[True] * 5, [True, False, True, True, False]])
  z, logdet = flow.apply(variables, x, mask)
  z_ref, logdet_ref = _unrolled_flow(variables["params"], x, mask)
  np.testing.assert_allclose(z, z_ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(logdet, logdet_ref, rtol=1e-6, atol=1e-5)
  x_back = flow.apply(variables, z, mask, method=NormalizingFlow.inverse)
  np.testing.assert_allclose(x_back, _unrolled_flow(variables["params"], z, mask,
                                                    inverse=True)[0], rtol=1e-6, atol=1e-6)

  def loss(params, apply):
    out, ld = apply(params)
    return jnp.sum(out ** 2) - jnp.sum(ld)

  grads = jax.grad(loss)(variables["params"], lambda p: flow.apply({"params": p}, x, mask))
  grads_ref = jax.grad(loss)(variables["params"], lambda p: _unrolled_flow(p, x, mask))
  chex.assert_trees_all_close(grads, grads_ref, rtol=1e-5, atol=1e-5)


def test_flow_nll_with_a_gaussian_prior_matches_numpy(flow_and_vars):
  """flow_nll(mean, log_std) against the closed-form diagonal-Gaussian log-density."""
  flow, variables = flow_and_vars
  x = jax.random.normal(jax.random.key(41), (3, 5, FEATURES))
  mask = np.array([[True] * 5, [True, False, True, False, False], [False] * 5])
  rng = np.random.default_rng(3)
  mean = rng.normal(size=(3, 1, FEATURES)).astype(np.float32)
  log_std = rng.normal(scale=0.5, size=(3, 1, FEATURES)).astype(np.float32)
  z, logdet = flow.apply(variables, x, jnp.asarray(mask))
  nll = flow_nll(z, logdet, jnp.asarray(mask), mean=mean, log_std=log_std, per_dim=True)
  z_np, logdet_np = np.asarray(z, np.float64), np.asarray(logdet, np.float64)
  for b in range(3):
    real = z_np[b][mask[b]]
    std = np.exp(log_std[b, 0].astype(np.float64))
    log_p = -0.5 * np.log(2 * np.pi) - np.log(std) - 0.5 * ((real - mean[b, 0]) / std) ** 2
    expected = (-log_p.sum() - logdet_np[b]) / max(real.size, 1)
    np.testing.assert_allclose(nll[b], expected, rtol=1e-5, atol=1e-5)
  # mean = 0, log_std = 0 is the standard normal of the default.
  np.testing.assert_allclose(
      flow_nll(z, logdet, jnp.asarray(mask), mean=np.zeros_like(mean),
               log_std=np.zeros_like(log_std)), flow_nll(z, logdet, jnp.asarray(mask)),
      rtol=1e-6)


def test_class_gaussian_prior_starts_standard_normal():
  prior = ClassGaussianPrior(num_classes=3, features=FEATURES)
  variables = prior.init(jax.random.key(42))
  mean, log_std = prior.apply(variables)
  chex.assert_shape([mean, log_std], (3, FEATURES))
  np.testing.assert_array_equal(mean, 0.0)
  np.testing.assert_array_equal(log_std, 0.0)


# --------------------------------------------------------------------------------- VIB


def test_vib_shapes_sigma_formula_and_eval_mean():
  vib = VIB(features=3)
  x = jax.random.normal(jax.random.key(11), (4, 5))
  variables = vib.init(jax.random.key(12), x, train=False)
  z, mu, sigma = vib.apply(variables, x, train=False)
  chex.assert_shape([z, mu, sigma], (4, 3))
  p = jax.tree.map(np.asarray, variables["params"])
  x_np = np.asarray(x)
  expected_mu = x_np @ p["mu"]["kernel"] + p["mu"]["bias"]
  expected_sigma = _softplus(x_np @ p["sigma"]["kernel"] + p["sigma"]["bias"] - 5.0)
  np.testing.assert_allclose(mu, expected_mu, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(z, mu)


def test_vib_training_sample_statistics():
  vib = VIB(features=2)
  num_samples = 20000
  row = jax.random.normal(jax.random.key(13), (1, 4))
  x = jnp.repeat(row, num_samples, axis=0)
  variables = vib.init(jax.random.key(14), row, train=False)
  # Make sigma large enough to measure comfortably: shift its bias.
  variables["params"]["sigma"]["bias"] = variables["params"]["sigma"]["bias"] + 5.0
  z, mu, sigma = vib.apply(variables, x, train=True, rngs={"dropout": jax.random.key(15)})
  standardized = np.asarray((z - mu) / sigma)
  tolerance = 4.0 / math.sqrt(num_samples)
  np.testing.assert_allclose(standardized.mean(0), 0.0, atol=tolerance)
  np.testing.assert_allclose(standardized.var(0), 1.0, atol=6 * tolerance)
  np.testing.assert_allclose(np.asarray(z).mean(0), mu[0], atol=tolerance * float(sigma.max()))
  np.testing.assert_allclose(np.asarray(z).std(0), sigma[0], rtol=0.05)
  # The same key gives the same sample, another key another one.
  np.testing.assert_array_equal(
      vib.apply(variables, x, train=True, rngs={"dropout": jax.random.key(15)})[0], z)
  other, _, _ = vib.apply(variables, x, train=True, rngs={"dropout": jax.random.key(16)})
  assert np.max(np.abs(other - z)) > 1e-3


# --------------------------------------------------------------------------------- UMC


@pytest.fixture(scope="module")
def umc_and_vars():
  umc = UncertaintyModule(embed_dim=5, num_heads=2, mlp_dim=16)
  x = jnp.zeros((3, 6, 8))
  variables = umc.init(jax.random.key(17), x, jnp.ones((3, 6), bool), train=False)
  return umc, variables


@pytest.mark.slow
def test_umc_shapes_and_positive_std(umc_and_vars):
  umc, variables = umc_and_vars
  x = jax.random.normal(jax.random.key(18), (3, 6, 8))
  mask = jnp.array([[True] * 6, [True] * 3 + [False] * 3, [True] + [False] * 5])
  mean, std, aligned = umc.apply(variables, x, mask, train=False)
  chex.assert_shape([mean, std], (3, 5))
  chex.assert_shape(aligned, (3, 6, 8))
  assert np.all(np.asarray(std) > 0)
  np.testing.assert_array_equal(np.asarray(aligned)[~np.asarray(mask)], 0.0)
  np.testing.assert_allclose(masked_mean(aligned, mask) @ variables["params"]["mean"]["kernel"]
                             + variables["params"]["mean"]["bias"], mean, atol=1e-5)


@pytest.mark.slow
def test_umc_empty_mask_is_finite(umc_and_vars):
  umc, variables = umc_and_vars
  x = jax.random.normal(jax.random.key(19), (3, 6, 8))
  mask = jnp.array([[True] * 6, [False] * 6, [False] * 6])
  mean, std, _ = umc.apply(variables, x, mask, train=False)
  assert np.all(np.isfinite(mean)) and np.all(np.isfinite(std))
  # Nothing to pool: the heads see 0 and return their biases.
  p = variables["params"]
  np.testing.assert_allclose(mean[1], p["mean"]["bias"], atol=1e-7)
  np.testing.assert_allclose(std[2], _softplus(np.asarray(p["std"]["bias"])) + 1e-6, rtol=1e-6)

  def loss(params):
    out_mean, out_std, aligned = umc.apply({"params": params}, x, mask, train=False)
    return jnp.sum(out_mean) + jnp.sum(out_std) + jnp.sum(aligned)

  grads = jax.grad(loss)(variables["params"])
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_umc_padding_and_permutation_invariance(umc_and_vars):
  umc, variables = umc_and_vars
  x = jax.random.normal(jax.random.key(20), (3, 6, 8))
  mask = jnp.array([[True] * 6, [True] * 4 + [False] * 2, [True] * 2 + [False] * 4])
  reference = umc.apply(variables, x, mask, train=False)
  changed = jnp.where(mask[..., None], x, 1e3 * jax.random.normal(jax.random.key(21), x.shape))
  chex.assert_trees_all_close(umc.apply(variables, changed, mask, train=False), reference,
                              atol=1e-5)
  # No positional encoding + mean pooling: the order of real frames does not matter.
  order = jnp.array([3, 1, 0, 2, 4, 5])
  mean, std, aligned = umc.apply(variables, x[:, order], mask[:, order], train=False)
  chex.assert_trees_all_close((mean, std), reference[:2], atol=1e-5)
  chex.assert_trees_all_close(aligned, reference[2][:, order], atol=1e-5)


def _layer_norm(x, params, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * params["scale"] + params["bias"]


def test_umc_without_attention_matches_numpy():
  """attention=False (Table 3's "w/o attention"): the residual pre-norm GELU MLP per
  frame, zero on padding, masked mean, then the Gaussian heads."""
  from scipy.special import erf

  umc = UncertaintyModule(embed_dim=5, num_heads=2, mlp_dim=16, attention=False)
  x = jax.random.normal(jax.random.key(43), (3, 6, 8))
  mask = np.array([[True] * 6, [True] * 3 + [False] * 3, [True] + [False] * 5])
  variables = umc.init(jax.random.key(44), x, jnp.asarray(mask), train=False)
  assert set(variables["params"]) == {"norm_mlp", "mlp_in", "mlp_out", "mean", "std"}
  mean, std, aligned = umc.apply(variables, x, jnp.asarray(mask), train=False)
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), variables["params"])
  h = np.where(mask[..., None], np.asarray(x, np.float64), 0.0)
  hidden = _layer_norm(h, p["norm_mlp"]) @ p["mlp_in"]["kernel"] + p["mlp_in"]["bias"]
  hidden = 0.5 * hidden * (1 + erf(hidden / np.sqrt(2)))  # exact GELU ...
  expected = h + hidden @ p["mlp_out"]["kernel"] + p["mlp_out"]["bias"]
  expected = np.where(mask[..., None], expected, 0.0)
  # ... while flax's default is the tanh approximation: agree to its accuracy.
  np.testing.assert_allclose(aligned, expected, atol=2e-3)
  pooled = np.stack([expected[b][mask[b]].mean(0) for b in range(3)])
  np.testing.assert_allclose(mean, pooled @ p["mean"]["kernel"] + p["mean"]["bias"], atol=2e-3)
  np.testing.assert_allclose(std, _softplus(pooled @ p["std"]["kernel"] + p["std"]["bias"])
                             + 1e-6, atol=2e-3)


# ------------------------------------------------------------------- UCMI head, anchors


def test_gaussian_head_matches_formula():
  head = GaussianHead(features=3, hidden=0)
  x = 10.0 * jax.random.normal(jax.random.key(22), (4, 6))
  variables = head.init(jax.random.key(23), x)
  variables["params"]["var"]["bias"] = variables["params"]["var"]["bias"] - 50.0
  mean, var = head.apply(variables, x)
  chex.assert_shape([mean, var], (4, 3))
  p = jax.tree.map(np.asarray, variables["params"])
  x_np = np.asarray(x, np.float64)
  np.testing.assert_allclose(mean, x_np @ p["mean"]["kernel"] + p["mean"]["bias"], rtol=1e-4,
                             atol=1e-4)
  expected_var = _softplus(x_np @ p["var"]["kernel"] + p["var"]["bias"]) + 1e-6
  np.testing.assert_allclose(var, expected_var, rtol=1e-4, atol=1e-9)
  assert np.all(np.asarray(var) >= 1e-6)
  hidden = GaussianHead(features=3, hidden=7)
  hidden_vars = hidden.init(jax.random.key(24), x)
  chex.assert_shape(hidden_vars["params"]["context"]["kernel"], (6, 7))
  chex.assert_shape(hidden.apply(hidden_vars, x), [(4, 3), (4, 3)])


def test_init_class_anchors():
  anchors = init_class_anchors(7, 4)
  chex.assert_shape(anchors["mean"], (7, 4))
  chex.assert_shape(anchors["var"], (7, 4))
  chex.assert_shape(anchors["count"], (7,))
  np.testing.assert_array_equal(anchors["mean"], 0.0)
  np.testing.assert_array_equal(anchors["var"], 1.0)
  np.testing.assert_array_equal(anchors["count"], 0.0)


# -------------------------------------------------------------------------------- RCAB


def _padded_example(key, width=8):
  x = jax.random.normal(key, (2, 7, width))
  mask = jnp.array([[True] * 7, [True] * 4 + [False] * 3])
  return x, mask


def test_channel_attention_matches_numpy():
  ca = ChannelAttention1D(reduction=4)
  x, mask = _padded_example(jax.random.key(25))
  variables = ca.init(jax.random.key(26), x, mask)
  out = ca.apply(variables, x, mask)
  p = jax.tree.map(np.asarray, variables["params"])
  x_np, mask_np = np.asarray(x), np.asarray(mask)
  for b in range(2):
    pooled = x_np[b][mask_np[b]].mean(0)
    hidden = np.maximum(pooled @ p["squeeze"]["kernel"] + p["squeeze"]["bias"], 0.0)
    weights = 1.0 / (1.0 + np.exp(-(hidden @ p["excite"]["kernel"] + p["excite"]["bias"])))
    np.testing.assert_allclose(out[b], x_np[b] * weights, rtol=1e-5, atol=1e-6)
  chex.assert_shape(p["squeeze"]["kernel"], (8, 2))


@pytest.mark.parametrize("module", [RCAB(reduction=4), RCABStack(num_blocks=2, features=12,
                                                                  reduction=4)])
def test_rcab_shape_and_padding_invariance(module):
  x, mask = _padded_example(jax.random.key(27))
  variables = module.init(jax.random.key(28), x, mask)
  out = module.apply(variables, x, mask)
  chex.assert_shape(out, x.shape)
  changed = jnp.where(mask[..., None], x, 50.0)
  np.testing.assert_allclose(module.apply(variables, changed, mask), out, atol=1e-5)
  np.testing.assert_array_equal(out[1, 4:], 0.0)
  # Without a mask every frame is real: the same as an all-True mask.
  np.testing.assert_allclose(module.apply(variables, x), module.apply(
      variables, x, jnp.ones(mask.shape, bool)), atol=1e-6)
  # Each real frame depends on its neighbours (the convolutions mix time).
  shifted = x.at[0, 3].add(1.0)
  delta = np.abs(np.asarray(module.apply(variables, shifted, mask) - out))[0].sum(-1)
  assert delta[2] > 1e-4 and delta[4] > 1e-4


def test_rcab_residual_structure():
  block = RCAB(reduction=4)
  x, mask = _padded_example(jax.random.key(29))
  variables = block.init(jax.random.key(30), x, mask)
  out = block.apply(variables, x, mask)
  assert np.max(np.abs(out - jnp.where(mask[..., None], x, 0.0))) > 1e-2
  # Zeroing the last convolution removes the residual branch: the block is the identity.
  silenced = jax.tree.map(lambda v: v, variables)
  silenced["params"]["conv2"] = jax.tree.map(jnp.zeros_like, silenced["params"]["conv2"])
  np.testing.assert_array_equal(block.apply(silenced, x, mask)[0], x[0])
  np.testing.assert_array_equal(block.apply(silenced, x, mask)[1, :4], x[1, :4])

  stack = RCABStack(num_blocks=2, features=12, reduction=4)
  stack_vars = stack.init(jax.random.key(31), x, mask)
  chex.assert_shape(stack_vars["params"]["conv_in"]["kernel"], (3, 8, 12))
  chex.assert_shape(stack_vars["params"]["conv_out"]["kernel"], (3, 12, 8))
  silenced = jax.tree.map(lambda v: v, stack_vars)
  silenced["params"]["conv_out"] = jax.tree.map(jnp.zeros_like, silenced["params"]["conv_out"])
  np.testing.assert_array_equal(stack.apply(silenced, x, mask)[0], x[0])


def test_rcab_stack_gradients_finite_with_empty_sample():
  stack = RCABStack(num_blocks=1, features=8, reduction=4)
  x = jax.random.normal(jax.random.key(32), (2, 5, 8))
  mask = jnp.array([[True] * 5, [False] * 5])
  variables = stack.init(jax.random.key(33), x, mask)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(stack.apply({"params": p}, x, mask) ** 2)))(
      variables["params"])
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
