"""Attention building blocks shared by every method: one multi-head attention module,
transformer layers (pre- or post-norm) and their stack, cross-attention, feed-forward,
and the per-modality Conv1D projection.

Padding is handled with boolean frame masks (True = real frame). A query whose keys
are all padding attends uniformly over them (masked logits become a large finite
negative number, not -inf), so no NaN can appear; callers pool with masks afterwards.

Inner width. `MultiHeadAttention` projects queries, keys and values to
`num_heads x head_dim` (the inner width) and the result back to the query width, so the
two widths are independent: the official CMAD code attends with 16 heads of 16 (inner
width 256) at model width 96. `head_dim=0` gives the usual `width // num_heads`.

Layer stacks. `TransformerEncoder` (and the Perceiver of `nn.perceiver`) run their
layers through `nn.stack.layer_stack`: under `nn.scan` by default, one array per parameter
kind with a leading layer axis, so the compiled program and the checkpoint's array count
do not grow with depth; `scan=False` unrolls them (`layers_{i}`, the same numbers);
`remat=True` recomputes each layer's activations in the backward pass.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mer_jax.nn.stack import layer_stack

ACTIVATIONS = ("gelu", "geglu", "relu")
NORMS = ("pre", "post")


def exact_gelu(x):
  """GELU with the exact normal CDF in PyTorch's form (`F.gelu`, BERT's "gelu"):
  x (1 + erf(x / sqrt 2)) / 2. `jax.nn.gelu(approximate=False)` computes the same CDF
  as erfc(-x / sqrt 2) / 2, which XLA's CPU backend expands into a branchy exp-based
  series: 1.5x slower in a GEGLU's forward and backward (docs/performance.md)."""
  return 0.5 * x * (1 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


def attention_mask(query_mask, key_mask):
  """(B, Tq), (B, Tk) bool -> (B, 1, Tq, Tk) bool mask (broadcast over heads)."""
  return nn.make_attention_mask(query_mask, key_mask, dtype=bool)


# A LayerNorm without its scale and bias, and so without params: flax's statistics
# (float32 at least) and epsilon, `nn.LayerNorm()(x) == Standardize()(x) * scale + bias`.
# Used as a submodule, so that a bfloat16 stage keeps its dtype (`methods.base` casts only
# a top-level module's outputs to float32).
Standardize = functools.partial(nn.LayerNorm, use_scale=False, use_bias=False)


def _apply_affine(x, norm):
  """`x * scale + bias` of a LayerNorm's params `norm` ({"scale", "bias"}); None: `x`."""
  return x if norm is None else x * norm["scale"] + norm["bias"]


def _fold_affine(projection, norm):
  """The kernel and bias of `projection` (kernel (D, H, d), optional bias (H, d)) applied
  to `x * scale + bias` instead of `x`: (x s + c) W + b = x (diag(s) W) + (c W + b)."""
  if norm is None:
    return projection
  kernel = projection["kernel"]
  bias = jnp.einsum("e,ehd->hd", norm["bias"], kernel)
  if "bias" in projection:
    bias = bias + projection["bias"]
  return {"kernel": kernel * norm["scale"][:, None, None], "bias": bias}


def _head_dim(width: int, num_heads: int, head_dim: int) -> int:
  if head_dim:
    return head_dim
  if width % num_heads:
    raise ValueError(f"attention width {width} is not divisible by {num_heads} heads; set "
                     "the head dimension explicitly (config.model.*_head_dim)")
  return width // num_heads


def absorbed_projections_are_cheaper(num_queries: int, num_keys: int, key_width: int,
                                     value_width: int, num_heads: int, head_dim: int) -> bool:
  """Whether attending through the key/value kernels (`MultiHeadAttention`'s absorbed
  form) costs fewer multiply-adds than projecting every key and value: true when the
  queries are fewer than about the head dimension (a Perceiver's latents over a long
  sequence)."""
  inner = num_heads * head_dim
  widths = key_width + value_width
  projected = num_keys * widths * inner + 2 * num_queries * num_keys * inner
  absorbed = num_queries * inner * widths + num_queries * num_keys * num_heads * widths
  return absorbed < projected


class MultiHeadAttention(nn.Module):
  """Scaled dot-product attention with `num_heads x head_dim` inner width.

  Params: `query`, `key`, `value` (kernels (D_in, H, d), biases (H, d) unless
  `qkv_bias=False`) and `out` (kernel (H, d, D), bias (D,)), D the query width.

  Two orders of the same products. Projected: K = keys Wk + bk and V = values Wv + bv
  for every key, then softmax(q K^T / sqrt(d)) V (one `jax.nn.dot_product_attention`
  without attention dropout). Absorbed: the key kernel is applied to the queries instead,
  logits = (q Wk^T) keys^T (+ q bk, one constant per query, which the softmax drops), and
  the value kernel to the attended values, (weights values) Wv + (sum of the weights) bv,
  the sum being 1 without attention dropout. Equal in exact arithmetic; the
  absorbed order never forms the (B, Tk, H, d) keys and values, and costs Tq/d of the
  key/value projections: a Perceiver cross-attention (5 latents, d = 16, 50 frames) costs
  2.5x fewer FLOPs and moves no (B, Tk, H, d) tensor through memory. Without attention
  dropout its core is `absorbed_attention`, whose backward runs as plain matmuls.

  Attributes:
    num_heads: H.
    head_dim: d; 0 = query width // H.
    qkv_bias: biases on the query/key/value projections (the Perceiver's have none).
    dropout: dropout on the attention weights (training only).
    absorb: the absorbed order (True), the projected one (False), or whichever costs
      fewer multiply-adds for the shapes (None, `absorbed_projections_are_cheaper`).

  `key_norm` / `value_norm` (call arguments): the params {"scale", "bias"} of a LayerNorm
  whose input the keys / values are in `Standardize`d form. The projected order applies
  them first; the absorbed order folds them into the key / value kernel and bias
  (`_fold_affine`), so that the normalised (B, Tk, D_kv) keys are never formed either and
  one standardised copy of a sequence serves every layer that attends to it.
  """

  num_heads: int
  head_dim: int = 0
  qkv_bias: bool = True
  dropout: float = 0.0
  absorb: bool | None = None

  @nn.compact
  def __call__(self, queries, keys, values=None, *, mask=None, train: bool, key_norm=None,
               value_norm=None):
    """queries (B, Tq, D), keys/values (B, Tk, D_kv), mask (B, 1, Tq, Tk) bool -> (B, Tq, D)."""
    width = queries.shape[-1]
    head_dim = _head_dim(width, self.num_heads, self.head_dim)
    if values is None:
      values, value_norm = keys, key_norm

    def project(name):
      return nn.DenseGeneral((self.num_heads, head_dim), use_bias=self.qkv_bias, name=name)

    q = project("query")(queries)
    key_layer, value_layer = project("key"), project("value")
    attention_dropout = train and self.dropout > 0
    absorb = self.absorb
    if absorb is None:
      absorb = absorbed_projections_are_cheaper(queries.shape[-2], keys.shape[-2],
                                                keys.shape[-1], values.shape[-1],
                                                self.num_heads, head_dim)
    if absorb:
      h = self._absorbed(q, keys, values, key_layer, value_layer, mask, attention_dropout,
                         key_norm, value_norm)
      return nn.DenseGeneral(width, axis=(-2, -1), name="out")(h)
    keys, values = _apply_affine(keys, key_norm), _apply_affine(values, value_norm)
    if attention_dropout:
      k, v = key_layer(keys), value_layer(values)
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(q.dtype)
      h = jnp.einsum("bhqk,bkhd->bqhd", self._dropped_weights(logits, mask), v)
    else:
      h = jax.nn.dot_product_attention(q, key_layer(keys), value_layer(values), mask=mask)
    return nn.DenseGeneral(width, axis=(-2, -1), name="out")(h)

  def _dropped_weights(self, logits, mask, heads_first: bool = True):
    """Softmax over the keys, then attention dropout (the paths without it use
    `jax.nn.dot_product_attention` or `absorbed_attention`). `heads_first=False`: logits
    laid out (B, Tq, H, Tk); the dropout mask is still drawn over (B, H, Tq, Tk), so that
    both orders drop the same weights."""
    weights = masked_softmax(logits, mask)
    dropout = nn.Dropout(self.dropout)
    if heads_first:
      return dropout(weights, deterministic=False)
    heads_first_shape = jnp.swapaxes(weights, -3, -2).shape
    keep = dropout(jnp.ones(heads_first_shape, weights.dtype), deterministic=False)
    return weights * jnp.swapaxes(keep, -3, -2)

  def _absorbed(self, q, keys, values, key_layer, value_layer, mask, attention_dropout,
                key_norm, value_norm):
    key_params = _fold_affine(_layer_params(key_layer, keys[..., :1, :],
                                            self.is_initializing()), key_norm)
    value_params = _fold_affine(_layer_params(value_layer, values[..., :1, :],
                                              self.is_initializing()), value_norm)
    q = q / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    # Logits and weights as (B, Tq, H, Tk): the order in which both matmuls against the
    # keys produce and read them, so no transpose sits between them. The key bias (and
    # the folded norm's) adds q . bk to every logit of a query, the same for all its
    # keys: the softmax does not see it, so it is left out.
    absorbed_queries = jnp.einsum("bqhd,ehd->bqhe", q, key_params["kernel"])
    if mask is not None:
      mask = jnp.swapaxes(mask, -3, -2)
    if attention_dropout:
      logits = jnp.einsum("bqhe,bke->bqhk", absorbed_queries, keys)
      weights = self._dropped_weights(logits, mask, heads_first=False)
      attended = jnp.einsum("bqhk,bke->bqhe", weights, values)
    else:
      attended = absorbed_attention(absorbed_queries, keys, values, mask)
    h = jnp.einsum("bqhe,ehd->bqhd", attended, value_params["kernel"])
    if "bias" not in value_params:
      return h
    if not attention_dropout:  # each query's weights sum to 1
      return h + value_params["bias"]
    # Dropout leaves each query's weights summing to what it kept of 1.
    return h + jnp.einsum("bqhk,hd->bqhd", weights, value_params["bias"])


def masked_softmax(logits, mask=None):
  """Softmax over the last axis of `logits` where `mask` is True, computed in float32 at
  least and returned in the logits' dtype; a row without a True entry gets uniform
  weights (masked logits are the dtype's minimum, not -inf)."""
  return _wide_masked_softmax(logits, mask).astype(logits.dtype)


def _wide_masked_softmax(logits, mask):
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  return jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)


