"""Every `python -m mer_jax.<cli> ...` command written in README.md, docs/, launch/ and the
config docstrings is accepted as written: its flags exist, its config loads, every
`--config.*` override names a declared field, and the resolved config passes
`config_lib.validate_config` — without loading data or training."""

import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import REPO, subprocess_env

COMMAND = re.compile(r"python -m (mer_jax\.\w+)")


def documented_commands() -> list[tuple[str, str, list[str]]]:
  """(where, module, args) of every command in the docs, continuation lines joined."""
  paths = [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md"))),
           *sorted(glob.glob(os.path.join(REPO, "launch", "**", "*.md"), recursive=True)),
           *sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.py"), recursive=True))]
  commands = []
  for path in paths:
    with open(path) as f:
      text = f.read().replace("\\\n", " ")
    for number, line in enumerate(text.splitlines(), 1):
      for match in COMMAND.finditer(line):
        rest = line[match.end():]
        # An inline command ends at its closing backtick; a block line at its end or at
        # a shell comment.
        rest = rest.split("`")[0] if "`" in line[:match.start()] else rest.split(" #")[0]
        where = f"{os.path.relpath(path, REPO)}:{number}"
        commands.append((where, match.group(1), shlex.split(rest)))
  return commands


# Runs in a fresh interpreter: each CLI defines its absl flags when run as __main__, and
# absl's app.run is replaced by a check that parses them (config_flags loads the config
# and applies the overrides) and validates the config instead of calling main.
DRIVER = r"""
import json, runpy, sys
from absl import app, flags
import ml_collections

class Accepted(Exception):
  pass

def check(argv):
  flag_values = flags.FLAGS
  flag_values(argv)
  from mer_jax import config_lib
  configs = []
  if "config" in flag_values and isinstance(flag_values.config, ml_collections.ConfigDict):
    configs.append(flag_values.config)
  if "dataset" in flag_values and flag_values.dataset:  # mer_jax.compare
    from mer_jax import compare
    name, variant = compare.split_dataset(flag_values.dataset)
    methods = flag_values.methods or compare.default_methods(
        name, variant, overrides=flag_values.override)
    configs += [compare.method_config(m, name, variant, overrides=flag_values.override).config
                for m in methods]
  for config in configs:
    config_lib.validate_config(config)
  return len(configs)

def fake_run(main, argv=None, **kwargs):
  raise Accepted(check(sys.argv if argv is None else argv))

CLIS = ("train", "evaluate", "predict", "compare", "crossval", "bench", "sweep")
app.run = fake_run

# The docs name BERT folders of the reader's machine (/models/bert-base-uncased): the
# check is about the command, so a missing folder stands for a BERT-base one.
from mer_jax.methods import text_encoder
from mer_jax.nn import bert
found = text_encoder.encoder_from_config

def encoder_from_config(model_config):
  import os
  if os.path.isdir(model_config.text_encoder_path):
    return found(model_config)
  return bert.BertModel(bert.BertConfig(), use_pooler=False), bert.SpecialTokens()

text_encoder.encoder_from_config = encoder_from_config
baseline = set(flags.FLAGS)
results = []
for module, args in json.loads(sys.argv[1]):
  sys.argv = [module, *args]
  try:
    runpy.run_module(module, run_name="__main__", alter_sys=False)
    results.append("the module did not call absl.app.run")
  except Accepted as accepted:
    results.append(f"ok {accepted.args[0]}")
  except BaseException as error:  # noqa: BLE001 (reported per command)
    results.append(f"{type(error).__name__}: {error}")
  finally:
    for name in set(flags.FLAGS) - baseline:
      delattr(flags.FLAGS, name)
    # CLI modules register flags when imported (crossval and compare import train's), so
    # they are imported afresh for every command; the rest of the library stays loaded.
    for name in CLIS:
      sys.modules.pop(f"mer_jax.{name}", None)
      if hasattr(sys.modules.get("mer_jax"), name):  # `from mer_jax import train` reads this
        delattr(sys.modules["mer_jax"], name)
print("RESULTS " + json.dumps(results))
"""


def check_commands(commands):
  env = subprocess_env()
  result = subprocess.run(
      [sys.executable, "-c", DRIVER, json.dumps([[m, a] for _, m, a in commands])],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  lines = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")]
  assert lines, result.stderr[-3000:]
  return json.loads(lines[-1][len("RESULTS "):])


# Positive controls, checked in the same process: an undeclared field, a bad value and an
# unknown flag fail, so a passing documented command was really checked.
MISTAKES = [
    ("mer_jax.train", ["--config", "configs/dqf_mosei.py", "--config.data.feature=x",
                       "--workdir", "/tmp/x"], "feature"),
    ("mer_jax.train", ["--config", "configs/dqf_mosei.py", "--config.data.source=hdf5",
                       "--workdir", "/tmp/x"], "config.data.source='hdf5'"),
    ("mer_jax.evaluate", ["--workdir", "/tmp/x", "--embedding"], "embedding"),
]


@pytest.mark.slow
def test_every_documented_command_is_accepted_and_mistakes_are_not():
  commands = documented_commands()
  modules = {module for _, module, _ in commands}
  # The docs show every CLI, so the extraction cannot silently find nothing.
  assert {"mer_jax.train", "mer_jax.evaluate", "mer_jax.predict", "mer_jax.compare",
          "mer_jax.crossval", "mer_jax.bench"} <= modules, modules
  assert len(commands) >= 20
  outcomes = check_commands(commands + [("control", m, a) for m, a, _ in MISTAKES])
  failures = [f"{where}: python -m {module} {shlex.join(args)}\n  -> {outcome}"
              for (where, module, args), outcome in zip(commands, outcomes, strict=False)
              if not outcome.startswith("ok")]
  assert not failures, "\n".join(failures)
  for (_, _, expected), outcome in zip(MISTAKES, outcomes[len(commands):], strict=True):
    assert not outcome.startswith("ok") and expected in outcome, outcome


@pytest.mark.parametrize("text, expected", [
    ("x `.venv/bin/python -m mer_jax.evaluate --workdir /tmp/run --embeddings`.",
     ("mer_jax.evaluate", ["--workdir", "/tmp/run", "--embeddings"])),
    ("python -m mer_jax.train --config c.py \\\n  --workdir d  # a comment",
     ("mer_jax.train", ["--config", "c.py", "--workdir", "d"])),
])
def test_commands_are_extracted_whole(tmp_path, monkeypatch, text, expected):
  import test_docs_commands as module

  (tmp_path / "README.md").write_text(text)
  monkeypatch.setattr(module, "REPO", str(tmp_path))
  assert [(m, a) for _, m, a in documented_commands()] == [expected]
