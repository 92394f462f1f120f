"""Test set-up: 4 fake CPU devices so that sharding and device-count invariance are
tested on one machine (SPEC section 2)."""

import os

os.environ.setdefault("XLA_FLAGS", "")
os.environ.setdefault("MER_JAX_DATA_DIR", os.path.join(os.path.dirname(__file__), "..",
                                                      ".pytest_cache", "tfds"))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
# Tests compile the same small programs many times (every tiny run); a persistent
# compilation cache turns the repeats into cache hits.
jax.config.update("jax_compilation_cache_dir", os.path.join(
    os.path.dirname(__file__), "..", ".pytest_cache", "jax_compilation_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def repo_root():
  return REPO
