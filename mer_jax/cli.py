"""What every mer_jax command line shares: quiet library logs, one-line errors.

Each program ends with `cli.run(main)` instead of `absl.app.run(main)`:

- Library INFO logs (orbax's per-save lines, absl, TFDS, jax's backend probing) and TFDS
  progress bars are off; warnings and errors still show. `--verbosity=1` turns them
  back on (INFO; `--verbosity=2` and up keep absl's meaning, DEBUG).
- An error a user can fix (bad data, config, workdir or checkpoint: `ValueError`, which
  `DataError` is, a missing file or folder, a flag that does not parse, a missing required
  flag) prints `error: <message>` on stderr and exits with status 2. The traceback is
  printed only with `--verbosity=1`; when the error was raised outside mer_jax's own code
  (it may then be a bug rather than bad input) the line says so.
- A pre-empted run prints `mer_jax.<program>: ...` and exits with 75 (resume later); a
  non-finite loss prints `error: ...` and exits with 1.
- Python's garbage collector runs less often (`collect_garbage_less_often`).
- malloc keeps the memory XLA's CPU runtime frees for the next step
  (`host_memory.keep_freed_memory`).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import traceback

from absl import app, flags
from absl import logging as absl_logging

USER_ERROR_EXIT_CODE = 2
NONFINITE_EXIT_CODE = 1
# Errors whose message tells the user what to fix (config validation, DataError, a
# workdir or checkpoint that is not there).
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError, app.UsageError, flags.Error)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Warnings that every run would print and that say nothing a user can act on: the
# synthetic and file builders make one TFDS builder config per (dataset, sizes, seed).
_NOISE = ("Using custom data configuration",)


class _DropNoise(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    return not any(str(record.msg).startswith(prefix) for prefix in _NOISE)


def verbosity() -> int:
  """The `--verbosity` the user passed (0 when not passed); read from the command line
  itself when the flags did not parse."""
  flag = flags.FLAGS["verbosity"]
  if flags.FLAGS.is_parsed():
    return int(flag.value) if flag.present else 0
  for arg in sys.argv[1:]:
    for prefix in ("--verbosity=", "-v="):
      if arg.startswith(prefix) and arg[len(prefix):].lstrip("-").isdigit():
        return int(arg[len(prefix):])
  return 0


def configure_logging(level: int | None = None) -> None:
  """Library logs at WARNING (verbosity < 1) or INFO (verbosity 1); above 1, absl's."""
  level = verbosity() if level is None else level
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _DropNoise) for f in handler.filters):
    handler.addFilter(_DropNoise())
  # Levels set on the loggers, not through absl.logging.set_verbosity: that would rewrite
  # the --verbosity flag, which decides whether errors show their traceback.
  if level <= 1:
    logging.root.setLevel(logging.WARNING if level < 1 else logging.INFO)
    absl_logging.get_absl_logger().setLevel(logging.NOTSET)
  try:
    import tensorflow_datasets as tfds

    tfds.display_progress_bar(level >= 1)
  except ImportError:  # pragma: no cover - a dependency; only the bars depend on it
    pass


def _raised_in_mer_jax(error: BaseException) -> bool:
  frames = traceback.extract_tb(error.__traceback__)
  return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_PACKAGE_DIR)


def _message(error: BaseException) -> str:
  # ConfigDict wraps a KeyError in an AttributeError; a KeyError's str() is its repr.
  while isinstance(error, (AttributeError, KeyError)) and error.args and isinstance(
      error.args[0], BaseException):
    error = error.args[0]
  if isinstance(error, KeyError) and error.args:
    return str(error.args[0])
  return str(error) or type(error).__name__


def report_error(error: BaseException, *, context: str = "") -> None:
  """`error: <message>` on stderr; the traceback first with --verbosity=1."""
  if verbosity() >= 1:
    traceback.print_exception(error, file=sys.stderr)
  # One line, whatever the message holds.
  message = context + " ".join(_message(error).split())
  if isinstance(error, (app.UsageError, flags.Error)) or context:
    message += " (see --helpshort)"
  elif not _raised_in_mer_jax(error) and verbosity() < 1:
    message += f" [{type(error).__name__}; --verbosity=1 shows the traceback]"
  print(f"error: {message}", file=sys.stderr, flush=True)


def guarded(main, program: str):
  """`main` with the shared exit codes: user errors 2, pre-emption 75, non-finite 1."""
  from mer_jax.trainer import PREEMPTED_EXIT_CODE, NonFiniteError, Preempted

  def wrapped(argv):
    configure_logging()
    try:
      return main(argv)
    except Preempted as preempted:
      print(f"mer_jax.{program}: {preempted}", file=sys.stderr, flush=True)
      sys.exit(PREEMPTED_EXIT_CODE)
    except NonFiniteError as error:
      report_error(error)
      sys.exit(NONFINITE_EXIT_CODE)
    except USER_ERRORS as error:
      report_error(error)
      sys.exit(USER_ERROR_EXIT_CODE)

  return wrapped


# Generation 0's collection threshold of every mer_jax process (Python's default: 700).
GC_GENERATION0_THRESHOLD = 100_000


def collect_garbage_less_often() -> None:
  """Raise the collector's generation-0 threshold and freeze what is alive now (the
  imported modules) out of later collections, once per process.

  Tracing a model allocates millions of short-lived Python objects, and at the default
  threshold the collector walks the live ones over and over (docs/decisions.md,
  Performance and scale). Reference cycles are still collected. Once: freezing again
  would also freeze a later run's objects, which then could never be collected.
  """
  if gc.get_threshold()[0] >= GC_GENERATION0_THRESHOLD:
    return
  gc.collect()
  gc.freeze()
  gc.set_threshold(GC_GENERATION0_THRESHOLD, 50, 100)


def parse_flags(argv):
  """absl's flag parsing with any failure as one `error:` line and exit status 2: a flag
  that does not parse, a config file that does not load, an override naming no config
  field (absl would print a FATAL block or a traceback and exit with 1)."""
  try:
    return flags.FLAGS(argv)
  except Exception as error:  # noqa: BLE001 - everything here comes from the command line
    report_error(error, context="" if isinstance(error, flags.Error) else "command line: ")
    sys.exit(USER_ERROR_EXIT_CODE)


def run(main, *, program: str | None = None, compilation_cache: bool = True) -> None:
  """`absl.app.run(main)` with the conventions of the module docstring."""
  from mer_jax import host_memory, parallel

  host_memory.keep_freed_memory()  # first: before JAX starts its CPU backend
  program = program or os.path.basename(sys.argv[0]).removesuffix(".py")
  if compilation_cache:
    parallel.enable_compilation_cache()
  collect_garbage_less_often()
  app.run(guarded(main, program), flags_parser=parse_flags)