@jax.custom_vjp
def absorbed_attention(queries, keys, values, mask=None):
  """softmax(queries keys^T) values per head, laid out as the absorbed order uses it:
  queries (B, Tq, H, E) against keys (B, Tk, E) and values (B, Tk, Ev) shared by all
  heads, mask (B, Tq, 1 or H, Tk) bool or None -> (B, Tq, H, Ev).

  The same numbers as autodiff through `masked_softmax` and two einsums; the backward is
  written out because autodiff's form of the keys' and values' gradients (weights^T
  times the output gradient, contracting the Tq x H rows) is a product whose left operand
  is transposed, which XLA's CPU backend runs as its generic dot at a fifth of the rate
  of the forward products (docs/performance.md). Here the weights and the logits'
  gradient are transposed to (B, Tk, Tq, H) first, so every product of the backward is
  a plain (m x k)(k x n) batched matmul.
  """
  return _absorbed_attention_forward(queries, keys, values, mask)[0]


def _absorbed_attention_forward(queries, keys, values, mask):
  # The softmax's output in its own precision is kept for its backward, as autodiff
  # keeps it (float32 when the products run in bfloat16).
  wide_weights = _wide_masked_softmax(jnp.einsum("bqhe,bke->bqhk", queries, keys), mask)
  attended = jnp.einsum("bqhk,bke->bqhe", wide_weights.astype(queries.dtype), values)
  return attended, (queries, keys, values, wide_weights, mask)


