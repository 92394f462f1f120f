"""CM-ARR: cross-modal alignment, reconstruction and refinement (cm_arr.txt).

Per modality a Conv1D projects the features to the common width D and the sequences are
brought to one common length T (`align_length`; the real configs cap the data at T = 50
frames on loading and use T = 50); everything below lives in that projected space.

Alignment (Sec. 3.1.2): a UMC per modality (MLP + self-attention) turns the projected
sequence into an aligned sequence and, pooled, a diagonal Gaussian (mean, std); L_udcl is
the symmetric distribution-based InfoNCE over the LA, LV, AV pairs with similarity
S = a * D_2W + b and temperature tau, a = -softplus(.), b and log tau learned (one set per
pair). The aligned sequences are the features X_n that the flows transform, that L_rec
rebuilds and that the fusion reads (`flow_input="aligned"`, the paper's "flows transform
the aligned distributions"); `flow_input="projected"` reads the raw projections instead
and leaves the UMC to the loss alone.

Reconstruction (Sec. 3.2): a per-modality normalizing flow F_n maps each frame of X_n to
a latent. The latent prior is DiCMoR's: one learnable diagonal Gaussian per class,
shared by all modalities, so the flow NLL takes the label (the likelihood trains the
flows; its input gradient is stopped). A missing modality's latent is, frame by frame,
the mean of the latents of the modalities present for that sample (Eq. 7), decoded by its
own inverse flow (Eq. 8) and refined by an RCAB stack. The decoded features enter RCAB
as stop-gradient inputs (DiCMoR's `.detach()`), so L_rec trains the refinement and not
the flows (`rec_through_flow=True` lets it reach the flows and the features, the earlier
form). L_rec is the mean squared error to the real features (or Eq. 9's squared Frobenius
norm, `config.loss.rec_norm`), known in training because missingness is simulated.

Refinement (Sec. 3.3): L_spcl, a supervised contrastive loss over the pooled (real or
reconstructed) representations of the three modalities whose positives are other
modalities of other samples with the same label. Fusion: the text sequence queries
audio and vision (two cross-attention blocks), the results are concatenated over
channels, go through self-attention, are pooled and classified.

    L = alpha * L_udcl + beta * L_spcl + lambda * L_rec + L_cls + lambda_flow * L_flow

Table 3's Baseline is `reconstruct=False` (an absent modality enters the fusion as zero
features) trained on full inputs; "w/o attention" is `umc_attention=False`.

Missing inputs: a modality flagged absent in `modality_mask` is never read on the path
to the prediction or to the reconstructions (everything it could reach is selected away
with `jnp.where`). The model still projects every modality it is given, so that one
training forward on the clean features (with the simulated mask) also yields the
reconstruction targets and the alignment Gaussians of all three modalities.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mer_jax import config_lib
from mer_jax.data import missing
from mer_jax.data.spec import MODALITIES, DataSpec
from mer_jax.losses.contrastive import (
    contrastive_categories,
    cross_modal_supervised_contrastive,
)
from mer_jax.losses.divergences import regression_anchor_class, udcl_loss
from mer_jax.losses.task import task_loss
from mer_jax.methods.base import Stage
from mer_jax.nn.attention import CrossAttentionLayer, ModalityProjection, TransformerEncoder
from mer_jax.nn.flows import ClassGaussianPrior, NormalizingFlow, flow_nll
from mer_jax.nn.gaussian import UncertaintyModule
from mer_jax.nn.heads import OutputHead
from mer_jax.nn.pooling import masked_mean
from mer_jax.nn.queries import align_length
from mer_jax.nn.reconstruction import RCABStack

NUM_PAIRS = 3  # LA, LV, AV: the order of `udcl_loss`
UDCL_KINDS = ("distribution", "point")
FLOW_INPUTS = ("aligned", "projected")
REC_NORMS = ("mean", "frobenius")
# Floor of the learned InfoNCE temperature, tau = floor + exp(log_tau): keeps logits
# S / tau finite when the optimiser drives tau down, while log_tau keeps its gradient
# everywhere (a hard clip would freeze it at the floor for good).
_MIN_TEMPERATURE = 1e-2


def _inverse_softplus(y: float) -> float:
  return math.log(math.expm1(y))


def num_prior_classes(spec: DataSpec) -> int:
  """Classes of the flows' latent prior: `prior_categories` ranges over 0..K-1."""
  if spec.task == "classification":
    return spec.num_classes
  if spec.task == "regression":
    return 7  # DiCMoR's rounded sentiment classes -3..3
  return spec.num_classes + 1  # the present emotion, or "none" (contrastive_categories)


