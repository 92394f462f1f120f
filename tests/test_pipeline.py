"""Input pipeline: deterministic order from the seed, identical batches on 1 or 4
devices, on-device and host gathering agree, sharding along the data axis."""

import jax
import numpy as np
from helpers import random_batch, tiny_spec

from mer_jax import parallel
from mer_jax.data.pipeline import Batcher


def split(n=20):
  data = random_batch(tiny_spec("classification"), batch_size=n, seed=5)
  data["id"] = np.array([f"s{i}" for i in range(n)])
  return data


def test_epoch_order_depends_on_seed_and_epoch_only():
  mesh1, mesh4 = parallel.make_mesh(1), parallel.make_mesh(4)
  a = Batcher(split(), 8, mesh1, on_device=False)
  b = Batcher(split(), 8, mesh4, on_device=True)
  np.testing.assert_array_equal(a.epoch_rows(3, 1), b.epoch_rows(3, 1))
  assert not np.array_equal(a.epoch_rows(3, 1), a.epoch_rows(3, 2))
  assert not np.array_equal(a.epoch_rows(3, 1), a.epoch_rows(4, 1))
  rows = a.epoch_rows(3, 1)
  assert rows.shape == (2, 8) and len(np.unique(rows)) == 16  # remainder dropped, no repeats


def test_batches_identical_whatever_the_device_count():
  data = split()
  rows = np.array([3, 1, 4, 15, 9, 2, 6, 5], np.int32)
  host1 = Batcher(data, 8, parallel.make_mesh(1), on_device=False).batch(rows)
  dev4 = Batcher(data, 8, parallel.make_mesh(4), on_device=True).batch(rows)
  for key in host1:
    np.testing.assert_array_equal(np.asarray(host1[key]), np.asarray(dev4[key]))
  np.testing.assert_array_equal(np.asarray(dev4["index"]), rows)
  np.testing.assert_array_equal(np.asarray(dev4["text"]), data["text"][rows])
  assert dev4["text"].sharding.spec[0] == parallel.DATA_AXIS
  assert len(dev4["text"].sharding.device_set) == 4


def test_ordered_rows_cover_the_split_once_with_padding():
  batcher = Batcher(split(10), 4, parallel.make_mesh(1), on_device=False)
  rows = batcher.ordered_rows()
  assert rows.shape == (3, 4)
  np.testing.assert_array_equal(rows.reshape(-1)[:10], np.arange(10))


def test_batch_size_must_divide_device_count():
  import pytest
  with pytest.raises(ValueError, match="divisible by the number of devices"):
    Batcher(split(), 6, parallel.make_mesh(4), on_device=False)


def test_mesh_uses_auto_axis_and_all_devices():
  mesh = parallel.make_mesh()
  assert mesh.devices.size == len(jax.devices()) == 4
  assert mesh.axis_names == (parallel.DATA_AXIS,)
