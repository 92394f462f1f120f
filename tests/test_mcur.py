"""MCUR: model shapes, the teacher and student objectives against numpy, the ablation
switches, the frozen teacher, and a two-stage multilabel-binary run through train.run."""

import importlib.util
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from helpers import parse_flags, random_batch, tiny_spec

from mer_jax import train
from mer_jax.data.spec import DataSpec
from mer_jax.losses import infonce, mcb_contrastive
from mer_jax.methods import mcur, text_encoder
from mer_jax.nn import bert


def load_config(name, arg="tiny"):
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, "configs", name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def loss_config(**overrides):
  config = mcur.base_config().loss
  config.update(dict(cl_weight=0.3, sugr_weight=2.0, vib_beta=0.05, mse_weight=1.0,
                     temperature=0.5, dkd_alpha=0.3))
  config.update(overrides)
  return config


def outputs(task, batch_size=6, width=4, seed=0, num_classes=3):
  rng = np.random.default_rng(seed)
  shape = {"regression": (batch_size,), "classification": (batch_size, num_classes),
           "multilabel_binary": (batch_size, num_classes, 2)}[task]

  def one():
    return {"output": jnp.asarray(rng.normal(size=shape), jnp.float32),
            "embedding": jnp.asarray(rng.normal(size=(batch_size, width)), jnp.float32),
            "mu": jnp.asarray(rng.normal(size=(batch_size, width)), jnp.float32),
            "sigma": jnp.asarray(rng.uniform(0.2, 1.5, (batch_size, width)), jnp.float32)}

  if task == "regression":
    labels = rng.uniform(-3, 3, batch_size).astype(np.float32)
  elif task == "classification":
    labels = rng.integers(0, num_classes, batch_size).astype(np.int32)
  else:
    labels = rng.integers(0, 2, (batch_size, num_classes)).astype(np.int32)
  combos = rng.integers(0, 7, batch_size).astype(np.int32)
  return one(), one(), jnp.asarray(labels), jnp.asarray(combos)


def np_kl(out):
  mu, sigma = np.asarray(out["mu"], np.float64), np.asarray(out["sigma"], np.float64)
  return 0.5 * np.mean(mu**2 + sigma**2 - 2 * np.log(sigma) - 1)


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_entropy_and_ce(logits, labels):
  """Entropy and cross-entropy per row: (B,), or (B, K) with one row per emotion."""
  log_p = np_log_softmax(logits)
  entropy = -(np.exp(log_p) * log_p).sum(-1)
  ce = -np.take_along_axis(log_p, np.asarray(labels)[..., None], -1)[..., 0]
  return entropy, ce


# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize("task,shape", [("regression", ()), ("classification", (4,)),
                                        ("multilabel_binary", (4, 2))])
def test_model_output_shapes(task, shape):
  config = load_config("mcur_mosei.py")
  spec = tiny_spec(task)
  teacher, student = mcur.build(config, spec)
  batch = random_batch(spec, batch_size=5)
  keys = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  params = jax.eval_shape(lambda: teacher.model.init(keys, batch, train=False)["params"])
  width = config.model.width
  for train_mode in (False, True):
    out = jax.eval_shape(lambda p, t=train_mode: student.model.apply(
        {"params": p}, batch, train=t, rngs={"dropout": jax.random.key(2)}), params)
    chex.assert_shape(out["output"], (5,) + shape)
    chex.assert_shape([out["embedding"], out["mu"], out["sigma"]], (5, width))
  assert (teacher.name, student.name) == ("teacher", "student")
  assert not teacher.trained_with_missing and student.trained_with_missing
  assert (teacher.num_epochs, student.num_epochs) == (config.teacher.num_epochs,
                                                      config.train.num_epochs)


# ----------------------------------------------------------------------------- objectives


def test_teacher_objective_is_mae_plus_beta_kl():
  out, _, labels, _ = outputs("regression")
  config = loss_config()
  loss, metrics = mcur.teacher_objective(out, labels, task="regression", loss_config=config)
  expected = np.mean(np.abs(np.asarray(labels) - np.asarray(out["output"]))) + 0.05 * np_kl(out)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_kl"], np_kl(out), rtol=1e-5)


