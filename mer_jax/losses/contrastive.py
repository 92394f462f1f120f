"""Contrastive losses on batch embeddings: MCB-CL (MCUR) and the variants it is compared to.

All functions take embeddings (B, D) from one global batch, L2-normalise them inside and
compare them with dot products divided by a temperature. They are pure, jit- and
vmap-compatible, and well defined for any batch: an anchor without positives contributes
nothing, and a loss with no usable anchor is 0 (with zero, finite gradients).

Kinds (MCUR Table 3, selected with `contrastive_loss(kind, ...)`):
  "mcb"           MCB-CL, MCUR Eq. 2-5 (positives: same modality combination and category).
  "supcon"        Khosla et al. 2020 supervised contrastive (positives: same category).
  "infonce"       traditional CL (CLIP-style InfoNCE, MCUR ref. [27]): each sample is its
                  own class; the positive is the same sample in a second view.
  "one_instance"  MCB-CL with one positive per anchor, drawn at random, in each numerator.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

CONTRASTIVE_KINDS = ("mcb", "supcon", "infonce", "one_instance")

# Finite stand-in for log(0) in masked log-sum-exps: exp() of it underflows to exactly 0,
# but unlike -inf it keeps `masked - masked` and its gradients finite for empty masks.
_LOG_ZERO = -1e9


def _l2_normalize(x, eps=1e-12):
  # max(|x|^2, eps^2) rather than max(|x|, eps): sqrt has an infinite gradient at 0.
  sq_norm = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq_norm, eps * eps))


def _cosine_logits(embeddings, temperature):
  """(B, B) similarities x_i . x_j / tau of the L2-normalised embeddings, in float32."""
  x = _l2_normalize(embeddings.astype(jnp.float32))
  return x @ x.T / temperature


def _masked_logsumexp(logits, mask):
  """Row-wise log sum_{j: mask[i, j]} exp(logits[i, j]); about -1e9 for an empty row."""
  return jax.nn.logsumexp(jnp.where(mask, logits, _LOG_ZERO), axis=-1)


def _mean_where(values, valid):
  """Mean of `values` over the entries where `valid`; 0 when there are none."""
  count = jnp.sum(valid)
  return jnp.sum(jnp.where(valid, values, 0.0)) / jnp.maximum(count, 1)


def contrastive_categories(labels, task: str):
  """Category id per sample that the contrastive losses use as "same emotion".

  Args:
    labels: regression float (B,); classification int (B,); multilabel_binary int
      (B, K) in {0, 1}.
    task: "regression", "classification" or "multilabel_binary".

  Returns:
    (B,) int32 categories:
      classification: the class;
      regression: the sign class, 0 for label < 0 and 1 for label >= 0 (MCUR evaluates
        MOSI/MOSEI as negative / non-negative, so this is the category it predicts);
      multilabel_binary: the index of the present emotion (the lowest index if several
        are present) and K, an extra "no emotion" category, when none is present.
  """
  if task == "classification":
    return labels.astype(jnp.int32)
  if task == "regression":
    return (labels >= 0).astype(jnp.int32)
  if task == "multilabel_binary":
    present = labels > 0
    num_emotions = labels.shape[-1]
    first_present = jnp.argmax(present, axis=-1).astype(jnp.int32)
    return jnp.where(present.any(axis=-1), first_present, num_emotions).astype(jnp.int32)
  raise ValueError(f"unknown task {task!r}")


def _mcb_sets(labels, combos):
  """Anchor-excluded positive sets of MCUR Eq. 2-4, each a (B, B) bool matrix.

  Returns (not_self, same_combo, same_category, same_both): all samples but the anchor;
  M_i (same combination); S_i (same category); N_i (same combination and category).
  """
  batch_size = labels.shape[0]
  not_self = ~jnp.eye(batch_size, dtype=bool)
  same_combo = (combos[:, None] == combos[None, :]) & not_self
  same_category = (labels[:, None] == labels[None, :]) & not_self
  return not_self, same_combo, same_category, same_combo & same_category


def _mcb_from_numerators(logits, sets, log_num_combo, log_num_both, mu1, mu2):
  """Eq. 5 given the log-numerators of Eq. 2 (`log_num_combo`) and Eq. 3-4 (`log_num_both`)."""
  not_self, same_combo, same_category, same_both = sets
  # log p(c|x): same combination among all other samples (Eq. 2).
  log_p_combo = log_num_combo - _masked_logsumexp(logits, not_self)
  # log p(k|c,x): same category among the same combination (Eq. 3).
  log_p_cat_given_combo = log_num_both - _masked_logsumexp(logits, same_combo)
  # log p(c|x,k): same combination among the same category (Eq. 4).
  log_p_combo_given_cat = log_num_both - _masked_logsumexp(logits, same_category)
  has_combo = same_combo.any(axis=-1)
  has_both = same_both.any(axis=-1)
  term1 = _mean_where(log_p_combo, has_combo)
  term2 = _mean_where(log_p_cat_given_combo, has_both)
  term3 = _mean_where(log_p_combo_given_cat, has_both)
  return -(term1 + mu1 * term2 - mu2 * term3)


def mcb_contrastive(embeddings, labels, combos, *, temperature, mu1=1.0, mu2=1.0):
  """MCB-CL: modality-combination- and category-based contrastive loss (MCUR Eq. 2-5).

  With s_ij = x_i . x_j / tau on L2-normalised embeddings and every set excluding the
  anchor i (M_i: same combination, S_i: same category, N_i = M_i & S_i):
    log p(c|x_i)   = log sum_{j in M_i} e^{s_ij} - log sum_{l != i} e^{s_il}     (Eq. 2)
    log p(k|c,x_i) = log sum_{j in N_i} e^{s_ij} - log sum_{l in M_i} e^{s_il}       (Eq. 3)
    log p(c|x_i,k) = log sum_{j in N_i} e^{s_ij} - log sum_{l in S_i} e^{s_il}       (Eq. 4)
    L_CL = -[mean_i log p(c|x_i) + mu1 mean_i log p(k|c,x_i) - mu2 mean_i log p(c|x_i,k)]
  (Eq. 5, with the paper's minus sign on the mu2 term). Each mean runs over the anchors
  whose numerator set is non-empty (M_i for Eq. 2, N_i for Eq. 3-4) and is 0 if none is.
  A batch with a single combination leaves only the Eq. 3 term (the other two are log 1).

  Args:
    embeddings: (B, D) float, e.g. the student's fused embeddings E^s.
    labels: (B,) int category ids (see `contrastive_categories`).
    combos: (B,) int modality-combination ids (0..6, SPEC section 4).
    temperature: tau > 0.
    mu1, mu2: weights of the Eq. 3 and Eq. 4 terms.

  Returns:
    Scalar float32 loss.
  """
  logits = _cosine_logits(embeddings, temperature)
  sets = _mcb_sets(labels, combos)
  _, same_combo, _, same_both = sets
  return _mcb_from_numerators(
      logits, sets, _masked_logsumexp(logits, same_combo),
      _masked_logsumexp(logits, same_both), mu1, mu2)


def one_instance_mcb_contrastive(embeddings, labels, combos, *, temperature, key, mu1=1.0,
                                 mu2=1.0):
  """MCB-CL with a single positive per anchor (MCUR Table 3, "1-instance").

  Same as `mcb_contrastive` except that each numerator sum is replaced by one positive
  drawn uniformly at random from its set: j1 from M_i for Eq. 2, j2 from N_i for Eq. 3
  and Eq. 4 (the same j2 in both). Denominators keep their full sets.

  Args:
    embeddings, labels, combos, temperature, mu1, mu2: as `mcb_contrastive`.
    key: jax.random key that draws the positives.

  Returns:
    Scalar float32 loss.
  """
  logits = _cosine_logits(embeddings, temperature)
  sets = _mcb_sets(labels, combos)
  _, same_combo, _, same_both = sets
  # Uniform scores >= 0 with the non-members pushed to -1: argmax is a uniform draw from
  # the set (and an arbitrary index, ignored later, for an empty set).
  scores = jax.random.uniform(key, logits.shape)
  pick_combo = jnp.argmax(jnp.where(same_combo, scores, -1.0), axis=-1)
  pick_both = jnp.argmax(jnp.where(same_both, scores, -1.0), axis=-1)
  log_num_combo = jnp.take_along_axis(logits, pick_combo[:, None], axis=-1)[:, 0]
  log_num_both = jnp.take_along_axis(logits, pick_both[:, None], axis=-1)[:, 0]
  return _mcb_from_numerators(logits, sets, log_num_combo, log_num_both, mu1, mu2)


def supervised_contrastive(embeddings, labels, *, temperature):
  """Supervised contrastive loss, Khosla et al. 2020 (the L_out form; MCUR Table 3 "SupCon").

    L = mean_{i: P_i != {}} -1/|P_i| sum_{p in P_i} log( e^{s_ip} / sum_{a != i} e^{s_ia} )
  with s_ij = x_i . x_j / tau on L2-normalised embeddings and P_i the other samples with
  the same label. (The reference code's tau/base_tau factor is 1 here.) 0 if no anchor has
  a positive.

  Args:
    embeddings: (B, D) float.
    labels: (B,) int category ids.
    temperature: tau > 0.

  Returns:
    Scalar float32 loss.
  """
  logits = _cosine_logits(embeddings, temperature)
  not_self = ~jnp.eye(labels.shape[0], dtype=bool)
  positives = (labels[:, None] == labels[None, :]) & not_self
  log_prob = logits - _masked_logsumexp(logits, not_self)[:, None]
  num_positives = positives.sum(axis=-1)
  mean_log_prob = (jnp.sum(jnp.where(positives, log_prob, 0.0), axis=-1)
                   / jnp.maximum(num_positives, 1))
  return -_mean_where(mean_log_prob, num_positives > 0)


def cross_modal_supervised_contrastive(embeddings, labels, *, temperature):
  """CM-ARR's L_spcl (cm_arr.txt Sec. 3.3.1): SupCon whose positives are *other
  modalities of other instances* with the same label.

  For the representation of modality m of sample i, the candidates are the
  representations of the other modalities n != m of the other samples j != i;
  positives are those with y_j = y_i, negatives those with another label. Pairs of the
  same modality, and the other modalities of the same sample, are neither (they are left
  out of the denominator): the paper's positives are "modalities from different instances
  but with the same emotion labels" and its negatives "those from different labels",
  which turns the one-to-one cross-modal pairing of L_udcl into a many-to-many one.

    L = mean_{(m,i): P != {}} -1/|P| sum_{p in P} log( e^{s_p} / sum_{a in C} e^{s_a} )

  with s = x . x' / tau on L2-normalised representations.

  Args:
    embeddings: (M, B, D) float, one (B, D) block per modality.
    labels: (B,) int category ids.
    temperature: tau > 0.

  Returns:
    Scalar float32 loss; 0 if no anchor has a positive.
  """
  num_modalities, batch_size = embeddings.shape[:2]
  logits = _cosine_logits(embeddings.reshape(num_modalities * batch_size, -1), temperature)
  modality = jnp.repeat(jnp.arange(num_modalities), batch_size)
  instance = jnp.tile(jnp.arange(batch_size), num_modalities)
  category = jnp.tile(labels, num_modalities)
  candidates = ((modality[:, None] != modality[None, :])
                & (instance[:, None] != instance[None, :]))
  positives = candidates & (category[:, None] == category[None, :])
  log_prob = logits - _masked_logsumexp(logits, candidates)[:, None]
  num_positives = positives.sum(axis=-1)
  mean_log_prob = (jnp.sum(jnp.where(positives, log_prob, 0.0), axis=-1)
                   / jnp.maximum(num_positives, 1))
  return -_mean_where(mean_log_prob, num_positives > 0)


def infonce(embeddings, paired_embeddings, *, temperature):
  """Traditional instance-discrimination CL: symmetric InfoNCE as in CLIP (MCUR ref. [27]).

  Each sample is its own class: anchor x_i (first view) has the single positive y_i (the
  same sample in the second view) and the other y_j as negatives, and symmetrically. In
  MCUR the two views are the student's (missing-modality) and the teacher's (full)
  embeddings of the same utterance. Labels are not used.

    L = (CE(softmax_j(x_i . y_j / tau), i) + CE(softmax_j(y_i . x_j / tau), i)) / 2, mean over i.

  Args:
    embeddings: (B, D) float, first view.
    paired_embeddings: (B, D) float, second view, row i paired with row i.
    temperature: tau > 0.

  Returns:
    Scalar float32 loss.
  """
  x = _l2_normalize(embeddings.astype(jnp.float32))
  y = _l2_normalize(paired_embeddings.astype(jnp.float32))
  logits = x @ y.T / temperature
  targets = jnp.arange(logits.shape[0])
  forward = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  backward = optax.softmax_cross_entropy_with_integer_labels(logits.T, targets)
  return jnp.mean(forward + backward) / 2


def contrastive_loss(kind: str, embeddings, labels, combos, *, temperature, mu1=1.0, mu2=1.0,
                     paired_embeddings=None, key=None):
  """The contrastive loss selected by `kind` (the MCUR Table 3 ablation switch).

  Args:
    kind: one of `CONTRASTIVE_KINDS`: "mcb", "supcon", "infonce", "one_instance".
    embeddings: (B, D) float.
    labels: (B,) int category ids (ignored by "infonce").
    combos: (B,) int combination ids (used by "mcb" and "one_instance").
    temperature: tau > 0.
    mu1, mu2: MCB-CL term weights ("mcb", "one_instance").
    paired_embeddings: (B, D) second view, required by "infonce".
    key: jax.random key, required by "one_instance".

  Returns:
    Scalar float32 loss.
  """
  if kind == "mcb":
    return mcb_contrastive(embeddings, labels, combos, temperature=temperature, mu1=mu1, mu2=mu2)
  if kind == "supcon":
    return supervised_contrastive(embeddings, labels, temperature=temperature)
  if kind == "infonce":
    if paired_embeddings is None:
      raise ValueError("contrastive kind 'infonce' needs paired_embeddings (the second view)")
    return infonce(embeddings, paired_embeddings, temperature=temperature)
  if kind == "one_instance":
    if key is None:
      raise ValueError("contrastive kind 'one_instance' needs a jax.random key")
    return one_instance_mcb_contrastive(
        embeddings, labels, combos, temperature=temperature, key=key, mu1=mu1, mu2=mu2)
  raise ValueError(f"contrastive kind must be one of {CONTRASTIVE_KINDS}, got {kind!r}")
