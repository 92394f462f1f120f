"""DQF: shapes per task, padding and missing-modality invariance, the forward against an
independent numpy computation, Q-UA / Q-CA stacks scanned vs unrolled, the Table 4
ablations from the command line, the paper's configs, and a loss that training lowers."""

import math
import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import REPO
from helpers import parse_flags, random_batch, random_params, tiny_spec

from mer_jax import config_lib
from mer_jax.data import missing
from mer_jax.data.builders import merbench
from mer_jax.methods import dqf
from mer_jax.methods.base import StageContext
from mer_jax.nn.queries import QCA, QUA, MulTPairFusion, adaptive_pool_matrix, align_length
from mer_jax.nn.stack import stack_unrolled_params


def tiny_config(kind="frame_dqf", **model_overrides):
  config = ml_collections.ConfigDict()
  config.method = "dqf"
  config.model = dict(width=16, num_layers=1, num_heads=2, mlp_dim=32, dropout=0.0,
                      common_length=0, kernel_sizes=(3, 1, 1), head_hidden=16,
                      unimodal_encoder="qua", pair_fusion="qca", scan_layers=True,
                      remat_layers=False)
  config.model.update(model_overrides)
  config.loss = dict(regression_loss="l1", aux_weight=1.0)
  config.train = dict(num_epochs=1)
  config.missing = dict(kind=kind, fill="zero")
  return config


def forward_fn(stage):
  """The stage's deterministic forward, jitted (an un-jitted apply of scanned layers
  compiles the scan body again on every call)."""
  return jax.jit(lambda params, batch: stage.model.apply({"params": params}, batch,
                                                         train=False))


def rows(batches):
  """Batches with the same keys as one batch (rows are independent in every forward)."""
  return jax.tree.map(lambda *xs: np.concatenate(xs), *batches)


def split_rows(out, parts):
  return [jax.tree.map(lambda x, i=i: np.asarray(x).reshape((parts, -1) + x.shape[1:])[i], out)
          for i in range(parts)]


@pytest.mark.parametrize("task,shape", [("regression", ()), ("classification", (4,)),
                                        ("multilabel_binary", (4, 2))])
def test_output_shapes(task, shape):
  spec = tiny_spec(task)
  (stage,) = dqf.build(tiny_config(), spec)
  batch = random_batch(spec, batch_size=3)
  out, _ = jax.eval_shape(lambda: stage.model.init_with_output(
      {"params": jax.random.key(0)}, batch, train=False))
  chex.assert_shape(out["output"], (3,) + shape)
  chex.assert_shape(out["aux_outputs"], (3, 7) + shape)
  chex.assert_shape(out["embedding"], (3, 7 * 16))


# The paper's network and each Table 4 stand-in (w/o Q-UA, w/o Q-CA, Q-UA w/ MulT).
VARIANTS = [dict(), dict(unimodal_encoder="transformer"), dict(pair_fusion="transformer"),
            dict(pair_fusion="mult")]
VARIANT_IDS = ["dqf", "without_qua", "without_qca", "qua_with_mult"]


