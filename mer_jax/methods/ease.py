"""EASE: uncertainty-calibrated elastic alignment (ease.txt), one training stage.

Network. Per modality a Conv1D projection and a transformer encoder; the masked mean over
the real frames is the modality feature z_m (B, D). A modality counts as present when its
`modality_mask` entry is set and it has at least one real frame.

UCMI (Sec. 3.2). Each present modality A is projected into a common space; for a target B
the context is the mean of the projected features of the *other* present modalities, and
B's Gaussian head gives mu_B and var_B = softplus(.) + 1e-6 (Eq. 1-3). A missing modality
is completed by mu_B; a present one keeps its real z_B. Heads are evaluated for every
target (present or not), so a complete input also yields the cross-modal predictions that
the calibration check reads.

Fusion. The three completed features, each plus a learned modality embedding, go through
a small transformer over the three tokens; the concatenated tokens are the embedding and
feed the output head.

Training (one batched forward of three views of the batch, concatenated along the batch):
  full  : the clean batch, every modality and frame present ("complete samples");
  view 1, view 2 : LNLN frame-level masking (`config.missing.kind = "frame_lnln"`, drawn
          independently per view), then a modality subset per sample drawn from
          `config.missing.probs` over the 7 combinations (independently per view).
          LNLN masking drops frames, never whole modalities, so without the subsets
          nothing is ever completed and UCMI, L_uada's completions and L_anchor do not
          train; `config.missing.partial_view_subsets = False` is that LNLN-only
          protocol, for comparison.
Losses (Eq. 13):
  L = L_task + l1 L_ucmi + l2 (w_uada L_uada + b1 L_anchor) + l3 (w_cons L_cons + w_asym L_asym)
  L_task   : task loss averaged over the three views.
  L_ucmi   : Gaussian NLL (Eq. 4) of the stop-gradient full-view z_B under (mu_B, var_B),
             averaged over the (partial-view row, modality) pairs that were completed.
  L_uada   : kernel CS divergence (Eq. 5-7) between the full-view features z_m (u = 0,
             stop-gradient: the target distribution) and the partial views' completed
             features (u = mean of var where completed, 0 where real), averaged over the
             three modalities; tau = uada_tau_scale * sqrt(D).
  L_anchor : closed-form CS divergence (Eq. 24) of each completed N(mu_B, var_B) to its
             class anchor; anchors are per (modality, class) diagonal Gaussians of the
             full-view features, updated by EMA with stop-gradient in `method_state`
             before the loss reads them; classes are rounded labels (7 for sentiment).
  L_cons, L_asym : MIPC (Eq. 10-11) between the two partial views and from each partial
             view to the stop-gradient full view; unit-variance Gaussians for regression.
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
from mer_jax.losses.divergences import (
    NUM_SENTIMENT_CLASSES,
    anchor_loss,
    class_anchor_update,
    cs_divergence_kernel,
    prediction_kl,
    regression_anchor_class,
)
from mer_jax.losses.task import task_loss
from mer_jax.losses.uncertainty import gaussian_nll
from mer_jax.methods.base import Stage
from mer_jax.nn.attention import ModalityProjection, TransformerEncoder
from mer_jax.nn.gaussian import GaussianHead, init_class_anchors
from mer_jax.nn.heads import OutputHead
from mer_jax.nn.pooling import masked_mean

NUM_MODALITIES = len(MODALITIES)
NUM_VIEWS = 3  # full, partial view 1, partial view 2 (in this order along the batch)
# A class updates its anchor from a batch only with at least this many present samples.
MIN_ANCHOR_SAMPLES = 2


def present_frames(batch, modality_index: int):
  """(B, T) real frames of one modality, with an absent modality's frames all False."""
  mask = jnp.asarray(batch[f"{MODALITIES[modality_index]}_mask"], bool)
  if "modality_mask" in batch:
    mask = mask & jnp.asarray(batch["modality_mask"], bool)[:, modality_index:modality_index + 1]
  return mask


