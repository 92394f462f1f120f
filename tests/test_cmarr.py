"""CM-ARR: shapes, the missing-input guarantee, Eq. 7-8 wiring, loss terms against numpy,
training lowers every loss term, and a tiny end-to-end cross-validation run."""

import functools
import importlib.util
import json
import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import REPO
from helpers import random_batch, tiny_spec

from mer_jax import crossval
from mer_jax.data import missing, synthetic
from mer_jax.methods import cmarr
from mer_jax.methods.base import StageContext
from mer_jax.nn.flows import NormalizingFlow
from mer_jax.nn.reconstruction import RCABStack

MODALITIES = ("text", "audio", "vision")
WIDTH = 16


def tiny_config(**loss_overrides):
  config = ml_collections.ConfigDict()
  config.method = "cmarr"
  config.model = dict(
      width=WIDTH, common_length=0, kernel_sizes=(3, 1, 1), umc_dim=8, umc_heads=2,
      umc_mlp_dim=16, flow_layers=2, flow_hidden=16, flow_scale=2.0, rcab_blocks=1,
      rcab_features=16, rcab_kernel=3, rcab_reduction=4, fusion_layers=1, fusion_heads=2,
      fusion_mlp_dim=32, dropout=0.0, head_hidden=16, udcl_init_scale=1.0,
      udcl_init_temperature=0.0)
  config.loss = dict(udcl_weight=1.0, spcl_weight=0.1, rec_weight=10.0, flow_weight=0.1,
                     udcl_kind="distribution", spcl_temperature=0.1, rec_stop_gradient=True,
                     regression_loss="l1")
  config.loss.update(loss_overrides)
  config.train = dict(num_epochs=1)
  config.missing = dict(kind="drop", probs=(1 / 6,) * 6 + (0.0,))
  return config


def build(task="classification", **kwargs):
  spec = tiny_spec(task, **kwargs)
  (stage,) = cmarr.build(tiny_config(), spec)
  return spec, stage


def init(stage, batch, seed=0):
  return jax.jit(lambda key, b: stage.model.init({"params": key}, b, train=False)["params"])(
      jax.random.key(seed), batch)


@functools.cache
def classifier():
  """(spec, params, jitted apply(params, batch)) shared by the tests below: compiled once
  for batches of 4."""
  spec, stage = build("classification")
  params = init(stage, random_batch(spec, batch_size=4))
  return spec, params, jax.jit(lambda p, b: stage.model.apply({"params": p}, b, train=False))


def _check_shapes(out, batch_size, shape, length):
  chex.assert_shape(out["output"], (batch_size,) + shape)
  chex.assert_shape(out["embedding"], (batch_size, 2 * WIDTH))
  chex.assert_shape([out["projected"], out["reconstructed"], out["completed"]],
                    (batch_size, 3, length, WIDTH))
  chex.assert_shape([out["frame_mask"], out["reconstructed_mask"], out["completed_mask"]],
                    (batch_size, 3, length))
  chex.assert_shape(out["modality_embedding"], (3, batch_size, WIDTH))
  chex.assert_shape([out["gaussian_mean"], out["gaussian_std"]], (3, batch_size, 8))
  chex.assert_shape(out["flow_nll"], (batch_size, 3))
  chex.assert_shape([out["udcl_scale"], out["udcl_shift"], out["udcl_temperature"]], (3,))


def test_output_values_and_shapes():
  spec, params, apply = classifier()
  batch = random_batch(spec, batch_size=4)
  batch["modality_mask"] = missing.COMBINATIONS[[0, 3, 5, 6]]
  out = apply(params, batch)
  _check_shapes(out, 4, (4,), max(spec.lengths))  # unaligned (6, 5, 4) are brought to 6
  assert (out["udcl_scale"] < 0).all() and (out["udcl_temperature"] > 0).all()
  assert (out["gaussian_std"] > 0).all()
  chex.assert_tree_all_finite(out)


@pytest.mark.parametrize("task,shape", [("regression", ()), ("multilabel_binary", (4, 2))])
def test_output_shapes_per_task(task, shape):
  spec, stage = build(task)
  batch = random_batch(spec, batch_size=3)

  def forward(key, b):
    params = stage.model.init({"params": key}, b, train=False)["params"]
    return stage.model.apply({"params": params}, b, train=False)

  _check_shapes(jax.eval_shape(forward, jax.random.key(0), batch), 3, shape, max(spec.lengths))