@pytest.mark.parametrize("use_uncertainty", [True, False])
@pytest.mark.parametrize("use_logits", [True, False])
@pytest.mark.parametrize("use_mse", [True, False])
def test_regression_student_objective_matches_numpy(use_uncertainty, use_logits, use_mse):
  student, teacher, labels, combos = outputs("regression")
  config = loss_config(use_cl=False, use_uncertainty=use_uncertainty, use_logits=use_logits,
                       use_mse=use_mse)
  loss, metrics = mcur.student_objective(student, teacher, labels, combos, task="regression",
                                         loss_config=config, key=jax.random.key(0))
  y = np.asarray(labels, np.float64)
  y_s = np.asarray(student["output"], np.float64)
  y_t = np.asarray(teacher["output"], np.float64)
  weight = np.abs((y - y_t) ** 2 - (y - y_s) ** 2) if use_uncertainty else 1.0  # Eq. 8-9
  logits_term = (y_s - y_t) ** 2 if use_logits else 0.0  # Eq. 10
  sugr = np.mean(weight * (np.abs(y - y_s) + logits_term))  # Eq. 12, 14
  mse = np.mean((np.asarray(student["embedding"]) - np.asarray(teacher["embedding"])) ** 2)
  expected = (mse if use_mse else 0.0) + 2.0 * sugr + 0.05 * np_kl(student)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_sugr"], sugr, rtol=1e-5)
  assert float(metrics["loss_cl"]) == 0.0


@pytest.mark.parametrize("task", ["classification", "multilabel_binary"])
def test_classification_student_objective_without_logits_term_matches_numpy(task):
  student, teacher, labels, combos = outputs(task)
  config = loss_config(use_cl=False, use_logits=False)
  loss, _ = mcur.student_objective(student, teacher, labels, combos, task=task,
                                   loss_config=config, key=jax.random.key(0))
  h_s, ce_s = np_entropy_and_ce(student["output"], labels)
  h_t, _ = np_entropy_and_ce(teacher["output"], labels)
  mse = np.mean((np.asarray(student["embedding"]) - np.asarray(teacher["embedding"])) ** 2)
  # SUGR per row (per emotion for multilabel), rows averaged: the mean over every row.
  expected = mse + 2.0 * np.mean(np.abs(h_t - h_s) * ce_s) + 0.05 * np_kl(student)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_contrastive_term_uses_sign_categories_and_combinations():
  student, teacher, labels, combos = outputs("regression", batch_size=10)
  key = jax.random.key(0)
  without, _ = mcur.student_objective(student, teacher, labels, combos, task="regression",
                                      loss_config=loss_config(use_cl=False), key=key)
  with_cl, metrics = mcur.student_objective(student, teacher, labels, combos, task="regression",
                                            loss_config=loss_config(), key=key)
  categories = (np.asarray(labels) >= 0).astype(np.int32)  # MOSEI: negative / non-negative
  cl = mcb_contrastive(student["embedding"], categories, combos, temperature=0.5)
  np.testing.assert_allclose(metrics["loss_cl"], cl, rtol=1e-5)
  np.testing.assert_allclose(with_cl - without, 0.3 * cl, rtol=1e-4, atol=1e-6)

  # Table 3 "traditional CL": the student's embedding against the teacher's of the sample.
  _, metrics = mcur.student_objective(student, teacher, labels, combos, task="regression",
                                      loss_config=loss_config(contrastive="infonce"), key=key)
  np.testing.assert_allclose(metrics["loss_cl"],
                             infonce(student["embedding"], teacher["embedding"],
                                     temperature=0.5), rtol=1e-5)


