"""CMAD: model shapes, the student objective and the MAR memory against numpy, the MAR
epoch threshold, the ablation switches, and a two-stage run whose teacher checkpoint and
MAR memory survive a second run."""

import dataclasses
import importlib.util
import json
import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import REPO
from helpers import parse_flags, random_batch, tiny_spec

from mer_jax import parallel, train, trainer
from mer_jax.data import pipeline
from mer_jax.data.spec import DataSpec
from mer_jax.methods import build_stages, cmad, text_encoder
from mer_jax.methods.base import StageContext
from mer_jax.nn import bert
from mer_jax.trainer import load_stage_params


def load_config(name="cmad_mosei.py", arg="tiny"):
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, "configs", name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def loss_config(**overrides):
  config = cmad.base_config().loss
  config.update(dict(cafd_weight=0.4, aux_weight=0.7, tau=0.5, phi=3.0, dkd_alpha=0.9))
  config.update(overrides)
  return config


def outputs(task, batch_size=8, width=5, seed=0, num_emotions=3):
  rng = np.random.default_rng(seed)
  shape = (batch_size,) if task == "regression" else (batch_size, num_emotions, 2)

  def one():
    return {"output": jnp.asarray(rng.normal(size=shape), jnp.float32),
            "embedding": jnp.asarray(rng.normal(size=(batch_size, width)), jnp.float32)}

  if task == "regression":
    labels = rng.uniform(-3, 3, batch_size).astype(np.float32)
  else:
    labels = rng.integers(0, 2, (batch_size, num_emotions)).astype(np.int32)
  combos = rng.integers(0, 7, batch_size).astype(np.int32)
  return one(), one(), jnp.asarray(labels), jnp.asarray(combos)


def memory(seed=1, fixed=False):
  rng = np.random.default_rng(seed)
  return {"sums": jnp.asarray(rng.uniform(0, 2, 7), jnp.float32),
          "counts": jnp.asarray(rng.integers(1, 5, 7), jnp.float32),
          "weights": jnp.asarray(rng.uniform(0.5, 3.0, 7), jnp.float32),
          "fixed": jnp.asarray(fixed)}


def np_cafd(s, t, tau):
  """CAFD of SPEC section 7, independently in float64."""
  s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
  mse = np.mean((s - t) ** 2, axis=-1)
  sn = s / np.linalg.norm(s, axis=-1, keepdims=True)
  tn = t / np.linalg.norm(t, axis=-1, keepdims=True)
  sim_st, sim_tt = sn @ tn.T, tn @ tn.T
  diff = np.abs(sim_tt - sim_st)
  l_struct = np.trace(diff) / diff.sum()

  def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  p, q = softmax(sim_tt / tau), softmax(sim_st / tau)
  bikl = (np.sum(p * np.log(p / q), -1) + np.sum(q * np.log(q / p), -1)) / 2
  return np.mean(bikl * mse) + l_struct


def np_cafd_similarity(s, t, tau):
  """CAFD's correlation consistency alone: mean bi-KL of the rows + l_struct (Sec. 7.3)."""
  sn = s / np.linalg.norm(s, axis=-1, keepdims=True)
  tn = t / np.linalg.norm(t, axis=-1, keepdims=True)
  sim_st, sim_tt = sn @ tn.T, tn @ tn.T
  diff = np.abs(sim_tt - sim_st)
  p, q = np_softmax(sim_tt / tau), np_softmax(sim_st / tau)
  bikl = (np.sum(p * np.log(p / q), -1) + np.sum(q * np.log(q / p), -1)) / 2
  return np.mean(bikl) + np.trace(diff) / diff.sum()


def np_correlation_transfer(s, t, tau):
  """compute_correlation_loss: bi-KL between the rows of S_ss and S_tt."""
  sn = s / np.linalg.norm(s, axis=-1, keepdims=True)
  tn = t / np.linalg.norm(t, axis=-1, keepdims=True)
  p, q = np_softmax(sn @ sn.T / tau), np_softmax(tn @ tn.T / tau)
  return np.mean((np.sum(p * np.log(p / q), -1) + np.sum(q * np.log(q / p), -1)) / 2)


