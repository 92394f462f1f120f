"""Knowledge-distillation losses: DKD, SUGR (MCUR), CAFD and MAR (CMAD).

Pure functions of arrays, jit- and vmap-compatible; computed in float32. Teacher
outputs are used as given: the methods pass the outputs of a frozen teacher, so no
stop-gradient is applied here (SUGR's uncertainty term is differentiated through both
sides, as the paper writes it).

Task kinds (SPEC section 4): regression outputs (B,); classification logits (B, K) with
int labels (B,); multilabel_binary logits (B, K, 2) with int labels (B, K) in {0, 1}.
For multilabel_binary every (sample, emotion) pair is one 2-class row: entropy,
cross-entropy, DKD and SUGR's weighted product are computed per row and averaged over
the K emotions (SPEC section 7; the official CMAD `loss.py` and MulT flatten the logits
to (B*K, 2) and take the mean, so a sum would weight these terms K times against the
sample-level ones).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

NUM_COMBINATIONS = 7

# Finite stand-in for a -inf logit: its softmax probability is exactly 0 while
# `0 * (masked - masked)` and gradients stay finite (DKD masks the target class).
_MASKED_LOGIT = -1e9


def _as_vector(x):
  """Regression outputs (B,) or (B, 1) as float32 (B,)."""
  return jnp.reshape(x, (x.shape[0],)).astype(jnp.float32)


def _mean_over_heads(x):
  """(B, ...) -> (B,): averages per-emotion-head rows (no-op for (B,))."""
  return jnp.reshape(x, (x.shape[0], -1)).mean(axis=-1)


def dkd(student_logits, teacher_logits, labels, *, alpha, beta, temperature):
  """Decoupled knowledge distillation (Zhao et al., CVPR 2022), per sample.

  With p = softmax(z / T) and target class t:
    TCKD = KL(b^T || b^S), b = (p_t, 1 - p_t), the binary target / non-target split;
    NCKD = KL(p_hat^T || p_hat^S), p_hat = softmax over the non-target logits (z / T);
    DKD  = T^2 * (alpha * TCKD + beta * NCKD).
  MCUR Eq. 11 and CMAD Eq. 12 use beta = 1 - alpha. For a 2-class head NCKD is 0.

  Args:
    student_logits: (B, K) or (B, K, C) (multilabel: K heads of C = 2 classes).
    teacher_logits: same shape.
    labels: (B,) int, or (B, K) int for rank-3 logits.
    alpha, beta: weights of TCKD and NCKD.
    temperature: T > 0.

  Returns:
    (B,) float32; for rank-3 logits, the mean over the K heads.
  """
  return _mean_over_heads(_dkd_rows(student_logits, teacher_logits, labels, alpha=alpha,
                                    beta=beta, temperature=temperature))


def _dkd_rows(student_logits, teacher_logits, labels, *, alpha, beta, temperature):
  """DKD per row: (B,) for (B, C) logits, (B, K) for (B, K, C)."""
  num_classes = student_logits.shape[-1]
  target = jax.nn.one_hot(labels, num_classes, dtype=bool)
  log_p_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  log_p_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)

  def binary_log_probs(log_p):
    # log p_t and log(1 - p_t) = logsumexp over the non-target log-probabilities: exact
    # in log space, so a confident prediction (p_t -> 1) does not produce log(0).
    log_target = jnp.sum(jnp.where(target, log_p, 0.0), axis=-1)
    log_other = jax.nn.logsumexp(jnp.where(target, _MASKED_LOGIT, log_p), axis=-1)
    return jnp.stack([log_target, log_other], axis=-1)

  log_b_s, log_b_t = binary_log_probs(log_p_s), binary_log_probs(log_p_t)
  tckd = jnp.sum(jnp.exp(log_b_t) * (log_b_t - log_b_s), axis=-1)

  log_q_s = jax.nn.log_softmax(jnp.where(target, _MASKED_LOGIT, log_p_s), axis=-1)
  log_q_t = jax.nn.log_softmax(jnp.where(target, _MASKED_LOGIT, log_p_t), axis=-1)
  nckd = jnp.sum(jnp.exp(log_q_t) * (log_q_t - log_q_s), axis=-1)

  return (alpha * tckd + beta * nckd) * temperature**2


def _entropy_rows(logits):
  """Softmax entropy over the last axis, per row: (B,) or (B, K)."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def _cross_entropy_rows(logits, labels):
  """Softmax cross-entropy with int labels, per row: (B,) or (B, K)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def sugr(student_out, teacher_out, targets, *, task, alpha=0.5, temperature=1.0,
         use_uncertainty=True, use_logits=True, detach_weight=False):
  """Sample-wise uncertainty-guided regularisation (MCUR Eq. 7-14), per sample.

    H        = softmax entropy (classification) or (y - y_hat)^2 (regression)  (Eq. 7-8)
    L_uncer  = |H(teacher) - H(student)|                                    (Eq. 9)
    L_logits = (y_s - y_t)^2 (regression) or DKD with beta = 1 - alpha      (Eq. 10-11)
    L_task   = |y - y_s| (regression) or cross-entropy                      (Eq. 12-13)
    L_SUGR   = L_uncer * (L_task + L_logits)                                (Eq. 14)

  Multilabel-binary: every quantity, the product included, is computed per (sample,
  emotion) row and the rows' L_SUGR are averaged over the emotions.

  Args:
    student_out: regression (B,) (or (B, 1)); classification (B, K); multilabel (B, K, 2).
    teacher_out: same shape as student_out.
    targets: regression float (B,); classification int (B,); multilabel int (B, K).
    task: "regression", "classification" or "multilabel_binary".
    alpha: DKD's TCKD weight (NCKD gets 1 - alpha).
    temperature: DKD temperature (entropy and cross-entropy use temperature 1).
    use_uncertainty: False replaces L_uncer by 1 (MCUR Table 2, "w/o L_Uncer").
    use_logits: False drops L_logits (MCUR Table 2, "w/o L_Logits").
    detach_weight: stop the gradient through L_uncer, so that it only weights the other
      terms (Eq. 14 as written differentiates it; False by default).

  Returns:
    (B,) float32.
  """
  if task == "regression":
    y = _as_vector(targets)
    y_s, y_t = _as_vector(student_out), _as_vector(teacher_out)
    h_s, h_t = jnp.square(y - y_s), jnp.square(y - y_t)
    logits_term = jnp.square(y_s - y_t)
    task_term = jnp.abs(y - y_s)
  elif task in ("classification", "multilabel_binary"):
    expected_rank = 2 if task == "classification" else 3
    if student_out.ndim != expected_rank:
      raise ValueError(f"sugr task {task!r} expects rank-{expected_rank} logits, got shape "
                       f"{student_out.shape}")
    h_s, h_t = _entropy_rows(student_out), _entropy_rows(teacher_out)
    logits_term = _dkd_rows(student_out, teacher_out, targets, alpha=alpha, beta=1.0 - alpha,
                            temperature=temperature)
    task_term = _cross_entropy_rows(student_out, targets)
  else:
    raise ValueError(f"unknown task {task!r}")
  weight = jnp.abs(h_t - h_s) if use_uncertainty else jnp.ones_like(task_term)
  if detach_weight:
    weight = jax.lax.stop_gradient(weight)
  if not use_logits:
    logits_term = jnp.zeros_like(task_term)
  return _mean_over_heads(weight * (task_term + logits_term))


def _cosine_matrix(a, b, eps=1e-8):
  """(B, B) cosine similarities cos(a_i, b_j), float32."""

  def normalize(x):
    # max(|x|^2, eps^2): sqrt has an infinite gradient at 0.
    sq_norm = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq_norm, eps * eps))

  return normalize(a.astype(jnp.float32)) @ normalize(b.astype(jnp.float32)).T


CAFD_MODES = ("full", "mse_only", "sim_only", "correlation")


def _symmetric_row_kl(logits_a, logits_b):
  """(KL(softmax(a_i) || softmax(b_i)) + KL(softmax(b_i) || softmax(a_i))) / 2 per row."""
  log_p = jax.nn.log_softmax(logits_a, axis=-1)
  log_q = jax.nn.log_softmax(logits_b, axis=-1)
  kl_pq = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  kl_qp = jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)
  return (kl_pq + kl_qp) / 2


def cafd(student_emb, teacher_emb, *, tau, mode="full"):
  """Correlation-aware feature distillation (CMAD, in the form of its public code).

  With s, t the (B, D) student and teacher fused embeddings:
    mse_i    = mean_d (s_id - t_id)^2
    S_st     = cos(s_i, t_j), S_tt = cos(t_i, t_j)                       (B, B)
    diff     = |S_tt - S_st|;  l_struct = trace(diff) / sum(diff)  (0 if sum(diff) = 0)
    bikl_i   = (KL(P_i || Q_i) + KL(Q_i || P_i)) / 2, P_i = softmax(S_tt[i] / tau),
               Q_i = softmax(S_st[i] / tau)
    full        L_CAFD = mean_i(bikl_i * mse_i) + l_struct  (`compute_weighted_mse_loss`)
  and the supplement's Sec. 7.3 ablations (Tables 7-10), as the official code logs them:
    mse_only    mean_i mse_i                           (feature consistency L^MSE alone)
    sim_only    mean_i bikl_i + l_struct               (correlation consistency alone)
    correlation mean_i bikl(S_ss[i] / tau, S_tt[i] / tau), S_ss = cos(s_i, s_j): the
                teacher's sample correlations transferred directly to the student's
                (`compute_correlation_loss`)

  Args:
    student_emb: (B, D) float.
    teacher_emb: (B, D) float.
    tau: softmax temperature of the correlation rows.
    mode: one of `CAFD_MODES`.

  Returns:
    Scalar float32 loss.
  """
  if mode not in CAFD_MODES:
    raise ValueError(f"config.loss.cafd_mode must be one of {CAFD_MODES}, got {mode!r}")
  s = student_emb.astype(jnp.float32)
  t = teacher_emb.astype(jnp.float32)
  mse = jnp.mean(jnp.square(s - t), axis=-1)
  sim_tt = _cosine_matrix(t, t)
  if mode == "mse_only":
    return jnp.mean(mse)
  if mode == "correlation":
    return jnp.mean(_symmetric_row_kl(sim_tt / tau, _cosine_matrix(s, s) / tau))
  sim_st = _cosine_matrix(s, t)
  diff = jnp.abs(sim_tt - sim_st)
  total = jnp.sum(diff)
  # Identical correlations give 0/0: no structural mismatch, so the term is 0.
  l_struct = jnp.where(total > 0, jnp.trace(diff) / jnp.where(total > 0, total, 1.0), 0.0)
  bikl = _symmetric_row_kl(sim_tt / tau, sim_st / tau)
  if mode == "sim_only":
    return jnp.mean(bikl) + l_struct
  return jnp.mean(bikl * mse) + l_struct


# --- MAR: modalities-aware regularisation (CMAD supplement, Table 5 and Algorithm 1) ---
#
# The memory is a dict of arrays so that it lives in the jitted training state:
#   sums (7,) float32     sum of difficulties d_i seen per combination (Eq. 8-9 numerator)
#   counts (7,) float32   number of samples seen per combination (N_m)
#   weights (7,) float32  Psi per combination; ones until `mar_finalize`
#   fixed () bool         True once `mar_finalize` has run; accumulation then stops


def mar_init(num_combinations: int = NUM_COMBINATIONS):
  """Fresh MAR memory: nothing accumulated, weights 1, not fixed."""
  return dict(
      sums=jnp.zeros((num_combinations,), jnp.float32),
      counts=jnp.zeros((num_combinations,), jnp.float32),
      weights=jnp.ones((num_combinations,), jnp.float32),
      fixed=jnp.asarray(False),
  )


def mar_difficulty(student_task_loss, teacher_task_loss):
  """Difficulty difference d = relu(l_s - l_t) (Table 5, Eq. 6-7), elementwise: per sample
  (B,), or per (sample, emotion) row (B, K) for multilabel heads (the caller averages the
  rows over the emotions)."""
  return jax.nn.relu(student_task_loss.astype(jnp.float32)
                     - teacher_task_loss.astype(jnp.float32))


def mar_update(memory, difficulty, combination_ids, *, valid=None):
  """Accumulates per-combination difficulty sums and counts (no-op once `fixed`).

  Args:
    memory: MAR memory (see `mar_init`).
    difficulty: (B,) float, from `mar_difficulty`; not differentiated through.
    combination_ids: (B,) int in [0, 7).
    valid: optional (B,) bool; False rows (batch padding) are not counted.

  Returns:
    The updated memory.
  """
  num_combinations = memory["sums"].shape[0]
  difficulty = jax.lax.stop_gradient(difficulty.astype(jnp.float32))
  weight = jnp.ones_like(difficulty) if valid is None else valid.astype(jnp.float32)
  onehot = jax.nn.one_hot(combination_ids, num_combinations, dtype=jnp.float32)
  keep = 1.0 - memory["fixed"].astype(jnp.float32)
  return dict(
      memory,
      sums=memory["sums"] + keep * ((weight * difficulty) @ onehot),
      counts=memory["counts"] + keep * (weight @ onehot),
  )


def mar_finalize(memory, *, rho):
  """Sets Psi_c = rho * (W_c / max W)^2 from the accumulated means and fixes it (Eq. 9-10).

  W_c is the mean difficulty of combination c, and 0 for a combination never seen (Eq. 9
  as written), so such a combination gets weight 0. If every W_c is 0 (the student was
  never worse than the teacher), the combinations seen tie at the top and get rho.

  Args:
    memory: MAR memory after the accumulation epochs.
    rho: scale of the largest weight.

  Returns:
    The memory with `weights` set and `fixed` True.
  """
  counts = memory["counts"]
  seen = counts > 0
  mean_difficulty = jnp.where(seen, memory["sums"] / jnp.where(seen, counts, 1.0), 0.0)
  max_difficulty = jnp.max(mean_difficulty)
  ratio = jnp.where(max_difficulty > 0,
                    mean_difficulty / jnp.where(max_difficulty > 0, max_difficulty, 1.0),
                    seen.astype(jnp.float32))
  return dict(memory, weights=(rho * jnp.square(ratio)).astype(jnp.float32),
              fixed=jnp.asarray(True))


def mar_weights(memory, combination_ids):
  """Psi_{c_i} per sample: (B,) float32 (all ones before `mar_finalize`)."""
  return memory["weights"][combination_ids]


def kd_regression_aux(y_s, y_t, *, phi):
  """CMAD's regression auxiliary loss MSE(y_s / phi, y_t / phi) * phi^2 (Table 5, Eq. 13): (B,)."""
  return jnp.square(_as_vector(y_s) / phi - _as_vector(y_t) / phi) * phi**2
