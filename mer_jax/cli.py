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
"""

from __future__ import annotations

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
  """The `--verbosity` the user passed (0 when not passed or not parsed yet)."""
  flag = flags.FLAGS["verbosity"]
  return int(flag.value) if flag.present else 0


def configure_logging(level: int | None = None) -> None:
  """Library logs at WARNING (verbosity < 1) or INFO (verbosity 1); above 1, absl's."""
  level = verbosity() if level is None else level
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _DropNoise) for f in handler.filters):
    handler.addFilter(_DropNoise())
  if level < 1:
    absl_logging.set_verbosity(absl_logging.WARNING)
  elif level == 1:
    absl_logging.set_verbosity(absl_logging.INFO)
  try:
    import tensorflow_datasets as tfds

    tfds.display_progress_bar(level >= 1)
  except ImportError:  # pragma: no cover - a dependency; only the bars depend on it
    pass


def _raised_in_mer_jax(error: BaseException) -> bool:
  frames = traceback.extract_tb(error.__traceback__)
  return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_PACKAGE_DIR)


def report_error(error: BaseException) -> None:
  """`error: <message>` on stderr; the traceback first with --verbosity=1."""
  if verbosity() >= 1:
    traceback.print_exception(error, file=sys.stderr)
  # One line, whatever the message holds.
  message = " ".join((str(error) or type(error).__name__).split())
  if isinstance(error, (app.UsageError, flags.Error)):
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


def parse_flags(argv):
  """absl's flag parsing with a flag error as one `error:` line and exit status 2
  (absl prints its own FATAL block and exits with 1)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    report_error(error)
    sys.exit(USER_ERROR_EXIT_CODE)


def run(main, *, program: str | None = None, compilation_cache: bool = True) -> None:
  """`absl.app.run(main)` with the conventions of the module docstring."""
  from mer_jax import parallel

  program = program or os.path.basename(sys.argv[0]).removesuffix(".py")
  if compilation_cache:
    parallel.enable_compilation_cache()
  app.run(guarded(main, program), flags_parser=parse_flags)