@pytest.mark.parametrize("task", ["regression", "classification", "multilabel_binary"])
def test_teacher_outputs_get_no_gradient_and_student_gradients_are_finite(task):
  student, teacher, labels, combos = outputs(task)

  def loss(student_out, teacher_out):
    return mcur.student_objective(student_out, teacher_out, labels, combos, task=task,
                                  loss_config=loss_config(contrastive="one_instance"),
                                  key=jax.random.key(3))[0]

  grad_student, grad_teacher = jax.grad(loss, argnums=(0, 1))(student, teacher)
  chex.assert_tree_all_finite(grad_student)
  assert float(jnp.abs(grad_student["embedding"]).sum()) > 0
  assert float(jnp.abs(grad_student["output"]).sum()) > 0
  for leaf in jax.tree.leaves(grad_teacher):
    np.testing.assert_array_equal(leaf, 0.0)


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["mcur_mosi.py", "mcur_mosei.py", "mcur_iemocap.py"])
def test_configs_carry_every_ablation_switch(name):
  config = load_config(name, "")
  for field in ("use_cl", "use_mse", "use_uncertainty", "use_logits", "contrastive", "cl_weight",
                "sugr_weight", "vib_beta", "mu1", "mu2", "temperature", "dkd_alpha"):
    assert field in config.loss, field
  assert config.teacher.missing.kind == "none"
  assert config.missing.kind == "drop"
  np.testing.assert_allclose(config.missing.probs, [1 / 7] * 7)
  if name == "mcur_iemocap.py":
    assert config.data.task == "multilabel_binary" and config.train.optimizer == "adam"
    assert (config.loss.cl_weight, config.loss.sugr_weight) == (0.1, 100.0)
  else:
    assert config.data.task == "regression" and config.train.optimizer == "adamw"


def test_teacher_variants_of_table_14_build():
  spec = tiny_spec("regression")
  for kind, field, value in (("noise", "noise_intensity", 5.0), ("random_mr", "missing_rate", 0.3),
                             ("drop", "probs", (8, 1, 1, 1, 1, 1, 1))):
    config = load_config("mcur_mosei.py")
    config.teacher.missing.kind = kind
    config.teacher.missing[field] = value
    teacher, _ = mcur.build(config, spec)
    assert teacher.trained_with_missing == (kind != "noise")
  config = load_config("mcur_mosei.py")
  config.loss.contrastive = "simclr"
  with pytest.raises(ValueError, match="contrastive"):
    mcur.build(config, spec)


def parse_command_line(*overrides, name="mcur_mosei.py:tiny"):
  """The config `python -m mer_jax.train --config configs/NAME ...overrides` would run."""
  return parse_flags(f"--config={os.path.join(REPO, 'configs', name)}", *overrides)


# Table 9 (A.5.3) and the datasets' widths; BERT-base without pooler (108,891,648) counted
# for MOSI and MOSEI, GloVe features for IEMOCAP.
TABLE_9 = {"mcur_mosi.py": (112_627_841, (768, 5, 20), "regression", 1),
           "mcur_mosei.py": (116_421_953, (768, 74, 35), "regression", 1),
           "mcur_iemocap.py": (624_654, (300, 74, 35), "multilabel_binary", 4)}


@pytest.mark.parametrize("name", sorted(TABLE_9))
def test_parameter_counts_match_table_9(name):
  published, dims, task, classes = TABLE_9[name]
  config = load_config(name, "")
  bert_params = 0
  if config.model.text_encoder == "bert":
    encoder = bert.BertModel(bert.BertConfig(), use_pooler=False)  # bert-base-uncased
    bert_params = text_encoder.parameter_counts(jax.eval_shape(lambda: encoder.init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool))["params"]))[
            "num_params"]
    assert bert_params == 108_891_648
    config.model.text_encoder = "features"
  spec = DataSpec(name, task, classes, dims=dims, lengths=(20, 20, 20))
  model = mcur.build_model(config, spec)
  params = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)},
                                             random_batch(spec, 2), train=False)["params"])
  total = text_encoder.parameter_counts(params)["num_params"] + bert_params
  assert abs(total - published) <= 0.01 * published, (total, published)
  # The derivation of docs/methods.md: exactly D^2 - D above the published count.
  width = config.model.width
  assert total - published == width * width - width


