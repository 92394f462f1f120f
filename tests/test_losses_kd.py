"""Contrastive and distillation losses against loop-based numpy versions of the equations."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mer_jax.losses import contrastive, distillation

# ----------------------------------------------------------------------------------------
# Independent numpy references (float64, explicit loops, written from the equations).
# ----------------------------------------------------------------------------------------


def _normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _logsumexp(values):
  values = np.asarray(values, np.float64)
  top = values.max()
  return top + np.log(np.sum(np.exp(values - top)))


def _mean_or_zero(values):
  return float(np.mean(values)) if values else 0.0


def mcb_reference(emb, labels, combos, tau, mu1, mu2):
  """MCUR Eq. 2-5, every set excluding the anchor; terms averaged where defined."""
  x = _normalize(emb)
  batch = len(labels)
  terms = ([], [], [])
  for i in range(batch):
    sim = {j: x[i] @ x[j] / tau for j in range(batch)}
    others = [j for j in range(batch) if j != i]
    same_combo = [j for j in others if combos[j] == combos[i]]
    same_label = [j for j in others if labels[j] == labels[i]]
    same_both = [j for j in same_combo if labels[j] == labels[i]]
    lse = lambda js: _logsumexp([sim[j] for j in js])
    if same_combo:
      terms[0].append(lse(same_combo) - lse(others))
    if same_both:
      terms[1].append(lse(same_both) - lse(same_combo))
      terms[2].append(lse(same_both) - lse(same_label))
  t1, t2, t3 = (_mean_or_zero(t) for t in terms)
  return -(t1 + mu1 * t2 - mu2 * t3)


def one_instance_expectation_reference(emb, labels, combos, tau, mu1, mu2):
  """Expected 1-instance MCB-CL when each single positive is drawn uniformly from its set."""
  x = _normalize(emb)
  batch = len(labels)
  terms = ([], [], [])
  for i in range(batch):
    sim = {j: x[i] @ x[j] / tau for j in range(batch)}
    others = [j for j in range(batch) if j != i]
    same_combo = [j for j in others if combos[j] == combos[i]]
    same_label = [j for j in others if labels[j] == labels[i]]
    same_both = [j for j in same_combo if labels[j] == labels[i]]
    lse = lambda js: _logsumexp([sim[j] for j in js])
    if same_combo:
      terms[0].append(np.mean([sim[j] for j in same_combo]) - lse(others))
    if same_both:
      mean_pos = np.mean([sim[j] for j in same_both])
      terms[1].append(mean_pos - lse(same_combo))
      terms[2].append(mean_pos - lse(same_label))
  t1, t2, t3 = (_mean_or_zero(t) for t in terms)
  return -(t1 + mu1 * t2 - mu2 * t3)


def supcon_reference(emb, labels, tau):
  """Khosla et al. 2020, L_out, anchors without positives dropped."""
  x = _normalize(emb)
  batch = len(labels)
  per_anchor = []
  for i in range(batch):
    others = [a for a in range(batch) if a != i]
    positives = [p for p in others if labels[p] == labels[i]]
    if not positives:
      continue
    denom = _logsumexp([x[i] @ x[a] / tau for a in others])
    per_anchor.append(-np.mean([x[i] @ x[p] / tau - denom for p in positives]))
  return _mean_or_zero(per_anchor)


def infonce_reference(emb_a, emb_b, tau):
  a, b = _normalize(emb_a), _normalize(emb_b)
  batch = len(a)
  total = 0.0
  for i in range(batch):
    row = [a[i] @ b[j] / tau for j in range(batch)]
    col = [b[i] @ a[j] / tau for j in range(batch)]
    total += -(row[i] - _logsumexp(row)) - (col[i] - _logsumexp(col))
  return total / (2 * batch)


def _softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max())
  return e / e.sum()


def dkd_reference_single(zs, zt, target, alpha, beta, temp):
  """DKD for one head: probabilities first, then the binary and the non-target KLs."""
  ps, pt = _softmax(np.asarray(zs) / temp), _softmax(np.asarray(zt) / temp)
  bs = np.array([ps[target], 1.0 - ps[target]])
  bt = np.array([pt[target], 1.0 - pt[target]])
  tckd = np.sum(bt * np.log(bt / bs))
  others = [k for k in range(len(zs)) if k != target]
  if others:
    qs = ps[others] / ps[others].sum()
    qt = pt[others] / pt[others].sum()
    nckd = np.sum(qt * np.log(qt / qs))
  else:
    nckd = 0.0
  return (alpha * tckd + beta * nckd) * temp**2


def dkd_reference(zs, zt, labels, alpha, beta, temp):
  zs, zt, labels = np.asarray(zs), np.asarray(zt), np.asarray(labels)
  if zs.ndim == 2:
    return np.array([dkd_reference_single(zs[i], zt[i], labels[i], alpha, beta, temp)
                     for i in range(len(zs))])
  return np.array([np.mean([dkd_reference_single(zs[i, k], zt[i, k], labels[i, k], alpha, beta,
                                                 temp) for k in range(zs.shape[1])])
                   for i in range(len(zs))])


def _entropy_ref(z):
  p = _softmax(z)
  return -np.sum(p * np.log(p))


def sugr_reference(out_s, out_t, y, task, alpha, temp, use_uncertainty=True, use_logits=True):
  """MCUR Eq. 7-14, sample by sample."""
  out_s, out_t, y = np.asarray(out_s, np.float64), np.asarray(out_t, np.float64), np.asarray(y)
  result = []
  for i in range(len(y)):
    if task == "regression":
      h_s, h_t = (y[i] - out_s[i]) ** 2, (y[i] - out_t[i]) ** 2
      logits_term = (out_s[i] - out_t[i]) ** 2
      task_term = abs(y[i] - out_s[i])
    else:
      # Every (sample, emotion) pair is one row; the rows' products are averaged.
      heads_s = out_s[i][None] if task == "classification" else out_s[i]
      heads_t = out_t[i][None] if task == "classification" else out_t[i]
      targets = np.atleast_1d(y[i])
      rows = []
      for zs, zt, k in zip(heads_s, heads_t, targets, strict=True):
        weight = abs(_entropy_ref(zt) - _entropy_ref(zs)) if use_uncertainty else 1.0
        logits_term = dkd_reference_single(zs, zt, k, alpha, 1 - alpha, temp)
        rows.append(weight * (-np.log(_softmax(zs)[k]) + (logits_term if use_logits else 0.0)))
      result.append(np.mean(rows))
      continue
    weight = abs(h_t - h_s) if use_uncertainty else 1.0
    result.append(weight * (task_term + (logits_term if use_logits else 0.0)))
  return np.array(result)


def cafd_reference(s, t, tau):
  """CMAD CAFD as written in SPEC section 7, with loops over the batch."""
  s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
  batch = len(s)
  cos = lambda a, b: a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
  sim_st = np.array([[cos(s[i], t[j]) for j in range(batch)] for i in range(batch)])
  sim_tt = np.array([[cos(t[i], t[j]) for j in range(batch)] for i in range(batch)])
  diff = np.abs(sim_tt - sim_st)
  l_struct = np.trace(diff) / diff.sum() if diff.sum() > 0 else 0.0
  total = 0.0
  for i in range(batch):
    mse = np.mean((s[i] - t[i]) ** 2)
    p, q = _softmax(sim_tt[i] / tau), _softmax(sim_st[i] / tau)
    bikl = (np.sum(p * np.log(p / q)) + np.sum(q * np.log(q / p))) / 2
    total += bikl * mse
  return total / batch + l_struct


# ----------------------------------------------------------------------------------------
# Fixtures.
# ----------------------------------------------------------------------------------------


def _random_batch(seed, batch=12, dim=6, num_labels=3, num_combos=7):
  rng = np.random.default_rng(seed)
  emb = rng.normal(size=(batch, dim)).astype(np.float32)
  labels = rng.integers(0, num_labels, size=batch).astype(np.int32)
  combos = rng.integers(0, num_combos, size=batch).astype(np.int32)
  return emb, labels, combos


def _assert_finite_tree(tree):
  for leaf in jax.tree.leaves(tree):
    assert np.all(np.isfinite(np.asarray(leaf))), leaf


# ----------------------------------------------------------------------------------------
# contrastive.py
# ----------------------------------------------------------------------------------------


class TestContrastiveCategories:

  def test_classification_is_the_class(self):
    out = contrastive.contrastive_categories(jnp.array([2, 0, 1]), "classification")
    np.testing.assert_array_equal(out, [2, 0, 1])
    assert out.dtype == jnp.int32

  def test_regression_is_the_sign_class(self):
    out = contrastive.contrastive_categories(jnp.array([-2.5, -0.1, 0.0, 1.3]), "regression")
    np.testing.assert_array_equal(out, [0, 0, 1, 1])

  def test_multilabel_is_the_present_emotion_or_none(self):
    labels = jnp.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0]])
    out = contrastive.contrastive_categories(labels, "multilabel_binary")
    np.testing.assert_array_equal(out, [2, 0, 4, 1])

  def test_unknown_task(self):
    with pytest.raises(ValueError):
      contrastive.contrastive_categories(jnp.zeros(3), "ranking")


class TestMcbContrastive:

  @pytest.mark.parametrize("seed", [0, 1, 2])
  @pytest.mark.parametrize("mu1,mu2", [(1.0, 1.0), (0.5, 2.0)])
  def test_matches_reference(self, seed, mu1, mu2):
    emb, labels, combos = _random_batch(seed)
    got = contrastive.mcb_contrastive(emb, labels, combos, temperature=0.3, mu1=mu1, mu2=mu2)
    chex.assert_shape(got, ())
    want = mcb_reference(emb, labels, combos, 0.3, mu1, mu2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  def test_reference_batch_has_empty_positive_sets(self):
    # Guards the test above: seed 0 must exercise anchors with empty M_i and empty N_i.
    _, labels, combos = _random_batch(0)
    same_combo = (combos[:, None] == combos[None]) & ~np.eye(len(combos), dtype=bool)
    same_both = same_combo & (labels[:, None] == labels[None])
    assert (~same_combo.any(1)).any() and same_combo.any(1).any()
    assert (~same_both.any(1)).any() and same_both.any(1).any()

  def test_single_combination_leaves_only_the_within_combination_term(self):
    emb, labels, _ = _random_batch(3)
    combos = np.full_like(labels, 4)
    got = contrastive.mcb_contrastive(emb, labels, combos, temperature=0.5, mu1=0.7, mu2=3.0)
    # log p(c|x) = log p(c|x,k) = log 1: the loss is mu1 times the Eq. 3 term, whatever mu2.
    other_mu2 = contrastive.mcb_contrastive(emb, labels, combos, temperature=0.5, mu1=0.7,
                                            mu2=0.0)
    np.testing.assert_allclose(got, other_mu2, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got, mcb_reference(emb, labels, combos, 0.5, 0.7, 3.0),
                               rtol=1e-5)
    np.testing.assert_allclose(got, 0.7 * mcb_reference(emb, labels, combos, 0.5, 1.0, 0.0),
                               rtol=1e-5)

  def test_no_positive_anywhere_is_zero_with_zero_gradient(self):
    emb = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    labels = np.arange(5, dtype=np.int32)
    combos = np.arange(5, dtype=np.int32)
    loss, grad = jax.value_and_grad(
        lambda e: contrastive.mcb_contrastive(e, labels, combos, temperature=0.1))(emb)
    assert float(loss) == 0.0
    np.testing.assert_array_equal(grad, np.zeros_like(emb))

  def test_distinct_labels_leave_only_the_combination_term(self):
    emb, _, combos = _random_batch(4)
    labels = np.arange(len(combos), dtype=np.int32)
    got = contrastive.mcb_contrastive(emb, labels, combos, temperature=0.2, mu1=5.0, mu2=5.0)
    np.testing.assert_allclose(got, mcb_reference(emb, labels, combos, 0.2, 0.0, 0.0),
                               rtol=1e-5)

  def test_scale_invariant_embeddings(self):
    emb, labels, combos = _random_batch(5)
    scale = np.random.default_rng(1).uniform(0.1, 10.0, size=(len(emb), 1)).astype(np.float32)
    a = contrastive.mcb_contrastive(emb, labels, combos, temperature=0.3)
    b = contrastive.mcb_contrastive(emb * scale, labels, combos, temperature=0.3)
    np.testing.assert_allclose(a, b, rtol=1e-5)

  def test_batch_of_one_is_zero(self):
    got = contrastive.mcb_contrastive(jnp.ones((1, 3)), jnp.array([1]), jnp.array([6]),
                                      temperature=0.1)
    assert float(got) == 0.0


class TestOneInstance:

  def test_equals_mcb_when_every_set_has_one_member(self):
    emb, labels, _ = _random_batch(6, batch=8)
    combos = np.array([0, 0, 1, 1, 2, 2, 3, 3], np.int32)
    want = contrastive.mcb_contrastive(emb, labels, combos, temperature=0.4, mu1=0.5, mu2=2.0)
    for seed in range(3):
      got = contrastive.one_instance_mcb_contrastive(
          emb, labels, combos, temperature=0.4, key=jax.random.key(seed), mu1=0.5, mu2=2.0)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  def test_mean_over_keys_is_the_uniform_expectation(self):
    emb, labels, combos = _random_batch(7, batch=10, num_labels=2, num_combos=3)
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = jax.jit(jax.vmap(lambda k: contrastive.one_instance_mcb_contrastive(
        emb, labels, combos, temperature=0.5, key=k, mu1=0.8, mu2=1.5)))(keys)
    draws = np.asarray(draws, np.float64)
    want = one_instance_expectation_reference(emb, labels, combos, 0.5, 0.8, 1.5)
    assert draws.std() > 0  # the draw matters on this batch
    stderr = draws.std() / np.sqrt(len(draws))
    assert abs(draws.mean() - want) < 5 * stderr + 1e-5
    # and differs from multi-instance MCB-CL, which sums inside the log
    multi = mcb_reference(emb, labels, combos, 0.5, 0.8, 1.5)
    assert abs(want - multi) > 10 * stderr


class TestSupervisedContrastive:

  @pytest.mark.parametrize("seed", [0, 1, 2])
  def test_matches_reference(self, seed):
    emb, labels, _ = _random_batch(seed, num_labels=5)
    got = contrastive.supervised_contrastive(emb, labels, temperature=0.2)
    chex.assert_shape(got, ())
    np.testing.assert_allclose(got, supcon_reference(emb, labels, 0.2), rtol=1e-5)

  def test_labels_without_positives_are_dropped(self):
    emb, _, _ = _random_batch(8, batch=6)
    labels = np.array([0, 0, 1, 2, 3, 4], np.int32)  # only anchors 0 and 1 have a positive
    got = contrastive.supervised_contrastive(emb, labels, temperature=0.2)
    np.testing.assert_allclose(got, supcon_reference(emb, labels, 0.2), rtol=1e-5)
    unique = contrastive.supervised_contrastive(emb, np.arange(6), temperature=0.2)
    assert float(unique) == 0.0


class TestInfoNCE:

  def test_matches_reference(self):
    emb, _, _ = _random_batch(9)
    paired = emb + 0.3 * np.random.default_rng(1).normal(size=emb.shape).astype(np.float32)
    got = contrastive.infonce(emb, paired, temperature=0.1)
    chex.assert_shape(got, ())
    np.testing.assert_allclose(got, infonce_reference(emb, paired, 0.1), rtol=1e-5)

  def test_lower_for_matching_views(self):
    emb, _, _ = _random_batch(10)
    shuffled = emb[np.roll(np.arange(len(emb)), 1)]
    aligned = contrastive.infonce(emb, emb, temperature=0.1)
    misaligned = contrastive.infonce(emb, shuffled, temperature=0.1)
    assert float(aligned) < float(misaligned)


class TestDispatcher:

  def test_each_kind_is_the_named_loss(self):
    emb, labels, combos = _random_batch(11)
    paired = emb[::-1].copy()
    key = jax.random.key(3)
    common = dict(temperature=0.3, mu1=0.5, mu2=2.0)
    np.testing.assert_allclose(
        contrastive.contrastive_loss("mcb", emb, labels, combos, **common),
        mcb_reference(emb, labels, combos, 0.3, 0.5, 2.0), rtol=1e-5)
    np.testing.assert_allclose(
        contrastive.contrastive_loss("supcon", emb, labels, combos, **common),
        supcon_reference(emb, labels, 0.3), rtol=1e-5)
    np.testing.assert_allclose(
        contrastive.contrastive_loss("infonce", emb, labels, combos, paired_embeddings=paired,
                                     **common),
        infonce_reference(emb, paired, 0.3), rtol=1e-5)
    np.testing.assert_allclose(
        contrastive.contrastive_loss("one_instance", emb, labels, combos, key=key, **common),
        contrastive.one_instance_mcb_contrastive(emb, labels, combos, key=key, **common),
        rtol=1e-6)

  def test_missing_arguments_and_unknown_kind_fail(self):
    emb, labels, combos = _random_batch(12)
    with pytest.raises(ValueError, match="paired_embeddings"):
      contrastive.contrastive_loss("infonce", emb, labels, combos, temperature=0.1)
    with pytest.raises(ValueError, match="key"):
      contrastive.contrastive_loss("one_instance", emb, labels, combos, temperature=0.1)
    with pytest.raises(ValueError, match="mcb"):
      contrastive.contrastive_loss("triplet", emb, labels, combos, temperature=0.1)


class TestContrastiveTransforms:

  KINDS = ("mcb", "supcon", "infonce", "one_instance")

  def _loss(self, kind, emb, labels, combos, paired):
    return contrastive.contrastive_loss(kind, emb, labels, combos, temperature=0.2, mu1=0.9,
                                        mu2=1.1, paired_embeddings=paired,
                                        key=jax.random.key(0))

  @pytest.mark.parametrize("kind", ["mcb", "supcon", "infonce"])
  def test_permutation_invariant(self, kind):
    emb, labels, combos = _random_batch(13)
    paired = np.roll(emb, 1, axis=1)
    perm = np.random.default_rng(0).permutation(len(emb))
    a = self._loss(kind, emb, labels, combos, paired)
    b = self._loss(kind, emb[perm], labels[perm], combos[perm], paired[perm])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

  @pytest.mark.parametrize("kind", KINDS)
  def test_jit_and_finite_gradients(self, kind):
    emb, labels, combos = _random_batch(14)
    emb[3] = 0.0  # a zero embedding must not produce NaN through the normalisation
    paired = np.roll(emb, 1, axis=1)
    fn = jax.jit(functools.partial(self._loss, kind))
    eager = self._loss(kind, emb, labels, combos, paired)
    np.testing.assert_allclose(fn(emb, labels, combos, paired), eager, rtol=1e-5, atol=1e-6)
    grad = jax.grad(fn, argnums=(0, 3))(emb, labels, combos, paired)
    _assert_finite_tree(grad)
    assert np.abs(np.asarray(grad[0])).sum() > 0

  def test_vmap_over_stacked_batches(self):
    batches = [_random_batch(s) for s in (15, 16, 17)]
    emb, labels, combos = (np.stack(x) for x in zip(*batches, strict=True))
    got = jax.vmap(lambda e, y, c: contrastive.mcb_contrastive(e, y, c, temperature=0.3))(
        emb, labels, combos)
    want = [mcb_reference(*b, 0.3, 1.0, 1.0) for b in batches]
    np.testing.assert_allclose(got, want, rtol=1e-5)


# ----------------------------------------------------------------------------------------
# distillation.py: DKD, SUGR
# ----------------------------------------------------------------------------------------


def _logits(seed, shape, scale=2.0):
  return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


class TestDKD:

  @pytest.mark.parametrize("temp", [1.0, 4.0])
  def test_classification_matches_reference(self, temp):
    zs, zt = _logits(0, (9, 5)), _logits(1, (9, 5))
    labels = np.random.default_rng(2).integers(0, 5, size=9)
    got = distillation.dkd(zs, zt, labels, alpha=0.3, beta=2.0, temperature=temp)
    chex.assert_shape(got, (9,))
    np.testing.assert_allclose(got, dkd_reference(zs, zt, labels, 0.3, 2.0, temp), rtol=1e-4,
                               atol=1e-6)

  def test_multilabel_averages_heads(self):
    zs, zt = _logits(3, (7, 4, 2)), _logits(4, (7, 4, 2))
    labels = np.random.default_rng(5).integers(0, 2, size=(7, 4))
    got = distillation.dkd(zs, zt, labels, alpha=0.6, beta=0.4, temperature=2.0)
    chex.assert_shape(got, (7,))
    np.testing.assert_allclose(got, dkd_reference(zs, zt, labels, 0.6, 0.4, 2.0), rtol=1e-4,
                               atol=1e-6)
    # two classes per head: the non-target distribution is a point mass, NCKD = 0
    no_nckd = distillation.dkd(zs, zt, labels, alpha=0.6, beta=100.0, temperature=2.0)
    np.testing.assert_allclose(got, no_nckd, rtol=1e-5, atol=1e-6)

  def test_zero_when_student_equals_teacher(self):
    z = _logits(6, (4, 6))
    got = distillation.dkd(z, z, np.array([0, 5, 2, 2]), alpha=1.0, beta=1.0, temperature=3.0)
    np.testing.assert_allclose(got, np.zeros(4), atol=1e-6)

  def test_confident_logits_stay_finite(self):
    zs = np.array([[60.0, -60.0, 0.0], [-80.0, 80.0, 5.0]], np.float32)
    zt = np.array([[-70.0, 70.0, 1.0], [-80.0, 79.0, 5.0]], np.float32)
    labels = np.array([0, 1])
    loss, grad = jax.value_and_grad(
        lambda s: distillation.dkd(s, zt, labels, alpha=1.0, beta=8.0, temperature=1.0).sum())(zs)
    _assert_finite_tree((loss, grad))
    # first sample: teacher puts ~all mass off-target, student on target -> large TCKD
    assert float(loss) > 50.0


class TestSUGR:

  def _inputs(self, task, seed):
    rng = np.random.default_rng(seed)
    if task == "regression":
      y = rng.uniform(-3, 3, size=10).astype(np.float32)
      return (y + rng.normal(size=10).astype(np.float32),
              y + 0.5 * rng.normal(size=10).astype(np.float32), y)
    if task == "classification":
      return _logits(seed, (10, 4)), _logits(seed + 1, (10, 4)), rng.integers(0, 4, size=10)
    return (_logits(seed, (10, 4, 2)), _logits(seed + 1, (10, 4, 2)),
            rng.integers(0, 2, size=(10, 4)))

  @pytest.mark.parametrize("task", ["regression", "classification", "multilabel_binary"])
  @pytest.mark.parametrize("switches", [(True, True), (False, True), (True, False)])
  def test_matches_reference(self, task, switches):
    out_s, out_t, y = self._inputs(task, 20)
    use_uncertainty, use_logits = switches
    got = distillation.sugr(out_s, out_t, y, task=task, alpha=0.3, temperature=2.0,
                            use_uncertainty=use_uncertainty, use_logits=use_logits)
    chex.assert_shape(got, (10,))
    want = sugr_reference(out_s, out_t, y, task, 0.3, 2.0, use_uncertainty, use_logits)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)

  def test_regression_accepts_column_outputs(self):
    out_s, out_t, y = self._inputs("regression", 21)
    a = distillation.sugr(out_s, out_t, y, task="regression")
    b = distillation.sugr(out_s[:, None], out_t[:, None], y, task="regression")
    np.testing.assert_allclose(a, b, rtol=1e-6)

  @pytest.mark.parametrize("task", ["regression", "classification", "multilabel_binary"])
  def test_permutation_equivariant_jit_and_finite_gradients(self, task):
    out_s, out_t, y = self._inputs(task, 22)
    fn = jax.jit(functools.partial(distillation.sugr, task=task, alpha=0.5, temperature=1.0))
    perm = np.random.default_rng(1).permutation(10)
    np.testing.assert_allclose(fn(out_s, out_t, y)[perm], fn(out_s[perm], out_t[perm], y[perm]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fn(out_s, out_t, y),
                               distillation.sugr(out_s, out_t, y, task=task), rtol=1e-5,
                               atol=1e-6)
    grad = jax.grad(lambda s: fn(s, out_t, y).mean())(out_s)
    _assert_finite_tree(grad)
    assert np.abs(np.asarray(grad)).sum() > 0

  def test_wrong_rank_and_task_fail(self):
    with pytest.raises(ValueError):
      distillation.sugr(jnp.zeros((3, 4)), jnp.zeros((3, 4)), jnp.zeros((3, 4), jnp.int32),
                        task="multilabel_binary")
    with pytest.raises(ValueError):
      distillation.sugr(jnp.zeros(3), jnp.zeros(3), jnp.zeros(3), task="ordinal")


  def test_detached_weight_keeps_the_value_and_drops_its_gradient(self):
    out_s, out_t, y = self._inputs("regression", 23)
    plain = distillation.sugr(out_s, out_t, y, task="regression")
    detached = lambda s: distillation.sugr(s, out_t, y, task="regression", detach_weight=True)
    np.testing.assert_allclose(detached(out_s), plain, rtol=1e-6)
    grad = jax.grad(lambda s: detached(s).sum())(out_s)
    ys, yt, yy = (np.asarray(a, np.float64) for a in (out_s, out_t, y))
    weight = np.abs((yy - yt) ** 2 - (yy - ys) ** 2)  # a constant once detached
    np.testing.assert_allclose(grad, weight * (-np.sign(yy - ys) + 2 * (ys - yt)), rtol=1e-4,
                               atol=1e-5)
    full = jax.grad(lambda s: distillation.sugr(s, out_t, y, task="regression").sum())(out_s)
    assert not np.allclose(grad, full, atol=1e-3)


class TestMultilabelRows:
  """IEMOCAP's 4 emotions x 2 logits as the official CMAD loss.py and MulT reduce them:
  flatten to (B*K, 2) rows, compute per row, average (numpy, vectorised)."""

  def _rows(self):
    rng = np.random.default_rng(30)
    zs, zt = _logits(31, (6, 4, 2)), _logits(32, (6, 4, 2))
    return zs, zt, rng.integers(0, 2, size=(6, 4)).astype(np.int32)

  @staticmethod
  def _flat(zs, zt, labels):
    flat = lambda a: np.asarray(a, np.float64).reshape(-1, 2)
    zs, zt, labels = flat(zs), flat(zt), np.asarray(labels).reshape(-1)
    log_ps = zs - np.log(np.exp(zs).sum(-1, keepdims=True))
    log_pt = zt - np.log(np.exp(zt).sum(-1, keepdims=True))
    rows = np.arange(len(labels))
    return dict(ce_s=-log_ps[rows, labels], ce_t=-log_pt[rows, labels],
                h_s=-(np.exp(log_ps) * log_ps).sum(-1), h_t=-(np.exp(log_pt) * log_pt).sum(-1),
                # two classes: TCKD is the KL of the whole rows, NCKD is 0
                kl=(np.exp(log_pt) * (log_pt - log_ps)).sum(-1))

  def test_task_entropy_and_dkd_are_row_means(self):
    from mer_jax.losses.task import predictive_entropy, task_loss
    zs, zt, labels = self._rows()
    ref = {k: v.reshape(6, 4) for k, v in self._flat(zs, zt, labels).items()}
    np.testing.assert_allclose(task_loss(jnp.asarray(zs), labels, "multilabel_binary"),
                               ref["ce_s"].mean(-1), rtol=1e-5)
    np.testing.assert_allclose(predictive_entropy(jnp.asarray(zs), "multilabel_binary"),
                               ref["h_s"].mean(-1), rtol=1e-5)
    np.testing.assert_allclose(distillation.dkd(zs, zt, labels, alpha=0.7, beta=0.3,
                                                temperature=1.0),
                               0.7 * ref["kl"].mean(-1), rtol=1e-4, atol=1e-7)
    # the batch mean of the per-sample values is the mean over the B*K rows
    np.testing.assert_allclose(task_loss(jnp.asarray(zs), labels, "multilabel_binary").mean(),
                               ref["ce_s"].mean(), rtol=1e-5)

  def test_sugr_product_is_taken_per_row_then_averaged(self):
    zs, zt, labels = self._rows()
    ref = {k: v.reshape(6, 4) for k, v in self._flat(zs, zt, labels).items()}
    got = distillation.sugr(zs, zt, labels, task="multilabel_binary", alpha=0.6)
    rows = np.abs(ref["h_t"] - ref["h_s"]) * (ref["ce_s"] + 0.6 * ref["kl"])
    np.testing.assert_allclose(got, rows.mean(-1), rtol=1e-4, atol=1e-7)
    # not the product of the averages
    products = np.abs(ref["h_t"].mean(-1) - ref["h_s"].mean(-1)) * (
        ref["ce_s"].mean(-1) + 0.6 * ref["kl"].mean(-1))
    assert not np.allclose(got, products, rtol=1e-3)


# ----------------------------------------------------------------------------------------
# distillation.py: CAFD, MAR, regression auxiliary
# ----------------------------------------------------------------------------------------


class TestCAFD:

  @pytest.mark.parametrize("seed", [0, 1])
  @pytest.mark.parametrize("tau", [0.2, 1.0])
  def test_matches_reference(self, seed, tau):
    rng = np.random.default_rng(seed)
    t = rng.normal(size=(8, 16)).astype(np.float32)
    s = (t + rng.normal(size=(8, 16))).astype(np.float32)
    got = distillation.cafd(s, t, tau=tau)
    chex.assert_shape(got, ())
    np.testing.assert_allclose(got, cafd_reference(s, t, tau), rtol=1e-4)

  def test_identical_embeddings_give_zero_and_finite_gradient(self):
    t = np.random.default_rng(2).normal(size=(5, 4)).astype(np.float32)
    loss, grad = jax.value_and_grad(lambda s: distillation.cafd(s, t, tau=0.2))(t)
    np.testing.assert_allclose(loss, 0.0, atol=1e-6)
    _assert_finite_tree(grad)

  def test_permutation_invariant_jit_and_gradients(self):
    rng = np.random.default_rng(3)
    t = rng.normal(size=(8, 6)).astype(np.float32)
    s = rng.normal(size=(8, 6)).astype(np.float32)
    perm = rng.permutation(8)
    fn = jax.jit(functools.partial(distillation.cafd, tau=0.2))
    np.testing.assert_allclose(fn(s, t), fn(s[perm], t[perm]), rtol=1e-5)
    np.testing.assert_allclose(fn(s, t), distillation.cafd(s, t, tau=0.2), rtol=1e-5)
    grad = jax.grad(fn)(s, t)
    _assert_finite_tree(grad)
    assert np.abs(np.asarray(grad)).sum() > 0


class TestMAR:

  def test_accumulate_and_finalize_by_hand(self):
    memory = distillation.mar_init()
    chex.assert_trees_all_equal(memory["weights"], jnp.ones(7))
    assert not bool(memory["fixed"])
    # difficulties relu([3, 1, 2, .5] - [1, 2, 0, 1]) = [2, 0, 2, 0]
    diff = distillation.mar_difficulty(jnp.array([3.0, 1.0, 2.0, 0.5]),
                                       jnp.array([1.0, 2.0, 0.0, 1.0]))
    np.testing.assert_allclose(diff, [2.0, 0.0, 2.0, 0.0])
    memory = distillation.mar_update(memory, diff, jnp.array([0, 0, 1, 2]))
    # second batch: combination 1 gets a 4, combination 0 a 1; the padded row is ignored
    memory = distillation.mar_update(memory, jnp.array([4.0, 1.0, 100.0]), jnp.array([1, 0, 3]),
                                     valid=jnp.array([True, True, False]))
    np.testing.assert_allclose(memory["sums"], [3, 6, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(memory["counts"], [3, 2, 1, 0, 0, 0, 0])
    # before finalising, every weight is 1
    np.testing.assert_allclose(distillation.mar_weights(memory, jnp.array([0, 1, 6])), [1, 1, 1])
    memory = distillation.mar_finalize(memory, rho=20.0)
    # W = [1, 3, 0, unseen...] -> Psi = 20 * (W / 3)^2; unseen combinations have W = 0
    np.testing.assert_allclose(memory["weights"], [20 / 9, 20, 0, 0, 0, 0, 0], rtol=1e-6)
    assert bool(memory["fixed"])
    np.testing.assert_allclose(distillation.mar_weights(memory, jnp.array([1, 0, 1, 2])),
                               [20, 20 / 9, 20, 0], rtol=1e-6)
    # once fixed, further updates change nothing
    later = distillation.mar_update(memory, jnp.array([9.0]), jnp.array([2]))
    chex.assert_trees_all_equal(later, memory)

  def test_all_zero_difficulty_gives_rho_to_seen_combinations(self):
    memory = distillation.mar_update(distillation.mar_init(), jnp.zeros(3), jnp.array([0, 4, 4]))
    memory = distillation.mar_finalize(memory, rho=5.0)
    np.testing.assert_allclose(memory["weights"], [5, 0, 0, 0, 5, 0, 0])

  def test_jit_training_step_shape(self):
    # The memory is a pytree of arrays that a jitted step can carry and update.
    @jax.jit
    def step(memory, loss_s, loss_t, ids):
      memory = distillation.mar_update(memory, distillation.mar_difficulty(loss_s, loss_t), ids)
      return memory, distillation.mar_weights(memory, ids)

    memory = distillation.mar_init()
    memory, weights = step(memory, jnp.array([2.0, 1.0]), jnp.array([0.0, 0.0]),
                           jnp.array([5, 6]))
    memory, _ = step(memory, jnp.array([1.0]), jnp.array([0.0]), jnp.array([5]))
    np.testing.assert_allclose(weights, [1, 1])
    np.testing.assert_allclose(memory["sums"], [0, 0, 0, 0, 0, 3, 1])
    final = jax.jit(functools.partial(distillation.mar_finalize, rho=20.0))(memory)
    np.testing.assert_allclose(final["weights"], [0, 0, 0, 0, 0, 20, 20 * (1 / 1.5) ** 2],
                               rtol=1e-6)

  def test_difficulty_not_differentiated_into_memory(self):
    def total(loss_s):
      memory = distillation.mar_update(
          distillation.mar_init(), distillation.mar_difficulty(loss_s, jnp.zeros(2)),
          jnp.array([0, 1]))
      return memory["sums"].sum()

    np.testing.assert_array_equal(jax.grad(total)(jnp.array([1.0, 2.0])), [0.0, 0.0])


class TestRegressionAux:

  def test_values_and_gradient(self):
    y_s = np.array([0.5, -2.0, 3.0], np.float32)
    y_t = np.array([1.0, -2.0, -1.0], np.float32)
    got = distillation.kd_regression_aux(y_s, y_t, phi=7.0)
    chex.assert_shape(got, (3,))
    np.testing.assert_allclose(got, [(0.5 / 7 - 1 / 7) ** 2 * 49, 0.0, (3 / 7 + 1 / 7) ** 2 * 49],
                               rtol=1e-5)
    np.testing.assert_allclose(got, (y_s - y_t) ** 2, rtol=1e-5)
    grad = jax.grad(lambda s: distillation.kd_regression_aux(s, y_t, phi=7.0).sum())(y_s)
    np.testing.assert_allclose(grad, 2 * (y_s - y_t), rtol=1e-5)
