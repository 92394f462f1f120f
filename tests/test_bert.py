"""BERT text encoder: the linen modules against an independent numpy forward of the same
checkpoint, the name map, the loader's errors, LNLN token masking, the encoder's own
learning rate, and a `:tiny` MCUR run with `text_encoder=bert` on MMSA-format files."""

import importlib.util
import json
import math
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import save_file

from mer_jax import config_lib, parallel, predict, trainer
from mer_jax import train as train_lib
from mer_jax.data import missing, pipeline
from mer_jax.methods import build_stages, text_encoder
from mer_jax.methods.base import Stage, StageContext
from mer_jax.nn import bert

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=110, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=16, type_vocab_size=2,
            layer_norm_eps=1e-12, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
            hidden_act="gelu", pad_token_id=0, model_type="bert")
VOCAB = (["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]"]
         + [f"w{i}" for i in range(103, 110)])


def random_checkpoint(config: bert.BertConfig, seed=0) -> dict[str, np.ndarray]:
  """Random weights under canonical names, torch layout ((out, in) linear weights)."""
  rng = np.random.default_rng(seed)
  h, i = config.hidden_size, config.intermediate_size
  shapes = {"embeddings.word_embeddings.weight": (config.vocab_size, h),
            "embeddings.position_embeddings.weight": (config.max_position_embeddings, h),
            "embeddings.token_type_embeddings.weight": (config.type_vocab_size, h),
            "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,),
            "pooler.dense.weight": (h, h), "pooler.dense.bias": (h,)}
  for layer in range(config.num_hidden_layers):
    p = f"encoder.layer.{layer}."
    for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense"):
      shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (h, h), (h,)
    shapes[p + "intermediate.dense.weight"], shapes[p + "intermediate.dense.bias"] = (i, h), (i,)
    shapes[p + "output.dense.weight"], shapes[p + "output.dense.bias"] = (h, i), (h,)
    for name in ("attention.output.LayerNorm", "output.LayerNorm"):
      shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (h,), (h,)
  weights = {k: (0.3 * rng.normal(size=s)).astype(np.float32) for k, s in shapes.items()}
  for k in weights:
    if "LayerNorm.weight" in k:
      weights[k] = (1.0 + 0.1 * rng.normal(size=weights[k].shape)).astype(np.float32)
  return weights


