"""Real data sources: fixture files written in each community format (MMSA and MulT
pickles, MERBench label npz + per-utterance .npy, MMIN h5 + fold targets, bring-your-own
npz), built through the TFDS builders and checked against numpy; every kind of bad input
fails with a message naming the file and key; source changes re-prepare; every format
through the large-split path (many shards, no TensorFlow); cross-dataset width
adaptation; fold counts. Training on each format: tests/test_sources_e2e.py."""

import glob
import importlib.util
import logging
import os
import pickle
import sys

import chex
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import REPO
from helpers import force_streamed_shards

from mer_jax.data import sources, validation
from mer_jax.data.builders import files, mmsa
from mer_jax.data.spec import MODALITIES, DataSpec

RNG = np.random.default_rng(0)


def data_config(tmp_path, source, name, task, directory, **extra):
  config = ml_collections.ConfigDict({
      "source": source, "name": name, "task": task, "dir": str(directory), "fold": 0,
      "cache_dir": str(tmp_path / "tfds"), **extra})
  return config


def snapshot(directory):
  """(path, size, mtime) of every file and folder below `directory`."""
  out = []
  for root, dirs, names in os.walk(directory):
    for name in sorted(dirs + names):
      stat = os.stat(os.path.join(root, name))
      out.append((os.path.relpath(os.path.join(root, name), directory), stat.st_size,
                  stat.st_mtime_ns))
  return sorted(out)


# ----------------------------------------------------------------------------- fixture writers


def prefix_mask(lengths, length):
  return np.arange(length)[None, :] < np.asarray(lengths)[:, None]


def mmsa_split(num, dims, lengths, *, aligned, sims=False, label_scale=3.0):
  t_len, a_len, v_len = lengths
  text_lengths = RNG.integers(2, t_len + 1, num)
  part = {
      "text": RNG.normal(size=(num, t_len, dims[0])).astype(np.float32),
      "audio": RNG.normal(size=(num, a_len, dims[1])).astype(np.float32),
      "vision": RNG.normal(size=(num, v_len, dims[2])).astype(np.float32),
      "text_bert": np.stack([RNG.integers(1, 999, (num, t_len)),
                             prefix_mask(text_lengths, t_len).astype(np.int64),
                             np.zeros((num, t_len), np.int64)], axis=1).astype(np.float32),
      "regression_labels": RNG.uniform(-label_scale, label_scale, num).astype(np.float32),
      "classification_labels": RNG.integers(0, 3, num),
      "id": np.asarray([f"vid{i}_{j}" for i, j in zip(range(num), RNG.integers(0, 9, num),
                                                     strict=True)], dtype=object),
      "raw_text": np.asarray(["some words"] * num, dtype=object),
  }
  # Log-energies of silence: -inf on real audio frames, as in the released pickles.
  part["audio"][0, 0, 0] = -np.inf
  part["audio"][num - 1, 1, :2] = -np.inf
  if not aligned:
    part["audio_lengths"] = [int(v) for v in RNG.integers(1, a_len + 1, num)]
    part["vision_lengths"] = RNG.integers(1, v_len + 1, num)
  if sims:
    for m in "TAV":
      part[f"regression_labels_{m}"] = RNG.uniform(-1, 1, num).astype(np.float32)
  return part


def write_mmsa(folder, file_name="unaligned_50.pkl", *, sizes=(6, 4, 4), dims=(6, 5, 4),
               lengths=(8, 10, 7), aligned=False, sims=False, label_scale=3.0, edit=None):
  os.makedirs(folder, exist_ok=True)
  data = {split: mmsa_split(n, dims, lengths, aligned=aligned, sims=sims,
                            label_scale=label_scale)
          for split, n in zip(("train", "valid", "test"), sizes, strict=True)}
  if edit:
    edit(data)
  path = os.path.join(folder, file_name)
  with open(path, "wb") as f:
    pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
  return path, data


def write_mult(folder, dataset="iemocap", *, sizes=(6, 4, 4), dims=(7, 5, 4), length=5,
               edit=None):
  os.makedirs(folder, exist_ok=True)
  data = {}
  for split, num in zip(("train", "valid", "test"), sizes, strict=True):
    part = {name: RNG.normal(size=(num, length, d)).astype(np.float32)
            for name, d in zip(("text", "audio", "vision"), dims, strict=True)}
    part["audio"][1 % num, 2, 1] = -np.inf
    if dataset == "iemocap":
      present = RNG.integers(0, 2, (num, 4))
      part["labels"] = np.eye(2, dtype=np.float32)[present]  # (N, 4, 2) one-hot pairs
      part["id"] = np.asarray([f"Ses0{1 + i % 5}F_impro0{i}" for i in range(num)])
    else:
      part["labels"] = RNG.uniform(-3, 3, (num, 1, 1)).astype(np.float32)
      part["id"] = np.asarray([[f"v{i}".encode(), b"0", str(i).encode()] for i in range(num)])
    data[split] = part
  if edit:
    edit(data)
  path = os.path.join(folder, {"iemocap": "iemocap_data.pkl", "mosi": "mosi_data.pkl",
                               "mosei": "mosei_senti_data.pkl"}[dataset])
  with open(path, "wb") as f:
    pickle.dump(data, f)
  return path, data


MERBENCH_FEATURES = ("Baichuan-13B-Base-FRA", "wav2vec2-large-960h-UTT", "clip-vit-large-FRA")


