"""Device mesh, batch sharding and multi-host initialisation (SPEC section 2).

Data parallelism is `jax.jit` over a one-axis mesh: the batch is sharded along
"data", parameters are replicated. Losses therefore see the global batch, so
contrastive and kernel losses have single-device semantics on any device count.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A ("data",) mesh over the first `num_devices` devices (all by default)."""
  devices = jax.devices()
  n = len(devices) if not num_devices else num_devices
  if n > len(devices):
    raise ValueError(f"config.num_devices={n} but only {len(devices)} devices are visible")
  # AxisType.Auto explicitly: the Explicit default breaks dropout and CE gradients.
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices[:n])


def data_sharding(mesh, batch_axis: int = 0) -> NamedSharding:
  """Arrays sharded along "data" on `batch_axis` (1 for seed-stacked batches)."""
  return NamedSharding(mesh, P(*(None,) * batch_axis, DATA_AXIS))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def process_rows(sharding, shape: tuple[int, ...], batch_axis: int = 0) -> slice:
  """The rows (along `batch_axis`) of a global batch of `shape` that this process's
  devices hold under `sharding`: one contiguous block, wherever the mesh placed this
  process's devices."""
  num_rows = shape[batch_axis]
  blocks = {(index[batch_axis].start or 0,
             num_rows if index[batch_axis].stop is None else index[batch_axis].stop)
            for index in sharding.addressable_devices_indices_map(tuple(shape)).values()}
  start, stop = min(b[0] for b in blocks), max(b[1] for b in blocks)
  if sum(b[1] - b[0] for b in blocks) != stop - start:
    raise ValueError(f"this process's devices hold non-contiguous rows {sorted(blocks)} of the "
                     "batch; build the mesh with parallel.make_mesh (process-major devices)")
  return slice(start, stop)


def shard_batch(batch: dict, mesh, batch_axis: int = 0) -> dict:
  """Places a host batch (global, identical on every process) on the mesh, sharded
  along `batch_axis`.

  On one process this is a device_put; on several, each process contributes the
  rows its devices own, via `jax.make_array_from_process_local_data`.
  """
  sharding = data_sharding(mesh, batch_axis)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)

  def put(x):
    x = np.asarray(x)
    local = (slice(None),) * batch_axis + (process_rows(sharding, x.shape, batch_axis),)
    return jax.make_array_from_process_local_data(sharding, x[local], x.shape)

  return jax.tree.map(put, batch)


def fetch(tree):
  """Host numpy copies of the arrays in `tree`, complete on every process.

  An array sharded over several processes (a batch-sharded output) is gathered from
  all of them: a collective, so every process must call this together. Arrays each
  process holds whole (replicated or local) are copied as `jax.device_get` does.
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  def get(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      return multihost_utils.process_allgather(x, tiled=True)
    return jax.device_get(x)

  return jax.tree.map(get, tree)


def replicate(tree, mesh):
  """`tree` replicated on every device of the mesh.

  On several processes, arrays a process holds whole (host numpy, or a jax.Array on
  its own devices, e.g. a scalar made on the host) go through host memory: a
  device_put of such a jax.Array straight to a multi-process sharding yields an array
  whose shards orbax cannot save (jax 0.12). Every process must pass the same values.
  """
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = jax.make_array_from_process_local_data(sharding, np.asarray(jax.random.key_data(x)))
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  return jax.tree.map(put, tree)


_BARRIER_TIMEOUT_MS = 30 * 60 * 1000
_barrier_count = 0


def sync_processes(name: str) -> None:
  """Waits until every process reaches this point (a no-op on one process).

  Uses the coordination service's barrier, which tolerates processes arriving many
  minutes apart (one still compiling), unlike a first gloo collective whose peers must
  meet within 30 s. Every process must call it the same number of times.
  """
  global _barrier_count
  if jax.process_count() == 1:
    return
  # jax keeps its distributed client here; orbax reaches it the same way.
  from jax._src import distributed

  _barrier_count += 1
  distributed.global_state.client.wait_at_barrier(f"mer_jax_{name}_{_barrier_count}",
                                                  _BARRIER_TIMEOUT_MS)


def agree(flag: bool) -> bool:
  """Process 0's value of a host-side decision, on every process.

  Host checks such as "does this checkpoint folder exist yet" can differ between
  processes that run some seconds apart; branches around collectives (orbax's
  barriers) must not. Every process must call it.
  """
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils

  sync_processes("agree")
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.bool_)))


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Initialises multi-process JAX.

  With no arguments JAX discovers the cluster (SLURM `srun`, TPU VMs). On CPU the
  gloo collectives are selected so that two local processes can talk.
  """
  kwargs = {}
  if coordinator_address is not None:
    # Explicit addresses are the local multi-process (CPU) case; jax.devices() must not
    # be touched before initialize(), so the backend is not queried here.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
  jax.distributed.initialize(**kwargs)
  # Open the collectives while the processes are in step (they have just met in
  # initialize()): peers of a first gloo collective must arrive within 30 s.
  from jax.experimental import multihost_utils

  multihost_utils.sync_global_devices("mer_jax_initialize")


def enable_compilation_cache(path: str | None = None) -> None:
  """Persists compiled programs across runs (the CLIs call this): restarting,
  resuming or evaluating a run then skips recompiling its train and eval steps.

  `path` defaults to $MER_JAX_COMPILATION_CACHE or ~/.cache/mer_jax/jax_cache; an
  explicit JAX_COMPILATION_CACHE_DIR set by the user wins.
  """
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  path = path or os.environ.get("MER_JAX_COMPILATION_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "mer_jax", "jax_cache")
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