def prior_categories(labels, spec: DataSpec):
  """(B,) int32 prior class of each sample: the class (classification), DiCMoR's rounded
  label (regression, `regression_anchor_class`), the first present emotion or K for none
  (multilabel_binary, `contrastive_categories`)."""
  if spec.task == "regression":
    low, high = spec.label_range or (-3.0, 3.0)
    return regression_anchor_class(labels, max(abs(low), abs(high)))
  return contrastive_categories(labels, spec.task)


class CMARR(nn.Module):
  """The CM-ARR network.

  `__call__(batch, train=...)` takes the batch layout of SPEC section 4 (with an optional
  `modality_mask` (B, 3), all present when absent) and returns a dict:
    output: task prediction, (B,) / (B, K) / (B, K, 2).
    embedding: (B, 2D) pooled fused representation.
    features: (B, 3, T, D) X_n of the given features: the UMC's aligned sequences
      (`flow_input="aligned"`) or the projections; the flows' inputs and L_rec's targets.
    frame_mask: (B, 3, T) bool real frames of the given features after length alignment.
    completed: (B, 3, T, D) features where present, reconstructed where missing (zeros
      without reconstruction): what the fusion reads.
    completed_mask: (B, 3, T).
    modality_embedding: (3, B, D) masked mean over time of `completed` (L_spcl input).
    gaussian_mean, gaussian_std: (3, B, E) UMC Gaussians of the given features.
    udcl_scale (3,) < 0, udcl_shift (3,), udcl_temperature (3,) > 0: a, b, tau per pair.
  and, with `reconstruct`:
    reconstructed: (B, 3, T, D) each modality rebuilt from the other present ones
      (flow-decoded mean latent + RCAB); meaningful where the modality is missing.
    reconstructed_mask: (B, 3, T) frames that some other present modality covers.
    flow_latent: (B, 3, T, D), flow_logdet: (B, 3): F_n of the given features (input
      gradient stopped: the likelihood trains the flows, not the features, which could
      otherwise shrink to raise their density without bound).
    prior_mean, prior_log_std: (K, D) the class-conditional latent prior.
  """

  output_shape: tuple[int, ...]
  num_prior_classes: int = 1
  width: int = 64
  common_length: int = 20
  kernel_sizes: tuple[int, int, int] = (3, 1, 1)
  umc_dim: int = 64
  umc_heads: int = 4
  umc_mlp_dim: int = 128
  umc_attention: bool = True
  flow_input: str = "aligned"
  reconstruct: bool = True
  rec_through_flow: bool = False
  flow_layers: int = 4
  flow_hidden: int = 128
  flow_scale: float = 2.0
  flow_remat: bool = False
  rcab_blocks: int = 2
  rcab_features: int = 64
  rcab_kernel: int = 3
  rcab_reduction: int = 16
  fusion_layers: int = 1
  fusion_heads: int = 4
  fusion_mlp_dim: int = 128
  dropout: float = 0.1
  head_hidden: int = 64
  udcl_init_scale: float = 1.0
  udcl_init_temperature: float = 1.0

  def _project(self, batch):
    projected, frame_mask = [], []
    for index, name in enumerate(MODALITIES):
      x = ModalityProjection(self.width, self.kernel_sizes[index], name=f"proj_{name}")(
          batch[name], batch[f"{name}_mask"])
      x, mask = align_length(x, batch[f"{name}_mask"], self.common_length)
      projected.append(x)
      frame_mask.append(mask)
    return jnp.stack(projected, axis=1), jnp.stack(frame_mask, axis=1)  # (B, 3, T, D/-)

  def _align(self, projected, frame_mask, *, train):
    """UMC per modality: (means (3, B, E), stds (3, B, E), aligned (B, 3, T, D))."""
    means, stds, aligned = [], [], []
    for index, name in enumerate(MODALITIES):
      mean, std, sequence = UncertaintyModule(
          self.umc_dim, self.umc_heads, self.umc_mlp_dim, self.dropout,
          attention=self.umc_attention, name=f"umc_{name}")(
              projected[:, index], frame_mask[:, index], train=train)
      means.append(mean)
      stds.append(std)
      aligned.append(sequence)
    return jnp.stack(means), jnp.stack(stds), jnp.stack(aligned, axis=1)

  def _reconstruct(self, features, frame_mask, available):
    """Flows, Eq. 7-8 and RCAB for every modality from the other available ones."""
    flows = [NormalizingFlow(self.width, self.flow_layers, self.flow_hidden, self.flow_scale,
                             remat=self.flow_remat, name=f"flow_{name}")
             for name in MODALITIES]
    latents, logdets, source_latents = [], [], []
    for index, flow in enumerate(flows):
      z, logdet = flow.forward(jax.lax.stop_gradient(features[:, index]), frame_mask[:, index])
      latents.append(z)
      logdets.append(logdet)
      if self.rec_through_flow:
        # Only present modalities' real frames are transformed; the rest is selected away.
        z, _ = flow.forward(features[:, index], available[:, index])
      source_latents.append(z)
    source_latents = jnp.stack(source_latents, axis=1)  # (B, 3, T, D)

    reconstructed, reconstructed_mask = [], []
    for index, name in enumerate(MODALITIES):
      others = jnp.arange(len(MODALITIES)) != index
      # Eq. 7 per frame: mean of the other present modalities' latents.
      use = available & others[None, :, None]  # (B, 3, T)
      count = jnp.sum(use, axis=1)  # (B, T)
      summed = jnp.sum(jnp.where(use[..., None], source_latents, 0.0), axis=1)
      latent = summed / jnp.maximum(count, 1)[..., None].astype(summed.dtype)
      covered = count > 0
      decoded = flows[index].inverse(latent, covered)  # Eq. 8
      if not self.rec_through_flow:
        decoded = jax.lax.stop_gradient(decoded)
      refined = RCABStack(self.rcab_blocks, self.rcab_features, self.rcab_kernel,
                          self.rcab_reduction, name=f"rcab_{name}")(decoded, covered)
      reconstructed.append(jnp.where(covered[..., None], refined, 0.0))
      reconstructed_mask.append(covered)
    prior_mean, prior_log_std = ClassGaussianPrior(self.num_prior_classes, self.width,
                                                   name="prior")()
    return {
        "reconstructed": jnp.stack(reconstructed, axis=1),
        "reconstructed_mask": jnp.stack(reconstructed_mask, axis=1),
        "flow_latent": jnp.stack(latents, axis=1),
        "flow_logdet": jnp.stack(logdets, axis=1),
        "prior_mean": prior_mean,
        "prior_log_std": prior_log_std,
    }

  def _fuse(self, completed, completed_mask, *, train):
    """Eq. 10-13: text queries vision and audio -> (embedding (B, 2D), output)."""
    text, audio, vision = (completed[:, i] for i in range(3))
    text_mask, audio_mask, vision_mask = (completed_mask[:, i] for i in range(3))
    h_tv = CrossAttentionLayer(self.fusion_heads, self.fusion_mlp_dim, self.dropout,
                               name="cross_tv")(text, vision, query_mask=text_mask,
                                                key_mask=vision_mask, train=train)
    h_ta = CrossAttentionLayer(self.fusion_heads, self.fusion_mlp_dim, self.dropout,
                               name="cross_ta")(text, audio, query_mask=text_mask,
                                                key_mask=audio_mask, train=train)
    fused = jnp.concatenate([h_tv, h_ta], axis=-1)
    fused = TransformerEncoder(self.fusion_layers, self.fusion_heads, self.fusion_mlp_dim,
                               self.dropout, name="fusion")(fused, text_mask, train=train)
    embedding = masked_mean(fused, text_mask)
    output = OutputHead(self.output_shape, self.head_hidden, self.dropout, name="head")(
        embedding, train=train)
    return embedding, output

  def _udcl_parameters(self):
    raw_scale = self.param("udcl_scale", nn.initializers.constant(
        _inverse_softplus(self.udcl_init_scale)), (NUM_PAIRS,))
    shift = self.param("udcl_shift", nn.initializers.zeros, (NUM_PAIRS,))
    log_temperature = self.param("udcl_log_temperature", nn.initializers.constant(
        math.log(self.udcl_init_temperature - _MIN_TEMPERATURE)), (NUM_PAIRS,))
    return {"udcl_scale": -nn.softplus(raw_scale), "udcl_shift": shift,
            "udcl_temperature": _MIN_TEMPERATURE + jnp.exp(log_temperature)}

  @nn.compact
  def __call__(self, batch, *, train: bool):
    batch_size = batch[MODALITIES[0]].shape[0]
    present = batch.get("modality_mask")
    if present is None:
      present = jnp.ones((batch_size, len(MODALITIES)), bool)

    projected, frame_mask = self._project(batch)
    means, stds, aligned = self._align(projected, frame_mask, train=train)
    features = {"aligned": aligned, "projected": projected}[self.flow_input]
    # Frames that may be read on the prediction path: real frames of present modalities.
    available = frame_mask & present[:, :, None]
    is_present = present[:, :, None]

    out = {}
    if self.reconstruct:
      out = self._reconstruct(features, frame_mask, available)
      completed_mask = jnp.where(is_present, frame_mask, out["reconstructed_mask"])
      # Both branches are already 0 on the frames they do not cover.
      completed = jnp.where(is_present[..., None], features, out["reconstructed"])
    else:
      # Baseline: an absent modality is a sequence of zero frames, as a full-input model
      # sees a zero-filled modality.
      completed_mask = jnp.where(is_present, frame_mask, True)
      completed = jnp.where(is_present[..., None], features, 0.0)
    modality_embedding = jnp.stack(
        [masked_mean(completed[:, i], completed_mask[:, i]) for i in range(len(MODALITIES))])
    embedding, output = self._fuse(completed, completed_mask, train=train)
    return dict(
        out, output=output, embedding=embedding, features=features, frame_mask=frame_mask,
        completed=completed, completed_mask=completed_mask,
        modality_embedding=modality_embedding, gaussian_mean=means, gaussian_std=stds,
        **self._udcl_parameters())


