"""Per-frame normalizing flows for CM-ARR's reconstruction phase (cm_arr.txt Sec. 3.2).

Each modality has a flow F_n that maps its projected features X_n (B, T, D) to a latent
Z_n that is trained to be standard normal (Eq. 6, DiCMoR-style likelihood), and an exact
inverse F_n^-1 that decodes an estimated latent back to feature space (Eq. 8).

The flow is a RealNVP stack of affine coupling layers over the channel axis, applied to
every frame independently (the time axis only carries padding): a fixed even/odd channel
mask splits the channels; the kept half passes through unchanged and conditions a
per-frame MLP that gives a log-scale and a shift for the other half; consecutive layers
alternate which half is kept, so after two layers every channel has been transformed.

Padding: the log-determinant is summed over real frames only, and padded frames pass
through every layer unchanged (forward and inverse), so a padded frame's content never
affects a real frame's latent or the likelihood.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp


def _check_width(x, features: int, name: str):
  if x.shape[-1] != features:
    raise ValueError(f"{name} expects inputs of width features={features} on the last axis, "
                     f"got shape {x.shape}")


class AffineCoupling(nn.Module):
  """One RealNVP affine coupling layer over the channels of each frame.

  With b the binary channel mask (1 on channels `c % 2 == parity`, which pass through),
      z = b * x + (1 - b) * (x * exp(s(b * x)) + t(b * x)),
      s = scale_factor * tanh(raw_s),
  where (raw_s, t) come from a per-frame MLP Dense(hidden)-relu-Dense(2 * features).
  Bounding the log-scale with tanh keeps exp(s) within [e^-scale_factor, e^scale_factor]
  per layer, so neither direction can overflow early in training. The MLP's last layer is
  zero-initialised: a fresh layer is the identity with log-determinant 0.

  Attributes:
    features: channel width D of the frames.
    hidden: width of the conditioner MLP.
    parity: 0 keeps the even channels and transforms the odd ones; 1 the reverse.
    scale_factor: bound on |s| per channel and layer.
  """

  features: int
  hidden: int
  parity: int
  scale_factor: float = 2.0

  def setup(self):
    # setup() (not nn.compact) so that forward and inverse share the same parameters.
    self.conditioner_hidden = nn.Dense(self.hidden)
    self.conditioner_out = nn.Dense(
        2 * self.features, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros)

  def _kept_channels(self):
    """(D,) bool: True on the channels that pass through and condition the others."""
    return jnp.arange(self.features) % 2 == self.parity

  def _log_scale_and_shift(self, conditioning, frame_mask):
    """Conditioner output, zero on kept channels and on padded frames."""
    h = nn.relu(self.conditioner_hidden(conditioning))
    raw_log_scale, shift = jnp.split(self.conditioner_out(h), 2, axis=-1)
    log_scale = self.scale_factor * jnp.tanh(raw_log_scale)
    active = jnp.broadcast_to(~self._kept_channels(), log_scale.shape)
    if frame_mask is not None:
      active = active & frame_mask[..., None]
    return jnp.where(active, log_scale, 0.0), jnp.where(active, shift, 0.0)

  def forward(self, x, frame_mask=None):
    """x (..., T, D), frame_mask (..., T) bool or None -> (z (..., T, D), logdet (...,)).

    logdet is log|det dz/dx| summed over the real frames of each sample.
    """
    _check_width(x, self.features, "AffineCoupling")
    conditioning = jnp.where(self._kept_channels(), x, 0.0)
    log_scale, shift = self._log_scale_and_shift(conditioning, frame_mask)
    z = x * jnp.exp(log_scale) + shift
    return z, jnp.sum(log_scale, axis=(-2, -1))

  def inverse(self, z, frame_mask=None):
    """z (..., T, D), frame_mask (..., T) bool or None -> x (..., T, D)."""
    _check_width(z, self.features, "AffineCoupling")
    # Kept channels are unchanged by forward, so they rebuild the same conditioning.
    conditioning = jnp.where(self._kept_channels(), z, 0.0)
    log_scale, shift = self._log_scale_and_shift(conditioning, frame_mask)
    return (z - shift) * jnp.exp(-log_scale)

  def __call__(self, x, frame_mask=None):
    return self.forward(x, frame_mask)


class NormalizingFlow(nn.Module):
  """A stack of `num_layers` affine couplings with alternating parity (parity = i % 2).

  `model.init(key, x, frame_mask)` creates the parameters (through `forward`);
  `model.apply(variables, z, frame_mask, method=NormalizingFlow.inverse)` decodes with the
  same parameters.

  Attributes:
    features: channel width D.
    num_layers: number of coupling layers (use an even number so both halves are
      transformed equally often).
    hidden: conditioner MLP width.
    scale_factor: per-layer bound on the log-scale (see `AffineCoupling`).
  """

  features: int
  num_layers: int = 4
  hidden: int = 128
  scale_factor: float = 2.0

  def setup(self):
    self.couplings = [
        AffineCoupling(self.features, self.hidden, parity=i % 2, scale_factor=self.scale_factor)
        for i in range(self.num_layers)
    ]

  def forward(self, x, frame_mask=None):
    """x (..., T, D), frame_mask (..., T) or None -> (z (..., T, D), logdet (...,))."""
    _check_width(x, self.features, "NormalizingFlow")
    logdet = jnp.zeros(x.shape[:-2], x.dtype)
    for coupling in self.couplings:
      x, layer_logdet = coupling.forward(x, frame_mask)
      logdet = logdet + layer_logdet
    return x, logdet

  def inverse(self, z, frame_mask=None):
    """z (..., T, D), frame_mask (..., T) or None -> x (..., T, D); exact inverse of forward."""
    _check_width(z, self.features, "NormalizingFlow")
    for coupling in reversed(self.couplings):
      z = coupling.inverse(z, frame_mask)
    return z

  def __call__(self, x, frame_mask=None):
    return self.forward(x, frame_mask)


def flow_nll(z, logdet, frame_mask=None, *, per_dim: bool = False):
  """Negative log-likelihood of the flow's input under a standard-normal latent (DiCMoR).

      nll = sum_{real frames, channels} 0.5 * (z^2 + log(2 pi)) - logdet

  Args:
    z: (..., T, D) latents from `NormalizingFlow.forward`.
    logdet: (...,) log-determinants from the same call.
    frame_mask: (..., T) bool, True on real frames; None means all frames are real.
    per_dim: divide by the number of real scalars (real frames x D), i.e. nats per
      dimension, which makes the loss scale independent of sequence length and width.
      A sample with no real frame gives 0 either way.

  Returns:
    (...,) per-sample negative log-likelihood.
  """
  per_frame = 0.5 * jnp.sum(jnp.square(z) + math.log(2.0 * math.pi), axis=-1)
  if frame_mask is None:
    frame_mask = jnp.ones(z.shape[:-1], bool)
  nll = jnp.sum(jnp.where(frame_mask, per_frame, 0.0), axis=-1) - logdet
  if per_dim:
    num_real = jnp.sum(frame_mask, axis=-1, dtype=z.dtype) * z.shape[-1]
    nll = nll / jnp.maximum(num_real, 1.0)
  return nll