class EASE(nn.Module):
  """The EASE network.

  `__call__(batch, train=...)` takes the batch layout of SPEC section 4 (optional
  `modality_mask`, all present when absent) and returns a dict:
    output: task prediction, (B,) / (B, K) / (B, K, 2).
    embedding: (B, 3 D) fused representation.
    features: (B, 3, D) encoder features z_m (0 for a missing modality).
    present: (B, 3) bool, modality present (mask set and at least one real frame).
    ucmi_mean, ucmi_var: (B, 3, D) completion Gaussian of each modality predicted from
      the other present ones (Eq. 1-2); var > 0.
    completed: (B, 3, D) z_m where present, ucmi_mean where missing (z_m with `use_ucmi`
      False).
    uncertainty: (B, 3) mean of ucmi_var where completed, 0 where real (u of Eq. 6).
  """

  output_shape: tuple[int, ...]
  width: int = 64
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 128
  dropout: float = 0.1
  kernel_sizes: tuple[int, int, int] = (3, 1, 1)
  ucmi_hidden: int = 64
  fusion_layers: int = 1
  head_hidden: int = 64
  use_ucmi: bool = True

  @nn.compact
  def __call__(self, batch, *, train: bool):
    features, present = [], []
    for index, name in enumerate(MODALITIES):
      frames = present_frames(batch, index)
      x = ModalityProjection(self.width, self.kernel_sizes[index], name=f"proj_{name}")(
          batch[name], frames)
      h = TransformerEncoder(self.num_layers, self.num_heads, self.mlp_dim, self.dropout,
                             name=f"encoder_{name}")(x, frames, train=train)
      features.append(masked_mean(h, frames))
      present.append(jnp.any(frames, axis=1))
    features = jnp.stack(features, axis=1)  # (B, 3, D)
    present = jnp.stack(present, axis=1)  # (B, 3)

    if self.use_ucmi:
      # Every source lands in one common space, so any subset of them can be averaged.
      projected = jnp.stack([
          nn.Dense(self.width, name=f"context_{name}")(features[:, index])
          for index, name in enumerate(MODALITIES)], axis=1)
      means, variances = [], []
      for target, name in enumerate(MODALITIES):
        # The target never informs its own prediction: its completion must work when it
        # is missing, and the calibration check compares the prediction with it.
        sources = present & (jnp.arange(NUM_MODALITIES) != target)[None, :]
        context = jnp.sum(jnp.where(sources[..., None], projected, 0.0), axis=1)
        context = context / jnp.maximum(jnp.sum(sources, axis=1, keepdims=True), 1)
        mean, var = GaussianHead(self.width, self.ucmi_hidden, name=f"ucmi_{name}")(context)
        means.append(mean)
        variances.append(var)
      ucmi_mean = jnp.stack(means, axis=1)
      ucmi_var = jnp.stack(variances, axis=1)
      completed = jnp.where(present[..., None], features, ucmi_mean)
      uncertainty = jnp.where(present, 0.0, ucmi_var.mean(axis=-1))
    else:
      ucmi_mean = jnp.zeros_like(features)
      ucmi_var = jnp.ones_like(features)
      completed = features
      uncertainty = jnp.zeros(present.shape, features.dtype)

    modality_embedding = self.param("modality_embedding", nn.initializers.normal(0.02),
                                    (NUM_MODALITIES, self.width))
    tokens = completed + modality_embedding[None]
    if self.fusion_layers:
      tokens = TransformerEncoder(self.fusion_layers, self.num_heads, self.mlp_dim,
                                  self.dropout, name="fusion")(tokens, train=train)
    embedding = tokens.reshape(tokens.shape[0], -1)
    output = OutputHead(self.output_shape, self.head_hidden, self.dropout, name="head")(
        embedding, train=train)
    return {"output": output, "embedding": embedding, "features": features,
            "present": present, "ucmi_mean": ucmi_mean, "ucmi_var": ucmi_var,
            "completed": completed, "uncertainty": uncertainty}


# ----------------------------------------------------------------------------- training views


