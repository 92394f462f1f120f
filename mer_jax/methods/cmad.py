"""CMAD: Correlation-aware and Modalities-aware Distillation (cmad_supplementary.txt),
as SPEC section 7 decides it.

Two stages, one architecture (Sec. 6.1), the official code's (YetZzzzzz/CMAD
`student_model.py`, `mcur.official_backbone`): Conv1D + Perceiver per modality, a 2-layer
post-norm transformer over the modality tokens and the fused layer Linear(3D -> D) ->
Dropout -> ReLU (`nn.fusion.PerceiverFusion`) give the fused embedding E (B, D); a linear
classifier predicts. No VIB. Training as the official scripts (docs/decisions.md): the
teacher clips gradients at 1.0 and keeps its last epoch, the student trains without
dropout (`model.student_train_mode = False`) and keeps its best full-modality dev F1.

  teacher: L = mean L_task (MAE for regression, cross-entropy otherwise) on
    `config.teacher.missing` (full modalities by default).
  student: L = delta * L_CAFD + mean_i(Psi_{c_i} * task_i) + gamma * mean_i(Psi_{c_i} * aux_i)
    on `config.missing` (training drop with probabilities (2,3,3,1,1,3,1)/14), with the
    frozen teacher's outputs on the clean full-modality batch (computed once per stage by
    the trainer, or in the step with `config.train.cache_teacher=False`).

MAR (Table 5, Algorithm 1): the per-combination memory (`losses.mar_init`) is the
student's method state. For the first G epochs (`loss.mar_epochs`) the weights Psi are
1 and every step adds the difficulties d_i = relu(l_s,i - l_t,i) to their combination's
sum and count; at the end of epoch G, `end_epoch` sets Psi_c = rho * (W_c / max W)^2 and
fixes it. The memory is checkpointed with the params, so a resumed run continues it.

Ablation switches (`config.loss`): `use_cafd` ("w/o CAFD"), `cafd_mode` (Sec. 7.3:
"full", "mse_only", "sim_only", "correlation"), `use_mar` ("w/o MAR": Psi = 1),
`mar_on_task` / `mar_on_aux` (Table 11's L_TM / L_AM), `use_task` / `use_aux` (L_T / L_A),
`mar_difficulty` = "relative" (d = relu(l_s - l_t)) or "student" (d = l_s, CMAD_t).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mer_jax import config_lib
from mer_jax.data import missing
from mer_jax.data.spec import DataSpec
from mer_jax.losses.distillation import (
    CAFD_MODES,
    cafd,
    dkd,
    kd_regression_aux,
    mar_difficulty,
    mar_finalize,
    mar_init,
    mar_update,
    mar_weights,
)
from mer_jax.losses.task import mean_over_emotions, task_loss_rows
from mer_jax.methods import mcur
from mer_jax.methods.base import Stage, frozen_teacher_outputs
from mer_jax.methods.text_encoder import frozen_teacher_forward
from mer_jax.nn import scenarios
from mer_jax.nn.fusion import PerceiverFusion, perceiver_fusion_from_config
from mer_jax.nn.heads import OutputHead

_MISSING_KINDS = ("drop", "random_mr", "frame_lnln", "frame_dqf")
MAR_DIFFICULTIES = ("relative", "student")


class CMADModel(nn.Module):
  """Backbone -> linear classifier (cmad_supplementary.txt Eq. 16-20).

  Returns a dict: `output` (the task prediction) and `embedding` E (B, D).
  """

  backbone: PerceiverFusion
  output_shape: tuple[int, ...]

  @nn.compact
  def __call__(self, batch, *, train: bool, scenario_modality_mask=None):
    """`scenario_modality_mask` (B, S, 3): outputs (B, S, ...) under S modality masks
    (`PerceiverFusion`: the per-modality encoders run once)."""
    embedding = self.backbone(batch, train=train,
                              scenario_modality_mask=scenario_modality_mask)["fused"]
    output = OutputHead(self.output_shape, name="classifier")(embedding, train=train)
    outputs = {"output": output, "embedding": embedding}
    if scenario_modality_mask is None:
      return outputs
    return scenarios.unflatten_scenarios(outputs, scenario_modality_mask)


def build_model(config, spec: DataSpec) -> CMADModel:
  """The CMAD network (teacher and student share it) for a dataset."""
  return CMADModel(backbone=perceiver_fusion_from_config(config.model),
                   output_shape=spec.output_shape)


def init_state():
  """Student method state: the MAR memory (sums, counts, weights (7,), fixed)."""
  return {"mar": mar_init()}


def finalize_mar_if_due(method_state, epoch, *, mar_epochs: int, rho: float):
  """`Stage.end_epoch`: after epoch index `epoch` (0-based), once G = `mar_epochs` epochs
  are complete and the weights are not fixed yet, set Psi from the memory and fix it."""
  memory = method_state["mar"]
  due = (jnp.asarray(epoch) + 1 >= mar_epochs) & ~memory["fixed"]
  finalized = mar_finalize(memory, rho=rho)
  memory = jax.tree.map(lambda new, old: jnp.where(due, new, old), finalized, memory)
  return dict(method_state, mar=memory)


def _task_rows(outputs, labels, task: str):
  """Eq. 11 per row: MAE for regression, cross-entropy otherwise ((B, K) per emotion for
  multilabel_binary)."""
  return task_loss_rows(outputs, labels, task, regression_loss="l1")


def student_objective(student_out, teacher_out, labels, combination_ids, memory, *, task: str,
                      loss_config):
  """Student loss (Table 5 Eq. 14 with CAFD) and the MAR memory update.

    L = delta * L_CAFD + mean_i(Psi_{c_i} task_i) + gamma * mean_i(Psi_{c_i} aux_i)

  aux = MSE(y_s / phi, y_t / phi) * phi^2 (regression) or DKD with beta = 1 - alpha
  (classification) (Eq. 12-13). Multilabel-binary: task, DKD and the MAR difficulty
  relu(l_s - l_t) are computed per (sample, emotion) row and averaged over the emotions,
  as the official code's (B*K, 2) rows. The memory accumulates the difficulties of this
  batch unless it is already fixed.

  Args:
    student_out, teacher_out: `CMADModel` outputs (teacher on full modalities).
    labels: the batch labels (task layout).
    combination_ids: (B,) int combination of each student input.
    memory: MAR memory (see `losses.mar_init`).
    task: the DataSpec task.
    loss_config: `config.loss`.

  Returns:
    (loss, metrics, new_memory).
  """
  teacher_out = jax.tree.map(jax.lax.stop_gradient, teacher_out)
  y_s, y_t = student_out["output"], teacher_out["output"]
  student_rows, teacher_rows = _task_rows(y_s, labels, task), _task_rows(y_t, labels, task)
  student_task, teacher_task = mean_over_emotions(student_rows), mean_over_emotions(teacher_rows)
  if loss_config.mar_difficulty == "relative":
    difficulty = mean_over_emotions(mar_difficulty(student_rows, teacher_rows))
  else:
    difficulty = jax.lax.stop_gradient(student_task)
  new_memory = mar_update(memory, difficulty, combination_ids)

  if task == "regression":
    aux = kd_regression_aux(y_s, y_t, phi=loss_config.phi)
  else:
    aux = dkd(y_s, y_t, labels, alpha=loss_config.dkd_alpha, beta=1.0 - loss_config.dkd_alpha,
              temperature=loss_config.dkd_temperature)
  # Weights of this step come from the memory before the update: fixed after epoch G,
  # ones before, so the order does not matter; it keeps the step's weights well defined.
  psi = mar_weights(memory, combination_ids)
  ones = jnp.ones_like(psi)
  task_weight = psi if (loss_config.use_mar and loss_config.mar_on_task) else ones
  aux_weight = psi if (loss_config.use_mar and loss_config.mar_on_aux) else ones
  zero = jnp.zeros((), jnp.float32)
  task_term = jnp.mean(task_weight * student_task) if loss_config.use_task else zero
  aux_term = jnp.mean(aux_weight * aux) if loss_config.use_aux else zero
  cafd_term = (cafd(student_out["embedding"], teacher_out["embedding"], tau=loss_config.tau,
                    mode=loss_config.cafd_mode) if loss_config.use_cafd else zero)
  loss = (loss_config.cafd_weight * cafd_term + task_term + loss_config.aux_weight * aux_term)

  metrics = {"loss_cafd": cafd_term, "loss_task": task_term, "loss_aux": aux_term,
             "student_task": student_task.mean(), "teacher_task": teacher_task.mean(),
             "mar_difficulty": difficulty.mean(),
             "mar_fixed": memory["fixed"].astype(jnp.float32)}
  for index, name in enumerate(missing.COMBINATION_NAMES):
    metrics[f"mar_weight_{name}"] = memory["weights"][index]
  return loss, metrics, new_memory


def base_config() -> ml_collections.ConfigDict:
  """`config_lib.base_config()` plus every CMAD field, at the MOSEI values of Sec. 6.2.

  The `configs/cmad_*.py` files start from here and set what their dataset changes.
  """
  config = config_lib.base_config()
  config.method = "cmad"

  mcur.official_backbone(config.model)  # the official student_model.py at MOSEI size
  # The official student is never put in train mode (`from_pretrained` returns it in eval
  # mode and `evulate` calls `model.train(False)`): it trains without dropout, BERT's
  # included. The teacher trains with `model.train()` (its dropouts active).
  config.model.student_train_mode = False

  loss = config.loss
  loss.cafd_weight = 0.1  # delta (the supplement's sigma); README command --delta=0.1
  loss.cafd_mode = "full"  # full | mse_only | sim_only | correlation (Sec. 7.3, Tables 7-10)
  loss.aux_weight = 1.0  # gamma; --gamma=1
  loss.tau = 0.2  # CAFD temperature; --tau=0.2
  # Regression auxiliary scale (Eq. 13); --temperature=7.0 (the script's default is 2.0).
  # phi cancels: MSE(y_s/phi, y_t/phi) * phi^2 = (y_s - y_t)^2 (docs/methods.md).
  loss.phi = 7.0
  loss.dkd_alpha = 0.9  # alpha of DKD (classification / multilabel)
  loss.dkd_temperature = 1.0
  loss.mar_epochs = 20  # G; --begin_epoch=20
  loss.mar_rho = 20.0  # rho; --weights 20.0
  loss.mar_difficulty = "relative"  # relative: relu(l_s - l_t); student: l_s (CMAD_t)
  # Ablations: False removes the term / the MAR weighting.
  loss.use_cafd = True
  loss.use_mar = True
  loss.mar_on_task = True
  loss.mar_on_aux = True
  loss.use_task = True
  loss.use_aux = True

  # Teacher stage: full modalities (same variants as MCUR's Table 14 are available).
  # Official teacher (Teacher_Model/train_teacher_model.py, README command): 80 epochs,
  # AdamW 2e-5, batch 128, constant rate, gradient norm clipped at 1.0.
  config.teacher = ml_collections.ConfigDict()
  config.teacher.num_epochs = 80
  # The teacher's own rate (its script's --learning_rate=2e-5), pinned so that a sweep of
  # the student's rate leaves the teacher alone; 0 = config.train.learning_rate.
  config.teacher.learning_rate = 2e-5
  # The teacher file is rewritten every epoch (`torch.save` in `train`), so the student
  # reads the last epoch's teacher.
  config.teacher.selection = "last"
  config.teacher.grad_clip = 1.0  # torch.nn.utils.clip_grad_norm_(..., args.clip = 1.0)
  config.teacher.missing = ml_collections.ConfigDict(config.missing.to_dict())
  config.teacher.missing.kind = "none"

  # Student stage: training drop with CMAD's probabilities (2,3,3,1,1,3,1)/14.
  config.missing.kind = "drop"
  config.missing.probs = missing.CMAD_DROP

  # Official student (stu_config_mosei.py + README command): AdamW 2e-5 (eps 1e-8), weight
  # decay 1e-4 (the first of its two `weight_decay` flags sets the default), batch 128,
  # 80 epochs, constant rate (`--schedule 180 200` lies past the last epoch, no --cos),
  # no gradient clipping.
  # The frozen teacher's outputs for the training split computed once per student stage
  # (it is deterministic on the clean batch); False runs it on every batch.
  config.train.cache_teacher = True
  config.train.optimizer = "adamw"
  config.train.learning_rate = 2e-5
  config.train.weight_decay = 1e-4
  config.train.batch_size = 128
  config.train.num_epochs = 80
  config.train.schedule = "constant"
  config.train.grad_clip = 0.0
  # Student kept: the best dev F1 (acc2/F1 on non-zero labels) on full modalities.
  config.train.selection_metric = "f1_non0"
  config.train.selection_scenarios = "full"
  return config


def apply_variant(config, variant: str):
  """MCUR's `:synthetic` / `:tiny` sizes (the same backbone) with MAR's epoch threshold G
  scaled to the shorter runs."""
  mcur.apply_variant(config, variant)
  if variant == "synthetic":
    config.loss.mar_epochs = 4
  elif variant == "tiny":
    config.loss.mar_epochs = 1


def _validate(config):
  for name, missing_config in (("config.teacher.missing", config.teacher.missing),
                               ("config.missing", config.missing)):
    if missing_config.kind not in missing.TRAINING_KINDS:
      raise ValueError(f"{name}.kind must be one of {missing.TRAINING_KINDS}, got "
                       f"{missing_config.kind!r}")
  if config.loss.cafd_mode not in CAFD_MODES:
    raise ValueError(f"config.loss.cafd_mode must be one of {CAFD_MODES}, got "
                     f"{config.loss.cafd_mode!r}")
  if config.loss.mar_difficulty not in MAR_DIFFICULTIES:
    raise ValueError(f"config.loss.mar_difficulty must be one of {MAR_DIFFICULTIES}, got "
                     f"{config.loss.mar_difficulty!r}")
  if config.loss.mar_epochs < 1:
    raise ValueError(f"config.loss.mar_epochs (G) must be >= 1: MAR needs at least one epoch "
                     f"of statistics, got {config.loss.mar_epochs}")


def build(config, spec: DataSpec) -> list[Stage]:
  """[teacher, student] stages of CMAD for a dataset described by `spec`."""
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
  mar_epochs = int(loss_config.mar_epochs)
  rho = float(loss_config.mar_rho)

  def teacher_loss_fn(params, method_state, batch, key, context):
    del context
    missing_key, dropout_key = jax.random.split(key)
    batch, _ = missing.apply_training_protocol(missing_key, batch, teacher_missing)
    out = teacher_model.apply({"params": params}, batch, train=True,
                              rngs={"dropout": dropout_key})
    loss = mean_over_emotions(_task_rows(out["output"], batch["label"], task)).mean()
    return loss, ({"loss_task": loss}, method_state)

  def student_loss_fn(params, method_state, batch, key, context):
    missing_key, dropout_key = jax.random.split(key)
    # The frozen teacher on the clean full-modality batch, deterministically (computed
    # once for the split by the trainer unless config.train.cache_teacher is False).
    teacher_out = frozen_teacher_outputs(context, batch, teacher_forward)
    student_batch, combination_ids = missing.apply_training_protocol(
        missing_key, batch, student_missing)
    student_out = student_model.apply({"params": params}, student_batch, train=student_train_mode,
                                      rngs={"dropout": dropout_key})
    loss, metrics, memory = student_objective(
        student_out, teacher_out, batch["label"], combination_ids, method_state["mar"],
        task=task, loss_config=loss_config)
    return loss, (metrics, dict(method_state, mar=memory))

  def end_epoch(method_state, epoch):
    return finalize_mar_if_due(method_state, epoch, mar_epochs=mar_epochs, rho=rho)

  teacher = Stage(name="teacher", model=teacher_model, loss_fn=teacher_loss_fn,
                  num_epochs=config.teacher.num_epochs,
                  learning_rate=float(config.teacher.learning_rate) or None,
                  selection=config.teacher.selection,
                  grad_clip=config.teacher.get("grad_clip"),
                  trained_with_missing=teacher_missing.kind in _MISSING_KINDS,
                  masks_in_network=True)
  student = Stage(name="student", model=student_model, loss_fn=student_loss_fn,
                  init_state=init_state, end_epoch=end_epoch,
                  num_epochs=config.train.num_epochs, teacher_forward=teacher_forward,
                  trained_with_missing=student_missing.kind in _MISSING_KINDS,
                  masks_in_network=True)
  return [teacher, student]
