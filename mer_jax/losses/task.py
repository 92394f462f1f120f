"""Task losses, per sample, for the three task kinds of SPEC section 4."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def task_loss_rows(outputs, labels, task: str, *, regression_loss: str = "l1"):
  """Supervised loss per row: (B,), or (B, K) for multilabel_binary, where every (sample,
  emotion) pair is one 2-class row. Same arguments as `task_loss`."""
  if task == "regression":
    diff = outputs - labels.astype(outputs.dtype)
    if regression_loss == "l1":
      return jnp.abs(diff)
    if regression_loss == "l2":
      return jnp.square(diff)
    raise ValueError(f"config.loss.regression_loss must be 'l1' or 'l2', got {regression_loss!r}")
  if task in ("classification", "multilabel_binary"):
    return optax.softmax_cross_entropy_with_integer_labels(outputs, labels)
  raise ValueError(f"unknown task {task!r}")


def mean_over_emotions(rows):
  """(B,) or (B, K) per-row values -> (B,): multilabel rows averaged over the emotions."""
  return rows if rows.ndim == 1 else rows.mean(axis=-1)


def task_loss(outputs, labels, task: str, *, regression_loss: str = "l1"):
  """Per-sample supervised loss.

  Args:
    outputs: regression (B,); classification logits (B, K); multilabel_binary
      logits (B, K, 2).
    labels: regression float (B,); classification int (B,); multilabel_binary int
      (B, K) in {0, 1}.
    task: "regression", "classification" or "multilabel_binary".
    regression_loss: "l1" (MAE, the MMSA/DQF/SUGR choice) or "l2" (MSE).

  Returns:
    (B,) losses. Multilabel-binary averages the per-emotion cross-entropies: MulT and the
    official CMAD code flatten the logits to (B*K, 2) and take the mean (SPEC section 7).
  """
  return mean_over_emotions(task_loss_rows(outputs, labels, task,
                                           regression_loss=regression_loss))


def predicted_probabilities(outputs, task: str):
  """Class probabilities (classification, multilabel) or P(label >= 0) (regression)."""
  if task == "regression":
    return jax.nn.sigmoid(outputs)
  return jax.nn.softmax(outputs, axis=-1)


def predictive_entropy(outputs, task: str):
  """Per-sample entropy of the predictive distribution (nats); averaged over emotions."""
  probs = predicted_probabilities(outputs, task)
  if task == "regression":
    probs = jnp.stack([1 - probs, probs], axis=-1)
  entropy = -jnp.sum(probs * jnp.log(jnp.clip(probs, 1e-12)), axis=-1)
  return mean_over_emotions(entropy)
