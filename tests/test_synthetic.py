"""Synthetic presets: layout, determinism, label distributions, the L > A > V hierarchy,
and the TFDS (array_record, no TensorFlow) round trip, also through many shards."""

import math
import os
import sys

import chex
import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python.array_record_data_source import ArrayRecordDataSource
from helpers import force_streamed_shards
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.preprocessing import StandardScaler

from mer_jax.data import synthetic
from mer_jax.data.builders import common, streaming
from mer_jax.data.builders.synthetic import SyntheticMer, config_name, make_config
from mer_jax.data.spec import MODALITIES

# Real widths and lengths the presets must have (SPEC section 9 and the papers).
EXPECTED_SHAPES = {
    "mosi": ((768, 5, 20), (50, 50, 50)),
    "mosei": ((768, 74, 35), (50, 50, 50)),
    "sims": ((768, 33, 709), (39, 400, 55)),
    "iemocap": ((300, 74, 35), (20, 20, 20)),
    "meld": ((5120, 1024, 768), (16, 16, 16)),
    "msp_improv": ((768, 768, 342), (32, 50, 50)),
}


def mean_pooled(split, name):
  x, mask = split[name].astype(np.float64), split[f"{name}_mask"]
  return x.sum(1) / mask.sum(1, keepdims=True)


def assert_splits_equal(actual, expected):
  assert set(actual) == set(expected)
  for key in expected:
    assert actual[key].dtype == expected[key].dtype, key
    np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


def test_every_preset_is_tested():
  assert set(synthetic.PRESETS) == set(EXPECTED_SHAPES)


@pytest.mark.parametrize("preset", sorted(EXPECTED_SHAPES))
def test_layout_shapes_dtypes_and_padding(preset):
  num = 12
  dims, lengths = EXPECTED_SHAPES[preset]
  split = synthetic.generate(preset, "valid", num_samples=num)
  spec = synthetic.spec_for(preset)
  assert spec.dims == dims and spec.lengths == lengths and spec.name == preset
  assert set(split) == {*MODALITIES, *(f"{m}_mask" for m in MODALITIES), "label", "id"}
  for index, name in enumerate(MODALITIES):
    x, mask = split[name], split[f"{name}_mask"]
    chex.assert_shape(x, (num, lengths[index], dims[index]))
    chex.assert_shape(mask, (num, lengths[index]))
    assert x.dtype == np.float32 and mask.dtype == np.bool_
    assert np.isfinite(x).all()
    real = mask.sum(1)
    # Masks are a prefix of real frames, at least 30% of T, and padding is exactly zero.
    np.testing.assert_array_equal(mask, np.arange(lengths[index])[None] < real[:, None])
    assert real.min() >= math.ceil(0.3 * lengths[index]) and real.max() <= lengths[index]
    assert not np.any(x[~mask]), "padding frames must be zero"
    assert np.all(np.abs(x[mask]).sum(-1) > 0), "real frames must carry features"
  if synthetic.PRESETS[preset].aligned:
    np.testing.assert_array_equal(split["text_mask"], split["audio_mask"])
    np.testing.assert_array_equal(split["text_mask"], split["vision_mask"])
  if spec.task == "regression":
    assert split["label"].dtype == np.float32 and split["label"].shape == (num,)
  else:
    assert split["label"].dtype == np.int32 and split["label"].shape == (num,)
    assert spec.num_classes == len(spec.class_names)
  assert split["id"].dtype.kind == "U" and len(set(split["id"])) == num


def test_same_seed_same_data_and_splits_and_seeds_differ():
  first = synthetic.generate("iemocap", "train", seed=3, num_samples=40)
  assert_splits_equal(synthetic.generate("iemocap", "train", seed=3, num_samples=40), first)
  other_split = synthetic.generate("iemocap", "valid", seed=3, num_samples=40)
  other_seed = synthetic.generate("iemocap", "train", seed=4, num_samples=40)
  for other in (other_split, other_seed):
    assert not np.allclose(other["text"], first["text"])
    assert not np.array_equal(other["text_mask"], first["text_mask"])
  assert set(other_split["id"]).isdisjoint(first["id"])


