r"""k-fold cross validation: one full training run per fold, results per fold and averaged.

    python -m mer_jax.crossval --config configs/cmarr_iemocap.py:synthetic --workdir /tmp/cv

Fold k trains and evaluates in `DIR/fold{k}` through `mer_jax.train.run` with
`config.data.fold = k` (a real source selects that fold's split, e.g. leave-one-session-
out on IEMOCAP / MSP-IMPROV). Synthetic data have no sessions: there fold k uses the
data seed `config.data.seed + k`, i.e. a fresh draw of train/valid/test from the same
generator. `DIR/crossval.json` holds, per scenario and metric, the value of every fold,
their mean and their (population) standard deviation, plus the scenario
`avg_incomplete`: the mean over the 6 incomplete combinations L, A, V, LA, LV, AV (the
"Avg." row of CM-ARR Table 2); the command prints mean +- std and every fold's value of
WAR and UAR per combination. Starting again with the same workdir resumes each fold.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from absl import app, flags

from mer_jax import cli, parallel, run_log, train
from mer_jax import metrics as metrics_lib
from mer_jax.data.missing import COMBINATION_NAMES, FULL_COMBINATION

INCOMPLETE = tuple(n for i, n in enumerate(COMBINATION_NAMES) if i != FULL_COMBINATION)
AVG_INCOMPLETE = "avg_incomplete"


def fold_config(config, fold: int):
  """A copy of `config` for one fold: `data.fold = fold`; synthetic data also get the data
  seed `data.seed + fold` (they have no sessions to hold out)."""
  fold_cfg = copy.deepcopy(config)
  with fold_cfg.unlocked():
    fold_cfg.data.fold = fold
    if fold_cfg.data.source == "synthetic":
      fold_cfg.data.seed = config.data.seed + fold
  return fold_cfg


def _numeric(row: Mapping) -> dict[str, float]:
  return {k: float(v) for k, v in row.items()
          if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)}


def with_incomplete_average(results: Mapping) -> dict[str, dict[str, float]]:
  """The numeric scenario results of one run (without "summary"), plus `avg_incomplete`
  (the mean over the 6 incomplete fixed combinations) when they are all present."""
  table = {name: _numeric(row) for name, row in results.items()
           if name != "summary" and isinstance(row, Mapping)}
  if all(name in table for name in INCOMPLETE):
    shared = set.intersection(*(set(table[name]) for name in INCOMPLETE))
    table[AVG_INCOMPLETE] = {m: float(np.mean([table[n][m] for n in INCOMPLETE]))
                             for m in sorted(shared)}
  return table


def aggregate(per_fold: Sequence[Mapping[str, Mapping[str, float]]]) -> dict:
  """{scenario: {metric: {"folds": [...], "mean": m, "std": s}}} over the scenarios and
  metrics that every fold has."""
  scenarios = [s for s in per_fold[0] if all(s in fold for fold in per_fold)]
  summary = {}
  for scenario in scenarios:
    metrics = [m for m in per_fold[0][scenario]
               if all(m in fold[scenario] for fold in per_fold)]
    summary[scenario] = {}
    for metric in metrics:
      values = [fold[scenario][metric] for fold in per_fold]
      summary[scenario][metric] = {"folds": values, "mean": float(np.mean(values)),
                                   "std": float(np.std(values))}
  return summary


def run_folds(config, workdir: str, *, folds: Sequence[int] | None = None,
              allow_config_change: bool = False) -> dict:
  """Trains and evaluates one run per fold and writes `workdir/crossval.json`.

  Args:
    config: a run config with `config.data.num_folds`.
    workdir: the cross-validation folder; fold k runs in `workdir/fold{k}`.
    folds: the folds to run (default all `range(config.data.num_folds)`).
    allow_config_change: passed to `mer_jax.train.run` for each fold.

  Returns:
    The content of crossval.json: `folds`, `per_fold` ({"fold{k}": {scenario: {metric:
    value}}}) and `scenarios` (the aggregate of `aggregate`), `mean` ({scenario:
    {metric: mean}}) for quick reading.
  """
  num_folds = config.data.get("num_folds")
  if not num_folds:
    raise ValueError("config.data.num_folds must be set (>= 1) for cross validation")
  folds = list(range(num_folds)) if folds is None else [int(k) for k in folds]
  for k in folds:
    if not 0 <= k < num_folds:
      raise ValueError(f"fold {k} is outside range(config.data.num_folds={num_folds})")
  os.makedirs(workdir, exist_ok=True)
  per_fold = {}
  for k in folds:
    results = train.run(fold_config(config, k), os.path.join(workdir, f"fold{k}"),
                        allow_config_change=allow_config_change)
    per_fold[f"fold{k}"] = with_incomplete_average(results)
  scenarios = aggregate(list(per_fold.values()))
  report = {
      "method": config.method, "dataset": config.data.name, "source": config.data.source,
      "folds": folds, "per_fold": per_fold, "scenarios": scenarios,
      "mean": {s: {m: v["mean"] for m, v in row.items()} for s, row in scenarios.items()},
  }
  if jax.process_index() == 0:
    run_log.write_atomic(os.path.join(workdir, "crossval.json"), json.dumps(report, indent=2))
  return report


# --config, --workdir, --allow_config_change and the multi-process flags are the ones that
# mer_jax.train defines (importing it registers them); only --folds is particular here.
_FOLDS = flags.DEFINE_list("folds", None, "Folds to run (default: all of config.data.num_folds).")


def main(argv):
  del argv
  flag_values = flags.FLAGS
  if flag_values.config is None or not flag_values.workdir:
    raise app.UsageError("--config and --workdir are required")
  if flag_values.coordinator_address or flag_values.distributed:
    parallel.initialize_distributed(flag_values.coordinator_address,
                                    flag_values.num_processes, flag_values.process_id)
  report = run_folds(flag_values.config, flag_values.workdir, folds=_FOLDS.value,
                     allow_config_change=flag_values.allow_config_change)
  if jax.process_index() == 0:
    print(format_console(report, flag_values.workdir, flag_values.config.data.task))


def format_console(report: Mapping, workdir: str, task: str) -> str:
  """What `mer_jax.crossval` prints: the primary metric of every fold, their mean and
  (population) standard deviation on the 7 combinations, the MR average and the AUILC,
  then the output paths."""
  # CM-ARR's tables (cm_arr.txt Sec. 4) report WAR and UAR for every fold.
  metrics = ("war", "uar") if task == "classification" else (metrics_lib.PRIMARY_METRIC[task],)
  lines = []
  for metric in metrics:
    rows = {}
    for fold in report["folds"]:
      results = run_log.read_json(os.path.join(workdir, f"fold{fold}", "eval",
                                               "results.json"))
      if results is not None:
        rows[f"fold{fold}"] = run_log.headline_row(results, metric)
    if len(rows) > 1:
      columns = set.intersection(*(set(row) for row in rows.values()))
      folds = list(rows.values())
      rows["mean"] = {c: float(np.mean([row[c] for row in folds])) for c in columns}
      rows["std"] = {c: float(np.std([row[c] for row in folds])) for c in columns}
    lines += [run_log.format_table(rows, f"test {metric}"), ""]
  lines += run_log.output_lines({
      "results": [os.path.join(workdir, "crossval.json")],
      "figures": [os.path.join(workdir, f"fold{k}", "eval", "robustness.png")
                  for k in report["folds"]]})
  lines.append(f"{'tensorboard':<12}tensorboard --logdir {workdir}")
  return "\n".join(lines)


if __name__ == "__main__":
  cli.run(main, program="crossval")
