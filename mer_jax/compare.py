r"""Compares methods on one dataset: K seeds each, one evaluation protocol, one table.

    python -m mer_jax.compare --dataset mosei:synthetic --methods dqf,mcur,cmad,cmarr,ease \
        --seeds 5 --workdir /tmp/compare_mosei [--ablations] [--override train.num_epochs=3]

`--dataset` is a config suffix (`configs/<method>_<dataset>.py`) with an optional variant
(`mosei`, `mosei:synthetic`, `iemocap:tiny`). Method m trains in `DIR/<m>/seed{s}` through
`mer_jax.train.run`: a `--config.num_seeds=K` run (the K seeds in one vmapped program) whose
`DIR/<m>/eval/` holds the mean and 95% interval over seeds. Starting again with the same
workdir trains and evaluates only what is missing (seed by seed once some have finished).

How each method's config is made (`method_config`):

- its own `configs/<method>_<dataset>.py` when there is one; otherwise its nearest config:
  one of the same task, else of a categorical task for a categorical dataset, else any
  (alphabetical first among equals). Such a method is marked with a dagger in the table:
  its hyper-parameters were not chosen for this dataset;
- every method takes the `data` section (and with it `data.task`) and `TASK_FIELDS` from
  the dataset's reference config, the first of `configs/<method>_<dataset>.py` in
  `METHODS` order, so all of them train on the same data;
- every method is evaluated under the same protocol, the shared `config.eval` of
  `config_lib` for the variant: the 7 fixed combinations, MR0.1..MR0.7 and the
  frame-level curves of every masked set (AUILC), whatever its own config evaluates;
- `--override field=value` applies to every method, `--override method:field=value` to
  one (e.g. `mcur:loss.use_cl=False`).

Outputs: `DIR/comparison.md` (per headline metric: rows = scenarios, Avg and AUILC,
columns = methods, cells = mean ± 95% interval, best per row in bold), `comparison.csv`,
`comparison.json`, `comparison.png` (each headline metric against the missing rate) and,
with `--ablations`, `DIR/ablations_<method>.md` from runs in `DIR/ablations/<method>/`.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import glob
import importlib.util
import json
import math
import os
import time
from collections.abc import Mapping, Sequence

import jax
import ml_collections
import numpy as np
from absl import app, flags

from mer_jax import cli, config_lib, evaluate, parallel, run_log, train
from mer_jax import metrics as metrics_lib
from mer_jax.methods import METHODS

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "configs")

# The numbers each table reports, per task (the papers' Table 1 columns). SIMS labels in
# [-1, 1] get MMSA's SIMS set, recognised by its `acc3`; multilabel-binary adds every
# per-emotion `acc_<name>` / `f1_<name>` that the results hold.
HEADLINE_METRICS = {
    "regression": ("acc2_non0", "f1_non0", "mae", "corr"),
    "sims": ("acc2", "acc3", "f1", "mae"),
    "classification": ("war", "uar", "f1_weighted"),
    "multilabel_binary": ("acc", "f1"),
}
# Fields that depend on the dataset's task rather than on the method; borrowed, with
# the data section, from the dataset's reference config.
TASK_FIELDS = ("train.selection_metric",)
CATEGORICAL_TASKS = ("classification", "multilabel_binary")
AVG_ROW, AUILC_ROW = "Avg", "AUILC"
DIGITS = 4
BORROWED_MARK = "†"

# Each method's ablation switches (the config fields its docs list): name, directory,
# overrides. DQF's paper replaces whole blocks (Q-UA, Q-CA), which no config switch
# does; its granularity losses L_n are the switch its config exposes.
ABLATIONS = {
    "mcur": (("w/o L_CL", "wo_cl", {"loss.use_cl": False}),
             ("w/o L_Uncer", "wo_uncer", {"loss.use_uncertainty": False}),
             ("w/o L_Logits", "wo_logits", {"loss.use_logits": False}),
             ("w/o L_MSE", "wo_mse", {"loss.use_mse": False})),
    "cmad": (("w/o CAFD", "wo_cafd", {"loss.use_cafd": False}),
             ("w/o MAR", "wo_mar", {"loss.use_mar": False})),
    "ease": (("w/o UCMI", "wo_ucmi", {"model.use_ucmi": False}),
             ("w/o UCSA", "wo_ucsa", {"loss.lambda_align": 0.0}),
             ("w/o MIPC", "wo_mipc", {"loss.lambda_consist": 0.0})),
    # CM-ARR Table 3; the Baseline is the fusion network alone, trained on full inputs.
    "cmarr": (("Baseline", "baseline", {"model.reconstruct": False, "model.flow_input": "projected",
                                        "missing.kind": "none", "loss.udcl_weight": 0.0,
                                        "loss.spcl_weight": 0.0}),
              ("w/o L_udcl", "wo_udcl", {"loss.udcl_weight": 0.0}),
              ("w/o L_spcl", "wo_spcl", {"loss.spcl_weight": 0.0}),
              ("w/o attention", "wo_attention", {"model.umc_attention": False}),
              ("w/ Point", "point", {"loss.udcl_kind": "point"})),
    "dqf": (("w/o L_n (granularity heads)", "wo_aux", {"loss.aux_weight": 0.0}),),
}


@dataclasses.dataclass(frozen=True)
class MethodConfig:
  """A method's run config for the comparison and where it came from."""
  method: str
  config: ml_collections.ConfigDict
  path: str  # the config file of the hyper-parameters
  reference: str  # the config file of the data section
  borrowed: bool  # True when `path` is not the method's config for this dataset


