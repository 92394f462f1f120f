"""Test set-up: 4 fake CPU devices so that sharding and device-count invariance are
tested on one machine (SPEC section 2); XLA's cheap compilation mode and one persistent
compilation cache for every test and every subprocess; per-xdist-worker data folders."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_ROOT = os.path.join(REPO, ".pytest_cache")
# One compilation cache for in-process runs and every subprocess: a program compiled once
# (a :tiny train step, an evaluation forward) is a cache hit everywhere after.
COMPILATION_CACHE = os.path.join(CACHE_ROOT, "jax_compilation_cache")
# TFDS builders prepare into their data dir; two xdist workers preparing the same
# synthetic dataset at once would race, so each worker has its own.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
os.environ.setdefault("MER_JAX_DATA_DIR", os.path.join(CACHE_ROOT, f"tfds_{WORKER}"))
# Tests compile hundreds of small programs and run each a few steps: XLA's optimisation
# passes cost more than they save (a :tiny DQF step compiles 2.3x faster and runs 1.9x
# slower). Every side of every equality runs in the same mode; subprocesses inherit it.
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "true"
os.environ.setdefault("XLA_FLAGS", "")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

import pytest  # noqa: E402

from mer_jax import cli, host_memory  # noqa: E402

# As the command lines do: tracing allocates millions of short-lived objects, and each
# execution's temporary buffers are reused, not faulted in again (before any computation).
cli.collect_garbage_less_often()
host_memory.keep_freed_memory()


def subprocess_env(num_devices: int = 1, **extra) -> dict:
  """Environment of a `python -m mer_jax.<cli>` subprocess: CPU, `num_devices` devices,
  the tests' compilation mode, compilation cache and data folder."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", MER_JAX_COMPILATION_CACHE=COMPILATION_CACHE,
             JAX_NUM_CPU_DEVICES=str(num_devices), **extra)
  env.pop("XLA_FLAGS", None)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return env


@pytest.fixture(scope="session")
def repo_root():
  return REPO


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """(workdir, results) of one trained `dqf_mosei.py:tiny` run on 4 devices
  (`helpers.tiny_run_config`), shared by every end-to-end check that only reads a
  finished run. Tests must not write into it (copy it first)."""
  from helpers import tiny_run_config

  from mer_jax import train

  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  return workdir, train.run(tiny_run_config(), workdir)


@pytest.fixture(scope="session")
def cli_run(tmp_path_factory):
  """The workdir of the same run trained by `python -m mer_jax.train` in two processes
  of two devices each (localhost, gloo collectives): the command line
  as a user runs it, and the multi-process path. tests/test_multiprocess.py compares it
  with `tiny_run`; tests/test_cli.py evaluates and predicts from it."""
  import socket
  import subprocess
  import sys

  from helpers import TINY_RUN_ARGS

  root = tmp_path_factory.mktemp("cli_run")
  workdir = str(root / "run")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{s.getsockname()[1]}"
  processes = []
  for index in range(2):
    log = open(root / f"process{index}.stderr", "w")  # noqa: SIM115 (closed below)
    processes.append((subprocess.Popen(
        [sys.executable, "-m", "mer_jax.train", *TINY_RUN_ARGS, "--workdir", workdir,
         "--coordinator_address", address, "--num_processes", "2", "--process_id", str(index)],
        cwd=REPO, env=subprocess_env(2), stdout=subprocess.DEVNULL, stderr=log), log))
  for process, log in processes:
    try:
      code = process.wait(timeout=1200)
    except subprocess.TimeoutExpired:
      process.kill()
      code = "timeout"
    log.close()
    if code != 0:
      with open(log.name) as f:
        raise AssertionError(f"{log.name}: exit {code}\n{f.read()[-4000:]}")
  return workdir


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
  """On an xdist worker under `--dist loadgroup`, every `xdist_group` test must carry its
  group in its node id (what the scheduler groups by); a pytest that xdist cannot rename
  would spread the shared trained runs over the workers, each building them again."""
  if not getattr(config.option, "loadgroup", False):
    return
  ungrouped = [item.nodeid for item in items
               if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
  if ungrouped:
    raise pytest.UsageError(
        f"pytest-xdist could not group {len(ungrouped)} tests (e.g. {ungrouped[0]}): this "
        f"pytest ({pytest.__version__}) is not one pyproject.toml allows; run bash setup.sh")
  items[:] = heaviest_modules_first(items)


# Seconds per module on 2 cores, for ordering only: the full suite's `--durations` of
# 2026-12-02 summed per module (the modules over 30 s). Any other module is estimated from
# its tests: the `slow` tier is every test that took about 4 s or more, the rest take well
# under a second. A stale figure only changes the order, never what runs.
MODULE_SECONDS = {
    "tests/test_resume.py": 195, "tests/test_mixed_precision.py": 167,
    "tests/test_cli.py": 136, "tests/test_cmarr.py": 122, "tests/test_train.py": 99,
    "tests/test_compare.py": 94, "tests/test_bert.py": 87, "tests/test_sources_e2e.py": 78,
    "tests/test_ease.py": 59, "tests/test_sweep.py": 56, "tests/test_dqf.py": 49,
    "tests/test_bench.py": 48, "tests/test_perceiver.py": 42, "tests/test_cmad.py": 36,
    "tests/test_evaluate.py": 36, "tests/test_mcur.py": 32, "tests/test_multiprocess.py": 31,
}
SLOW_TEST_SECONDS, QUICK_TEST_SECONDS = 5.0, 0.3


def heaviest_modules_first(items):
  """`items` with the modules of most estimated time first, each module's tests kept
  together and in order (`--no-loadscope-reorder` makes this the order in which xdist
  hands out work). The long end-to-end runs then start at once, and the last minutes
  are quick tests that even out the two workers' ends instead of one worker finishing
  a long run alone."""
  modules, estimate = {}, {}
  for item in items:
    module = item.nodeid.split("::")[0]
    modules.setdefault(module, []).append(item)
    estimate[module] = estimate.get(module, 0.0) + (
        SLOW_TEST_SECONDS if item.get_closest_marker("slow") else QUICK_TEST_SECONDS)
  cost = {module: MODULE_SECONDS.get(module, estimate[module]) for module in modules}
  order = sorted(modules, key=lambda module: -cost[module])  # stable: ties keep file order
  return [item for module in order for item in modules[module]]
