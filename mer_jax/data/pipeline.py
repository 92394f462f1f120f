"""Data source -> batches -> arrays sharded on the device mesh.

Splits are loaded once into the in-memory layout of `mer_jax.data.spec`. Batches
are drawn by index: the order of epoch e is a permutation seeded by (seed, e), so the
batches are identical whatever the device count. With `config.data.on_device` a split
that takes at most `config.data.device_memory_share` of one device's memory lives on the
accelerator (replicated) and each batch is a compiled gather whose output is sharded
along the data axis; a larger split (or `on_device=False`) stays in host memory, and its
batches are gathered there and transferred by a background thread (grain) a few steps
ahead of the step that uses them. Both paths give the same batches.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Iterable, Iterator

import grain
import jax
import numpy as np

from mer_jax import parallel
from mer_jax.data.spec import DataSpec

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
NON_ARRAY_KEYS = ("id",)
# Default of config.data.device_memory_share: a resident split may take this share of one
# device's memory. The train split and one evaluation split can be resident at once, and
# the model, optimiser and activations need the rest.
DEVICE_MEMORY_SHARE = 0.25
# Host-streamed batches prepared ahead of the step that consumes them.
PREFETCH_BATCHES = 2


def load_data(data_config) -> tuple[dict[str, dict[str, np.ndarray]], DataSpec]:
  """Loads every split of `config.data` and its DataSpec."""
  source = data_config.source
  if source == "synthetic":
    from mer_jax.data.builders.common import load_synthetic

    sizes = {"train": data_config.num_train, "valid": data_config.num_valid,
             "test": data_config.num_test}
    sizes = {k: v for k, v in sizes.items() if v}
    return load_synthetic(data_config.name, data_dir=data_config.cache_dir or None,
                          seed=data_config.seed, sizes=sizes or None, task=data_config.task)
  from mer_jax.data import sources

  return sources.load(data_config)


def device_arrays(split: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The numeric arrays of a split, with the row index each sample had in its split."""
  arrays = {k: v for k, v in split.items() if k not in NON_ARRAY_KEYS}
  num_rows = len(arrays["label"])
  arrays["index"] = np.arange(num_rows, dtype=np.int32)
  return arrays


def placement(data_config) -> dict:
  """The Batcher placement `config.data` selects: `on_device` and `device_memory_share`
  (configs saved before the share existed get the default)."""
  return {"on_device": bool(data_config.on_device),
          "device_memory_share": float(data_config.get("device_memory_share",
                                                       DEVICE_MEMORY_SHARE))}


def device_memory_bytes(device) -> int:
  """Memory of one device: its allocator's limit where the backend reports one (GPU, TPU);
  CPU devices report none and share the host's memory, so that is their size."""
  try:
    stats = device.memory_stats()
  except (NotImplementedError, RuntimeError):  # backends without allocator statistics
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fits_on_device(arrays: dict[str, np.ndarray], mesh, share: float) -> bool:
  """Whether a replica of `arrays` takes at most `share` of each local device's memory;
  every process gets process 0's answer, so that all take the same path."""
  limit = share * min(device_memory_bytes(d) for d in mesh.local_devices)
  return parallel.agree(sum(v.nbytes for v in arrays.values()) <= limit)


@functools.cache
def _sharded_gather(mesh, batch_axis: int):
  """One compiled gather per mesh (and per shapes), shared by every Batcher."""
  return jax.jit(lambda data, rows: jax.tree.map(lambda x: x[rows], data),
                 out_shardings=parallel.data_sharding(mesh, batch_axis))


