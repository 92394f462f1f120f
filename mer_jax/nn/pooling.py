"""Masked pooling over the time axis, safe for samples whose frames are all padding.

Every module that turns a padded sequence into one vector goes through here, so that
"padding never changes a result" and "an empty sequence pools to 0, not NaN" hold in
one place. Padded values are selected away with `jnp.where` (not multiplied by 0), so
even inf/NaN in padding cannot reach the output or its gradient.
"""

from __future__ import annotations

import jax.numpy as jnp


def masked_mean(x, mask):
  """Mean over the real frames.

  Args:
    x: (..., T, D) features.
    mask: (..., T) bool, True on real frames.

  Returns:
    (..., D); 0 for a sample with no real frame.
  """
  keep = mask[..., None]
  total = jnp.sum(jnp.where(keep, x, 0.0), axis=-2)
  count = jnp.sum(mask, axis=-1, dtype=x.dtype)[..., None]
  return total / jnp.maximum(count, 1.0)


def masked_max(x, mask):
  """Maximum over the real frames.

  Args:
    x: (..., T, D) features.
    mask: (..., T) bool, True on real frames.

  Returns:
    (..., D); 0 for a sample with no real frame.
  """
  keep = mask[..., None]
  # The dtype's minimum rather than -inf keeps the max (and its gradient) finite.
  lowest = jnp.finfo(x.dtype).min
  maximum = jnp.max(jnp.where(keep, x, lowest), axis=-2)
  return jnp.where(jnp.any(mask, axis=-1)[..., None], maximum, 0.0)
