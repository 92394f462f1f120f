"""TFDS builder of the bring-your-own-features format: one `.npz` per split.

    <dir>/train.npz, <dir>/valid.npz, <dir>/test.npz, each with
      text, audio, vision   float (N, T, D) frame-level or (N, D) utterance-level features;
                            any two or three of them (or other key names, mapped to the
                            text/audio/vision slots by config.data.features)
      <key>_lengths         optional int (N,): the first lengths[i] frames are real
      <key>_mask            optional bool (N, T): True on real frames (instead of lengths)
      label                 regression: float (N,); classification: int (N,) class ids or
                            (N, K) one-hot; multilabel_binary: int (N, K) in {0, 1}
      id                    optional str (N,)
    and optionally in train.npz:
      class_names           str (K,): the classes (fixes K; labels must be < K)
      label_range           float (2,): (low, high) of regression labels (checked)

A slot without features is all zeros with all-False frame masks, and the loaded splits'
`modality_mask` marks it absent for every sample. Files are read with
`allow_pickle=False`: they never execute code.
"""

from __future__ import annotations

import os

import numpy as np

from mer_jax.data import validation
from mer_jax.data.builders import files
from mer_jax.data.spec import MODALITIES, DataSpec

SPLIT_FILES = {"train": "train.npz", "valid": "valid.npz", "test": "test.npz"}
DEFAULT_KEYS = MODALITIES

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Bring-your-own features (read-only; nothing is written into this folder).

  config.data.dir = a folder with train.npz, valid.npz and test.npz, each holding
    text / audio / vision: float (N, T, D) or (N, D) (at least two of them; other names
        map to the three slots with config.data.features, e.g. "('eeg', 'audio', '')")
    <key>_lengths (N,) or <key>_mask (N, T): optional real frames
    label: float (N,) for regression, int (N,) or one-hot (N, K) for classification,
        int (N, K) 0/1 for multilabel_binary
    id: optional str (N,); train.npz may add class_names (K,) and label_range (2,)

  Write them with numpy, e.g.
    np.savez("train.npz", text=text, audio=audio, audio_lengths=lengths, label=y)