def _absorbed_attention_backward(residuals, d_attended):
  queries, keys, values, wide_weights, mask = residuals
  weights = wide_weights.astype(queries.dtype)
  d_weights = jnp.einsum("bqhe,bke->bqhk", d_attended, values).astype(wide_weights.dtype)
  d_logits = wide_weights * (d_weights - jnp.sum(wide_weights * d_weights, axis=-1,
                                                 keepdims=True))
  if mask is not None:  # masked logits are a constant: nothing flows back through them
    d_logits = jnp.where(mask, d_logits, 0)
  d_logits = d_logits.astype(queries.dtype)
  d_queries = jnp.einsum("bqhk,bke->bqhe", d_logits, keys)
  keys_first = lambda x: jnp.transpose(x, (0, 3, 1, 2))  # (B, Tq, H, Tk) -> (B, Tk, Tq, H)
  d_keys = jnp.einsum("bkqh,bqhe->bke", keys_first(d_logits), queries)
  d_values = jnp.einsum("bkqh,bqhe->bke", keys_first(weights), d_attended)
  return d_queries, d_keys, d_values, None


absorbed_attention.defvjp(_absorbed_attention_forward, _absorbed_attention_backward)


def _layer_params(layer: nn.Module, example, initializing: bool):
  """The params of a submodule that is used through its params rather than called: at
  initialisation they are made by one call on `example` (the same initialisers, shapes
  and names as a call on the real input)."""
  if initializing:
    layer(example)
  return layer.variables["params"]


