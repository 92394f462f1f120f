"""Task losses, per sample, for the three task kinds of SPEC section 4."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


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
    (B,) losses. Multilabel-binary sums the per-emotion cross-entropies, as MulT.
  """
  if task == "regression":
    diff = outputs - labels.astype(outputs.dtype)
    if regression_loss == "l1":
      return jnp.abs(diff)
    if regression_loss == "l2":
      return jnp.square(diff)
    raise ValueError(f"config.loss.regression_loss must be 'l1' or 'l2', got {regression_loss!r}")
  if task == "classification":
    return optax.softmax_cross_entropy_with_integer_labels(outputs, labels)
  if task == "multilabel_binary":
    return optax.softmax_cross_entropy_with_integer_labels(outputs, labels).sum(axis=-1)
  raise ValueError(f"unknown task {task!r}")


def predicted_probabilities(outputs, task: str):
  """Class probabilities (classification, multilabel) or P(label >= 0) (regression)."""
  if task == "regression":
    return jax.nn.sigmoid(outputs)
  return jax.nn.softmax(outputs, axis=-1)


def predictive_entropy(outputs, task: str):
  """Per-sample entropy of the predictive distribution (nats); summed over emotions."""
  probs = predicted_probabilities(outputs, task)
  if task == "regression":
    probs = jnp.stack([1 - probs, probs], axis=-1)
  entropy = -jnp.sum(probs * jnp.log(jnp.clip(probs, 1e-12)), axis=-1)
  if task == "multilabel_binary":
    entropy = entropy.sum(axis=-1)
  return entropy