def write_merbench(folder, *, whole=False, names_per_split=(5, 3, 3), dims=(6, 5, 4),
                   max_frames=(6, 1, 4), empty_face=None, classes=7):
  """MELD-style label.npz (train/val/test corpora) or IEMOCAP whole_corpus; text
  frame-level .npy, audio utterance-level (D,) .npy (frame-level when max_frames[1] > 1),
  vision per-face folders."""
  features = {m: os.path.join(folder, "features", n)
              for m, n in zip(MODALITIES, MERBENCH_FEATURES, strict=True)}
  for path in features.values():
    os.makedirs(path, exist_ok=True)
  if whole:
    names = [f"Ses0{s}{g}_impro0{i}_{g}{i:03d}" for s in range(1, 6)
             for i in range(names_per_split[0]) for g in "FM"[:1 + i % 2]]
    corpora = {"whole_corpus": {n: {"emo": int(RNG.integers(0, classes)), "val": -10}
                                for n in names}}
  else:
    corpora = {}
    for key, num in zip(("train_corpus", "val_corpus", "test_corpus"), names_per_split,
                        strict=True):
      corpora[key] = {f"{key[:3]}_dia{i}_utt{i}": {"emo": int(RNG.integers(0, classes)),
                                                   "val": -10} for i in range(num)}
  raw = {}
  for corpus in corpora.values():
    for index, name in enumerate(corpus):
      t = int(RNG.integers(1, max_frames[0] + 1)) if index else max_frames[0]
      text = RNG.normal(size=(t, dims[0])).astype(np.float32)
      if max_frames[1] == 1:  # utterance-level: one (D,) vector
        audio = RNG.normal(size=(1, dims[1])).astype(np.float32)
        np.save(os.path.join(features["audio"], name + ".npy"), audio[0])
      else:
        a = int(RNG.integers(1, max_frames[1] + 1)) if index else max_frames[1]
        audio = RNG.normal(size=(a, dims[1])).astype(np.float32)
        np.save(os.path.join(features["audio"], name + ".npy"), audio)
      np.save(os.path.join(features["text"], name + ".npy"), text)
      face_dir = os.path.join(features["vision"], name)
      os.makedirs(face_dir, exist_ok=True)
      faces = 0 if name == empty_face else (
          max_frames[2] if index == 0 else int(RNG.integers(1, max_frames[2] + 1)))
      vision = RNG.normal(size=(faces, dims[2])).astype(np.float32)
      for frame in range(faces):
        np.save(os.path.join(face_dir, f"face_{frame:03d}.npy"), vision[frame])
      raw[name] = (text, audio, vision)
  label_file = "label_4way.npz" if whole else "label.npz"
  np.savez_compressed(os.path.join(folder, label_file), **corpora)
  return os.path.join(folder, label_file), corpora, raw


def iemocap_names(per_speaker):
  return [f"Ses0{s}{g}_impro01_{g}{i:03d}" for s in range(1, 6) for g in "FM"
          for i in range(per_speaker)]


def write_mmin(folder, *, per_speaker=2, dims=(6, 5, 4), max_frames=(5, 7, 4),
               mean_std=True, edit=None):
  """MMIN IEMOCAP: {L,A,V}/<type>.h5, A/comparE_mean_std.h5, target/1..10 (fold 2s-1
  validates on speaker F and tests on M of session s; fold 2s the reverse)."""
  import h5py

  names = iemocap_names(per_speaker)
  raw = {}
  for modality, folder_name, kind, width, frames in zip(
      MODALITIES, ("L", "A", "V"), ("bert_large", "comparE", "denseface"), dims, max_frames,
      strict=True):
    os.makedirs(os.path.join(folder, folder_name), exist_ok=True)
    with h5py.File(os.path.join(folder, folder_name, f"{kind}.h5"), "w") as h5:
      for index, name in enumerate(names):
        t = frames if index == 0 else int(RNG.integers(1, frames + 1))
        x = RNG.normal(2.0, 3.0, size=(t, width)).astype(np.float32)
        h5[name] = x
        raw.setdefault(name, {})[modality] = x
  stats = {}
  if mean_std:
    with h5py.File(os.path.join(folder, "A", "comparE_mean_std.h5"), "w") as h5:
      for cv in range(1, 11):
        mean = RNG.normal(size=dims[1]).astype(np.float32)
        std = RNG.uniform(0.5, 2.0, dims[1]).astype(np.float32)
        std[0] = 0.0 if cv == 3 else std[0]  # a zero std is treated as 1 (MMIN's rule)
        h5[f"{cv}/mean"], h5[f"{cv}/std"] = mean, std
        stats[cv] = (mean, std)
  labels = {name: int(RNG.integers(0, 4)) for name in names}
  targets = {}
  for cv in range(1, 11):
    session = (cv + 1) // 2
    val_speaker, test_speaker = ("F", "M") if cv % 2 else ("M", "F")
    parts = {
        "trn": [n for n in names if not n.startswith(f"Ses0{session}")],
        "val": [n for n in names if n.startswith(f"Ses0{session}{val_speaker}")],
        "tst": [n for n in names if n.startswith(f"Ses0{session}{test_speaker}")],
    }
    os.makedirs(os.path.join(folder, "target", str(cv)), exist_ok=True)
    for prefix, split_names in parts.items():
      one_hot = np.eye(4, dtype=np.float32)[[labels[n] for n in split_names]]
      int2name = np.asarray([[n.encode()] for n in split_names])  # (N, 1) bytes, as MMIN
      if edit:
        one_hot, int2name = edit(cv, prefix, one_hot, int2name)
      np.save(os.path.join(folder, "target", str(cv), f"{prefix}_label.npy"), one_hot)
      np.save(os.path.join(folder, "target", str(cv), f"{prefix}_int2name.npy"), int2name)
    targets[cv] = parts
  return raw, labels, targets, stats


