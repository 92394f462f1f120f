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


def data_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(batch: dict, mesh) -> dict:
  """Places a host batch (global, identical on every process) on the mesh.

  On one process this is a device_put; on several, each process contributes the
  rows its devices own, via `jax.make_array_from_process_local_data`.
  """
  sharding = data_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)

  def put(x):
    x = np.asarray(x)
    per_process = x.shape[0] // jax.process_count()
    start = jax.process_index() * per_process
    local = x[start:start + per_process]
    return jax.make_array_from_process_local_data(sharding, local, x.shape)

  return jax.tree.map(put, batch)


def replicate(tree, mesh):
  return jax.device_put(tree, replicated(mesh))


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
