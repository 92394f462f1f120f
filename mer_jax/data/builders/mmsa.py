"""TFDS builder of the MMSA feature pickles: CMU-MOSI and CMU-MOSEI `aligned_50.pkl` /
`unaligned_50.pkl`, CH-SIMS `unaligned_39.pkl` (the files the MMSA toolkit, and EASE,
LNLN, DQF and MCUR after it, train on).

A pickle holds `{"train" | "valid" | "test": {key: array}}` with `text` (N, T, 768 BERT
features), `audio`, `vision` (N, T, D), `audio_lengths`, `vision_lengths` (N,) in the
unaligned files, `text_bert` (N, 3, T: token ids, attention mask, segment ids),
`regression_labels` (N,), `classification_labels`, `id`, `raw_text`; SIMS adds the
unimodal labels `regression_labels_T` / `_A` / `_V`. Audio holds `-inf` values (log
energies of silence) that MMSA sets to 0; so does this reader, and it then rejects any
other non-finite value.

Masks: text from the attention mask of `text_bert` (all frames when absent); audio and
vision from their lengths, or, in aligned files without lengths, the text mask (the
frames are aligned to the words). With `text_bert` the splits also carry `text_ids` and
`text_segments` int32 (N, T) (padding 0), which a fine-tuned text encoder reads
(`config.model.text_encoder = "bert"`).

Pickles execute code when loaded: read only files from a source you trust (the MMSA
release or your own extraction).
"""

from __future__ import annotations

import logging
import os
import pickle

import numpy as np

from mer_jax.data import validation
from mer_jax.data.builders import files
from mer_jax.data.spec import DataSpec

log = logging.getLogger(__name__)

# In a folder, the first file present is read (pass the file itself to choose).
DEFAULT_FILES = {"mosi": ("aligned_50.pkl", "unaligned_50.pkl"),
                 "mosei": ("aligned_50.pkl", "unaligned_50.pkl"), "sims": ("unaligned_39.pkl",)}
# Sentiment range of the regression labels.
LABEL_RANGES = {"mosi": (-3.0, 3.0), "mosei": (-3.0, 3.0), "sims": (-1.0, 1.0)}
# Widths of the released features (MOSI 768/5/20, MOSEI 768/74/35, SIMS 768/33/709):
# other extractions are accepted; a difference is logged.
RELEASED_DIMS = {"mosi": (768, 5, 20), "mosei": (768, 74, 35), "sims": (768, 33, 709)}
CLASS_NAMES = ("negative", "neutral", "positive")  # MMSA classification_labels
UNIMODAL_KEYS = ("regression_labels_T", "regression_labels_A", "regression_labels_V")
SPLIT_KEYS = {"train": "train", "valid": "valid", "test": "test"}
READER_LAYOUT = "ids1"  # bump when the arrays this reader produces change

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
MMSA features (read-only; nothing is written into this folder).

  config.data.dir = the folder that holds the pickle (or the pickle itself):
    MOSI   (config.data.name=mosi):  aligned_50.pkl   (or unaligned_50.pkl)
    MOSEI  (config.data.name=mosei): aligned_50.pkl   (or unaligned_50.pkl)
    SIMS   (config.data.name=sims):  unaligned_39.pkl
  A folder with both MOSI/MOSEI files reads aligned_50.pkl unless config.data.file names
  the other (the EASE configs read unaligned_50.pkl); or pass the file itself as
  config.data.dir.