# ----------------------------------------------------------------------------- configs


def split_dataset(dataset: str, variant: str = "") -> tuple[str, str]:
  """"mosei:tiny" -> ("mosei", "tiny"); a variant may also come separately."""
  name, _, suffix = dataset.partition(":")
  if suffix and variant and suffix != variant:
    raise ValueError(f"dataset {dataset!r} names variant {suffix!r} but variant={variant!r}")
  return name.strip(), config_lib.parse_variant(suffix or variant)


def dataset_configs(config_dir: str = CONFIG_DIR) -> dict[str, dict[str, str]]:
  """{dataset: {method: path}} of every `<method>_<dataset>.py` in `config_dir`."""
  found: dict[str, dict[str, str]] = {}
  for path in sorted(glob.glob(os.path.join(config_dir, "*.py"))):
    stem = os.path.splitext(os.path.basename(path))[0]
    method, _, dataset = stem.partition("_")
    if method in METHODS and dataset:
      found.setdefault(dataset, {})[method] = path
  return found


def load_config_file(path: str, variant: str) -> ml_collections.ConfigDict:
  """`get_config(variant)` of a config file, as `--config path:variant` loads it."""
  name = "mer_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str | None, str, object]]:
  """"field=value" / "method:field=value" -> (method or None, field, value); values are
  Python literals ("False", "3", "(0.1, 0.5)") or, failing that, strings."""
  parsed = []
  for item in overrides:
    target, equals, text = item.partition("=")
    method, colon, field = target.partition(":")
    if not colon:
      method, field = None, target
    field = field.strip().removeprefix("config.")
    if not equals or not field or (method is not None and method not in METHODS):
      raise ValueError(f"override {item!r}: expected field=value or method:field=value "
                       f"with a method of {METHODS}")
    try:
      value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
      value = text.strip()
    parsed.append((method, field, value))
  return parsed


def _set_fields(config, fields: Mapping[str, object], where: str):
  try:
    config.update_from_flattened_dict(dict(fields))
  except (KeyError, TypeError, ValueError) as error:
    raise ValueError(f"{where}: cannot set {dict(fields)}: {error}") from error


def _nearest_config(method: str, task: str, variant: str, config_dir: str) -> str:
  """The method's config whose task is nearest `task` (same, then same family)."""
  candidates = sorted(glob.glob(os.path.join(config_dir, f"{method}_*.py")))
  if not candidates:
    raise ValueError(f"method {method!r} has no config file in {config_dir}")

  def distance(path):
    other = load_config_file(path, variant).data.task
    if other == task:
      return 0
    return 1 if (other in CATEGORICAL_TASKS) == (task in CATEGORICAL_TASKS) else 2

  return min(candidates, key=lambda p: (distance(p), p))


