"""What the builders over a user's feature files share: their builder config, the
fingerprint of the source files, the TFDS features of the in-memory layout, and
preparing (array_record, no TensorFlow) and reading back a prepared dataset.

A builder reads the user's files once, at construction (`_info` needs the shapes), into
the in-memory layout of `mer_jax.data.spec`, and writes them as array_record into the
TFDS data dir; the user's folder is only read. The config name carries a digest of the
options and of the source files' fingerprint (path, size, mtime and a hash of their first
4 MiB), so a changed file gets a new name: it is prepared again instead of the stale
copy being read. A prepared dataset is read back through `tfds.builder_from_directory`,
without touching the source files' contents, and its DataSpec comes from the dataset's
metadata.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping

import numpy as np
import tensorflow_datasets as tfds

from mer_jax.data import validation
from mer_jax.data.builders import common
from mer_jax.data.builders.streaming import ArrayRecordBuilder
from mer_jax.data.spec import MODALITIES, DataSpec

SPLITS = ("train", "valid", "test")
HASHED_BYTES = 4 << 20  # bytes of each main source file that enter its fingerprint
FORMAT_VERSION = "1.0.0"  # of the prepared layout; bump to re-prepare every dataset


@dataclasses.dataclass(eq=False, kw_only=True)
class FileSourceConfig(tfds.core.BuilderConfig):
  """One dataset read from the user's files, with the options that change its content.

  Attributes:
    dataset: dataset name (`mosei`, `iemocap`, ...).
    source_path: `config.data.dir`: the folder with the files, or one of them.
    task: `regression`, `classification` or `multilabel_binary`.
    fold: cross-validation fold (0 for datasets with fixed splits).
    num_folds: number of folds of the protocol the fold belongs to.
    features: per modality (L, A, V), the feature folder / file / key name the source
      reads (empty = the dataset's default).
    max_lengths: per modality, longest sequence kept (longer ones are average-pooled
      down to it); 0 = no limit.
    fingerprint: digest of the source files (see `fingerprint`).
  """

  dataset: str = ""
  source_path: str = ""
  task: str = "regression"
  fold: int = 0
  num_folds: int = 1
  features: tuple[str, ...] = ()
  max_lengths: tuple[int, ...] = ()
  fingerprint: str = ""


def fingerprint(hashed: Iterable[str], stat_only: Iterable[str] = (), *,
                root: str = "") -> str:
  """A digest of source files: path (relative to `root`), size and mtime of every file,
  plus the first `HASHED_BYTES` of each `hashed` one (a folder of thousands of small
  per-utterance files is covered by their sizes and mtimes)."""
  digest = hashlib.sha256()
  for path, read in sorted([(p, True) for p in hashed] + [(p, False) for p in stat_only]):
    stat = os.stat(path)
    name = os.path.relpath(path, root) if root else os.path.basename(path)
    digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    if read:
      with open(path, "rb") as f:
        digest.update(f.read(HASHED_BYTES))
  return digest.hexdigest()[:16]


def make_config(*, dataset: str, source_path: str, task: str, fingerprint_digest: str,
                fold: int = 0, num_folds: int = 1, features: tuple[str, ...] = (),
                max_lengths: tuple[int, ...] = (), description: str = "") -> FileSourceConfig:
  """A config whose name encodes every option and the source fingerprint, e.g.
  `mosei_regression_fold0of1_1f2e3d4c5b6a7980`."""
  options = {"dataset": dataset, "task": task, "fold": int(fold), "num_folds": int(num_folds),
             "features": list(features), "max_lengths": [int(v) for v in max_lengths],
             "fingerprint": fingerprint_digest}
  digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]
  safe_dataset = re.sub(r"[^A-Za-z0-9_-]+", "_", dataset) or "data"
  name = f"{safe_dataset}_{task}_fold{int(fold)}of{int(num_folds)}_{digest}"
  return FileSourceConfig(
      name=name, version=FORMAT_VERSION, description=description or f"{dataset} ({task})",
      dataset=dataset, source_path=os.path.abspath(source_path), task=task, fold=int(fold),
      num_folds=int(num_folds), features=tuple(features),
      max_lengths=tuple(int(v) for v in max_lengths), fingerprint=fingerprint_digest)


def spec_to_dict(spec: DataSpec) -> dict:
  return dataclasses.asdict(spec)


def spec_from_dict(saved: Mapping) -> DataSpec:
  return DataSpec(name=saved["name"], task=saved["task"], num_classes=int(saved["num_classes"]),
                  dims=tuple(int(d) for d in saved["dims"]),
                  lengths=tuple(int(t) for t in saved["lengths"]),
                  label_range=(tuple(float(v) for v in saved["label_range"])
                               if saved.get("label_range") is not None else None),
                  class_names=tuple(saved.get("class_names") or ()))


def features_of(arrays: Mapping[str, np.ndarray]) -> tfds.features.FeaturesDict:
  """TFDS features for one example of a split in the in-memory layout: arrays of rank
  >= 1 per example are stored as raw bytes (the default writes a float list per value,
  several times larger), strings as text."""
  features = {}
  for key, value in arrays.items():
    if value.dtype.kind in ("U", "S", "O"):
      features[key] = tfds.features.Text()
    elif value.ndim > 1:
      features[key] = tfds.features.Tensor(shape=value.shape[1:], dtype=value.dtype,
                                           encoding=tfds.features.Encoding.BYTES)
    else:
      features[key] = tfds.features.Tensor(shape=(), dtype=value.dtype)
  return tfds.features.FeaturesDict(features)


class FileSourceBuilder(ArrayRecordBuilder):
  """A dataset read from the user's files; subclasses implement `read_source`.

  Subclasses set `MANUAL_DOWNLOAD_INSTRUCTIONS` (where each file goes and where the
  community distributes it); nothing is ever downloaded.
  """

  VERSION = tfds.core.Version(FORMAT_VERSION)
  RELEASE_NOTES = {FORMAT_VERSION: "Read from the user's feature files."}
  BUILDER_CONFIGS: list[FileSourceConfig] = []

  @abc.abstractmethod
  def read_source(self, config: FileSourceConfig
                  ) -> tuple[dict[str, dict[str, np.ndarray]], DataSpec]:
    """The user's files as {split: arrays in the in-memory layout} and their DataSpec."""

  @functools.cached_property
  def source_data(self):
    return self.read_source(self.builder_config)

  def _info(self) -> tfds.core.DatasetInfo:
    splits, spec = self.source_data
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.builder_config.description,
        features=features_of(splits["train"]),
        disable_shuffling=True,  # examples keep the files' order
        metadata=tfds.core.MetadataDict(spec=spec_to_dict(spec),
                                        source_path=self.builder_config.source_path),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The files are read from builder_config.source_path.
    return {split: self._generate_examples(split) for split in self.source_data[0]}

  def _generate_examples(self, split: str):
    arrays = self.source_data[0][split]
    for index in range(len(arrays["label"])):
      yield index, {key: value[index] for key, value in arrays.items()}


def prepared_dir(builder_cls: type[FileSourceBuilder], config: FileSourceConfig,
                 data_dir: str) -> str:
  return os.path.join(data_dir, builder_cls.name, config.name, str(builder_cls.VERSION))


def load(builder_cls: type[FileSourceBuilder], config: FileSourceConfig, *,
         data_dir: str | None = None,
         splits=SPLITS) -> tuple[dict[str, dict[str, np.ndarray]], DataSpec]:
  """Prepares `config` once (reading the user's files) and reads its splits back.

  Returns:
    ({split: arrays}, DataSpec) with the arrays as `common.load_splits` returns them.
  """
  data_dir = data_dir or common.default_data_dir()
  path = prepared_dir(builder_cls, config, data_dir)
  if os.path.exists(os.path.join(path, "dataset_info.json")):
    builder = tfds.builder_from_directory(path)
  else:
    builder = builder_cls(config=config, data_dir=data_dir, file_format=common.FILE_FORMAT)
    common.prepare(builder)
    # The source arrays are written: drop them before the prepared copy is read.
    builder.__dict__.pop("source_data", None)
  arrays = common.load_splits(builder, splits)
  return arrays, spec_from_dict(builder.info.metadata["spec"])


def pad_splits(parts: dict[str, dict[str, np.ndarray]], *,
               source: str) -> tuple[dict, tuple, tuple]:
  """Pads every split to the same per-modality length; returns (splits, dims, lengths)."""
  dims, lengths = [], []
  for name in MODALITIES:
    widths = {split: part[name].shape[2] for split, part in parts.items()}
    if len(set(widths.values())) != 1:
      raise validation.DataError(f"{source}: key {name!r} has different feature widths across "
                                 f"splits ({widths}); expected one width D")
    dims.append(next(iter(widths.values())))
    lengths.append(max(part[name].shape[1] for part in parts.values()))
  for part in parts.values():
    for index, name in enumerate(MODALITIES):
      part[name], part[f"{name}_mask"] = validation.pad_frames(part[name], part[f"{name}_mask"],
                                                               lengths[index])
  return parts, tuple(dims), tuple(lengths)


def check_single_fold(data_config, source: str):
  """Sources with fixed train/valid/test splits have one fold: fold 0."""
  if int(data_config.fold) != 0:
    raise ValueError(f"config.data.fold={data_config.fold}: {source} {data_config.name} has "
                     f"fixed train/valid/test splits (one fold, fold 0)")


VALID_FRACTION = 0.1  # of the training sessions, for model selection in session folds


def hold_out_validation(names: list[str], *, fold: int,
                        fraction: float = VALID_FRACTION) -> tuple[list[str], list[str]]:
  """(train, valid): a fixed `fraction` (rounded up) of `names` as validation, drawn with
  the fold as seed, so every run of a fold selects alike (leave-one-session-out folds
  take validation from the training sessions, never from the test session)."""
  order = np.random.default_rng(fold).permutation(len(names))
  valid_rows = set(order[:math.ceil(fraction * len(names))].tolist())
  return ([n for i, n in enumerate(names) if i not in valid_rows],
          [n for i, n in enumerate(names) if i in valid_rows])


def option(data_config, name: str, default=None):
  """`config.data.<name>` if the config has it (a field not every config defines)."""
  value = data_config.get(name, None) if hasattr(data_config, "get") else None
  return default if value is None else value


def per_modality(value, name: str, default: tuple) -> tuple:
  """A (L, A, V) option: empty = `default`; otherwise exactly three entries."""
  value = tuple(value or ())
  if not value:
    return tuple(default)
  if len(value) != 3:
    raise ValueError(f"config.data.{name} must have three entries (text, audio, vision), got "
                     f"{value!r}")
  return value