def write_npz(folder, *, sizes=(6, 4, 4), dims=(6, 5, 4), lengths=(5, 7, 3), task="regression",
              modalities=("text", "audio", "vision"), edit=None, extra_train=None):
  os.makedirs(folder, exist_ok=True)
  written = {}
  for split, num in zip(("train", "valid", "test"), sizes, strict=True):
    arrays = {}
    for name, width, length in zip(MODALITIES, dims, lengths, strict=True):
      if name in modalities:
        arrays[name] = RNG.normal(size=(num, length, width)).astype(np.float32)
        arrays[f"{name}_lengths"] = RNG.integers(1, length + 1, num)
    if task == "regression":
      arrays["label"] = RNG.uniform(-3, 3, num).astype(np.float32)
    elif task == "classification":
      arrays["label"] = np.eye(3)[RNG.integers(0, 3, num)]  # one-hot rows
    else:
      arrays["label"] = RNG.integers(0, 2, (num, 4))
    arrays["id"] = np.asarray([f"{split}-{i}" for i in range(num)])
    if split == "train" and extra_train:
      arrays.update(extra_train)
    if edit:
      edit(split, arrays)
    np.savez(os.path.join(folder, f"{split}.npz"), **arrays)
    written[split] = arrays
  return written


# ----------------------------------------------------------------------------- arrays


def expected_features(x, mask, length):
  out = np.zeros((x.shape[0], length, x.shape[2]), np.float32)
  out[:, :x.shape[1]] = np.where(mask[..., None], x, 0.0)
  return out


def test_mmsa_unaligned_arrays_masks_and_inf(tmp_path):
  src = tmp_path / "MOSI"
  path, data = write_mmsa(src)
  before = snapshot(src)
  splits, spec = sources.load(data_config(tmp_path, "mmsa", "mosi", "regression", path))
  assert snapshot(src) == before, "the user's folder must not be written"
  assert spec == DataSpec(name="mosi", task="regression", num_classes=1, dims=(6, 5, 4),
                          lengths=(8, 10, 7), label_range=(-3.0, 3.0))
  for split, part in data.items():
    got = splits[split]
    num = len(part["regression_labels"])
    assert set(got) == {*MODALITIES, "text_mask", "audio_mask", "vision_mask", "label", "id",
                        "text_ids", "text_segments"}
    text_mask = part["text_bert"][:, 1] > 0
    for key, row in (("text_ids", 0), ("text_segments", 2)):
      assert got[key].dtype == np.int32
      np.testing.assert_array_equal(got[key], np.where(text_mask, part["text_bert"][:, row], 0))
    audio_mask = prefix_mask(part["audio_lengths"], 10)
    vision_mask = prefix_mask(part["vision_lengths"], 7)
    audio = np.where(np.isneginf(part["audio"]), 0.0, part["audio"])
    np.testing.assert_array_equal(got["text_mask"], text_mask)
    np.testing.assert_array_equal(got["audio_mask"], audio_mask)
    np.testing.assert_array_equal(got["vision_mask"], vision_mask)
    np.testing.assert_array_equal(got["text"], expected_features(part["text"], text_mask, 8))
    np.testing.assert_array_equal(got["audio"], expected_features(audio, audio_mask, 10))
    np.testing.assert_array_equal(got["vision"],
                                  expected_features(part["vision"], vision_mask, 7))
    np.testing.assert_array_equal(got["label"], part["regression_labels"])
    np.testing.assert_array_equal(got["id"], part["id"].astype(str))
    chex.assert_shape(got["label"], (num,))
    assert got["label"].dtype == np.float32 and got["text_mask"].dtype == np.bool_
    assert np.isfinite(got["audio"]).all()


def test_mmsa_aligned_masks_follow_the_words_and_sims_keeps_unimodal_labels(tmp_path):
  path, data = write_mmsa(tmp_path / "MOSEI", "aligned_50.pkl", lengths=(6, 6, 6), aligned=True)
  splits, spec = sources.load(data_config(tmp_path, "mmsa", "mosei", "regression",
                                          tmp_path / "MOSEI"))
  assert spec.lengths == (6, 6, 6) and spec.name == "mosei"
  words = data["valid"]["text_bert"][:, 1] > 0
  for name in MODALITIES:
    np.testing.assert_array_equal(splits["valid"][f"{name}_mask"], words)
  path, data = write_mmsa(tmp_path / "SIMS", "unaligned_39.pkl", sims=True, label_scale=1.0)
  splits, spec = sources.load(data_config(tmp_path, "mmsa", "sims", "regression",
                                          tmp_path / "SIMS"))
  assert spec.label_range == (-1.0, 1.0)
  expected = np.stack([data["test"][f"regression_labels_{m}"] for m in "TAV"], axis=1)
  np.testing.assert_array_equal(splits["test"]["unimodal_labels"], expected)