def reconstruction_error(out, rec_slots, norm: str = "mean"):
  """L_rec between reconstructed and real features, over the scored slots.

  Args:
    out: the model's output dict (`reconstructed`, `features`, `frame_mask`,
      `reconstructed_mask`).
    rec_slots: (B, 3) bool, the (sample, modality) slots whose reconstruction is scored:
      modalities that the training protocol removed and whose real features are known.
    norm: "mean": per slot the mean over real target frames and channels (DiCMoR's MSE);
      "frobenius": per slot the sum over them, Eq. 9's ||X_hat - X||_F^2.

  Returns:
    Scalar: the per-slot value averaged over the slots (0 when there is none).
  """
  if norm not in REC_NORMS:
    raise ValueError(f"config.loss.rec_norm={norm!r}: choose one of {REC_NORMS}")
  frames = out["frame_mask"] & out["reconstructed_mask"]  # (B, 3, T)
  squared = jnp.sum(jnp.square(out["reconstructed"] - out["features"]), axis=-1)
  per_slot = jnp.sum(jnp.where(frames, squared, 0.0), axis=-1)
  if norm == "mean":
    width = out["features"].shape[-1]
    per_slot = per_slot / (jnp.maximum(jnp.sum(frames, axis=-1), 1) * width)
  return jnp.sum(jnp.where(rec_slots, per_slot, 0.0)) / jnp.maximum(jnp.sum(rec_slots), 1)