def np_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize("task,shape", [("regression", ()), ("classification", (4,)),
                                        ("multilabel_binary", (4, 2))])
def test_model_output_shapes(task, shape):
  config = load_config()
  spec = tiny_spec(task)
  teacher, student = cmad.build(config, spec)
  batch = random_batch(spec, batch_size=5)
  params = jax.eval_shape(lambda: teacher.model.init(
      {"params": jax.random.key(0)}, batch, train=False)["params"])
  out = jax.eval_shape(lambda p: student.model.apply({"params": p}, batch, train=False), params)
  chex.assert_shape(out["output"], (5,) + shape)
  chex.assert_shape(out["embedding"], (5, config.model.width))
  assert "vib" not in params  # CMAD has no VIB
  state = student.init_state()
  chex.assert_shape([state["mar"]["sums"], state["mar"]["counts"], state["mar"]["weights"]], (7,))
  assert teacher.end_epoch is None and student.end_epoch is not None


# ----------------------------------------------------------------------------- objective


@pytest.mark.parametrize("fixed", [False, True])
def test_regression_objective_and_memory_update_match_numpy(fixed):
  student, teacher, labels, combos = outputs("regression")
  start = memory(fixed=fixed)
  loss, metrics, new = cmad.student_objective(student, teacher, labels, combos, start,
                                              task="regression", loss_config=loss_config())
  y = np.asarray(labels, np.float64)
  y_s = np.asarray(student["output"], np.float64)
  y_t = np.asarray(teacher["output"], np.float64)
  psi = np.asarray(start["weights"])[np.asarray(combos)]
  task = np.mean(psi * np.abs(y - y_s))  # Eq. 11, 14
  aux = np.mean(psi * (y_s / 3.0 - y_t / 3.0) ** 2 * 9.0)  # Eq. 13, phi = 3
  cafd = np_cafd(student["embedding"], teacher["embedding"], 0.5)
  np.testing.assert_allclose(loss, 0.4 * cafd + task + 0.7 * aux, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_cafd"], cafd, rtol=1e-5)

  difficulty = np.maximum(np.abs(y - y_s) - np.abs(y - y_t), 0.0)  # Eq. 6-7
  added_sums = np.bincount(combos, weights=difficulty, minlength=7)
  added_counts = np.bincount(combos, minlength=7)
  keep = 0.0 if fixed else 1.0
  np.testing.assert_allclose(new["sums"], np.asarray(start["sums"]) + keep * added_sums,
                             rtol=1e-5)
  np.testing.assert_allclose(new["counts"], np.asarray(start["counts"]) + keep * added_counts)
  np.testing.assert_array_equal(new["weights"], start["weights"])
  assert bool(new["fixed"]) == fixed


def test_multilabel_objective_uses_dkd_per_emotion_head():
  student, teacher, labels, combos = outputs("multilabel_binary")
  start = memory()
  config = loss_config(use_cafd=False)
  loss, _, new = cmad.student_objective(student, teacher, labels, combos, start,
                                        task="multilabel_binary", loss_config=config)
  p_s, p_t = np_softmax(student["output"]), np_softmax(teacher["output"])
  labels_np = np.asarray(labels)
  # Per (sample, emotion) row as the official (B*K, 2) flattening, averaged over emotions.
  ce_s = -np.log(np.take_along_axis(p_s, labels_np[..., None], -1)[..., 0])
  ce_t = -np.log(np.take_along_axis(p_t, labels_np[..., None], -1)[..., 0])
  # Two-class heads: NCKD is 0 and TCKD is the KL of the full head distributions.
  dkd = 0.9 * np.sum(p_t * np.log(p_t / p_s), axis=-1).mean(-1)
  psi = np.asarray(start["weights"])[np.asarray(combos)]
  np.testing.assert_allclose(loss, np.mean(psi * ce_s.mean(-1)) + 0.7 * np.mean(psi * dkd),
                             rtol=1e-5)
  # MAR difficulty: relu per row, then the mean over the emotions (not relu of the means).
  difficulty = np.maximum(ce_s - ce_t, 0.0).mean(-1)
  assert not np.allclose(difficulty, np.maximum(ce_s.mean(-1) - ce_t.mean(-1), 0.0))
  added = np.bincount(combos, weights=difficulty, minlength=7)
  np.testing.assert_allclose(new["sums"], np.asarray(start["sums"]) + added, rtol=1e-5)


@pytest.mark.parametrize("switches,weighted_task,weighted_aux,task_on,aux_on,cafd_on", [
    (dict(), True, True, True, True, True),
    (dict(use_mar=False), False, False, True, True, True),
    (dict(mar_on_task=False), False, True, True, True, True),
    (dict(mar_on_aux=False), True, False, True, True, True),
    (dict(use_task=False), True, True, False, True, True),
    (dict(use_aux=False), True, True, True, False, True),
    (dict(use_cafd=False), True, True, True, True, False),
])
def test_ablation_switches(switches, weighted_task, weighted_aux, task_on, aux_on, cafd_on):
  student, teacher, labels, combos = outputs("regression", seed=3)
  start = memory(seed=4)
  loss, _, _ = cmad.student_objective(student, teacher, labels, combos, start,
                                      task="regression", loss_config=loss_config(**switches))
  y = np.asarray(labels, np.float64)
  y_s = np.asarray(student["output"], np.float64)
  y_t = np.asarray(teacher["output"], np.float64)
  psi = np.asarray(start["weights"])[np.asarray(combos)]
  task = np.mean((psi if weighted_task else 1.0) * np.abs(y - y_s))
  aux = np.mean((psi if weighted_aux else 1.0) * (y_s - y_t) ** 2)
  expected = (task * task_on + 0.7 * aux * aux_on
              + 0.4 * np_cafd(student["embedding"], teacher["embedding"], 0.5) * cafd_on)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_student_difficulty_variant_accumulates_student_loss():
  student, teacher, labels, combos = outputs("regression")
  start = memory()
  _, _, new = cmad.student_objective(student, teacher, labels, combos, start, task="regression",
                                     loss_config=loss_config(mar_difficulty="student"))
  student_loss = np.abs(np.asarray(labels) - np.asarray(student["output"]))
  np.testing.assert_allclose(new["sums"] - start["sums"],
                             np.bincount(combos, weights=student_loss, minlength=7), rtol=1e-5)


def test_gradients_are_finite_and_teacher_gets_none():
  student, teacher, labels, combos = outputs("regression")

  def loss(student_out, teacher_out):
    return cmad.student_objective(student_out, teacher_out, labels, combos, memory(),
                                  task="regression", loss_config=loss_config())[0]

  grad_student, grad_teacher = jax.grad(loss, argnums=(0, 1))(student, teacher)
  chex.assert_tree_all_finite(grad_student)
  assert float(jnp.abs(grad_student["embedding"]).sum()) > 0
  for leaf in jax.tree.leaves(grad_teacher):
    np.testing.assert_array_equal(leaf, 0.0)


# ----------------------------------------------------------------------------- MAR epochs


def test_mar_weights_are_fixed_after_epoch_g_only():
  sums = np.array([0.0, 4.0, 6.0, 1.0, 0.0, 9.0, 2.0], np.float32)
  counts = np.array([5, 4, 3, 2, 0, 3, 4], np.float32)
  state = {"mar": {"sums": jnp.asarray(sums), "counts": jnp.asarray(counts),
                   "weights": jnp.ones(7), "fixed": jnp.asarray(False)}}
  end_epoch = jax.jit(lambda s, e: cmad.finalize_mar_if_due(s, e, mar_epochs=3, rho=20.0))
  for epoch in (0, 1):  # epochs 1 and 2 of G = 3: still accumulating
    unchanged = end_epoch(state, jnp.int32(epoch))
    np.testing.assert_array_equal(unchanged["mar"]["weights"], 1.0)
    assert not bool(unchanged["mar"]["fixed"])
  done = end_epoch(state, jnp.int32(2))
  mean = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)  # Eq. 9 (unseen -> 0)
  np.testing.assert_allclose(done["mar"]["weights"], 20.0 * (mean / mean.max()) ** 2, rtol=1e-6)
  assert bool(done["mar"]["fixed"])
  # Once fixed, later epochs (and later statistics) leave the weights alone.
  later = dict(done, mar=dict(done["mar"], sums=done["mar"]["sums"] * 0 + 1.0))
  np.testing.assert_array_equal(end_epoch(later, jnp.int32(7))["mar"]["weights"],
                                done["mar"]["weights"])


