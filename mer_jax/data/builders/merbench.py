"""TFDS builder of MERBench feature folders (MERTools/MERBench, the features DQF uses):
a label file `label*.npz` and one `.npy` per utterance and feature extractor.

    <dir>/label.npz                      (label_4way.npz / label_6way.npz for IEMOCAP)
    <dir>/features/<extractor>/<utterance>.npy    (D,) utterance-level or (T, D) frame-level
    <dir>/features/<extractor>/<utterance>/*.npy  (one file per face frame, stacked in name order)

The label file holds numpy object arrays (pickled dicts) `train_corpus`, `val_corpus`,
`test_corpus`, each `{utterance: {"emo": class id, "val": sentiment}}`, or, for
IEMOCAP, one `whole_corpus` that is split by session into 5 leave-one-session-out folds.
`config.data.features` names the extractor folder of each modality (text, audio,
vision), e.g. `("Baichuan-13B-Base-FRA", "wav2vec2-large-960h-FRA",
"clip-vit-large-patch14-FRA")`. Frame-level sequences keep their own lengths (masks mark
the real frames); `config.data.max_lengths` average-pools longer ones down to a limit.

The label npz is read with `allow_pickle=True` (its dicts are pickled): read only files
from a source you trust.
"""

from __future__ import annotations

import os
import re

import numpy as np

from mer_jax.data import validation
from mer_jax.data.builders import files
from mer_jax.data.spec import MODALITIES, DataSpec

LABEL_FILES = {"mosi": "label.npz", "mosei": "label.npz", "sims": "label.npz",
               "simsv2": "label.npz", "meld": "label.npz", "iemocap": "label_4way.npz",
               "iemocap6": "label_6way.npz"}
TASKS = {"mosi": "regression", "mosei": "regression", "sims": "regression",
         "simsv2": "regression", "meld": "classification", "iemocap": "classification",
         "iemocap6": "classification"}
NUM_CLASSES = {"meld": 7, "iemocap": 4, "iemocap6": 6}
# Class order of MERBench's MELD label file (toolkit/preprocess/meld.py); the IEMOCAP
# files keep the ids of their source pickles and name no classes.
CLASS_NAMES = {"meld": ("anger", "joy", "sadness", "neutral", "disgust", "fear", "surprise")}
LABEL_RANGES = {"mosi": (-3.0, 3.0), "mosei": (-3.0, 3.0), "sims": (-1.0, 1.0),
                "simsv2": (-1.0, 1.0)}
# The features DQF uses on MELD (Sec. 4.2): Baichuan-13B text, wav2vec 2.0 large audio,
# CLIP ViT-L/14 faces, frame-level.
DEFAULT_FEATURES = ("Baichuan-13B-Base-FRA", "wav2vec2-large-960h-FRA",
                    "clip-vit-large-patch14-FRA")
CORPUS_KEYS = {"train": "train_corpus", "valid": "val_corpus", "test": "test_corpus"}
WHOLE_CORPUS = "whole_corpus"
NUM_SESSIONS = 5  # IEMOCAP
SESSION_PATTERN = re.compile(r"^Ses0([1-5])")

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
MERBench features (read-only; nothing is written into this folder).

  config.data.dir = the dataset's MERBench folder (e.g. meld-process/), holding
    label.npz                 (IEMOCAP: label_4way.npz, or label_6way.npz with
                               config.data.name=iemocap6)
    features/<extractor>/<utterance>.npy   one per utterance, for each of the three
                               extractors named by config.data.features (text, audio,
                               vision), e.g. Baichuan-13B-Base-FRA, wav2vec2-large-960h-FRA,
                               clip-vit-large-patch14-FRA (-UTT for utterance-level)

