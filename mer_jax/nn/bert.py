"""BERT (Devlin et al., 2019) as linen modules, and a loader for local Hugging Face
checkpoint folders (`config.json` + `model.safetensors`, read with the `safetensors`
numpy API: no network, no PyTorch).

The modules follow the reference (Hugging Face `BertModel`) computation exactly: post-LN
transformer layers, exact (erf) GELU, LayerNorm epsilon from the config, dropout after
the embeddings, on the attention probabilities and after each residual branch. The
layers run under `nn.scan` (`scan=True`, the default): one array per parameter kind with
a leading layer axis, so the compiled program and the checkpoint's array count do not
grow with depth; `scan=False` unrolls them (`encoder_{i}`), with the same numerics.
The parameter tree mirrors the checkpoint names, so the map between the two is
mechanical (scanned: layer i is row i of the stacked array):

    checkpoint (canonical)                            params (scanned; unrolled: encoder_{i})
    embeddings.word_embeddings.weight                 embeddings/word_embeddings/embedding
    embeddings.LayerNorm.weight | .bias               embeddings/LayerNorm/scale | bias
    encoder.layer.{i}.attention.self.query.weight     encoder/attention/query/kernel[i] (.T)
    encoder.layer.{i}.attention.output.dense.weight   encoder/attention/output/kernel[i] (.T)
    encoder.layer.{i}.intermediate.dense.weight       encoder/intermediate/kernel[i] (.T)
    encoder.layer.{i}.output.dense.weight             encoder/output/kernel[i] (.T)
    pooler.dense.weight                               pooler/kernel (.T)

Checkpoint names are canonicalised first: a leading `bert.` is dropped (checkpoints of
`BertForPreTraining` and friends), the TF-era LayerNorm names `gamma` / `beta` become
`weight` / `bias`; pre-training heads (`cls.*`) and the `position_ids` buffer are ignored.
Torch `Linear` weights are (out, in); linen kernels are (in, out), hence the transposes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mer_jax.nn.attention import exact_gelu
from mer_jax.nn.stack import layer_stack

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
VOCAB_FILE = "vocab.txt"
# Checkpoint tensors that are not part of the encoder: pre-training heads and buffers.
_IGNORED = (re.compile(r"^cls\."), re.compile(r"position_ids$"))


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The architecture facts of a BERT checkpoint (names as in its `config.json`)."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  hidden_act: str = "gelu"
  pad_token_id: int = 0

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"BERT hidden_size {self.hidden_size} is not divisible by "
                       f"num_attention_heads {self.num_attention_heads}")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"BERT hidden_act {self.hidden_act!r} is not supported; expected one of "
                       f"{sorted(_ACTIVATIONS)}")


_ACTIVATIONS = {
    "gelu": exact_gelu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def load_config(path: str) -> BertConfig:
  """`BertConfig` of a checkpoint folder; keys that do not shape the encoder are ignored.

  Raises:
    FileNotFoundError: the folder or its `config.json` is missing.
    ValueError: `config.json` is not a BERT config.
  """
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(
        f"{file} not found: config.model.text_encoder_path must be a local Hugging Face BERT "
        f"folder with {CONFIG_FILE} and {WEIGHTS_FILE} (see docs/methods.md)")
  with open(file) as f:
    raw = json.load(f)
  if raw.get("model_type", "bert") != "bert":
    raise ValueError(f"{file}: model_type is {raw['model_type']!r}; expected 'bert'")
  fields = {f.name for f in dataclasses.fields(BertConfig)}
  return BertConfig(**{k: v for k, v in raw.items() if k in fields})


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  """Ids of the special tokens that token-level masking needs (LNLN: dropped words become
  [UNK]; [CLS] and [SEP] are kept; [PAD] marks padding)."""

  pad: int = 0
  unk: int = 100
  cls: int = 101
  sep: int = 102


def load_special_tokens(path: str, config: BertConfig | None = None) -> SpecialTokens:
  """Special token ids from the folder's `vocab.txt` (line number = id), else the ids that
  `bert-base-uncased` and `bert-base-chinese` share (pad 0, [UNK] 100, [CLS] 101, [SEP] 102)."""
  pad = config.pad_token_id if config is not None else 0
  file = os.path.join(path, VOCAB_FILE)
  if not os.path.isfile(file):
    return SpecialTokens(pad=pad)
  with open(file, encoding="utf-8") as f:
    ids = {line.rstrip("\n"): i for i, line in enumerate(f)}
  missing = [t for t in ("[UNK]", "[CLS]", "[SEP]") if t not in ids]
  if missing:
    raise ValueError(f"{file}: tokens {missing} are not in the vocabulary")
  return SpecialTokens(pad=pad, unk=ids["[UNK]"], cls=ids["[CLS]"], sep=ids["[SEP]"])


# ----------------------------------------------------------------------------- modules


def _dense(features: int, name: str) -> nn.Dense:
  # BERT's initialiser (truncation aside): N(0, 0.02) weights, zero biases.
  return nn.Dense(features, kernel_init=nn.initializers.normal(0.02), name=name)


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=config.layer_norm_eps, name=name)


class BertEmbeddings(nn.Module):
  """Word + position + segment embeddings, LayerNorm, dropout: (B, T) ids -> (B, T, H)."""

  config: BertConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids, *, deterministic: bool):
    c = self.config
    init = nn.initializers.normal(0.02)
    length = input_ids.shape[1]
    if length > c.max_position_embeddings:
      raise ValueError(f"text length {length} exceeds BERT's max_position_embeddings "
                       f"{c.max_position_embeddings}")
    words = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=init,
                     name="word_embeddings")(input_ids)
    positions = nn.Embed(c.max_position_embeddings, c.hidden_size, embedding_init=init,
                         name="position_embeddings")(jnp.arange(length)[None, :])
    segments = nn.Embed(c.type_vocab_size, c.hidden_size, embedding_init=init,
                        name="token_type_embeddings")(token_type_ids)
    x = _layer_norm(c, "LayerNorm")(words + positions + segments)
    return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class BertAttention(nn.Module):
  """Multi-head self-attention with its output projection, residual and LayerNorm."""

  config: BertConfig

  @nn.compact
  def __call__(self, x, attention_mask, *, deterministic: bool):
    c = self.config
    heads, width = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    split = lambda y: y.reshape(y.shape[:2] + (heads, width))
    q, k, v = (split(_dense(c.hidden_size, n)(x)) for n in ("query", "key", "value"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(width).astype(np.float32)
    # Masked keys get the lowest finite score (not -inf): a row without any real key
    # (an all-padding sample) then softmaxes to a finite uniform row instead of NaN.
    scores = jnp.where(attention_mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(c.attention_probs_dropout_prob)(probs, deterministic=deterministic)
    context = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape)
    out = _dense(c.hidden_size, "output")(context)
    out = nn.Dropout(c.hidden_dropout_prob)(out, deterministic=deterministic)
    return _layer_norm(c, "LayerNorm")(out + x)


class BertLayer(nn.Module):
  """One post-LN transformer layer: attention block, then the feed-forward block.

  `deterministic` is an attribute (not an argument) so that `nn.remat` needs no static
  arguments.
  """

  config: BertConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, attention_mask):
    c = self.config
    x = BertAttention(c, name="attention")(x, attention_mask, deterministic=self.deterministic)
    h = _ACTIVATIONS[c.hidden_act](_dense(c.intermediate_size, "intermediate")(x))
    h = _dense(c.hidden_size, "output")(h)
    h = nn.Dropout(c.hidden_dropout_prob)(h, deterministic=self.deterministic)
    return _layer_norm(c, "LayerNorm")(h + x)


class _StackedBertLayer(BertLayer):
  """`BertLayer` in `nn.stack.layer_stack`'s form: (x, attention_mask) -> (x, None)."""

  @nn.compact
  def __call__(self, x, attention_mask):
    return super().__call__(x, attention_mask), None


