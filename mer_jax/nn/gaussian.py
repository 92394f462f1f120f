"""Diagonal-Gaussian blocks: MCUR's VIB, CM-ARR's UMC, EASE's UCMI head and anchors.

Randomness: `VIB` draws its reparameterisation noise from the "dropout" rng stream, so a
training step passes one key (`rngs={"dropout": key}`, as the trainer does) for dropout
and the VIB alike; flax folds the module path into `make_rng`, so the VIB's noise is
independent of every dropout mask drawn from the same key.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mer_jax.nn.pooling import masked_mean

# Added to softplus outputs so that variances / standard deviations are never 0
# (EASE Eq. 27 uses the same constant).
_MIN_SCALE = 1e-6


class VIB(nn.Module):
  """Variational information bottleneck (mcur.txt A.1.2, Eq. 20-21).

  mu = W3 e + b3 and raw = W4 e + b4 (two linear layers), sigma = softplus(raw - 5)
  (SPEC section 7: the -5 starts sigma near 0.007 so early training is nearly
  deterministic); training samples z = mu + sigma * eps with eps ~ N(0, I) from the
  "dropout" rng stream; evaluation returns z = mu.

  Attributes:
    features: width of the bottleneck embedding.
  """

  features: int

  @nn.compact
  def __call__(self, x, *, train: bool):
    """x (..., D_in) -> (z, mu, sigma), each (..., features)."""
    mu = nn.Dense(self.features, name="mu")(x)
    sigma = nn.softplus(nn.Dense(self.features, name="sigma")(x) - 5.0)
    if not train:
      return mu, mu, sigma
    eps = jax.random.normal(self.make_rng("dropout"), mu.shape, mu.dtype)
    return mu + sigma * eps, mu, sigma


class UncertaintyModule(nn.Module):
  """CM-ARR's uncertainty modelling component, UMC (cm_arr.txt Sec. 3.1.2, Fig. 3).

  A pre-norm per-frame MLP (feature-level interaction, GELU) and a pre-norm multi-head
  self-attention over the real frames (sequence-level interaction), both residual, give
  the aligned sequence; a masked mean over time and two linear heads give the mean and
  the standard deviation (softplus + 1e-6) of a diagonal Gaussian. The std (not the
  variance) is returned because the 2-Wasserstein distance of Eq. 1 compares standard
  deviations. The aligned sequence is what CM-ARR's flows transform (the abstract's
  "transform these aligned distributions").

  Padded frames are zeroed on entry and in the aligned sequence, excluded as attention
  keys and from the pooling, so their content cannot change the output; a sample with no
  real frame pools to 0 and gets the heads' biases (finite).

  Attributes:
    embed_dim: E, width of mean and std.
    num_heads: attention heads (must divide the input width D).
    mlp_dim: hidden width of the per-frame MLP.
    dropout: dropout rate after the MLP and the attention.
    attention: False drops the self-attention (MLP only): Table 3's "w/o attention".
  """

  embed_dim: int
  num_heads: int = 4
  mlp_dim: int = 256
  dropout: float = 0.0
  attention: bool = True

  @nn.compact
  def __call__(self, x, frame_mask, *, train: bool):
    """x (B, T, D), frame_mask (B, T) bool -> (mean (B, E), std (B, E), aligned (B, T, D))."""
    width = x.shape[-1]
    real = frame_mask[..., None]
    x = jnp.where(real, x, 0.0)
    h = nn.LayerNorm(name="norm_mlp")(x)
    h = nn.gelu(nn.Dense(self.mlp_dim, name="mlp_in")(h))
    h = nn.Dense(width, name="mlp_out")(h)
    x = x + nn.Dropout(self.dropout)(h, deterministic=not train)
    if self.attention:
      h = nn.LayerNorm(name="norm_attn")(x)
      h = nn.MultiHeadDotProductAttention(
          num_heads=self.num_heads, dropout_rate=self.dropout, name="attn")(
              h, h, mask=nn.make_attention_mask(frame_mask, frame_mask),
              deterministic=not train)
      x = x + nn.Dropout(self.dropout)(h, deterministic=not train)
    aligned = jnp.where(real, x, 0.0)
    pooled = masked_mean(aligned, frame_mask)
    mean = nn.Dense(self.embed_dim, name="mean")(pooled)
    std = nn.softplus(nn.Dense(self.embed_dim, name="std")(pooled)) + _MIN_SCALE
    return mean, std, aligned


class GaussianHead(nn.Module):
  """EASE's UCMI heads (ease.txt Eq. 1-2): context -> (mean, variance) of a diagonal
  Gaussian over the missing modality's feature.

  With `hidden > 0` a shared GELU layer (the paper's learnable projection to the
  context h_ctx) precedes the two linear heads F_mu and F_sigma;
  var = softplus(F_sigma(h)) + 1e-6.

  Attributes:
    features: width of mean and variance.
    hidden: width of the shared projection; 0 for linear heads on the input.
  """

  features: int
  hidden: int = 0

  @nn.compact
  def __call__(self, x):
    """x (..., D_in) -> (mean (..., features), var (..., features))."""
    if self.hidden:
      x = nn.gelu(nn.Dense(self.hidden, name="context")(x))
    mean = nn.Dense(self.features, name="mean")(x)
    var = nn.softplus(nn.Dense(self.features, name="var")(x)) + _MIN_SCALE
    return mean, var


def init_class_anchors(num_classes: int, dim: int, dtype=jnp.float32):
  """Initial state of EASE's class-conditional Gaussian anchors (ease.txt Eq. 28-29).

  The anchors are not parameters: the loss code updates them by EMA of full-modality
  features (stop-gradient) and carries them in the training state.

  Returns:
    dict with `mean` (K, dim) zeros, `var` (K, dim) ones (a unit Gaussian until a class
    has been seen) and `count` (K,) zeros (float, how many samples of each class have
    been absorbed; lets the update take the first batch's statistics directly).
  """
  return {
      "mean": jnp.zeros((num_classes, dim), dtype),
      "var": jnp.ones((num_classes, dim), dtype),
      "count": jnp.zeros((num_classes,), dtype),
  }