def _lookup(config, field: str):
  value = config
  for part in field.split("."):
    value = value[part]
  return value


def reference_config(dataset: str, variant: str = "", *, config_dir: str = CONFIG_DIR,
                     overrides: Sequence[str] = ()) -> tuple[str, ml_collections.ConfigDict]:
  """(path, config) of the dataset's reference config, the first `<method>_<dataset>.py`
  in `METHODS` order, with the `data.*` overrides applied: its data section is the one
  every method of the comparison trains on."""
  configs = dataset_configs(config_dir)
  if dataset not in configs:
    raise ValueError(f"unknown dataset {dataset!r}: no configs/<method>_{dataset}.py in "
                     f"{config_dir}; known datasets: {sorted(configs)}")
  path = next(configs[dataset][m] for m in METHODS if m in configs[dataset])
  config = load_config_file(path, variant)
  config.lock()  # an override naming no existing field is an error, not a new field
  _set_fields(config, {f: v for m, f, v in parse_overrides(overrides)
                       if m is None and f.startswith("data.")}, f"dataset {dataset!r}")
  return path, config


def method_config(method: str, dataset: str, variant: str = "", *, config_dir: str = CONFIG_DIR,
                  overrides: Sequence[str] = ()) -> MethodConfig:
  """One method's config for the comparison on `dataset` (rules in the module docstring).

  Raises:
    ValueError: naming the unknown method or dataset, a task the method does not support,
      or an override that does not fit the config.
  """
  from mer_jax.methods import SUPPORTED_TASKS

  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
  reference_path, reference = reference_config(dataset, variant, config_dir=config_dir,
                                               overrides=overrides)
  task = reference.data.task
  if task not in SUPPORTED_TASKS[method]:
    raise ValueError(f"method {method!r} cannot do the {task!r} task of dataset {dataset!r}; "
                     f"it supports {SUPPORTED_TASKS[method]}")
  own = dataset_configs(config_dir)[dataset].get(method)
  path = own or _nearest_config(method, task, variant, config_dir)
  config = load_config_file(path, variant)
  protocol = config_lib.apply_variant(config_lib.base_config(), variant)
  with config.unlocked():
    config.data = copy.deepcopy(reference.data)
    config.eval = copy.deepcopy(protocol.eval)
    config.update_from_flattened_dict({f: _lookup(reference, f) for f in TASK_FIELDS})
  config.lock()
  _set_fields(config, {f: v for m, f, v in parse_overrides(overrides) if m in (None, method)},
              f"method {method!r} ({os.path.basename(path)})")
  return MethodConfig(method, config, path, reference_path, borrowed=own is None)


def default_methods(dataset: str, variant: str = "", *, config_dir: str = CONFIG_DIR,
                    overrides: Sequence[str] = ()) -> list[str]:
  """The methods of `METHODS` whose `SUPPORTED_TASKS` have the dataset's task."""
  from mer_jax.methods import SUPPORTED_TASKS

  task = reference_config(dataset, variant, config_dir=config_dir,
                          overrides=overrides)[1].data.task
  return [m for m in METHODS if task in SUPPORTED_TASKS[m]]


# ----------------------------------------------------------------------------- runs


