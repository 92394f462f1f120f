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

from mer_jax.nn.attention import (
    CrossAttentionLayer,
    TransformerEncoder,
    TransformerLayer,
    attention_mask,
)
from mer_jax.nn.pooling import masked_mean
from mer_jax.nn.stack import layer_stack


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


class QUALayer(nn.Module):
  """One Q-UA layer: the queries are updated (Eq. 3) and added to the features before a
  transformer layer (Eq. 4). Carry: (x (B, T, D), queries (T, D))."""

  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  train: bool = False

  @nn.compact
  def __call__(self, carry, frame_mask):
    x, queries = carry
    queries = QueryUpdate(self.num_heads, name="query_update")(queries)
    x = TransformerLayer(self.num_heads, self.mlp_dim, self.dropout, name="layer")(
        x + queries[None], frame_mask, train=self.train)
    return (x, queries), None


class QUA(nn.Module):
  """Querying Unimodal Attention: (B, T, D) features -> (B, T, D) encodings.

  `scan`: the layers run as one `nn.scan` over stacked params (`layers/...`, leading
  layer axis); False unrolls them (`layers_<i>`). `remat` recomputes each layer in the
  backward pass. Both leave the numbers unchanged.
  """

  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  scan: bool = True
  remat: bool = False

  @nn.compact
  def __call__(self, x, frame_mask, *, train: bool):
    length, width = x.shape[1], x.shape[2]
    queries = self.param("queries", nn.initializers.normal(0.02), (length, width))
    x, _ = layer_stack(QUALayer, self.num_layers, (x, queries), frame_mask, scan=self.scan,
                       remat=self.remat, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                       dropout=self.dropout, train=train)
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


class QCALayer(nn.Module):
  """One Q-CA layer: both directions' queries are updated by the layer's Eq. 3 block
  (shared by the two directions), then each runs `QueryCrossAttention`.
  Carry: (a_to_b, b_to_a), each (B, T, D)."""

  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  train: bool = False

  @nn.compact
  def __call__(self, carry, h_a, mask_a, h_b, mask_b):
    a_to_b, b_to_a = carry
    update = QueryUpdate(self.num_heads, name="query_update")
    a_to_b = QueryCrossAttention(self.num_heads, self.mlp_dim, self.dropout, name="a_to_b")(
        update(a_to_b), h_a, mask_a, h_b, mask_b, train=self.train)
    b_to_a = QueryCrossAttention(self.num_heads, self.mlp_dim, self.dropout, name="b_to_a")(
        update(b_to_a), h_b, mask_b, h_a, mask_a, train=self.train)
    return (a_to_b, b_to_a), None


class QCA(nn.Module):
  """Querying Cross-Attention for one modality pair -> fused (B, T, D) (Eq. 5-7).

  Both directions start from the same learnable pair query; layer l+1 refines layer l's
  output of each direction. `scan` / `remat` as in `QUA`.
  """

  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  scan: bool = True
  remat: bool = False

  @nn.compact
  def __call__(self, h_a, mask_a, h_b, mask_b, *, train: bool):
    batch, length, width = h_a.shape
    shared = self.param("queries", nn.initializers.normal(0.02), (length, width))
    start = jnp.broadcast_to(shared, (batch, length, width))
    a_to_b, b_to_a = layer_stack(
        QCALayer, self.num_layers, (start, start), h_a, mask_a, h_b, mask_b, scan=self.scan,
        remat=self.remat, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        dropout=self.dropout, train=train)
    return nn.Dense(width, name="fuse")(jnp.concatenate([a_to_b, b_to_a], axis=-1))


# ----------------------------------------------------------------------------- Table 4 stand-ins


class CrossModalLayer(nn.Module):
  """One MulT cross-modal layer (the "Q-UA w/ MulT" ablation, dqf.txt Table 4): the
  target sequence queries the source (keys = values = source), then a feed-forward,
  pre-norm residual. Carry: the target (B, T, D)."""

  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  train: bool = False

  @nn.compact
  def __call__(self, target, target_mask, source, source_mask):
    target = CrossAttentionLayer(self.num_heads, self.mlp_dim, self.dropout, name="layer")(
        target, source, query_mask=target_mask, key_mask=source_mask, train=self.train)
    return target, None


class MulTPairFusion(nn.Module):
  """Q-CA replaced by MulT's cross-modal transformers: H_a attends to H_b and H_b to H_a
  (`num_layers` layers each), each direction kept on its own real frames, concatenated
  and projected as Eq. 7 -> pooled (B, D) over the frames real in either modality."""

  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  scan: bool = True
  remat: bool = False

  @nn.compact
  def __call__(self, h_a, mask_a, h_b, mask_b, *, train: bool):
    def direction(name, target, target_mask, source, source_mask):
      out = layer_stack(CrossModalLayer, self.num_layers, target, target_mask, source,
                        source_mask, scan=self.scan, remat=self.remat, name=name,
                        num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout=self.dropout,
                        train=train)
      return jnp.where(target_mask[..., None], nn.LayerNorm(name=f"{name}_norm")(out), 0.0)

    a_to_b = direction("a_to_b", h_a, mask_a, h_b, mask_b)
    b_to_a = direction("b_to_a", h_b, mask_b, h_a, mask_a)
    fused = nn.Dense(h_a.shape[-1], name="fuse")(jnp.concatenate([a_to_b, b_to_a], axis=-1))
    return masked_mean(fused, mask_a | mask_b)


class ConcatPairFusion(nn.Module):
  """Q-CA replaced by a transformer over the pair's concatenated unimodal sequences (the
  "w/o Q-CA" ablation, dqf.txt Table 4): [H_a; H_b] along time (2T tokens, padding
  masked) -> `num_layers` transformer layers -> pooled (B, D) over the real tokens."""

  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, h_a, mask_a, h_b, mask_b, *, train: bool):
    tokens = jnp.concatenate([h_a, h_b], axis=1)
    mask = jnp.concatenate([mask_a, mask_b], axis=1)
    out = TransformerEncoder(self.num_layers, self.num_heads, self.mlp_dim, self.dropout,
                             name="encoder")(tokens, mask, train=train)
    return masked_mean(out, mask)