def test_fewer_samples_give_a_prefix():
  # 200 rows span two generation chunks: the prefix must hold across the boundary.
  full = synthetic.generate("mosi", "test", num_samples=200)
  part = synthetic.generate("mosi", "test", num_samples=150)
  assert_splits_equal(part, {k: v[:150] for k, v in full.items()})


def test_splits_share_the_label_structure():
  # A probe fitted on one split must transfer to another: same read-outs and projections.
  train = synthetic.generate("iemocap", "train", num_samples=384)
  test = synthetic.generate("iemocap", "test", num_samples=384)
  other_seed = synthetic.generate("iemocap", "test", seed=9, num_samples=384)
  scaler = StandardScaler().fit(mean_pooled(train, "text"))
  probe = LogisticRegression(C=0.05, max_iter=2000).fit(
      scaler.transform(mean_pooled(train, "text")), train["label"])
  same = probe.score(scaler.transform(mean_pooled(test, "text")), test["label"])
  different = probe.score(scaler.transform(mean_pooled(other_seed, "text")),
                          other_seed["label"])
  assert same > 0.6
  assert different < 0.5  # another seed draws other read-outs: the probe does not transfer


@pytest.mark.parametrize("preset", ["mosi", "mosei", "sims"])
def test_regression_labels_look_like_sentiment(preset):
  info = synthetic.PRESETS[preset]
  labels = synthetic.generate(preset, "train", num_samples=512)["label"]
  low, high = info.label_range
  assert labels.min() >= low and labels.max() <= high
  grid = labels / info.label_step
  np.testing.assert_allclose(grid, np.round(grid), atol=1e-4)  # annotation grid
  zeros = np.mean(labels == 0)
  assert 0.03 < zeros < 0.3  # exact zeros make acc2_has0 and acc2_non0 differ
  assert np.mean(labels > 0) > 0.25 and np.mean(labels < 0) > 0.25
  assert np.mean(np.abs(labels) <= 0.5 * high) > 0.5  # mass near 0 ...
  assert np.abs(labels).max() >= 0.8 * high  # ... and a spread to the ends


@pytest.mark.parametrize("preset", ["iemocap", "meld", "msp_improv"])
def test_class_labels_follow_the_priors(preset):
  info = synthetic.PRESETS[preset]
  num = 512
  labels = synthetic.generate(preset, "train", num_samples=num)["label"]
  assert labels.min() >= 0 and labels.max() < info.num_classes
  freq = np.bincount(labels, minlength=info.num_classes) / num
  priors = np.asarray(info.class_priors)
  # 4 binomial standard deviations per class.
  np.testing.assert_array_less(np.abs(freq - priors), 4 * np.sqrt(priors * (1 - priors) / num))


def test_modality_hierarchy_classification():
  train = synthetic.generate("iemocap", "train", num_samples=768)
  test = synthetic.generate("iemocap", "test", num_samples=512)
  majority = np.bincount(test["label"]).max() / len(test["label"])
  acc = {}
  for name in MODALITIES:
    scaler = StandardScaler().fit(mean_pooled(train, name))
    probe = LogisticRegression(C=0.05, max_iter=2000).fit(
        scaler.transform(mean_pooled(train, name)), train["label"])
    acc[name] = probe.score(scaler.transform(mean_pooled(test, name)), test["label"])
  assert acc["text"] > acc["audio"] + 0.05 > acc["vision"] + 0.1, acc
  assert acc["vision"] > majority + 0.05, acc  # weak but not useless
  assert acc["text"] < 0.95, acc  # learnable, not trivial