def test_configs():
  mosei, iemocap = load_config("cmad_mosei.py", ""), load_config("cmad_iemocap.py", "")
  np.testing.assert_allclose(mosei.missing.probs, np.array([2, 3, 3, 1, 1, 3, 1]) / 14)
  assert (mosei.model.width, mosei.loss.mar_epochs, mosei.loss.cafd_weight, mosei.loss.phi,
          mosei.train.batch_size, mosei.train.learning_rate) == (96, 20, 0.1, 7.0, 128, 2e-5)
  # The official training (README commands, train_teacher_model.py, stu_config_mosei.py).
  assert (mosei.teacher.num_epochs, mosei.train.num_epochs, mosei.teacher.grad_clip,
          mosei.train.grad_clip, mosei.train.weight_decay, mosei.train.schedule) == (
              80, 80, 1.0, 0.0, 1e-4, "constant")
  assert (mosei.model.text_encoder, mosei.model.student_train_mode,
          mosei.model.absent_modality) == ("bert", False, "zero")
  assert (mosei.model.fusion_dropout, mosei.model.fused_dropout,
          mosei.model.perceiver_dropout) == (0.1, 0.3, 0.0)
  assert (mosei.train.selection_metric, mosei.train.selection_scenarios) == ("f1_non0", "full")
  assert load_config("cmad_mosei.py", "synthetic").model.text_encoder == "features"
  teacher, student = cmad.build(load_config(), tiny_spec())
  assert (teacher.grad_clip, student.grad_clip) == (1.0, None)
  assert (iemocap.data.task, iemocap.model.width, iemocap.loss.mar_epochs,
          iemocap.loss.aux_weight, iemocap.loss.dkd_alpha, iemocap.train.optimizer) == (
              "multilabel_binary", 30, 10, 0.7, 0.9, "adam")
  config = load_config()
  config.loss.mar_epochs = 0
  with pytest.raises(ValueError, match="mar_epochs"):
    cmad.build(config, tiny_spec())