@functools.cache
def _prediction_gradient():
  _, _, apply = classifier()
  return jax.jit(jax.grad(lambda p, b, features: jnp.sum(apply(p, dict(b, **features))["output"]),
                          argnums=2))


@pytest.mark.parametrize("combination", range(6))
def test_missing_modality_input_is_never_read(combination):
  """Outputs, reconstructions and the fused representation are identical whatever the
  missing modalities' features and frame masks hold, and their gradient is exactly 0."""
  spec, params, apply = classifier()
  batch = random_batch(spec, batch_size=4, seed=combination)
  present = np.broadcast_to(missing.COMBINATIONS[combination], (4, 3)).copy()
  present[1] = [True, True, False]  # one row with another combination: masking is per sample
  batch["modality_mask"] = present
  rng = np.random.default_rng(7)
  changed = dict(batch)
  for index, name in enumerate(MODALITIES):
    absent = ~present[:, index]
    noise = rng.normal(size=batch[name].shape).astype(np.float32) * 50
    changed[name] = np.where(absent[:, None, None], noise, batch[name])
    changed[f"{name}_mask"] = np.where(absent[:, None], rng.random(batch[f"{name}_mask"].shape)
                                       < 0.5, batch[f"{name}_mask"])
  a, b = apply(params, batch), apply(params, changed)
  for key in ("output", "embedding", "completed", "completed_mask", "modality_embedding"):
    chex.assert_trees_all_close(a[key], b[key], atol=1e-5)
  absent_slots = ~present
  np.testing.assert_allclose(np.asarray(a["reconstructed"])[absent_slots],
                             np.asarray(b["reconstructed"])[absent_slots], atol=1e-5)

  grads = _prediction_gradient()(params, batch, {name: batch[name] for name in MODALITIES})
  for index, name in enumerate(MODALITIES):
    absent = ~present[:, index]
    assert np.all(np.asarray(grads[name])[absent] == 0.0), name
    if present[:, index].any():
      assert np.abs(np.asarray(grads[name])[~absent]).sum() > 0, name


def test_padded_frames_never_change_outputs():
  spec, params, apply = classifier()
  batch = random_batch(spec, batch_size=4, real_lengths=([3, 6, 1, 2], [2, 5, 4, 5],
                                                         [1, 1, 4, 3]))
  batch["modality_mask"] = np.array([[True, False, True], [False, True, True], [True] * 3,
                                     [True, False, False]])
  changed = dict(batch)
  for name in MODALITIES:
    noise = np.random.default_rng(1).normal(size=batch[name].shape).astype(np.float32) * 100
    changed[name] = np.where(batch[f"{name}_mask"][..., None], batch[name], noise)
  a, b = apply(params, batch), apply(params, changed)
  for key in ("output", "embedding", "reconstructed", "completed", "flow_nll", "gaussian_mean"):
    chex.assert_trees_all_close(a[key], b[key], atol=1e-4)