@pytest.mark.parametrize("overrides", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.slow
def test_padding_and_absent_modalities_never_change_outputs(overrides):
  spec = tiny_spec("classification")
  (stage,) = dqf.build(tiny_config(**overrides), spec)
  batch = random_batch(spec, batch_size=3, real_lengths=([3, 6, 1], [2, 5, 4], [1, 1, 4]))
  batch["modality_mask"] = np.array([[True, True, True], [True, False, True],
                                     [False, True, False]])
  changed = dict(batch)
  rng = np.random.default_rng(1)
  for index, name in enumerate(("text", "audio", "vision")):
    noise = rng.normal(size=batch[name].shape).astype(np.float32) * 100
    real = batch[f"{name}_mask"] & batch["modality_mask"][:, index:index + 1]
    changed[name] = np.where(real[..., None], batch[name], noise)
  moved = dict(batch, text=batch["text"] + 1.0)
  out = forward_fn(stage)(random_params(stage.model, batch), rows([batch, changed, moved]))
  a, b, c = split_rows(out, 3)
  chex.assert_tree_all_finite(a)
  chex.assert_trees_all_close(a, b, atol=1e-4)
  # The real frames do matter (rows 0 and 1 read their text).
  assert not np.allclose(c["output"][:2], a["output"][:2], atol=1e-4)


@pytest.mark.parametrize("overrides,present,absent", [
    (dict(), ("qua", "qca"), ("encoder_text", "mult_ta")),
    (dict(unimodal_encoder="transformer"), ("encoder_text", "qca"), ("qua",)),
    (dict(pair_fusion="transformer"), ("qua", "concat_ta", "concat_av"), ("qca",)),
    (dict(pair_fusion="mult"), ("qua", "mult_tv"), ("qca", "concat_tv")),
], ids=VARIANT_IDS)
def test_ablations_swap_the_blocks_they_name(overrides, present, absent):
  spec = tiny_spec("regression")
  (stage,) = dqf.build(tiny_config(**overrides), spec)
  params = jax.eval_shape(lambda: stage.model.init(
      {"params": jax.random.key(0)}, random_batch(spec, 2), train=False))["params"]
  assert set(present) <= set(params) and not set(absent) & set(params)


@pytest.mark.parametrize("override,field,value", [
    ("--config.model.unimodal_encoder=transformer", "unimodal_encoder", "transformer"),
    ("--config.model.pair_fusion=transformer", "pair_fusion", "transformer"),
    ("--config.model.pair_fusion=mult", "pair_fusion", "mult"),
])
def test_ablations_are_reachable_from_the_command_line(override, field, value):
  config = parse_flags(f"--config={os.path.join(REPO, 'configs', 'dqf_mosei.py')}:tiny",
                       override)
  assert config.model[field] == value
  config_lib.validate_config(config)
  (stage,) = dqf.build(config, tiny_spec("regression"))
  assert getattr(stage.model, field) == value


def test_an_unknown_ablation_is_a_one_line_config_error():
  config = parse_flags(f"--config={os.path.join(REPO, 'configs', 'dqf_meld.py')}:tiny",
                       "--config.model.pair_fusion=mulT")
  with pytest.raises(ValueError, match=r"^config\.model\.pair_fusion='mulT': choose one of "
                                       r"\('qca', 'transformer', 'mult'\)$"):
    config_lib.validate_config(config)


def test_adaptive_pooling_matches_numpy_bins():
  matrix = adaptive_pool_matrix(5, 3)
  # torch AdaptiveAvgPool1d(3) over 5 steps uses bins [0,2), [1,4), [3,5).
  np.testing.assert_array_equal(matrix, [[1, 1, 0, 0, 0], [0, 1, 1, 1, 0], [0, 0, 0, 1, 1]])
  x = jnp.arange(10.0).reshape(1, 5, 2)
  mask = jnp.array([[True, True, True, False, False]])
  pooled, pooled_mask = align_length(x, mask, 3)
  np.testing.assert_allclose(pooled[0, :, 0], [1.0, 3.0, 0.0])  # masked mean per bin
  np.testing.assert_array_equal(pooled_mask[0], [True, True, False])


# ----------------------------------------------------------------------------- scan vs unrolled


BLOCKS = {
    "qua": (QUA, lambda x, m, h, hm: (x, m)),
    "qca": (QCA, lambda x, m, h, hm: (x, m, h, hm)),
    "mult": (MulTPairFusion, lambda x, m, h, hm: (x, m, h, hm)),
}


# Q-CA's case compiles two gradients of a 4-attention layer (~30 s on a busy 2-core
# machine); its scanned stack is also checked by the numpy reference forward.
@pytest.mark.slow
@pytest.mark.parametrize("block", ["qua", "mult", "qca"])
def test_scanned_stacks_equal_the_unrolled_layers(block):
  """Both forms built, the unrolled params stacked into the scanned layout: outputs agree
  (scanned with and without remat) and so do the gradients (scanned with remat), and the
  scanned tree does not grow with depth while the unrolled one does."""
  module_cls, arguments = BLOCKS[block]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  h = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  other_mask = jnp.array([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], bool)  # an absent pair member
  args = arguments(x, mask, h, other_mask)
  depth = 2
  unrolled = module_cls(depth, 2, 16, scan=False)
  shapes = jax.eval_shape(lambda: unrolled.init(jax.random.key(0), *args, train=False))
  params = jax.tree.map(lambda leaf: rng.normal(scale=0.3, size=leaf.shape).astype(np.float32),
                        shapes["params"])
  names = [n for n in ("layers", "a_to_b", "b_to_a") if f"{n}_0" in params]

  def to_scanned(tree):
    for name in names:
      tree = stack_unrolled_params(tree, depth, name)
    return tree

  def loss(module, p):
    out = module.apply({"params": p}, *args, train=False)
    return jnp.sum(out * jnp.linspace(-1.0, 1.0, out.size).reshape(out.shape)), out

  @jax.jit
  def both(params):
    (_, reference), reference_grads = jax.value_and_grad(
        lambda p: loss(unrolled, p), has_aux=True)(params)
    scanned = module_cls(depth, 2, 16, scan=True).apply(
        {"params": to_scanned(params)}, *args, train=False)
    (_, rematted), remat_grads = jax.value_and_grad(
        lambda p: loss(module_cls(depth, 2, 16, scan=True, remat=True), p),
        has_aux=True)(to_scanned(params))
    return reference, to_scanned(reference_grads), scanned, rematted, remat_grads

  reference, reference_grads, scanned, rematted, remat_grads = both(params)
  assert float(jnp.abs(reference).max()) > 1e-2
  np.testing.assert_allclose(scanned, reference, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(rematted, reference, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(remat_grads, reference_grads, rtol=1e-4, atol=1e-6)
  counts = [len(jax.tree.leaves(jax.eval_shape(lambda d=d, scan=scan: module_cls(
      d, 2, 16, scan=scan).init(jax.random.key(0), *args, train=False))))
      for scan in (True, False) for d in (1, 3)]
  assert counts[0] == counts[1] and counts[2] < counts[3]


def test_real_config_stacks_every_layer_once():
  """dqf_mosei.py (6 layers): every Q-UA / Q-CA parameter has a leading axis of 3 (the
  modalities' stacks, the pairs' stacks, vmapped) and then one of 6 (the layers, scanned)."""
  config = parse_flags(f"--config={os.path.join(REPO, 'configs', 'dqf_mosei.py')}")
  spec = tiny_spec("regression", lengths=(5, 5, 5), dims=(7, 5, 3))
  (stage,) = dqf.build(config, spec)
  params = jax.eval_shape(lambda: stage.model.init(
      {"params": jax.random.key(0)}, random_batch(spec, 2), train=False))["params"]
  for block in ("qua", "qca"):
    leaves = jax.tree.leaves(params[block]["layers"])
    assert leaves and all(leaf.shape[:2] == (3, 6) for leaf in leaves), block
    assert params[block]["queries"].shape[0] == 3, block
  assert not any(name.startswith("layers_") for block in params.values()
                 if isinstance(block, dict) for name in block)


# ----------------------------------------------------------------------------- numpy reference

EPS = 1e-6  # flax LayerNorm
BIG_NEG = float(np.finfo(np.float32).min)  # flax's fill for masked attention logits


def np_layer_norm(p, x):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + EPS) * p["scale"] + p["bias"]


def np_dense(p, x):
  return x @ p["kernel"] + p["bias"]


def np_gelu(x):  # flax/jax default: the tanh approximation
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def np_attention(p, q_in, kv_in, v_in=None, mask=None):
  """Multi-head attention of (..., Tq, D) onto (..., Tk, D); mask (..., Tq, Tk) bool."""
  v_in = kv_in if v_in is None else v_in
  q = np.einsum("...td,dhk->...thk", q_in, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("...td,dhk->...thk", kv_in, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("...td,dhk->...thk", v_in, p["value"]["kernel"]) + p["value"]["bias"]
  logits = np.einsum("...qhk,...shk->...hqs", q, k) / math.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(mask[..., None, :, :], logits, BIG_NEG)
  logits = logits - logits.max(-1, keepdims=True)
  weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  out = np.einsum("...hqs,...shk->...qhk", weights, v)
  return np.einsum("...qhk,hkd->...qd", out, p["out"]["kernel"]) + p["out"]["bias"]


def np_pair_mask(query_mask, key_mask):
  return query_mask[..., :, None] & key_mask[..., None, :]


def np_transformer_layer(p, x, mask=None):
  h = np_layer_norm(p["norm_attn"], x)
  x = x + np_attention(p["attn"], h, h, mask=None if mask is None else np_pair_mask(mask, mask))
  h = np_layer_norm(p["norm_ff"], x)
  return x + np_dense(p["ff"]["out"], np_gelu(np_dense(p["ff"]["in"], h)))


def np_query_update(p, q):
  return np_layer_norm(p["norm"], np_attention(p["attn"], q, q) + q)


def np_layer(stacked, i):
  """Layer i of a scanned stack (every leaf has a leading layer axis)."""
  return jax.tree.map(lambda leaf: leaf[i], stacked)


def np_qua(p, x, mask, num_layers):
  queries = p["queries"]
  for i in range(num_layers):
    layer = np_layer(p["layers"], i)
    queries = np_query_update(layer["query_update"], queries)
    x = np_transformer_layer(layer["layer"], x + queries[None], mask)
  return np_layer_norm(p["norm_out"], x)


def np_query_cross_attention(p, queries, h_a, mask_a, h_b, mask_b):
  ones = np.ones(queries.shape[:2], bool)
  q = np_layer_norm(p["norm_q1"], queries)
  x = queries + np_attention(p["attn_query"], q, np_layer_norm(p["norm_a"], h_a), q,
                             mask=np_pair_mask(ones, mask_a))
  q = np_layer_norm(p["norm_q2"], x)
  h_b = np_layer_norm(p["norm_b"], h_b)
  x = x + np_attention(p["attn_pair"], q, h_b, mask=np_pair_mask(ones, mask_b))
  h = np_layer_norm(p["norm_ff"], x)
  return x + np_dense(p["ff_out"], np_gelu(np_dense(p["ff_in"], h)))


def np_qca(p, h_a, mask_a, h_b, mask_b, num_layers):
  start = np.broadcast_to(p["queries"], h_a.shape)
  a_to_b = b_to_a = start
  for i in range(num_layers):
    layer = np_layer(p["layers"], i)
    a_to_b = np_query_cross_attention(layer["a_to_b"],
                                      np_query_update(layer["query_update"], a_to_b),
                                      h_a, mask_a, h_b, mask_b)
    b_to_a = np_query_cross_attention(layer["b_to_a"],
                                      np_query_update(layer["query_update"], b_to_a),
                                      h_b, mask_b, h_a, mask_a)
  return np_dense(p["fuse"], np.concatenate([a_to_b, b_to_a], -1))


def np_conv_same(p, x):
  kernel = p["kernel"]  # (k, in, out)
  k = kernel.shape[0]
  padded = np.pad(x, ((0, 0), ((k - 1) // 2, k // 2), (0, 0)))
  return sum(padded[:, j:j + x.shape[1]] @ kernel[j] for j in range(k)) + p["bias"]


def np_align(x, mask, length):
  """torch AdaptiveAvgPool1d bins, averaging only the real frames of each bin."""
  n = x.shape[1]
  out, out_mask = np.zeros((x.shape[0], length, x.shape[2])), np.zeros((x.shape[0], length), bool)
  for i in range(length):
    start, end = (i * n) // length, math.ceil((i + 1) * n / length)
    real = mask[:, start:end]
    count = real.sum(1)
    out[:, i] = (x[:, start:end] * real[..., None]).sum(1) / np.maximum(count, 1)[:, None]
    out_mask[:, i] = count > 0
  return out, out_mask


def np_masked_mean(x, mask):
  return (x * mask[..., None]).sum(-2) / np.maximum(mask.sum(-1), 1)[..., None]


def np_head(p, x):
  return np_dense(p["out"], np_gelu(np_dense(p["hidden"], x)))


def np_dqf(params, batch, num_layers, length):
  p = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), params)
  encoded, masks = [], []
  for index, name in enumerate(("text", "audio", "vision")):
    mask = batch[f"{name}_mask"] & batch["modality_mask"][:, index:index + 1]
    x = np.where(mask[..., None], np.asarray(batch[name], np.float64), 0.0)
    x = np.where(mask[..., None], np_conv_same(p[f"proj_{name}"]["conv"], x), 0.0)
    x, mask = np_align(x, mask, length)
    # The vmapped Q-UA stacks: modality `index`'s weights are row `index` of `qua`.
    encoded.append(np_qua(jax.tree.map(lambda leaf, i=index: leaf[i], p["qua"]), x, mask,
                          num_layers))
    masks.append(mask)
  unimodal = [np_masked_mean(h, m) for h, m in zip(encoded, masks, strict=True)]
  bimodal = [np_qca(jax.tree.map(lambda leaf, i=pair: leaf[i], p["qca"]), encoded[a], masks[a],
                    encoded[b], masks[b], num_layers).mean(1)
             for pair, (a, b) in enumerate(dqf.PAIRS)]
  tokens = np.stack(bimodal + [np.broadcast_to(p["cls"][0], bimodal[0].shape)], axis=1)
  trimodal = np_transformer_layer(p["mhsa"], tokens).mean(1)
  granularities = unimodal + bimodal + [trimodal]
  features = np.concatenate(granularities, -1)
  aux = np.stack([np_head(p[f"head_{name}"], g)
                  for name, g in zip(("L", "A", "V", "LA", "LV", "AV", "LAV"), granularities,
                                     strict=True)], axis=1)
  return {"output": np_head(p["head"], features), "embedding": features, "aux_outputs": aux}


@pytest.mark.slow
def test_forward_matches_an_independent_numpy_computation():
  """Two layers, unequal lengths (align_length pools up), padding, an absent modality and a
  sample with text only: every output of the flax forward against float64 numpy."""
  spec = tiny_spec("classification", lengths=(4, 3, 5), dims=(5, 3, 2), num_classes=3)
  (stage,) = dqf.build(tiny_config(width=8, num_layers=2, mlp_dim=12, head_hidden=6), spec)
  batch = random_batch(spec, batch_size=3, seed=4, real_lengths=([4, 2, 3], [3, 1, 2],
                                                                 [5, 4, 1]))
  batch["modality_mask"] = np.array([[True, True, True], [True, False, True],
                                     [True, False, False]])
  params = random_params(stage.model, batch, seed=5)
  out = jax.device_get(forward_fn(stage)(params, batch))
  reference = np_dqf(params, batch, num_layers=2, length=5)
  for key in ("output", "embedding", "aux_outputs"):
    np.testing.assert_allclose(out[key], reference[key], rtol=2e-4, atol=2e-5, err_msg=key)
  assert np.abs(reference["output"]).max() > 1e-3  # not a comparison of zeros


@pytest.mark.slow
def test_masks_in_the_network_equal_one_forward_per_masked_batch():
  """Validation's fixed combinations in one forward (`Stage.masks_in_network`: the
  unimodal encoders run once, absent modalities once per stage): every scenario's
  outputs equal the forward on `apply_modality_mask`ed inputs, and float64 numpy."""
  spec = tiny_spec("classification", lengths=(4, 3, 5), dims=(5, 3, 2), num_classes=3)
  (stage,) = dqf.build(tiny_config(width=8, num_layers=2, mlp_dim=12, head_hidden=6), spec)
  assert stage.masks_in_network
  batch = random_batch(spec, batch_size=3, seed=4, real_lengths=([4, 2, 3], [3, 1, 2],
                                                                 [5, 4, 1]))
  batch["modality_mask"] = np.array([[True, True, True], [True, False, True],
                                     [True, True, True]])  # the data lacks row 1's audio
  params = random_params(stage.model, batch, seed=5)
  combinations = np.stack([missing.fixed_modality_mask(3, c) for c in range(7)], axis=1)
  combinations[2] = np.random.default_rng(0).random((7, 3)) < 0.5  # a row of its own
  out = jax.device_get(jax.jit(lambda p, b, m: stage.predict(
      p, {}, b, scenario_modality_mask=m))(params, batch, combinations))
  chex.assert_shape(out["output"], (3, 7, 3))
  chex.assert_shape(out["embedding"], (3, 7, 7 * 8))
  forward = forward_fn(stage)
  for index in range(7):
    masked = missing.apply_modality_mask(batch, combinations[:, index])
    want = jax.device_get(forward(params, masked))
    for key in ("output", "embedding"):
      np.testing.assert_allclose(out[key][:, index], want[key], rtol=1e-5, atol=1e-6,
                                 err_msg=f"{key} of combination {index}")
    reference = np_dqf(params, jax.device_get(masked), num_layers=2, length=5)
    np.testing.assert_allclose(out["output"][:, index], reference["output"], rtol=2e-4,
                               atol=2e-5)
  assert not np.allclose(out["output"][:, 0], out["output"][:, 6], atol=1e-3)  # L vs LAV


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name,dataset,task", [("dqf_mosei.py", "mosei", "regression"),
                                               ("dqf_meld.py", "meld", "classification")])
def test_real_configs_read_merbench_features_with_momentum_sgd(name, dataset, task, tmp_path):
  path = os.path.join(REPO, "configs", name)
  features = ("Baichuan-13B-Base-FRA", "wav2vec2-large-960h-FRA", "clip-vit-large-patch14-FRA")
  (tmp_path / "label.npz").write_bytes(b"labels")
  for folder in features:
    (tmp_path / "features" / folder).mkdir(parents=True)
  real = parse_flags(f"--config={path}", f"--config.data.dir={tmp_path}")
  assert (real.data.source, real.data.name, real.data.task) == ("merbench", dataset, task)
  # What the MERBench builder reads for this config (dqf.txt Sec. 4.2).
  builder_config = merbench.make_config(real.data)
  assert builder_config.features == features
  assert builder_config.max_lengths == (50, 50, 50)
  assert (real.train.optimizer, real.train.learning_rate, real.train.momentum,
          real.train.weight_decay, real.train.schedule, real.train.batch_size,
          real.train.num_epochs) == ("sgd", 1e-5, 0.9, 0.0, "constant", 64, 100)
  assert (real.model.num_layers, real.model.num_heads) == (6, 4)
  assert (real.model.unimodal_encoder, real.model.pair_fusion) == ("qua", "qca")
  assert real.missing.kind == "frame_dqf"
  for variant in ("synthetic", "tiny"):
    small = parse_flags(f"--config={path}:{variant}")
    assert small.data.source == "synthetic"
    assert (small.train.optimizer, small.train.schedule) == ("adamw", "cosine")


@pytest.mark.slow
def test_short_training_lowers_the_loss():
  spec = tiny_spec("classification")
  (stage,) = dqf.build(tiny_config(kind="none"), spec)
  batch = random_batch(spec, batch_size=16, seed=3)
  # A learnable signal: the class shifts the text features.
  batch["text"] = batch["text"] + batch["label"][:, None, None].astype(np.float32)
  params = jax.jit(lambda key: stage.model.init({"params": key}, batch,
                                                train=False)["params"])(jax.random.key(0))
  # The vmapped stacks start from their own weights, as three separate stacks would.
  for block in ("qua", "qca"):
    queries = np.asarray(params[block]["queries"])
    assert not np.allclose(queries[0], queries[1]) and not np.allclose(queries[1], queries[2])
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, key):
    (loss, _), grads = jax.value_and_grad(stage.loss_fn, has_aux=True)(
        params, {}, batch, key, StageContext())
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for i in range(30):
    params, opt_state, loss = step(params, opt_state, jax.random.key(i))
    losses.append(float(loss))
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])