def run_seeds(config, workdir: str, seeds: int, *, allow_config_change: bool = False,
              title: str = "") -> dict:
  """K seeds of `config` in `workdir/seed{s}`, each trained only when its results are
  missing, aggregated by `evaluate.aggregate_seeds` into `workdir/eval/` (the layout of a
  `num_seeds=K` run of `mer_jax.train`). Returns the aggregated results.

  When no seed has finished, all K train at once in one vmapped program (that
  `num_seeds=K` run, which also resumes); otherwise the missing ones train one by one.
  """
  run_config = copy.deepcopy(config)
  with run_config.unlocked():
    run_config.num_seeds = seeds
  singles = train.seed_configs(run_config)
  seed_dirs = [os.path.join(workdir, f"seed{c.seed}") for c in singles]
  finished = [train.finished_results(c, d) for c, d in zip(singles, seed_dirs, strict=True)]
  if seeds > 1 and all(results is None for results in finished):
    started = time.time()
    train.run(run_config, workdir, allow_config_change=allow_config_change)
    run_log.status(f"{workdir}: {seeds} seeds trained at once and evaluated in "
                   f"{time.time() - started:.0f} s")
    finished = [train.finished_results(c, d) for c, d in zip(singles, seed_dirs, strict=True)]
  per_seed = {}
  for seed_config, seed_dir, results in zip(singles, seed_dirs, finished, strict=True):
    if results is not None:
      run_log.status(f"{seed_dir}: finished with this config, results reused")
    else:
      started = time.time()
      # The returned results are what the run wrote to seed_dir/eval/results.json.
      results = train.run(seed_config, seed_dir, allow_config_change=allow_config_change)
      run_log.status(f"{workdir} seed {seed_config.seed}: trained and evaluated in "
                     f"{time.time() - started:.0f} s")
    per_seed[seed_config.seed] = results
  aggregated = evaluate.aggregate_seeds(per_seed)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    train.write_config(run_config, workdir)
    evaluate.write_results(os.path.join(workdir, "eval"), aggregated)
    evaluate.plot_robustness(os.path.join(workdir, "eval", "robustness.png"), aggregated,
                             config.data.task, title=title)
  return aggregated


# ----------------------------------------------------------------------------- tables


def headline_metrics(task: str, results: Mapping) -> tuple[str, ...]:
  """The metrics the tables report for `task`, given one run's (aggregated) results."""
  row = results.get("LAV") or next(v for k, v in results.items() if k not in ("summary",
                                                                             "seeds"))
  if task == "regression" and "acc3" in row:
    return HEADLINE_METRICS["sims"]
  names = HEADLINE_METRICS[task]
  if task == "multilabel_binary":
    emotions = [k[len("acc_"):] for k in row if k.startswith("acc_") and not k.endswith("_ci95")]
    names += tuple(f"{kind}_{e}" for e in emotions for kind in ("acc", "f1"))
  return names


def _summary_rows(per_method: Mapping[str, Mapping]) -> list[tuple[str, str]]:
  """(row name, summary prefix) of Avg and AUILC, when every method has them."""
  rows = []
  summaries = [set(r["summary"]) for r in per_method.values()]

  def have(prefix):
    return all(any(k.startswith(prefix + "/") for k in s) for s in summaries)
  # Avg: MCUR's 14-case average over the fixed and MR scenarios (fixed alone without MR).
  for prefix in ("fixed_mr", "fixed"):
    if have(prefix):
      rows.append((AVG_ROW, prefix))
      break
  if have("auilc"):
    rows.append((AUILC_ROW, "auilc"))
  return rows


def _cell(results: Mapping, row: str, prefix: str | None, metric: str) -> tuple[float, float]:
  if prefix is None:
    source, key = results.get(row, {}), metric
  else:
    source, key = results.get("summary", {}), f"{prefix}/{metric}"
  return float(source.get(key, math.nan)), float(source.get(f"{key}_ci95", math.nan))


def _best(values: Mapping[str, float], metric: str) -> list[str]:
  """The names whose value, as displayed, is the best (all of them on a tie)."""
  shown = {n: round(v, DIGITS) for n, v in values.items() if math.isfinite(v)}
  if not shown:
    return []
  pick = min if metric in metrics_lib.LOWER_IS_BETTER else max
  target = pick(shown.values())
  return [n for n, v in shown.items() if v == target]


