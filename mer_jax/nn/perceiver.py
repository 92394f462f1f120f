"""Perceiver encoder (Jaegle et al. 2021) as MCUR and CMAD use it per modality.

mcur.txt A.1.2 (Eq. 17) and cmad_supplementary.txt Sec. 6.1 (Eq. 17-19): learnable
latents (the "prompts" / "learnable units") are the queries of a cross-attention onto
the modality's sequence; each Perceiver layer is a cross-attention block followed by
latent self-attention block(s), every block pre-norm with a GEGLU feed-forward (the
Perceiver's choice); the output is the mean over the latents and a LayerNorm. The
official CMAD code (`Perceiver.py`, after lucidrains' perceiver-pytorch) attends with an
inner width `heads x dim_head` independent of D and without query/key/value biases; the
fields below build it exactly (`cross_head_dim`, `latent_head_dim`, `qkv_bias=False`).

Padding and absent modalities: the frame mask (already AND-ed with `modality_mask` by
the caller) is the key mask of every cross-attention, and masked frames are zeroed
before they become keys, so nothing stored at a masked frame can reach the output. A
sequence with no real frame attends uniformly over zero keys and gives a constant,
finite vector; the fusion stage (`nn.fusion`) masks such a modality out.

The layers run through `nn.stack.layer_stack` (params `layers/...` with a leading depth
axis; `scan=False` unrolls them as `layers_{i}/...`, same numerics).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mer_jax.nn.attention import CrossAttentionLayer, Standardize, TransformerLayer
from mer_jax.nn.stack import layer_stack


class PerceiverLayer(nn.Module):
  """One Perceiver layer: latents cross-attend to the sequence (`cross`), then
  `self_per_cross` latent self-attention blocks (`latent{j}`). `layer_stack`'s form:
  `(latents, frames, frame_mask) -> (latents, None)`, train/eval an attribute; `frames`
  are the sequence `Standardize`d once for all layers (each layer's `cross/norm_k`
  applies its own scale and bias)."""

  cross_heads: int = 1
  latent_heads: int = 4
  mlp_dim: int = 128
  self_per_cross: int = 1
  dropout: float = 0.0
  cross_head_dim: int = 0
  latent_head_dim: int = 0
  qkv_bias: bool = True
  train: bool = False

  @nn.compact
  def __call__(self, latents, frames, frame_mask):
    h = CrossAttentionLayer(self.cross_heads, self.mlp_dim, self.dropout, activation="geglu",
                            head_dim=self.cross_head_dim, qkv_bias=self.qkv_bias,
                            standardized_keys=True,
                            name="cross")(latents, frames, key_mask=frame_mask,
                                          train=self.train)
    for j in range(self.self_per_cross):
      h = TransformerLayer(self.latent_heads, self.mlp_dim, self.dropout, activation="geglu",
                           head_dim=self.latent_head_dim, qkv_bias=self.qkv_bias,
                           name=f"latent{j}")(h, train=self.train)
    return h, None


class Perceiver(nn.Module):
  """Latents cross-attend to a masked sequence, then self-attend; pooled to one vector.

  Attributes:
    num_latents: N, number of learnable latent vectors (each of the input width D).
    depth: number of Perceiver layers (cross-attention + latent self-attention).
    cross_heads: heads of the cross-attention (the Perceiver paper uses 1).
    latent_heads: heads of the latent self-attention.
    mlp_dim: hidden width of the GEGLU feed-forwards.
    self_per_cross: latent self-attention blocks after each cross-attention.
    dropout: dropout rate inside the blocks.
    share_weights: one set of layer weights (`layers_0`) reused by every layer (the
      Perceiver's iterative attention with shared weights); False gives each its own.
    cross_head_dim, latent_head_dim: head dimensions; 0 = D // heads.
    qkv_bias: biases on the query/key/value projections (the official code has none).
    scan: layers under `nn.scan` (`layers/...`; False: unrolled, `layers_{i}`).
    remat: recompute each layer in the backward pass.
  """

  num_latents: int = 8
  depth: int = 2
  cross_heads: int = 1
  latent_heads: int = 4
  mlp_dim: int = 128
  self_per_cross: int = 1
  dropout: float = 0.0
  share_weights: bool = False
  cross_head_dim: int = 0
  latent_head_dim: int = 0
  qkv_bias: bool = True
  scan: bool = True
  remat: bool = False

  @nn.compact
  def __call__(self, x, frame_mask, *, train: bool):
    """x (B, T, D) and frame_mask (B, T) bool (True = real frame) -> (B, D)."""
    batch_size, _, width = x.shape
    frame_mask = jnp.asarray(frame_mask, bool)
    x = jnp.where(frame_mask[..., None], x, 0.0)
    latents = self.param("latents", nn.initializers.truncated_normal(0.02),
                         (self.num_latents, width), x.dtype)
    h = jnp.broadcast_to(latents, (batch_size, self.num_latents, width))
    fields = dict(cross_heads=self.cross_heads, latent_heads=self.latent_heads,
                  mlp_dim=self.mlp_dim, self_per_cross=self.self_per_cross,
                  dropout=self.dropout, cross_head_dim=self.cross_head_dim,
                  latent_head_dim=self.latent_head_dim, qkv_bias=self.qkv_bias, train=train)
    # Every layer's keys are the same frames: their LayerNorm statistics are computed once.
    frames = Standardize(name="standardize_frames")(x)
    if self.share_weights:
      # One set of weights applied `depth` times (nothing to stack).
      layer = PerceiverLayer(**fields, name="layers_0")
      for _ in range(self.depth):
        h, _ = layer(h, frames, frame_mask)
    else:
      h = layer_stack(PerceiverLayer, self.depth, h, frames, frame_mask, scan=self.scan,
                      remat=self.remat, **fields)
    return nn.LayerNorm(name="norm_out")(h.mean(axis=1))
