"""Data source -> batches -> arrays sharded on the device mesh.

Splits are loaded once into the in-memory layout of `mer_jax.data.spec`. Batches
are drawn by index: the order of epoch e is a permutation seeded by (seed, e), so the
batches are identical whatever the device count. With `config.data.on_device` the
whole split lives on the accelerator (replicated) and each batch is a compiled
gather whose output is sharded along the data axis; otherwise rows are gathered on
the host and transferred per step.
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np

from mer_jax import parallel
from mer_jax.data.spec import DataSpec

SPLITS = ("train", "valid", "test")
NON_ARRAY_KEYS = ("id",)


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
    on_device: keep the split on the devices and gather there.
  """

  def __init__(self, split: dict[str, np.ndarray], batch_size: int, mesh, *, on_device: bool):
    num_devices = mesh.devices.size
    if batch_size % num_devices:
      raise ValueError(f"config.train.batch_size={batch_size} (or config.eval.batch_size) must be "
                       f"divisible by the number of devices ({num_devices})")
    self.arrays = device_arrays(split)
    self.num_rows = len(self.arrays["label"])
    self.batch_size = batch_size
    self.mesh = mesh
    self.on_device = on_device
    if on_device:
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