def flow_likelihood(out, categories):
  """L_flow: NLL per dimension of every modality's features under its flow and the class
  prior of the sample (DiCMoR), averaged over the (sample, modality) slots with a real
  frame."""
  mean = out["prior_mean"][categories][:, None, None, :]  # (B, 1, 1, D): all modalities
  log_std = out["prior_log_std"][categories][:, None, None, :]
  nll = flow_nll(out["flow_latent"], out["flow_logdet"], out["frame_mask"], mean=mean,
                 log_std=log_std, per_dim=True)  # (B, 3)
  has_frames = out["frame_mask"].any(axis=-1)
  return jnp.sum(jnp.where(has_frames, nll, 0.0)) / jnp.maximum(jnp.sum(has_frames), 1)


def alignment_loss(out, kind: str = "distribution"):
  """L_udcl over the UMC Gaussians in `out`; "point" compares the means only (the
  "w/ Point" ablation of Table 3: D = ||mu_n - mu_m||^2)."""
  if kind not in UDCL_KINDS:
    raise ValueError(f"config.loss.udcl_kind must be one of {UDCL_KINDS}, got {kind!r}")
  means = list(out["gaussian_mean"])
  stds = list(out["gaussian_std"])
  if kind == "point":
    stds = [jnp.zeros_like(s) for s in stds]
  return udcl_loss(means, stds, scale=out["udcl_scale"], shift=out["udcl_shift"],
                   temperature=out["udcl_temperature"])