def test_modality_hierarchy_regression():
  train = synthetic.generate("mosei", "train", num_samples=768)
  test = synthetic.generate("mosei", "test", num_samples=512)
  corr = {}
  for name in MODALITIES:
    scaler = StandardScaler().fit(mean_pooled(train, name))
    probe = Ridge(alpha=300.0).fit(scaler.transform(mean_pooled(train, name)), train["label"])
    pred = probe.predict(scaler.transform(mean_pooled(test, name)))
    corr[name] = np.corrcoef(pred, test["label"])[0, 1]
  assert corr["text"] > corr["audio"] + 0.05 > corr["vision"] + 0.1, corr
  assert corr["vision"] > 0.2, corr
  assert corr["text"] < 0.95, corr


def test_to_multilabel_binary():
  labels = np.array([0, 3, 1, 1, 2], np.int32)
  binary = synthetic.to_multilabel_binary(labels, 4)
  chex.assert_shape(binary, (5, 4))
  assert binary.dtype == np.int32
  np.testing.assert_array_equal(binary, np.eye(4, dtype=np.int32)[labels])
  with pytest.raises(ValueError):
    synthetic.to_multilabel_binary(np.array([0, 4]), 4)


def test_spec_for_tasks():
  spec = synthetic.spec_for("iemocap", "multilabel_binary")
  assert spec.task == "multilabel_binary" and spec.num_classes == 4
  assert spec.output_shape == (4, 2)
  assert synthetic.spec_for("mosei").output_shape == ()
  assert synthetic.spec_for("mosei").label_range == (-3.0, 3.0)
  assert synthetic.spec_for("sims").label_range == (-1.0, 1.0)
  assert synthetic.spec_for("meld").class_names[0] == "neutral"
  with pytest.raises(ValueError, match="supports task"):
    synthetic.spec_for("mosei", "classification")
  with pytest.raises(ValueError, match="unknown synthetic preset"):
    synthetic.spec_for("cmu_mosi")
  binary = synthetic.generate("msp_improv", "test", num_samples=6, task="multilabel_binary")
  classes = synthetic.generate("msp_improv", "test", num_samples=6)
  np.testing.assert_array_equal(binary["label"], np.eye(4, dtype=np.int32)[classes["label"]])


def test_config_names_encode_seed_and_sizes():
  config = make_config("mosei", seed=2, sizes={"train": 100})
  assert config.name == config_name("mosei", 2, {"train": 100, "valid": 256, "test": 256})
  assert config.name == "mosei_s2_n100-256-256"
  assert SyntheticMer.builder_configs["meld"].sizes == synthetic.default_sizes("meld")
  with pytest.raises(ValueError, match=">= 1"):
    make_config("mosei", sizes={"valid": 0})
  with pytest.raises(ValueError, match="unknown split"):
    make_config("mosei", sizes={"dev": 3})


def test_tfds_round_trip_equals_generate(tmp_path):
  sizes = {"train": 140, "valid": 9, "test": 11}
  splits, spec = common.load_synthetic("iemocap", data_dir=str(tmp_path), seed=1, sizes=sizes)
  assert spec == synthetic.spec_for("iemocap")
  for split, count in sizes.items():
    assert_splits_equal(splits[split], synthetic.generate("iemocap", split, seed=1,
                                                          num_samples=count))
  assert "tensorflow" not in sys.modules  # array_record + data source: no TensorFlow

  data_dir = tmp_path / "synthetic_mer" / "iemocap_s1_n140-9-11" / synthetic.GENERATOR_VERSION
  files = sorted(p for p in os.listdir(data_dir) if "array_record" in p)
  assert len(files) == 3
  stamps = {f: os.stat(data_dir / f).st_mtime_ns for f in files}
  # The second load reuses the prepared files and gives the same arrays.
  again, _ = common.load_synthetic("iemocap", data_dir=str(tmp_path), seed=1, sizes=sizes)
  assert {f: os.stat(data_dir / f).st_mtime_ns for f in files} == stamps
  for split in sizes:
    assert_splits_equal(again[split], splits[split])

  binary, binary_spec = common.load_synthetic("iemocap", data_dir=str(tmp_path), seed=1,
                                              sizes=sizes, task="multilabel_binary")
  assert binary_spec.task == "multilabel_binary"
  np.testing.assert_array_equal(binary["train"]["label"],
                                np.eye(4, dtype=np.int32)[splits["train"]["label"]])