See docs/data.md ("Bring your own features").
"""


def split_paths(source_path: str) -> dict[str, str]:
  if not source_path:
    raise FileNotFoundError(f"config.data.dir is empty: it must name the folder with "
                            f"{', '.join(SPLIT_FILES.values())}.\n\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")
  paths = {split: os.path.join(source_path, name) for split, name in SPLIT_FILES.items()}
  for path in paths.values():
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} not found.\n\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")
  return paths


def read_npz(path: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as data:
      return {key: data[key] for key in data.files}
  except ValueError as error:  # object arrays, or not an npz
    raise validation.DataError(f"{path}: cannot be read without pickle ({error}); store plain "
                               f"numeric arrays and str ids") from error
  except OSError as error:
    raise validation.DataError(f"{path}: not a readable .npz ({error})") from error


def read_split(arrays: dict[str, np.ndarray], *, path: str, split_name: str, keys: tuple,
               task: str, num_classes: int | None,
               label_range: tuple[float, float] | None) -> dict[str, np.ndarray]:
  if "label" not in arrays:
    raise validation.DataError(f"{path}: key 'label' is missing (found {sorted(arrays)}); "
                               f"expected (N,) labels")
  num = validation.num_rows(arrays["label"], source=path, key="label")
  validation.check_num_samples(num, source=path, split=split_name)
  split = {}
  for name, key in zip(MODALITIES, keys, strict=True):
    if key and key in arrays:
      x = validation.as_features(arrays[key], source=path, key=key, num=num)
      # Lengths and masks are looked up under the file's own key name.
      mask = validation.frame_mask(arrays, key, x.shape[:2], source=path)
    else:
      x, mask = np.zeros((num, 1, 1), np.float32), np.zeros((num, 1), bool)
    split[name], split[f"{name}_mask"] = x, mask
  if task == "regression":
    split["label"] = validation.regression_labels(arrays["label"], source=path, key="label",
                                                  num=num, label_range=label_range)
  elif task == "classification":
    split["label"] = validation.class_labels(arrays["label"], source=path, key="label", num=num,
                                             num_classes=num_classes)
  else:
    split["label"] = validation.multilabel_labels(arrays["label"], source=path, key="label",
                                                  num=num)
  split["id"] = (validation.as_ids(arrays["id"], num, source=path) if "id" in arrays
                 else np.asarray([f"{split_name}:{i}" for i in range(num)]))
  return split


def read(config: files.FileSourceConfig) -> tuple[dict[str, dict[str, np.ndarray]], DataSpec]:
  """The bring-your-own npz files of `config` in the in-memory layout, and its DataSpec."""
  paths = split_paths(config.source_path)
  raw = {split: read_npz(path) for split, path in paths.items()}
  keys = tuple(config.features) or DEFAULT_KEYS
  train = raw["train"]
  present = [key for key in keys if key and key in train]
  if len(present) < 2:
    raise validation.DataError(
        f"{paths['train']}: needs features for at least two modalities under the keys "
        f"{[k for k in keys if k]} (config.data.features maps other names); found keys "
        f"{sorted(train)}")
  for split, arrays in raw.items():
    missing = [key for key in present if key not in arrays]
    if missing:
      raise validation.DataError(f"{paths[split]}: keys {missing} are missing; every split must "
                                 f"hold the modalities train.npz has ({present})")
  class_names = tuple(str(c) for c in train["class_names"]) if "class_names" in train else ()
  label_range = None
  if "label_range" in train:
    bounds = np.asarray(train["label_range"], np.float64).reshape(-1)
    if bounds.shape != (2,) or not bounds[0] < bounds[1]:
      raise validation.DataError(f"{paths['train']}: key 'label_range' is {bounds}; expected "
                                 f"(low, high) with low < high")
    label_range = (float(bounds[0]), float(bounds[1]))
  task = config.task
  del train
  # Each file's arrays are dropped once converted, so the files are never held twice.
  splits = {split: read_split(raw.pop(split), path=paths[split], split_name=split, keys=keys,
                              task=task, num_classes=len(class_names) or None,
                              label_range=label_range if task == "regression" else None)
            for split in list(raw)}
  splits, dims, lengths = files.pad_splits(splits, source=config.source_path)
  labels = np.concatenate([s["label"] for s in splits.values()])
  if task == "regression":
    num_classes = 1
    if label_range is None:
      train_labels = splits["train"]["label"]
      label_range = (float(np.floor(train_labels.min())), float(np.ceil(train_labels.max())))
  elif task == "classification":
    num_classes = len(class_names) or int(labels.max()) + 1
  else:
    widths = {s["label"].shape[1] for s in splits.values()}
    if len(widths) != 1:
      raise validation.DataError(f"{config.source_path}: key 'label' has different numbers of "
                                 f"emotions across splits: {sorted(widths)}")
    num_classes = widths.pop()
    if class_names and len(class_names) != num_classes:
      raise validation.DataError(f"{paths['train']}: key 'class_names' has {len(class_names)} "
                                 f"names for {num_classes} emotions")
  spec = DataSpec(name=config.dataset, task=task, num_classes=num_classes, dims=dims,
                  lengths=lengths, label_range=label_range if task == "regression" else None,
                  class_names=class_names)
  return splits, spec


class NpzFeatures(files.FileSourceBuilder):
  """Bring-your-own features: train/valid/test .npz files."""

  name = "npz_features"
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def read_source(self, config):
    return read(config)


def make_config(data_config) -> files.FileSourceConfig:
  files.check_single_fold(data_config, "npz")
  paths = split_paths(data_config.dir)
  features = files.per_modality(files.option(data_config, "features", ()), "features",
                                DEFAULT_KEYS)
  return files.make_config(
      dataset=data_config.name or "npz", source_path=data_config.dir, task=data_config.task,
      fingerprint_digest=files.fingerprint(paths.values()), features=tuple(features),
      description=f"bring-your-own features from {os.path.abspath(data_config.dir)}")


def num_folds(data_config) -> int:
  del data_config
  return 1
