"""The comparison runner on `:tiny` MOSEI with DQF and EASE, 2 seeds each: the table's
numbers against an independent computation from the per-seed results, the CSV and plot,
no retraining on a second invocation (in process and through the CLI), the config rules
and the errors for what cannot be compared."""

import copy
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, subprocess_env
from scipy import stats

from mer_jax import compare, methods

METHODS = ["dqf", "ease"]
SEEDS = 2
ROWS = ["L", "A", "V", "LA", "LV", "AV", "LAV", "MR0.3", "MR0.7", "Avg", "AUILC"]
HEADLINE = ["acc2_non0", "f1_non0", "mae", "corr"]
# One device and one epoch keep each of the four runs short (compilation dominates);
# passing them as overrides also runs that path.
OVERRIDES = ["num_devices=1", "train.num_epochs=1"]
# The comparison fixture (four runs) is built once, on one worker.
pytestmark = pytest.mark.xdist_group("compare")


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("compare"))
  report = compare.run_comparison("mosei:tiny", METHODS, seeds=SEEDS, workdir=workdir,
                                  overrides=OVERRIDES)
  return workdir, report


def seed_results(workdir, method):
  runs = []
  for seed in range(SEEDS):
    with open(os.path.join(workdir, method, f"seed{seed}", "eval", "results.json")) as f:
      runs.append(json.load(f))
  return runs


def independent_value(run, row, metric):
  """One seed's value of a table row, computed here from its scenario metrics."""
  if row == "Avg":  # the fixed and MR scenarios of the tiny protocol
    return float(np.mean([run[s][metric] for s in ROWS[:-2]]))
  if row == "AUILC":  # trapezoid area / rate range per masked set, mean over the sets
    curves = {}
    for name, values in run.items():
      if name.startswith("frame"):
        rate, masked = name[len("frame"):].split("_")
        curves.setdefault(masked, []).append((float(rate), values[metric]))
    areas = []
    for points in curves.values():
      rates, values = np.array(sorted(points)).T
      areas.append(np.trapezoid(values, rates) / (rates[-1] - rates[0]))
    return float(np.mean(areas))
  return float(run[row][metric])


def mean_and_interval(values):
  values = np.asarray(values, np.float64)
  half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
  return float(values.mean()), float(half)


def markdown_table(text, metric):
  """(columns, {row: {column: cell}}) of the table under `## metric`."""
  lines = text.split(f"## {metric} ", 1)[1].splitlines()[1:]
  first = next(i for i, line in enumerate(lines) if line.startswith("|"))
  table = []
  for line in lines[first:]:
    if not line.startswith("|"):
      break
    table.append([c.strip() for c in line.strip("|").split("|")])
  header, body = table[0], table[2:]
  assert header[0] == "scenario"
  return header[1:], {cells[0]: dict(zip(header[1:], cells[1:], strict=True))
                      for cells in body}


@pytest.mark.slow
def test_table_numbers_match_the_seed_results(compared):
  workdir, _ = compared
  with open(os.path.join(workdir, "comparison.md")) as f:
    text = f.read()
  runs = {m: seed_results(workdir, m) for m in METHODS}
  for metric in HEADLINE:
    columns, body = markdown_table(text, metric)
    assert columns == METHODS
    assert list(body) == ROWS
    for row in ROWS:
      expected = {m: mean_and_interval([independent_value(r, row, metric) for r in runs[m]])
                  for m in METHODS}
      pick = min if metric == "mae" else max
      best = pick(round(mean, 4) for mean, _ in expected.values())
      for method in METHODS:
        cell = body[row][method]
        bold = cell.startswith("**") and cell.endswith("**")
        mean_text, ci_text = cell.strip("*").split(" ± ")
        mean, ci = expected[method]
        assert float(mean_text) == pytest.approx(mean, abs=6e-5), (metric, row, method)
        assert float(ci_text) == pytest.approx(ci, abs=6e-5), (metric, row, method)
        assert bold == (round(mean, 4) == best), (metric, row, method, cell)


@pytest.mark.slow
def test_csv_json_and_plot(compared):
  workdir, report = compared
  with open(os.path.join(workdir, "comparison.csv")) as f:
    lines = list(csv.DictReader(f))
  assert len(lines) == len(HEADLINE) * len(ROWS) * len(METHODS)
  runs = seed_results(workdir, "ease")
  line = next(r for r in lines if (r["metric"], r["scenario"], r["method"])
              == ("corr", "MR0.7", "ease"))
  mean, ci = mean_and_interval([r["MR0.7"]["corr"] for r in runs])
  assert float(line["mean"]) == pytest.approx(mean, abs=1e-12)
  assert float(line["ci95"]) == pytest.approx(ci, abs=1e-12)
  assert line["num_seeds"] == str(SEEDS) and line["config"] == "ease_mosei.py"
  with open(os.path.join(workdir, "comparison.json")) as f:
    assert json.load(f)["rows"] == ROWS == report["rows"]
  assert os.path.getsize(os.path.join(workdir, "comparison.png")) > 5000
  # Each method folder has the layout of a num_seeds=2 run of mer_jax.train.
  with open(os.path.join(workdir, "dqf", "eval", "results.json")) as f:
    assert set(json.load(f)["seeds"]) == {"0", "1"}


def snapshot(workdir):
  """mtime of every file under the seed runs (checkpoints, logs, results)."""
  times = {}
  for method in METHODS:
    for seed in range(SEEDS):
      for root, _, files in os.walk(os.path.join(workdir, method, f"seed{seed}")):
        for name in files:
          times[os.path.join(root, name)] = os.stat(os.path.join(root, name)).st_mtime_ns
  return times


