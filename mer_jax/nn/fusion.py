"""The teacher/student backbone that MCUR and CMAD share (SPEC section 7).

Per modality: Conv1D to width D (`ModalityProjection`), a learned position embedding,
a `Perceiver` -> one token per modality. The three modality tokens (plus a learned
modality-type embedding) go through a transformer encoder (2 layers in both papers),
are concatenated and mapped to the fused embedding E_f (B, D) by an MLP: two layers
in MCUR (mcur.txt Eq. 18), one linear layer in CMAD (cmad_supplementary.txt Eq. 20).

A modality is "present" for a sample when it has at least one real frame after the
modality mask and any frame-level masking. Absent modalities are masked out as keys of
the fusion attention and their tokens are zeroed before the concatenation, so their
inputs cannot change the output and the MLP sees a fixed position per modality.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mer_jax.data.spec import MODALITIES
from mer_jax.nn.attention import ModalityProjection, TransformerEncoder
from mer_jax.nn.perceiver import Perceiver


class _PerceiverWithMode(Perceiver):
  """A `Perceiver` whose train/eval mode is an attribute: `nn.vmap` maps positional
  arguments only."""

  train: bool = False

  @nn.compact
  def __call__(self, x, frame_mask):
    return super().__call__(x, frame_mask, train=self.train)


def _pad_time(x, length: int):
  """Pads axis 1 of (B, T, ...) with zeros to `length`."""
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, length - x.shape[1])
  return jnp.pad(x, pad)


def present_frames(batch, modality_index: int):
  """Frame mask (B, T) of one modality with the batch's `modality_mask` folded in."""
  mask = jnp.asarray(batch[f"{MODALITIES[modality_index]}_mask"], bool)
  if "modality_mask" in batch:
    mask = mask & jnp.asarray(batch["modality_mask"], bool)[:, modality_index:modality_index + 1]
  return mask


class PerceiverFusion(nn.Module):
  """Conv1D + Perceiver per modality, transformer fusion over modality tokens, MLP.

  Attributes:
    width: D, the common width of every modality token and of E_f.
    kernel_sizes: Conv1D kernel per modality (L, A, V).
    num_latents, perceiver_depth, cross_heads, latent_heads, perceiver_mlp_dim,
      self_per_cross: the `Perceiver` of each modality.
    fusion_layers, fusion_heads, fusion_mlp_dim: the transformer over the modality tokens.
    mlp_layers: Dense layers after the concatenated tokens (GELU between them): 2 for
      MCUR, 1 (linear) for CMAD.
    position_embedding: add a learned position embedding to each projected sequence
      (the attention is otherwise blind to frame order beyond the Conv1D kernel).
    dropout: dropout rate of every block.
  """

  width: int = 64
  kernel_sizes: tuple[int, int, int] = (3, 1, 1)
  num_latents: int = 8
  perceiver_depth: int = 2
  cross_heads: int = 1
  latent_heads: int = 4
  perceiver_mlp_dim: int = 128
  self_per_cross: int = 1
  fusion_layers: int = 2
  fusion_heads: int = 4
  fusion_mlp_dim: int = 128
  mlp_layers: int = 2
  position_embedding: bool = True
  dropout: float = 0.0

  @nn.compact
  def __call__(self, batch, *, train: bool):
    """Returns dict(fused (B, D) E_f, unimodal (B, 3, D) the Perceiver outputs, tokens
    (B, 3, D) the fusion transformer outputs (0 for absent modalities), present (B, 3))."""
    sequences, masks = [], []
    for index, name in enumerate(MODALITIES):
      mask = present_frames(batch, index)
      x = ModalityProjection(self.width, self.kernel_sizes[index], name=f"proj_{name}")(
          jnp.asarray(batch[name]), mask)
      if self.position_embedding:
        x = x + self.param(f"pos_{name}", nn.initializers.normal(0.02),
                           (x.shape[1], self.width), x.dtype)
      sequences.append(x)
      masks.append(mask)
    # The three Perceivers (own weights each) run as one vmapped module over sequences
    # padded to a common length: padding is masked, so the result is that of three
    # separate Perceivers, and the compiled program holds one Perceiver instead of three.
    length = max(x.shape[1] for x in sequences)
    stacked = jnp.stack([_pad_time(x, length) for x in sequences])
    stacked_masks = jnp.stack([_pad_time(m, length) for m in masks])
    perceivers = nn.vmap(
        _PerceiverWithMode, variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True}, in_axes=(0, 0), out_axes=1,
        axis_size=len(MODALITIES))(
            num_latents=self.num_latents, depth=self.perceiver_depth,
            cross_heads=self.cross_heads, latent_heads=self.latent_heads,
            mlp_dim=self.perceiver_mlp_dim, self_per_cross=self.self_per_cross,
            dropout=self.dropout, train=train, name="perceivers")
    unimodal = perceivers(stacked, stacked_masks)  # (B, 3, D)
    present = jnp.stack([m.any(axis=1) for m in masks], axis=1)
    modality_embedding = self.param("modality_embedding", nn.initializers.normal(0.02),
                                    (len(MODALITIES), self.width), unimodal.dtype)
    h = TransformerEncoder(self.fusion_layers, self.fusion_heads, self.fusion_mlp_dim,
                           self.dropout, name="fusion")(
                               unimodal + modality_embedding, present, train=train)
    h = jnp.where(present[..., None], h, 0.0)
    fused = h.reshape(h.shape[0], -1)
    for layer in range(self.mlp_layers):
      if layer:
        fused = nn.Dropout(self.dropout)(nn.gelu(fused), deterministic=not train)
      fused = nn.Dense(self.width, name=f"mlp{layer}")(fused)
    return {"fused": fused, "unimodal": unimodal, "tokens": h, "present": present}


def perceiver_fusion_from_config(model_config, **overrides) -> PerceiverFusion:
  """The backbone from the `config.model` fields the MCUR and CMAD configs share."""
  fields = dict(
      width=model_config.width,
      kernel_sizes=tuple(model_config.kernel_sizes),
      num_latents=model_config.num_latents,
      perceiver_depth=model_config.perceiver_depth,
      cross_heads=model_config.cross_heads,
      latent_heads=model_config.latent_heads,
      perceiver_mlp_dim=model_config.perceiver_mlp_dim,
      self_per_cross=model_config.self_per_cross,
      fusion_layers=model_config.fusion_layers,
      fusion_heads=model_config.fusion_heads,
      fusion_mlp_dim=model_config.fusion_mlp_dim,
      mlp_layers=model_config.mlp_layers,
      position_embedding=model_config.position_embedding,
      dropout=model_config.dropout,
  )
  fields.update(overrides)
  return PerceiverFusion(**fields)