def comparison_table(per_method: Mapping[str, Mapping], metrics: Sequence[str]) -> dict:
  """Mean and 95% interval per (metric, row, method) and the best methods per row.

  Args:
    per_method: method -> aggregated results (`evaluate.aggregate_seeds`).
    metrics: the metrics to tabulate.

  Returns:
    `rows` (the fixed and MR scenarios every method has, then Avg and AUILC),
    `table` {metric: {row: {method: {"mean", "ci95"}}}}, `best` {metric: {row: [methods]}}.
  """
  first = next(iter(per_method.values()))
  scenarios = [s for s in evaluate.comparison_scenarios(first)
               if all(s in r for r in per_method.values())]
  rows = [(s, None) for s in scenarios] + _summary_rows(per_method)
  table, best = {}, {}
  for metric in metrics:
    table[metric], best[metric] = {}, {}
    for row, prefix in rows:
      cells = {m: _cell(r, row, prefix, metric) for m, r in per_method.items()}
      table[metric][row] = {m: {"mean": mean, "ci95": ci} for m, (mean, ci) in cells.items()}
      best[metric][row] = _best({m: mean for m, (mean, _) in cells.items()}, metric)
  return {"rows": [r for r, _ in rows], "summary_prefix": {r: p for r, p in rows if p},
          "table": table, "best": best}


def format_cell(mean: float, ci: float, bold: bool = False) -> str:
  """"0.8123 ± 0.0210" (bold as "**...**"); "n/a" for an undefined mean."""
  if not math.isfinite(mean):
    return "n/a"
  text = f"{mean:.{DIGITS}f} ± {ci:.{DIGITS}f}"
  return f"**{text}**" if bold else text


def _better(metric: str) -> str:
  return "lower" if metric in metrics_lib.LOWER_IS_BETTER else "higher"


def format_comparison(report: Mapping) -> str:
  """comparison.md: one table per headline metric, and the notes on borrowed configs."""
  methods = list(report["methods"])
  header_names = [m + (BORROWED_MARK if report["methods"][m]["borrowed"] else "")
                  for m in methods]
  seeds = report["seeds"]
  prefix = report["summary_prefix"].get(AVG_ROW)
  avg_of = {"fixed_mr": "the fixed and MR scenarios above", "fixed": "the fixed combinations"}
  lines = [f"# Methods on {report['dataset']}" + (f" ({report['variant']})"
                                                  if report["variant"] else ""),
           "",
           f"Cells: mean ± 95% interval (Student t) over {len(seeds)} seeds "
           f"({', '.join(map(str, seeds))}); best per row in bold. "
           + (f"{AVG_ROW}: mean over {avg_of[prefix]}. " if prefix else "")
           + (f"{AUILC_ROW}: area under the metric vs frame missing rate curve, mean over "
              "the masked sets. " if AUILC_ROW in report["rows"] else "")
           + "Every method is evaluated on the same test split under the same protocol.",
           ""]
  for metric in report["metrics"]:
    lines += [f"## {metric} ({_better(metric)} is better)", "",
              "| scenario | " + " | ".join(header_names) + " |",
              "|---" * (len(methods) + 1) + "|"]
    for row in report["rows"]:
      cells = report["table"][metric][row]
      best = report["best"][metric][row]
      lines.append(f"| {row} | " + " | ".join(
          format_cell(cells[m]["mean"], cells[m]["ci95"], m in best) for m in methods) + " |")
    lines.append("")
  for method in methods:
    info = report["methods"][method]
    if info["borrowed"]:
      lines.append(f"{BORROWED_MARK} {method}: no configs/{method}_{report['dataset']}.py; "
                   f"hyper-parameters of {os.path.basename(info['config'])} (not tuned for "
                   f"{report['dataset']}), data and task fields of "
                   f"{os.path.basename(info['reference'])}.")
  return "\n".join(lines).rstrip() + "\n"


def comparison_csv(report: Mapping) -> str:
  """One line per (metric, row, method): mean, 95% half-width, seeds, best, config."""
  lines = [["metric", "scenario", "method", "mean", "ci95", "num_seeds", "best", "config"]]
  for metric in report["metrics"]:
    for row in report["rows"]:
      for method, cell in report["table"][metric][row].items():
        lines.append([metric, row, method, repr(cell["mean"]), repr(cell["ci95"]),
                      len(report["seeds"]), int(method in report["best"][metric][row]),
                      os.path.basename(report["methods"][method]["config"])])
  return run_log.csv_text(lines)