def parse_command_line(*overrides, name="cmad_mosei.py:tiny"):
  """The config `python -m mer_jax.train --config configs/NAME ...overrides` would run."""
  return parse_flags(f"--config={os.path.join(REPO, 'configs', name)}", *overrides)


def test_official_student_has_the_official_parameter_count():
  """The official student (YetZzzzzz/CMAD student_model.py) has 7,437,569 parameters
  besides BERT (docs/methods.md) and BERT-base without pooler 108,891,648 (`BERT_TM`
  builds none); counted from shapes only."""
  config = load_config("cmad_mosei.py", "")
  config.model.text_encoder = "features"  # the same network; BERT added below, no folder
  spec = DataSpec("mosei", "regression", 1, dims=(768, 74, 35), lengths=(50, 50, 50))
  encoder = bert.BertModel(bert.BertConfig(), use_pooler=False)  # bert-base-uncased
  stage = text_encoder.with_text_encoder(cmad.build(config, spec)[1], encoder,
                                         bert.SpecialTokens())
  batch = random_batch(spec, batch_size=2)
  batch.update(text_ids=np.ones((2, 50), np.int32), text_segments=np.zeros((2, 50), np.int32))
  params = jax.eval_shape(lambda: stage.model.init(
      {"params": jax.random.key(0)}, batch, train=False)["params"])
  assert text_encoder.parameter_counts(params) == {
      "num_params": 7_437_569 + 108_891_648, "num_params_text_encoder": 108_891_648,
      "num_params_without_text_encoder": 7_437_569}
  # Scanned layers (`model.scan=True`; unrolled by default): the array count does not
  # grow with the Perceiver depth.
  def arrays(**fields):
    return len(jax.tree.leaves(jax.eval_shape(lambda: cmad.build_model(
        dict_override(config, scan=True, **fields), spec).init(
            {"params": jax.random.key(0)}, random_batch(spec, 2), train=False)["params"])))

  assert arrays(perceiver_depth=9) == arrays()