def test_reconstruction_decodes_the_mean_latent_of_present_modalities():
  """Eq. 7-8 rebuilt outside the model: per sample and frame, the mean of the present
  other modalities' flow latents, decoded by the missing modality's inverse flow, then
  the RCAB stack."""
  spec, params, apply = classifier()
  batch = random_batch(spec, batch_size=4, real_lengths=([6, 3, 4, 2], [5, 4, 2, 1],
                                                         [4, 4, 1, 3]))
  # Text missing (A, V present); audio and vision missing; vision missing; text missing.
  present = np.array([[False, True, True], [True, False, False], [True, True, False],
                      [False, True, True]])
  batch["modality_mask"] = present
  out = apply(params, batch)
  projected = np.asarray(out["projected"])
  frame_mask = np.asarray(out["frame_mask"])
  flow = NormalizingFlow(WIDTH, 2, 16, 2.0)
  rcab = RCABStack(1, 16, 3, 4)
  latents = np.stack([np.asarray(flow.apply(
      {"params": params[f"flow_{name}"]}, jnp.asarray(projected[:, i]),
      jnp.asarray(frame_mask[:, i] & present[:, i:i + 1]), method=NormalizingFlow.forward)[0])
      for i, name in enumerate(MODALITIES)], axis=1)
  for b in range(4):
    for m in np.flatnonzero(~present[b]):
      sources = [n for n in range(3) if present[b, n]]
      use = np.stack([frame_mask[b, n] for n in sources])  # (S, T)
      count = use.sum(0)
      mean = sum(np.where(use[k][:, None], latents[b, n], 0.0)
                 for k, n in enumerate(sources)) / np.maximum(count, 1)[:, None]
      covered = count > 0
      decoded = flow.apply({"params": params[f"flow_{MODALITIES[m]}"]}, jnp.asarray(mean[None]),
                           jnp.asarray(covered[None]), method=NormalizingFlow.inverse)
      refined = rcab.apply({"params": params[f"rcab_{MODALITIES[m]}"]}, decoded,
                           jnp.asarray(covered[None]))[0]
      expected = np.where(covered[:, None], refined, 0.0)
      np.testing.assert_allclose(out["reconstructed"][b, m], expected, atol=1e-5)
      np.testing.assert_array_equal(out["reconstructed_mask"][b, m], covered)
      np.testing.assert_allclose(out["completed"][b, m], expected, atol=1e-5)
    for n in np.flatnonzero(present[b]):
      np.testing.assert_allclose(out["completed"][b, n], projected[b, n], atol=1e-6)


def test_reconstruction_error_matches_numpy():
  rng = np.random.default_rng(0)
  rec, proj = rng.normal(size=(2, 4, 3, 5, 6)).astype(np.float32)
  frame_mask = rng.random((4, 3, 5)) < 0.7
  rec_mask = rng.random((4, 3, 5)) < 0.8
  slots = np.array([[True, False, False], [False, True, True], [False] * 3, [True, False, True]])
  out = {"reconstructed": rec, "projected": proj, "frame_mask": frame_mask,
         "reconstructed_mask": rec_mask}
  per_slot = []
  for b, m in zip(*np.nonzero(slots), strict=True):
    frames = frame_mask[b, m] & rec_mask[b, m]
    diff = (rec[b, m] - proj[b, m])[frames]
    per_slot.append(np.mean(diff ** 2) if frames.any() else 0.0)
  np.testing.assert_allclose(cmarr.reconstruction_error(out, slots), np.mean(per_slot),
                             rtol=1e-5)
  assert float(cmarr.reconstruction_error(out, np.zeros_like(slots))) == 0.0


def _numpy_infonce(dist, scale, temperature):
  logits = scale * dist / temperature
  log_rows = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  log_cols = logits - np.log(np.exp(logits).sum(0, keepdims=True))
  return -np.mean(np.diag(log_rows)) - np.mean(np.diag(log_cols))


@pytest.mark.parametrize("kind", ["distribution", "point"])
def test_alignment_loss_matches_numpy(kind):
  rng = np.random.default_rng(1)
  means = rng.normal(size=(3, 5, 4))
  stds = rng.uniform(0.1, 2.0, size=(3, 5, 4))
  scale, temperature = np.array([-0.5, -1.0, -2.0]), np.array([1.0, 2.0, 0.5])
  out = {"gaussian_mean": jnp.asarray(means, jnp.float32),
         "gaussian_std": jnp.asarray(stds, jnp.float32),
         "udcl_scale": jnp.asarray(scale, jnp.float32),
         "udcl_shift": jnp.asarray([3.0, -1.0, 0.2], jnp.float32),
         "udcl_temperature": jnp.asarray(temperature, jnp.float32)}
  expected = 0.0
  for k, (i, j) in enumerate([(0, 1), (0, 2), (1, 2)]):
    dist = ((means[i][:, None] - means[j][None]) ** 2).sum(-1)
    if kind == "distribution":
      dist = dist + ((stds[i][:, None] - stds[j][None]) ** 2).sum(-1)
    expected += _numpy_infonce(dist, scale[k], temperature[k])
  np.testing.assert_allclose(cmarr.alignment_loss(out, kind), expected, rtol=1e-4)