class FeedForward(nn.Module):
  """Position-wise MLP: Dense(hidden) -> activation -> dropout -> Dense(width).

  `activation="geglu"` is the Perceiver's gated GELU (a Dense to 2 x hidden split into
  value and gate, value * GELU(gate), with the exact erf GELU as PyTorch's `F.gelu`);
  "gelu" uses the tanh approximation, "relu" is PyTorch's transformer default.
  """

  hidden_dim: int
  dropout: float = 0.0
  activation: str = "gelu"

  @nn.compact
  def __call__(self, x, *, train: bool):
    out_dim = x.shape[-1]
    if self.activation == "geglu":
      value, gate = jnp.split(nn.Dense(2 * self.hidden_dim, name="in")(x), 2, axis=-1)
      h = value * exact_gelu(gate)
    elif self.activation == "gelu":
      h = nn.gelu(nn.Dense(self.hidden_dim, name="in")(x))
    elif self.activation == "relu":
      h = nn.relu(nn.Dense(self.hidden_dim, name="in")(x))
    else:
      raise ValueError(f"FeedForward.activation must be one of {ACTIVATIONS}, got "
                       f"{self.activation!r}")
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    return nn.Dense(out_dim, name="out")(h)


class TransformerLayer(nn.Module):
  """Self-attention + feed-forward, padding-aware, pre-norm or post-norm.

    pre  (Perceiver, ViT):       x + Attn(LN(x)), then x + FF(LN(x))
    post (PyTorch's default
          TransformerEncoderLayer): LN(x + Attn(x)), then LN(x + FF(x))

  Dropout on the attention weights, on each residual branch and inside the feed-forward
  (PyTorch's places).
  """

  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  activation: str = "gelu"
  head_dim: int = 0
  qkv_bias: bool = True
  norm: str = "pre"

  @nn.compact
  def __call__(self, x, frame_mask=None, *, train: bool):
    if self.norm not in NORMS:
      raise ValueError(f"TransformerLayer.norm must be one of {NORMS}, got {self.norm!r}")
    mask = None if frame_mask is None else attention_mask(frame_mask, frame_mask)
    drop = lambda h: nn.Dropout(self.dropout)(h, deterministic=not train)
    attend = MultiHeadAttention(self.num_heads, self.head_dim, self.qkv_bias, self.dropout,
                                name="attn")
    feed_forward = FeedForward(self.mlp_dim, self.dropout, self.activation, name="ff")
    if self.norm == "pre":
      h = nn.LayerNorm(name="norm_attn")(x)
      x = x + drop(attend(h, h, mask=mask, train=train))
      h = nn.LayerNorm(name="norm_ff")(x)
      return x + drop(feed_forward(h, train=train))
    x = nn.LayerNorm(name="norm_attn")(x + drop(attend(x, x, mask=mask, train=train)))
    return nn.LayerNorm(name="norm_ff")(x + drop(feed_forward(x, train=train)))


class StackedTransformerLayer(TransformerLayer):
  """`TransformerLayer` in `nn.stack.layer_stack`'s form: `(x, frame_mask) -> (x, None)`
  with train/eval as an attribute."""

  train: bool = False

  @nn.compact
  def __call__(self, x, frame_mask=None):
    return super().__call__(x, frame_mask, train=self.train), None


class TransformerEncoder(nn.Module):
  """A stack of `TransformerLayer`s (`nn.stack.layer_stack`: scanned by default); pre-norm
  stacks end with a LayerNorm (`norm_out`), post-norm ones are normalised already
  (PyTorch's `nn.TransformerEncoder(norm=None)`).

  Params: scanned, `layers/...` with a leading layer axis; unrolled, `layers_{i}/...`.
  """

  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  activation: str = "gelu"
  head_dim: int = 0
  qkv_bias: bool = True
  norm: str = "pre"
  scan: bool = True
  remat: bool = False

  @nn.compact
  def __call__(self, x, frame_mask=None, *, train: bool):
    x = layer_stack(StackedTransformerLayer, self.num_layers, x, frame_mask, scan=self.scan,
                    remat=self.remat, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                    dropout=self.dropout, activation=self.activation, head_dim=self.head_dim,
                    qkv_bias=self.qkv_bias, norm=self.norm, train=train)
    return nn.LayerNorm(name="norm_out")(x) if self.norm == "pre" else x