class BertModel(nn.Module):
  """BERT encoder: (B, T) token ids -> hidden states (B, T, H) and pooled (B, H).

  Attributes:
    config: the architecture (`load_config` of a checkpoint folder).
    use_pooler: build the pooler (tanh dense on [CLS]); without it, `pooled` is None and
      the checkpoint's pooler tensors are not loaded.
    remat: recompute each layer's activations in the backward pass (`nn.remat`) instead
      of storing them: less memory for about one more forward pass of compute.
    scan: the layers under `nn.scan` (params `encoder/...` with a leading layer axis);
      False unrolls them as `encoder_{i}` (`nn.stack.layer_stack`).
  """

  config: BertConfig
  use_pooler: bool = True
  remat: bool = False
  scan: bool = True

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, *, train: bool = False):
    """
    Args:
      input_ids: (B, T) int token ids.
      attention_mask: (B, T) bool or {0, 1}, True on real tokens.
      token_type_ids: (B, T) int segment ids (zeros when None).
      train: enables dropout (needs a "dropout" rng).

    Returns:
      dict with `hidden` (B, T, H) float32 and `pooled` (B, H) (None without pooler).
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    attention_mask = jnp.asarray(attention_mask).astype(bool)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    deterministic = not train
    x = BertEmbeddings(self.config, name="embeddings")(
        input_ids, jnp.asarray(token_type_ids, jnp.int32), deterministic=deterministic)
    x = layer_stack(_StackedBertLayer, self.config.num_hidden_layers, x, attention_mask,
                    scan=self.scan, remat=self.remat, name="encoder", config=self.config,
                    deterministic=deterministic)
    pooled = None
    if self.use_pooler:
      pooled = jnp.tanh(_dense(self.config.hidden_size, "pooler")(x[:, 0]))
    return {"hidden": x, "pooled": pooled}


# ----------------------------------------------------------------------------- name map


def canonical_name(name: str) -> str | None:
  """The canonical checkpoint name of a tensor, or None for tensors outside the encoder."""
  if name.startswith("bert."):
    name = name[len("bert."):]
  if any(p.search(name) for p in _IGNORED):
    return None
  name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
  return re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)


def name_map(config: BertConfig, *, use_pooler: bool = True, scan: bool = True
             ) -> dict[str, tuple[tuple[str, ...], bool, int | None]]:
  """Canonical checkpoint name -> (param path in `BertModel` params, transpose?, layer).

  `layer` is the row of a scanned layer's stacked array (None for unstacked params and
  with `scan=False`). Covers every parameter of `BertModel(config, use_pooler, scan)`
  (every row of every stacked one) exactly once.
  """
  mapping = {}

  def linear(source, target, layer=None):
    mapping[f"{source}.weight"] = ((*target, "kernel"), True, layer)
    mapping[f"{source}.bias"] = ((*target, "bias"), False, layer)

  def layer_norm(source, target, layer=None):
    mapping[f"{source}.weight"] = ((*target, "scale"), False, layer)
    mapping[f"{source}.bias"] = ((*target, "bias"), False, layer)

  for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
    mapping[f"embeddings.{name}.weight"] = (("embeddings", name, "embedding"), False, None)
  layer_norm("embeddings.LayerNorm", ("embeddings", "LayerNorm"))
  for i in range(config.num_hidden_layers):
    src = f"encoder.layer.{i}"
    dst, layer = (("encoder",), i) if scan else ((f"encoder_{i}",), None)
    for name in ("query", "key", "value"):
      linear(f"{src}.attention.self.{name}", (*dst, "attention", name), layer)
    linear(f"{src}.attention.output.dense", (*dst, "attention", "output"), layer)
    layer_norm(f"{src}.attention.output.LayerNorm", (*dst, "attention", "LayerNorm"), layer)
    linear(f"{src}.intermediate.dense", (*dst, "intermediate"), layer)
    linear(f"{src}.output.dense", (*dst, "output"), layer)
    layer_norm(f"{src}.output.LayerNorm", (*dst, "LayerNorm"), layer)
  if use_pooler:
    linear("pooler.dense", ("pooler",))
  return mapping


def param_shapes(config: BertConfig, *, use_pooler: bool = True, scan: bool = True
                 ) -> dict[tuple[str, ...], tuple]:
  """Param path -> shape of `BertModel(config, use_pooler, scan)` (computed without weights)."""
  model = BertModel(config, use_pooler=use_pooler, scan=scan)
  ids = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids > 0)["params"])
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    flat[tuple(p.key for p in path)] = tuple(leaf.shape)
  return flat


def _checkpoint_index(path: str) -> tuple[str, dict[str, str]]:
  """(weights file, {canonical name: stored name}) of a folder, from the header only."""
  from safetensors import safe_open

  file = os.path.join(path, WEIGHTS_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(
        f"{file} not found: the BERT folder needs its weights as {WEIGHTS_FILE} (PyTorch "
        f".bin files are not read; see docs/methods.md)")
  index = {}
  with safe_open(file, framework="np") as f:
    for stored in f.keys():
      canonical = canonical_name(stored)
      if canonical is None:
        continue
      if canonical in index:
        raise ValueError(f"{file}: tensors {index[canonical]!r} and {stored!r} are the same "
                         f"parameter {canonical!r}")
      index[canonical] = stored
  return file, index


def check_checkpoint(path: str, config: BertConfig, *, use_pooler: bool = True,
                     scan: bool = True) -> None:
  """Checks, reading headers only, that the folder's weights fill `BertModel` exactly.

  Raises:
    FileNotFoundError: no weights file.
    ValueError: naming the file and the first tensors that are missing, unexpected or of
      the wrong shape.
  """
  from safetensors import safe_open

  file, index = _checkpoint_index(path)
  mapping = name_map(config, use_pooler=use_pooler, scan=scan)
  shapes = param_shapes(config, use_pooler=use_pooler, scan=scan)
  missing = sorted(set(mapping) - set(index))
  unexpected = sorted(n for n in set(index) - set(mapping)
                      if use_pooler or not n.startswith("pooler."))
  problems = []
  if missing:
    problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
  if unexpected:
    problems.append(f"unexpected tensors {unexpected[:5]}"
                    f"{' ...' if len(unexpected) > 5 else ''}")
  with safe_open(file, framework="np") as f:
    for canonical, (target, transpose, layer) in mapping.items():
      if canonical not in index:
        continue
      shape = tuple(f.get_slice(index[canonical]).get_shape())
      expected = shapes[target] if layer is None else shapes[target][1:]
      expected = expected[::-1] if transpose else expected
      if shape != expected:
        problems.append(f"tensor {index[canonical]!r} has shape {shape}, expected {expected} "
                        f"for {os.path.join(path, CONFIG_FILE)}")
  if problems:
    raise ValueError(f"{file} does not match the BERT of {os.path.join(path, CONFIG_FILE)}: "
                     + "; ".join(problems))


def load_params(path: str, config: BertConfig | None = None, *, use_pooler: bool = True,
                scan: bool = True) -> dict:
  """`BertModel` params (nested dict of float32 numpy arrays) from a checkpoint folder, for
  the scanned (`scan=True`: per-layer tensors stacked) or the unrolled layout.

  Raises what `load_config` and `check_checkpoint` raise, before reading any weight.
  """
  from safetensors import safe_open

  config = config or load_config(path)
  check_checkpoint(path, config, use_pooler=use_pooler, scan=scan)
  file, index = _checkpoint_index(path)
  params: dict = {}
  rows: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
  with safe_open(file, framework="np") as f:
    for canonical, (target, transpose, layer) in name_map(
        config, use_pooler=use_pooler, scan=scan).items():
      value = np.asarray(f.get_tensor(index[canonical]), np.float32)
      value = np.ascontiguousarray(value.T) if transpose else value
      if layer is None:
        _set(params, target, value)
      else:
        rows.setdefault(target, {})[layer] = value
  for target, by_layer in rows.items():
    _set(params, target, np.stack([by_layer[i] for i in range(len(by_layer))]))
  return params


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def to_checkpoint(params: Mapping, config: BertConfig, *, use_pooler: bool = True,
                  scan: bool = True, prefix: str = "") -> dict[str, np.ndarray]:
  """The inverse map: `BertModel` params -> {checkpoint name: array} (torch layout), e.g. to
  write a checkpoint with `safetensors.numpy.save_file`."""
  out = {}
  for canonical, (target, transpose, layer) in name_map(
      config, use_pooler=use_pooler, scan=scan).items():
    value = params
    for key in target:
      value = value[key]
    value = np.asarray(value if layer is None else value[layer], np.float32)
    out[prefix + canonical] = np.ascontiguousarray(value.T) if transpose else value
  return out


__all__ = [
    "BertAttention", "BertConfig", "BertEmbeddings", "BertLayer", "BertModel", "SpecialTokens",
    "canonical_name", "check_checkpoint", "load_config", "load_params", "load_special_tokens",
    "name_map", "param_shapes", "to_checkpoint",
]