def dict_override(config, **model_fields):
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.update(model_fields)
  return config


def test_real_config_without_bert_folder_stops_before_loading_data(tmp_path, monkeypatch):
  config = load_config("cmad_mosei.py", "")
  config.data.dir = str(tmp_path / "no_data_here")
  monkeypatch.setattr(pipeline, "load_data", lambda *_: pytest.fail("data were loaded"))
  with pytest.raises(ValueError) as error:
    train.run(config, str(tmp_path / "run"))
  message = str(error.value)
  for part in ("config.model.text_encoder_path", "config.json", "model.safetensors",
               "--config.model.text_encoder=features", "not the papers'"):
    assert part in message, part


@pytest.mark.parametrize("mode", ["mse_only", "sim_only", "correlation"])
def test_cafd_mode_from_the_command_line(mode):
  config = parse_command_line(f"--config.loss.cafd_mode={mode}")
  assert config.loss.cafd_mode == mode
  student, teacher, labels, combos = outputs("regression", seed=5)
  loss, metrics, _ = cmad.student_objective(student, teacher, labels, combos, memory(),
                                            task="regression", loss_config=config.loss)
  s, t = (np.asarray(o["embedding"], np.float64) for o in (student, teacher))
  expected = {"mse_only": np.mean((s - t) ** 2), "sim_only": np_cafd_similarity(s, t, 0.2),
              "correlation": np_correlation_transfer(s, t, 0.2)}[mode]
  np.testing.assert_allclose(metrics["loss_cafd"], expected, rtol=1e-5)
  bad = parse_command_line("--config.loss.cafd_mode=weighted")
  with pytest.raises(ValueError, match="config.loss.cafd_mode"):
    cmad.build(bad, tiny_spec())


@pytest.mark.slow
def test_student_trains_deterministically_as_the_official_student():
  """With student_train_mode False the student's training loss does not depend on the
  dropout rates (the frozen teacher is deterministic anyway); with True it does."""
  spec = tiny_spec()
  batch = random_batch(spec, batch_size=6, seed=3)
  losses = {}
  for train_mode, rate in ((False, 0.0), (False, 0.9), (True, 0.9)):
    config = load_config()
    config.model.update(student_train_mode=train_mode, fused_dropout=rate, fusion_dropout=rate)
    _, student = cmad.build(config, spec)
    params = jax.eval_shape(lambda s=student: s.model.init(
        {"params": jax.random.key(0)}, batch, train=False)["params"])
    params = jax.tree.map(lambda leaf: jnp.full(leaf.shape, 0.05, leaf.dtype), params)
    loss, _ = jax.jit(lambda p, s=student: s.loss_fn(
        p, s.init_state(), batch, jax.random.key(7), StageContext(frozen=p)))(params)
    losses[train_mode, rate] = float(loss)
  assert losses[False, 0.0] == pytest.approx(losses[False, 0.9], rel=1e-6)
  assert losses[False, 0.0] != pytest.approx(losses[True, 0.9], rel=1e-3)


# ----------------------------------------------------------------------------- training


def read_log(workdir):
  with open(os.path.join(workdir, "log.jsonl")) as f:
    return [json.loads(line) for line in f]


def epoch_records(workdir, stage):
  return [r for r in read_log(workdir) if r.get("stage") == stage and "val/loss" in r]