def test_mult_iemocap_multilabel_binary(tmp_path):
  path, data = write_mult(tmp_path / "mult")
  before = snapshot(tmp_path / "mult")
  splits, spec = sources.load(data_config(tmp_path, "mult", "iemocap", "multilabel_binary",
                                          tmp_path / "mult"))
  assert snapshot(tmp_path / "mult") == before
  assert (spec.task, spec.num_classes, spec.class_names) == (
      "multilabel_binary", 4, ("neutral", "happy", "sad", "angry"))
  for split, part in data.items():
    got = splits[split]
    np.testing.assert_array_equal(got["label"], part["labels"].argmax(-1))
    assert got["label"].dtype == np.int32 and got["label"].shape == (len(part["labels"]), 4)
    audio = np.where(np.isneginf(part["audio"]), 0.0, part["audio"])
    np.testing.assert_array_equal(got["audio"], audio)
    assert got["vision_mask"].all()  # MulT files carry no lengths: every frame is real
    np.testing.assert_array_equal(got["id"], part["id"])


def test_mult_mosi_regression_and_joined_ids(tmp_path):
  path, data = write_mult(tmp_path / "mult", "mosi")
  splits, spec = sources.load(data_config(tmp_path, "mult", "mosi", "regression", path))
  assert spec.task == "regression" and spec.label_range == (-3.0, 3.0)
  np.testing.assert_array_equal(splits["train"]["label"], data["train"]["labels"].reshape(-1))
  assert splits["train"]["id"][2] == "v2_0_2"


def test_merbench_meld_frame_and_utterance_features(tmp_path):
  src = tmp_path / "meld-process"
  label_file, corpora, raw = write_merbench(src, empty_face="tes_dia1_utt1")
  before = snapshot(src)
  config = data_config(tmp_path, "merbench", "meld", "classification", src,
                       features=MERBENCH_FEATURES)
  splits, spec = sources.load(config)
  assert snapshot(src) == before
  assert spec.num_classes == 7 and spec.class_names[0] == "anger"
  assert spec.dims == (6, 5, 4) and spec.lengths == (6, 1, 4)
  for split, key in (("train", "train_corpus"), ("valid", "val_corpus"), ("test", "test_corpus")):
    got = splits[split]
    names = list(corpora[key])
    np.testing.assert_array_equal(got["id"], names)
    np.testing.assert_array_equal(got["label"], [corpora[key][n]["emo"] for n in names])
    for row, name in enumerate(names):
      for index, modality in enumerate(MODALITIES):
        x = raw[name][index]
        np.testing.assert_array_equal(got[modality][row, :len(x)], x)
        assert not got[modality][row, len(x):].any()
        np.testing.assert_array_equal(got[f"{modality}_mask"][row],
                                      np.arange(spec.lengths[index]) < len(x))
  # The utterance whose face folder is empty has no vision: modality_mask says so.
  row = list(corpora["test_corpus"]).index("tes_dia1_utt1")
  np.testing.assert_array_equal(splits["test"]["modality_mask"][row], [True, True, False])
  assert splits["train"]["modality_mask"].all()


def test_merbench_iemocap_session_folds_and_pooling_to_max_length(tmp_path):
  src = tmp_path / "iemocap-process"
  _, corpora, raw = write_merbench(src, whole=True, names_per_split=(4,), classes=4)
  names = list(corpora["whole_corpus"])
  config = data_config(tmp_path, "merbench", "iemocap", "classification", src,
                       features=MERBENCH_FEATURES, max_lengths=(3, 0, 0))
  assert sources.num_folds(config) == 5
  seen_test = []
  for fold in (0, 3):
    config.fold = fold
    splits, spec = sources.load(config)
    test, valid, train_ids = (set(splits[s]["id"]) for s in ("test", "valid", "train"))
    assert test == {n for n in names if n.startswith(f"Ses0{fold + 1}")}
    assert not (test & valid) and not (test & train_ids) and not (valid & train_ids)
    assert test | valid | train_ids == set(names)
    assert len(valid) == int(np.ceil(0.1 * (len(names) - len(test))))
    seen_test.append(test)
  assert not seen_test[0] & seen_test[1]
  # Text of 6 frames is average-pooled to max_lengths[0] = 3 groups of 2 frames.
  assert spec.lengths[0] == 3
  name = splits["train"]["id"][0]
  text = raw[name][0]
  groups = np.array_split(np.arange(len(text)), min(3, len(text)))
  expected = np.stack([text[g].mean(0) for g in groups])
  np.testing.assert_allclose(splits["train"]["text"][0, :len(groups)], expected, rtol=1e-6)
  config.fold = 5
  with pytest.raises(ValueError, match="outside range"):
    sources.load(config)


def test_mmin_speaker_and_session_folds_with_per_fold_normalisation(tmp_path):
  src = tmp_path / "IEMOCAP_features"
  raw, labels, targets, stats = write_mmin(src)
  config = data_config(tmp_path, "mmin", "iemocap", "classification", src)
  assert sources.num_folds(config) == 10
  config.fold = 2  # speaker folds: target/3 (session 2, val F, test M)
  before = snapshot(src)
  splits, spec = sources.load(config)
  assert snapshot(src) == before
  assert spec.num_classes == 4 and spec.class_names == ("angry", "happy", "neutral", "sad")
  mean, std = stats[3]
  std = np.where(std == 0, 1.0, std)
  for split, prefix in (("train", "trn"), ("valid", "val"), ("test", "tst")):
    got = splits[split]
    np.testing.assert_array_equal(got["id"], targets[3][prefix])
    np.testing.assert_array_equal(got["label"], [labels[n] for n in targets[3][prefix]])
    for row, name in enumerate(targets[3][prefix]):
      audio = raw[name]["audio"]
      np.testing.assert_allclose(got["audio"][row, :len(audio)], (audio - mean) / std,
                                 rtol=1e-5, atol=1e-6)
      assert not got["audio"][row, len(audio):].any()  # padding stays zero
      text = raw[name]["text"]
      np.testing.assert_array_equal(got["text"][row, :len(text)], text)  # no stats: raw
  # Session folds (CM-ARR's 5): test_mmin_session_folds_test_whole_unseen_sessions.
  with config.unlocked():
    config.num_folds = 5
  assert sources.num_folds(config) == 5
  config.num_folds = 4
  with pytest.raises(ValueError, match="10 speaker folds"):
    sources.load(config)