def test_refinement_loss_pools_all_modalities_with_emotion_positives():
  rng = np.random.default_rng(2)
  embeddings = rng.normal(size=(3, 4, 6)).astype(np.float32)
  labels = np.array([0, 1, 0, 2], np.int32)
  x = embeddings.reshape(12, 6)
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  categories = np.tile(labels, 3)
  logits = x @ x.T / 0.1
  losses = []
  for i in range(12):
    others = np.arange(12) != i
    positives = others & (categories == categories[i])
    log_denominator = np.log(np.exp(logits[i][others]).sum())
    losses.append(-np.mean(logits[i][positives] - log_denominator))
  value = cmarr.refinement_loss({"modality_embedding": embeddings}, labels, "classification",
                                temperature=0.1)
  np.testing.assert_allclose(value, np.mean(losses), rtol=1e-5)


def test_training_inputs_keep_real_features_of_removed_modalities():
  spec = tiny_spec("classification")
  batch = {k: jnp.asarray(v) for k, v in random_batch(spec, batch_size=64).items()}
  batch["modality_mask"] = jnp.ones((64, 3), bool).at[0, 2].set(False)  # really absent
  config = tiny_config()
  inputs, slots = cmarr.training_inputs(jax.random.key(3), batch, config.missing)
  present = np.asarray(inputs["modality_mask"])
  ids = np.asarray(missing.combination_ids(present))
  assert set(ids[1:]) <= set(range(6)) and len(set(ids)) == 6  # never full, all six drawn
  np.testing.assert_array_equal(slots, ~present & np.asarray(batch["modality_mask"]))
  assert not slots[0, 2]
  for name in MODALITIES:  # the model gets every real feature; the mask says what is absent
    np.testing.assert_array_equal(inputs[name], batch[name])
    np.testing.assert_array_equal(inputs[f"{name}_mask"], batch[f"{name}_mask"])


def test_total_loss_weights_each_term():
  """L = alpha L_udcl + beta L_spcl + lambda L_rec + L_cls + lambda_flow L_flow with the
  config's weights (alpha = 0 / beta = 0 are the "w/o" ablations)."""
  alpha, beta, lam, lam_flow = 0.5, 0.2, 2.0, 3.0
  spec = tiny_spec("classification")
  (stage,) = cmarr.build(tiny_config(udcl_weight=alpha, spcl_weight=beta, rec_weight=lam,
                                     flow_weight=lam_flow), spec)
  batch = random_batch(spec, batch_size=8)
  loss_fn = jax.jit(lambda p, b, key: stage.loss_fn(p, {}, b, key, StageContext()))
  loss, (terms, _) = loss_fn(init(stage, batch), batch, jax.random.key(0))
  expected = (terms["loss_cls"] + alpha * terms["loss_udcl"] + beta * terms["loss_spcl"]
              + lam * terms["loss_rec"] + lam_flow * terms["loss_flow"])
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert all(float(terms[k]) > 0 for k in ("loss_cls", "loss_udcl", "loss_spcl", "loss_rec"))


def test_training_lowers_every_loss_term():
  """60 Adam steps on 64 synthetic IEMOCAP-shaped samples (4 batches, fixed seed): the
  mean of each term over the last 10 steps is below its mean over the first 10."""
  split = synthetic.generate("iemocap", "train", seed=0, num_samples=64)
  spec = synthetic.spec_for("iemocap")
  (stage,) = cmarr.build(tiny_config(), spec)
  arrays = {k: v for k, v in split.items() if k != "id"}
  batches = [{k: v[i * 16:(i + 1) * 16] for k, v in arrays.items()} for i in range(4)]
  params = init(stage, batches[0])
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch, key):
    (_, (terms, _)), grads = jax.value_and_grad(stage.loss_fn, has_aux=True)(
        params, {}, batch, key, StageContext())
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, terms

  history = []
  for i in range(60):
    params, opt_state, terms = step(params, opt_state, batches[i % 4], jax.random.key(i))
    history.append(jax.device_get(terms))
  for name in ("loss_cls", "loss_udcl", "loss_spcl", "loss_rec", "loss_flow"):
    first = np.mean([h[name] for h in history[:10]])
    last = np.mean([h[name] for h in history[-10:]])
    print(f"{name}: first 10 steps {first:.4f}, last 10 steps {last:.4f}")
    assert np.isfinite(last) and last < first, (name, first, last)