Where to get them: MERTools/MERBench (github.com/zeroQiaoba/MERTools, MERBench/README.md)
ships the label files in MERBench/dataset/<name>-process/ and links the extracted
features on Baidu Cloud Disk; or extract them with its feature_extraction/ scripts
(--feature_level=FRAME or UTTERANCE). The label npz holds pickled dicts: load only files
from a source you trust.
"""


def label_path(source_path: str, dataset: str) -> str:
  if not source_path:
    raise FileNotFoundError(f"config.data.dir is empty: it must name the MERBench {dataset} "
                            f"folder.\n\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")
  path = source_path if os.path.isfile(source_path) else os.path.join(source_path,
                                                                      LABEL_FILES[dataset])
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found.\n\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")
  return path


def feature_dirs(label_file: str, features: tuple[str, ...]) -> list[str]:
  root = os.path.join(os.path.dirname(label_file), "features")
  dirs = [os.path.join(root, name) for name in features]
  for modality, path in zip(MODALITIES, dirs, strict=True):
    if not os.path.isdir(path):
      found = sorted(os.listdir(root)) if os.path.isdir(root) else []
      raise FileNotFoundError(
          f"{path} not found: the {modality} features (config.data.features) must be a folder "
          f"of per-utterance .npy files in {root}; found {found or 'no such folder'}.\n\n"
          f"{MANUAL_DOWNLOAD_INSTRUCTIONS}")
  return dirs


def read_corpora(path: str) -> dict[str, dict]:
  """{key: {utterance: {"emo", "val"}}} of the label npz."""
  try:
    with np.load(path, allow_pickle=True) as data:
      corpora = {key: data[key] for key in data.files}
  except (OSError, ValueError) as error:
    raise validation.DataError(f"{path}: not a readable .npz ({error})") from error
  out = {}
  for key, value in corpora.items():
    corpus = value.tolist() if isinstance(value, np.ndarray) else value
    if not isinstance(corpus, dict):
      raise validation.DataError(f"{path}: key {key!r} holds a {type(corpus).__name__}; "
                                 f"expected a dict {{utterance: {{'emo': id, 'val': value}}}}")
    out[key] = corpus
  return out


def session_folds(names: list[str], *, source: str) -> np.ndarray:
  """(N,) 0-based IEMOCAP session of each utterance name (`Ses01F_impro01_F000`)."""
  sessions = []
  for name in names:
    match = SESSION_PATTERN.match(name)
    if match is None:
      raise validation.DataError(f"{source}: key {WHOLE_CORPUS!r} has utterance {name!r}; "
                                 f"expected IEMOCAP names starting with Ses01..Ses05")
    sessions.append(int(match.group(1)) - 1)
  return np.asarray(sessions)


def split_names(corpora: dict[str, dict], *, fold: int, source: str) -> dict[str, list[str]]:
  """Utterance names per split: the label file's own splits, or, from `whole_corpus`,
  fold k = session k+1 as test and a fixed 10% of the other sessions as validation."""
  if WHOLE_CORPUS in corpora:
    names = [str(n) for n in corpora[WHOLE_CORPUS]]
    sessions = session_folds(names, source=source)
    test = [n for n, s in zip(names, sessions, strict=True) if s == fold]
    rest = [n for n, s in zip(names, sessions, strict=True) if s != fold]
    train, valid = files.hold_out_validation(rest, fold=fold)
    return {"train": train, "valid": valid, "test": test}
  missing = [k for k in CORPUS_KEYS.values() if k not in corpora]
  if missing:
    raise validation.DataError(f"{source}: keys {missing} are missing (found {sorted(corpora)});"
                               f" expected {list(CORPUS_KEYS.values())} or {WHOLE_CORPUS!r}")
  return {split: [str(n) for n in corpora[key]] for split, key in CORPUS_KEYS.items()}


def read_utterance(folder: str, name: str) -> np.ndarray | None:
  """One utterance's features as (T, D) (or None: a face folder without frames)."""
  path = os.path.join(folder, name + ".npy")
  if os.path.isfile(path):
    parts = [np.load(path, allow_pickle=False)]
  elif os.path.isdir(os.path.join(folder, name)):
    frames = sorted(f for f in os.listdir(os.path.join(folder, name)) if f.endswith(".npy"))
    if not frames:
      return None
    parts = [np.load(os.path.join(folder, name, f), allow_pickle=False) for f in frames]
  else:
    raise FileNotFoundError(f"{path} not found: every utterance of the label file needs its "
                            f"features in {folder} (as {name}.npy or a folder {name}/ of .npy)")
  x = np.asarray(parts if len(parts) > 1 else parts[0])
  x = np.squeeze(x)  # MERBench squeezes (1, D) utterance features and (1, T, D) stacks
  if x.ndim == 1:
    x = x[None, :]
  if x.ndim != 2 or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype,
                                                                             np.integer)):
    raise validation.DataError(f"{path}: has shape {x.shape} and dtype {x.dtype}; expected (D,) "
                               f"or (T, D) numbers")
  validation.check_finite(x.astype(np.float32), source=path, key="features")
  return x