def refinement_loss(out, labels, task: str, *, temperature: float):
  """L_spcl: `cross_modal_supervised_contrastive` over the pooled modality
  representations (3, B, D), positives = other modalities of other samples with the same
  emotion category (Sec. 3.3.1)."""
  return cross_modal_supervised_contrastive(out["modality_embedding"],
                                            contrastive_categories(labels, task),
                                            temperature=temperature)


def training_inputs(key, batch, missing_config):
  """The training protocol's batch, except that removed modalities keep their real
  features and frame masks (flagged absent in `modality_mask`): the model never reads
  them for its prediction but projects them as reconstruction targets.

  Returns:
    (model batch, rec_slots (B, 3) bool: removed by the protocol and really present).
  """
  masked, _ = missing.apply_training_protocol(key, batch, missing_config)
  present = masked["modality_mask"]
  originally_present = batch.get("modality_mask")
  if originally_present is None:
    originally_present = jnp.ones_like(present)
  inputs = dict(masked)
  for index, name in enumerate(MODALITIES):
    keep = present[:, index]
    inputs[name] = jnp.where(keep[:, None, None], masked[name], batch[name])
    inputs[f"{name}_mask"] = jnp.where(keep[:, None], masked[f"{name}_mask"],
                                       batch[f"{name}_mask"])
  return inputs, ~present & originally_present


def build_model(config, spec: DataSpec) -> CMARR:
  m = config.model
  if m.flow_input not in FLOW_INPUTS:
    raise ValueError(f"config.model.flow_input={m.flow_input!r}: choose one of {FLOW_INPUTS}")
  if m.udcl_init_temperature and m.udcl_init_temperature <= _MIN_TEMPERATURE:
    raise ValueError(f"config.model.udcl_init_temperature={m.udcl_init_temperature}: must be "
                     f"> {_MIN_TEMPERATURE} (the temperature's floor), or 0 for umc_dim")
  return CMARR(
      output_shape=spec.output_shape,
      num_prior_classes=num_prior_classes(spec),
      width=m.width,
      common_length=m.common_length or max(spec.lengths),
      kernel_sizes=tuple(m.kernel_sizes),
      umc_dim=m.umc_dim,
      umc_heads=m.umc_heads,
      umc_mlp_dim=m.umc_mlp_dim,
      umc_attention=m.umc_attention,
      flow_input=m.flow_input,
      reconstruct=m.reconstruct,
      rec_through_flow=config.loss.rec_through_flow,
      flow_layers=m.flow_layers,
      flow_hidden=m.flow_hidden,
      flow_scale=m.flow_scale,
      flow_remat=m.flow_remat,
      rcab_blocks=m.rcab_blocks,
      rcab_features=m.rcab_features,
      rcab_kernel=m.rcab_kernel,
      rcab_reduction=m.rcab_reduction,
      fusion_layers=m.fusion_layers,
      fusion_heads=m.fusion_heads,
      fusion_mlp_dim=m.fusion_mlp_dim,
      dropout=m.dropout,
      head_hidden=m.head_hidden,
      udcl_init_scale=m.udcl_init_scale,
      # D_2W grows with the Gaussians' width; starting tau there keeps the first logits O(1).
      udcl_init_temperature=m.udcl_init_temperature or float(m.umc_dim),
  )


