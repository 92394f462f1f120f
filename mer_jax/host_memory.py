"""Host memory that XLA's CPU runtime frees is kept for reuse, not handed back.

XLA's CPU client allocates an executable's temporary buffer with `malloc` at every
execution and frees it afterwards: 586 MB for the official CMAD student step. glibc
serves a block that large with `mmap` and returns it with `munmap` (from a worker
thread's arena, with `madvise`), so every step faults the whole buffer in again and the
kernel zeroes it page by page: 153,000 page faults and 0.3 s of kernel time per CMAD step
on the 2-core build VM, a third of the step's CPU time (docs/performance.md).

`keep_freed_memory` sets glibc's malloc to one arena, no `mmap` for large blocks and a
2 GiB trim threshold (`mallopt`), so the buffer freed after one step is the buffer of
the next: no faults, the step 1.4-1.7x faster on CPU. The process keeps its peak heap
instead of returning it to the system between steps, which a training process reuses
anyway. It must run before JAX starts its CPU backend (its worker threads take their
arenas then; called later, it changes nothing that matters). Every command line
(`cli.run`) and the test session call it first; the library's functions do not, so a
user's script keeps its own malloc unless it calls `keep_freed_memory()` before its first
JAX computation. `MER_JAX_KEEP_FREED_MEMORY=0` leaves malloc as it is; other C libraries
(musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

ENV_SWITCH = "MER_JAX_KEEP_FREED_MEMORY"
# glibc's malloc.h
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# The largest value mallopt takes (an int): free memory above this at the top of the
# heap is still returned to the system.
TRIM_THRESHOLD_BYTES = 2**31 - 1

_applied: bool | None = None


def keep_freed_memory() -> bool:
  """Sets glibc's malloc to keep freed memory for reuse (see the module docstring), once
  per process; returns whether it is in effect."""
  global _applied
  if _applied is None:
    _applied = _set_mallopt() if _wanted() else False
  return _applied


def _wanted() -> bool:
  if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
    return False
  return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _set_mallopt() -> bool:
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
  # mallopt returns 1 on success; all three are needed (any two still fault every step).
  return all([mallopt(param, value) == 1 for param, value in settings])
