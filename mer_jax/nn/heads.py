"""Prediction heads shared by every method."""

from __future__ import annotations

import math

import flax.linen as nn


class OutputHead(nn.Module):
  """MLP (or linear when `hidden_dim == 0`) to the task's output shape.

  `output_shape` is `DataSpec.output_shape`: () regression -> (B,), (K,) -> (B, K),
  (K, 2) multilabel-binary -> (B, K, 2).
  """

  output_shape: tuple[int, ...]
  hidden_dim: int = 0
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, *, train: bool):
    if self.hidden_dim:
      x = nn.gelu(nn.Dense(self.hidden_dim, name="hidden")(x))
      x = nn.Dropout(self.dropout)(x, deterministic=not train)
    size = math.prod(self.output_shape) if self.output_shape else 1
    y = nn.Dense(size, name="out")(x)
    return y.reshape(x.shape[:-1] + tuple(self.output_shape))
