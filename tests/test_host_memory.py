"""`mer_jax.host_memory`: with it, XLA's per-execution temporary buffer is reused, not
faulted in again at every call; the switch turns it off. Each case runs in a fresh
interpreter: malloc's settings are per process and must precede JAX's CPU backend."""

import platform
import subprocess
import sys

import pytest
from conftest import REPO, subprocess_env

from mer_jax import host_memory

PAGES = 16 * 2**20 * 4 // 4096  # the probe's 64 MiB temporary buffer in 4 KiB pages

PROBE = r"""
import resource
from mer_jax import host_memory
host_memory.keep_freed_memory()  # first, as cli.run: before JAX's CPU backend starts
import jax, jax.numpy as jnp

@jax.jit
def materialised(x):
  y = jax.lax.optimization_barrier(x + 1.0)  # a 64 MiB temporary buffer
  return jnp.sum(y * 2.0)

x = jnp.ones((16 * 2**20,), jnp.float32)
for _ in range(5):
  materialised(x).block_until_ready()
faults = []
for _ in range(15):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  materialised(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The median call: the heap may still grow once or twice while it settles.
print(host_memory.keep_freed_memory(), sorted(faults)[len(faults) // 2])
"""


def _probe(**env):
  result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=subprocess_env(**env))
  assert result.returncode == 0, result.stderr[-2000:]
  applied, faults = result.stdout.split()
  return applied == "True", float(faults)


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_freed_memory_is_reused_and_the_switch_turns_it_off():
  applied, faults = _probe()
  assert applied
  assert faults < 0.02 * PAGES, faults  # the buffer freed by a call serves the next
  applied, faults = _probe(**{host_memory.ENV_SWITCH: "0"})
  assert not applied
  assert faults > 0.5 * PAGES, faults  # glibc's default: mmap'ed and faulted in per call


def test_the_setting_is_applied_once_and_reported(monkeypatch):
  assert host_memory.keep_freed_memory() == (platform.libc_ver()[0] == "glibc"
                                             and platform.system() == "Linux")
  monkeypatch.setattr(host_memory, "_set_mallopt", lambda: pytest.fail("applied twice"))
  host_memory.keep_freed_memory()  # once per process: the first answer stands
  monkeypatch.setenv(host_memory.ENV_SWITCH, "off")
  assert not host_memory._wanted()