def _plot_curve(ax, results: Mapping, points: Sequence[tuple[float, str]], metric: str,
                label: str) -> np.ndarray:
  """One method's mean line with its 95% band; returns the means."""
  x = np.array([p for p, _ in points])
  mean = np.array([results[n][metric] for _, n in points], np.float64)
  ci = np.array([results[n].get(f"{metric}_ci95", 0.0) for _, n in points], np.float64)
  ax.plot(x, mean, "o-", ms=3, label=label)
  ax.fill_between(x, mean - ci, mean + ci, alpha=0.12)
  return mean


def _fit_means(ax, means: Sequence[np.ndarray]):
  """Y limits around the mean lines: with few seeds the t interval is wide enough to
  flatten every line if the bands set the scale (they are clipped instead)."""
  values = np.concatenate([m for m in means if m.size]) if means else np.zeros(0)
  values = values[np.isfinite(values)]
  if values.size:
    margin = max(0.25 * float(np.ptp(values)), 0.02)
    ax.set_ylim(float(values.min()) - margin, float(values.max()) + margin)


def plot_comparison(path: str, per_method: Mapping[str, Mapping], metrics: Sequence[str],
                    primary: str, title: str = ""):
  """Each headline metric against the modality missing rate (0 = LAV, then MR*), one line
  per method with its 95% band, and the primary metric against the frame missing rate
  (the LAV masked set when evaluated: every modality loses frames)."""
  plt = run_log.pyplot()

  fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(4.2 * (len(metrics) + 1), 3.8),
                           squeeze=False)
  for ax, metric in zip(axes[0], metrics, strict=False):
    means = []
    for method, results in per_method.items():
      points = [(0.0, "LAV")] if "LAV" in results else []
      points += sorted((metrics_lib.parse_scenario(n)[2], n) for n in results
                       if metrics_lib.parse_scenario(n)[0] == "random_mr")
      if points and metric in results[points[0][1]]:
        means.append(_plot_curve(ax, results, points, metric, method))
    _fit_means(ax, means)
    ax.set_title(f"{metric} vs modality missing rate")
    ax.set_xlabel("missing rate (0 = all modalities)")
    ax.set_ylabel(f"{metric} ({_better(metric)} is better)")
  ax = axes[0, -1]
  frame_sets = {metrics_lib.parse_scenario(n)[1] for r in per_method.values() for n in r
                if metrics_lib.parse_scenario(n)[0] == "frame"}
  masked = "LAV" if "LAV" in frame_sets else min(frame_sets, default=None)
  means = []
  for method, results in per_method.items():
    points = sorted((metrics_lib.parse_scenario(n)[2], n) for n in results
                    if metrics_lib.parse_scenario(n)[:2] == ("frame", masked))
    if points:
      means.append(_plot_curve(ax, results, points, primary, method))
  _fit_means(ax, means)
  ax.set_title(f"{primary} vs frame rate (masked {masked})" if masked
               else "no frame-level evaluation")
  ax.set_xlabel("frame missing rate")
  for ax in axes[0]:
    ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  run_log.save_figure(fig, path)


# ----------------------------------------------------------------------------- ablations


