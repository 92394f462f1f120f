"""Distribution losses (CM-ARR, EASE) against loop-based numpy versions of the equations."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mer_jax.losses import divergences, uncertainty

RTOL = 1e-5
ATOL = 1e-5

# ----------------------------------------------------------------------------------------
# Independent numpy references (float64, explicit loops, written from the equations).
# ----------------------------------------------------------------------------------------


def _f64(x):
  return np.asarray(x, np.float64)


def _log_softmax(row):
  row = _f64(row)
  top = row.max()
  return row - top - np.log(np.sum(np.exp(row - top)))


def w2_reference(mean_a, std_a, mean_b, std_b):
  """CM-ARR Eq. 1, pair by pair."""
  out = np.zeros((len(mean_a), len(mean_b)))
  for i in range(len(mean_a)):
    for j in range(len(mean_b)):
      out[i, j] = (np.sum((_f64(mean_a[i]) - mean_b[j]) ** 2)
                   + np.sum((_f64(std_a[i]) - std_b[j]) ** 2))
  return out


def infonce_reference(mean_a, std_a, mean_b, std_b, scale, shift, temp):
  """CM-ARR Eq. 2-5: L_s2t + L_t2s, each averaged over the anchors i."""
  dist = w2_reference(mean_a, std_a, mean_b, std_b)
  sim = (scale * dist + shift) / temp
  n = len(mean_a)
  a2b = -np.mean([_log_softmax(sim[i, :])[i] for i in range(n)])
  b2a = -np.mean([_log_softmax(sim[:, i])[i] for i in range(n)])
  return a2b + b2a


def cs_gaussian_reference(mq, vq, mp, vp):
  """EASE Eq. 24 with full (diagonal) matrices: Mahalanobis + log-determinant terms."""
  mq, vq, mp, vp = (_f64(x) for x in (mq, vq, mp, vp))
  out = []
  for i in range(len(mq)):
    s_sum = np.diag(vq[i] + vp[i])
    diff = mq[i] - mp[i]
    maha = diff @ np.linalg.inv(s_sum) @ diff
    logdet = (np.linalg.slogdet(s_sum)[1]
              - 0.5 * (np.linalg.slogdet(2 * np.diag(vq[i]))[1]
                       + np.linalg.slogdet(2 * np.diag(vp[i]))[1]))
    out.append(maha + logdet)
  return np.array(out)


def normal_pdf(x, mean, var):
  return np.exp(-((x - mean) ** 2) / (2 * var)) / np.sqrt(2 * np.pi * var)


def kernel_cs_reference(z, zh, u, uh, tau, alpha):
  """EASE Eq. 5-7 with explicit double sums."""
  def ksum(x, y, ux, uy):
    total = 0.0
    for i in range(len(x)):
      for j in range(len(y)):
        psi = 1 + alpha * (ux[i] + uy[j]) / 2
        total += np.exp(-np.sum((_f64(x[i]) - y[j]) ** 2) / (2 * tau**2 * psi))
    return total
  cross = ksum(z, zh, u, uh)
  return -np.log(cross / np.sqrt(ksum(z, z, u, u) * ksum(zh, zh, uh, uh)))


def softmax(row):
  return np.exp(_log_softmax(row))


def cat_kl_reference(lp, lq):
  p, q = softmax(lp), softmax(lq)
  return float(sum(p[k] * np.log(p[k] / q[k]) for k in range(len(p))))


def prediction_kl_reference(a, b, task):
  if task == "regression":
    return [(float(a[i]) - float(b[i])) ** 2 / 2 for i in range(len(a))]
  if task == "classification":
    return [cat_kl_reference(a[i], b[i]) for i in range(len(a))]
  return [sum(cat_kl_reference(a[i, e], b[i, e]) for e in range(a.shape[1]))
          for i in range(len(a))]


def mipc_reference(v1, v2, full, task):
  """EASE Eq. 10-12 with the expectations taken over both orders / both partial views."""
  kl = functools.partial(prediction_kl_reference, task=task)
  cons = 0.5 * (np.array(kl(v1, v2)) + np.array(kl(v2, v1)))
  asym = 0.5 * (np.array(kl(v1, full)) + np.array(kl(v2, full)))
  return float(np.mean(cons + asym))


def anchor_update_reference(mean, var, count, feats, labels, momentum, eps):
  mean, var, count = _f64(mean).copy(), _f64(var).copy(), _f64(count).copy()
  for k in range(len(mean)):
    members = [_f64(feats[i]) for i in range(len(labels)) if labels[i] == k]
    if not members:
      continue
    m = np.mean(members, axis=0)
    v = np.mean([(x - m) ** 2 for x in members], axis=0) + eps
    if count[k] == 0:
      mean[k], var[k] = m, v
    else:
      mean[k] = momentum * mean[k] + (1 - momentum) * m
      var[k] = momentum * var[k] + (1 - momentum) * v
    count[k] += len(members)
  return mean, var, count


def _rng(seed):
  return np.random.default_rng(seed)


def _gaussians(rng, batch, dim):
  return (rng.normal(size=(batch, dim)).astype(np.float32),
          rng.uniform(0.2, 2.0, size=(batch, dim)).astype(np.float32))


# ----------------------------------------------------------------------------------------
# CM-ARR: 2-Wasserstein and distribution InfoNCE.
# ----------------------------------------------------------------------------------------


def test_pairwise_wasserstein2_matches_loops_and_is_symmetric():
  rng = _rng(0)
  mean_a, std_a = _gaussians(rng, 5, 4)
  mean_b, std_b = _gaussians(rng, 7, 4)
  dist = divergences.pairwise_wasserstein2(mean_a, std_a, mean_b, std_b)
  chex.assert_shape(dist, (5, 7))
  np.testing.assert_allclose(dist, w2_reference(mean_a, std_a, mean_b, std_b),
                             rtol=RTOL, atol=1e-5)
  swapped = divergences.pairwise_wasserstein2(mean_b, std_b, mean_a, std_a)
  np.testing.assert_allclose(swapped, np.asarray(dist).T, rtol=RTOL, atol=1e-6)
  self_dist = np.asarray(divergences.pairwise_wasserstein2(mean_a, std_a, mean_a, std_a))
  assert (self_dist >= 0).all()
  np.testing.assert_allclose(np.diag(self_dist), 0.0, atol=1e-5)
  np.testing.assert_allclose(self_dist, self_dist.T, atol=1e-6)


def test_wasserstein_std_term_is_the_difference_of_std_not_var():
  # Same means, std 1 vs 3 in each of 2 dims: ||1 - 3||^2 = 8 (variances would give 128).
  mean = np.zeros((1, 2), np.float32)
  dist = divergences.pairwise_wasserstein2(mean, np.ones((1, 2), np.float32), mean,
                                           np.full((1, 2), 3.0, np.float32))
  np.testing.assert_allclose(dist, [[8.0]], rtol=1e-6)


def test_distribution_infonce_matches_reference():
  rng = _rng(1)
  mean_a, std_a = _gaussians(rng, 6, 5)
  mean_b, std_b = _gaussians(rng, 6, 5)
  loss = divergences.distribution_infonce(mean_a, std_a, mean_b, std_b, scale=-0.7,
                                          shift=0.3, temperature=0.5)
  chex.assert_shape(loss, ())
  expected = infonce_reference(mean_a, std_a, mean_b, std_b, -0.7, 0.3, 0.5)
  np.testing.assert_allclose(loss, expected, rtol=RTOL)


def test_distribution_infonce_invariances_and_gradients():
  rng = _rng(2)
  mean_a, std_a = _gaussians(rng, 6, 3)
  mean_b, std_b = _gaussians(rng, 6, 3)
  loss = functools.partial(divergences.distribution_infonce, scale=-1.0, temperature=0.2)
  base = loss(mean_a, std_a, mean_b, std_b, shift=0.0)
  # The shift b is one constant on every logit: it cancels in the softmax.
  np.testing.assert_allclose(loss(mean_a, std_a, mean_b, std_b, shift=5.0), base, rtol=1e-5)
  # Reordering the batch (same order in both modalities) keeps the positive pairs.
  perm = rng.permutation(6)
  np.testing.assert_allclose(
      loss(mean_a[perm], std_a[perm], mean_b[perm], std_b[perm], shift=0.0), base, rtol=1e-5)
  # Swapping the modalities swaps the two directions of the sum.
  np.testing.assert_allclose(loss(mean_b, std_b, mean_a, std_a, shift=0.0), base, rtol=1e-5)
  # Breaking the pairing (b shuffled against a) must change the loss.
  assert not np.isclose(loss(mean_a, std_a, mean_b[perm], std_b[perm], shift=0.0), base)
  grads = jax.grad(lambda *x: loss(*x, shift=0.0), argnums=(0, 1, 2, 3))(
      mean_a, std_a, mean_b, std_b)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
    assert np.abs(np.asarray(g)).sum() > 0


def test_distribution_infonce_rewards_aligned_pairs():
  rng = _rng(3)
  mean, std = _gaussians(rng, 8, 4)
  kwargs = dict(scale=-1.0, shift=0.0, temperature=0.1)
  aligned = divergences.distribution_infonce(mean, std, mean, std, **kwargs)
  shuffled = divergences.distribution_infonce(mean, std, mean[::-1], std[::-1], **kwargs)
  assert aligned < shuffled
  assert aligned >= 0


def test_udcl_loss_sums_the_three_pairs():
  rng = _rng(4)
  gauss = [_gaussians(rng, 5, 3) for _ in range(3)]
  means, stds = [g[0] for g in gauss], [g[1] for g in gauss]
  loss = divergences.udcl_loss(means, stds, scale=-0.5, shift=0.1, temperature=0.3)
  expected = sum(infonce_reference(means[i], stds[i], means[j], stds[j], -0.5, 0.1, 0.3)
                 for i, j in ((0, 1), (0, 2), (1, 2)))
  np.testing.assert_allclose(loss, expected, rtol=RTOL)
  # Per-pair parameters, in the order LA, LV, AV.
  scales = np.array([-0.5, -1.0, -2.0], np.float32)
  loss = divergences.udcl_loss(means, stds, scale=scales, shift=0.0, temperature=0.3)
  expected = sum(infonce_reference(means[i], stds[i], means[j], stds[j], s, 0.0, 0.3)
                 for (i, j), s in zip(((0, 1), (0, 2), (1, 2)), scales, strict=True))
  np.testing.assert_allclose(loss, expected, rtol=RTOL)


def test_udcl_loss_jit_and_learned_scale_gradient():
  rng = _rng(5)
  gauss = [_gaussians(rng, 4, 3) for _ in range(3)]
  means, stds = [g[0] for g in gauss], [g[1] for g in gauss]

  @jax.jit
  def loss_fn(raw_scale, raw_temp, means, stds):
    return divergences.udcl_loss(means, stds, scale=-jax.nn.softplus(raw_scale), shift=0.0,
                                 temperature=jnp.exp(raw_temp))

  value, grads = jax.value_and_grad(loss_fn, argnums=(0, 1))(0.0, 0.0, means, stds)
  eager = divergences.udcl_loss(means, stds, scale=-math.log(2.0), shift=0.0,
                                temperature=1.0)
  np.testing.assert_allclose(value, eager, rtol=1e-5)
  assert all(np.isfinite(g) and g != 0 for g in grads)


# ----------------------------------------------------------------------------------------
# EASE: closed-form CS divergence between Gaussians.
# ----------------------------------------------------------------------------------------


def test_cs_divergence_gaussian_matches_matrix_form():
  rng = _rng(6)
  mq, vq = _gaussians(rng, 4, 5)
  mp, vp = _gaussians(rng, 4, 5)
  out = divergences.cs_divergence_gaussian(mq, vq, mp, vp)
  chex.assert_shape(out, (4,))
  np.testing.assert_allclose(out, cs_gaussian_reference(mq, vq, mp, vp), rtol=RTOL, atol=ATOL)
  # Symmetric in (Q, P).
  np.testing.assert_allclose(divergences.cs_divergence_gaussian(mp, vp, mq, vq), out,
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mq,vq,mp,vp", [(0.0, 1.0, 1.5, 0.5), (-0.7, 0.3, 0.4, 2.0),
                                         (2.0, 1.2, 2.0, 0.4)])
def test_cs_divergence_gaussian_matches_numerical_integration(mq, vq, mp, vp):
  grid = np.linspace(-30.0, 30.0, 600_001)
  q, p = normal_pdf(grid, mq, vq), normal_pdf(grid, mp, vp)
  cross = np.trapezoid(q * p, grid)
  self_q, self_p = np.trapezoid(q * q, grid), np.trapezoid(p * p, grid)
  eq17 = -np.log(cross**2 / (self_q * self_p))  # EASE's definition (Eq. 17)
  out = divergences.cs_divergence_gaussian(np.array([[mq]]), np.array([[vq]]),
                                           np.array([[mp]]), np.array([[vp]]))
  np.testing.assert_allclose(out, [eq17], rtol=1e-5, atol=1e-6)
  # Eq. 24 is twice the square-root form of the CS divergence used in Eq. 7.
  sqrt_form = -np.log(cross / np.sqrt(self_q * self_p))
  np.testing.assert_allclose(out, [2 * sqrt_form], rtol=1e-5, atol=1e-6)


def test_cs_divergence_gaussian_zero_iff_equal_and_broadcasts():
  rng = _rng(7)
  mean, var = _gaussians(rng, 3, 6)
  same = divergences.cs_divergence_gaussian(mean, var, mean, var)
  np.testing.assert_array_equal(same, np.zeros(3, np.float32))
  grads = jax.grad(lambda m, v: divergences.cs_divergence_gaussian(m, v, mean, var).sum(),
                   argnums=(0, 1))(mean, var)
  for g in grads:
    np.testing.assert_allclose(g, 0.0, atol=1e-6)  # a minimum: zero, finite gradient
  # Different variances alone give a positive divergence (shape term).
  assert (np.asarray(divergences.cs_divergence_gaussian(mean, var, mean, 2 * var)) > 0).all()
  # A single (D,) Gaussian broadcasts against a (B, D) batch.
  anchor_m, anchor_v = mean[0], var[0]
  out = divergences.cs_divergence_gaussian(mean, var, anchor_m, anchor_v)
  expected = cs_gaussian_reference(mean, var, np.broadcast_to(anchor_m, mean.shape),
                                   np.broadcast_to(anchor_v, var.shape))
  np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)
  assert out[0] == 0.0


# ----------------------------------------------------------------------------------------
# EASE: uncertainty-adaptive kernel CS divergence (UADA).
# ----------------------------------------------------------------------------------------


def test_cs_divergence_kernel_matches_reference():
  rng = _rng(8)
  z = rng.normal(size=(5, 4)).astype(np.float32)
  zh = (z + 0.5 * rng.normal(size=(6, 4))[:5]).astype(np.float32)
  zh = np.concatenate([zh, rng.normal(size=(1, 4)).astype(np.float32)])  # N != B
  u = np.zeros(5, np.float32)
  uh = rng.uniform(0.1, 1.5, size=6).astype(np.float32)
  loss = divergences.cs_divergence_kernel(z, zh, u, uh, tau=1.3, alpha=0.8)
  chex.assert_shape(loss, ())
  np.testing.assert_allclose(loss, kernel_cs_reference(z, zh, u, uh, 1.3, 0.8), rtol=1e-4,
                             atol=1e-6)


def test_cs_divergence_kernel_zero_for_identical_sets_with_finite_gradients():
  rng = _rng(9)
  z = rng.normal(size=(6, 5)).astype(np.float32)
  unc = rng.uniform(0.0, 1.0, size=6).astype(np.float32)
  fn = functools.partial(divergences.cs_divergence_kernel, tau=0.7, alpha=2.0)
  assert float(fn(z, z, unc, unc)) == 0.0
  grads = jax.grad(fn, argnums=(0, 1, 2, 3))(z, z, unc, unc)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
  # The identical-set optimum is stationary: the gradients cancel.
  np.testing.assert_allclose(grads[0] + grads[1], 0.0, atol=1e-5)


def test_cs_divergence_kernel_positive_for_different_sets_and_permutation_invariant():
  rng = _rng(10)
  z = rng.normal(size=(6, 3)).astype(np.float32)
  zh = (z + rng.normal(size=(6, 3))).astype(np.float32)
  unc = np.full(6, 0.4, np.float32)
  fn = jax.jit(functools.partial(divergences.cs_divergence_kernel, tau=1.0, alpha=1.0))
  base = fn(z, zh, unc, unc)
  assert base > 1e-3
  # Distributions, not pairs: each set may be permuted on its own.
  perm_a, perm_b = rng.permutation(6), rng.permutation(6)
  np.testing.assert_allclose(fn(z[perm_a], zh[perm_b], unc, unc), base, rtol=1e-5)
  # Completing closer to the real set lowers the divergence.
  assert fn(z, 0.5 * (z + zh), unc, unc) < base


def test_cs_divergence_kernel_uncertainty_widens_the_bandwidth():
  rng = _rng(11)
  z = rng.normal(size=(6, 3)).astype(np.float32)
  zh = (z + rng.normal(size=(6, 3))).astype(np.float32)
  zero = np.zeros(6, np.float32)
  fn = functools.partial(divergences.cs_divergence_kernel, tau=1.0, alpha=1.0)
  # Larger uncertainty on both sets: the same bandwidth everywhere, but wider.
  confident = fn(z, zh, zero, zero)
  uncertain = fn(z, zh, zero + 3.0, zero + 3.0)
  assert 0 < uncertain < confident
  # alpha = 0 ignores the uncertainties entirely.
  np.testing.assert_allclose(
      divergences.cs_divergence_kernel(z, zh, zero, zero + 5.0, tau=1.0, alpha=0.0),
      confident, rtol=1e-6)


def test_cs_divergence_kernel_is_stable_for_distant_sets():
  rng = _rng(12)
  z = rng.normal(size=(4, 3)).astype(np.float32)
  # ||z_i - zh_j||^2 / 2 is about 300: every cross kernel value is below float32's
  # smallest number (exp(-103)) but still representable in the float64 reference.
  zh = z + 14.0
  zero = np.zeros(4, np.float32)
  loss, grad = jax.value_and_grad(divergences.cs_divergence_kernel, argnums=1)(
      z, zh, zero, zero, tau=1.0, alpha=1.0)
  assert np.exp(-np.sum((zh[:, None] - z[None]) ** 2, -1) / 2).astype(np.float32).max() == 0
  expected = kernel_cs_reference(z, zh, zero, zero, 1.0, 1.0)
  np.testing.assert_allclose(loss, expected, rtol=1e-4)
  assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).sum() > 0


# ----------------------------------------------------------------------------------------
# Likelihood and VIB terms.
# ----------------------------------------------------------------------------------------


def test_gaussian_nll_matches_closed_form():
  rng = _rng(13)
  x = rng.normal(size=(4, 3)).astype(np.float32)
  mean, var = _gaussians(rng, 4, 3)
  out = uncertainty.gaussian_nll(x, mean, var)
  chex.assert_shape(out, (4,))
  expected = [sum(0.5 * np.log(2 * np.pi * var[i, d]) + (x[i, d] - mean[i, d]) ** 2
                  / (2 * var[i, d]) for d in range(3)) for i in range(4)]
  np.testing.assert_allclose(out, expected, rtol=RTOL)
  # At x = mean with unit variance: D * log(2 pi) / 2 (the constant is included).
  np.testing.assert_allclose(uncertainty.gaussian_nll(mean, mean, np.ones_like(var)),
                             np.full(4, 1.5 * np.log(2 * np.pi)), rtol=1e-6)
  grads = jax.grad(lambda m, v: uncertainty.gaussian_nll(x, m, v).sum(), argnums=(0, 1))(
      mean, var)
  np.testing.assert_allclose(grads[0], (mean - x) / var, rtol=1e-5, atol=1e-6)


def test_vib_kl_matches_closed_form():
  rng = _rng(14)
  mu, sigma = _gaussians(rng, 4, 3)
  expected = np.mean([0.5 * (mu[i, d] ** 2 + sigma[i, d] ** 2 - 2 * np.log(sigma[i, d]) - 1)
                      for i in range(4) for d in range(3)])
  np.testing.assert_allclose(uncertainty.vib_kl(mu, sigma), expected, rtol=RTOL)
  # The standard normal is the prior: zero divergence.
  np.testing.assert_allclose(uncertainty.vib_kl(np.zeros((2, 3)), np.ones((2, 3))), 0.0,
                             atol=1e-7)


# ----------------------------------------------------------------------------------------
# MIPC.
# ----------------------------------------------------------------------------------------


def test_kl_helpers_match_references():
  rng = _rng(15)
  lp, lq = rng.normal(size=(2, 5, 4)).astype(np.float32)
  kl = divergences.categorical_kl(lp, lq)
  chex.assert_shape(kl, (5,))
  np.testing.assert_allclose(kl, [cat_kl_reference(lp[i], lq[i]) for i in range(5)],
                             rtol=1e-5, atol=1e-6)
  sym = divergences.symmetric_kl(lp, lq)
  np.testing.assert_allclose(
      sym, [(cat_kl_reference(lp[i], lq[i]) + cat_kl_reference(lq[i], lp[i])) / 2
            for i in range(5)], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(divergences.symmetric_kl(lq, lp), sym, rtol=1e-6)
  # Shifting logits does not change the distribution.
  np.testing.assert_allclose(divergences.categorical_kl(lp + 3.0, lp), 0.0, atol=1e-6)
  y1, y2 = rng.normal(size=(2, 5)).astype(np.float32)
  np.testing.assert_allclose(divergences.gaussian_kl_unit_variance(y1, y2),
                             (y1.astype(np.float64) - y2) ** 2 / 2, rtol=1e-6)
  np.testing.assert_allclose(divergences.gaussian_kl_unit_variance(lp, lq),
                             [np.sum((lp[i].astype(np.float64) - lq[i]) ** 2) / 2
                              for i in range(5)], rtol=1e-5)


@pytest.mark.parametrize("task,shape", [("regression", (5,)), ("classification", (5, 3)),
                                        ("multilabel_binary", (5, 4, 2))])
def test_mipc_consistency_matches_reference(task, shape):
  rng = _rng(16)
  v1, v2, full = (rng.normal(size=shape).astype(np.float32) for _ in range(3))
  loss = divergences.mipc_consistency(v1, v2, full, task=task)
  chex.assert_shape(loss, ())
  np.testing.assert_allclose(loss, mipc_reference(v1, v2, full, task), rtol=1e-5)
  # The full view is a stop-gradient target; the partial views get gradients.
  grads = jax.grad(functools.partial(divergences.mipc_consistency, task=task),
                   argnums=(0, 1, 2))(v1, v2, full)
  assert np.abs(np.asarray(grads[0])).sum() > 0
  np.testing.assert_array_equal(grads[2], np.zeros_like(full))
  # Identical views: nothing to be consistent about.
  np.testing.assert_allclose(divergences.mipc_consistency(full, full, full, task=task), 0.0,
                             atol=1e-6)


def test_mipc_regression_accepts_column_outputs():
  rng = _rng(17)
  v1, v2, full = (rng.normal(size=(5,)).astype(np.float32) for _ in range(3))
  flat = divergences.mipc_consistency(v1, v2, full, task="regression")
  column = divergences.mipc_consistency(v1[:, None], v2[:, None], full[:, None],
                                        task="regression")
  np.testing.assert_allclose(column, flat, rtol=1e-6)


# ----------------------------------------------------------------------------------------
# Class anchors.
# ----------------------------------------------------------------------------------------


def test_regression_anchor_class():
  labels = np.array([-3.0, -2.6, -0.5, 0.0, 0.4, 0.5, 1.5, 2.5, 3.0], np.float32)
  out = divergences.regression_anchor_class(labels, 3.0)
  chex.assert_type(out, jnp.int32)
  # np.round rounds halves to even, as MMSA's acc7.
  np.testing.assert_array_equal(out, np.clip(np.round(labels), -3, 3).astype(int) + 3)
  np.testing.assert_array_equal(out, [0, 0, 3, 3, 3, 3, 5, 5, 6])
  # SIMS: [-1, 1] stretched to the same 7 classes.
  sims = np.array([-1.0, -0.8, -0.6, -0.4, -0.2, 0.0, 0.2, 0.4, 0.6, 0.8, 1.0], np.float32)
  np.testing.assert_array_equal(divergences.regression_anchor_class(sims, 1.0),
                                [0, 1, 1, 2, 2, 3, 4, 4, 5, 5, 6])


def test_class_anchor_update_matches_reference():
  rng = _rng(18)
  num_classes, dim = 4, 3
  mean = rng.normal(size=(num_classes, dim)).astype(np.float32)
  var = rng.uniform(0.5, 1.5, size=(num_classes, dim)).astype(np.float32)
  count = np.array([0.0, 5.0, 3.0, 0.0], np.float32)  # class 0 is new; class 3 absent
  feats = rng.normal(size=(7, dim)).astype(np.float32)
  labels = np.array([0, 1, 1, 2, 0, 1, 0], np.int32)
  update = jax.jit(functools.partial(divergences.class_anchor_update, momentum=0.9,
                                     num_classes=num_classes))
  new_mean, new_var, new_count = update(mean, var, count, feats, labels)
  ref_mean, ref_var, ref_count = anchor_update_reference(mean, var, count, feats, labels,
                                                         0.9, 1e-6)
  np.testing.assert_allclose(new_mean, ref_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_var, ref_var, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_count, ref_count)
  np.testing.assert_array_equal(new_mean[3], mean[3])  # absent class untouched
  np.testing.assert_array_equal(new_var[3], var[3])
  # A single-sample class (2) gets the variance floor in its batch statistics.
  np.testing.assert_allclose(new_var[2], 0.9 * var[2] + 0.1 * 1e-6, rtol=1e-6)
  # No gradient flows from the anchors into the features.
  grad = jax.grad(lambda f: update(mean, var, count, f, labels)[0].sum())(feats)
  np.testing.assert_array_equal(grad, np.zeros_like(feats))


def test_anchor_loss_matches_reference_and_masks():
  rng = _rng(19)
  anchor_mean, anchor_var = _gaussians(rng, 7, 4)
  mean, var = _gaussians(rng, 5, 4)
  labels = np.array([0, 6, 3, 3, 2], np.int32)
  loss = divergences.anchor_loss(mean, var, labels, anchor_mean, anchor_var)
  per_sample = cs_gaussian_reference(mean, var, anchor_mean[labels], anchor_var[labels])
  np.testing.assert_allclose(loss, per_sample.mean(), rtol=RTOL)
  count = np.ones(7, np.float32)
  count[3] = 0.0  # class 3 not yet initialised: samples 2 and 3 drop out
  masked = divergences.anchor_loss(mean, var, labels, anchor_mean, anchor_var,
                                   anchor_count=count,
                                   valid=np.array([True, False, True, True, True]))
  np.testing.assert_allclose(masked, per_sample[[0, 4]].mean(), rtol=RTOL)
  none = divergences.anchor_loss(mean, var, labels, anchor_mean, anchor_var,
                                 valid=np.zeros(5, bool))
  assert float(none) == 0.0
  grads = jax.grad(divergences.anchor_loss, argnums=(0, 1, 3))(
      mean, var, labels, anchor_mean, anchor_var)
  assert np.isfinite(np.asarray(grads[0])).all() and np.abs(grads[0]).sum() > 0
  np.testing.assert_array_equal(grads[2], np.zeros_like(anchor_mean))  # stop-gradient
  # At the anchors themselves the loss vanishes.
  np.testing.assert_allclose(
      divergences.anchor_loss(anchor_mean[labels], anchor_var[labels], labels, anchor_mean,
                              anchor_var), 0.0, atol=1e-6)


def test_losses_vmap_over_seeds():
  """The losses run under vmap (several seeds trained at once)."""
  rng = _rng(20)
  z = rng.normal(size=(3, 5, 4)).astype(np.float32)
  zh = rng.normal(size=(3, 5, 4)).astype(np.float32)
  unc = rng.uniform(size=(3, 5)).astype(np.float32)
  batched = jax.vmap(functools.partial(divergences.cs_divergence_kernel, tau=1.0, alpha=1.0))(
      z, zh, jnp.zeros_like(unc), unc)
  chex.assert_shape(batched, (3,))
  for s in range(3):
    np.testing.assert_allclose(
        batched[s], kernel_cs_reference(z[s], zh[s], np.zeros(5), unc[s], 1.0, 1.0),
        rtol=1e-4)
  std = np.abs(zh) + 0.1
  w2 = jax.vmap(divergences.pairwise_wasserstein2)(z, std, zh, std)
  chex.assert_shape(w2, (3, 5, 5))
  np.testing.assert_allclose(w2[1], w2_reference(z[1], std[1], zh[1], std[1]), rtol=1e-5,
                             atol=1e-5)