def make_loss_fn(model: CMARR, config, spec: DataSpec):
  """`(params, method_state, batch, key, context) -> (loss, (metrics, method_state))`."""
  loss_config = config.loss
  missing_config = config.missing
  task = spec.task
  udcl_kind = loss_config.udcl_kind
  rec_norm = loss_config.rec_norm
  if rec_norm not in REC_NORMS:
    raise ValueError(f"config.loss.rec_norm={rec_norm!r}: choose one of {REC_NORMS}")
  stop_target = loss_config.rec_stop_gradient

  def loss_fn(params, method_state, batch, key, context):
    del context
    missing_key, dropout_key = jax.random.split(key)
    inputs, rec_slots = training_inputs(missing_key, batch, missing_config)
    out = model.apply({"params": params}, inputs, train=True, rngs={"dropout": dropout_key})
    if stop_target:
      out = dict(out, features=jax.lax.stop_gradient(out["features"]))
    labels = batch["label"]
    zero = jnp.zeros((), jnp.float32)
    terms = {
        "loss_cls": task_loss(out["output"], labels, task,
                              regression_loss=loss_config.regression_loss).mean(),
        "loss_udcl": alignment_loss(out, udcl_kind),
        "loss_spcl": refinement_loss(out, labels, task,
                                     temperature=loss_config.spcl_temperature),
        "loss_rec": (reconstruction_error(out, rec_slots, rec_norm) if model.reconstruct
                     else zero),
        "loss_flow": (flow_likelihood(out, prior_categories(labels, spec)) if model.reconstruct
                      else zero),
    }
    total = (terms["loss_cls"] + loss_config.udcl_weight * terms["loss_udcl"]
             + loss_config.spcl_weight * terms["loss_spcl"]
             + loss_config.rec_weight * terms["loss_rec"]
             + loss_config.flow_weight * terms["loss_flow"])
    metrics = dict(terms, udcl_temperature=out["udcl_temperature"].mean(),
                   udcl_scale=out["udcl_scale"].mean())
    return total, (metrics, method_state)

  return loss_fn


def build(config, spec: DataSpec) -> list[Stage]:
  """CM-ARR trains in one stage, end to end, under the training protocol of
  `config.missing` (Table 3's Baseline: full inputs, `missing.kind="none"`)."""
  model = build_model(config, spec)
  return [Stage(name="", model=model, loss_fn=make_loss_fn(model, config, spec),
                num_epochs=config.train.num_epochs,
                trained_with_missing=config.missing.kind != "none")]


# ----------------------------------------------------------------------------- analysis


def reconstruction_features(model: CMARR, params, split, *, batch_size: int = 256):
  """Pooled real and reconstructed features of each modality when it alone is missing.

  For modality m the split is run with m flagged absent and the two others present; the
  model never reads m (see the module docstring) but still projects it, so the same
  forward gives its real features X_m (the target) and the reconstruction.

  Args:
    model: a `CMARR`.
    params: its parameters.
    split: a split in the in-memory layout (numpy arrays).
    batch_size: rows per compiled forward.

  Returns:
    {modality name: (real (N, D), reconstructed (N, D))}, masked means over time.
  """
  arrays = {k: np.asarray(v) for k, v in split.items() if k != "id"}
  num_rows = len(arrays["label"])

  @jax.jit
  def pooled(batch, modality_mask):
    out = model.apply({"params": params}, dict(batch, modality_mask=modality_mask), train=False)
    index = jnp.argmin(modality_mask[0])
    real = masked_mean(out["features"][:, index], out["frame_mask"][:, index])
    rebuilt = masked_mean(out["reconstructed"][:, index],
                          out["frame_mask"][:, index] & out["reconstructed_mask"][:, index])
    return real, rebuilt

  features = {}
  for index, name in enumerate(MODALITIES):
    real, rebuilt = [], []
    for start in range(0, num_rows, batch_size):
      rows = np.arange(start, start + batch_size) % num_rows  # the last batch wraps around
      batch = {k: v[rows] for k, v in arrays.items()}
      modality_mask = np.ones((batch_size, len(MODALITIES)), bool)
      modality_mask[:, index] = False
      r, b = jax.device_get(pooled(batch, modality_mask))
      real.append(r)
      rebuilt.append(b)
    features[name] = (np.concatenate(real)[:num_rows], np.concatenate(rebuilt)[:num_rows])
  return features


