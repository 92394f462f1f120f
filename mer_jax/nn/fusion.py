"""The teacher/student backbone that MCUR and CMAD share (SPEC section 7).

Per modality: Conv1D to width D (`ModalityProjection`), optionally a learned position
embedding, a `Perceiver` -> one token per modality. The three modality tokens (plus an
optional learned modality-type embedding) go through a transformer encoder (2 layers in
both papers), are concatenated and mapped to the fused embedding E_f (B, D) by an MLP:
one linear layer in CMAD (cmad_supplementary.txt Eq. 20; the official code's
`fusion_all`: Linear(3D -> D) -> Dropout(0.3) -> ReLU), two in MCUR (mcur.txt Eq. 18).

Absent modalities (`absent_modality`). A modality is "present" for a sample when it has
at least one real frame after the modality mask. "mask" (mer_jax's default): absent
modalities are masked out as keys of the fusion attention and their tokens are zeroed
before the concatenation, so their inputs cannot change the output. "zero" (the official
CMAD code): an absent modality is zeros at the input; its Perceiver runs on them (and
gives a constant token) and the fusion attends to all three tokens. In both modes an
absent modality's frames never reach the output.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mer_jax.data.spec import MODALITIES
from mer_jax.nn import scenarios
from mer_jax.nn.attention import ModalityProjection, TransformerEncoder
from mer_jax.nn.perceiver import Perceiver

ABSENT_MODALITY_MODES = ("mask", "zero")
FUSED_ACTIVATIONS = ("none", "relu", "gelu")


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
    projection_bias: bias of the Conv1D projections (the official code has none).
    num_latents, perceiver_depth, cross_heads, cross_head_dim, latent_heads,
      latent_head_dim, perceiver_mlp_dim, self_per_cross, perceiver_qkv_bias,
      perceiver_dropout: the `Perceiver` of each modality (head_dim 0 = D // heads).
    fusion_layers, fusion_heads, fusion_head_dim, fusion_mlp_dim, fusion_activation,
      fusion_norm, fusion_dropout: the transformer over the modality tokens (PyTorch's
      `TransformerEncoderLayer(D, nhead)` is 2048, "relu", "post", 0.1).
    mlp_layers: Dense layers after the concatenated tokens: 1 (linear) for CMAD, 2 for MCUR.
    mlp_hidden_dim: width of the hidden Dense layers (0 = D).
    fused_activation, fused_dropout: dropout then activation after every hidden Dense
      layer, and after the last one too when `activate_fused` (CMAD's `fusion_all`).
    position_embedding: add a learned position embedding to each projected sequence.
    modality_embedding: add a learned modality-type embedding to the tokens.
    absent_modality: "mask" or "zero" (module docstring).
    scan, remat: the Perceiver and fusion layers under `nn.scan` / recomputed in the
      backward pass.
  """

  width: int = 64
  kernel_sizes: tuple[int, int, int] = (3, 1, 1)
  projection_bias: bool = True
  num_latents: int = 8
  perceiver_depth: int = 2
  cross_heads: int = 1
  cross_head_dim: int = 0
  latent_heads: int = 4
  latent_head_dim: int = 0
  perceiver_mlp_dim: int = 128
  self_per_cross: int = 1
  perceiver_qkv_bias: bool = True
  perceiver_dropout: float = 0.0
  fusion_layers: int = 2
  fusion_heads: int = 4
  fusion_head_dim: int = 0
  fusion_mlp_dim: int = 128
  fusion_activation: str = "gelu"
  fusion_norm: str = "pre"
  fusion_dropout: float = 0.0
  mlp_layers: int = 2
  mlp_hidden_dim: int = 0
  fused_activation: str = "gelu"
  fused_dropout: float = 0.0
  activate_fused: bool = False
  position_embedding: bool = True
  modality_embedding: bool = True
  absent_modality: str = "mask"
  scan: bool = True
  remat: bool = False

  @nn.compact
  def __call__(self, batch, *, train: bool, scenario_modality_mask=None):
    """Returns dict(fused (B, D) E_f, unimodal (B, 3, D) the Perceiver outputs, tokens
    (B, 3, D) the fusion transformer outputs (0 for absent modalities in "mask" mode),
    present (B, 3)).

    With `scenario_modality_mask` (B, S, 3) (features not yet masked): the same under S
    modality masks, rows (B S) with scenarios minor. Each modality's projection and
    Perceiver run once on the batch and once on an absent modality (zero features, no
    real frame: the same for every row), and each scenario selects per row before the
    fusion, as `missing.apply_modality_mask` and one call per mask would."""
    if self.absent_modality not in ABSENT_MODALITY_MODES:
      raise ValueError(f"config.model.absent_modality must be one of {ABSENT_MODALITY_MODES}, "
                       f"got {self.absent_modality!r}")
    if self.fused_activation not in FUSED_ACTIVATIONS:
      raise ValueError(f"config.model.fused_activation must be one of {FUSED_ACTIVATIONS}, "
                       f"got {self.fused_activation!r}")
    encode = self.modality_encoder(batch, train=train)
    if scenario_modality_mask is None:
      unimodal, present = encode([batch[name] for name in MODALITIES],
                                 [present_frames(batch, i) for i in range(len(MODALITIES))])
    else:
      unimodal, present = self.encode_under_masks(encode, batch, scenario_modality_mask)
    return self.fuse(unimodal, present, train=train)

  @nn.nowrap
  def modality_encoder(self, batch, *, train: bool):
    """`encode(features, frame masks) -> (unimodal (B, 3, D), present (B, 3))`: the
    projections, position embeddings and Perceivers, created once so that they can be
    applied to several inputs."""
    projections, positions = [], []
    for index, name in enumerate(MODALITIES):
      projections.append(ModalityProjection(self.width, self.kernel_sizes[index],
                                            self.projection_bias, name=f"proj_{name}"))
      if self.position_embedding:
        positions.append(self.param(f"pos_{name}", nn.initializers.normal(0.02),
                                    (batch[name].shape[1], self.width),
                                    jnp.asarray(batch[name]).dtype))
    # The three Perceivers (own weights each) run as one vmapped module over sequences
    # padded to a common length: padding is masked, so the result is that of three
    # separate Perceivers, and the compiled program holds one Perceiver instead of three.
    perceivers = nn.vmap(
        _PerceiverWithMode, variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True}, in_axes=(0, 0), out_axes=1,
        axis_size=len(MODALITIES))(
            num_latents=self.num_latents, depth=self.perceiver_depth,
            cross_heads=self.cross_heads, cross_head_dim=self.cross_head_dim,
            latent_heads=self.latent_heads, latent_head_dim=self.latent_head_dim,
            mlp_dim=self.perceiver_mlp_dim, self_per_cross=self.self_per_cross,
            qkv_bias=self.perceiver_qkv_bias, dropout=self.perceiver_dropout,
            scan=self.scan, remat=self.remat, train=train, name="perceivers")

    def encode(features, masks):
      sequences = []
      for index, (x, mask) in enumerate(zip(features, masks, strict=True)):
        x = projections[index](jnp.asarray(x), mask)
        sequences.append(x + positions[index] if self.position_embedding else x)
      length = max(x.shape[1] for x in sequences)
      stacked = jnp.stack([_pad_time(x, length) for x in sequences])
      stacked_masks = jnp.stack([_pad_time(m, length) for m in masks])
      return perceivers(stacked, stacked_masks), jnp.stack([m.any(axis=1) for m in masks],
                                                           axis=1)

    return encode

  @nn.nowrap
  def encode_under_masks(self, encode, batch, modality_masks):
    """(unimodal (B S, 3, D), present (B S, 3)) under the (B, S, 3) modality masks."""
    modality_masks = scenarios.combined_masks(batch, modality_masks)
    unimodal, has_frames = encode([batch[name] for name in MODALITIES],
                                  [jnp.asarray(batch[f"{name}_mask"], bool) for name in MODALITIES])
    absent, _ = encode([jnp.zeros_like(jnp.asarray(batch[name])[:1]) for name in MODALITIES],
                       [jnp.zeros_like(jnp.asarray(batch[f"{name}_mask"], bool)[:1])
                        for name in MODALITIES])
    return (scenarios.select_scenarios(modality_masks, unimodal, absent),
            scenarios.flatten_scenarios(modality_masks & has_frames[:, None, :]))

  @nn.nowrap
  def fuse(self, unimodal, present, *, train: bool):
    """The fusion transformer over the three modality tokens and the MLP to E_f."""
    tokens = unimodal
    if self.modality_embedding:
      tokens = tokens + self.param("modality_embedding", nn.initializers.normal(0.02),
                                   (len(MODALITIES), self.width), unimodal.dtype)
    masking = self.absent_modality == "mask"
    h = TransformerEncoder(self.fusion_layers, self.fusion_heads, self.fusion_mlp_dim,
                           self.fusion_dropout, activation=self.fusion_activation,
                           head_dim=self.fusion_head_dim, norm=self.fusion_norm,
                           scan=self.scan, remat=self.remat, name="fusion")(
                               tokens, present if masking else None, train=train)
    if masking:
      h = jnp.where(present[..., None], h, 0.0)
    fused = h.reshape(h.shape[0], -1)
    for layer in range(self.mlp_layers):
      last = layer == self.mlp_layers - 1
      fused = nn.Dense(self.width if last else (self.mlp_hidden_dim or self.width),
                       name=f"mlp{layer}")(fused)
      if not last or self.activate_fused:
        fused = nn.Dropout(self.fused_dropout)(fused, deterministic=not train)
        fused = _activation(self.fused_activation)(fused)
    return {"fused": fused, "unimodal": unimodal, "tokens": h, "present": present}


def _activation(name: str):
  return {"none": lambda x: x, "relu": nn.relu, "gelu": nn.gelu}[name]


# `config.model` fields of the backbone (the MCUR and CMAD configs share them).
BACKBONE_FIELDS = (
    "width", "kernel_sizes", "projection_bias", "num_latents", "perceiver_depth",
    "cross_heads", "cross_head_dim", "latent_heads", "latent_head_dim", "perceiver_mlp_dim",
    "self_per_cross", "perceiver_qkv_bias", "perceiver_dropout", "fusion_layers",
    "fusion_heads", "fusion_head_dim", "fusion_mlp_dim", "fusion_activation", "fusion_norm",
    "fusion_dropout", "mlp_layers", "mlp_hidden_dim", "fused_activation", "fused_dropout",
    "activate_fused", "position_embedding", "modality_embedding", "absent_modality", "scan",
    "remat")


def perceiver_fusion_from_config(model_config, **overrides) -> PerceiverFusion:
  """The backbone from the `config.model` fields the MCUR and CMAD configs share."""
  fields = {name: model_config[name] for name in BACKBONE_FIELDS}
  fields["kernel_sizes"] = tuple(fields["kernel_sizes"])
  fields.update(overrides)
  return PerceiverFusion(**fields)
