"""DQF's learnable-query blocks (dqf.txt Sec. 3.3-3.4): Q-UA and Q-CA.

Q-UA (Eq. 3-4): per layer, the modality's learnable queries are updated by
self-attention + LayerNorm and added to the features before a transformer layer.
Q-CA (Eq. 5-7): a query shared by a modality pair attends to H_alpha with itself as
values, the result attends to H_beta; the mirror direction swaps the pair; both are
concatenated and projected. Eq. 5 needs H_alpha and H_beta of one length, so
`align_length` brings every modality to a common length first.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mer_jax.nn.attention import TransformerLayer, attention_mask


def adaptive_pool_matrix(in_length: int, out_length: int) -> np.ndarray:
  """(out, in) 0/1 matrix of torch-style adaptive average pooling bins."""
  matrix = np.zeros((out_length, in_length), np.float32)
  for i in range(out_length):
    start = (i * in_length) // out_length
    end = -((-(i + 1) * in_length) // out_length)
    matrix[i, start:end] = 1.0
  return matrix


def align_length(x, frame_mask, length: int):
  """Masked adaptive average pooling of (B, T, D) to (B, length, D).

  A pooled frame averages the real frames of its bin and is real when any is.
  Identity when T == length.
  """
  if x.shape[1] == length:
    return x, frame_mask
  bins = jnp.asarray(adaptive_pool_matrix(x.shape[1], length), x.dtype)  # 0/1: exact
  weights = frame_mask.astype(x.dtype)
  summed = jnp.einsum("ot,btd->bod", bins, x * weights[..., None])
  counts = jnp.einsum("ot,bt->bo", bins, weights)
  pooled = summed / jnp.maximum(counts, 1.0)[..., None]
  return pooled, counts > 0


class QueryUpdate(nn.Module):
  """Eq. 3: Q_hat = LayerNorm(MHSA(Q) + Q)."""

  num_heads: int

  @nn.compact
  def __call__(self, queries):
    attended = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="attn")(
        queries, queries)
    return nn.LayerNorm(name="norm")(attended + queries)


class QUA(nn.Module):
  """Querying Unimodal Attention: (B, T, D) features -> (B, T, D) encodings."""

  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, frame_mask, *, train: bool):
    length, width = x.shape[1], x.shape[2]
    queries = self.param("queries", nn.initializers.normal(0.02), (length, width))
    for i in range(self.num_layers):
      queries = QueryUpdate(self.num_heads, name=f"query_update{i}")(queries)
      x = TransformerLayer(self.num_heads, self.mlp_dim, self.dropout, name=f"layer{i}")(
          x + queries[None], frame_mask, train=train)
    return nn.LayerNorm(name="norm_out")(x)


class QueryCrossAttention(nn.Module):
  """One direction of Eq. 5: Attention(Attention(Q, H_a, Q), H_b, H_b), pre-norm with
  residuals so that blocks stack; `queries` are (B, T, D)."""

  num_heads: int
  mlp_dim: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, queries, h_a, mask_a, h_b, mask_b, *, train: bool):
    query_mask = jnp.ones(queries.shape[:2], bool)
    q = nn.LayerNorm(name="norm_q1")(queries)
    # Keys are H_alpha, values are the query itself (same positions, common length).
    modulated = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.dropout, name="attn_query")(
            q, nn.LayerNorm(name="norm_a")(h_a), q, mask=attention_mask(query_mask, mask_a),
            deterministic=not train)
    x = queries + modulated
    q = nn.LayerNorm(name="norm_q2")(x)
    h_b = nn.LayerNorm(name="norm_b")(h_b)
    attended = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.dropout, name="attn_pair")(
            q, h_b, h_b, mask=attention_mask(query_mask, mask_b), deterministic=not train)
    x = x + attended
    h = nn.LayerNorm(name="norm_ff")(x)
    h = nn.Dense(self.mlp_dim, name="ff_in")(h)
    h = nn.Dropout(self.dropout)(nn.gelu(h), deterministic=not train)
    return x + nn.Dense(x.shape[-1], name="ff_out")(h)


class QCA(nn.Module):
  """Querying Cross-Attention for one modality pair -> fused (B, T, D) (Eq. 5-7).

  Both directions start from the same learnable pair query, updated by Eq. 3 once per
  layer; layer l+1 refines layer l's output of each direction.
  """

  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, h_a, mask_a, h_b, mask_b, *, train: bool):
    batch, length, width = h_a.shape
    shared = self.param("queries", nn.initializers.normal(0.02), (length, width))
    a_to_b = b_to_a = jnp.broadcast_to(shared, (batch, length, width))
    for i in range(self.num_layers):
      update = QueryUpdate(self.num_heads, name=f"query_update{i}")
      a_to_b = QueryCrossAttention(self.num_heads, self.mlp_dim, self.dropout,
                                   name=f"a_to_b{i}")(update(a_to_b), h_a, mask_a, h_b, mask_b,
                                                      train=train)
      b_to_a = QueryCrossAttention(self.num_heads, self.mlp_dim, self.dropout,
                                   name=f"b_to_a{i}")(update(b_to_a), h_b, mask_b, h_a, mask_a,
                                                      train=train)
    return nn.Dense(width, name="fuse")(jnp.concatenate([a_to_b, b_to_a], axis=-1))