def format_ablations(method: str, dataset: str, variants: Mapping[str, Mapping],
                     overrides: Mapping[str, Mapping], metrics: Sequence[str],
                     seeds: Sequence[int]) -> str:
  """ablations_<method>.md: rows = the full method and each ablation, columns = the
  headline metrics on Avg (and the primary metric's AUILC), best per column in bold."""
  summary_rows = dict(_summary_rows(variants))
  columns = [(f"{m} ({AVG_ROW})", summary_rows.get(AVG_ROW), m) for m in metrics]
  if AUILC_ROW in summary_rows:
    columns.append((f"{metrics[0]} ({AUILC_ROW})", "auilc", metrics[0]))
  cells = {(name, title): _cell(results, "", prefix, metric)
           for name, results in variants.items() for title, prefix, metric in columns}
  best = {title: _best({n: cells[(n, title)][0] for n in variants}, metric)
          for title, _, metric in columns}
  lines = [f"# Ablations of {method} on {dataset}", "",
           f"Cells: mean ± 95% interval over {len(seeds)} seeds; best per column in bold.", "",
           "| variant | overrides | " + " | ".join(t for t, _, _ in columns) + " |",
           "|---" * (len(columns) + 2) + "|"]
  for name in variants:
    changed = ", ".join(f"`{k}={v}`" for k, v in overrides[name].items()) or "—"
    lines.append(f"| {name} | {changed} | " + " | ".join(
        format_cell(*cells[(name, t)], name in best[t]) for t, _, _ in columns) + " |")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- runner


def run_comparison(dataset: str, methods: Sequence[str] | None = None, *, seeds: int,
                   workdir: str, variant: str = "", ablations: bool = False,
                   overrides: Sequence[str] = (), metrics: Sequence[str] | None = None,
                   config_dir: str = CONFIG_DIR, allow_config_change: bool = False) -> dict:
  """Trains and evaluates every method on `dataset` with `seeds` seeds and writes the
  comparison outputs into `workdir` (see the module docstring).

  Args:
    dataset: a config suffix, optionally with its variant ("mosei", "mosei:tiny").
    methods: the methods to compare; None = every method of `METHODS` whose
      `SUPPORTED_TASKS` has the dataset's task. A named method that cannot do the task
      is an error.
    seeds: seeds per method (config.seed .. config.seed + seeds - 1).
    workdir: the comparison folder; method m runs in `workdir/m`.
    variant: "", "synthetic" or "tiny" (or give it in `dataset`).
    ablations: also run each method's `ABLATIONS` and write `ablations_<method>.md`.
    overrides: "field=value" for every method, "method:field=value" for one.
    metrics: the metrics to tabulate (default `headline_metrics` of the task).
    config_dir: where the `<method>_<dataset>.py` files are.
    allow_config_change: passed to `mer_jax.train.run`.

  Returns:
    The content of comparison.json: dataset, variant, task, seeds, `methods` {method:
    {config, reference, borrowed, workdir}}, metrics, and `comparison_table`'s rows,
    table and best.
  """
  name, variant = split_dataset(dataset, variant)
  if seeds < 1:
    raise ValueError(f"seeds must be >= 1, got {seeds}")
  if methods is None:
    methods = default_methods(name, variant, config_dir=config_dir, overrides=overrides)
  methods = list(dict.fromkeys(methods))
  if not methods:
    raise ValueError("no method to compare")
  # Every config is built (and every error raised) before anything trains.
  configs = {m: method_config(m, name, variant, config_dir=config_dir, overrides=overrides)
             for m in methods}
  task = configs[methods[0]].config.data.task
  label = f"{name}:{variant}" if variant else name
  os.makedirs(workdir, exist_ok=True)
  per_method = {}
  for method, made in configs.items():
    per_method[method] = run_seeds(
        made.config, os.path.join(workdir, method), seeds,
        allow_config_change=allow_config_change,
        title=f"{method} on {label}, mean of {seeds} seeds")
  metrics = tuple(metrics or headline_metrics(task, per_method[methods[0]]))
  report = {
      "dataset": name, "variant": variant, "task": task,
      "seeds": [configs[methods[0]].config.seed + s for s in range(seeds)],
      "methods": {m: {"config": c.path, "reference": c.reference, "borrowed": c.borrowed,
                      "workdir": os.path.join(workdir, m)} for m, c in configs.items()},
      "metrics": list(metrics), **comparison_table(per_method, metrics)}
  if ablations:
    report["ablations"] = {}
    for method, made in configs.items():
      variants, changed = {"full": per_method[method]}, {"full": {}}
      for title, slug, fields in ABLATIONS[method]:
        config = copy.deepcopy(made.config)
        config.lock()
        _set_fields(config, fields, f"ablation {title!r} of {method}")
        variants[title] = run_seeds(config, os.path.join(workdir, "ablations", method, slug),
                                    seeds, allow_config_change=allow_config_change,
                                    title=f"{method} {title} on {label}")
        changed[title] = fields
      path = os.path.join(workdir, f"ablations_{method}.md")
      report["ablations"][method] = path
      if jax.process_index() == 0:
        run_log.write_atomic(path, format_ablations(method, label, variants, changed,
                                                    metrics, report["seeds"]))
  if jax.process_index() == 0:
    run_log.write_atomic(os.path.join(workdir, "comparison.md"), format_comparison(report))
    run_log.write_atomic(os.path.join(workdir, "comparison.csv"), comparison_csv(report))
    run_log.write_atomic(os.path.join(workdir, "comparison.json"),
                         json.dumps(report, indent=2, allow_nan=True))
    plot_comparison(os.path.join(workdir, "comparison.png"), per_method, metrics,
                    metrics_lib.PRIMARY_METRIC[task],
                    title=f"{label}: mean over {seeds} seeds (bands: 95% interval)")
  return report