def write_reconstruction_report(workdir: str, *, checkpoint: str = "best",
                                split_name: str | None = None, max_points: int = 500,
                                seed: int = 0) -> dict:
  """Real vs reconstructed features of a trained CM-ARR run (cm_arr.txt Fig. 5).

  Writes `DIR/eval/reconstruction.json` (per modality: MSE and mean cosine similarity of
  the pooled reconstruction to the pooled real features X_m, when that modality alone is
  missing) and `DIR/eval/reconstruction_tsne.png` (one panel per modality: a joint t-SNE
  of real, dark, and reconstructed, light, features of up to `max_points` samples).

  Returns:
    The content of reconstruction.json.
  """
  import json
  import os

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from sklearn.manifold import TSNE
  from threadpoolctl import threadpool_limits

  from mer_jax.data import pipeline
  from mer_jax.evaluate import load_run_config
  from mer_jax.trainer import load_stage_params

  config = load_run_config(workdir)
  if config.method != "cmarr":
    raise ValueError(f"{workdir} holds a {config.method!r} run, not a CM-ARR one")
  splits, spec = pipeline.load_data(config.data)
  split = splits[split_name or config.eval.split]
  (stage,) = build(config, spec)
  if not stage.model.reconstruct:
    raise ValueError(f"{workdir} holds a run with config.model.reconstruct=False (Table 3's "
                     "Baseline): it reconstructs nothing to report")
  example = {k: v[:2] for k, v in pipeline.device_arrays(split).items()}
  params, _, _ = load_stage_params(workdir, stage, example, checkpoint=checkpoint)
  features = reconstruction_features(stage.model, params, split,
                                     batch_size=config.eval.batch_size)

  report = {}
  for name, (real, rebuilt) in features.items():
    cosine = np.sum(real * rebuilt, -1) / np.maximum(
        np.linalg.norm(real, axis=-1) * np.linalg.norm(rebuilt, axis=-1), 1e-12)
    report[name] = {"mse": float(np.mean(np.square(real - rebuilt))),
                    "cosine": float(np.mean(cosine)),
                    "real_variance": float(np.mean(np.var(real, axis=0)))}
  eval_dir = os.path.join(workdir, "eval")
  os.makedirs(eval_dir, exist_ok=True)
  with open(os.path.join(eval_dir, "reconstruction.json"), "w") as f:
    json.dump(report, f, indent=2)

  colours = {"text": ("darkred", "lightcoral"), "audio": ("darkblue", "lightskyblue"),
             "vision": ("darkgreen", "lightgreen")}
  rng = np.random.default_rng(seed)
  fig, axes = plt.subplots(1, len(MODALITIES), figsize=(4.2 * len(MODALITIES), 4))
  for ax, (name, (real, rebuilt)) in zip(axes, features.items(), strict=True):
    keep = rng.permutation(len(real))[:max_points]
    points = np.concatenate([real[keep], rebuilt[keep]])
    perplexity = float(min(30, max(2, (len(points) - 1) // 3)))
    # One OpenMP thread: on a shared CPU, sklearn's threaded Barnes-Hut gradient spins and
    # ran 40x slower (15 s instead of 0.3 s for 32 points).
    with threadpool_limits(1):
      embedded = TSNE(2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(
          points)
    dark, light = colours[name]
    ax.scatter(*embedded[len(keep):].T, s=6, c=light, label=f"reconstructed {name}")
    ax.scatter(*embedded[:len(keep)].T, s=6, c=dark, label=f"real {name}")
    ax.set_title(f"{name}: MSE {report[name]['mse']:.3f}, cos {report[name]['cosine']:.2f}")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(eval_dir, "reconstruction_tsne.png"), dpi=110)
  plt.close(fig)
  return report


def configure(config, variant: str):
  """CM-ARR's hyper-parameters (cm_arr.txt Sec. 4.2) and variant sizes, shared by every
  `configs/cmarr_<dataset>.py`; the config files set only the data fields."""
  config.method = "cmarr"
  # Model. The paper gives no widths; these are the usual sizes for these features.
  config.model.width = 128  # common width D of the Conv1D projections, flows and fusion
  # Every modality is brought to this many frames (masked adaptive average pooling), the
  # length the data are capped at on loading (config.data.max_lengths); 0 = the longest.
  config.model.common_length = 50
  config.model.kernel_sizes = (3, 1, 1)  # Conv1D per modality (L, A, V), SPEC section 7
  config.model.umc_dim = 128  # width of the UMC Gaussians
  config.model.umc_heads = 8
  config.model.umc_mlp_dim = 256
  config.model.umc_attention = True  # False = Table 3's "w/o attention" (UMC: MLP only)
  # X_n, what the flows transform, L_rec rebuilds and the fusion reads: the UMC's
  # "aligned" sequences (Sec. 3.2 / abstract) or the raw Conv1D "projected" ones.
  config.model.flow_input = "aligned"
  # False = Table 3's Baseline network (no flows or RCAB: an absent modality is zeros);
  # train it on full inputs (missing.kind="none", docs/methods.md).
  config.model.reconstruct = True
  config.model.flow_layers = 4  # affine couplings per modality (under nn.scan)
  config.model.flow_hidden = 256
  config.model.flow_scale = 2.0  # per-layer bound on the coupling log-scale
  config.model.flow_remat = False  # recompute coupling activations in the backward pass
  config.model.rcab_blocks = 3
  config.model.rcab_features = 128
  config.model.rcab_kernel = 3
  config.model.rcab_reduction = 16
  config.model.fusion_layers = 1  # Eq. 13: one self-attention block
  config.model.fusion_heads = 8
  config.model.fusion_mlp_dim = 256
  config.model.dropout = 0.1
  config.model.head_hidden = 128
  # L_udcl similarity S = a * D_2W + b, logits S / tau (Eq. 3-5): initial |a| and tau.
  # D_2W sums over the umc_dim dimensions, so tau starts at umc_dim (0 = that): the first
  # logits are minus the mean squared difference per dimension, near chance, instead of
  # a loss in the hundreds that would swamp every other term.
  config.model.udcl_init_scale = 1.0
  config.model.udcl_init_temperature = 0.0

  # Losses (Eq. 14): L = alpha L_udcl + beta L_spcl + lambda L_rec + L_cls
  # + lambda_flow L_flow; alpha = 1, beta = 0.1, lambda = 10 (Sec. 4.2).
  config.loss.udcl_weight = 1.0  # alpha; 0 = the "w/o L_udcl" ablation
  config.loss.spcl_weight = 0.1  # beta; 0 = the "w/o L_spcl" ablation
  config.loss.rec_weight = 10.0  # lambda
  # L_rec per slot: "mean" squared error over frames and channels (DiCMoR's MSE, the
  # scale lambda = 10 fits) or Eq. 9's squared "frobenius" norm (their sum).
  config.loss.rec_norm = "mean"
  # False: flow-decoded features enter RCAB stop-gradient (DiCMoR), so L_rec trains the
  # refinement; True: L_rec also reaches the flows and the features through them.
  config.loss.rec_through_flow = False
  config.loss.flow_weight = 0.1  # lambda_flow: flow NLL per dimension, class prior (DiCMoR)
  config.loss.udcl_kind = "distribution"  # "point" = the "w/ Point" ablation
  config.loss.spcl_temperature = 0.1  # SupCon temperature (Khosla et al.)
  config.loss.rec_stop_gradient = True  # reconstruction targets do not move the features
  config.loss.regression_loss = "l1"  # only used if data.task = "regression"

  # Optimiser (Sec. 4.2): learning rate 1e-5, batch size 16, 100 epochs.
  config.train.optimizer = "adam"
  config.train.learning_rate = 1e-5
  config.train.weight_decay = 0.0
  config.train.batch_size = 16
  config.train.num_epochs = 100
  config.train.schedule = "constant"

  # Training protocol: every sample sees one of the 6 incomplete combinations,
  # uniformly (the MMIN protocol CM-ARR is compared under); full inputs are not drawn.
  config.missing.kind = "drop"
  config.missing.probs = (1 / 6,) * 6 + (0.0,)

  if variant == "synthetic":
    config.data.source = "synthetic"
    config.model.common_length = 0  # the presets' own lengths (IEMOCAP 20, MSP-IMPROV 50)
    config.model.width = 32
    config.model.umc_dim = 32
    config.model.umc_heads = 4
    config.model.umc_mlp_dim = 64
    config.model.flow_layers = 2
    config.model.flow_hidden = 64
    config.model.rcab_blocks = 1
    config.model.rcab_features = 32
    config.model.rcab_reduction = 4
    config.model.fusion_heads = 4
    config.model.fusion_mlp_dim = 64
    config.model.head_hidden = 32
    config.train.optimizer = "adamw"
    config.train.weight_decay = 1e-4
    config.train.learning_rate = 1e-3
    config.train.batch_size = 32
    config.train.num_epochs = 10
    config.train.schedule = "cosine"
    # The paper reports only the 7 fixed combinations; MR curves stay as a cheap extra.
    config.eval.frame_rates = ()
  config_lib.apply_variant(config, variant)
  if variant == "tiny":
    config.model.common_length = 0
    config.model.width = 16
    config.model.umc_dim = 8
    config.model.umc_heads = 2
    config.model.umc_mlp_dim = 16
    config.model.flow_layers = 2
    config.model.flow_hidden = 16
    config.model.rcab_blocks = 1
    config.model.rcab_features = 16
    config.model.rcab_reduction = 4
    config.model.fusion_heads = 2
    config.model.fusion_mlp_dim = 32
    config.model.head_hidden = 16
    config.train.learning_rate = 1e-3
    config.data.num_folds = 2
