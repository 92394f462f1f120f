"""What every TFDS builder of mer_jax shares: where data are written, preparing without
TensorFlow (array_record), and reading whole splits into the in-memory layout.

Preparing is guarded by a file lock next to the prepared data, so two processes that load
the same dataset at once prepare it once; TFDS itself writes into a temporary folder and
renames it, so a crash never leaves a half-written dataset behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import time

import numpy as np
import tensorflow_datasets as tfds

from mer_jax.data import synthetic
from mer_jax.data.builders.synthetic import SyntheticMer, make_config
from mer_jax.data.spec import MASK_KEYS, DataSpec

log = logging.getLogger(__name__)

DATA_DIR_ENV = "MER_JAX_DATA_DIR"
FILE_FORMAT = "array_record"
READ_CHUNK = 256  # examples decoded per data-source call
# Loaded numeric arrays start on this byte boundary: XLA's CPU client then shares their
# memory with a resident replica (`pipeline.Batcher`) instead of copying the split.
ALIGNMENT = 64


def default_data_dir() -> str:
  """Where builders write: `$MER_JAX_DATA_DIR`, else `~/.cache/mer_jax/tfds`."""
  return os.environ.get(DATA_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache",
                                                      "mer_jax", "tfds")


@contextlib.contextmanager
def _prepare_lock(builder: tfds.core.DatasetBuilder):
  # One lock per (dataset, config): the folder above the version folder.
  lock_dir = os.fspath(builder.data_path.parent)
  os.makedirs(lock_dir, exist_ok=True)
  with open(os.path.join(lock_dir, ".prepare.lock"), "w") as lock_file:
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock_file, fcntl.LOCK_UN)


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
  # TFDS writes dataset_info.json last, inside the renamed folder (and its own
  # is_prepared() warns about the empty version folder that building creates).
  return os.path.exists(os.path.join(builder.data_dir, "dataset_info.json"))


def prepare(builder: tfds.core.DatasetBuilder) -> None:
  """Writes the builder's array_record files unless they already exist (no network)."""
  if _is_prepared(builder):
    return
  with _prepare_lock(builder):
    if _is_prepared(builder):
      # Another process prepared it while we waited: this builder was created before the
      # files existed, so its info has no split lengths yet.
      builder.info.read_from_directory(builder.data_dir)
      return
    started = time.time()
    builder.download_and_prepare(
        file_format=FILE_FORMAT,
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    splits = builder.info.splits
    log.info("prepared %s in %.1f s: %s (%.2f GB serialized, %d shards)", builder.data_dir,
             time.time() - started,
             ", ".join(f"{name} {info.num_examples}" for name, info in splits.items()),
             sum(info.num_bytes for info in splits.values()) / 1e9,
             sum(info.num_shards for info in splits.values()))


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
  """An uninitialised numeric array whose data start on an `ALIGNMENT`-byte boundary."""
  dtype = np.dtype(dtype)
  nbytes = math.prod(shape) * dtype.itemsize
  buffer = np.empty(nbytes + ALIGNMENT, np.uint8)
  offset = -buffer.ctypes.data % ALIGNMENT
  return buffer[offset:offset + nbytes].view(dtype).reshape(shape)


def _declared_dtype(features, key: str) -> np.dtype | None:
  """The numeric dtype a feature was declared with (integer tensors without a byte
  encoding come back as int64), or None (text)."""
  dtype = getattr(features[key], "np_dtype", None) if key in features else None
  return np.dtype(dtype) if dtype is not None and np.dtype(dtype).kind in "biuf" else None


def _stack(values: list, out: np.ndarray | None, start: int, total: int,
           dtype: np.dtype | None) -> np.ndarray:
  batch = np.stack([np.asarray(v) for v in values])
  if out is None:
    shape = (total,) + batch.shape[1:]
    out = aligned_empty(shape, dtype) if dtype is not None else np.empty(shape, batch.dtype)
  out[start:start + len(batch)] = batch
  return out


def _read_split(source, features) -> dict[str, np.ndarray]:
  total = len(source)
  arrays: dict[str, np.ndarray] = {}
  for start in range(0, total, READ_CHUNK):
    examples = source.__getitems__(list(range(start, min(start + READ_CHUNK, total))))
    for key in examples[0]:
      arrays[key] = _stack([e[key] for e in examples], arrays.get(key), start, total,
                           _declared_dtype(features, key))
  for key, value in arrays.items():
    if value.dtype.kind in ("S", "O"):  # tfds.features.Text comes back as bytes
      arrays[key] = np.asarray([v.decode("utf-8") if isinstance(v, bytes) else str(v)
                                for v in value])
  for key in MASK_KEYS:
    if key in arrays:
      arrays[key] = arrays[key].astype(bool, copy=False)
  return arrays


def load_splits(builder: tfds.core.DatasetBuilder,
                splits=synthetic.SPLITS) -> dict[str, dict[str, np.ndarray]]:
  """Prepares `builder` if needed and reads whole splits as dicts of stacked arrays.

  Returns:
    {split: {feature: (N, ...) array}}, examples in stored order; text features become
    `str` arrays, `*_mask` features `bool`, other tensors their declared dtype.
  """
  prepare(builder)
  if builder.info.file_format is not None and \
      builder.info.file_format.value != FILE_FORMAT:
    raise ValueError(f"{builder.data_dir} holds {builder.info.file_format.value} files; mer_jax "
                     f"reads {FILE_FORMAT} only (no TensorFlow): delete that folder to rebuild")
  sources = builder.as_data_source()
  missing = [split for split in splits if split not in sources]
  if missing:
    raise ValueError(f"{builder.data_dir} has no split(s) {missing}; it has {sorted(sources)}")
  started = time.time()
  arrays = {split: _read_split(sources[split], builder.info.features) for split in splits}
  log.info("read %s in %.1f s: %s (%.2f GB in memory)", builder.data_dir, time.time() - started,
           ", ".join(f"{split} {len(arrays[split]['label'])}" for split in splits),
           sum(v.nbytes for split in arrays.values() for v in split.values()) / 1e9)
  return arrays


def load_synthetic(preset: str, *, data_dir: str | None = None, seed: int = 0,
                   sizes: dict[str, int] | None = None,
                   task: str | None = None) -> tuple[dict[str, dict[str, np.ndarray]], DataSpec]:
  """The synthetic preset's splits (through the TFDS builder, prepared once) and DataSpec.

  Args:
    preset: a key of `mer_jax.data.synthetic.PRESETS`.
    data_dir: TFDS data folder (default `default_data_dir()`).
    seed: data seed.
    sizes: split sizes overriding the preset's defaults (some or all of train/valid/test).
    task: default the preset's natural task; classification presets also accept
      `multilabel_binary` (labels become (N, K) binaries).
  """
  spec = synthetic.spec_for(preset, task)
  builder = SyntheticMer(config=make_config(preset, seed=seed, sizes=sizes),
                         data_dir=data_dir or default_data_dir(), file_format=FILE_FORMAT)
  splits = load_splits(builder)
  if spec.task == "multilabel_binary":
    for arrays in splits.values():
      arrays["label"] = synthetic.to_multilabel_binary(arrays["label"], spec.num_classes)
  return splits, spec
