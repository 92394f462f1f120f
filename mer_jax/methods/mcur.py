"""MCUR: Modality-aware Contrastive and Uncertainty-Regularized emotion recognition
(mcur.txt), as SPEC section 7 decides it.

Two stages, one architecture (A.1): Conv1D + Perceiver per modality, a 2-layer
transformer over the modality tokens and a 2-layer MLP (`nn.fusion.PerceiverFusion`),
a VIB (`nn.gaussian.VIB`) giving the fused embedding E, and a linear classifier.

  teacher (A.2.2, Eq. 22): L = L_task + beta * KL, on `config.teacher.missing` (full
    modalities by default; Table 14's variants: "noise", "random_mr", "drop" with any
    probability vector).
  student (Eq. 15 / 23): L = gamma * L_CL + L_MSE + zeta * mean(L_SUGR) + beta * KL, on
    `config.missing` (training drop, uniform 1/7), with the frozen teacher's outputs on
    the clean full-modality batch (computed once per stage by the trainer, or in the
    step with `config.train.cache_teacher=False`).

The backbone is the official CMAD code's (`official_backbone`, docs/methods.md: Table 9's
parameter counts). Every loss term has a switch in `config.loss` (Table 2: `use_cl`,
`use_uncertainty`, `use_logits`, `use_mse`; Table 3: `contrastive` in mcb | infonce |
one_instance | supcon; `task_weight`, `sugr_detach_weight`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mer_jax import config_lib
from mer_jax.data import missing
from mer_jax.data.spec import DataSpec
from mer_jax.losses.contrastive import CONTRASTIVE_KINDS, contrastive_categories, contrastive_loss
from mer_jax.losses.distillation import sugr
from mer_jax.losses.task import task_loss
from mer_jax.losses.uncertainty import vib_kl
from mer_jax.methods.base import Stage, frozen_teacher_outputs
from mer_jax.methods.text_encoder import frozen_teacher_forward
from mer_jax.nn import scenarios
from mer_jax.nn.fusion import PerceiverFusion, perceiver_fusion_from_config
from mer_jax.nn.gaussian import VIB
from mer_jax.nn.heads import OutputHead

# Missing-protocol kinds that simulate absent modalities or frames (Stage.trained_with_missing).
_MISSING_KINDS = ("drop", "random_mr", "frame_lnln", "frame_dqf")


class MCURModel(nn.Module):
  """Backbone -> VIB -> linear classifier (mcur.txt Eq. 18-21).

  Returns a dict: `output` (the task prediction), `embedding` E (B, D) (the VIB sample
  in training, its mean in evaluation), `mu` and `sigma` (B, D) of the VIB (absent with
  `use_vib=False`, where E is the fused embedding itself).
  """

  backbone: PerceiverFusion
  output_shape: tuple[int, ...]
  use_vib: bool = True

  @nn.compact
  def __call__(self, batch, *, train: bool, scenario_modality_mask=None):
    """`scenario_modality_mask` (B, S, 3): outputs (B, S, ...) under S modality masks
    (`PerceiverFusion`: the per-modality encoders run once)."""
    fused = self.backbone(batch, train=train,
                          scenario_modality_mask=scenario_modality_mask)["fused"]
    if not self.use_vib:
      output = OutputHead(self.output_shape, name="classifier")(fused, train=train)
      outputs = {"output": output, "embedding": fused}
    else:
      embedding, mu, sigma = VIB(fused.shape[-1], name="vib")(fused, train=train)
      output = OutputHead(self.output_shape, name="classifier")(embedding, train=train)
      outputs = {"output": output, "embedding": embedding, "mu": mu, "sigma": sigma}
    if scenario_modality_mask is None:
      return outputs
    return scenarios.unflatten_scenarios(outputs, scenario_modality_mask)


def build_model(config, spec: DataSpec) -> MCURModel:
  """The MCUR network (teacher and student share it) for a dataset."""
  return MCURModel(backbone=perceiver_fusion_from_config(config.model),
                   output_shape=spec.output_shape, use_vib=config.model.use_vib)


def _vib_kl(out):
  """KL of the VIB posterior to N(0, I) (SPEC: mean over batch and dims); 0 without VIB."""
  if "mu" not in out:
    return jnp.zeros((), jnp.float32)
  return vib_kl(out["mu"], out["sigma"])


def teacher_objective(out, labels, *, task: str, loss_config):
  """Teacher loss (A.2.2, Eq. 22): mean task loss + beta * KL of the VIB.

  Returns (loss, metrics).
  """
  task_term = task_loss(out["output"], labels, task,
                        regression_loss=loss_config.regression_loss).mean()
  kl = _vib_kl(out)
  return task_term + loss_config.vib_beta * kl, {"loss_task": task_term, "loss_kl": kl}


def student_objective(student_out, teacher_out, labels, combination_ids, *, task: str,
                      loss_config, key):
  """Student loss (Eq. 15 with the VIB term of Eq. 23).

    L = gamma * L_CL + w_mse * L_MSE + zeta * mean_i L_SUGR_i + beta * KL_student
        + task_weight * mean_i L_TASK_i   (task_weight 0 by default)

  L_CL: `contrastive_loss(loss_config.contrastive, ...)` on the student embeddings E^s,
  categories from the labels, positives by modality combination (MCB-CL, Eq. 2-5);
  "infonce" pairs E^s with the teacher's E^t of the same sample.
  L_MSE: mean over dimensions of (E^s - E^t)^2, averaged over the batch (Eq. 6).
  L_SUGR: `sugr` (Eq. 7-14) with the Table 2 switches `use_uncertainty`, `use_logits`
  and `sugr_detach_weight`.

  Args:
    student_out, teacher_out: `MCURModel` outputs (teacher on full modalities).
    labels: the batch labels (task layout).
    combination_ids: (B,) int combination of each student input.
    task: the DataSpec task.
    loss_config: `config.loss`.
    key: jax.random key (the "one_instance" contrastive variant draws positives).

  Returns:
    (loss, metrics) with every term logged unweighted.
  """
  teacher_out = jax.tree.map(jax.lax.stop_gradient, teacher_out)
  embedding_s, embedding_t = student_out["embedding"], teacher_out["embedding"]
  zero = jnp.zeros((), jnp.float32)

  if loss_config.use_cl:
    cl = contrastive_loss(loss_config.contrastive, embedding_s,
                          contrastive_categories(labels, task), combination_ids,
                          temperature=loss_config.temperature, mu1=loss_config.mu1,
                          mu2=loss_config.mu2, paired_embeddings=embedding_t, key=key)
  else:
    cl = zero
  if loss_config.use_mse:
    mse = jnp.mean(jnp.square(embedding_s.astype(jnp.float32) - embedding_t))
  else:
    mse = zero
  sugr_per_sample = sugr(student_out["output"], teacher_out["output"], labels, task=task,
                         alpha=loss_config.dkd_alpha, temperature=loss_config.dkd_temperature,
                         use_uncertainty=loss_config.use_uncertainty,
                         use_logits=loss_config.use_logits,
                         detach_weight=loss_config.sugr_detach_weight)
  sugr_term = sugr_per_sample.mean()
  kl = _vib_kl(student_out)
  task_term = task_loss(student_out["output"], labels, task,
                        regression_loss=loss_config.regression_loss).mean()
  loss = (loss_config.cl_weight * cl + loss_config.mse_weight * mse
          + loss_config.sugr_weight * sugr_term + loss_config.vib_beta * kl
          + loss_config.task_weight * task_term)
  metrics = {"loss_cl": cl, "loss_mse": mse, "loss_sugr": sugr_term, "loss_kl": kl,
             "loss_task": task_term}
  return loss, metrics


def official_backbone(model: ml_collections.ConfigDict) -> None:
  """The official CMAD architecture (YetZzzzzz/CMAD `student_model.py`, `Perceiver.py`) at
  its MOSEI size, in `config.model`: MCUR and CMAD build on the same blocks (SPEC section
  7). Every value is the official code's; the configs change width and depth per dataset
  (`scale_backbone`, `model.perceiver_depth`).
  """
  model.kernel_sizes = (3, 1, 1)  # BERT_TM.proj_l k=3; proj_a / proj_v k=1
  model.projection_bias = False  # every Conv1d(..., bias=False)
  model.num_latents = 5  # --num_latents 5
  model.perceiver_depth = 5  # README command --depth=5 (Sec. 6.1: 5 layers on MOSEI)
  model.self_per_cross = 1
  model.perceiver_qkv_bias = False  # to_q / to_kv without bias, to_out with
  model.perceiver_dropout = 0.0  # --p_attn_dropout 0, --p_ff_dropout 0
  model.fusion_layers = 2  # --te_layers 2
  model.fusion_head_dim = 0  # PyTorch MultiheadAttention: D // nhead
  model.fusion_mlp_dim = 2048  # nn.TransformerEncoderLayer defaults: dim_feedforward 2048,
  model.fusion_activation = "relu"  # ReLU,
  model.fusion_norm = "post"  # post-norm (norm_first=False),
  model.fusion_dropout = 0.1  # dropout 0.1
  model.mlp_layers = 1  # fusion_all: Linear(3D -> D) -> Dropout(0.3) -> ReLU
  model.mlp_hidden_dim = 0
  model.fused_activation = "relu"
  model.fused_dropout = 0.3  # --dropout_prob 0.3
  model.activate_fused = True
  model.position_embedding = False  # none in the official model
  model.modality_embedding = False
  model.absent_modality = "zero"  # modality_drop multiplies the inputs by 0, nothing masked
  # Layer stacks unrolled (`layers_{i}`): on CPU the scanned form runs the depth-5 step
  # 1.5x slower (stacked residual buffers, zero-filled and updated every layer) and
  # compiles no faster (docs/performance.md, issue 17); True scans them, same numbers.
  model.scan = False
  model.remat = False
  scale_backbone(model, width=96, heads=16)  # --d_l 96, --num_heads 16


def scale_backbone(model: ml_collections.ConfigDict, *, width: int, heads: int,
                   head_dim: int = 0) -> None:
  """Width D and heads of the backbone with the official code's couplings: every attention
  (cross, latent, fusion) has `heads` heads; the Perceiver's head dimension is `heads`
  too (`dim_head = num_heads` in `student_model.py`) unless `head_dim` is given; GEGLU
  feed-forwards of 4D (`FeedForward(mult=4)`); a two-layer fused MLP keeps its 3D hidden
  width."""
  model.width = width
  model.cross_heads = model.latent_heads = model.fusion_heads = heads
  model.cross_head_dim = model.latent_head_dim = head_dim or heads
  model.perceiver_mlp_dim = 4 * width
  if model.get("mlp_layers", 1) > 1:
    model.mlp_hidden_dim = 3 * width


def base_config() -> ml_collections.ConfigDict:
  """`config_lib.base_config()` plus every MCUR field, at the MOSEI values of A.2.3.

  The `configs/mcur_*.py` files start from here and set what their dataset changes.
  """
  config = config_lib.base_config()
  config.method = "mcur"

  official_backbone(config.model)
  # Eq. 18: a two-layer MLP E_f = W2(W1 TE([P_1, P_2, P_3]) + b1) + b2 over the concatenated
  # tokens (3D wide), hidden width 3D (the width that Table 9's counts imply, see
  # docs/methods.md), ReLU + dropout between the layers as the CMAD blocks' fused layer;
  # E_f stays affine: it feeds the VIB (Eq. 20).
  config.model.mlp_layers = 2
  config.model.mlp_hidden_dim = 3 * config.model.width
  config.model.activate_fused = False
  config.model.use_vib = True
  # MCUR's student trains in train mode (dropout, VIB sampling); see CMAD's setting.
  config.model.student_train_mode = True

  loss = config.loss
  loss.regression_loss = "l1"  # L_TASK = MAE (Eq. 12)
  loss.vib_beta = 0.01  # beta (Eq. 22-23)
  loss.cl_weight = 0.2  # gamma
  loss.sugr_weight = 5.0  # zeta
  loss.mse_weight = 1.0  # Eq. 15 weights L_MSE by 1
  loss.contrastive = "mcb"  # Table 3: mcb | infonce | one_instance | supcon
  loss.temperature = 0.2  # tau
  loss.mu1 = 1.0
  loss.mu2 = 1.0
  loss.dkd_alpha = 0.2  # alpha of DKD (classification / multilabel)
  loss.dkd_temperature = 1.0
  # Ungated student task term w * mean(L_TASK^s) (SPEC: 0, the task loss enters only
  # through SUGR). Eq. 23's beta * L_VIB^s with L_VIB = L_TASK + beta * KL (Eq. 20) read
  # literally is task_weight = beta (0.01); 1 gives a full-weight task term.
  loss.task_weight = 0.0
  # Stop-gradient on SUGR's weight |H_t - H_s| (Eq. 14 as written differentiates it).
  loss.sugr_detach_weight = False
  # Table 2 ablations: False removes the term ("w/o L_CL", "w/o L_Uncer", ...).
  loss.use_cl = True
  loss.use_mse = True
  loss.use_uncertainty = True
  loss.use_logits = True

  # Teacher stage (A.2.2): trained on full modalities. Table 14 variants:
  #   noise:    --config.teacher.missing.kind=noise --config.teacher.missing.noise_intensity=5
  #   mr_30:    --config.teacher.missing.kind=random_mr --config.teacher.missing.missing_rate=0.3
  #   high_l:   --config.teacher.missing.kind=drop --config.teacher.missing.probs="(8,1,1,1,1,1,1)"
  # The teacher shares config.train (optimiser, batch size, selection) with the student.
  config.teacher = ml_collections.ConfigDict()
  config.teacher.num_epochs = 100
  # A.2.3: the teacher's rate, 2e-5 on MOSI/MOSEI (1e-3 on IEMOCAP); 0 = the student's
  # config.train.learning_rate.
  config.teacher.learning_rate = 2e-5
  # best (on the validation split) | last epoch; the paper does not say: the fixed mean.
  config.teacher.selection = "best"
  config.teacher.missing = ml_collections.ConfigDict(config.missing.to_dict())
  config.teacher.missing.kind = "none"

  # Student stage: training drop over the 7 combinations, 1/7 each (A.2.4); any
  # probability vector via --config.missing.probs.
  config.missing.kind = "drop"
  config.missing.probs = missing.UNIFORM_DROP

  # The frozen teacher's outputs for the training split computed once per student stage
  # (it is deterministic on the clean batch); False runs it on every batch.
  config.train.cache_teacher = True
  config.train.optimizer = "adamw"
  config.train.learning_rate = 2e-5
  config.train.weight_decay = 0.01
  config.train.batch_size = 128
  config.train.num_epochs = 100  # A.5.3: 100 epochs
  return config


def apply_variant(config, variant: str, *, student_epochs: int = 12):
  """The `:synthetic` and `:tiny` sizes of the Perceiver-fusion backbone and schedule,
  shared by every MCUR and CMAD config (`config_lib.apply_variant` included).

  The official blocks are kept (post-norm ReLU fusion, bias-free Perceiver attention,
  dropout places) with smaller widths: `:synthetic` D = 32, 4 heads of 8 (inner width 32
  instead of 256), one Perceiver layer, 4 latents, fusion feed-forward 4D = 128 instead of
  2048; `:tiny` D = 16, 2 heads of 8, one layer everywhere, no dropout.
  """
  if variant == "synthetic":
    # Small enough for two CPU cores: both stages and the evaluation in a few minutes.
    scale_backbone(config.model, width=32, heads=4, head_dim=8)
    config.model.num_latents = 4
    config.model.perceiver_depth = 1
    config.model.fusion_mlp_dim = 4 * 32
    config.train.batch_size = 64
    config.train.learning_rate = 1e-3
    config.teacher.learning_rate = 0.0  # both stages at the variant's rate
    config.train.schedule = "cosine"
    config.train.num_epochs = student_epochs
    config.teacher.num_epochs = 8
  config_lib.apply_variant(config, variant)
  if variant:
    config.model.text_encoder = "features"  # generated data carry features, no token ids
  if variant == "tiny":
    scale_backbone(config.model, width=16, heads=2, head_dim=8)
    config.model.num_latents = 2
    config.model.perceiver_depth = 1
    config.model.fusion_layers = 1
    config.model.fusion_mlp_dim = 4 * 16
    # wiring tests: dropout's RNG doubles the CPU compile time
    config.model.perceiver_dropout = config.model.fusion_dropout = 0.0
    config.model.fused_dropout = 0.0
    config.train.learning_rate = 1e-3
    config.teacher.learning_rate = 0.0
    config.teacher.num_epochs = 1


def _validate(config):
  if config.loss.contrastive not in CONTRASTIVE_KINDS:
    raise ValueError(f"config.loss.contrastive must be one of {CONTRASTIVE_KINDS}, got "
                     f"{config.loss.contrastive!r}")
  for name, missing_config in (("config.teacher.missing", config.teacher.missing),
                               ("config.missing", config.missing)):
    if missing_config.kind not in missing.TRAINING_KINDS:
      raise ValueError(f"{name}.kind must be one of {missing.TRAINING_KINDS}, got "
                       f"{missing_config.kind!r}")


def build(config, spec: DataSpec) -> list[Stage]:
  """[teacher, student] stages of MCUR for a dataset described by `spec`."""
  _validate(config)
  task = spec.task
  loss_config = config.loss
  teacher_missing = config.teacher.missing
  student_missing = config.missing
  teacher_model = build_model(config, spec)
  student_model = build_model(config, spec)
  # False: the student's training forward is deterministic (no dropout), as the official
  # CMAD student, which is never put in train mode (docs/decisions.md).
  student_train_mode = bool(config.model.student_train_mode)
  teacher_forward = frozen_teacher_forward(teacher_model)

  def teacher_loss_fn(params, method_state, batch, key, context):
    del context
    missing_key, dropout_key = jax.random.split(key)
    batch, _ = missing.apply_training_protocol(missing_key, batch, teacher_missing)
    out = teacher_model.apply({"params": params}, batch, train=True,
                              rngs={"dropout": dropout_key})
    loss, metrics = teacher_objective(out, batch["label"], task=task, loss_config=loss_config)
    return loss, (metrics, method_state)

  def student_loss_fn(params, method_state, batch, key, context):
    missing_key, dropout_key, contrastive_key = jax.random.split(key, 3)
    # The frozen teacher on the clean full-modality batch, deterministically (computed
    # once for the split by the trainer unless config.train.cache_teacher is False).
    teacher_out = frozen_teacher_outputs(context, batch, teacher_forward)
    student_batch, combination_ids = missing.apply_training_protocol(
        missing_key, batch, student_missing)
    student_out = student_model.apply({"params": params}, student_batch, train=student_train_mode,
                                      rngs={"dropout": dropout_key})
    loss, metrics = student_objective(student_out, teacher_out, batch["label"], combination_ids,
                                      task=task, loss_config=loss_config, key=contrastive_key)
    return loss, (metrics, method_state)

  teacher = Stage(name="teacher", model=teacher_model, loss_fn=teacher_loss_fn,
                  num_epochs=config.teacher.num_epochs,
                  learning_rate=float(config.teacher.learning_rate) or None,
                  selection=config.teacher.selection,
                  grad_clip=config.teacher.get("grad_clip"),
                  trained_with_missing=teacher_missing.kind in _MISSING_KINDS,
                  masks_in_network=True)
  student = Stage(name="student", model=student_model, loss_fn=student_loss_fn,
                  num_epochs=config.train.num_epochs, teacher_forward=teacher_forward,
                  trained_with_missing=student_missing.kind in _MISSING_KINDS,
                  masks_in_network=True)
  return [teacher, student]
