"""Real data sources (SPEC section 9) behind one entry point, `load(config.data)`.

`npz` is the documented bring-your-own-features format: `{dir}/{train,valid,test}.npz`
each with `text`/`audio`/`vision` (N, T, D) (any subset of at least two), optional
`<modality>_lengths` (N,) or `<modality>_mask` (N, T), `label`, optional `id`.
"""

from __future__ import annotations

import os

import numpy as np

from mer_jax.data.spec import MODALITIES, DataSpec

SOURCES = ("synthetic", "npz")
SPLIT_FILES = {"train": "train.npz", "valid": "valid.npz", "test": "test.npz"}


def _read_npz(path: str) -> dict[str, np.ndarray]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: config.data.dir must hold "
                            f"{', '.join(SPLIT_FILES.values())}")
  with np.load(path, allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def _split_from_npz(path: str, arrays, task: str, lengths, dims):
  num = len(arrays["label"]) if "label" in arrays else None
  if num is None:
    raise ValueError(f"{path}: key 'label' is missing (expected (N,) labels)")
  split = {}
  for index, name in enumerate(MODALITIES):
    length, width = lengths[index], dims[index]
    x = np.zeros((num, length, width), np.float32)
    mask = np.zeros((num, length), bool)
    if name in arrays:
      raw = np.asarray(arrays[name])
      if raw.ndim == 2:
        raw = raw[:, None, :]
      if raw.ndim != 3 or raw.shape[0] != num:
        raise ValueError(f"{path}: key {name!r} has shape {raw.shape}; expected ({num}, T, D)")
      if not np.issubdtype(raw.dtype, np.floating):
        raise ValueError(f"{path}: key {name!r} has dtype {raw.dtype}; expected a float array")
      raw = raw.astype(np.float32)
      bad = ~np.isfinite(raw)
      if bad.any():
        raise ValueError(f"{path}: key {name!r} has {int(bad.sum())} NaN/inf values")
      frame_mask = np.ones(raw.shape[:2], bool)
      if f"{name}_mask" in arrays:
        frame_mask = np.asarray(arrays[f"{name}_mask"], bool)
        if frame_mask.shape != raw.shape[:2]:
          raise ValueError(f"{path}: key {name}_mask has shape {frame_mask.shape}; "
                           f"expected {raw.shape[:2]}")
      elif f"{name}_lengths" in arrays:
        real = np.asarray(arrays[f"{name}_lengths"]).astype(np.int64)
        if real.shape != (num,) or real.min() < 0 or real.max() > raw.shape[1]:
          raise ValueError(f"{path}: key {name}_lengths must be ({num},) ints in "
                           f"[0, {raw.shape[1]}]")
        frame_mask = np.arange(raw.shape[1])[None] < real[:, None]
      x[:, :raw.shape[1]] = np.where(frame_mask[..., None], raw, 0.0)
      mask[:, :raw.shape[1]] = frame_mask
    split[name] = x
    split[f"{name}_mask"] = mask
  label = np.asarray(arrays["label"])
  if task == "regression":
    label = label.reshape(num).astype(np.float32)
    if not np.all(np.isfinite(label)):
      raise ValueError(f"{path}: key 'label' has NaN/inf values")
  elif task == "classification":
    if label.ndim == 2:  # one-hot
      label = label.argmax(-1)
    label = label.reshape(num).astype(np.int32)
  else:
    label = label.reshape(num, -1).astype(np.int32)
    if not np.isin(label, (0, 1)).all():
      raise ValueError(f"{path}: multilabel_binary 'label' must be (N, K) with values 0/1")
  split["label"] = label
  split["id"] = (np.asarray(arrays["id"]).astype(str) if "id" in arrays
                 else np.asarray([f"{os.path.basename(path)}:{i}" for i in range(num)]))
  return split


def load_npz(data_config):
  root = data_config.dir
  if not root:
    raise ValueError("config.data.dir must name the folder with train.npz/valid.npz/test.npz "
                     "for config.data.source='npz'")
  raw = {split: _read_npz(os.path.join(root, f)) for split, f in SPLIT_FILES.items()}
  train = raw["train"]
  present = [m for m in MODALITIES if m in train]
  if len(present) < 2:
    raise ValueError(f"{os.path.join(root, 'train.npz')}: needs at least two of {MODALITIES}, "
                     f"found {present}")
  dims, lengths = [], []
  for name in MODALITIES:
    shapes = [np.asarray(r[name]).shape for r in raw.values() if name in r]
    if not shapes:
      dims.append(1)
      lengths.append(1)
      continue
    widths = {s[-1] for s in shapes}
    if len(widths) != 1:
      raise ValueError(f"{root}: key {name!r} has different feature widths across splits: "
                       f"{sorted(widths)}")
    dims.append(widths.pop())
    lengths.append(max(s[1] if len(s) == 3 else 1 for s in shapes))
  task = data_config.task
  splits = {split: _split_from_npz(os.path.join(root, SPLIT_FILES[split]), arrays, task,
                                   lengths, dims) for split, arrays in raw.items()}
  labels = splits["train"]["label"]
  if task == "regression":
    num_classes, label_range = 1, (float(np.floor(labels.min())), float(np.ceil(labels.max())))
  elif task == "classification":
    num_classes, label_range = int(max(s["label"].max() for s in splits.values())) + 1, None
  else:
    num_classes, label_range = labels.shape[1], None
  spec = DataSpec(name=data_config.name or "npz", task=task, num_classes=num_classes,
                  dims=tuple(dims), lengths=tuple(lengths), label_range=label_range)
  return splits, spec


def load(data_config):
  if data_config.source == "npz":
    return load_npz(data_config)
  raise ValueError(f"config.data.source={data_config.source!r} is not available; "
                   f"choose one of {SOURCES}")