def read(config: files.FileSourceConfig) -> tuple[dict[str, dict[str, np.ndarray]], DataSpec]:
  """The MERBench features of `config` in the in-memory layout, and its DataSpec."""
  path = label_path(config.source_path, config.dataset)
  dirs = feature_dirs(path, config.features)
  corpora = read_corpora(path)
  names = split_names(corpora, fold=config.fold, source=path)
  corpus = {}
  for value in corpora.values():
    corpus.update(value)
  max_lengths = config.max_lengths or (0, 0, 0)
  parts = {}
  for split, split_list in names.items():
    validation.check_num_samples(len(split_list), source=path, split=split)
    part = {}
    for index, (name, folder) in enumerate(zip(MODALITIES, dirs, strict=True)):
      part[name], part[f"{name}_mask"] = validation.stack_sequences(
          [read_utterance(folder, utt) for utt in split_list], source=folder,
          key=f"{name} features", max_length=int(max_lengths[index]))
    entries = []
    for utt in split_list:
      entry = corpus[utt]
      if not isinstance(entry, dict) or ("val" if config.task == "regression" else "emo") \
          not in entry:
        raise validation.DataError(f"{path}: the label of {utt!r} is {entry!r}; expected "
                                   f"{{'emo': class id, 'val': sentiment}}")
      entries.append(entry)
    if config.task == "regression":
      part["label"] = validation.regression_labels(
          [e["val"] for e in entries], source=path, key=f"{split} 'val'", num=len(split_list),
          label_range=LABEL_RANGES[config.dataset])
    else:
      part["label"] = validation.class_labels(
          [e["emo"] for e in entries], source=path, key=f"{split} 'emo'", num=len(split_list),
          num_classes=NUM_CLASSES[config.dataset])
    part["id"] = np.asarray(split_list, dtype=str)
    parts[split] = part
  parts, dims, lengths = files.pad_splits(parts, source=os.path.dirname(path))
  if config.task == "regression":
    spec = DataSpec(name=config.dataset, task="regression", num_classes=1, dims=dims,
                    lengths=lengths, label_range=LABEL_RANGES[config.dataset])
  else:
    spec = DataSpec(name=config.dataset, task="classification",
                    num_classes=NUM_CLASSES[config.dataset], dims=dims, lengths=lengths,
                    class_names=CLASS_NAMES.get(config.dataset, ()))
  return parts, spec


class Merbench(files.FileSourceBuilder):
  """MERBench label files + per-utterance feature folders."""

  name = "merbench"
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def read_source(self, config):
    return read(config)


def num_folds(data_config) -> int:
  """5 leave-one-session-out folds for IEMOCAP (a `whole_corpus`), else 1."""
  return NUM_SESSIONS if data_config.name in ("iemocap", "iemocap6") else 1


def make_config(data_config) -> files.FileSourceConfig:
  dataset = data_config.name
  if dataset not in LABEL_FILES:
    raise ValueError(f"config.data.name={dataset!r} is not a MERBench dataset; expected one of "
                     f"{sorted(LABEL_FILES)}")
  if data_config.task != TASKS[dataset]:
    raise ValueError(f"config.data.task={data_config.task!r}: MERBench {dataset} defines the "
                     f"{TASKS[dataset]!r} task")
  folds = num_folds(data_config)
  requested = int(files.option(data_config, "num_folds", 0) or folds)
  if requested != folds:
    raise ValueError(f"config.data.num_folds={requested}: MERBench {dataset} has {folds} "
                     f"fold(s)")
  if folds == 1:
    files.check_single_fold(data_config, "merbench")
  elif not 0 <= int(data_config.fold) < folds:
    raise ValueError(f"config.data.fold={data_config.fold} is outside range({folds}) (IEMOCAP "
                     f"sessions 1-5 are folds 0-4)")
  features = files.per_modality(files.option(data_config, "features", ()), "features",
                                DEFAULT_FEATURES)
  max_lengths = files.per_modality(files.option(data_config, "max_lengths", ()), "max_lengths",
                                   (0, 0, 0))
  path = label_path(data_config.dir, dataset)
  dirs = feature_dirs(path, tuple(features))
  listed = [entry.path for folder in dirs for entry in os.scandir(folder)]
  return files.make_config(
      dataset=dataset, source_path=path, task=data_config.task,
      fingerprint_digest=files.fingerprint([path], listed, root=os.path.dirname(path)),
      fold=int(data_config.fold), num_folds=folds, features=tuple(features),
      max_lengths=tuple(int(v) for v in max_lengths),
      description=f"MERBench {dataset} ({', '.join(features)})")
