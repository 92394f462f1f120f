"""Perceiver encoder (Jaegle et al. 2021) as MCUR and CMAD use it per modality.

mcur.txt A.1.2 (Eq. 17) and cmad_supplementary.txt Sec. 6.1 (Eq. 17-19): learnable
latents (the "prompts" / "learnable units") are the queries of a cross-attention onto
the modality's sequence; each Perceiver layer is a cross-attention block followed by
latent self-attention block(s), every block pre-norm with a GEGLU feed-forward (the
Perceiver's choice); the output is the mean over the latents and a LayerNorm.

Padding and absent modalities: the frame mask (already AND-ed with `modality_mask` by
the caller) is the key mask of every cross-attention, and masked frames are zeroed
before they become keys, so nothing stored at a masked frame can reach the output. A
sequence with no real frame attends uniformly over zero keys and gives a constant,
finite vector; the fusion stage (`nn.fusion`) masks such a modality out.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mer_jax.nn.attention import CrossAttentionLayer, TransformerLayer


class Perceiver(nn.Module):
  """Latents cross-attend to a masked sequence, then self-attend; pooled to one vector.

  Attributes:
    num_latents: N, number of learnable latent vectors (each of the input width D).
    depth: number of Perceiver layers (cross-attention + latent self-attention).
    cross_heads: heads of the cross-attention (the Perceiver uses 1).
    latent_heads: heads of the latent self-attention (must divide D).
    mlp_dim: hidden width of the GEGLU feed-forwards.
    self_per_cross: latent self-attention blocks after each cross-attention.
    dropout: dropout rate inside the blocks.
    share_weights: reuse the weights of layer 1 in every later layer (the Perceiver's
      iterative attention with shared weights); False gives each layer its own.
  """

  num_latents: int = 8
  depth: int = 2
  cross_heads: int = 1
  latent_heads: int = 4
  mlp_dim: int = 128
  self_per_cross: int = 1
  dropout: float = 0.0
  share_weights: bool = False

  @nn.compact
  def __call__(self, x, frame_mask, *, train: bool):
    """x (B, T, D) and frame_mask (B, T) bool (True = real frame) -> (B, D)."""
    batch_size, _, width = x.shape
    frame_mask = jnp.asarray(frame_mask, bool)
    x = jnp.where(frame_mask[..., None], x, 0.0)
    latents = self.param("latents", nn.initializers.truncated_normal(0.02),
                         (self.num_latents, width), x.dtype)
    h = jnp.broadcast_to(latents, (batch_size, self.num_latents, width))

    cross_blocks, self_blocks = [], []
    for layer in range(1 if self.share_weights else self.depth):
      cross_blocks.append(CrossAttentionLayer(
          self.cross_heads, self.mlp_dim, self.dropout, activation="geglu",
          name=f"cross{layer}"))
      self_blocks.append([
          TransformerLayer(self.latent_heads, self.mlp_dim, self.dropout, activation="geglu",
                           name=f"latent{layer}_{j}")
          for j in range(self.self_per_cross)])
    for layer in range(self.depth):
      index = 0 if self.share_weights else layer
      h = cross_blocks[index](h, x, key_mask=frame_mask, train=train)
      for block in self_blocks[index]:
        h = block(h, train=train)
    return nn.LayerNorm(name="norm_out")(h.mean(axis=1))
