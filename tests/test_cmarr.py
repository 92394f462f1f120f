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
from helpers import parse_flags, random_batch, tiny_spec

from mer_jax import crossval
from mer_jax.data import missing, synthetic
from mer_jax.losses import supervised_contrastive
from mer_jax.methods import cmarr
from mer_jax.methods.base import StageContext
from mer_jax.nn.flows import NormalizingFlow
from mer_jax.nn.reconstruction import RCABStack

MODALITIES = ("text", "audio", "vision")
WIDTH = 16


def tiny_config(overrides=None):
  """The :tiny sizes as a ConfigDict; `overrides` {dotted name: value}, e.g.
  {"loss.rec_weight": 2.0}."""
  config = ml_collections.ConfigDict()
  config.method = "cmarr"
  config.model = dict(
      width=WIDTH, common_length=0, kernel_sizes=(3, 1, 1), umc_dim=8, umc_heads=2,
      umc_mlp_dim=16, umc_attention=True, flow_input="aligned", reconstruct=True,
      flow_layers=2, flow_hidden=16, flow_scale=2.0, flow_remat=False, rcab_blocks=1,
      rcab_features=16, rcab_kernel=3, rcab_reduction=4, fusion_layers=1, fusion_heads=2,
      fusion_mlp_dim=32, dropout=0.0, head_hidden=16, udcl_init_scale=1.0,
      udcl_init_temperature=0.0)
  config.loss = dict(udcl_weight=1.0, spcl_weight=0.1, rec_weight=10.0, rec_norm="mean",
                     rec_through_flow=False, flow_weight=0.1, udcl_kind="distribution",
                     spcl_temperature=0.1, rec_stop_gradient=True, regression_loss="l1")
  config.train = dict(num_epochs=1)
  config.missing = dict(kind="drop", probs=(1 / 6,) * 6 + (0.0,))
  for name, value in (overrides or {}).items():
    section, field = name.split(".")
    config[section][field] = value
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


def _check_shapes(out, batch_size, shape, length, task="classification"):
  chex.assert_shape(out["output"], (batch_size,) + shape)
  chex.assert_shape(out["embedding"], (batch_size, 2 * WIDTH))
  chex.assert_shape([out["features"], out["reconstructed"], out["completed"],
                     out["flow_latent"]], (batch_size, 3, length, WIDTH))
  chex.assert_shape([out["frame_mask"], out["reconstructed_mask"], out["completed_mask"]],
                    (batch_size, 3, length))
  chex.assert_shape(out["modality_embedding"], (3, batch_size, WIDTH))
  chex.assert_shape([out["gaussian_mean"], out["gaussian_std"]], (3, batch_size, 8))
  chex.assert_shape(out["flow_logdet"], (batch_size, 3))
  chex.assert_shape([out["prior_mean"], out["prior_log_std"]],
                    (cmarr.num_prior_classes(tiny_spec(task)), WIDTH))
  chex.assert_shape([out["udcl_scale"], out["udcl_shift"], out["udcl_temperature"]], (3,))


@pytest.mark.slow
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

  _check_shapes(jax.eval_shape(forward, jax.random.key(0), batch), 3, shape, max(spec.lengths),
                task)


@functools.cache
def _prediction_gradient():
  _, _, apply = classifier()
  return jax.jit(jax.grad(lambda p, b, features: jnp.sum(apply(p, dict(b, **features))["output"]),
                          argnums=2))


@pytest.mark.parametrize("combination", range(6))
@pytest.mark.slow
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