class CrossAttentionLayer(nn.Module):
  """Pre-norm cross-attention of `queries` onto `keys`/`values` + feed-forward.

  `values` defaults to `keys`. Used by the Perceiver (latents -> sequence), CM-ARR's
  text-queried fusion and DQF's Q-CA (whose values are the query itself, Eq. 5).

  The keys' and values' LayerNorms (`norm_k`, `norm_v`) are split into `Standardize` and
  their scale and bias, which `MultiHeadAttention` applies or folds into its kernels.
  `standardized_keys=True`: the caller passes `Standardize()(keys)` (and values), computed
  once for several layers that attend to the same sequence (the Perceiver's); the params
  and the numbers are those of the LayerNorms.
  """

  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  activation: str = "gelu"
  use_feedforward: bool = True
  head_dim: int = 0
  qkv_bias: bool = True
  standardized_keys: bool = False

  @nn.compact
  def __call__(self, queries, keys, values=None, *, query_mask=None, key_mask=None,
               train: bool):
    mask = None
    if key_mask is not None:
      if query_mask is None:
        query_mask = jnp.ones(queries.shape[:2], bool)
      mask = attention_mask(query_mask, key_mask)
    q = nn.LayerNorm(name="norm_q")(queries)
    k, key_norm = self._split_norm(keys, "norm_k")
    v, value_norm = ((None, None) if values is None or values is keys
                      else self._split_norm(values, "norm_v"))
    h = MultiHeadAttention(self.num_heads, self.head_dim, self.qkv_bias, self.dropout,
                           name="attn")(q, k, v, mask=mask, train=train, key_norm=key_norm,
                                        value_norm=value_norm)
    x = queries + nn.Dropout(self.dropout)(h, deterministic=not train)
    if not self.use_feedforward:
      return x
    h = nn.LayerNorm(name="norm_ff")(x)
    h = FeedForward(self.mlp_dim, self.dropout, self.activation, name="ff")(h, train=train)
    return x + nn.Dropout(self.dropout)(h, deterministic=not train)

  def _split_norm(self, x, name: str):
    """`x` standardised and the params of its LayerNorm `name`."""
    norm = _layer_params(nn.LayerNorm(name=name), x[..., :1, :], self.is_initializing())
    if not self.standardized_keys:
      x = Standardize(name=f"{name}_standardize")(x)
    return x, norm


class ModalityProjection(nn.Module):
  """Conv1D from a modality's feature width to the model width D (SPEC section 7).

  Padded frames are zeroed before and after the convolution so that their content can
  never leak into real frames' outputs. `use_bias=False` is the official CMAD/MulT
  projection (a zero input then projects to zero).

  The params are `nn.Conv`'s (`conv/kernel` (k, C, D), `conv/bias`), computed as one
  matmul of every frame with the k taps side by side, (B T, C) x (C, k D), and k shifted
  slices of it summed: the products and sums of a "SAME" convolution, without the layout
  transposes XLA's CPU convolution puts around a (B, T, C) input.
  """

  features: int
  kernel_size: int = 1
  use_bias: bool = True

  @nn.compact
  def __call__(self, x, frame_mask):
    x = jnp.where(frame_mask[..., None], x, 0.0)
    conv = nn.Conv(self.features, (self.kernel_size,), padding="SAME", use_bias=self.use_bias,
                   name="conv")
    params = _layer_params(conv, x[:, :1], self.is_initializing())
    taps = jnp.einsum("btc,kcf->btkf", x, params["kernel"])
    before = (self.kernel_size - 1) // 2  # lax's "SAME": the odd extra pad goes after
    taps = jnp.pad(taps, ((0, 0), (before, self.kernel_size - 1 - before), (0, 0), (0, 0)))
    length = x.shape[1]
    y = sum(taps[:, k:k + length, k] for k in range(self.kernel_size))
    if self.use_bias:
      y = y + params["bias"]
    return jnp.where(frame_mask[..., None], y, 0.0)
