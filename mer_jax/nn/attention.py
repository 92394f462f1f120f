"""Attention building blocks shared by every method: pre-norm transformer layers,
cross-attention, feed-forward, and the per-modality Conv1D projection.

Padding is handled with boolean frame masks (True = real frame). A query whose keys
are all padding attends uniformly over them (flax fills masked logits with the
dtype's minimum, not -inf), so no NaN can appear; callers pool with masks afterwards.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


def attention_mask(query_mask, key_mask):
  """(B, Tq), (B, Tk) bool -> (B, 1, Tq, Tk) bool mask for flax attention."""
  return nn.make_attention_mask(query_mask, key_mask)


class FeedForward(nn.Module):
  """Position-wise MLP; `activation="geglu"` gives the gated GELU of Perceiver."""

  hidden_dim: int
  dropout: float = 0.0
  activation: str = "gelu"

  @nn.compact
  def __call__(self, x, *, train: bool):
    out_dim = x.shape[-1]
    if self.activation == "geglu":
      gate_and_value = nn.Dense(2 * self.hidden_dim, name="in")(x)
      value, gate = jnp.split(gate_and_value, 2, axis=-1)
      h = value * nn.gelu(gate)
    elif self.activation == "gelu":
      h = nn.gelu(nn.Dense(self.hidden_dim, name="in")(x))
    elif self.activation == "relu":
      h = nn.relu(nn.Dense(self.hidden_dim, name="in")(x))
    else:
      raise ValueError("FeedForward.activation must be gelu, geglu or relu, got "
                       f"{self.activation!r}")
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    return nn.Dense(out_dim, name="out")(h)


class TransformerLayer(nn.Module):
  """Pre-norm self-attention + feed-forward, padding-aware."""

  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  activation: str = "gelu"

  @nn.compact
  def __call__(self, x, frame_mask=None, *, train: bool):
    mask = None if frame_mask is None else attention_mask(frame_mask, frame_mask)
    h = nn.LayerNorm(name="norm_attn")(x)
    h = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.dropout, name="attn")(
            h, h, mask=mask, deterministic=not train)
    x = x + nn.Dropout(self.dropout)(h, deterministic=not train)
    h = nn.LayerNorm(name="norm_ff")(x)
    h = FeedForward(self.mlp_dim, self.dropout, self.activation, name="ff")(h, train=train)
    return x + nn.Dropout(self.dropout)(h, deterministic=not train)


class TransformerEncoder(nn.Module):
  """A stack of `TransformerLayer`s with a final LayerNorm."""

  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, frame_mask=None, *, train: bool):
    for i in range(self.num_layers):
      x = TransformerLayer(self.num_heads, self.mlp_dim, self.dropout, name=f"layer{i}")(
          x, frame_mask, train=train)
    return nn.LayerNorm(name="norm_out")(x)


class CrossAttentionLayer(nn.Module):
  """Pre-norm cross-attention of `queries` onto `keys`/`values` + feed-forward.

  `values` defaults to `keys`. Used by the Perceiver (latents -> sequence), CM-ARR's
  text-queried fusion and DQF's Q-CA (whose values are the query itself, Eq. 5).
  """

  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  activation: str = "gelu"
  use_feedforward: bool = True

  @nn.compact
  def __call__(self, queries, keys, values=None, *, query_mask=None, key_mask=None,
               train: bool):
    if values is None:
      values = keys
    mask = None
    if key_mask is not None:
      if query_mask is None:
        query_mask = jnp.ones(queries.shape[:2], bool)
      mask = attention_mask(query_mask, key_mask)
    q = nn.LayerNorm(name="norm_q")(queries)
    k = nn.LayerNorm(name="norm_k")(keys)
    v = k if values is keys else nn.LayerNorm(name="norm_v")(values)
    h = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.dropout, name="attn")(
            q, k, v, mask=mask, deterministic=not train)
    x = queries + nn.Dropout(self.dropout)(h, deterministic=not train)
    if not self.use_feedforward:
      return x
    h = nn.LayerNorm(name="norm_ff")(x)
    h = FeedForward(self.mlp_dim, self.dropout, self.activation, name="ff")(h, train=train)
    return x + nn.Dropout(self.dropout)(h, deterministic=not train)


class ModalityProjection(nn.Module):
  """Conv1D from a modality's feature width to the model width D (SPEC section 7).

  Padded frames are zeroed before and after the convolution so that their content can
  never leak into real frames' outputs.
  """

  features: int
  kernel_size: int = 1

  @nn.compact
  def __call__(self, x, frame_mask):
    x = jnp.where(frame_mask[..., None], x, 0.0)
    x = nn.Conv(self.features, (self.kernel_size,), padding="SAME", name="conv")(x)
    return jnp.where(frame_mask[..., None], x, 0.0)