def training_views(key, batch, missing_config):
  """The full view and two partial views of a clean batch, concatenated along the batch.

  Rows [0, B) are the clean batch with every modality present; rows [B, 2B) and [2B, 3B)
  are partial views, each with its own LNLN frame masking (the `config.missing` protocol,
  "frame_lnln") and, with `missing_config.partial_view_subsets`, its own per-sample
  modality subset drawn from `missing_config.probs` (7 weights over L, A, V, LA, LV, AV,
  LAV).

  Args:
    key: jax.random key.
    batch: dict of (B, ...) arrays in the batch layout.
    missing_config: `config.missing` (kind, probs, partial_view_subsets, fill, ...).

  Returns:
    dict of (3B, ...) arrays with `modality_mask` (3B, 3) set.
  """
  batch_size = batch[MODALITIES[0]].shape[0]
  full = missing.apply_modality_mask(
      batch, missing.fixed_modality_mask(batch_size, missing.FULL_COMBINATION))
  if "text_ids" in batch:  # frame masking records dropped tokens; the full view drops none
    full[missing.DROPPED_TEXT] = jnp.zeros(jnp.shape(batch["text_ids"]), bool)
  views = [full]
  for view_key in jax.random.split(key, NUM_VIEWS - 1):
    frame_key, subset_key = jax.random.split(view_key)
    view, _ = missing.apply_training_protocol(frame_key, batch, missing_config)
    if missing_config.partial_view_subsets:
      subset, _ = missing.training_drop_mask(subset_key, batch_size, missing_config.probs)
      view = missing.apply_modality_mask(view, subset)
    views.append(view)
  return jax.tree.map(lambda *parts: jnp.concatenate(parts, axis=0), *views)


def anchor_classes(labels, spec: DataSpec):
  """Anchor class per sample: rounded sentiment (7 classes), the class, or for
  multilabel-binary the first present emotion."""
  if spec.task == "regression":
    low, high = spec.label_range or (-3.0, 3.0)
    return regression_anchor_class(labels, max(abs(low), abs(high)))
  if spec.task == "classification":
    return labels.astype(jnp.int32)
  return jnp.argmax(labels, axis=-1).astype(jnp.int32)


def num_anchor_classes(spec: DataSpec) -> int:
  return NUM_SENTIMENT_CLASSES if spec.task == "regression" else spec.num_classes


def init_anchor_state(num_classes: int, width: int):
  """method_state: per-modality class anchors, `mean`/`var` (3, K, D), `count` (3, K)."""
  anchors = init_class_anchors(num_classes, width)
  return jax.tree.map(lambda x: jnp.stack([x] * NUM_MODALITIES), anchors)


def update_anchors(anchors, features, present, classes, *, momentum: float):
  """EMA update of the per-modality anchors from full-view features (stop-gradient).

  Args:
    anchors: dict `mean`/`var` (3, K, D), `count` (3, K).
    features: (B, 3, D) full-view features.
    present: (B, 3) bool; rows where a modality is absent do not update its anchors.
    classes: (B,) int anchor classes; a class with fewer than MIN_ANCHOR_SAMPLES present
      rows in the batch leaves its anchor unchanged.
    momentum: EMA weight of the old value.
  """
  num_classes = anchors["mean"].shape[1]
  new = {"mean": [], "var": [], "count": []}
  for index in range(NUM_MODALITIES):
    labels = jnp.where(present[:, index], classes, -1)  # out-of-range labels are ignored
    # One sample has no spread: its variance would be the 1e-6 floor, and an anchor that
    # narrow would make the CS divergence of every completion to it explode.
    class_size = jax.ops.segment_sum(jnp.ones_like(labels), labels, num_segments=num_classes)
    labels = jnp.where(class_size[jnp.clip(labels, 0, num_classes - 1)] >= MIN_ANCHOR_SAMPLES,
                       labels, -1)
    mean, var, count = class_anchor_update(
        anchors["mean"][index], anchors["var"][index], anchors["count"][index],
        features[:, index], labels, momentum=momentum, num_classes=num_classes)
    new["mean"].append(mean)
    new["var"].append(var)
    new["count"].append(count)
  return {k: jnp.stack(v) for k, v in new.items()}


def build_model(config, spec: DataSpec) -> EASE:
  model_config = config.model
  return EASE(
      output_shape=spec.output_shape,
      width=model_config.width,
      num_layers=model_config.num_layers,
      num_heads=model_config.num_heads,
      mlp_dim=model_config.mlp_dim,
      dropout=model_config.dropout,
      kernel_sizes=tuple(model_config.kernel_sizes),
      ucmi_hidden=model_config.ucmi_hidden,
      fusion_layers=model_config.fusion_layers,
      head_hidden=model_config.head_hidden,
      use_ucmi=model_config.use_ucmi,
  )