class Batcher:
  """Draws batches of one split onto a mesh.

  Args:
    split: the split's arrays (in-memory layout).
    batch_size: global batch size; must be divisible by the mesh size.
    mesh: the data mesh.
    on_device: keep the split on the devices and gather there, if it fits.
    device_memory_share: the split stays on the devices only if it takes at most this
      share of one device's memory (`device_memory_bytes`); otherwise batches stream
      from host memory (`config.data.device_memory_share`; 0 = always stream).
  """

  def __init__(self, split: dict[str, np.ndarray], batch_size: int, mesh, *, on_device: bool,
               device_memory_share: float = DEVICE_MEMORY_SHARE):
    num_devices = mesh.devices.size
    if batch_size % num_devices:
      raise ValueError(f"config.train.batch_size={batch_size} (or config.eval.batch_size) must be "
                       f"divisible by the number of devices ({num_devices})")
    if not 0.0 <= device_memory_share <= 1.0:
      raise ValueError(f"config.data.device_memory_share={device_memory_share} must be in "
                       f"[0, 1] (the share of one device's memory a resident split may take)")
    self.arrays = device_arrays(split)
    self.num_rows = len(self.arrays["label"])
    self.batch_size = batch_size
    self.mesh = mesh
    self.on_device = on_device and fits_on_device(self.arrays, mesh, device_memory_share)
    if on_device and not self.on_device:
      log.info("a split of %d samples (%.2f GB) exceeds config.data.device_memory_share=%g of "
               "device memory: its batches stream from host memory", self.num_rows,
               sum(v.nbytes for v in self.arrays.values()) / 1e9, device_memory_share)
    if self.on_device and jax.process_count() == 1:
      # On CPU devices the replica shares the host arrays' memory where they are 64-byte
      # aligned (as `load_data` allocates them) instead of doubling the split.
      self._resident = jax.device_put(self.arrays, parallel.replicated(mesh), may_alias=True)
    elif self.on_device:
      self._resident = parallel.replicate(self.arrays, mesh)

  def steps_per_epoch(self) -> int:
    return self.num_rows // self.batch_size

  def epoch_rows(self, seed: int, epoch: int) -> np.ndarray:
    """(steps, batch_size) row indices of a shuffled epoch (the remainder is dropped)."""
    if self.steps_per_epoch() == 0:
      raise ValueError(f"the training split has {self.num_rows} samples, fewer than "
                       f"config.train.batch_size={self.batch_size}")
    order = np.random.default_rng([seed, epoch]).permutation(self.num_rows)
    steps = self.steps_per_epoch()
    return order[:steps * self.batch_size].reshape(steps, self.batch_size).astype(np.int32)

  def ordered_rows(self) -> np.ndarray:
    """(steps, batch_size) rows covering the split in order, the last batch padded by
    repeating row 0; callers keep the first `num_rows` outputs."""
    steps = math.ceil(self.num_rows / self.batch_size)
    rows = np.zeros(steps * self.batch_size, np.int32)
    rows[:self.num_rows] = np.arange(self.num_rows)
    return rows.reshape(steps, self.batch_size)

  def batch(self, rows: np.ndarray) -> dict[str, jax.Array]:
    """The rows' arrays on the mesh, sharded along the last axis of `rows`: (B,) rows
    give a batch, (K, B) rows give K seeds' batches stacked on a leading axis."""
    rows = np.asarray(rows)
    batch_axis = rows.ndim - 1
    if self.on_device:
      rows = jax.device_put(rows, parallel.data_sharding(self.mesh, batch_axis))
      return _sharded_gather(self.mesh, batch_axis)(self._resident, rows)
    return parallel.shard_batch({k: v[rows] for k, v in self.arrays.items()}, self.mesh,
                                batch_axis)

  def batches(self, rows: Iterable[np.ndarray]) -> Iterator[dict[str, jax.Array]]:
    """`batch(r)` for each r of `rows` ((steps, B) or (steps, K, B)), in order. From host
    memory, `PREFETCH_BATCHES` batches are gathered and put on the mesh by a background
    thread while the current step runs."""
    if self.on_device:  # a dispatched gather: already asynchronous
      yield from (self.batch(r) for r in rows)
      return
    dataset = grain.MapDataset.source(np.asarray(rows)).map(self.batch)
    iterator = iter(dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=PREFETCH_BATCHES)))
    try:
      yield from iterator
    finally:  # an interrupted epoch (pre-emption, a non-finite stop) stops the thread
      iterator.close()
