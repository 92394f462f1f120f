"""CM-ARR's reconstruction module (cm_arr.txt Sec. 3.2): residual channel-attention
blocks (RCAB, as in RCAN / Wei et al. 2022) with the 2-D convolutions replaced by 1-D
convolutions over time.

Padding: padded frames are zeroed before every convolution and after it, and the
channel attention pools over real frames only, so a padded frame's content never leaks
into a real frame's output. Padded frames of every output are 0.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mer_jax.nn.pooling import masked_mean


def _all_real(x):
  return jnp.ones(x.shape[:-1], bool)


class ChannelAttention1D(nn.Module):
  """Squeeze-and-excitation over channels: masked mean over time -> Dense(D // reduction)
  -> relu -> Dense(D) -> sigmoid, which rescales every channel of every frame.

  Attributes:
    reduction: channel reduction of the bottleneck (RCAN uses 16); the bottleneck has
      at least one unit.
  """

  reduction: int = 16

  @nn.compact
  def __call__(self, x, frame_mask=None):
    """x (B, T, D), frame_mask (B, T) bool or None -> (B, T, D)."""
    if frame_mask is None:
      frame_mask = _all_real(x)
    width = x.shape[-1]
    squeezed = masked_mean(x, frame_mask)
    h = nn.relu(nn.Dense(max(width // self.reduction, 1), name="squeeze")(squeezed))
    weights = nn.sigmoid(nn.Dense(width, name="excite")(h))
    return x * weights[..., None, :]


class RCAB(nn.Module):
  """Residual channel-attention block: x + CA(conv(relu(conv(x)))), width preserved.

  Attributes:
    kernel_size: temporal kernel of both convolutions.
    reduction: channel-attention reduction.
  """

  kernel_size: int = 3
  reduction: int = 16

  @nn.compact
  def __call__(self, x, frame_mask=None):
    """x (B, T, D), frame_mask (B, T) bool or None -> (B, T, D)."""
    if frame_mask is None:
      frame_mask = _all_real(x)
    real = frame_mask[..., None]
    width = x.shape[-1]
    x = jnp.where(real, x, 0.0)
    h = nn.Conv(width, (self.kernel_size,), padding="SAME", name="conv1")(x)
    h = jnp.where(real, nn.relu(h), 0.0)
    h = nn.Conv(width, (self.kernel_size,), padding="SAME", name="conv2")(h)
    h = jnp.where(real, h, 0.0)
    h = ChannelAttention1D(self.reduction, name="channel_attention")(h, frame_mask)
    return x + h


class RCABStack(nn.Module):
  """RCAN-style residual group: conv in (D -> features), `num_blocks` RCABs, conv,
  short skip around the blocks, conv out (features -> D), and a long skip from the input,
  so the stack refines its input (e.g. CM-ARR's flow-decoded features) rather than
  replacing it.

  Attributes:
    num_blocks: number of RCABs.
    features: width inside the stack.
    kernel_size: temporal kernel of every convolution.
    reduction: channel-attention reduction.
  """

  num_blocks: int
  features: int
  kernel_size: int = 3
  reduction: int = 16

  @nn.compact
  def __call__(self, x, frame_mask=None):
    """x (B, T, D), frame_mask (B, T) bool or None -> (B, T, D)."""
    if frame_mask is None:
      frame_mask = _all_real(x)
    real = frame_mask[..., None]
    x = jnp.where(real, x, 0.0)

    def conv(width, name, inputs):
      out = nn.Conv(width, (self.kernel_size,), padding="SAME", name=name)(inputs)
      return jnp.where(real, out, 0.0)

    group_input = conv(self.features, "conv_in", x)
    h = group_input
    for i in range(self.num_blocks):
      h = RCAB(self.kernel_size, self.reduction, name=f"block{i}")(h, frame_mask)
    h = conv(self.features, "conv_body", h) + group_input
    return x + conv(x.shape[-1], "conv_out", h)