def make_loss_fn(model: EASE, config, spec: DataSpec):
  """`(params, method_state, batch, key, context) -> (loss, (metrics, method_state))`."""
  loss_config = config.loss
  missing_config = config.missing
  task = spec.task
  regression_loss = loss_config.regression_loss
  num_classes = num_anchor_classes(spec)
  tau = loss_config.uada_tau_scale * math.sqrt(model.width)
  alpha = loss_config.uada_alpha
  momentum = loss_config.anchor_momentum
  stop_uncertainty = loss_config.uada_stop_uncertainty_grad
  use_ucmi = model.use_ucmi

  def loss_fn(params, method_state, batch, key, context):
    del context
    view_key, dropout_key = jax.random.split(key)
    views = training_views(view_key, batch, missing_config)
    out = model.apply({"params": params}, views, train=True, rngs={"dropout": dropout_key})
    batch_size = batch["label"].shape[0]
    split = lambda x: x.reshape((NUM_VIEWS, batch_size) + x.shape[1:])
    outputs = split(out["output"])
    labels = batch["label"]

    per_view_task = jnp.stack([
        task_loss(outputs[v], labels, task, regression_loss=regression_loss).mean()
        for v in range(NUM_VIEWS)])
    loss_task = per_view_task.mean()

    # MIPC (Eq. 10-11): both orders of the partial pair; each partial view to sg(full).
    full_output = jax.lax.stop_gradient(outputs[0])
    loss_cons = 0.5 * jnp.mean(prediction_kl(outputs[1], outputs[2], task=task)
                               + prediction_kl(outputs[2], outputs[1], task=task))
    loss_asym = 0.5 * jnp.mean(prediction_kl(outputs[1], full_output, task=task)
                               + prediction_kl(outputs[2], full_output, task=task))
    loss_consist = (loss_config.cons_weight * loss_cons + loss_config.asym_weight * loss_asym)

    features = split(out["features"])  # (3, B, 3, D)
    present = split(out["present"])  # (3, B, 3)
    full_features = jax.lax.stop_gradient(features[0])  # z^gt of the complete samples
    full_present = present[0]
    classes = anchor_classes(labels, spec)
    anchors = update_anchors(method_state["anchors"], full_features, full_present, classes,
                             momentum=momentum)
    new_state = dict(method_state, anchors=anchors)

    zero = jnp.zeros((), jnp.float32)
    if use_ucmi:
      # Completed (partial row, modality) pairs whose complete-sample target exists.
      completed_here = ~present[1:] & full_present[None]  # (2, B, 3)
      num_completed = jnp.maximum(jnp.sum(completed_here), 1)
      mean = split(out["ucmi_mean"])[1:]  # (2, B, 3, D)
      var = split(out["ucmi_var"])[1:]
      nll = gaussian_nll(full_features[None], mean, var)  # (2, B, 3)
      loss_ucmi = jnp.sum(jnp.where(completed_here, nll, 0.0)) / num_completed

      completed = split(out["completed"])[1:]  # (2, B, 3, D)
      uncertainty = split(out["uncertainty"])[1:]  # (2, B, 3)
      if stop_uncertainty:
        uncertainty = jax.lax.stop_gradient(uncertainty)
      width = completed.shape[-1]
      loss_uada = jnp.mean(jnp.stack([
          cs_divergence_kernel(
              full_features[:, m], completed[:, :, m].reshape(-1, width),
              jnp.zeros((batch_size,), jnp.float32), uncertainty[:, :, m].reshape(-1),
              tau=tau, alpha=alpha)
          for m in range(NUM_MODALITIES)]))

      # One anchor table of 3K rows: modality m's class k is row m * K + k.
      pair_classes = (classes[None, :, None]
                      + num_classes * jnp.arange(NUM_MODALITIES)[None, None, :])
      pair_classes = jnp.broadcast_to(pair_classes, completed_here.shape)
      loss_anchor = anchor_loss(
          mean.reshape(-1, width), var.reshape(-1, width), pair_classes.reshape(-1),
          anchors["mean"].reshape(-1, width), anchors["var"].reshape(-1, width),
          anchor_count=anchors["count"].reshape(-1), valid=completed_here.reshape(-1))
      mean_uncertainty = (jnp.sum(jnp.where(completed_here, uncertainty, 0.0))
                          / num_completed)
    else:
      loss_ucmi = loss_uada = loss_anchor = mean_uncertainty = zero

    loss_align = loss_config.uada_weight * loss_uada + loss_config.beta_anchor * loss_anchor
    loss = (loss_task + loss_config.lambda_ucmi * loss_ucmi
            + loss_config.lambda_align * loss_align
            + loss_config.lambda_consist * loss_consist)
    metrics = {
        "loss_task": loss_task, "loss_task_full": per_view_task[0],
        "loss_task_partial": per_view_task[1:].mean(), "loss_ucmi": loss_ucmi,
        "loss_uada": loss_uada, "loss_anchor": loss_anchor, "loss_cons": loss_cons,
        "loss_asym": loss_asym, "loss_consist": loss_consist,
        "uncertainty": mean_uncertainty,
    }
    return loss, (metrics, new_state)

  return loss_fn