def test_ungated_task_term_and_detached_sugr_weight_from_the_command_line():
  config = parse_command_line("--config.loss.task_weight=0.5",
                              "--config.loss.sugr_detach_weight=True")
  assert (config.loss.task_weight, config.loss.sugr_detach_weight) == (0.5, True)
  student, teacher, labels, combos = outputs("regression", seed=4)
  key = jax.random.key(0)
  plain = loss_config(use_cl=False)
  gated = loss_config(use_cl=False, task_weight=0.5, sugr_detach_weight=True)
  base, _ = mcur.student_objective(student, teacher, labels, combos, task="regression",
                                   loss_config=plain, key=key)
  loss, metrics = mcur.student_objective(student, teacher, labels, combos, task="regression",
                                         loss_config=gated, key=key)
  task = np.mean(np.abs(np.asarray(labels, np.float64) - np.asarray(student["output"])))
  np.testing.assert_allclose(loss - base, 0.5 * task, rtol=1e-4)
  np.testing.assert_allclose(metrics["loss_task"], task, rtol=1e-5)

  def grad(cfg):
    return jax.grad(lambda out: mcur.student_objective(
        dict(student, output=out), teacher, labels, combos, task="regression",
        loss_config=cfg, key=key)[0])(student["output"])

  y, y_s, y_t = (np.asarray(a, np.float64) for a in (labels, student["output"],
                                                     teacher["output"]))
  weight = np.abs((y - y_t) ** 2 - (y - y_s) ** 2)
  detached = loss_config(use_cl=False, sugr_detach_weight=True)
  np.testing.assert_allclose(grad(detached), 2.0 * weight * (-np.sign(y - y_s) + 2 * (y_s - y_t))
                             / len(y), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def iemocap_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("mcur_iemocap_tiny"))
  config = load_config("mcur_iemocap.py")
  config.eval.frame_rates = ()
  results = train.run(config, workdir)
  return workdir, results


@pytest.mark.xdist_group("mcur_iemocap")  # with its module fixture, on one worker
def test_two_stage_multilabel_run_writes_teacher_student_and_comparison(iemocap_run):
  workdir, results = iemocap_run
  for stage in ("teacher", "student"):
    for kind in ("latest", "best"):
      assert os.listdir(os.path.join(workdir, "checkpoints", stage, kind)), (stage, kind)
  for path in ("eval/results.json", "eval/teacher/results.json", "eval/comparison.json",
               "eval/comparison.csv", "eval/comparison.png", "eval/teacher/robustness.png"):
    assert os.path.exists(os.path.join(workdir, path)), path
  emotions = ("neutral", "happy", "sad", "angry")
  for row in (results["LAV"], results["MR0.7"]):
    accs = [row[f"acc_{e}"] for e in emotions]
    np.testing.assert_allclose(row["acc"], np.mean(accs), rtol=1e-9)
    np.testing.assert_allclose(row["f1"], np.mean([row[f"f1_{e}"] for e in emotions]),
                               rtol=1e-9)
    assert {"brier", "nll"} <= set(row)

  with open(os.path.join(workdir, "eval", "comparison.json")) as f:
    comparison = json.load(f)
  with open(os.path.join(workdir, "eval", "teacher", "results.json")) as f:
    teacher_results = json.load(f)
  assert comparison["stages"] == ["teacher", "student"]
  assert comparison["scenarios"] == ["L", "A", "V", "LA", "LV", "AV", "LAV", "MR0.3", "MR0.7"]
  for stage, source in (("teacher", teacher_results), ("student", results)):
    expected = np.mean([source[s]["acc"] for s in comparison["scenarios"]])
    np.testing.assert_allclose(comparison["average"][stage]["acc"], expected, rtol=1e-9)
  gap = comparison["lang_dom_gap"]
  np.testing.assert_allclose(comparison["bias_amp"]["f1"],
                             gap["student"]["f1"] / (gap["teacher"]["f1"] + 1e-8), rtol=1e-9)
  student_records = [r for r in read_log(workdir) if r.get("stage") == "student" and
                     "val/loss" in r]
  assert len(student_records) == 2
  for name in ("loss_cl", "loss_mse", "loss_sugr", "loss_kl"):
    assert np.isfinite(student_records[-1][f"train/{name}"])


def read_log(workdir):
  with open(os.path.join(workdir, "log.jsonl")) as f:
    return [json.loads(line) for line in f]