@pytest.mark.slow
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
  for key in ("output", "embedding", "reconstructed", "completed", "flow_latent", "flow_logdet",
              "gaussian_mean"):
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
  features = np.asarray(out["features"])
  frame_mask = np.asarray(out["frame_mask"])
  flow = NormalizingFlow(WIDTH, 2, 16, 2.0)
  rcab = RCABStack(1, 16, 3, 4)
  latents = np.stack([np.asarray(flow.apply(
      {"params": params[f"flow_{name}"]}, jnp.asarray(features[:, i]),
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
      np.testing.assert_allclose(out["completed"][b, n], features[b, n], atol=1e-6)


@pytest.mark.parametrize("norm", ["mean", "frobenius"])
def test_reconstruction_error_matches_numpy(norm):
  """L_rec per scored slot: the mean (DiCMoR's MSE) or the sum (Eq. 9, squared Frobenius)
  of the squared error over real target frames and channels, averaged over the slots."""
  rng = np.random.default_rng(0)
  rec, real = rng.normal(size=(2, 4, 3, 5, 6)).astype(np.float32)
  frame_mask = rng.random((4, 3, 5)) < 0.7
  rec_mask = rng.random((4, 3, 5)) < 0.8
  slots = np.array([[True, False, False], [False, True, True], [False] * 3, [True, False, True]])
  out = {"reconstructed": rec, "features": real, "frame_mask": frame_mask,
         "reconstructed_mask": rec_mask}
  per_slot = []
  for b, m in zip(*np.nonzero(slots), strict=True):
    frames = frame_mask[b, m] & rec_mask[b, m]
    diff = (rec[b, m] - real[b, m])[frames]
    if norm == "frobenius":
      per_slot.append(np.linalg.norm(diff, "fro") ** 2 if frames.any() else 0.0)
    else:
      per_slot.append(np.mean(diff ** 2) if frames.any() else 0.0)
  np.testing.assert_allclose(cmarr.reconstruction_error(out, slots, norm), np.mean(per_slot),
                             rtol=1e-5)
  assert float(cmarr.reconstruction_error(out, np.zeros_like(slots), norm)) == 0.0
  with pytest.raises(ValueError, match="rec_norm"):
    cmarr.reconstruction_error(out, slots, "l1")


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


def test_refinement_loss_positives_are_other_modalities_of_other_samples():
  """Sec. 3.3.1 against a numpy loop: for (modality m, sample i) the candidates are the
  other modalities of the other samples, positives those with the same label."""
  rng = np.random.default_rng(2)
  embeddings = rng.normal(size=(3, 5, 6)).astype(np.float32)
  labels = np.array([0, 1, 0, 2, 0], np.int32)
  x = embeddings / np.linalg.norm(embeddings, axis=-1, keepdims=True)
  losses = []
  for m in range(3):
    for i in range(5):
      candidates = [(n, j) for n in range(3) for j in range(5) if n != m and j != i]
      logits = {c: x[m, i] @ x[c] / 0.1 for c in candidates}
      log_denominator = np.log(sum(np.exp(v) for v in logits.values()))
      positives = [c for c in candidates if labels[c[1]] == labels[i]]
      if positives:
        losses.append(-np.mean([logits[c] - log_denominator for c in positives]))
  value = cmarr.refinement_loss({"modality_embedding": embeddings}, labels, "classification",
                                temperature=0.1)
  np.testing.assert_allclose(value, np.mean(losses), rtol=1e-5)
  # Reference check of the difference to plain SupCon over the 3B rows (where
  # same-modality pairs are positives too): the two disagree on these inputs.
  flat = x.reshape(15, 6)
  everything = supervised_contrastive(jnp.asarray(flat), jnp.tile(labels, 3),
                                            temperature=0.1)
  assert abs(float(everything) - float(value)) > 1e-3
  distinct = np.arange(5, dtype=np.int32)  # no two samples share a label: no positive
  assert float(cmarr.refinement_loss({"modality_embedding": embeddings}, distinct,
                                     "classification", temperature=0.1)) == 0.0


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


@pytest.mark.slow
def test_total_loss_weights_each_term():
  """L = alpha L_udcl + beta L_spcl + lambda L_rec + L_cls + lambda_flow L_flow with the
  config's weights (alpha = 0 / beta = 0 are the "w/o" ablations)."""
  alpha, beta, lam, lam_flow = 0.5, 0.2, 2.0, 3.0
  spec = tiny_spec("classification")
  (stage,) = cmarr.build(tiny_config({"loss.udcl_weight": alpha, "loss.spcl_weight": beta,
                                      "loss.rec_weight": lam, "loss.flow_weight": lam_flow}),
                         spec)
  batch = random_batch(spec, batch_size=8)
  loss_fn = jax.jit(lambda p, b, key: stage.loss_fn(p, {}, b, key, StageContext()))
  loss, (terms, _) = loss_fn(init(stage, batch), batch, jax.random.key(0))
  expected = (terms["loss_cls"] + alpha * terms["loss_udcl"] + beta * terms["loss_spcl"]
              + lam * terms["loss_rec"] + lam_flow * terms["loss_flow"])
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert all(float(terms[k]) > 0 for k in ("loss_cls", "loss_udcl", "loss_spcl", "loss_rec"))


TERMS = ("loss_cls", "loss_udcl", "loss_spcl", "loss_rec", "loss_flow")


@functools.cache
def term_gradients(rec_through_flow=False):
  """(params, batch, jitted params -> (terms (5,), per-term gradients)) of the default
  tiny classifier; `rec_through_flow` does not change the parameter tree, so both share
  `classifier()`'s params."""
  spec, params, _ = classifier()
  (stage,) = cmarr.build(tiny_config({"loss.rec_through_flow": rec_through_flow}), spec)
  batch = random_batch(spec, batch_size=8, seed=3)

  def terms(p, b):
    _, (metrics, _) = stage.loss_fn(p, {}, b, jax.random.key(0), StageContext())
    return jnp.stack([metrics[k] for k in TERMS])

  return params, batch, jax.jit(lambda p, b: (terms(p, b), jax.jacrev(terms)(p, b)))


def _grad_norms(grads, term):
  """{top-level module name: |d term / d params| summed} for one loss term."""
  index = TERMS.index(term)
  return {name: float(sum(np.abs(np.asarray(g)[index]).sum() for g in jax.tree.leaves(tree)))
          for name, tree in grads.items()}


@pytest.mark.slow
def test_reconstruction_loss_trains_the_refinement_not_the_flows():
  """Default: decoded features enter RCAB stop-gradient, so L_rec (and L_cls through the
  reconstructions) reach only the RCABs; the flows and the prior learn from L_flow alone.
  rec_through_flow=True restores the path into the flows and the features."""
  params, batch, gradients = term_gradients()
  terms, grads = gradients(params, batch)
  assert float(terms[TERMS.index("loss_rec")]) > 0
  rec = _grad_norms(grads, "loss_rec")
  flow = _grad_norms(grads, "loss_flow")
  cls = _grad_norms(grads, "loss_cls")
  for name in MODALITIES:
    assert rec[f"flow_{name}"] == 0.0 and cls[f"flow_{name}"] == 0.0, name
    assert rec[f"proj_{name}"] == 0.0 and rec[f"umc_{name}"] == 0.0, name  # targets stopped
    assert flow[f"flow_{name}"] > 0 and flow[f"proj_{name}"] == 0.0, name
  assert sum(rec[f"rcab_{name}"] for name in MODALITIES) > 0
  assert rec["prior"] == 0.0 and flow["prior"] > 0

  params, batch, gradients = term_gradients(rec_through_flow=True)
  _, grads = gradients(params, batch)
  rec = _grad_norms(grads, "loss_rec")
  assert all(rec[f"flow_{name}"] > 0 for name in MODALITIES)
  assert sum(rec[f"umc_{name}"] + rec[f"proj_{name}"] for name in MODALITIES) > 0


@pytest.mark.slow
def test_flow_likelihood_is_the_class_prior_shared_by_all_modalities():
  """L_flow against numpy: per (sample, modality) slot with real frames, the NLL per
  dimension of the latents under N(mean_y, exp(log_std_y)^2) of the sample's class y
  (one table for all modalities), minus the log-determinant."""
  spec, params, apply = classifier()
  batch = random_batch(spec, batch_size=4, real_lengths=([3, 6, 1, 2], [2, 5, 4, 5],
                                                         [1, 1, 4, 3]))
  out = apply(params, batch)
  rng = np.random.default_rng(4)
  mean = rng.normal(size=(4, WIDTH)).astype(np.float32)
  log_std = rng.normal(scale=0.3, size=(4, WIDTH)).astype(np.float32)
  out = dict(out, prior_mean=jnp.asarray(mean), prior_log_std=jnp.asarray(log_std))
  z = np.asarray(out["flow_latent"], np.float64)
  logdet = np.asarray(out["flow_logdet"], np.float64)
  frame_mask = np.asarray(out["frame_mask"])
  labels = np.array([2, 0, 3, 2])
  slots = []
  for b in range(4):
    for m in range(3):
      real = z[b, m][frame_mask[b, m]]  # (frames, D)
      if not len(real):
        continue
      y = labels[b]
      std = np.exp(log_std[y])
      log_density = (-0.5 * np.log(2 * np.pi) - np.log(std)
                     - 0.5 * ((real - mean[y]) / std) ** 2)
      slots.append((-log_density.sum() - logdet[b, m]) / real.size)
  value = cmarr.flow_likelihood(out, jnp.asarray(labels))
  np.testing.assert_allclose(value, np.mean(slots), rtol=1e-4)
  assert abs(float(cmarr.flow_likelihood(out, jnp.asarray([1, 1, 1, 1]))) - float(value)) > 1e-3
  chex.assert_shape([params["prior"]["mean"], params["prior"]["log_std"]], (4, WIDTH))
  # The prediction does not read the label (test time has none).
  changed = apply(params, dict(batch, label=(batch["label"] + 1) % 4))
  chex.assert_trees_all_close(changed["output"], apply(params, batch)["output"])


@pytest.mark.slow
def test_flow_input_selects_the_aligned_or_the_projected_sequences():
  """flow_input="aligned": X_n is the UMC's aligned sequence of the Conv1D projection
  (rebuilt here from the submodules); "projected": the projection itself."""
  from mer_jax.nn.attention import ModalityProjection
  from mer_jax.nn.gaussian import UncertaintyModule
  from mer_jax.nn.queries import align_length

  spec, params, apply = classifier()
  batch = random_batch(spec, batch_size=4, seed=5)
  out = apply(params, batch)
  length = max(spec.lengths)
  (projected_stage,) = cmarr.build(tiny_config({"model.flow_input": "projected"}), spec)
  projected_out = projected_stage.model.apply({"params": params}, batch, train=False)
  for index, (name, kernel) in enumerate(zip(MODALITIES, (3, 1, 1), strict=True)):
    x = ModalityProjection(WIDTH, kernel).apply({"params": params[f"proj_{name}"]}, batch[name],
                                                batch[f"{name}_mask"])
    x, mask = align_length(x, jnp.asarray(batch[f"{name}_mask"]), length)
    _, _, aligned = UncertaintyModule(8, 2, 16).apply({"params": params[f"umc_{name}"]}, x,
                                                     mask, train=False)
    np.testing.assert_allclose(out["features"][:, index], aligned, atol=1e-5)
    np.testing.assert_allclose(projected_out["features"][:, index], x, atol=1e-5)
    assert np.abs(np.asarray(aligned - x)).max() > 1e-3


@pytest.mark.parametrize("field,value,message", [
    ("model.flow_input", "raw", "config.model.flow_input='raw'"),
    ("loss.rec_norm", "l1", "config.loss.rec_norm='l1'"),
    ("model.udcl_init_temperature", 0.005, "config.model.udcl_init_temperature=0.005")])
def test_bad_options_fail_when_the_method_is_built(field, value, message):
  with pytest.raises(ValueError, match=message):
    cmarr.build(tiny_config({field: value}), tiny_spec("classification"))


def _without(params, *prefixes):
  return {k: v for k, v in params.items() if not k.startswith(prefixes)}


@pytest.mark.slow
def test_baseline_zero_fills_absent_modalities_and_has_no_reconstruction():
  """Table 3's Baseline (model.reconstruct=False): no flows, RCAB or prior; an absent
  modality enters the fusion as zero frames over the whole length, so the prediction
  does not read it; L_rec = L_flow = 0."""
  spec, params, _ = classifier()
  config = tiny_config({"model.reconstruct": False, "missing.kind": "none"})
  (stage,) = cmarr.build(config, spec)
  assert not stage.trained_with_missing
  shapes = jax.eval_shape(lambda: init(stage, random_batch(spec, batch_size=2)))
  baseline = _without(params, "flow_", "rcab_", "prior")
  chex.assert_trees_all_equal_shapes(shapes, baseline)
  batch = random_batch(spec, batch_size=4, seed=6)
  batch["modality_mask"] = np.array([[True, False, True], [False, True, True],
                                     [True, True, True], [True, False, False]])
  out = stage.model.apply({"params": baseline}, batch, train=False)
  assert "reconstructed" not in out
  absent = ~batch["modality_mask"]
  np.testing.assert_array_equal(np.asarray(out["completed"])[absent], 0.0)
  assert np.asarray(out["completed_mask"])[absent].all()
  changed = dict(batch)
  for index, name in enumerate(MODALITIES):
    changed[name] = np.where(absent[:, index, None, None], 50.0, batch[name])
  chex.assert_trees_all_close(
      stage.model.apply({"params": baseline}, changed, train=False)["output"], out["output"],
      atol=1e-5)
  _, (terms, _) = stage.loss_fn(baseline, {}, batch, jax.random.key(0), StageContext())
  assert float(terms["loss_rec"]) == 0.0 and float(terms["loss_flow"]) == 0.0
  assert float(terms["loss_cls"]) > 0


@pytest.mark.slow
def test_without_umc_attention_drops_the_sequence_interaction():
  """Table 3's "w/o attention" (model.umc_attention=False): the UMCs have no
  self-attention parameters and compute a different alignment."""
  spec, params, apply = classifier()
  (stage,) = cmarr.build(tiny_config({"model.umc_attention": False}), spec)
  without = {k: ({n: p for n, p in v.items() if n not in ("attn", "norm_attn")}
                 if k.startswith("umc_") else v) for k, v in params.items()}
  shapes = jax.eval_shape(lambda: init(stage, random_batch(spec, batch_size=2)))
  chex.assert_trees_all_equal_shapes(shapes, without)
  batch = random_batch(spec, batch_size=4, seed=7)
  out = stage.model.apply({"params": without}, batch, train=False)
  full = apply(params, batch)["gaussian_mean"]
  assert np.abs(np.asarray(out["gaussian_mean"] - full)).max() > 1e-4


@pytest.mark.slow
def test_learned_temperature_is_a_log_space_parameter_with_a_live_gradient():
  """tau = 0.01 + exp(log_tau), starting at umc_dim; d L_udcl / d log_tau is non-zero
  per pair, also just above the floor, where the former hard clip had no gradient."""
  params, batch, gradients = term_gradients()
  np.testing.assert_allclose(0.01 + np.exp(params["udcl_log_temperature"]), 8.0, rtol=1e-6)
  for log_tau in (np.log(8.0 - 0.01), np.log(1e-3)):
    moved = dict(params, udcl_log_temperature=jnp.full((3,), log_tau, jnp.float32))
    _, grads = gradients(moved, batch)
    grad = np.asarray(grads["udcl_log_temperature"][TERMS.index("loss_udcl")])
    assert np.all(np.isfinite(grad)) and np.all(np.abs(grad) > 1e-6), (log_tau, grad)


@pytest.mark.slow
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
    assert (config.model.flow_input, config.model.reconstruct, config.loss.rec_through_flow,
            config.loss.rec_norm) == ("aligned", True, False, "mean")
  real = load_config(name, "")
  assert real.data.num_folds == folds
  assert (real.train.learning_rate, real.train.batch_size, real.train.num_epochs) == (
      1e-5, 16, 100)
  # Sec. 3.1.1's extractors; every modality brought to 50 frames on loading and in the model.
  assert tuple(real.data.features) == ("bert_base", "wav2vec2_base", "denseface")
  assert tuple(real.data.max_lengths) == (50, 50, 50) and real.model.common_length == 50
  for variant in ("synthetic", "tiny"):
    config = load_config(name, variant)
    assert (tuple(config.data.features), tuple(config.data.max_lengths)) == ((), ())
    assert config.model.common_length == 0  # the synthetic presets' own lengths


parse_command_line = parse_flags  # the config `python -m mer_jax.train ARGS` would train


@pytest.mark.parametrize("title", ["Baseline", "w/o attention", "w/o L_udcl", "w/o L_spcl",
                                   "w/ Point"])
def test_table3_ablations_from_the_command_line(title):
  """Every Table 3 row is `mer_jax.compare`'s ablation entry and a set of command-line
  overrides that reach the built model and loss."""
  from mer_jax import compare

  (fields,) = [f for t, _, f in compare.ABLATIONS["cmarr"] if t == title]
  args = [f"--config.{k}={v}" for k, v in fields.items()]
  config = parse_command_line(f"--config={os.path.join(REPO, 'configs', 'cmarr_iemocap.py')}:tiny",
                              *args)
  for field, value in fields.items():
    section, name = field.split(".")
    assert config[section][name] == value, field
  spec = synthetic.spec_for("iemocap")
  (stage,) = cmarr.build(config, spec)
  model = stage.model
  shapes = jax.eval_shape(lambda: init(stage, random_batch(spec, batch_size=2)))
  if title == "Baseline":
    assert not model.reconstruct and model.flow_input == "projected"
    assert not stage.trained_with_missing
    assert not any(k.startswith(("flow_", "rcab_", "prior")) for k in shapes)
    assert (config.loss.udcl_weight, config.loss.spcl_weight) == (0.0, 0.0)
  elif title == "w/o attention":
    assert not model.umc_attention and "attn" not in shapes["umc_text"]
  assert "flow_text" in shapes or title == "Baseline"


def test_fold_config_selects_the_fold_and_the_synthetic_seed():
  config = load_config("cmarr_iemocap.py", "tiny")
  fold = crossval.fold_config(config, 1)
  assert (fold.data.fold, fold.data.seed) == (1, config.data.seed + 1)
  assert (config.data.fold, config.data.seed) == (0, 0)  # the original is untouched
  with pytest.raises(ValueError, match="outside"):
    crossval.run_folds(config, "/nonexistent", folds=[2])


def test_aggregate_means_and_stds_over_folds():
  """crossval.json's aggregate, and the printed table: mean +- std, then every fold."""
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


def test_the_printed_table_gives_war_and_uar_of_every_fold_with_mean_and_std(tmp_path):
  rng = np.random.default_rng(1)
  runs = []
  for fold in range(3):
    results = {n: {"war": float(rng.random()), "uar": float(rng.random())}
               for n in missing.COMBINATION_NAMES}
    runs.append(results)
    os.makedirs(tmp_path / f"fold{fold}" / "eval")
    with open(tmp_path / f"fold{fold}" / "eval" / "results.json", "w") as f:
      json.dump(results, f)
  lines = crossval.format_console({"folds": [0, 1, 2]}, str(tmp_path), "classification")
  lines = lines.splitlines()
  for metric in ("war", "uar"):
    first = lines.index(next(line for line in lines if line.split()[:2] == ["test", metric]))
    rows = {line.split()[0]: line.split()[1:] for line in lines[first + 1:first + 6]}
    la = [runs[k]["LA"][metric] for k in range(3)]
    column = list(missing.COMBINATION_NAMES).index("LA")
    assert [rows[f"fold{k}"][column] for k in range(3)] == [f"{v:.4f}" for v in la]
    assert rows["mean"][column] == f"{np.mean(la):.4f}"
    assert rows["std"][column] == f"{np.std(la):.4f}"


@pytest.mark.slow
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