def build(config, spec: DataSpec) -> list[Stage]:
  model = build_model(config, spec)
  num_classes = num_anchor_classes(spec)
  width = model.width
  return [Stage(name="", model=model, loss_fn=make_loss_fn(model, config, spec),
                init_state=lambda: {"anchors": init_anchor_state(num_classes, width)},
                num_epochs=config.train.num_epochs)]


# ----------------------------------------------------------------------------- calibration


def standardized_residual_stats(residuals) -> dict[str, float]:
  """Calibration of standardized residuals r = (z - mu) / sigma against N(0, 1).

  Returns the fraction of |r| <= 1 and <= 2 (0.6827 and 0.9545 when calibrated) and the
  one-sample Kolmogorov-Smirnov statistic sup_x |F_n(x) - Phi(x)| (ease.txt Sec. 4.5).
  """
  r = np.sort(np.asarray(residuals, np.float64).ravel())
  n = r.size
  cdf = 0.5 * (1.0 + np.vectorize(math.erf)(r / math.sqrt(2.0)))
  upper = np.arange(1, n + 1) / n - cdf
  lower = cdf - np.arange(0, n) / n
  return {"within_1sigma": float(np.mean(np.abs(r) <= 1.0)),
          "within_2sigma": float(np.mean(np.abs(r) <= 2.0)),
          "ks": float(max(upper.max(), lower.max())),
          "count": int(n)}


def calibration_check(model: EASE, params, split, *, batch_size: int = 256,
                      modalities=(1, 2)) -> dict[str, dict[str, float]]:
  """EASE's uncertainty verification (Sec. 4.5, Fig. 4) on complete samples.

  For each modality B, the completion Gaussian predicted from the other modalities is
  compared with the real feature: r = (z_B - mu_B) / sqrt(var_B), pooled over samples and
  dimensions, and summarised by `standardized_residual_stats`. The paper reports audio and
  vision (the default `modalities`).

  Args:
    model: the EASE module of a trained stage.
    params: its params.
    split: a split's arrays (in-memory layout), every modality present.
    batch_size: rows per forward.
    modalities: indices (0 L, 1 A, 2 V) to check.

  Returns:
    {modality name: stats}.
  """
  apply = jax.jit(lambda p, b: model.apply({"params": p}, b, train=False))
  keys = [m for m in MODALITIES] + [f"{m}_mask" for m in MODALITIES]
  num_rows = len(split[MODALITIES[0]])
  residuals = {m: [] for m in modalities}
  for start in range(0, num_rows, batch_size):
    batch = {k: np.asarray(split[k][start:start + batch_size]) for k in keys}
    out = jax.device_get(apply(params, batch))
    for m in modalities:
      keep = out["present"][:, m] & (out["present"].sum(axis=1) > 1)
      r = (out["features"][:, m] - out["ucmi_mean"][:, m]) / np.sqrt(out["ucmi_var"][:, m])
      residuals[m].append(r[keep])
  return {MODALITIES[m]: standardized_residual_stats(np.concatenate(residuals[m]))
          for m in modalities}


# Evaluation (ease.txt Sec. 4.3, A.3): frame-level missing at r = 0, 0.1, ..., 0.9 on every
# modality at once, averaged, and the six fixed incomplete subsets (plus full).
EASE_FRAME_RATES = tuple(round(0.1 * i, 1) for i in range(10))


