"""Every command line turns an error a user can fix into one `error:` line on stderr and
exit status 2 (mer_jax.cli), with the traceback only under --verbosity=1.

Each CLI runs in this process as `python -m` would run it (`runpy`, its `__main__`
block, absl's app.run), on an input that fails before anything compiles; one test runs
`mer_jax.train` in a subprocess on a data file with a NaN, to see the whole console."""

import contextlib
import gc
import logging
import os
import runpy
import subprocess
import sys
import warnings

import numpy as np
import pytest
from absl import flags
from conftest import REPO

from mer_jax import cli

# CLI modules whose flags are defined at import (re-imported fresh for each run).
FLAG_MODULES = ("mer_jax.train", "mer_jax.compare", "mer_jax.crossval", "mer_jax.sweep")
MER_JAX_FLAGS: set[str] = set()


@contextlib.contextmanager
def cli_process_state():
  """Removes mer_jax's flags (a CLI run as __main__ defines its own) and restores the
  flags, modules and logging set-up of this process afterwards."""
  values = flags.FLAGS
  before = {name: values[name] for name in values}
  # Flags put back after an earlier run lose their module attribution: remember names.
  MER_JAX_FLAGS.update(
      name for name in before
      if (values.find_module_defining_flag(name) or "").startswith(("mer_jax", "__main__")))
  ours = [name for name in before if name in MER_JAX_FLAGS]
  modules = {name: sys.modules.pop(name) for name in FLAG_MODULES if name in sys.modules}
  package = sys.modules["mer_jax"]
  for name in FLAG_MODULES:  # `from mer_jax import train` must import it afresh
    package.__dict__.pop(name.rpartition(".")[2], None)
  root = logging.getLogger()
  handlers, level = root.handlers[:], root.level
  for name in ours:
    delattr(values, name)
  try:
    yield
  finally:
    for name in list(values):
      if name not in before or values[name] is not before[name]:
        delattr(values, name)
    for name, flag in before.items():
      if name not in values:
        values[name] = flag
    values.unparse_flags()
    for name in FLAG_MODULES:
      sys.modules.pop(name, None)
      package.__dict__.pop(name.rpartition(".")[2], None)
    sys.modules.update(modules)
    for name, module in modules.items():
      setattr(package, name.rpartition(".")[2], module)
    root.handlers[:] = handlers
    root.setLevel(level)


def run_in_process(module, *args, monkeypatch, capsys):
  """(exit status, stderr lines) of `python -m module args`."""
  monkeypatch.setattr(sys, "argv", [module, *args])
  # parallel.enable_compilation_cache leaves an explicit cache directory alone.
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", os.environ.get(
      "JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".pytest_cache", "cli_errors_cache")))
  capsys.readouterr()
  with cli_process_state(), pytest.raises(SystemExit) as exited, warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # "found in sys.modules" (imported here)
    runpy.run_module(module, run_name="__main__", alter_sys=False)
  return exited.value.code, capsys.readouterr().err.strip().splitlines()


def assert_one_error_line(lines, *fragments):
  errors = [line for line in lines if line.startswith("error: ")]
  assert len(errors) == 1, lines
  assert not any("Traceback" in line for line in lines), lines
  for fragment in fragments:
    assert fragment in errors[0], errors[0]


TINY = "configs/dqf_mosei.py:tiny"


@pytest.mark.parametrize("module, args, fragments", [
    # config validation, before any data loading
    ("mer_jax.train", ["--config", TINY, "--config.train.batch_size=3", "--workdir", "{tmp}"],
     ["config.train.batch_size=3", "divisible by the number of devices"]),
    # a flag that does not parse (misspelt override)
    ("mer_jax.train", ["--config", TINY, "--config.train.num_epoch=3", "--workdir", "{tmp}"],
     ["num_epoch"]),
    ("mer_jax.evaluate", ["--workdir", "{tmp}/none"],
     ["{tmp}/none/config.json not found", "mer_jax run directory"]),
    ("mer_jax.predict", ["--workdir", "{tmp}/none", "--input", "{tmp}/x.npz"],
     ["--input {tmp}/x.npz does not exist"]),
    ("mer_jax.compare", ["--dataset", "moseii:tiny", "--methods", "dqf", "--workdir", "{tmp}"],
     ["unknown dataset 'moseii'"]),
    ("mer_jax.crossval", ["--config", TINY, "--workdir", "{tmp}"],
     ["config.data.num_folds must be set"]),
    ("mer_jax.bench", ["--config", TINY, "--config.data.source=csv"],
     ["config.data.source='csv'", "unknown data source"]),
    ("mer_jax.sweep", ["--config", TINY, "--space", "{tmp}/none.py", "--trials", "2",
                       "--workdir", "{tmp}"], ["--space {tmp}/none.py: no such file"]),
    # a required flag missing
    ("mer_jax.sweep", ["--config", TINY, "--workdir", "{tmp}"],
     ["--space, --trials and --workdir are required", "--helpshort"]),
])
def test_each_cli_prints_one_error_line_and_exits_2(module, args, fragments, tmp_path,
                                                    monkeypatch, capsys):
  tmp = str(tmp_path)
  code, lines = run_in_process(module, *(a.format(tmp=tmp) for a in args),
                               monkeypatch=monkeypatch, capsys=capsys)
  assert code == cli.USER_ERROR_EXIT_CODE
  assert_one_error_line(lines, *(f.format(tmp=tmp) for f in fragments))