def test_mmin_session_folds_test_whole_unseen_sessions(tmp_path):
  """CM-ARR's leave-one-session-out folds: fold k tests on both speakers of session k+1,
  validation is a fixed 10% of the training sessions, and no speaker of the test
  session is in train or validation."""
  src = tmp_path / "IEMOCAP_features"
  per_speaker = 5
  _, labels, targets, _ = write_mmin(src, per_speaker=per_speaker)
  names = iemocap_names(per_speaker)
  config = data_config(tmp_path, "mmin", "iemocap", "classification", src, num_folds=5)
  for fold in range(5):
    config.fold = fold
    splits, _ = sources.load(config)
    ids = {split: [str(n) for n in splits[split]["id"]] for split in files.SPLITS}
    session = f"Ses0{fold + 1}"
    assert sorted(ids["test"]) == sorted(n for n in names if n.startswith(session))
    speakers = {split: {n[:6] for n in ids[split]} for split in files.SPLITS}  # "Ses02F"
    assert speakers["test"] == {f"{session}F", f"{session}M"}
    assert not speakers["test"] & (speakers["train"] | speakers["valid"])
    training = targets[2 * fold + 1]["trn"]  # the four other sessions
    assert not set(ids["train"]) & set(ids["valid"])
    assert sorted(ids["train"] + ids["valid"]) == sorted(training)
    assert len(ids["valid"]) == int(np.ceil(0.1 * len(training)))
    for split in files.SPLITS:
      np.testing.assert_array_equal(splits[split]["label"], [labels[n] for n in ids[split]])
  # Target folders 2s-1 and 2s must split the same session: otherwise the fold is refused.
  def drop_a_validation_row(cv, prefix, one_hot, int2name):
    return (one_hot[1:], int2name[1:]) if (cv, prefix) == (2, "val") else (one_hot, int2name)

  bad = tmp_path / "bad"
  write_mmin(bad, per_speaker=per_speaker, edit=drop_a_validation_row)
  bad_config = data_config(tmp_path, "mmin", "iemocap", "classification", bad, num_folds=5)
  with pytest.raises(validation.DataError, match="tst \\+ val differ"):
    sources.load(bad_config)


def test_mmin_raw_audio_is_standardised_with_training_statistics(tmp_path):
  import h5py

  src = tmp_path / "MSP"
  raw, _, targets, _ = write_mmin(src, mean_std=False)
  os.rename(src / "A" / "comparE.h5", src / "A" / "comparE_raw.h5")
  config = data_config(tmp_path, "mmin", "msp_improv", "classification", src)
  splits, _ = sources.load(config)
  train_frames = np.concatenate([raw[n]["audio"] for n in targets[1]["trn"]])
  mean, std = train_frames.mean(0), train_frames.std(0)
  name = targets[1]["tst"][0]
  np.testing.assert_allclose(splits["test"]["audio"][0, :len(raw[name]["audio"])],
                             (raw[name]["audio"] - mean) / std, rtol=1e-4, atol=1e-5)
  with h5py.File(src / "V" / "denseface.h5", "r") as h5:
    np.testing.assert_array_equal(splits["test"]["vision"][0, :len(h5[name])], h5[name][()])


def test_npz_two_modalities_one_hot_labels_and_named_views(tmp_path):
  src = tmp_path / "mine"
  written = write_npz(src, task="classification", modalities=("text", "audio"),
                      extra_train={"class_names": np.asarray(["neg", "neu", "pos"])})
  config = data_config(tmp_path, "npz", "mine", "classification", src)
  splits, spec = sources.load(config)
  assert spec.num_classes == 3 and spec.class_names == ("neg", "neu", "pos")
  assert spec.dims == (6, 5, 1)
  for split, arrays in written.items():
    got = splits[split]
    np.testing.assert_array_equal(got["label"], arrays["label"].argmax(1))
    mask = prefix_mask(arrays["audio_lengths"], 7)
    np.testing.assert_array_equal(got["audio_mask"], mask)
    np.testing.assert_array_equal(got["audio"], expected_features(arrays["audio"], mask, 7))
    assert not got["vision_mask"].any() and not got["vision"].any()
    np.testing.assert_array_equal(got["modality_mask"],
                                  np.tile([True, True, False], (len(got["label"]), 1)))
  # Other key names map to the slots: audio -> vision slot, text stays, audio slot empty.
  with config.unlocked():
    config.features = ("text", "", "audio")
  splits, spec = sources.load(config)
  assert spec.dims == (6, 1, 5)
  mask = prefix_mask(written["valid"]["audio_lengths"], 7)
  np.testing.assert_array_equal(splits["valid"]["vision"],
                                expected_features(written["valid"]["audio"], mask, 7))
  assert not splits["valid"]["modality_mask"][:, 1].any()