# --workdir, --allow_config_change and the multi-process flags are the ones mer_jax.train
# defines (importing it registers them); --config is not used here.
_DATASET = flags.DEFINE_string("dataset", None, "Config suffix with an optional variant: "
                               "mosei, mosei:synthetic, iemocap:tiny.")
_METHODS = flags.DEFINE_list("methods", None, "Methods to compare (default: every method "
                             "that supports the dataset's task).")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per method.")
_ABLATIONS = flags.DEFINE_bool("ablations", False, "Also run each method's ablations.")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "field=value (every method) or "
                                       "method:field=value, e.g. train.num_epochs=3.")
_METRICS = flags.DEFINE_list("metrics", None, "Metrics to tabulate (default: the task's "
                             "headline metrics).")
_CONFIG_DIR = flags.DEFINE_string("config_dir", CONFIG_DIR, "Folder of the config files.")


def main(argv):
  del argv
  flag_values = flags.FLAGS
  if not _DATASET.value or not flag_values.workdir:
    raise app.UsageError("--dataset and --workdir are required")
  if flag_values.coordinator_address or flag_values.distributed:
    parallel.initialize_distributed(flag_values.coordinator_address,
                                    flag_values.num_processes, flag_values.process_id)
  report = run_comparison(_DATASET.value, _METHODS.value, seeds=_SEEDS.value,
                          workdir=flag_values.workdir, ablations=_ABLATIONS.value,
                          overrides=_OVERRIDES.value, metrics=_METRICS.value,
                          config_dir=_CONFIG_DIR.value,
                          allow_config_change=flag_values.allow_config_change)
  if jax.process_index() == 0:
    print(format_console(report, flag_values.workdir))


def format_console(report: Mapping, workdir: str) -> str:
  """What `mer_jax.compare` prints: the primary metric per method (mean over seeds) on
  the 7 combinations, the MR average and the AUILC, then the output paths."""
  metric = metrics_lib.PRIMARY_METRIC[report["task"]]
  rows = {}
  for method, info in report["methods"].items():
    results = run_log.read_json(os.path.join(info["workdir"], "eval", "results.json"))
    if results is not None:
      rows[method + (BORROWED_MARK if info["borrowed"] else "")] = run_log.headline_row(
          results, metric)
  paths = [os.path.join(workdir, f"comparison.{ext}") for ext in ("md", "csv", "json")]
  title = f"test {metric} (mean of {len(report['seeds'])} seeds)"
  lines = [run_log.format_table(rows, title), ""]
  lines += run_log.output_lines({
      "tables": paths + sorted(report.get("ablations", {}).values()),
      "figures": [os.path.join(workdir, "comparison.png")]})
  lines.append(f"{'tensorboard':<12}tensorboard --logdir {workdir}")
  return "\n".join(lines)


if __name__ == "__main__":
  cli.run(main, program="compare")