def test_verbosity_1_adds_the_traceback(tmp_path, monkeypatch, capsys):
  code, lines = run_in_process("mer_jax.evaluate", "--workdir", str(tmp_path),
                               "--verbosity=1", monkeypatch=monkeypatch, capsys=capsys)
  assert code == 2
  assert lines[0].startswith("Traceback") and lines[-1].startswith("error: ")
  assert "FileNotFoundError" in "\n".join(lines)


def test_a_cli_collects_garbage_less_often(tmp_path, monkeypatch, capsys):
  """`cli.run` raises gen 0's threshold and freezes what is alive (the imports)."""
  threshold = gc.get_threshold()
  gc.unfreeze()
  gc.set_threshold(700, 10, 10)  # Python's defaults
  try:
    code, _ = run_in_process("mer_jax.evaluate", "--workdir", str(tmp_path / "none"),
                             monkeypatch=monkeypatch, capsys=capsys)
    assert code == cli.USER_ERROR_EXIT_CODE
    assert gc.get_threshold() == (cli.GC_GENERATION0_THRESHOLD, 50, 100)
    frozen = gc.get_freeze_count()
    assert frozen > 10_000  # jax, flax and mer_jax's objects
    # A second run in the same process freezes nothing more (frozen objects still go
    # when their references do).
    run_in_process("mer_jax.evaluate", "--workdir", str(tmp_path / "none"),
                   monkeypatch=monkeypatch, capsys=capsys)
    assert gc.get_freeze_count() <= frozen
  finally:
    gc.set_threshold(*threshold)
    gc.freeze()


def test_an_error_raised_outside_mer_jax_says_where_the_traceback_is(monkeypatch, capsys):
  monkeypatch.setattr(cli, "verbosity", lambda: 0)
  try:
    np.zeros(3).reshape(2)
  except ValueError as error:
    cli.report_error(error)
  assert capsys.readouterr().err == ("error: cannot reshape array of size 3 into shape (2,) "
                                     "[ValueError; --verbosity=1 shows the traceback]\n")


@pytest.mark.slow
def test_train_on_a_bad_data_file_prints_only_the_error(tmp_path):
  """The README's case: a NaN in a user's npz, read through the TFDS builder, gives one
  line (the DataError naming the file, key and index) and status 2, no library INFO."""
  rng = np.random.default_rng(0)
  for split, size in (("train", 8), ("valid", 4), ("test", 4)):
    text = rng.normal(size=(size, 5, 768)).astype(np.float32)
    if split == "train":
      text[3, 1, 2] = np.nan
    np.savez(tmp_path / f"{split}.npz", text=text,
             audio=rng.normal(size=(size, 5, 74)).astype(np.float32),
             vision=rng.normal(size=(size, 5, 35)).astype(np.float32),
             label=rng.uniform(-3, 3, size).astype(np.float32))
  env = dict(os.environ, JAX_PLATFORMS="cpu", MER_JAX_DATA_DIR=str(tmp_path / "tfds"))
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(
      [sys.executable, "-m", "mer_jax.train", "--config", TINY, "--config.data.source=npz",
       f"--config.data.dir={tmp_path}", "--config.data.name=mine",
       f"--config.data.cache_dir={tmp_path / 'tfds'}", "--workdir", str(tmp_path / "run")],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr[-3000:]
  assert_one_error_line(lines, "train.npz", "'text'", "non-finite", "(3, 1, 2)")
  assert result.stdout == ""


def test_train_on_an_unreadable_config_json_names_the_file(tmp_path, monkeypatch, capsys):
  """A run folder whose config.json is not JSON (hand-edited, or left empty by a kill
  mid-write before writes became atomic) is refused with the file and the way out."""
  (tmp_path / "config.json").write_text("")
  code, lines = run_in_process("mer_jax.train", "--config", TINY, "--workdir", str(tmp_path),
                               monkeypatch=monkeypatch, capsys=capsys)
  assert code == cli.USER_ERROR_EXIT_CODE
  assert_one_error_line(lines, f"{tmp_path}/config.json is not a JSON config",
                        "--allow_config_change")