# ----------------------------------------------------------------------------- preparation


def test_changed_source_file_is_prepared_again_and_prepared_data_skip_the_source(
    tmp_path, monkeypatch):
  src = tmp_path / "MOSI"
  path, first = write_mmsa(src)
  config = data_config(tmp_path, "mmsa", "mosi", "regression", src)
  splits, _ = sources.load(config)
  np.testing.assert_array_equal(splits["train"]["label"], first["train"]["regression_labels"])

  # Prepared: the builder reads the array_record copy, never the pickle's content.
  def refuse(*args, **kwargs):
    raise AssertionError("the source was read again although it is prepared")

  monkeypatch.setattr(mmsa, "read", refuse)
  again, _ = sources.load(config)
  np.testing.assert_array_equal(again["train"]["label"], first["train"]["regression_labels"])
  monkeypatch.undo()

  path, second = write_mmsa(src)  # new content in the same file
  stat = os.stat(path)
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  changed, _ = sources.load(config)
  np.testing.assert_array_equal(changed["train"]["label"], second["train"]["regression_labels"])
  assert len(os.listdir(tmp_path / "tfds" / "mmsa")) == 2  # one prepared copy per version


def large_path_case(kind, tmp_path):
  """A small dataset of `kind` in its community format, and its config.data."""
  src = tmp_path / kind
  if kind == "mmsa":
    write_mmsa(src)
    return data_config(tmp_path, "mmsa", "mosi", "regression", src)
  if kind == "mult":
    write_mult(src)
    return data_config(tmp_path, "mult", "iemocap", "multilabel_binary", src)
  if kind == "merbench":
    write_merbench(src, empty_face="tes_dia1_utt1")
    return data_config(tmp_path, "merbench", "meld", "classification", src,
                       features=MERBENCH_FEATURES)
  if kind == "mmin":
    write_mmin(src)
    return data_config(tmp_path, "mmin", "iemocap", "classification", src)
  write_npz(src, task="classification", modalities=("text", "vision"))
  return data_config(tmp_path, "npz", "mine", "classification", src)


@pytest.mark.parametrize("kind", sorted(sources.BUILDERS))
def test_large_split_path_equals_the_in_memory_arrays(kind, tmp_path, monkeypatch):
  force_streamed_shards(monkeypatch)
  config = large_path_case(kind, tmp_path)
  before = snapshot(tmp_path / kind)
  builder_config = sources.builder_config(config)
  module = importlib.import_module(f"mer_jax.data.builders.{sources.BUILDERS[kind][0]}")
  expected, expected_spec = module.read(builder_config)  # what the builder streams out
  builder_cls = sources.builder_class(kind)
  got, spec = files.load(builder_cls, builder_config, data_dir=str(tmp_path / "tfds"))
  assert snapshot(tmp_path / kind) == before, "the user's folder must not be written"
  assert spec == expected_spec
  prepared = tfds.builder_from_directory(
      files.prepared_dir(builder_cls, builder_config, str(tmp_path / "tfds")))
  for split, arrays in expected.items():
    num = len(arrays["label"])
    assert prepared.info.splits[split].shard_lengths == [1] * num  # one example per shard
    assert set(got[split]) == set(arrays)
    for key, value in arrays.items():
      if value.dtype.kind in "USO":
        np.testing.assert_array_equal(got[split][key], value.astype(str), err_msg=key)
      else:
        assert got[split][key].dtype == value.dtype, key
        np.testing.assert_array_equal(got[split][key], value, err_msg=key)
  assert "tensorflow" not in sys.modules


# ----------------------------------------------------------------------------- bad inputs


def nan_in_vision(data):
  data["valid"]["vision"][1, 0, 0] = np.nan


def positive_inf_in_audio(data):
  data["train"]["audio"][0, 2, 1] = np.inf


def label_out_of_range(data):
  data["test"]["regression_labels"][2] = 3.5


def vision_rows_mismatch(data):
  data["valid"]["vision"] = data["valid"]["vision"][:-1]


def audio_key_missing(data):
  del data["valid"]["audio"]


def empty_test_split(data):
  data["test"] = {k: (v[:0] if hasattr(v, "shape") else v[:0]) for k, v in data["test"].items()}


@pytest.mark.parametrize("edit,pattern", [
    (nan_in_vision, r"\['valid'\]: key 'vision' has 1 non-finite values \(1 NaN"),
    (positive_inf_in_audio, r"\['train'\]: key 'audio' has 1 non-finite values \(0 NaN, 1 inf"),
    (label_out_of_range, r"\['test'\]: key 'regression_labels' has 1 labels outside \[-3.0, 3.0\]"),
    (vision_rows_mismatch, r"\['valid'\]: key 'vision' has 3 samples but the labels have 4"),
    (audio_key_missing, r"\['valid'\]: key 'audio' is missing"),
    (empty_test_split, r"split 'test' has zero samples"),
])
def test_mmsa_bad_inputs_name_file_and_key(tmp_path, edit, pattern):
  path, _ = write_mmsa(tmp_path / "MOSI", edit=edit)
  with pytest.raises(validation.DataError, match=pattern) as error:
    sources.load(data_config(tmp_path, "mmsa", "mosi", "regression", tmp_path / "MOSI"))
  assert "unaligned_50.pkl" in str(error.value)


