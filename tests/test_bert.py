"""BERT text encoder: the linen modules against an independent numpy forward of the same
checkpoint, the name map, the loader's errors, LNLN token masking, the encoder's own
learning rate, and a `:tiny` MCUR run with `text_encoder=bert` on MMSA-format files."""

import json
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from mer_jax.nn import bert

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


def write_tiny_bert(folder, *, seed=0, prefix="bert.", tf_names=True, edit=None):
  """A tiny BERT folder as Hugging Face writes it: config.json, model.safetensors (with a
  pre-training head and the position_ids buffer, which the loader ignores), vocab.txt.

  Returns the canonical weights (torch layout)."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(TINY, f)
  with open(os.path.join(folder, "vocab.txt"), "w") as f:
    f.write("\n".join(VOCAB) + "\n")
  weights = random_checkpoint(bert.BertConfig(**{k: v for k, v in TINY.items()
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
  lengths = np.array([length, 4, 7])[:batch_size]
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
  mapping = bert.name_map(config)
  assert set(mapping) == set(weights)  # every checkpoint tensor of the encoder
  shapes = bert.param_shapes(config)
  assert sorted(target for target, _ in mapping.values()) == sorted(shapes)  # every param
  params = bert.load_params(str(tmp_path), config)
  back = bert.to_checkpoint(params, config)
  assert set(back) == set(weights)
  for name, value in weights.items():
    np.testing.assert_array_equal(back[name], value)
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