def test_tfds_round_trip_regression(tmp_path):
  sizes = {"train": 20, "valid": 5, "test": 7}
  splits, spec = common.load_synthetic("sims", data_dir=str(tmp_path), sizes=sizes)
  assert spec.task == "regression"
  for split, count in sizes.items():
    assert_splits_equal(splits[split], synthetic.generate("sims", split, num_samples=count))


def test_large_split_path_streams_shards_equal_to_generate(tmp_path, monkeypatch):
  force_streamed_shards(monkeypatch)
  sizes = {"train": 13, "valid": 3, "test": 4}
  splits, _ = common.load_synthetic("mosi", data_dir=str(tmp_path), seed=2, sizes=sizes)
  assert "tensorflow" not in sys.modules
  builder = tfds.builder_from_directory(
      str(tmp_path / "synthetic_mer" / "mosi_s2_n13-3-4" / synthetic.GENERATOR_VERSION))
  for split, count in sizes.items():
    assert builder.info.splits[split].shard_lengths == [1] * count  # one example per shard
    assert_splits_equal(splits[split], synthetic.generate("mosi", split, seed=2,
                                                          num_samples=count))


def records(builder, split):
  """The serialized examples of a prepared split, in stored order."""
  return list(ArrayRecordDataSource([os.fspath(p) for p in
                                     builder.info.splits[split].filepaths]))


def test_streamed_shards_hold_the_records_tfds_writes(tmp_path, monkeypatch):
  config = make_config("iemocap", seed=3, sizes={"train": 7, "valid": 2, "test": 3})
  # TFDS's own writer (its in-memory shuffler is enough at this size) ...
  monkeypatch.setattr(SyntheticMer, "_download_and_prepare",
                      tfds.core.GeneratorBasedBuilder._download_and_prepare)
  stock = SyntheticMer(config=config, data_dir=str(tmp_path / "stock"),
                       file_format="array_record")
  common.prepare(stock)
  monkeypatch.undo()
  # ... and the streamed shards, three examples per shard: the same records, in order.
  example_bytes = len(records(stock, "valid")[0])
  monkeypatch.setattr(streaming, "SHARD_BYTES", 3 * example_bytes - 1)
  streamed = SyntheticMer(config=config, data_dir=str(tmp_path / "streamed"),
                          file_format="array_record")
  common.prepare(streamed)
  for split, count in config.sizes.items():
    assert stock.info.splits[split].num_shards == 1
    lengths = [3] * (count // 3) + [count % 3] * bool(count % 3)
    assert streamed.info.splits[split].shard_lengths == lengths
    assert records(streamed, split) == records(stock, split)
    assert streamed.info.splits[split].num_bytes == stock.info.splits[split].num_bytes


def test_streaming_writer_needs_increasing_keys(tmp_path):
  builder = SyntheticMer(config=make_config("mosi", sizes={"train": 2, "valid": 1, "test": 1}),
                         data_dir=str(tmp_path), file_format="array_record")
  template = tfds.core.ShardedFileTemplate(data_dir=tmp_path, dataset_name="x", split="train",
                                           filetype_suffix="array_record")
  examples = list(builder._generate_examples("train"))
  with pytest.raises(ValueError, match="keys must be increasing"):
    streaming.write_split("train", examples[::-1], features=builder.info.features,
                          template=template)
  with pytest.raises(ValueError, match="has no examples"):
    streaming.write_split("train", [], features=builder.info.features, template=template)


def test_default_data_dir(monkeypatch):
  monkeypatch.setenv(common.DATA_DIR_ENV, "/some/where")
  assert common.default_data_dir() == "/some/where"
  monkeypatch.delenv(common.DATA_DIR_ENV)
  assert common.default_data_dir() == os.path.join(os.path.expanduser("~"), ".cache",
                                                   "mer_jax", "tfds")