Where to get them: the MMSA toolkit (github.com/thuiar/MMSA, "Datasets") links the
processed features on Baidu Netdisk and Google Drive (folders MOSI/Processed,
MOSEI/Processed, SIMS/Processed); CH-SIMS is also at github.com/thuiar/MMSA-FET. The
files are Python pickles: load only files from a source you trust.
"""


def resolve_path(source_path: str, dataset: str, default_files: dict[str, str | tuple],
                 instructions: str, file_name: str = "") -> str:
  """`config.data.dir` as the data file: the path itself if it is a file, else
  `file_name` (`config.data.file`) in that folder, else the first of the dataset's
  default files that the folder holds. A missing file repeats the instructions."""
  if not source_path:
    raise FileNotFoundError(f"config.data.dir is empty: it must name the folder with the "
                            f"{dataset} files.\n\n{instructions}")
  if os.path.isfile(source_path):
    if file_name and os.path.basename(source_path) != file_name:
      raise ValueError(f"config.data.dir={source_path!r} is a file but config.data.file="
                       f"{file_name!r}: pass the folder, or --config.data.file="
                       f"{os.path.basename(source_path)!r} to read this file")
    return source_path
  names = default_files[dataset]
  names = (file_name,) if file_name else (names,) if isinstance(names, str) else tuple(names)
  for name in names:
    if os.path.isfile(os.path.join(source_path, name)):
      return os.path.join(source_path, name)
  raise FileNotFoundError(f"{os.path.join(source_path, names[0])} not found"
                          f"{' (nor ' + ', '.join(names[1:]) + ')' if names[1:] else ''}."
                          f"\n\n{instructions}")


def read_pickle(path: str):
  """The unpickled content of `path` (Python 2 pickles are read as latin-1)."""
  try:
    with open(path, "rb") as f:
      return pickle.load(f)
  except UnicodeDecodeError:
    with open(path, "rb") as f:
      return pickle.load(f, encoding="latin1")
  except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as error:
    raise validation.DataError(f"{path}: not a readable pickle ({error}); expected a dict of "
                               f"splits of numpy arrays") from error


def split_parts(data, path: str, split_keys: dict[str, str]) -> dict[str, dict]:
  """The per-split dicts of a pickle with top keys train/valid/test."""
  if not isinstance(data, dict):
    raise validation.DataError(f"{path}: holds a {type(data).__name__}; expected a dict with "
                               f"keys {sorted(split_keys.values())}")
  parts = {}
  for split, key in split_keys.items():
    if key not in data:
      raise validation.DataError(f"{path}: top-level key {key!r} is missing (found "
                                 f"{sorted(map(str, data))}); expected "
                                 f"{sorted(split_keys.values())}")
    if not isinstance(data[key], dict):
      raise validation.DataError(f"{path}: [{key!r}] holds a {type(data[key]).__name__}; "
                                 f"expected a dict of arrays")
    parts[split] = data[key]
  return parts


def require(part: dict, key: str, source: str, expected: str):
  if key not in part:
    raise validation.DataError(f"{source}: key {key!r} is missing (found "
                               f"{sorted(map(str, part))}); expected {expected}")
  return part[key]


def zero_negative_infinity(x: np.ndarray, *, source: str, key: str) -> np.ndarray:
  """-inf -> 0 (as MMSA and MulT do for audio); other values are left to validation."""
  x = np.array(x, dtype=np.float32)
  count = int(np.isneginf(x).sum())
  if count:
    log.info("%s: %d -inf values of %r set to 0", source, count, key)
    x[np.isneginf(x)] = 0.0
  return x


def token_ids(text_bert: np.ndarray, text_mask: np.ndarray, *, source: str):
  """(text_ids, text_segments) int32 (N, T) of `text_bert`, padding set to 0 ([PAD] in the
  BERT vocabularies the MMSA files were tokenised with), for `config.model.text_encoder`."""
  out = []
  for row, name in ((0, "token ids"), (2, "segment ids")):
    values = np.asarray(text_bert[:, row, :], np.float64)
    values = np.where(text_mask, values, 0.0)
    if not np.isfinite(values).all() or (values < 0).any() or (values != np.rint(values)).any() \
        or (values > np.iinfo(np.int32).max).any():
      raise validation.DataError(f"{source}: key 'text_bert'[:, {row}] ({name}) must hold "
                                 f"non-negative integers on real tokens")
    out.append(values.astype(np.int32))
  return tuple(out)


def read_split(part: dict, *, split_name: str, source: str, dataset: str,
               task: str) -> dict[str, np.ndarray]:
  label_key = "regression_labels" if task == "regression" else "classification_labels"
  raw_labels = require(part, label_key, source, "(N,) labels")
  num = validation.num_rows(raw_labels, source=source, key=label_key)
  validation.check_num_samples(num, source=source, split=split_name)
  split = {}
  text = validation.as_features(require(part, "text", source, "(N, T, 768) BERT features"),
                                source=source, key="text", num=num)
  text_mask = np.ones(text.shape[:2], bool)
  if "text_bert" in part:
    bert = np.asarray(part["text_bert"])
    if bert.ndim == 3 and bert.shape[0] == num and bert.shape[1] == 3 \
        and bert.shape[2] == text.shape[1]:
      text_mask = bert[:, 1, :] > 0
    else:
      raise validation.DataError(f"{source}: key 'text_bert' has shape {bert.shape}; expected "
                                 f"({num}, 3, {text.shape[1]}) (ids, attention mask, segments)")
    split["text_ids"], split["text_segments"] = token_ids(bert, text_mask, source=source)
  split["text"], split["text_mask"] = text, text_mask
  for name in ("audio", "vision"):
    raw = require(part, name, source, f"({num}, T, D) features")
    if name == "audio":
      raw = zero_negative_infinity(raw, source=source, key=name)
    x = validation.as_features(raw, source=source, key=name, num=num)
    if f"{name}_lengths" in part:
      mask = validation.lengths_to_mask(part[f"{name}_lengths"], num, x.shape[1], source=source,
                                        key=f"{name}_lengths", clip=True)
    elif x.shape[1] == text.shape[1]:
      mask = text_mask.copy()  # aligned to the words
    else:
      mask = np.ones(x.shape[:2], bool)
    split[name], split[f"{name}_mask"] = x, mask
  if task == "regression":
    split["label"] = validation.regression_labels(raw_labels, source=source, key=label_key,
                                                  num=num, label_range=LABEL_RANGES[dataset])
    if dataset == "sims" and all(k in part for k in UNIMODAL_KEYS):
      split["unimodal_labels"] = np.stack(
          [validation.regression_labels(part[k], source=source, key=k, num=num,
                                        label_range=LABEL_RANGES[dataset])
           for k in UNIMODAL_KEYS], axis=1)
  else:
    split["label"] = validation.class_labels(raw_labels, source=source, key=label_key, num=num,
                                             num_classes=len(CLASS_NAMES))
  split["id"] = (validation.as_ids(part["id"], num, source=source) if "id" in part
                 else np.asarray([f"{source}:{i}" for i in range(num)]))
  return split


def read(config: files.FileSourceConfig) -> tuple[dict[str, dict[str, np.ndarray]], DataSpec]:
  """The MMSA pickle of `config` in the in-memory layout, and its DataSpec."""
  path = resolve_path(config.source_path, config.dataset, DEFAULT_FILES,
                      MANUAL_DOWNLOAD_INSTRUCTIONS)
  parts = split_parts(read_pickle(path), path, SPLIT_KEYS)
  # Each raw split is dropped once converted, so the pickle is never held twice.
  splits = {split: read_split(parts.pop(split), split_name=split,
                              source=f"{path}[{SPLIT_KEYS[split]!r}]", dataset=config.dataset,
                              task=config.task)
            for split in list(parts)}
  if len({"unimodal_labels" in split for split in splits.values()}) > 1:
    log.warning("%s: unimodal labels (%s) are not in every split; not kept", path,
                ", ".join(UNIMODAL_KEYS))
    for split in splits.values():
      split.pop("unimodal_labels", None)
  splits, dims, lengths = files.pad_splits(splits, source=path)
  for split in splits.values():
    for key in ("text_ids", "text_segments"):
      if key in split:  # padded like the text frames: 0 ([PAD], segment 0)
        split[key] = np.pad(split[key], ((0, 0), (0, lengths[0] - split[key].shape[1])))
  if len({"text_ids" in split for split in splits.values()}) > 1:
    log.warning("%s: text_bert (token ids) is not in every split; not kept", path)
    for split in splits.values():
      split.pop("text_ids", None)
      split.pop("text_segments", None)
  if dims != RELEASED_DIMS[config.dataset]:
    log.warning("%s: feature widths (L, A, V) = %s differ from the released %s features %s",
                path, dims, config.dataset, RELEASED_DIMS[config.dataset])
  if config.task == "regression":
    spec = DataSpec(name=config.dataset, task="regression", num_classes=1, dims=dims,
                    lengths=lengths, label_range=LABEL_RANGES[config.dataset])
  else:
    spec = DataSpec(name=config.dataset, task="classification", num_classes=len(CLASS_NAMES),
                    dims=dims, lengths=lengths, class_names=CLASS_NAMES)
  return splits, spec


class Mmsa(files.FileSourceBuilder):
  """MMSA feature pickles (MOSI, MOSEI, SIMS)."""

  name = "mmsa"
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def read_source(self, config):
    return read(config)


def make_config(data_config) -> files.FileSourceConfig:
  """The builder config of `config.data` (fingerprints the pickle)."""
  dataset = data_config.name
  if dataset not in DEFAULT_FILES:
    raise ValueError(f"config.data.name={dataset!r} is not an MMSA dataset; expected one of "
                     f"{sorted(DEFAULT_FILES)}")
  if data_config.task not in ("regression", "classification"):
    raise ValueError(f"config.data.task={data_config.task!r}: MMSA data have regression "
                     f"(sentiment) or classification (negative/neutral/positive) labels")
  files.check_single_fold(data_config, "mmsa")
  path = resolve_path(data_config.dir, dataset, DEFAULT_FILES, MANUAL_DOWNLOAD_INSTRUCTIONS,
                      file_name=files.option(data_config, "file", ""))
  # The reader's layout version joins the file fingerprint, so that copies prepared by an
  # older reader (without text_ids) are prepared again.
  return files.make_config(dataset=dataset, source_path=path, task=data_config.task,
                           fingerprint_digest=f"{files.fingerprint([path])}-{READER_LAYOUT}",
                           description=f"MMSA {dataset} from {os.path.basename(path)}")


def num_folds(data_config) -> int:
  del data_config
  return 1
