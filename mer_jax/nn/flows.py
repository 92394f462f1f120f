"""Per-frame normalizing flows for CM-ARR's reconstruction phase (cm_arr.txt Sec. 3.2).

Each modality has a flow F_n that maps its features X_n (B, T, D) to a latent Z_n
(Eq. 6) and an exact inverse F_n^-1 that decodes an estimated latent back to feature
space (Eq. 8). The latent's prior is DiCMoR's (Wang et al. 2023, the flow CM-ARR builds
on): one learnable diagonal Gaussian per class, shared by every modality and frame
(`ClassGaussianPrior`), so the latents of all modalities of a sample lie in the same
class distribution and the mean of the available ones (Eq. 7) is a latent of it too.

The flow is a RealNVP stack of affine coupling layers over the channel axis, applied to
every frame independently (the time axis only carries padding): a fixed even/odd channel
mask splits the channels; the kept half passes through unchanged and conditions a
per-frame MLP that gives a log-scale and a shift for the other half; consecutive layers
alternate which half is kept, so after two layers every channel has been transformed.

The layers run under `nn.scan` (the big_vision / MaxText pattern): every parameter kind
is one array with a leading layer axis (`couplings/conditioner_hidden/kernel` is
(L, D, H)), the parity is the scanned input, and the inverse scans the same arrays in
reverse. Compile time and checkpoint array count do not grow with depth; `remat=True`
recomputes each layer in the backward pass.

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


def _all_real(x):
  return jnp.ones(x.shape[:-1], bool)


class AffineCoupling(nn.Module):
  """One RealNVP affine coupling layer over the channels of each frame.

  With b the binary channel mask (1 on channels `c % 2 == parity`, which pass through),
      z = b * x + (1 - b) * (x * exp(s(b * x)) + t(b * x)),
      s = scale_factor * tanh(raw_s),
  where (raw_s, t) come from a per-frame MLP Dense(hidden)-relu-Dense(2 * features).
  Bounding the log-scale with tanh keeps exp(s) within [e^-scale_factor, e^scale_factor]
  per layer, so neither direction can overflow early in training. The MLP's last layer is
  zero-initialised: a fresh layer is the identity with log-determinant 0.

  `parity` is an argument (an int or a traced int32 scalar), not an attribute, so that
  the layers of a flow share one set of shapes and scan.

  Attributes:
    features: channel width D of the frames.
    hidden: width of the conditioner MLP.
    scale_factor: bound on |s| per channel and layer.
  """

  features: int
  hidden: int
  scale_factor: float = 2.0

  def setup(self):
    # setup() (not nn.compact) so that forward and inverse share the same parameters.
    self.conditioner_hidden = nn.Dense(self.hidden)
    self.conditioner_out = nn.Dense(
        2 * self.features, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros)

  def _kept_channels(self, parity):
    """(D,) bool: True on the channels that pass through and condition the others."""
    return jnp.arange(self.features) % 2 == parity

  def _log_scale_and_shift(self, conditioning, parity, frame_mask):
    """Conditioner output, zero on kept channels and on padded frames."""
    h = nn.relu(self.conditioner_hidden(conditioning))
    raw_log_scale, shift = jnp.split(self.conditioner_out(h), 2, axis=-1)
    log_scale = self.scale_factor * jnp.tanh(raw_log_scale)
    active = jnp.broadcast_to(~self._kept_channels(parity), log_scale.shape)
    active = active & frame_mask[..., None]
    return jnp.where(active, log_scale, 0.0), jnp.where(active, shift, 0.0)

  def forward(self, x, parity, frame_mask=None):
    """x (..., T, D), parity 0/1, frame_mask (..., T) bool or None ->
    (z (..., T, D), logdet (...,)): logdet is log|det dz/dx| summed over real frames."""
    _check_width(x, self.features, "AffineCoupling")
    frame_mask = _all_real(x) if frame_mask is None else frame_mask
    conditioning = jnp.where(self._kept_channels(parity), x, 0.0)
    log_scale, shift = self._log_scale_and_shift(conditioning, parity, frame_mask)
    z = x * jnp.exp(log_scale) + shift
    return z, jnp.sum(log_scale, axis=(-2, -1))

  def inverse(self, z, parity, frame_mask=None):
    """z (..., T, D), parity 0/1, frame_mask (..., T) bool or None -> x (..., T, D)."""
    _check_width(z, self.features, "AffineCoupling")
    frame_mask = _all_real(z) if frame_mask is None else frame_mask
    # Kept channels are unchanged by forward, so they rebuild the same conditioning.
    conditioning = jnp.where(self._kept_channels(parity), z, 0.0)
    log_scale, shift = self._log_scale_and_shift(conditioning, parity, frame_mask)
    return (z - shift) * jnp.exp(-log_scale)

  def __call__(self, x, parity, frame_mask=None):
    return self.forward(x, parity, frame_mask)


class _CouplingStep(AffineCoupling):
  """`AffineCoupling` in the carry/scanned-input form that `nn.scan` needs."""

  def forward_step(self, carry, parity, frame_mask):
    x, logdet = carry
    z, layer_logdet = self.forward(x, parity, frame_mask)
    return (z, logdet + layer_logdet), None

  def inverse_step(self, z, parity, frame_mask):
    return self.inverse(z, parity, frame_mask), None


_STEP_METHODS = ("forward_step", "inverse_step")


class NormalizingFlow(nn.Module):
  """A stack of `num_layers` affine couplings with alternating parity (layer i keeps the
  channels c with c % 2 == i % 2), scanned over the layer axis.

  `model.init(key, x, frame_mask)` creates the parameters (through `forward`);
  `model.apply(variables, z, frame_mask, method=NormalizingFlow.inverse)` decodes with the
  same parameters. Layer i's parameters are `params["couplings"][...][i]`: slicing them
  gives the `AffineCoupling(features, hidden, scale_factor)` of that layer (the unrolled
  form the tests compare against).

  Attributes:
    features: channel width D.
    num_layers: number of coupling layers (use an even number so both halves are
      transformed equally often).
    hidden: conditioner MLP width.
    scale_factor: per-layer bound on the log-scale (see `AffineCoupling`).
    remat: recompute each layer's activations in the backward pass (`nn.remat`) instead
      of keeping them: memory per layer for compute.
  """

  features: int
  num_layers: int = 4
  hidden: int = 128
  scale_factor: float = 2.0
  remat: bool = False

  def setup(self):
    step = _CouplingStep
    if self.remat:
      # prevent_cse=False: the scan already keeps XLA from merging the recomputation.
      step = nn.remat(step, prevent_cse=False, methods=_STEP_METHODS)
    scan = dict(variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(0, nn.broadcast), length=self.num_layers)
    self.couplings = nn.scan(step, methods={"forward_step": dict(scan),
                                            "inverse_step": dict(scan, reverse=True)})(
                                                self.features, self.hidden, self.scale_factor)

  def _parities(self):
    return jnp.arange(self.num_layers, dtype=jnp.int32) % 2

  def forward(self, x, frame_mask=None):
    """x (..., T, D), frame_mask (..., T) or None -> (z (..., T, D), logdet (...,))."""
    _check_width(x, self.features, "NormalizingFlow")
    frame_mask = _all_real(x) if frame_mask is None else frame_mask
    logdet = jnp.zeros(x.shape[:-2], x.dtype)
    (z, logdet), _ = self.couplings.forward_step((x, logdet), self._parities(), frame_mask)
    return z, logdet

  def inverse(self, z, frame_mask=None):
    """z (..., T, D), frame_mask (..., T) or None -> x (..., T, D); exact inverse of forward."""
    _check_width(z, self.features, "NormalizingFlow")
    frame_mask = _all_real(z) if frame_mask is None else frame_mask
    x, _ = self.couplings.inverse_step(z, self._parities(), frame_mask)
    return x

  def __call__(self, x, frame_mask=None):
    return self.forward(x, frame_mask)


class ClassGaussianPrior(nn.Module):
  """DiCMoR's latent prior: a learnable diagonal Gaussian N(mean_k, exp(log_std_k)^2) per
  class k, per channel, shared by every frame (and, in CM-ARR, every modality).

  Both tables start at zero (DiCMoR's zero-initialised prior convolutions), so a new
  prior is N(0, I) for every class.

  Attributes:
    num_classes: K.
    features: channel width D.
  """

  num_classes: int
  features: int

  @nn.compact
  def __call__(self):
    """-> (mean (K, D), log_std (K, D))."""
    shape = (self.num_classes, self.features)
    return (self.param("mean", nn.initializers.zeros, shape),
            self.param("log_std", nn.initializers.zeros, shape))


def flow_nll(z, logdet, frame_mask=None, *, mean=None, log_std=None, per_dim: bool = False):
  """Negative log-likelihood of the flow's input under a diagonal-Gaussian latent.

      nll = sum_{real frames, channels} [0.5 log(2 pi) + log_std + 0.5 ((z - mean) / std)^2]
            - logdet

  with mean = 0, log_std = 0 (a standard normal) unless given.

  Args:
    z: (..., T, D) latents from `NormalizingFlow.forward`.
    logdet: (...,) log-determinants from the same call.
    frame_mask: (..., T) bool, True on real frames; None means all frames are real.
    mean, log_std: the latent Gaussian, broadcastable to z (e.g. (..., 1, D): one per
      sample, shared by its frames, as a class prior gives); None = 0.
    per_dim: divide by the number of real scalars (real frames x D), i.e. nats per
      dimension, which makes the loss scale independent of sequence length and width.
      A sample with no real frame gives 0 either way.

  Returns:
    (...,) per-sample negative log-likelihood.
  """
  centred = z if mean is None else z - mean
  if log_std is None:
    per_scalar = 0.5 * (jnp.square(centred) + math.log(2.0 * math.pi))
  else:
    per_scalar = (0.5 * (jnp.square(centred * jnp.exp(-log_std)) + math.log(2.0 * math.pi))
                  + log_std)
  per_frame = jnp.sum(per_scalar, axis=-1)
  if frame_mask is None:
    frame_mask = jnp.ones(z.shape[:-1], bool)
  nll = jnp.sum(jnp.where(frame_mask, per_frame, 0.0), axis=-1) - logdet
  if per_dim:
    num_real = jnp.sum(frame_mask, axis=-1, dtype=z.dtype) * z.shape[-1]
    nll = nll / jnp.maximum(num_real, 1.0)
  return nll
