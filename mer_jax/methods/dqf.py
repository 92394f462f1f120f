"""DQF: Dual-Query Fusion (dqf.txt), trained only on incomplete inputs.

Per modality: Conv1D -> common length -> Q-UA. Per pair (ta, tv, av): Q-CA, average
pooled. The three pair features and a [CLS] token go through MHSA and are pooled
(Eq. 9). The unimodal, bimodal and trimodal features are concatenated for the main
head; each of the 7 granularities also has its own head, and
L = L_task + sum_n L_n (Eq. 1). Training applies one frame-masking rate
r ~ U(0, 1) per modality per batch (Sec. 3.1), never the full inputs.

Table 4 ablations (`config.model`): `unimodal_encoder="transformer"` (w/o Q-UA: a
transformer encoder instead), `pair_fusion="transformer"` (w/o Q-CA: a transformer over
the pair's concatenated sequences) or `"mult"` (Q-UA w/ MulT: MulT's cross-modal
transformers instead of Q-CA).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mer_jax import config_lib
from mer_jax.data import missing
from mer_jax.data.spec import MODALITIES, DataSpec
from mer_jax.losses.task import task_loss
from mer_jax.methods.base import Stage
from mer_jax.nn import scenarios
from mer_jax.nn.attention import ModalityProjection, TransformerEncoder, TransformerLayer
from mer_jax.nn.heads import OutputHead
from mer_jax.nn.pooling import masked_mean
from mer_jax.nn.queries import QCA, QUA, ConcatPairFusion, MulTPairFusion, align_length

# Granularities in the order of the combination names: L, A, V, LA, LV, AV, LAV.
PAIRS = ((0, 1), (0, 2), (1, 2))
# config.model.unimodal_encoder / pair_fusion: the paper's blocks first, then the
# Table 4 stand-ins.
UNIMODAL_ENCODERS = ("qua", "transformer")
PAIR_FUSIONS = ("qca", "transformer", "mult")
# Frame-level MERBench features of the real configs are average-pooled to at most this
# many steps per modality (L, A, V); the paper gives no length, and Q-CA needs one.
MERBENCH_MAX_LENGTHS = (50, 50, 50)


def present_frames(batch, modality_index: int):
  """Frame mask of one modality with absent modalities (modality_mask) folded in."""
  mask = batch[f"{MODALITIES[modality_index]}_mask"]
  if "modality_mask" in batch:
    mask = mask & batch["modality_mask"][:, modality_index:modality_index + 1]
  return mask


# The three Q-UA (and Q-CA) stacks as one module vmapped over the modality (pair) axis:
# own weights and dropout per block.
_PER_BLOCK = dict(variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                  in_axes=0, out_axes=0)


class _QUAWithMode(QUA):
  """A `QUA` whose train/eval mode is an attribute: `nn.vmap` maps positional arguments
  only."""

  train: bool = False

  @nn.compact
  def __call__(self, x, frame_mask):
    return super().__call__(x, frame_mask, train=self.train)


class _QCAWithMode(QCA):
  """A `QCA` whose train/eval mode is an attribute (as `_QUAWithMode`)."""

  train: bool = False

  @nn.compact
  def __call__(self, h_a, mask_a, h_b, mask_b):
    return super().__call__(h_a, mask_a, h_b, mask_b, train=self.train)


class DQF(nn.Module):
  """The DQF network: `__call__(batch, train=...)` -> dict with `output`, `embedding`
  (B, 7 D: the unimodal, bimodal and trimodal features) and `aux_outputs` (B, 7, ...:
  one prediction per granularity L, A, V, LA, LV, AV, LAV).

  `scan_layers` runs every Q-UA / Q-CA (and MulT) stack as one `nn.scan` over stacked
  params, `remat_layers` recomputes their layers in the backward pass.
  """

  output_shape: tuple[int, ...]
  width: int = 64
  num_layers: int = 6
  num_heads: int = 4
  mlp_dim: int = 128
  dropout: float = 0.1
  common_length: int = 50
  kernel_sizes: tuple[int, int, int] = (3, 1, 1)
  head_hidden: int = 64
  unimodal_encoder: str = "qua"
  pair_fusion: str = "qca"
  scan_layers: bool = True
  remat_layers: bool = False

  @nn.nowrap
  def projections(self):
    """The per-modality Conv1D projections to the common width (L, A, V)."""
    return [ModalityProjection(self.width, self.kernel_sizes[index], name=f"proj_{name}")
            for index, name in enumerate(MODALITIES)]

  @nn.nowrap
  def unimodal_encoders(self, *, train: bool):
    """`encode(x (3, B, L, D), frame masks (3, B, L)) -> (3, B, L, D)`: the three
    modalities' Q-UA stacks, or the w/o-Q-UA transformers.

    The Q-UA stacks (own weights each) run as one module vmapped over the modality axis
    (`qua/...`, leading axis 3): the compiled program holds one stack instead of three,
    the numbers are those of three separate stacks."""
    if self.unimodal_encoder == "qua":
      return nn.vmap(_QUAWithMode, **_PER_BLOCK, axis_size=len(MODALITIES))(
          self.num_layers, self.num_heads, self.mlp_dim, self.dropout, scan=self.scan_layers,
          remat=self.remat_layers, train=train, name="qua")
    if self.unimodal_encoder == "transformer":
      encoders = [TransformerEncoder(self.num_layers, self.num_heads, self.mlp_dim,
                                     self.dropout, name=f"encoder_{name}")
                  for name in MODALITIES]
      return lambda x, masks: jnp.stack([encoder(x[index], masks[index], train=train)
                                         for index, encoder in enumerate(encoders)])
    raise ValueError(f"config.model.unimodal_encoder={self.unimodal_encoder!r}: choose one "
                     f"of {UNIMODAL_ENCODERS}")

  @nn.nowrap
  def encode(self, projections, unimodal, features, frame_masks):
    """(3, B, L, D) encodings at the common length and their (3, B, L) frame masks."""
    aligned = [align_length(projection(x, mask), mask, self.common_length)
               for projection, x, mask in zip(projections, features, frame_masks, strict=True)]
    masks = jnp.stack([mask for _, mask in aligned])
    return unimodal(jnp.stack([x for x, _ in aligned]), masks), masks

  @nn.nowrap
  def pair_features(self, encoded, masks, *, train: bool):
    """The (B, D) features of the pairs ta, tv, av: pooled Q-CA (Eq. 5-8) or a stand-in.

    The three Q-CA stacks run as one module vmapped over the pair axis (`qca/...`,
    leading axis 3), as the Q-UA stacks do."""
    if self.pair_fusion == "qca":
      first, second = ([encoded[pair[side]] for pair in PAIRS] for side in (0, 1))
      first_masks, second_masks = ([masks[pair[side]] for pair in PAIRS] for side in (0, 1))
      fused = nn.vmap(_QCAWithMode, **_PER_BLOCK, axis_size=len(PAIRS))(
          self.num_layers, self.num_heads, self.mlp_dim, self.dropout, scan=self.scan_layers,
          remat=self.remat_layers, train=train, name="qca")(
              jnp.stack(first), jnp.stack(first_masks), jnp.stack(second),
              jnp.stack(second_masks))
      return list(fused.mean(axis=2))  # Eq. 8: the fused sequence is query-indexed.
    return [self.stand_in_pair_fusion(MODALITIES[a][0] + MODALITIES[b][0], encoded[a],
                                      masks[a], encoded[b], masks[b], train=train)
            for a, b in PAIRS]

  @nn.nowrap
  def stand_in_pair_fusion(self, pair_name: str, h_a, mask_a, h_b, mask_b, *, train: bool):
    """(B, D) feature of one modality pair from a Table 4 stand-in for Q-CA."""
    if self.pair_fusion == "mult":
      return MulTPairFusion(self.num_layers, self.num_heads, self.mlp_dim, self.dropout,
                            scan=self.scan_layers, remat=self.remat_layers,
                            name=f"mult_{pair_name}")(h_a, mask_a, h_b, mask_b, train=train)
    if self.pair_fusion == "transformer":
      return ConcatPairFusion(self.num_layers, self.num_heads, self.mlp_dim, self.dropout,
                              name=f"concat_{pair_name}")(h_a, mask_a, h_b, mask_b, train=train)
    raise ValueError(f"config.model.pair_fusion={self.pair_fusion!r}: choose one of "
                     f"{PAIR_FUSIONS}")

  @nn.nowrap
  def encode_under_masks(self, projections, unimodal, batch, modality_masks):
    """Every modality encoded once, then each row's encoding under each of S modality
    masks (B, S, 3): its own where present, an absent modality's otherwise.

    Returns lists of (B S, L, D) encodings and (B S, L) frame masks (`nn.scenarios`).
    """
    modality_masks = scenarios.combined_masks(batch, modality_masks)
    h, mask = self.encode(projections, unimodal, [batch[name] for name in MODALITIES],
                          [batch[f"{name}_mask"] for name in MODALITIES])
    absent_h, absent_mask = self.encode(
        projections, unimodal, [jnp.zeros_like(batch[name][:1]) for name in MODALITIES],
        [jnp.zeros_like(batch[f"{name}_mask"][:1]) for name in MODALITIES])
    present = [modality_masks[:, :, index] for index in range(len(MODALITIES))]
    encoded = [scenarios.select_scenarios(present[index], h[index], absent_h[index])
               for index in range(len(MODALITIES))]
    masks = [scenarios.select_scenarios(present[index], mask[index], absent_mask[index])
             for index in range(len(MODALITIES))]
    return encoded, masks

  @nn.compact
  def __call__(self, batch, *, train: bool, scenario_modality_mask=None):
    """`scenario_modality_mask` (B, S, 3): outputs (B, S, ...) under S modality masks at
    once (features not yet masked), the unimodal encoders run once rather than per
    scenario; the same outputs as S calls on `missing.apply_modality_mask`ed batches."""
    projections, unimodal = self.projections(), self.unimodal_encoders(train=train)
    if scenario_modality_mask is None:
      encoded, masks = self.encode(
          projections, unimodal, [batch[name] for name in MODALITIES],
          [present_frames(batch, index) for index in range(len(MODALITIES))])
      encoded, masks = list(encoded), list(masks)
    else:
      encoded, masks = self.encode_under_masks(projections, unimodal, batch,
                                               scenario_modality_mask)
    outputs = self.fuse(encoded, masks, train=train)
    if scenario_modality_mask is None:
      return outputs
    return scenarios.unflatten_scenarios(outputs, scenario_modality_mask)

  @nn.nowrap
  def fuse(self, encoded, masks, *, train: bool):
    """Eq. 5-9 and the heads on the unimodal encodings."""
    unimodal = [masked_mean(h, mask) for h, mask in zip(encoded, masks, strict=True)]
    bimodal = self.pair_features(encoded, masks, train=train)

    cls = self.param("cls", nn.initializers.normal(0.02), (1, self.width))
    tokens = jnp.stack(bimodal + [jnp.broadcast_to(cls, bimodal[0].shape)], axis=1)
    trimodal = TransformerLayer(self.num_heads, self.mlp_dim, self.dropout, name="mhsa")(
        tokens, train=train).mean(axis=1)  # Eq. 9

    granularities = unimodal + bimodal + [trimodal]
    features = jnp.concatenate(granularities, axis=-1)
    output = OutputHead(self.output_shape, self.head_hidden, self.dropout, name="head")(
        features, train=train)
    aux_outputs = jnp.stack([
        OutputHead(self.output_shape, self.head_hidden, self.dropout,
                   name=f"head_{combination}")(feature, train=train)
        for combination, feature in zip(missing.COMBINATION_NAMES, granularities, strict=True)
    ], axis=1)
    return {"output": output, "embedding": features, "aux_outputs": aux_outputs}


def build(config, spec: DataSpec) -> list[Stage]:
  model_config = config.model
  model = DQF(
      output_shape=spec.output_shape,
      width=model_config.width,
      num_layers=model_config.num_layers,
      num_heads=model_config.num_heads,
      mlp_dim=model_config.mlp_dim,
      dropout=model_config.dropout,
      common_length=model_config.common_length or max(spec.lengths),
      kernel_sizes=tuple(model_config.kernel_sizes),
      head_hidden=model_config.head_hidden,
      unimodal_encoder=model_config.unimodal_encoder,
      pair_fusion=model_config.pair_fusion,
      scan_layers=model_config.scan_layers,
      remat_layers=model_config.remat_layers,
  )
  task = spec.task
  regression_loss = config.loss.regression_loss
  aux_weight = config.loss.aux_weight
  missing_config = config.missing

  def loss_fn(params, method_state, batch, key, context):
    del context
    missing_key, dropout_key = jax.random.split(key)
    batch, _ = missing.apply_training_protocol(missing_key, batch, missing_config)
    out = model.apply({"params": params}, batch, train=True, rngs={"dropout": dropout_key})
    labels = batch["label"]
    main = task_loss(out["output"], labels, task, regression_loss=regression_loss).mean()
    per_granularity = jax.vmap(
        lambda o: task_loss(o, labels, task, regression_loss=regression_loss).mean(),
        in_axes=1)(out["aux_outputs"])
    aux = per_granularity.sum()
    metrics = {"loss_task": main, "loss_aux": aux}
    return main + aux_weight * aux, (metrics, method_state)

  return [Stage(name="", model=model, loss_fn=loss_fn, num_epochs=config.train.num_epochs,
                masks_in_network=True)]


def configure(config, variant: str):
  """DQF's hyper-parameters (dqf.txt Sec. 4.2) and variant sizes, shared by every
  `configs/dqf_<dataset>.py`; the config files set only the data fields."""
  config.method = "dqf"
  # Model: six Q-UA / Q-CA layers and four heads (Sec. 4.2, Table 5).
  config.model.width = 64
  config.model.num_layers = 6
  config.model.num_heads = 4
  config.model.mlp_dim = 128
  config.model.dropout = 0.1
  config.model.common_length = 0  # 0 = the longest modality; unaligned data are pooled to it
  config.model.kernel_sizes = (3, 1, 1)  # Conv1D per modality (L, A, V)
  config.model.head_hidden = 64
  # Table 4 ablations: "transformer" = w/o Q-UA; pair_fusion "transformer" = w/o Q-CA,
  # "mult" = Q-UA w/ MulT.
  config.model.unimodal_encoder = "qua"
  config.model.pair_fusion = "qca"
  # Layer stacks as one nn.scan over stacked params (compile time and checkpoint size
  # independent of depth); remat recomputes each layer in the backward pass.
  config.model.scan_layers = True
  config.model.remat_layers = False

  # Losses: L = L_task + sum over the 7 granularities of L_n (Eq. 1); MAE for regression,
  # cross-entropy for classes.
  config.loss.regression_loss = "l1"
  config.loss.aux_weight = 1.0

  # Optimiser (Sec. 4.2): momentum SGD, fixed learning rate 1e-5, batch 64, 100 epochs;
  # the paper names no momentum (0.9, SGD's usual) and no weight decay (none).
  config.train.optimizer = "sgd"
  config.train.momentum = 0.9
  config.train.learning_rate = 1e-5
  config.train.weight_decay = 0.0
  config.train.batch_size = 64
  config.train.num_epochs = 100
  config.train.schedule = "constant"

  # Training protocol: only incomplete inputs, one frame rate r ~ U(0, 1) per modality
  # per batch (Sec. 3.1). Evaluation keeps the base grid: AUILC over frame rates 0..1.0
  # for each of the 7 masked sets, the fixed combinations and MR0.1..0.7.
  config.missing.kind = "frame_dqf"

  if variant in ("synthetic", "tiny"):
    # From-scratch runs of a few CPU minutes: SGD at 1e-5 would barely move in 8 epochs.
    config.train.optimizer = "adamw"
    config.train.learning_rate = 3e-4
    config.train.weight_decay = 1e-4
    config.train.schedule = "cosine"
  if variant == "synthetic":
    config.train.num_epochs = 8
    config.model.num_layers = 2
  config_lib.apply_variant(config, variant)
  if variant == "tiny":
    config.model.width = 16
    config.model.num_layers = 1
    config.model.mlp_dim = 32
    config.model.head_hidden = 16
  return config