def configure(config, variant: str):
  """EASE's hyper-parameters (ease.txt A.3) and variant sizes, shared by every
  `configs/ease_<dataset>.py`; the config files set only the data fields."""
  config.method = "ease"
  # Model. The paper's backbone is a transformer per modality (Sec. 3.2) without sizes;
  # width 256 with the usual 4x feed-forward gives, with BERT-base, 115.9M parameters on
  # MOSI against the 116.5M of Table 5 (BERT alone is 108.9M).
  config.model.width = 256
  config.model.num_layers = 2
  config.model.num_heads = 4
  config.model.mlp_dim = 1024
  config.model.dropout = 0.1
  config.model.kernel_sizes = (3, 1, 1)  # Conv1D per modality (L, A, V), SPEC section 7
  config.model.ucmi_hidden = 256  # hidden layer of the UCMI heads F_mu / F_sigma
  config.model.fusion_layers = 1  # transformer layers over the three completed features
  config.model.head_hidden = 64
  config.model.use_ucmi = True  # False: "w/o UCMI" (no completion, no L_ucmi/L_align)
  # Text (A.4, Table 5): BERT-base fine-tuned on the MMSA token ids (its 110M parameters
  # are most of EASE's 116M), masked as LNLN ([UNK] for dropped tokens). The real
  # variant needs --config.model.text_encoder_path (checked before any data are read);
  # --config.model.text_encoder=features trains on the files' frozen BERT features.
  config.model.text_encoder = "bert" if not variant else "features"

  # Losses (Eq. 13, A.3): L = task + l1 L_ucmi + l2 (L_uada + b1 L_anchor) + l3 L_consist.
  # The *_weight switches give the Table 4 loss ablations (0 removes a term).
  config.loss.regression_loss = "l1"  # MMSA/LNLN regression objective
  config.loss.lambda_ucmi = 0.5
  config.loss.lambda_align = 0.2
  config.loss.lambda_consist = 0.5
  config.loss.beta_anchor = 0.02
  config.loss.uada_weight = 1.0
  config.loss.cons_weight = 1.0
  config.loss.asym_weight = 1.0
  # Kernel bandwidth tau = uada_tau_scale * sqrt(D) (the paper gives no value; squared
  # distances of D-dimensional features grow with D) and psi = 1 + alpha * mean(u).
  config.loss.uada_tau_scale = 0.5
  config.loss.uada_alpha = 1.0
  # The variance is learned by L_ucmi alone and only read by the kernel bandwidth.
  config.loss.uada_stop_uncertainty_grad = True
  config.loss.anchor_momentum = 0.9  # EMA weight of the old anchor (B.2: "moving average")

  # Optimiser (A.3): Adam, fixed learning rate 1e-5, batch 64, 200 epochs.
  config.train.optimizer = "adam"
  config.train.learning_rate = 1e-5
  config.train.weight_decay = 0.0
  config.train.batch_size = 64
  config.train.num_epochs = 200
  config.train.schedule = "constant"

  # Training protocol: LNLN frame-level missing (per sample and modality r ~ U(0, 1), r = 0
  # for a random half) in both partial views, each also keeping a per-sample modality
  # subset drawn uniformly from the 7 combinations; the full view is the clean batch.
  # The subsets are ours: LNLN's protocol drops frames, never a whole modality, so UCMI
  # would have nothing to complete. False = LNLN's protocol alone (for comparison).
  config.missing.kind = "frame_lnln"
  config.missing.probs = (1 / 7,) * 7
  config.missing.partial_view_subsets = True

  # Model selection: EASE tunes on the validation split (A.3) with LNLN's code, which
  # validates under frame-level missing: every modality at r = 0.5 here.
  config.train.selection_scenarios = "frame"
  config.train.selection_frame_rate = 0.5

  config.eval.fixed = True
  config.eval.missing_rates = ()
  config.eval.frame_rates = EASE_FRAME_RATES
  config.eval.frame_sets = ("LAV",)

  if variant == "synthetic":
    # A few CPU minutes: a smaller network and AdamW at a from-scratch learning rate.
    config.model.width = 32
    config.model.num_layers = 1
    config.model.num_heads = 2
    config.model.mlp_dim = 64
    config.model.ucmi_hidden = 32
    config.model.head_hidden = 32
    config.train.optimizer = "adamw"
    config.train.learning_rate = 1e-3
    config.train.weight_decay = 1e-4
    config.train.num_epochs = 6
    config.train.log_every_steps = 4
  config_lib.apply_variant(config, variant)
  if variant == "tiny":
    config.model.width = 16
    config.model.num_layers = 1
    config.model.num_heads = 2
    config.model.mlp_dim = 32
    config.model.ucmi_hidden = 16
    config.model.head_hidden = 16
    config.train.optimizer = "adamw"
    config.train.learning_rate = 1e-3
    config.eval.missing_rates = ()
    config.eval.frame_rates = (0.0, 0.5, 0.9)
    config.eval.frame_sets = ("LAV",)
  return config