def student_memory(workdir, config):
  splits, spec = pipeline.load_data(config.data)
  example = {k: v[:2] for k, v in pipeline.device_arrays(splits["test"]).items()}
  _, student = build_stages(config, spec)
  _, method_state, epoch = load_stage_params(workdir, student, example, checkpoint="latest")
  return jax.tree.map(np.asarray, method_state["mar"]), epoch


@pytest.mark.slow
def test_two_stage_run_reuses_teacher_and_keeps_mar_memory(tmp_path):
  workdir = str(tmp_path)
  config = load_config()  # teacher 1 epoch, student 2 epochs, G = 1
  config.eval.frame_rates = ()
  train.run(config, workdir)
  for stage in ("teacher", "student"):
    assert os.listdir(os.path.join(workdir, "checkpoints", stage, "latest"))
  for path in ("eval/results.json", "eval/teacher/results.json", "eval/comparison.json"):
    assert os.path.exists(os.path.join(workdir, path)), path
  assert len(epoch_records(workdir, "teacher")) == 1

  mar, epoch = student_memory(workdir, config)
  assert epoch == 2 and bool(mar["fixed"])
  steps_per_epoch = config.data.num_train // config.train.batch_size
  # Accumulated during epoch 1 only (G = 1), then fixed.
  np.testing.assert_allclose(mar["counts"].sum(), steps_per_epoch * config.train.batch_size)
  mean = np.where(mar["counts"] > 0, mar["sums"] / np.maximum(mar["counts"], 1), 0.0)
  np.testing.assert_allclose(mar["weights"], config.loss.mar_rho * (mean / mean.max()) ** 2,
                             rtol=1e-5)
  records = epoch_records(workdir, "student")
  assert [r["train/mar_fixed"] for r in records] == [0.0, 1.0]

  config = load_config()
  config.eval.frame_rates = ()
  config.train.num_epochs = 3  # one more student epoch; the teacher is done
  train.run(config, workdir)
  assert len(epoch_records(workdir, "teacher")) == 1  # not trained again
  assert [r["epoch"] for r in epoch_records(workdir, "student")] == [1, 2, 3]
  resumed = [r for r in read_log(workdir) if r.get("event") == "resume"]
  assert {r["stage"] for r in resumed} == {"teacher", "student"}
  again, epoch = student_memory(workdir, config)
  assert epoch == 3
  chex.assert_trees_all_close(again, mar)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cmad", "mcur"])
def test_teacher_outputs_computed_once_equal_the_per_step_teacher(method):
  """The trainer's teacher cache (`trainer.teacher_outputs`, the default) gives the
  student's loss and logged terms of the per-step teacher forward (`cache_teacher=False`);
  the teacher gets no gradient either way."""
  config = load_config(f"{method}_mosei.py")
  spec = tiny_spec()
  split = random_batch(spec, batch_size=12, seed=6)
  teacher, student = build_stages(config, spec)
  assert student.teacher_forward is not None and teacher.teacher_forward is None
  batcher = pipeline.Batcher(split, 4, parallel.make_mesh(1), on_device=True)
  params = jax.eval_shape(lambda: student.model.init(
      {"params": jax.random.key(0)}, split, train=False)["params"])
  rng = np.random.default_rng(0)
  frozen, params = (jax.tree.map(lambda leaf: jnp.asarray(
      0.2 * rng.normal(size=leaf.shape), leaf.dtype), params) for _ in range(2))
  context = StageContext(frozen=frozen, frozen_state=teacher.init_state())
  cached = dataclasses.replace(context, teacher_outputs=trainer.teacher_outputs(
      student, context, batcher))
  chex.assert_shape(cached.teacher_outputs["embedding"], (12, config.model.width))
  batch = batcher.batch(batcher.epoch_rows(seed=3, epoch=1)[0])  # shuffled rows

  def loss_and_metrics(ctx):
    return jax.jit(lambda p: student.loss_fn(p, student.init_state(), batch,
                                             jax.random.key(1), ctx)[:2])(params)

  chex.assert_trees_all_close(loss_and_metrics(cached), loss_and_metrics(context), rtol=1e-5,
                              atol=1e-6)