def write_tiny_bert(folder, *, seed=0, prefix="bert.", tf_names=True, edit=None, **overrides):
  """A tiny BERT folder as Hugging Face writes it: config.json (`TINY` with `overrides`),
  model.safetensors (with a pre-training head and the position_ids buffer, which the
  loader ignores), vocab.txt.

  Returns the canonical weights (torch layout)."""
  os.makedirs(folder, exist_ok=True)
  config = dict(TINY, **overrides)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(folder, "vocab.txt"), "w") as f:
    f.write("\n".join(VOCAB) + "\n")
  weights = random_checkpoint(bert.BertConfig(**{k: v for k, v in config.items()
                                                 if k != "model_type"}), seed)
  stored = {}
  for name, value in weights.items():
    if tf_names:
      name = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                          "LayerNorm.beta")
    stored[prefix + name] = value
  stored["cls.predictions.bias"] = np.zeros(TINY["vocab_size"], np.float32)
  stored[prefix + "embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
  if edit:
    edit(stored)
  save_file(stored, os.path.join(folder, "model.safetensors"))
  return weights


# ----------------------------------------------------------------------------- numpy reference


def _layer_norm(x, w, b, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * w + b


def _gelu(x):
  erf = np.vectorize(math.erf)
  return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def numpy_bert(w, config, ids, mask, segments):
  """Hugging Face BertModel forward (eval mode) in float64 numpy, from torch-layout weights."""
  w = {k: v.astype(np.float64) for k, v in w.items()}
  lin = lambda x, name: x @ w[name + ".weight"].T + w[name + ".bias"]
  eps = config.layer_norm_eps
  length = ids.shape[1]
  x = (w["embeddings.word_embeddings.weight"][ids]
       + w["embeddings.position_embeddings.weight"][np.arange(length)][None]
       + w["embeddings.token_type_embeddings.weight"][segments])
  x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
  heads = config.num_attention_heads
  d = config.hidden_size // heads
  extended = (1.0 - mask[:, None, None, :].astype(np.float64)) * np.finfo(np.float64).min
  for layer in range(config.num_hidden_layers):
    p = f"encoder.layer.{layer}."
    split = lambda y: y.reshape(y.shape[0], length, heads, d).transpose(0, 2, 1, 3)
    q, k, v = (split(lin(x, p + f"attention.self.{n}")) for n in ("query", "key", "value"))
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d) + extended
    scores = scores - scores.max(-1, keepdims=True)
    probs = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
    context = (probs @ v).transpose(0, 2, 1, 3).reshape(x.shape)
    x = _layer_norm(lin(context, p + "attention.output.dense") + x,
                    w[p + "attention.output.LayerNorm.weight"],
                    w[p + "attention.output.LayerNorm.bias"], eps)
    h = lin(_gelu(lin(x, p + "intermediate.dense")), p + "output.dense")
    x = _layer_norm(h + x, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
  pooled = np.tanh(lin(x[:, 0], "pooler.dense"))
  return x, pooled


def token_batch(batch_size=3, length=10, seed=1):
  rng = np.random.default_rng(seed)
  lengths = np.array([length, 4, 7, 5])[:batch_size]
  mask = np.arange(length)[None] < lengths[:, None]
  ids = rng.integers(103, 110, (batch_size, length))
  ids[:, 0] = 101
  ids[np.arange(batch_size), lengths - 1] = 102
  ids = np.where(mask, ids, 0)
  segments = np.where(mask, rng.integers(0, 2, (batch_size, length)), 0)
  return ids.astype(np.int32), mask, segments.astype(np.int32)


@pytest.mark.parametrize("prefix,tf_names", [("bert.", True), ("", False)])
def test_loaded_encoder_matches_numpy_reference(tmp_path, prefix, tf_names):
  weights = write_tiny_bert(tmp_path, prefix=prefix, tf_names=tf_names)
  config = bert.load_config(str(tmp_path))
  params = bert.load_params(str(tmp_path), config)
  ids, mask, segments = token_batch()
  out = bert.BertModel(config).apply({"params": params}, ids, mask, segments, train=False)
  hidden, pooled = numpy_bert(weights, config, ids, mask, segments)
  chex.assert_shape(out["hidden"], (3, 10, 32))
  # Padding positions are computed too (as in the reference); compare every position.
  np.testing.assert_allclose(out["hidden"], hidden, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out["pooled"], pooled, rtol=1e-4, atol=1e-4)


def test_name_map_covers_every_tensor_and_round_trips(tmp_path):
  weights = write_tiny_bert(tmp_path)
  config = bert.load_config(str(tmp_path))
  for scan in (True, False):
    mapping = bert.name_map(config, scan=scan)
    assert set(mapping) == set(weights)  # every checkpoint tensor of the encoder
    shapes = bert.param_shapes(config, scan=scan)
    # every param, and every row of each scanned (stacked) param, exactly once
    rows = sorted((target, -1 if layer is None else layer)
                  for target, _, layer in mapping.values())
    assert len(set(rows)) == len(rows)
    assert sorted({target for target, _ in rows}) == sorted(shapes)
    for target, shape in shapes.items():
      layers = [layer for t, layer in rows if t == target]
      assert layers == ([-1] if target[0] != "encoder" else list(range(shape[0]))), target
    params = bert.load_params(str(tmp_path), config, scan=scan)
    back = bert.to_checkpoint(params, config, scan=scan)
    assert set(back) == set(weights)
    for name, value in weights.items():
      np.testing.assert_array_equal(back[name], value)
  # The scanned encoder is one array per parameter kind: 16 whatever the depth.
  assert len([t for t in bert.param_shapes(config) if t[0] == "encoder"]) == 16
  scanned = bert.load_params(str(tmp_path), config)
  unrolled = bert.load_params(str(tmp_path), config, scan=False)
  ids, mask, segments = token_batch()
  chex.assert_trees_all_close(
      bert.BertModel(config).apply({"params": scanned}, ids, mask, segments),
      bert.BertModel(config, scan=False).apply({"params": unrolled}, ids, mask, segments),
      atol=1e-5)
  without_pooler = bert.load_params(str(tmp_path), config, use_pooler=False)
  assert "pooler" not in without_pooler
  tokens = bert.load_special_tokens(str(tmp_path), config)
  assert tokens == bert.SpecialTokens(pad=0, unk=100, cls=101, sep=102)


def test_loader_errors_name_the_file_and_tensor(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json not found"):
    bert.load_config(str(tmp_path / "nowhere"))
  write_tiny_bert(tmp_path / "short",
                  edit=lambda s: s.pop("bert.encoder.layer.1.output.dense.bias"))
  with pytest.raises(ValueError, match=r"model.safetensors .*missing tensors "
                     r"\['encoder.layer.1.output.dense.bias'\]"):
    bert.load_params(str(tmp_path / "short"))

  def reshape(stored):
    stored["bert.encoder.layer.0.attention.self.key.weight"] = np.zeros((32, 16), np.float32)
  write_tiny_bert(tmp_path / "shape", edit=reshape)
  with pytest.raises(ValueError, match=r"'bert.encoder.layer.0.attention.self.key.weight' has "
                     r"shape \(32, 16\), expected \(32, 32\)"):
    bert.load_params(str(tmp_path / "shape"))

  def extra(stored):
    stored["bert.encoder.layer.2.output.dense.bias"] = np.zeros(32, np.float32)
  write_tiny_bert(tmp_path / "extra", edit=extra)
  with pytest.raises(ValueError, match="unexpected tensors"):
    bert.load_params(str(tmp_path / "extra"))
  os.remove(tmp_path / "extra" / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
    bert.load_params(str(tmp_path / "extra"))


@pytest.mark.slow
def test_remat_and_dropout_keep_the_forward():
  config = bert.BertConfig(**{k: v for k, v in TINY.items() if k != "model_type"})
  ids, mask, segments = token_batch()
  model = bert.BertModel(config, use_pooler=False)
  params = model.init(jax.random.key(0), ids, mask, segments)["params"]
  plain = model.apply({"params": params}, ids, mask, segments)["hidden"]
  remat = bert.BertModel(config, use_pooler=False, remat=True)

  def loss(p, m):
    return jnp.sum(m.apply({"params": p}, ids, mask, segments, train=True,
                           rngs={"dropout": jax.random.key(1)})["hidden"] ** 2)

  np.testing.assert_allclose(remat.apply({"params": params}, ids, mask, segments)["hidden"],
                             plain, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(jax.grad(loss)(params, model), jax.grad(loss)(params, remat),
                              rtol=1e-3, atol=1e-4)
  dropped = model.apply({"params": params}, ids, mask, segments, train=True,
                        rngs={"dropout": jax.random.key(1)})["hidden"]
  assert not np.allclose(dropped, plain)


# ----------------------------------------------------------------------------- integration

TOKENS = bert.SpecialTokens(pad=0, unk=100, cls=101, sep=102)


def tiny_encoder():
  config = bert.BertConfig(**{k: v for k, v in TINY.items() if k != "model_type"})
  return bert.BertModel(config, use_pooler=False)


def test_masked_token_ids_replace_dropped_words_by_unk_and_keep_cls_sep():
  ids = np.array([[101, 105, 106, 107, 102, 0, 0]])
  kept = np.array([[False, True, False, False, False, False, False]])
  masked, attention = text_encoder.masked_token_ids(ids, kept, TOKENS)
  np.testing.assert_array_equal(masked, [[101, 105, 100, 100, 102, 0, 0]])
  np.testing.assert_array_equal(attention, ids != 0)
  # Unflagged drops (the default protocol): the mask marks real tokens, `text_dropped`
  # the dropped ones; [CLS] and [SEP] stay even when drawn.
  real = ids != 0
  drawn = np.array([[True, False, True, False, True, False, False]])
  masked, attention = text_encoder.masked_token_ids(ids, real, TOKENS, drawn)
  np.testing.assert_array_equal(masked, [[101, 105, 100, 107, 102, 0, 0]])
  np.testing.assert_array_equal(attention, real)


class PooledText(nn.Module):
  """A stand-in method network: masked mean of the text, one Dense."""

  @nn.compact
  def __call__(self, batch, *, train: bool):
    del train
    mask = batch["text_mask"][..., None]
    pooled = (batch["text"] * mask).sum(1) / jnp.maximum(mask.sum(1), 1)
    output = nn.Dense(1)(pooled)[:, 0]
    return {"output": output, "embedding": pooled}


def toy_stage():
  model = PooledText()

  def loss_fn(params, method_state, batch, key, context):
    del context
    # A protocol inside the method's loss, as every method applies its own.
    batch = missing.apply_frame_masking(key, batch, jnp.array([0.5, 0.0, 0.0]))
    out = model.apply({"params": params}, batch, train=False)
    return jnp.sum(out["output"]), ({}, method_state)

  return Stage(name="", model=model, loss_fn=loss_fn)


def token_inputs(batch_size=3):
  ids, mask, segments = token_batch(batch_size)
  audio = np.zeros((batch_size, 2, 1), np.float32)
  return {"text": np.zeros((batch_size, 10, 5), np.float32), "text_mask": mask,
          "text_ids": ids, "text_segments": segments, "audio": audio,
          "audio_mask": np.ones((batch_size, 2), bool), "label": np.zeros(batch_size, np.float32)}


@pytest.mark.slow
def test_wrapper_encodes_after_the_protocol_without_leaking_dropped_words():
  encoder = tiny_encoder()
  stage = text_encoder.with_text_encoder(toy_stage(), encoder, TOKENS)
  batch = token_inputs()
  params = stage.model.init(jax.random.key(0), batch, train=False)["params"]
  assert set(params) == {"text_encoder", "method"}
  key = jax.random.key(3)
  loss, _ = stage.loss_fn(params, {}, batch, key, StageContext())
  # The same protocol draw, then the deterministic forward (TextEncoderModel).
  masked = missing.apply_frame_masking(key, batch, jnp.array([0.5, 0.0, 0.0]))
  # LNLN: the attention/padding mask is unchanged; the dropped tokens are recorded.
  np.testing.assert_array_equal(masked["text_mask"], batch["text_mask"])
  dropped = np.asarray(masked[missing.DROPPED_TEXT])
  assert dropped.any() and not (dropped & ~batch["text_mask"]).any()
  np.testing.assert_allclose(loss, stage.predict(params, {}, masked)["output"].sum(), rtol=1e-5)
  # BERT saw [UNK] at the dropped words: other ids there change nothing.
  other = dict(batch, text_ids=np.where(dropped & (batch["text_ids"] > 102), 105,
                                        batch["text_ids"]))
  np.testing.assert_allclose(stage.loss_fn(params, {}, other, key, StageContext())[0], loss,
                             rtol=1e-6)
  # ... while a kept word does change the output.
  kept = batch["text_mask"] & ~dropped & (batch["text_ids"] > 102)
  changed = dict(batch, text_ids=np.where(kept, 200 - batch["text_ids"] - 90,
                                          batch["text_ids"]))
  assert not np.allclose(stage.loss_fn(params, {}, changed, key, StageContext())[0], loss)
  grads = jax.grad(lambda p: stage.loss_fn(p, {}, batch, key, StageContext())[0])(params)
  assert float(optax.global_norm(grads["text_encoder"])) > 0


@pytest.mark.slow
def test_a_network_that_takes_the_masks_gets_the_text_encoded_once():
  """A BERT-wrapped DQF under the 7 fixed combinations in one call: the wrapper passes
  the masks to the network (BERT runs on the unmasked tokens once) and every
  combination's outputs equal the forward on its `apply_modality_mask`ed batch."""
  from helpers import tiny_spec

  from mer_jax.methods import dqf

  config = config_lib.base_config()
  dqf.configure(config, "tiny")
  spec = tiny_spec("regression", lengths=(10, 2, 3), dims=(TINY["hidden_size"], 1, 2))
  (method_stage,) = dqf.build(config, spec)
  stage = text_encoder.with_text_encoder(method_stage, tiny_encoder(), TOKENS)
  assert stage.masks_in_network
  batch = token_inputs()
  rng = np.random.default_rng(4)
  batch.update(audio=rng.normal(size=(3, 2, 1)).astype(np.float32),
               vision=rng.normal(size=(3, 3, 2)).astype(np.float32),
               vision_mask=np.array([[True] * 3, [True, True, False], [True, False, False]]))
  params = jax.jit(lambda key: stage.model.init(key, batch, train=False)["params"])(
      jax.random.key(0))
  combinations = np.stack([missing.fixed_modality_mask(3, c) for c in range(7)], axis=1)
  out = jax.device_get(jax.jit(lambda p, b, m: stage.predict(
      p, {}, b, scenario_modality_mask=m))(params, batch, combinations))
  chex.assert_shape(out["output"], (3, 7))
  forward = jax.jit(lambda p, b: stage.predict(p, {}, b))
  for index in range(7):
    want = forward(params, missing.apply_modality_mask(batch, combinations[:, index]))
    for key in ("output", "embedding"):
      np.testing.assert_allclose(out[key][:, index], want[key], rtol=1e-5, atol=1e-6,
                                 err_msg=f"{key} of combination {index}")
  assert not np.allclose(out["output"][:, 1], out["output"][:, 6], atol=1e-4)  # A vs LAV


def test_frozen_teacher_reads_its_own_encoding_of_the_clean_tokens():
  encoder = tiny_encoder()
  seen = {}

  def loss_fn(params, method_state, batch, key, context):
    teacher = text_encoder.teacher_inputs(batch)
    seen["teacher_text"] = teacher["text"]
    seen["keys"] = set(teacher)
    out = PooledText().apply({"params": params}, batch, train=False)
    return jnp.sum(out["output"]), ({}, method_state)

  stage = text_encoder.with_text_encoder(
      Stage(name="student", model=PooledText(), loss_fn=loss_fn), encoder, TOKENS)
  batch = token_inputs()
  teacher_params = stage.model.init(jax.random.key(1), batch, train=False)["params"]
  params = stage.model.init(jax.random.key(2), batch, train=False)["params"]
  stage.loss_fn(params, {}, batch, jax.random.key(0), StageContext(frozen=teacher_params))
  expected = text_encoder.encode_text(encoder, teacher_params["text_encoder"], batch, TOKENS,
                                      train=False)["text"]
  np.testing.assert_allclose(seen["teacher_text"], expected, rtol=1e-6)
  assert "text_ids" not in seen["keys"]
  chex.assert_shape(expected, (3, 10, 32))


@pytest.mark.slow
def test_train_step_is_the_same_on_one_and_four_devices():
  stage = text_encoder.with_text_encoder(toy_stage(), tiny_encoder(), TOKENS)
  batch = token_inputs(4)
  config = config_lib.base_config()
  # SGD: updates linear in the gradients (Adam would amplify float reassociation noise).
  config.train.optimizer, config.train.learning_rate = "sgd", 0.1
  config.train.text_encoder_learning_rate = 1e-2
  tx = trainer.make_optimizer(config.train, 4, 1)
  results = []
  for num_devices in (1, 4):
    mesh = parallel.make_mesh(num_devices)
    state = parallel.replicate(trainer.init_train_state(stage, tx, batch, jax.random.key(0)),
                               mesh)
    step = trainer.make_train_step(stage, tx, jax.random.key(1), StageContext(), mesh)
    state, metrics = step(state, parallel.shard_batch(batch, mesh))
    results.append((jax.device_get(state.params), float(metrics["loss"])))
  chex.assert_trees_all_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
  # The loss is near 0 (about -3e-3): float reassociation across the device split moves
  # it by ~4e-8 (the scanned layers reduce in another order), hence an absolute floor.
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)


def test_encoder_gets_its_own_learning_rate():
  config = config_lib.base_config()
  config.train.optimizer, config.train.grad_clip = "sgd", 0.0
  config.train.momentum, config.train.weight_decay = 0.0, 0.0
  config.train.learning_rate, config.train.text_encoder_learning_rate = 0.1, 0.01
  tx = trainer.make_optimizer(config.train, 10, 1)
  params = {"text_encoder": {"w": jnp.ones(2)}, "method": {"w": jnp.ones(2)}}
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["text_encoder"]["w"], -0.01)
  np.testing.assert_allclose(updates["method"]["w"], -0.1)


def test_config_validation_names_the_fields():
  config = config_lib.base_config()
  config.method = "mcur"
  config.model.text_encoder = "bert"
  with pytest.raises(ValueError, match="text_encoder_path"):
    config_lib.validate_config(config)
  config.model.text_encoder_path = "/some/bert"
  with pytest.raises(ValueError, match="data.source='synthetic'.*token ids"):
    config_lib.validate_config(config)
  config.model.text_encoder = "roberta"
  with pytest.raises(ValueError, match="model.text_encoder='roberta'"):
    config_lib.validate_config(config)


def bert_ids(data):
  """MMSA fixture edit: token ids of the tiny vocabulary ([CLS] words [SEP], 0-padded)."""
  rng = np.random.default_rng(5)
  for part in data.values():
    tokens = part["text_bert"]
    mask = tokens[:, 1] > 0
    lengths = mask.sum(1)
    ids = rng.integers(103, 110, mask.shape)
    ids[:, 0] = 101
    ids[np.arange(len(ids)), lengths - 1] = 102
    tokens[:, 0] = np.where(mask, ids, 0)


@pytest.mark.slow
def test_tiny_mcur_run_fine_tunes_bert_on_mmsa_files(tmp_path):
  from test_sources import write_mmsa

  write_mmsa(tmp_path / "MOSEI", "aligned_50.pkl", sizes=(32, 16, 16), lengths=(8, 8, 8),
             aligned=True, edit=bert_ids)
  # One layer keeps the CPU compile of the four programs with BERT inside short.
  write_tiny_bert(tmp_path / "bert-tiny", num_hidden_layers=1, hidden_size=16,
                  num_attention_heads=2, intermediate_size=32)
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, "configs",
                                                                   "mcur_mosei.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.data.source = "mmsa"
  config.data.dir = str(tmp_path / "MOSEI")
  config.data.cache_dir = str(tmp_path / "tfds")
  config.model.text_encoder = "bert"
  config.model.text_encoder_path = str(tmp_path / "bert-tiny")
  config.train.text_encoder_learning_rate = 1e-4
  config.train.num_epochs = 1
  # One device: the data-parallel step is checked above on a cheaper model.
  config.num_devices = 1
  config.eval.missing_rates = ()
  config.eval.frame_rates = (0.5,)
  config.eval.frame_sets = ("L",)
  workdir = str(tmp_path / "run")
  results = train_lib.run(config, workdir)
  assert np.isfinite(results["LAV"]["mae"]) and np.isfinite(results["frame0.5_L"]["mae"])

  # Both stages fine-tuned their own encoder, starting from the checkpoint.
  loaded = bert.load_params(config.model.text_encoder_path, use_pooler=False)
  splits, spec = pipeline.load_data(config.data)
  example = {k: v[:2] for k, v in pipeline.device_arrays(splits["test"]).items()}
  for stage in build_stages(config, spec):
    params, _, _ = trainer.load_stage_params(workdir, stage, example)
    assert set(params) == {"text_encoder", "method"}
    chex.assert_trees_all_equal_shapes(params["text_encoder"], loaded)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                         params["text_encoder"], loaded)
    assert max(jax.tree.leaves(moved)) > 0, stage.name
    # The method's text Conv1D reads the encoder's hidden size, not the 6-wide features.
    kernel = params["method"]["backbone"]["proj_text"]["conv"]["kernel"]
    assert kernel.shape[1] == 16

  # Prediction reads token ids; text features are refused with a message that says so.
  model = predict.Model(workdir)
  test = splits["test"]
  inputs = {"text_ids": test["text_ids"][:3], "audio": test["audio"][:3]}
  records = model(inputs)
  assert [r["available"] for r in records] == [["text", "audio"]] * 3
  assert all(np.isfinite(r["score"]) for r in records)
  with pytest.raises(ValueError, match="fine-tunes BERT on token ids"):
    model({"text": test["text"][:3]})