def test_missing_files_repeat_the_download_instructions(tmp_path):
  os.makedirs(tmp_path / "empty")
  cases = [("mmsa", "mosei", "regression", "aligned_50.pkl", "github.com/thuiar/MMSA"),
           ("mult", "iemocap", "multilabel_binary", "iemocap_data.pkl", "Multimodal-Transformer"),
           ("merbench", "meld", "classification", "label.npz", "zeroQiaoba/MERTools"),
           ("mmin", "iemocap", "classification", "target", "AIM3-RUC/MMIN"),
           ("npz", "mine", "regression", "train.npz", "Bring-your-own")]
  for source, name, task, missing_name, instructions in cases:
    with pytest.raises(FileNotFoundError) as error:
      sources.load(data_config(tmp_path, source, name, task, tmp_path / "empty"))
    message = str(error.value)
    assert missing_name in message and instructions in message, (source, message)
  assert os.listdir(tmp_path / "empty") == []


def test_merbench_missing_feature_folder_and_bad_utterances(tmp_path):
  src = tmp_path / "meld-process"
  write_merbench(src)
  config = data_config(tmp_path, "merbench", "meld", "classification", src,
                       features=("Baichuan-13B-Base-FRA", "nope", "clip-vit-large-FRA"))
  with pytest.raises(FileNotFoundError, match=r"features/nope not found.*found \['Baichuan"):
    sources.load(config)
  config.features = MERBENCH_FEATURES
  bad = src / "features" / MERBENCH_FEATURES[0] / "val_dia1_utt1.npy"
  np.save(bad, np.full((2, 6), np.nan, np.float32))
  with pytest.raises(validation.DataError, match=r"val_dia1_utt1.npy: key 'features' has 12 "):
    sources.load(config)
  np.save(bad, np.zeros((2, 9), np.float32))  # wrong width
  with pytest.raises(validation.DataError, match=r"different feature widths across samples"):
    sources.load(config)
  os.remove(bad)
  with pytest.raises(FileNotFoundError, match="val_dia1_utt1.npy not found"):
    sources.load(config)


def test_mmin_bad_labels_and_missing_utterance(tmp_path):
  def out_of_range(cv, prefix, one_hot, int2name):
    if prefix == "tst":
      return np.full(len(one_hot), 4), int2name  # class ids, one too high
    return one_hot, int2name

  src = tmp_path / "mmin"
  write_mmin(src, edit=out_of_range)
  config = data_config(tmp_path, "mmin", "iemocap", "classification", src)
  with pytest.raises(validation.DataError,
                     match=r"target/1/tst_label.npy: key 'labels' has class ids from 4 to 4; "
                           r"expected ids in \[0, 3\]"):
    sources.load(config)

  def unknown_name(cv, prefix, one_hot, int2name):
    if prefix == "val":
      int2name = int2name.copy()
      int2name[0, 0] = b"Ses09X_unknown"
    return one_hot, int2name

  src = tmp_path / "mmin2"
  write_mmin(src, edit=unknown_name)
  with pytest.raises(validation.DataError, match=r"bert_large.h5: key 'Ses09X_unknown'"):
    sources.load(data_config(tmp_path, "mmin", "iemocap", "classification", src))


def test_npz_bad_inputs(tmp_path):
  def case(edit, **kwargs):
    folder = tmp_path / f"case{len(os.listdir(tmp_path))}"
    write_npz(folder, edit=edit, **kwargs)
    return data_config(tmp_path, "npz", "mine", kwargs.get("task", "regression"), folder)

  def inf_text(split, arrays):
    if split == "valid":
      arrays["text"][0, 0, 0] = np.inf

  def bad_lengths(split, arrays):
    if split == "test":
      arrays["audio_lengths"] = arrays["audio_lengths"][:-1]

  def no_label(split, arrays):
    if split == "train":
      del arrays["label"]

  def empty(split, arrays):
    if split == "valid":
      for key in list(arrays):
        arrays[key] = arrays[key][:0]

  def not_binary(split, arrays):
    arrays["label"][0, 0] = 2

  def only_text(split, arrays):
    del arrays["audio"], arrays["vision"]

  for edit, kwargs, pattern in [
      (inf_text, {}, r"valid.npz: key 'text' has 1 non-finite"),
      (bad_lengths, {}, r"test.npz: key 'audio_lengths' has shape \(3,\).*expected \(4,\)"),
      (no_label, {}, r"train.npz: key 'label' is missing"),
      (empty, {}, r"valid.npz: split 'valid' has zero samples"),
      (not_binary, {"task": "multilabel_binary"}, r"key 'label' has values other than 0 and 1"),
      (only_text, {}, r"train.npz: needs features for at least two modalities"),
  ]:
    with pytest.raises(validation.DataError, match=pattern):
      sources.load(case(edit, **kwargs))


def test_config_errors(tmp_path):
  path, _ = write_mult(tmp_path / "mult")
  with pytest.raises(ValueError, match="define the 'multilabel_binary' task"):
    sources.load(data_config(tmp_path, "mult", "iemocap", "classification", path))
  write_mmsa(tmp_path / "MOSI")
  config = data_config(tmp_path, "mmsa", "mosi", "regression", tmp_path / "MOSI" /
                       "unaligned_50.pkl")
  config.fold = 1
  with pytest.raises(ValueError, match="fixed train/valid/test splits"):
    sources.load(config)
  with pytest.raises(ValueError, match="not available"):
    sources.load(data_config(tmp_path, "hdf5", "x", "regression", tmp_path))


# ----------------------------------------------------------------------------- helpers