@pytest.mark.slow
def test_second_invocation_does_no_retraining(compared, monkeypatch):
  workdir, report = compared
  before = snapshot(workdir)
  assert any("checkpoints" in path for path in before)

  def no_training(*args, **kwargs):
    raise AssertionError("a finished run was trained or evaluated again")

  monkeypatch.setattr(compare.train, "run", no_training)
  again = compare.run_comparison("mosei:tiny", METHODS, seeds=SEEDS, workdir=workdir,
                                 overrides=OVERRIDES)
  assert json.dumps(again["table"]) == json.dumps(report["table"])

  # The command line, in a fresh process, finds every run finished too.
  env = subprocess_env()
  result = subprocess.run(
      [sys.executable, "-m", "mer_jax.compare", "--dataset", "mosei:tiny", "--methods",
       ",".join(METHODS), "--seeds", str(SEEDS), "--workdir", workdir,
       *(f"--override={o}" for o in OVERRIDES), "--alsologtostderr"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith(f"test acc2_non0 (mean of {SEEDS} seeds)")
  assert f"{workdir}/comparison.md" in result.stdout
  assert result.stderr.count("results reused") == len(METHODS) * SEEDS
  assert "trained and evaluated" not in result.stderr
  assert snapshot(workdir) == before


def test_errors_name_what_cannot_be_compared(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="unknown method 'mcurr'"):
    compare.run_comparison("mosei:tiny", ["dqf", "mcurr"], seeds=1, workdir=str(tmp_path))
  with pytest.raises(ValueError, match="unknown dataset 'moseii'"):
    compare.run_comparison("moseii:tiny", ["dqf"], seeds=1, workdir=str(tmp_path))
  with pytest.raises(ValueError, match="unknown config variant 'small'"):
    compare.run_comparison("mosei:small", ["dqf"], seeds=1, workdir=str(tmp_path))
  with pytest.raises(ValueError, match="loss.use_cl"):
    compare.run_comparison("mosei:tiny", ["dqf"], seeds=1, workdir=str(tmp_path),
                           overrides=["loss.use_cl=False"])
  monkeypatch.setitem(methods.SUPPORTED_TASKS, "cmarr", ("classification",))
  with pytest.raises(ValueError, match="method 'cmarr' cannot do the 'regression' task of "
                     "dataset 'mosei'"):
    compare.run_comparison("mosei:tiny", ["dqf", "cmarr"], seeds=1, workdir=str(tmp_path))
  # Nothing trained: every config is checked first.
  assert not os.path.exists(tmp_path / "dqf")
  # Without a method list, the methods that cannot do the task are left out.
  assert compare.default_methods("mosei", "tiny") == ["dqf", "mcur", "cmad", "ease"]


def test_config_rules():
  own = compare.method_config("dqf", "mosei", "tiny")
  assert not own.borrowed and own.path.endswith("dqf_mosei.py")
  # EASE's own config evaluates no MR; the comparison evaluates every method alike.
  ease = compare.method_config("ease", "mosei", "tiny")
  assert ease.config.eval.to_dict() == own.config.eval.to_dict()
  assert tuple(ease.config.eval.missing_rates) == (0.3, 0.7)
  # CM-ARR has no MOSEI config: its nearest (alphabetical among configs of another task
  # family) gives the hyper-parameters, the dataset's reference config the data.
  borrowed = compare.method_config("cmarr", "mosei", "tiny",
                                   overrides=["cmarr:loss.spcl_weight=0.5"])
  assert borrowed.borrowed and borrowed.path.endswith("cmarr_iemocap.py")
  assert borrowed.reference.endswith("dqf_mosei.py")
  assert borrowed.config.data.to_dict() == own.config.data.to_dict()
  assert borrowed.config.method == "cmarr" and borrowed.config.loss.spcl_weight == 0.5
  # A categorical dataset borrows from a categorical config first.
  assert compare.method_config("dqf", "iemocap", "tiny").path.endswith("dqf_meld.py")


@pytest.mark.slow
def test_borrowed_footnote_and_ablation_table(compared):
  workdir, report = compared
  marked = copy.deepcopy(report)
  marked["methods"]["ease"]["borrowed"] = True
  text = compare.format_comparison(marked)
  assert "| scenario | dqf | ease† |" in text
  assert "† ease: no configs/ease_mosei.py; hyper-parameters of ease_mosei.py" in text
  per_method = {}
  for method in METHODS:
    with open(os.path.join(workdir, method, "eval", "results.json")) as f:
      per_method[method] = json.load(f)
  table = compare.format_ablations("dqf", "mosei:tiny",
                                   {"full": per_method["dqf"], "w/o X": per_method["ease"]},
                                   {"full": {}, "w/o X": {"loss.aux_weight": 0.0}},
                                   HEADLINE, [0, 1])
  lines = [line for line in table.splitlines() if line.startswith("| full")
           or line.startswith("| w/o X")]
  assert len(lines) == 2 and "`loss.aux_weight=0.0`" in lines[1]
  for column, metric in enumerate(HEADLINE):
    means = [per_method[m]["summary"][f"fixed_mr/{metric}"] for m in METHODS]
    best = (min if metric == "mae" else max)(round(v, 4) for v in means)
    for line, mean in zip(lines, means, strict=True):
      cell = [c.strip() for c in line.strip("|").split("|")][2 + column]
      assert cell.startswith("**") == (round(mean, 4) == best) and not math.isnan(mean)
