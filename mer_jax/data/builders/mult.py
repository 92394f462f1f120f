"""TFDS builder of the MulT feature pickles: `mosi_data.pkl`, `mosei_senti_data.pkl`,
`iemocap_data.pkl` (word-aligned CMU-MultimodalSDK features as released with MulT, and
used by CMAD and MCUR for IEMOCAP).

A pickle holds `{"train" | "valid" | "test": {...}}` with `text` (N, T, 300 GloVe),
`audio` (N, T, 74 COVAREP), `vision` (N, T, 35/47 Facet), `labels` and `id`. MOSI/MOSEI
labels are sentiment (N, 1, 1) in [-3, 3]; IEMOCAP labels are (N, 4, 2): one binary
(absent, present) pair per emotion, Neutral, Happy, Sad, Angry (the multilabel_binary
task). The files carry no lengths: every frame is real, as MulT itself trains. Audio
`-inf` values are set to 0 (as MulT does).

Pickles execute code when loaded: read only files from a source you trust.
"""

from __future__ import annotations

import os

import numpy as np

from mer_jax.data import validation
from mer_jax.data.builders import files, mmsa
from mer_jax.data.spec import DataSpec

DEFAULT_FILES = {"mosi": "mosi_data.pkl", "mosei": "mosei_senti_data.pkl",
                 "iemocap": "iemocap_data.pkl"}
TASKS = {"mosi": "regression", "mosei": "regression", "iemocap": "multilabel_binary"}
EMOTIONS = ("neutral", "happy", "sad", "angry")  # MulT's order of the IEMOCAP label pairs
LABEL_RANGE = (-3.0, 3.0)
SPLIT_KEYS = {"train": "train", "valid": "valid", "test": "test"}

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
MulT features (read-only; nothing is written into this folder).

  config.data.dir = the folder that holds (or the path of):
    MOSI    (config.data.name=mosi):    mosi_data.pkl
    MOSEI   (config.data.name=mosei):   mosei_senti_data.pkl
    IEMOCAP (config.data.name=iemocap): iemocap_data.pkl

Where to get them: the MulT repository (github.com/yaohungt/Multimodal-Transformer,
"Data Download") links the aligned and unaligned archives; the same pickles are in
CMU's CMU-MultimodalSDK "processed data" releases. The files are Python pickles: load
only files from a source you trust.
"""


def read_split(part: dict, *, split_name: str, source: str, dataset: str,
               task: str) -> dict[str, np.ndarray]:
  raw_labels = mmsa.require(part, "labels", source,
                            "labels (N, 1, 1) sentiment or (N, 4, 2) emotions")
  num = validation.num_rows(raw_labels, source=source, key="labels")
  validation.check_num_samples(num, source=source, split=split_name)
  split = {}
  for name in ("text", "audio", "vision"):
    raw = mmsa.require(part, name, source, f"({num}, T, D) features")
    if name == "audio":
      raw = mmsa.zero_negative_infinity(raw, source=source, key=name)
    x = validation.as_features(raw, source=source, key=name, num=num)
    split[name], split[f"{name}_mask"] = x, np.ones(x.shape[:2], bool)
  if task == "regression":
    split["label"] = validation.regression_labels(raw_labels, source=source, key="labels",
                                                  num=num, label_range=LABEL_RANGE)
  else:
    split["label"] = validation.multilabel_labels(raw_labels, source=source, key="labels",
                                                  num=num, num_emotions=len(EMOTIONS))
  split["id"] = (validation.as_ids(part["id"], num, source=source) if "id" in part
                 else np.asarray([f"{split_name}:{i}" for i in range(num)]))
  return split


def read(config: files.FileSourceConfig) -> tuple[dict[str, dict[str, np.ndarray]], DataSpec]:
  """The MulT pickle of `config` in the in-memory layout, and its DataSpec."""
  path = mmsa.resolve_path(config.source_path, config.dataset, DEFAULT_FILES,
                      MANUAL_DOWNLOAD_INSTRUCTIONS)
  parts = mmsa.split_parts(mmsa.read_pickle(path), path, SPLIT_KEYS)
  # Each raw split is dropped once converted, so the pickle is never held twice.
  splits = {split: read_split(parts.pop(split), split_name=split,
                              source=f"{path}[{SPLIT_KEYS[split]!r}]", dataset=config.dataset,
                              task=config.task)
            for split in list(parts)}
  splits, dims, lengths = files.pad_splits(splits, source=path)
  if config.task == "regression":
    spec = DataSpec(name=config.dataset, task="regression", num_classes=1, dims=dims,
                    lengths=lengths, label_range=LABEL_RANGE)
  else:
    spec = DataSpec(name=config.dataset, task="multilabel_binary", num_classes=len(EMOTIONS),
                    dims=dims, lengths=lengths, class_names=EMOTIONS)
  return splits, spec


class Mult(files.FileSourceBuilder):
  """MulT feature pickles (MOSI, MOSEI, IEMOCAP)."""

  name = "mult"
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def read_source(self, config):
    return read(config)


def make_config(data_config) -> files.FileSourceConfig:
  dataset = data_config.name
  if dataset not in DEFAULT_FILES:
    raise ValueError(f"config.data.name={dataset!r} is not a MulT dataset; expected one of "
                     f"{sorted(DEFAULT_FILES)}")
  if data_config.task != TASKS[dataset]:
    raise ValueError(f"config.data.task={data_config.task!r}: MulT {dataset} labels define the "
                     f"{TASKS[dataset]!r} task")
  files.check_single_fold(data_config, "mult")
  path = mmsa.resolve_path(data_config.dir, dataset, DEFAULT_FILES, MANUAL_DOWNLOAD_INSTRUCTIONS)
  return files.make_config(dataset=dataset, source_path=path, task=data_config.task,
                           fingerprint_digest=files.fingerprint([path]),
                           description=f"MulT {dataset} from {os.path.basename(path)}")


def num_folds(data_config) -> int:
  del data_config
  return 1