def load_config(name, arg):
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, "configs", name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("name,folds", [("cmarr_iemocap.py", 5), ("cmarr_msp_improv.py", 6)])
def test_configs_carry_the_paper_settings(name, folds):
  for variant in ("", "synthetic", "tiny"):
    config = load_config(name, variant)
    assert config.method == "cmarr" and config.data.task == "classification"
    assert (config.loss.udcl_weight, config.loss.spcl_weight, config.loss.rec_weight,
            config.loss.flow_weight) == (1.0, 0.1, 10.0, 0.1)
    np.testing.assert_allclose(config.missing.probs, [1 / 6] * 6 + [0.0])
  real = load_config(name, "")
  assert real.data.num_folds == folds
  assert (real.train.learning_rate, real.train.batch_size, real.train.num_epochs) == (
      1e-5, 16, 100)


def test_fold_config_selects_the_fold_and_the_synthetic_seed():
  config = load_config("cmarr_iemocap.py", "tiny")
  fold = crossval.fold_config(config, 1)
  assert (fold.data.fold, fold.data.seed) == (1, config.data.seed + 1)
  assert (config.data.fold, config.data.seed) == (0, 0)  # the original is untouched
  with pytest.raises(ValueError, match="outside"):
    crossval.run_folds(config, "/nonexistent", folds=[2])


def test_aggregate_means_and_stds_over_folds():
  rng = np.random.default_rng(0)
  names = list(missing.COMBINATION_NAMES)
  runs = [{n: {"war": float(rng.random()), "uar": float(rng.random())} for n in names}
          for _ in range(3)]
  runs[2]["MR0.3"] = {"war": 0.5}  # a scenario only one fold has is left out
  tables = [crossval.with_incomplete_average(dict(r, summary={"x": 1.0})) for r in runs]
  summary = crossval.aggregate(tables)
  assert set(summary) == set(names) | {"avg_incomplete"}
  for metric in ("war", "uar"):
    values = np.array([[r[n][metric] for n in names] for r in runs])  # (fold, scenario)
    for k, n in enumerate(names):
      np.testing.assert_allclose(summary[n][metric]["mean"], values[:, k].mean())
      np.testing.assert_allclose(summary[n][metric]["std"], values[:, k].std())
    incomplete = values[:, :6].mean(axis=1)
    np.testing.assert_allclose(summary["avg_incomplete"][metric]["folds"], incomplete)
    np.testing.assert_allclose(summary["avg_incomplete"][metric]["mean"], incomplete.mean())


def test_tiny_run_through_crossval_and_train(tmp_path):
  """One :tiny fold end to end, in process: crossval.run_folds -> mer_jax.train.run."""
  workdir = str(tmp_path)
  config = load_config("cmarr_iemocap.py", "tiny")
  report = crossval.run_folds(config, workdir, folds=[0])
  with open(os.path.join(workdir, "crossval.json")) as f:
    assert json.load(f) == json.loads(json.dumps(report))
  fold_dir = os.path.join(workdir, "fold0")
  for path in ("config.json", "log.jsonl", "eval/results.json", "eval/results.csv",
               "eval/robustness.png"):
    assert os.path.exists(os.path.join(fold_dir, path)), path
  with open(os.path.join(fold_dir, "eval", "results.json")) as f:
    results = json.load(f)
  for scenario in missing.COMBINATION_NAMES:
    for metric in ("war", "uar"):
      assert 0.0 <= results[scenario][metric] <= 1.0
      assert report["scenarios"][scenario][metric]["folds"] == [results[scenario][metric]]
  with open(os.path.join(fold_dir, "log.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  steps = [r for r in logged if "train/loss_rec" in r]
  assert steps and all(np.isfinite(r["train/loss"]) for r in steps)
  for term in ("loss_cls", "loss_udcl", "loss_spcl", "loss_flow"):
    assert all(np.isfinite(r[f"train/{term}"]) for r in steps), term
  # Fig. 5 analysis of the trained fold: real vs reconstructed features per modality.
  report = cmarr.write_reconstruction_report(fold_dir, max_points=16)
  assert os.path.exists(os.path.join(fold_dir, "eval", "reconstruction_tsne.png"))
  with open(os.path.join(fold_dir, "eval", "reconstruction.json")) as f:
    assert json.load(f) == report
  for name in MODALITIES:
    assert np.isfinite(report[name]["mse"]) and report[name]["mse"] > 0
    assert -1.0 <= report[name]["cosine"] <= 1.0
