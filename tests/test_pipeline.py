"""Input pipeline: deterministic order from the seed, identical batches on 1 or 4
devices, on-device and host gathering agree, sharding along the data axis; a split over
config.data.device_memory_share streams from host memory with prefetch and trains and
evaluates exactly as a resident one."""

import dataclasses
import json
import logging
import os
import threading

import jax
import numpy as np
import pytest
from helpers import random_batch, tiny_spec, toy_train_config
from test_seeds import toy_stage

from mer_jax import config_lib, parallel, trainer
from mer_jax.data import pipeline
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


# ----------------------------------------------------------------------------- host streaming


def test_a_split_over_the_device_share_streams_the_same_batches():
  data = split()
  mesh = parallel.make_mesh(4)
  resident = Batcher(data, 8, mesh, on_device=True, device_memory_share=1.0)
  nbytes = sum(v.nbytes for v in resident.arrays.values())
  device_bytes = pipeline.device_memory_bytes(mesh.devices.flat[0])
  just_below = Batcher(data, 8, mesh, on_device=True,
                       device_memory_share=0.999 * nbytes / device_bytes)
  streamed = Batcher(data, 8, mesh, on_device=True, device_memory_share=0.0)
  assert resident.on_device and not just_below.on_device and not streamed.on_device
  # One seed's epoch, K = 2 seeds' stacked epochs, the padded evaluation order.
  for rows in (resident.epoch_rows(1, 0),
               np.stack([resident.epoch_rows(s, 2) for s in (0, 1)], axis=1),
               resident.ordered_rows()):
    pairs = list(zip(resident.batches(rows), streamed.batches(rows), strict=True))
    assert len(pairs) == len(rows)
    for row, (a, b) in zip(rows, pairs, strict=True):
      assert set(a) == set(b) == set(data) - {"id"} | {"index"}
      for key in a:
        np.testing.assert_array_equal(np.asarray(b[key]), data[key][row] if key in data
                                      else row)
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
        assert b[key].sharding == a[key].sharding
        assert b[key].sharding.spec[row.ndim - 1] == parallel.DATA_AXIS


def test_a_resident_split_on_cpu_devices_shares_the_loaded_arrays(tmp_path):
  from mer_jax.data.builders import common

  splits, _ = common.load_synthetic("mosi", data_dir=str(tmp_path),
                                    sizes={"train": 9, "valid": 2, "test": 2})
  train = splits["train"]
  for n in (1, 4):
    batcher = Batcher(train, n, parallel.make_mesh(n), on_device=True)
    for key in ("text", "audio", "vision", "text_mask", "label"):
      assert train[key].ctypes.data % common.ALIGNMENT == 0, key
      shards = batcher._resident[key].addressable_shards
      assert {s.data.unsafe_buffer_pointer() for s in shards} == {train[key].ctypes.data}, key
    np.testing.assert_array_equal(np.asarray(batcher.batch(np.arange(8)[::-1])["text"]),
                                  train["text"][7::-1])


def test_an_interrupted_stream_stops_its_prefetch_thread():
  streamed = Batcher(split(), 4, parallel.make_mesh(2), on_device=False)
  before = threading.active_count()
  batches = streamed.batches(streamed.epoch_rows(0, 0))
  next(batches)
  batches.close()  # what leaving a for loop early does
  for thread in threading.enumerate():
    if thread.name.startswith("grain-prefetch"):
      thread.join(timeout=10)
  assert threading.active_count() <= before


def test_device_memory_share_is_checked():
  with pytest.raises(ValueError, match="device_memory_share=1.5"):
    Batcher(split(), 8, parallel.make_mesh(1), on_device=True, device_memory_share=1.5)
  assert config_lib.base_config().data.device_memory_share == pipeline.DEVICE_MEMORY_SHARE
  assert pipeline.device_memory_bytes(jax.devices()[0]) > 2**30


@pytest.mark.slow
def test_streamed_training_and_validation_equal_the_resident_run(tmp_path, caplog):
  spec = tiny_spec("regression")
  splits = {"train": random_batch(spec, 32, seed=0), "valid": random_batch(spec, 16, seed=1)}
  mesh = parallel.make_mesh(2)
  stage = dataclasses.replace(toy_stage(), num_epochs=2)  # its loss uses the step key too
  runs = {}
  for name, share in (("resident", 1.0), ("streamed", 0.0)):
    config = toy_train_config(num_epochs=2, log_every_steps=1)
    config.data.device_memory_share = share
    workdir = str(tmp_path / name)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=pipeline.__name__):
      params, _ = trainer.train_stage(stage, config, splits, spec, mesh, workdir)
    streamed = [r.getMessage() for r in caplog.records if "stream from host" in r.getMessage()]
    with open(os.path.join(workdir, "log.jsonl")) as f:
      # Everything but the wall-clock figures (epoch_seconds, samples_per_second, ...).
      log = [{k: v for k, v in r.items() if "second" not in k} for r in map(json.loads, f)]
    runs[name] = (params, log, streamed)
  (params_a, log_a, streamed_a), (params_b, log_b, streamed_b) = runs.values()
  # The training split and the validation split (evaluated every epoch) both streamed.
  assert streamed_a == [] and [m.split(" samples")[0] for m in streamed_b] == [
      "a split of 32", "a split of 16"]
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
  assert len([r for r in log_a if "val/loss" not in r]) == 8  # every step's losses
  assert [r["epoch"] for r in log_a if "val/loss" in r] == [1, 2]
  assert log_a == log_b


STREAM_IN_TWO_PROCESSES = """
import sys
import numpy as np
from mer_jax import parallel
parallel.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
from mer_jax.data.pipeline import Batcher
rng = np.random.default_rng(0)
data = {"text": rng.normal(size=(20, 3, 2)).astype(np.float32),
        "text_mask": rng.random((20, 3)) > 0.5, "label": rng.normal(size=20).astype(np.float32)}
mesh = parallel.make_mesh()
resident = Batcher(data, 8, mesh, on_device=True, device_memory_share=1.0)
streamed = Batcher(data, 8, mesh, on_device=True, device_memory_share=0.0)
assert mesh.devices.size == 4 and resident.on_device and not streamed.on_device
rows = np.stack([resident.epoch_rows(s, 1) for s in (0, 1)], axis=1)
for seeds in (rows[:, 0], rows):
  for r, a, b in zip(seeds, resident.batches(seeds), streamed.batches(seeds), strict=True):
    a, b = parallel.fetch(a), parallel.fetch(b)
    for key in data:
      np.testing.assert_array_equal(b[key], data[key][r])
      np.testing.assert_array_equal(a[key], b[key])
print("streamed batches equal")
"""


@pytest.mark.slow
def test_streamed_batches_in_two_processes_equal_the_resident_ones(tmp_path):
  import socket
  import subprocess
  import sys

  from conftest import REPO, subprocess_env

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{s.getsockname()[1]}"
  processes = [subprocess.Popen([sys.executable, "-c", STREAM_IN_TWO_PROCESSES, address,
                                 str(i)], cwd=REPO, env=subprocess_env(2),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
  for process in processes:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0 and "streamed batches equal" in output, output[-3000:]
