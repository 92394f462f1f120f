"""Likelihood and prior terms of diagonal-Gaussian representations (EASE UCMI, MCUR VIB).

Pure functions of arrays, jit- and vmap-compatible, computed in float32.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

_LOG_2PI = math.log(2.0 * math.pi)


def gaussian_nll(x, mean, var):
  """Negative log-likelihood of x under N(mean, diag(var)), per sample (EASE Eq. 4 / 16).

    NLL = 1/2 sum_d [ log(2 pi) + log var_d + (x_d - mean_d)^2 / var_d ]

  The full density is used (with the log(2 pi) constant), so the value is a proper NLL
  that can be compared across feature widths; the constant does not change gradients.
  EASE's UCMI passes the full-modality feature z_B (stop-gradient, the caller's job) as x.

  Args:
    x: (..., D) observations.
    mean: (..., D) means (broadcast against x).
    var: (..., D) variances > 0 (e.g. softplus(.) + 1e-6).

  Returns:
    (...,) float32, summed over the last axis: (B,) for (B, D) inputs.
  """
  x = jnp.asarray(x, jnp.float32)
  mean = jnp.asarray(mean, jnp.float32)
  var = jnp.asarray(var, jnp.float32)
  return 0.5 * jnp.sum(_LOG_2PI + jnp.log(var) + jnp.square(x - mean) / var, axis=-1)


def vib_kl(mu, sigma):
  """KL(N(mu, diag(sigma^2)) || N(0, I)) of MCUR's VIB, averaged over every element.

    kl = 1/2 mean(mu^2 + sigma^2 - 2 log sigma - 1)

  (SPEC section 7, MCUR: the mean over batch and dimensions, not the per-sample sum, so
  the weight beta does not depend on the bottleneck width.)

  Args:
    mu: (B, D) means.
    sigma: (B, D) standard deviations > 0.

  Returns:
    Scalar float32.
  """
  mu = jnp.asarray(mu, jnp.float32)
  sigma = jnp.asarray(sigma, jnp.float32)
  return 0.5 * jnp.mean(jnp.square(mu) + jnp.square(sigma) - 2.0 * jnp.log(sigma) - 1.0)
