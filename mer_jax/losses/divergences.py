"""Distribution-level losses of the reconstruction family: CM-ARR and EASE.

CM-ARR (cm_arr.txt Sec. 3.1.2): the squared 2-Wasserstein distance between diagonal
Gaussians and the distribution-based InfoNCE built on it (L_udcl, Eq. 1-5).
EASE (ease.txt): the uncertainty-adaptive kernel Cauchy-Schwarz divergence (UADA,
Eq. 5-7), the closed-form CS divergence between diagonal Gaussians (Eq. 24) with the
class anchors it is measured against (Eq. 28-29), and the predictive-consistency
KL terms of MIPC (Eq. 10-12).

Pure functions of arrays, jit- and vmap-compatible, computed in float32. Matrix
products use HIGHEST precision: squared distances are formed as |a|^2 + |b|^2 - 2 a.b,
and at the default (bf16-pass) TPU precision that cancellation would swamp small
distances.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

# Sentiment classes of the anchors: rounded labels of [-3, 3] data (SPEC section 7).
NUM_SENTIMENT_CLASSES = 7


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def _pairwise_sq_dist(a, b):
  """(N, D), (M, D) -> (N, M) squared Euclidean distances, clamped at 0."""
  a_sq = jnp.sum(jnp.square(a), axis=-1)
  b_sq = jnp.sum(jnp.square(b), axis=-1)
  cross = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
  # Rounding in the expansion can leave tiny negative values for (near-)equal rows.
  return jnp.maximum(a_sq[:, None] + b_sq[None, :] - 2.0 * cross, 0.0)


# ------------------------------------------------------------------------------------
# CM-ARR: distribution-based contrastive learning.
# ------------------------------------------------------------------------------------


def pairwise_wasserstein2(mean_a, std_a, mean_b, std_b):
  """Squared 2-Wasserstein distances between two batches of diagonal Gaussians.

    D[i, j] = ||mean_a_i - mean_b_j||^2 + ||std_a_i - std_b_j||^2        (CM-ARR Eq. 1)

  For diagonal covariances this is the exact W2^2 (the covariance term of the general
  formula reduces to the squared difference of the standard deviations). It equals the
  squared Euclidean distance between the concatenations [mean, std], computed here with
  one matrix product.

  Args:
    mean_a, std_a: (B, D) means and standard deviations (std >= 0) of the first batch.
    mean_b, std_b: (M, D) of the second batch.

  Returns:
    (B, M) float32, >= 0.
  """
  a = jnp.concatenate([_f32(mean_a), _f32(std_a)], axis=-1)
  b = jnp.concatenate([_f32(mean_b), _f32(std_b)], axis=-1)
  return _pairwise_sq_dist(a, b)


def distribution_infonce(mean_a, std_a, mean_b, std_b, *, scale, shift, temperature):
  """Symmetric InfoNCE over 2-Wasserstein similarities for one modality pair (CM-ARR Eq. 2-5).

    logits[i, j] = (scale * D_2W[i, j] + shift) / temperature
    L = L_a2b + L_b2a,   L_a2b = -mean_i log softmax_j(logits[i, :])[i],
                         L_b2a = -mean_j log softmax_i(logits[:, j])[j]

  Sample i of modality a and sample i of modality b are the positive pair; every other
  sample of the batch is a negative. The two directions are summed, as Eq. 2 writes them
  (not averaged as in CLIP). `scale` must be negative (CM-ARR's a; the caller learns it
  as -softplus(raw)) so that closer distributions get larger logits. `shift` (b) adds
  the same constant to every logit and cancels in both softmaxes: it is accepted for
  fidelity to Eq. 5 but has no effect on the value or on any gradient.

  Args:
    mean_a, std_a: (B, D) Gaussian of modality a per sample.
    mean_b, std_b: (B, D) Gaussian of modality b per sample.
    scale: scalar < 0.
    shift: scalar.
    temperature: scalar > 0.

  Returns:
    Scalar float32.
  """
  dist = pairwise_wasserstein2(mean_a, std_a, mean_b, std_b)
  logits = (scale * dist + shift) / temperature
  a_to_b = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))
  b_to_a = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
  return a_to_b + b_to_a


def udcl_loss(means: Sequence, stds: Sequence, *, scale, shift, temperature):
  """CM-ARR's L_udcl: `distribution_infonce` summed over every pair of modalities.

  With the modality order (L, A, V) the pairs are LA, LV, AV, in that order (the paper
  writes the speech-text pair and states the same loss for text-video and speech-video;
  SPEC section 7: summed, not averaged).

  Args:
    means: sequence of M >= 2 arrays (B, D), one per modality.
    stds: sequence of M arrays (B, D).
    scale, shift, temperature: scalars shared by all pairs, or arrays of shape
      (M (M - 1) / 2,) with one value per pair in the order above.

  Returns:
    Scalar float32.
  """
  if len(means) != len(stds) or len(means) < 2:
    raise ValueError(f"need matching means/stds for >= 2 modalities, got {len(means)}, "
                     f"{len(stds)}")
  pairs = list(itertools.combinations(range(len(means)), 2))
  scale = jnp.broadcast_to(_f32(scale), (len(pairs),))
  shift = jnp.broadcast_to(_f32(shift), (len(pairs),))
  temperature = jnp.broadcast_to(_f32(temperature), (len(pairs),))
  total = jnp.zeros((), jnp.float32)
  for k, (i, j) in enumerate(pairs):
    total += distribution_infonce(means[i], stds[i], means[j], stds[j], scale=scale[k],
                                  shift=shift[k], temperature=temperature[k])
  return total


# ------------------------------------------------------------------------------------
# EASE: Cauchy-Schwarz divergences.
# ------------------------------------------------------------------------------------


def cs_divergence_gaussian(mean_q, var_q, mean_p, var_p):
  """Closed-form Cauchy-Schwarz divergence between diagonal Gaussians (EASE Eq. 24).

    D_CS(Q || P) = (m_q - m_p)^T (S_q + S_p)^{-1} (m_q - m_p)
                   + log( |S_q + S_p| / sqrt(|2 S_q| |2 S_p|) )
                 = sum_d [ (m_q,d - m_p,d)^2 / (v_q,d + v_p,d)
                           + log((v_q,d + v_p,d) / 2) - (log v_q,d + log v_p,d) / 2 ]

  This is EASE's definition Eq. 17, -log((int QP)^2 / (int Q^2 int P^2)), evaluated with
  int N(x; m1, S1) N(x; m2, S2) dx = N(m1; m2, S1 + S2). It is twice the square-root form
  -log(int QP / sqrt(int Q^2 int P^2)) that Eq. 7 uses for the kernel estimator; Eq. 24
  is kept as written because EASE's anchor weight beta_1 was tuned against it.
  It is symmetric, >= 0 (per dimension by the AM-GM inequality), and exactly 0 for Q = P.

  Args:
    mean_q, var_q: (..., D) mean and variance (> 0) of Q.
    mean_p, var_p: (..., D) of P; all four broadcast against each other.

  Returns:
    (...,) float32, summed over the last axis: (B,) for (B, D) inputs.
  """
  mean_q, var_q, mean_p, var_p = (_f32(x) for x in (mean_q, var_q, mean_p, var_p))
  var_sum = var_q + var_p
  centrality = jnp.square(mean_q - mean_p) / var_sum
  shape = jnp.log(0.5 * var_sum) - 0.5 * (jnp.log(var_q) + jnp.log(var_p))
  return jnp.sum(centrality + shape, axis=-1)


def _log_adaptive_kernel_sum(x, y, unc_x, unc_y, tau, alpha):
  """log sum_ij K_ua(x_i, y_j) (EASE Eq. 5-6), via logsumexp."""
  sq_dist = _pairwise_sq_dist(x, y)
  bandwidth = 1.0 + alpha * 0.5 * (unc_x[:, None] + unc_y[None, :])
  return jax.nn.logsumexp(-sq_dist / (2.0 * tau**2 * bandwidth))


def cs_divergence_kernel(real, completed, real_unc, completed_unc, *, tau, alpha):
  """Uncertainty-adaptive kernel CS divergence between real and completed features (UADA).

    K(a, b) = exp(-||a - b||^2 / (2 tau^2 psi(u_a, u_b))),  psi = 1 + alpha * (u_a + u_b) / 2
    L = -log( sum_ij K(z_i, zh_j) / sqrt(sum_ij K(z_i, z_j) * sum_ij K(zh_i, zh_j)) )
                                                                          (EASE Eq. 5-7)
  The three sums run over the whole (global) batch, so the loss compares the two
  empirical distributions, not sample pairs; it is invariant to permuting either set.
  Each log-sum is a logsumexp, so no kernel sum underflows for distant sets.
  It is exactly 0 when the sets and their uncertainties are identical. With equal
  uncertainties the kernel is a fixed-bandwidth Gaussian (positive definite) and the
  loss is >= 0; with differing uncertainties psi varies per pair, the kernel is no
  longer positive definite and small negative values are possible.
  Gradients flow into the uncertainties as well; stop them in the caller if the
  bandwidth should act as a fixed weight.

  Args:
    real: (B, D) real features z (EASE: the full-data features).
    completed: (N, D) completed features z_hat.
    real_unc: (B,) per-sample scalar uncertainty of `real` (0 for real features).
    completed_unc: (N,) per-sample scalar uncertainty u = mean of the variance vector.
    tau: kernel bandwidth > 0.
    alpha: bandwidth sensitivity to uncertainty, >= 0.

  Returns:
    Scalar float32.
  """
  real, completed = _f32(real), _f32(completed)
  real_unc, completed_unc = _f32(real_unc), _f32(completed_unc)
  log_cross = _log_adaptive_kernel_sum(real, completed, real_unc, completed_unc, tau, alpha)
  log_real = _log_adaptive_kernel_sum(real, real, real_unc, real_unc, tau, alpha)
  log_completed = _log_adaptive_kernel_sum(completed, completed, completed_unc,
                                           completed_unc, tau, alpha)
  return 0.5 * (log_real + log_completed) - log_cross


# ------------------------------------------------------------------------------------
# EASE: predictive consistency (MIPC).
# ------------------------------------------------------------------------------------


def gaussian_kl_unit_variance(mean_1, mean_2):
  """KL(N(mean_1, I) || N(mean_2, I)) = ||mean_1 - mean_2||^2 / 2, per sample.

  MIPC's KL for regression outputs, read as unit-variance Gaussians (SPEC section 7).

  Args:
    mean_1, mean_2: (B,) regression outputs, or (B, ...) means.

  Returns:
    (B,) float32, summed over every axis after the first.
  """
  diff = _f32(mean_1) - _f32(mean_2)
  return 0.5 * jnp.reshape(jnp.square(diff), (diff.shape[0], -1)).sum(axis=-1)


def categorical_kl(logits_p, logits_q):
  """KL(softmax(logits_p) || softmax(logits_q)) over the last axis.

  Args:
    logits_p, logits_q: (..., K) logits.

  Returns:
    (...,) float32 (e.g. (B,) for (B, K), (B, E) for multilabel (B, E, 2) heads).
  """
  log_p = jax.nn.log_softmax(_f32(logits_p), axis=-1)
  log_q = jax.nn.log_softmax(_f32(logits_q), axis=-1)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def symmetric_kl(logits_p, logits_q):
  """(KL(p || q) + KL(q || p)) / 2 of two categorical distributions, over the last axis.

  The mean of the two directions: the expectation of KL(p^S1 || p^S2) in EASE Eq. 10
  over the two orders of a drawn pair of views.

  Args:
    logits_p, logits_q: (..., K) logits.

  Returns:
    (...,) float32.
  """
  return 0.5 * (categorical_kl(logits_p, logits_q) + categorical_kl(logits_q, logits_p))


def prediction_kl(out_p, out_q, *, task: str):
  """Per-sample KL between two predictive distributions of a task head.

  regression: outputs are means of unit-variance Gaussians, KL = (y_p - y_q)^2 / 2;
  classification: categorical KL of the softmaxes; multilabel_binary: categorical KL
  per emotion head (2 classes), summed over the heads.

  Args:
    out_p, out_q: regression (B,) or (B, 1); classification (B, K); multilabel_binary
      (B, K, 2).
    task: "regression", "classification" or "multilabel_binary".

  Returns:
    (B,) float32.
  """
  if task == "regression":
    return gaussian_kl_unit_variance(out_p, out_q)
  if task == "classification":
    return categorical_kl(out_p, out_q)
  if task == "multilabel_binary":
    return categorical_kl(out_p, out_q).sum(axis=-1)
  raise ValueError(f"unknown task {task!r}")


def mipc_consistency(out_view1, out_view2, out_full, *, task: str):
  """EASE's L_consist = L_cons + L_asym (Eq. 10-12) for two partial views and the full view.

    L_cons = mean_i (KL(p1 || p2) + KL(p2 || p1)) / 2                         (Eq. 10)
    L_asym = mean_i (KL(p1 || sg(pf)) + KL(p2 || sg(pf))) / 2                 (Eq. 11)

  Each expectation of the paper becomes the mean over what one step draws: both orders
  of the pair (S1, S2), and both partial views for the full-view anchor; the two terms
  are added with weight 1 (Eq. 12). No gradient reaches the full view from here: it is
  the stop-gradient target of Eq. 11 (its own task loss trains it).

  Args:
    out_view1, out_view2, out_full: outputs of the three views (see `prediction_kl`).
    task: "regression", "classification" or "multilabel_binary".

  Returns:
    Scalar float32.
  """
  full = jax.lax.stop_gradient(out_full)
  cons = 0.5 * (prediction_kl(out_view1, out_view2, task=task)
                + prediction_kl(out_view2, out_view1, task=task))
  asym = 0.5 * (prediction_kl(out_view1, full, task=task)
                + prediction_kl(out_view2, full, task=task))
  return jnp.mean(cons + asym)


# ------------------------------------------------------------------------------------
# EASE: class-conditional Gaussian anchors.
# ------------------------------------------------------------------------------------


def regression_anchor_class(labels, label_range: float = 3.0):
  """Anchor class 0..6 of sentiment labels in [-label_range, label_range].

    class = clip(round(label * 3 / label_range), -3, 3) + 3

  For [-3, 3] data (MOSI, MOSEI) this is the rounded label shifted to 0..6, the same
  7 classes as MMSA's acc7 (jnp.round rounds halves to even, like np.round there).
  For [-1, 1] data (SIMS, label_range=1) the labels are first stretched to [-3, 3], so
  every dataset gets the same 7 ordered classes; plain rounding would leave only three
  ({-1, 0, 1}) and merge -0.4 ... 0.4 into one neutral anchor.

  Args:
    labels: (B,) float sentiment scores.
    label_range: Python float, the largest absolute label (3.0 or 1.0).

  Returns:
    (B,) int32 in [0, 7).
  """
  # A Python-side factor keeps the [-3, 3] case exact (x * 1.0), so halves stay halves.
  stretched = _f32(labels) * (3.0 / float(label_range))
  return (jnp.clip(jnp.round(stretched), -3, 3) + 3).astype(jnp.int32)


def class_anchor_update(anchor_mean, anchor_var, anchor_count, features, labels, *,
                        momentum, num_classes, eps=1e-6):
  """EMA update of per-class diagonal Gaussian anchors from a batch (EASE Eq. 28-29).

  For each class k present in the batch, with the batch statistics
    m_k = mean of its features,  v_k = mean of (feature - m_k)^2 + eps   (biased, Eq. 29)
  the anchor becomes
    mean_k <- momentum * mean_k + (1 - momentum) * m_k   (likewise var_k with v_k),
  except for a class seen for the first time (count 0), which takes (m_k, v_k) directly.
  Classes absent from the batch are unchanged; count_k grows by the class's batch size.
  Features are stop-gradient: the anchors are running statistics, not parameters.
  Labels outside [0, num_classes) are ignored. The state layout matches
  `mer_jax.nn.gaussian.init_class_anchors` (mean 0, var 1, count 0).

  Args:
    anchor_mean: (K, D) current means.
    anchor_var: (K, D) current variances.
    anchor_count: (K,) samples absorbed so far (float or int).
    features: (B, D) full-modality features.
    labels: (B,) int class ids (e.g. `regression_anchor_class`).
    momentum: EMA factor in [0, 1) (weight of the old value, as flax BatchNorm).
    num_classes: K.
    eps: variance floor of Eq. 29.

  Returns:
    (mean (K, D), var (K, D), count (K,)), in the dtypes of the inputs.
  """
  if anchor_mean.shape[0] != num_classes:
    raise ValueError(f"anchor_mean has {anchor_mean.shape[0]} classes, expected {num_classes}")
  features = jax.lax.stop_gradient(_f32(features))
  labels = labels.astype(jnp.int32)
  batch_count = jax.ops.segment_sum(jnp.ones(labels.shape, jnp.float32), labels,
                                    num_segments=num_classes)
  denom = jnp.maximum(batch_count, 1.0)[:, None]
  batch_mean = jax.ops.segment_sum(features, labels, num_segments=num_classes) / denom
  centred = features - batch_mean[jnp.clip(labels, 0, num_classes - 1)]
  batch_var = jax.ops.segment_sum(jnp.square(centred), labels,
                                  num_segments=num_classes) / denom + eps

  present = (batch_count > 0)[:, None]
  first_seen = present & (anchor_count == 0)[:, None]
  old_mean, old_var = _f32(anchor_mean), _f32(anchor_var)
  ema_mean = momentum * old_mean + (1.0 - momentum) * batch_mean
  ema_var = momentum * old_var + (1.0 - momentum) * batch_var
  new_mean = jnp.where(first_seen, batch_mean, jnp.where(present, ema_mean, old_mean))
  new_var = jnp.where(first_seen, batch_var, jnp.where(present, ema_var, old_var))
  new_count = anchor_count + batch_count.astype(anchor_count.dtype)
  return (new_mean.astype(anchor_mean.dtype), new_var.astype(anchor_var.dtype), new_count)


def anchor_loss(mean, var, labels, anchor_mean, anchor_var, *, anchor_count=None, valid=None):
  """EASE's L_anchor: mean CS divergence (Eq. 24) of each sample's Gaussian to its class anchor.

    L = mean_i D_CS(N(mean_i, var_i) || N(anchor_mean[y_i], anchor_var[y_i]))

  The anchors are stop-gradient (running statistics). A sample counts only if its label
  is in [0, K), its `valid` flag is set (e.g. its modality was completed) and, when
  `anchor_count` is given, its class anchor has absorbed at least one sample. The loss
  is 0 when no sample counts.

  Args:
    mean: (B, D) completed feature z_hat (the mean of the completion distribution).
    var: (B, D) its variance (> 0).
    labels: (B,) int class ids.
    anchor_mean, anchor_var: (K, D) anchors.
    anchor_count: optional (K,) samples absorbed per class.
    valid: optional (B,) bool.

  Returns:
    Scalar float32.
  """
  num_classes = anchor_mean.shape[0]
  labels = labels.astype(jnp.int32)
  counts = (labels >= 0) & (labels < num_classes)
  safe = jnp.clip(labels, 0, num_classes - 1)
  if anchor_count is not None:
    counts &= anchor_count[safe] > 0
  if valid is not None:
    counts &= valid
  target_mean = jax.lax.stop_gradient(_f32(anchor_mean))[safe]
  target_var = jax.lax.stop_gradient(_f32(anchor_var))[safe]
  divergence = cs_divergence_gaussian(mean, var, target_mean, target_var)
  return jnp.sum(jnp.where(counts, divergence, 0.0)) / jnp.maximum(jnp.sum(counts), 1)