def test_pool_frames_and_lengths_against_numpy():
  x = np.arange(14, dtype=np.float32).reshape(7, 2)
  expected = np.stack([x[0:3].mean(0), x[3:5].mean(0), x[5:7].mean(0)])
  np.testing.assert_array_equal(validation.pool_frames(x, 3), expected)
  mask = validation.lengths_to_mask(np.array([0, 2, 4]), 3, 4, source="f", key="k")
  np.testing.assert_array_equal(mask, [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
  clipped = validation.lengths_to_mask(np.array([5, 1]), 2, 4, source="f", key="k", clip=True)
  np.testing.assert_array_equal(clipped.sum(1), [4, 1])
  with pytest.raises(validation.DataError, match="f: key 'k' has lengths up to 5"):
    validation.lengths_to_mask(np.array([5, 1]), 2, 4, source="f", key="k")


def test_adapt_widths_pads_and_truncates(caplog):
  split = {"text": RNG.normal(size=(3, 4, 6)).astype(np.float32),
           "audio": RNG.normal(size=(3, 2, 5)).astype(np.float32),
           "vision": RNG.normal(size=(3, 1, 4)).astype(np.float32),
           "text_mask": np.ones((3, 4), bool), "label": np.zeros(3, np.float32)}
  with caplog.at_level(logging.WARNING):
    out = sources.adapt_widths(split, (6, 5, 4), (8, 3, 4))
  chex.assert_shape([out["text"], out["audio"], out["vision"]], [(3, 4, 8), (3, 2, 3), (3, 1, 4)])
  np.testing.assert_array_equal(out["text"][..., :6], split["text"])
  assert not out["text"][..., 6:].any()
  np.testing.assert_array_equal(out["audio"], split["audio"][..., :3])
  assert out["vision"] is split["vision"] and out["label"] is split["label"]
  assert "text 6->8 (zero-padded)" in caplog.text and "audio 5->3 (truncated)" in caplog.text

  trained = DataSpec(name="mosei", task="regression", num_classes=1, dims=(8, 3, 4),
                     lengths=(50, 50, 50), label_range=(-3.0, 3.0))
  other = DataSpec(name="sims", task="regression", num_classes=1, dims=(6, 5, 4),
                   lengths=(4, 2, 1), label_range=(-1.0, 1.0))
  with pytest.raises(ValueError, match=r"\(6, 5, 4\); the model was trained on \(8, 3, 4\).*"
                                       r"--adapt_widths"):
    sources.cross_dataset({"test": split}, other, trained, adapt=False)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    adapted, spec = sources.cross_dataset({"valid": split, "test": split}, other, trained,
                                          adapt=True)
  assert caplog.text.count("feature widths adapted") == 1  # once, not once per split
  assert spec.dims == (8, 3, 4) and spec.lengths == (50, 50, 50)
  assert spec.label_range == (-1.0, 1.0) and spec.name == "sims"
  assert adapted["test"]["audio"].shape == (3, 2, 3)
  classes = DataSpec(name="meld", task="classification", num_classes=7, dims=(8, 3, 4),
                     lengths=(1, 1, 1))
  with pytest.raises(ValueError, match="same task"):
    sources.cross_dataset({"test": split}, classes, trained, adapt=True)


def test_fold_counts():
  def config(source, name, **extra):
    return ml_collections.ConfigDict({"source": source, "name": name, "dir": "", "fold": 0,
                                      "task": "classification", **extra})

  assert sources.num_folds(config("mmsa", "mosei")) == 1
  assert sources.num_folds(config("mult", "iemocap")) == 1
  assert sources.num_folds(config("npz", "x")) == 1
  assert sources.num_folds(config("merbench", "meld")) == 1
  assert sources.num_folds(config("merbench", "iemocap")) == 5
  assert sources.num_folds(config("mmin", "iemocap")) == 10
  assert sources.num_folds(config("mmin", "msp_improv")) == 12
  assert sources.num_folds(config("mmin", "msp_improv", num_folds=6)) == 6
  assert sources.num_folds(config("synthetic", "iemocap", num_folds=3)) == 3
  assert sources.num_folds(config("synthetic", "iemocap")) == 1


def test_config_name_changes_with_options_and_fingerprint(tmp_path):
  a = files.make_config(dataset="mosi", source_path="x", task="regression",
                        fingerprint_digest="abc")
  b = files.make_config(dataset="mosi", source_path="y", task="regression",
                        fingerprint_digest="abc")
  c = files.make_config(dataset="mosi", source_path="x", task="regression",
                        fingerprint_digest="abd")
  d = files.make_config(dataset="mosi", source_path="x", task="regression",
                        fingerprint_digest="abc", max_lengths=(3, 0, 0))
  assert a.name == b.name  # the same files elsewhere share the prepared copy
  assert len({a.name, c.name, d.name}) == 3


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))),
                         ids=os.path.basename)
def test_every_real_config_names_a_dataset_its_source_reads(path, tmp_path):
  """The real variant of every config passes its source's name/task/fold checks and stops
  only at the missing files (whose message says where they go)."""
  spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("")
  assert config.data.source in sources.SOURCES and config.data.source != "synthetic"
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.dir = str(tmp_path)
  data.cache_dir = str(tmp_path / "tfds")
  with pytest.raises(FileNotFoundError, match="Where to get them|Bring-your-own"):
    sources.load(data)
  assert sources.num_folds(data) == config.data.get("num_folds", 1)
