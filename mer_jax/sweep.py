r"""Hyper-parameter search on Optuna: every trial an ordinary mer_jax run.

    python -m mer_jax.sweep --config configs/mcur_mosei.py:synthetic \
        --space configs/sweeps/mcur_mosei.py --trials 180 --workdir runs/sweep_mcur_mosei

The space file's `get_space()` returns `{config field: values}`, each a list of choices
(categorical), `sweep.uniform(low, high)`, `sweep.log_uniform(low, high)` or
`sweep.integers(low, high[, step])`. Trial n trains and evaluates, through
`mer_jax.train.run`, in `DIR/trials/<n>/` with the config and the trial's values; its
value is the validation selection value of the checkpoint the trainer selected
(`config.train.selection_metric` over `config.train.selection_scenarios`, higher is
better: MAE-like metrics are negated), never a test number.

- Samplers (`--sampler`): `grid` (every combination of the lists once: the papers'
  grids), `tpe`, `random`; `auto` (default) is grid when every entry is a list, else TPE.
  Seeded from `config.seed`.
- The study lives in `DIR/sweep.db` (SQLite) or `--storage URL` (any SQLAlchemy URL, e.g.
  PostgreSQL, shared by several processes or SLURM array tasks). `--trials N` is the total
  for the study: a process started again, or another process on the same study, runs only
  what is missing; a finished trial is never trained again. A trial interrupted by a
  kill, a pre-emption or an error is run again with the same values in the same folder, so
  it resumes from its checkpoint: at once when its process is gone from this host, after
  `--heartbeat_seconds` x 2 without a heartbeat otherwise.
- `--prune`: Optuna's median pruner on the per-epoch validation value (`config.num_seeds`
  must be 1); off by default.
- Outputs in DIR: `sweep.csv` (every trial), `sweep.md` (trials sorted by value, the test
  figures of the best), `sweep.png` (value against each hyper-parameter) and
  `best_config.json` (the best trial's resolved config). `--final_seeds K` then trains the
  best configuration with K seeds in `DIR/final/` (`config.num_seeds = K`) and adds its
  test table to sweep.md.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mer_jax import cli, config_lib, run_log, train
from mer_jax import metrics as metrics_lib
from mer_jax.trainer import NonFiniteError

SAMPLERS = ("auto", "grid", "tpe", "random")
STUDY_NAME = "mer_jax"
DATABASE = "sweep.db"
TRIALS_DIR = "trials"
FINAL_DIR = "final"


# ----------------------------------------------------------------------------- space


@dataclasses.dataclass(frozen=True)
class Range:
  """A continuous (or integer) range of a config field."""
  low: float
  high: float
  log: bool = False
  integer: bool = False
  step: int | None = None


def uniform(low: float, high: float) -> Range:
  return Range(float(low), float(high))


def log_uniform(low: float, high: float) -> Range:
  return Range(float(low), float(high), log=True)


def integers(low: int, high: int, step: int = 1) -> Range:
  return Range(int(low), int(high), integer=True, step=int(step))


def _describe(entry) -> str:
  if isinstance(entry, Range):
    kind = "integers" if entry.integer else "log_uniform" if entry.log else "uniform"
    return f"{kind}({entry.low!r}, {entry.high!r}" + (
        f", step={entry.step})" if entry.integer and entry.step != 1 else ")")
  return repr(list(entry))


def load_space(path: str) -> dict:
  """`get_space()` of a space file, checked for form (not yet against a config).

  Raises:
    ValueError: naming the file and the entry that is not a non-empty list of choices or
      a valid range.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--space {path}: no such file")
  spec = importlib.util.spec_from_file_location(
      "mer_jax_space_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, "get_space", None)):
    raise ValueError(f"{path}: defines no get_space() returning {{config field: choices}}")
  space = module.get_space()
  if not isinstance(space, Mapping) or not space:
    raise ValueError(f"{path}: get_space() must return a non-empty dict {{config field: "
                     f"[choices] | sweep.uniform/log_uniform/integers(...)}}, got {space!r}")
  checked = {}
  for field, entry in space.items():
    where = f"{path}: {field!r}"
    if isinstance(entry, Range):
      if not entry.low < entry.high:
        raise ValueError(f"{where}: the range needs low < high, got {_describe(entry)}")
      if entry.log and entry.low <= 0:
        raise ValueError(f"{where}: a log range needs low > 0, got {_describe(entry)}")
      if entry.integer and entry.step < 1:
        raise ValueError(f"{where}: the integer step must be >= 1, got {entry.step}")
      checked[str(field)] = entry
    elif isinstance(entry, (list, tuple)) and len(entry) > 0:
      checked[str(field)] = list(entry)
    else:
      raise ValueError(f"{where}: expected a non-empty list of choices or sweep.uniform / "
                       f"sweep.log_uniform / sweep.integers(...), got {entry!r}")
  return checked


def apply_params(config, params: Mapping[str, object], *, where: str = ""):
  """A copy of `config` with the (dotted) fields of `params` set; raises a ValueError
  naming the field when it does not exist or the value does not fit its type."""
  config = copy.deepcopy(config)
  for field, value in params.items():
    name = field.removeprefix("config.")
    parent, _, leaf = name.rpartition(".")
    node = config
    try:
      for part in filter(None, parent.split(".")):
        node = node[part]
      if leaf not in node:
        raise KeyError(leaf)
      node[leaf] = value
    except (KeyError, AttributeError, TypeError) as error:
      detail = "no such config field" if isinstance(error, (KeyError, AttributeError)) else (
          str(error))
      raise ValueError(f"{where}{field!r}: cannot set it to {value!r}: {detail}") from None
  return config


def _endpoints(entry) -> list:
  if isinstance(entry, Range):
    return [entry.low, entry.high]
  return list(entry)


def check_space(space: Mapping, config, path: str) -> None:
  """Every choice (and both ends of every range) set on `config` and validated, so that a
  bad space fails before anything trains."""
  for field, entry in space.items():
    for value in _endpoints(entry):
      trial = apply_params(config, {field: value}, where=f"{path}: ")
      try:
        config_lib.validate_config(trial)
      except ValueError as error:
        raise ValueError(f"{path}: {field!r} = {value!r}: {error}") from None


def is_grid(space: Mapping) -> bool:
  return all(not isinstance(entry, Range) for entry in space.values())


def _primitive(value) -> bool:
  return value is None or isinstance(value, (bool, int, float, str))


def _labels(choices) -> list:
  """Optuna stores categorical choices of None/bool/int/float/str; other values (tuples:
  e.g. missing.probs) are stored as their JSON text."""
  if all(_primitive(c) for c in choices):
    return list(choices)
  return [json.dumps(c) for c in choices]


def _from_label(choices, label):
  if all(_primitive(c) for c in choices):
    return label
  return choices[[json.dumps(c) for c in choices].index(label)]


def suggest(trial, space: Mapping) -> dict:
  """The trial's value of every space entry (config types: tuples come back as tuples)."""
  params = {}
  for field, entry in space.items():
    if isinstance(entry, Range):
      if entry.integer:
        params[field] = trial.suggest_int(field, int(entry.low), int(entry.high),
                                          step=entry.step)
      else:
        params[field] = trial.suggest_float(field, entry.low, entry.high, log=entry.log)
    else:
      label = trial.suggest_categorical(field, _labels(entry))
      params[field] = _from_label(entry, label)
  return params


def trial_values(space: Mapping, stored: Mapping) -> dict:
  """A finished trial's stored params as config values."""
  return {f: (_from_label(e, stored[f]) if not isinstance(e, Range) else stored[f])
          for f, e in space.items() if f in stored}


# ----------------------------------------------------------------------------- trials


def validation_value(workdir: str) -> float:
  """The validation selection value (higher is better) of the checkpoint a finished run
  selected: the last epoch record's `best_selection`; the mean over the seed folders of a
  `num_seeds` run."""
  seed_dirs = sorted(os.path.join(workdir, d) for d in os.listdir(workdir)
                     if d.startswith("seed") and os.path.isdir(os.path.join(workdir, d)))
  values = []
  for folder in seed_dirs or [workdir]:
    with open(os.path.join(folder, "log.jsonl")) as f:
      records = [json.loads(line) for line in f if line.strip()]
    selected = [r["best_selection"] for r in records if "best_selection" in r]
    if not selected:
      raise ValueError(f"{folder}/log.jsonl has no epoch record with best_selection")
    values.append(float(selected[-1]))
  return float(np.mean(values))


def train_trial(config, workdir: str, *, on_epoch: Callable | None = None) -> float:
  """The default trial: an ordinary `mer_jax.train.run`; returns `validation_value`."""
  train.run(config, workdir, on_epoch=on_epoch)
  return validation_value(workdir)


# ----------------------------------------------------------------------------- study


def _optuna():
  import optuna

  warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
  return optuna


def default_storage(workdir: str) -> str:
  return f"sqlite:///{os.path.abspath(os.path.join(workdir, DATABASE))}"


def make_storage(url: str, heartbeat_seconds: int, attempts: int = 5):
  """Optuna's RDB storage with trial heartbeats (stale trials are run again)."""
  import sqlalchemy.exc

  optuna = _optuna()
  engine_kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
  for attempt in range(attempts):
    try:
      return optuna.storages.RDBStorage(
          url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_seconds,
          grace_period=2 * heartbeat_seconds,
          heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback())
    except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
      # Processes that start together on a new database race to create its tables (the
      # loser gets "table ... already exists" or a duplicate version row); it finds them
      # made on the next attempt.
      if attempt == attempts - 1:
        raise
      time.sleep(0.5 * (attempt + 1))


def make_sampler(name: str, space: Mapping, seed: int):
  optuna = _optuna()
  if name == "auto":
    name = "grid" if is_grid(space) else "tpe"
  if name == "grid":
    if not is_grid(space):
      ranges = [f for f, e in space.items() if isinstance(e, Range)]
      raise ValueError(f"--sampler=grid needs a list of choices for every entry; {ranges} "
                       "are ranges (use --sampler=tpe or random)")
    return optuna.samplers.GridSampler({f: _labels(e) for f, e in space.items()}, seed=seed)
  if name == "tpe":
    return optuna.samplers.TPESampler(seed=seed)
  if name == "random":
    return optuna.samplers.RandomSampler(seed=seed)
  raise ValueError(f"--sampler={name!r}: choose one of {SAMPLERS}")


def grid_size(space: Mapping) -> int:
  return math.prod(len(e) for e in space.values()) if is_grid(space) else 0


def _fingerprint(config, space: Mapping) -> dict:
  flat = run_log.flatten_config(json.loads(config.to_json_best_effort()))
  return {"config": {k: v for k, v in flat.items() if not k.startswith("data.spec")},
          "space": {f: _describe(e) for f, e in space.items()}}


def open_study(config, space: Mapping, *, storage: str, study_name: str, sampler: str,
               prune: bool, heartbeat_seconds: int):
  """Creates or loads the study; a stored study made with another config or space is
  refused (as `mer_jax.train` refuses a workdir with another config)."""
  optuna = _optuna()
  study = optuna.create_study(
      study_name=study_name, storage=make_storage(storage, heartbeat_seconds),
      sampler=make_sampler(sampler, space, int(config.seed)),
      pruner=optuna.pruners.MedianPruner() if prune else optuna.pruners.NopPruner(),
      direction="maximize", load_if_exists=True)
  fingerprint = json.loads(json.dumps(_fingerprint(config, space)))
  saved = study.user_attrs.get("fingerprint")
  if saved is None:
    study.set_user_attr("fingerprint", fingerprint)
  elif saved != fingerprint:
    differing = sorted(k for part in ("config", "space")
                       for k in set(saved[part]) | set(fingerprint[part])
                       if saved[part].get(k) != fingerprint[part].get(k))
    raise ValueError(f"study {study_name!r} in {storage} was made with another config or "
                     f"space (differing: {', '.join(differing[:6])}); use a new --workdir "
                     "or --study_name")
  return study


def _state(trial) -> str:
  return trial.state.name


def counts_toward_total(trial) -> bool:
  """Finished trials (complete, pruned, or failed on their own: a non-finite loss), and
  trials in progress; not the interrupted ones, which are run again."""
  name = _state(trial)
  return name in ("COMPLETE", "PRUNED", "RUNNING", "WAITING") or (
      name == "FAIL" and "error" in trial.user_attrs)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def retry(study, trial) -> None:
  """Queues `trial` (failed by an interruption) again with its values and its folder."""
  _optuna().storages.RetryHeartbeatStaleTrialCallback()(study, trial)


def reclaim_dead_trials(study) -> list[int]:
  """Trials left RUNNING by a process of this host that is gone (killed): failed and
  queued again at once (other hosts' trials go by the heartbeat)."""
  optuna = _optuna()
  host, reclaimed = socket.gethostname(), []
  for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
    pid = trial.user_attrs.get("pid")
    if trial.user_attrs.get("host") != host or pid is None or pid == os.getpid() or _alive(pid):
      continue
    try:
      study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    except (ValueError, RuntimeError):  # another process reclaimed it first
      continue
    retry(study, study.trials[trial.number])
    reclaimed.append(trial.number)
  return reclaimed


@dataclasses.dataclass
class Sweep:
  """A sweep's fixed inputs (what `run_sweep` was called with)."""
  config: object
  space: dict
  workdir: str
  trials: int
  storage: str
  study_name: str
  config_label: str
  space_path: str
  trial_fn: Callable

  @property
  def metric(self) -> str:
    return self.config.train.selection_metric or metrics_lib.PRIMARY_METRIC[
        self.config.data.task]

  def shown(self, value: float) -> float:
    """A selection value as the metric (MAE-like metrics are selected negated)."""
    return -value if self.metric in metrics_lib.LOWER_IS_BETTER else value


def _objective(sweep: Sweep, started: dict):
  optuna = _optuna()

  def objective(trial):
    started["number"] = trial.number
    params = suggest(trial, sweep.space)
    workdir = trial.user_attrs.get("workdir") or os.path.join(
        sweep.workdir, TRIALS_DIR, str(trial.number))
    for key, value in (("workdir", workdir), ("host", socket.gethostname()),
                       ("pid", os.getpid())):
      trial.set_user_attr(key, value)
    config = apply_params(sweep.config, params)
    again = trial.study.get_trials(deepcopy=False)[trial.number].system_attrs.get(
        "failed_trial")
    run_log.status(f"trial {trial.number}" + (f" (trial {again} again)" if again is not None
                                              else "") + f": {_params_text(params)} -> {workdir}")

    def on_epoch(record):
      trial.report(float(record["selection"]), int(record["global_epoch"]))
      if trial.should_prune():
        raise optuna.TrialPruned(f"pruned at epoch {record['global_epoch']}")

    try:
      return sweep.trial_fn(config, workdir, on_epoch=on_epoch)
    except NonFiniteError as error:
      trial.set_user_attr("error", " ".join(str(error).split()))
      raise

  return objective


def _params_text(params: Mapping) -> str:
  return " ".join(f"{k}={_format_value(v)}" for k, v in params.items())


def _format_value(value) -> str:
  if isinstance(value, float):
    text = f"{value:.4g}"
    return text if any(c in text for c in ".ein") else text + ".0"
  return str(value)


def _report_trial(sweep: Sweep):
  def callback(study, trial):
    line = f"trial {trial.number} {trial.state.name.lower()}"
    if trial.value is not None:
      line += f": val {sweep.metric} {sweep.shown(trial.value):.4f}"
    if trial.user_attrs.get("error"):
      line += f": {trial.user_attrs['error']}"
    complete = [t for t in study.get_trials(deepcopy=False) if t.value is not None]
    if complete:
      best = max(complete, key=lambda t: t.value)
      line += f" (best {sweep.shown(best.value):.4f}, trial {best.number})"
    if trial.duration is not None:
      line += f"  {trial.duration.total_seconds():.0f} s"
    run_log.status(line)

  return callback


def run_trials(sweep: Sweep, study) -> None:
  """Runs trials one at a time until the study has `sweep.trials` (or the whole grid)."""
  target = min(sweep.trials, grid_size(sweep.space) or sweep.trials)
  started: dict = {}
  objective = _objective(sweep, started)
  callbacks = [_report_trial(sweep)]
  while True:
    for number in reclaim_dead_trials(study):
      run_log.status(f"trial {number}: its process is gone; queued again (resumes from "
                     "its checkpoint)")
    trials = study.get_trials(deepcopy=False)
    waiting = any(_state(t) == "WAITING" for t in trials)
    if not waiting and sum(map(counts_toward_total, trials)) >= target:
      return
    started.clear()
    try:
      study.optimize(objective, n_trials=1, catch=(NonFiniteError,), callbacks=callbacks)
    except BaseException:
      # Interrupted (pre-emption, Ctrl-C, an error outside the trial's own numbers): the
      # trial is queued again, so that the next start resumes it in its folder.
      if "number" in started:
        trial = study.trials[started["number"]]
        if _state(trial) == "FAIL" and "error" not in trial.user_attrs:
          retry(study, trial)
      raise


# ----------------------------------------------------------------------------- outputs


def _rows(sweep: Sweep, study) -> list[dict]:
  rows = []
  for trial in study.get_trials(deepcopy=False):
    last = trial.intermediate_values[max(trial.intermediate_values)] if (
        trial.intermediate_values) else None
    value = trial.value if trial.value is not None else None
    rows.append({
        "trial": trial.number, "state": _state(trial).lower(), "value": value,
        f"val_{sweep.metric}": sweep.shown(value) if value is not None else None,
        "last_reported": sweep.shown(last) if last is not None else None,
        **{f: trial_values(sweep.space, trial.params).get(f) for f in sweep.space},
        "duration_s": trial.duration.total_seconds() if trial.duration else None,
        "workdir": trial.user_attrs.get("workdir", ""),
        "retry_of": trial.system_attrs.get("failed_trial"),
        "error": trial.user_attrs.get("error", "")})
  return rows


def best_trial(study):
  complete = [t for t in study.get_trials(deepcopy=False) if t.value is not None
              and _state(t) == "COMPLETE"]
  return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def format_csv(rows: list[dict]) -> str:
  header = list(rows[0]) if rows else ["trial"]
  cell = lambda v: json.dumps(v) if isinstance(v, (list, tuple)) else v
  return run_log.csv_text([header, *([cell(row.get(k, "")) for k in header] for row in rows)])


def _test_table(workdir: str, task: str, label: str, seeds: int = 1) -> str:
  results = run_log.read_json(os.path.join(workdir, "eval", "results.json"))
  if results is None:
    return ""
  metric = metrics_lib.PRIMARY_METRIC[task]
  title = f"test {metric}" + (f" (mean of {seeds} seeds)" if seeds > 1 else "")
  return run_log.format_table({label: run_log.headline_row(results, metric)}, title)


def override_flags(params: Mapping) -> str:
  return " ".join(f"--config.{k}={json.dumps(v) if isinstance(v, (list, tuple)) else v!r}"
                  .replace("'", "") for k, v in params.items())


def format_markdown(sweep: Sweep, study, rows: list[dict], final_seeds: int) -> str:
  by_state: dict[str, int] = {}
  for row in rows:
    by_state[row["state"]] = by_state.get(row["state"], 0) + 1
  counts = ", ".join(f"{n} {s}" for s, n in sorted(by_state.items()))
  ranked = sorted((r for r in rows if r["value"] is not None), key=lambda r: -r["value"])
  others = [r for r in rows if r["value"] is None]
  fields = list(sweep.space)
  scenarios = sweep.config.train.selection_scenarios
  lines = [f"# Sweep of {sweep.config_label}", "",
           f"Space `{sweep.space_path}`; study `{sweep.study_name}` in `{sweep.storage}`, "
           f"sampler {type(study.sampler).__name__}; trials: {counts or 'none'}.", "",
           f"Value: validation {sweep.metric} (config.train.selection_scenarios="
           f"{scenarios!r}) of the checkpoint each run selected; "
           f"{'lower' if sweep.metric in metrics_lib.LOWER_IS_BETTER else 'higher'} is "
           "better. Test figures are shown for the best trial only.", "",
           "| rank | trial | val " + sweep.metric + " | " + " | ".join(fields) + " | folder |",
           "|---" * (len(fields) + 4) + "|"]
  for rank, row in enumerate(ranked, 1):
    lines.append(f"| {rank} | {row['trial']} | {row[f'val_{sweep.metric}']:.4f} | "
                 + " | ".join(_format_value(row[f]) for f in fields)
                 + f" | `{row['workdir']}` |")
  if others:
    lines += ["", "Not ranked:", ""]
    for row in others:
      note = row["error"] or (f"last reported {row['last_reported']:.4f}"
                              if row["last_reported"] is not None else "")
      if row["state"] == "fail" and not row["error"]:
        note = "interrupted; run again as a new trial in the same folder"
      lines.append(f"- trial {row['trial']}: {row['state']}" + (f" ({note})" if note else ""))
  best = best_trial(study)
  if best is not None:
    params = trial_values(sweep.space, best.params)
    folder = best.user_attrs["workdir"]
    lines += ["", f"## Best: trial {best.number}", "",
              f"Validation {sweep.metric} {sweep.shown(best.value):.4f} with "
              f"{_params_text(params)}; run folder `{folder}`, config `best_config.json`. "
              "Train it again with:", "",
              "```bash", f"python -m mer_jax.train --config {sweep.config_label} "
              f"{override_flags(params)} --workdir runs/best", "```", ""]
    table = _test_table(folder, sweep.config.data.task, f"trial {best.number}")
    if table:
      lines += ["```", table, "```"]
    final = os.path.join(sweep.workdir, FINAL_DIR)
    table = _test_table(final, sweep.config.data.task, "final", final_seeds)
    if final_seeds and table:
      lines += ["", f"### The best configuration with {final_seeds} seeds (`{final}`)", "",
                "```", table, "```"]
  return "\n".join(lines).rstrip() + "\n"


def plot_sweep(path: str, sweep: Sweep, rows: list[dict]) -> None:
  """The validation value against each hyper-parameter (pruned trials at their last
  reported value, in grey; the best as a star)."""
  plt = run_log.pyplot()
  from matplotlib import ticker

  fields = list(sweep.space)
  fig, axes = plt.subplots(1, len(fields), figsize=(4 * len(fields), 3.4), squeeze=False)
  ranked = [r for r in rows if r["value"] is not None]
  best = max(ranked, key=lambda r: r["value"]) if ranked else None
  ylabel = f"val {sweep.metric}"
  for ax, field in zip(axes[0], fields, strict=True):
    entry = sweep.space[field]
    numeric = isinstance(entry, Range) or all(
        isinstance(c, (int, float)) and not isinstance(c, bool) for c in entry)
    if numeric:
      position = lambda v: float(v)
      values = _endpoints(entry)
      if (isinstance(entry, Range) and entry.log) or (
          min(values) > 0 and max(values) / min(values) >= 100):
        ax.set_xscale("log")
        # Plain tick labels: the default 10^k ones go through mathtext, seconds to set up.
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    else:
      labels = [_format_value(c) for c in entry]
      position = lambda v, labels=labels: labels.index(_format_value(v))
      ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
    for row in rows:
      y = row[f"val_{sweep.metric}"] if row["value"] is not None else row["last_reported"]
      if y is None or row[field] is None:
        continue
      pruned = row["value"] is None
      ax.scatter(position(row[field]), y, s=18, alpha=0.8,
                 color="0.6" if pruned else "tab:blue")
    if best is not None:
      ax.scatter(position(best[field]), best[f"val_{sweep.metric}"], marker="*", s=140,
                 color="tab:red", zorder=3, label=f"best (trial {best['trial']})")
    ax.set_xlabel(field)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  if best is not None:
    axes[0, 0].legend(fontsize=7)
  fig.suptitle(f"{sweep.config_label}: {len(ranked)} complete trials")
  fig.tight_layout()
  run_log.save_figure(fig, path)


def write_outputs(sweep: Sweep, study, final_seeds: int = 0) -> dict:
  """sweep.csv, sweep.md, sweep.png and best_config.json; returns their paths."""
  rows = _rows(sweep, study)
  paths = {name: os.path.join(sweep.workdir, name)
           for name in ("sweep.csv", "sweep.md", "sweep.png", "best_config.json")}
  if jax.process_index() != 0:
    return paths
  run_log.write_atomic(paths["sweep.csv"], format_csv(rows))
  run_log.write_atomic(paths["sweep.md"], format_markdown(sweep, study, rows, final_seeds))
  plot_sweep(paths["sweep.png"], sweep, rows)
  best = best_trial(study)
  if best is not None:
    saved = run_log.read_json(os.path.join(best.user_attrs["workdir"], "config.json"))
    if saved is None:  # a substituted trial function writes no run folder
      saved = json.loads(apply_params(sweep.config, trial_values(
          sweep.space, best.params)).to_json_best_effort())
    run_log.write_atomic(paths["best_config.json"], json.dumps(saved, indent=2) + "\n")
  return paths


def format_console(sweep: Sweep, study, paths: Mapping[str, str], top: int = 5) -> str:
  """What the sweep prints when it ends: the best trials, the best's test table, paths."""
  rows = sorted((r for r in _rows(sweep, study) if r["value"] is not None),
                key=lambda r: -r["value"])[:top]
  fields = list(sweep.space)
  lines = [f"{'trial':>5}  {'val ' + sweep.metric:>14}  " + "  ".join(fields)]
  for row in rows:
    lines.append(f"{row['trial']:>5}  {row[f'val_{sweep.metric}']:>14.4f}  "
                 + "  ".join(f"{_format_value(row[f]):>{len(f)}}" for f in fields))
  best = best_trial(study)
  if best is not None:
    table = _test_table(best.user_attrs["workdir"], sweep.config.data.task,
                        f"trial {best.number}")
    if table:
      lines += ["", table]
  lines += [""] + run_log.output_lines({"sweep": list(paths.values())})
  lines.append(f"{'tensorboard':<12}tensorboard --logdir {os.path.join(sweep.workdir, TRIALS_DIR)}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- runner


def run_sweep(config, space_path: str, *, workdir: str, trials: int, sampler: str = "auto",
              storage: str | None = None, study_name: str = STUDY_NAME, prune: bool = False,
              final_seeds: int = 0, heartbeat_seconds: int = 60,
              trial_fn: Callable = train_trial, config_label: str = "") -> dict:
  """Runs (or resumes) a sweep (module docstring) and writes its outputs.

  Args:
    config: the base run config; every trial changes only the space's fields.
    space_path: the space file (`get_space()`).
    workdir: the sweep folder (DIR).
    trials: the study's total number of trials (capped at the grid size).
    sampler: one of `SAMPLERS`.
    storage: an SQLAlchemy URL; None = `DIR/sweep.db`.
    study_name: the study in the storage.
    prune: Optuna's median pruner on the per-epoch validation value.
    final_seeds: K > 0 trains the best configuration with K seeds in `DIR/final/` once
      the study has all its trials.
    heartbeat_seconds: trials of other processes without a heartbeat for twice this are
      taken as dead and run again.
    trial_fn: `trial_fn(config, workdir, *, on_epoch) -> validation value`; default an
      ordinary run (`train_trial`). Tests substitute a cheap function.
    config_label: the `--config` argument, for the reports.

  Returns:
    {"best_trial", "best_value" (as the metric), "best_params", "paths", "final"}.
  """
  if trials < 1:
    raise ValueError(f"--trials must be >= 1, got {trials}")
  if final_seeds < 0:
    raise ValueError(f"--final_seeds must be >= 0, got {final_seeds}")
  if sampler not in SAMPLERS:
    raise ValueError(f"--sampler={sampler!r}: choose one of {SAMPLERS}")
  if prune and config.num_seeds > 1:
    raise ValueError("--prune reads one run's per-epoch validation value: search with "
                     "config.num_seeds=1 (then --final_seeds K)")
  config_lib.validate_config(config)
  space = load_space(space_path)
  check_space(space, config, space_path)
  os.makedirs(workdir, exist_ok=True)
  storage = storage or default_storage(workdir)
  sweep = Sweep(config, space, workdir, trials, storage, study_name,
                config_label or config.method, space_path, trial_fn)
  study = open_study(config, space, storage=storage, study_name=study_name, sampler=sampler,
                     prune=prune, heartbeat_seconds=heartbeat_seconds)
  run_trials(sweep, study)
  pending = [t.number for t in study.get_trials(deepcopy=False)
             if _state(t) in ("RUNNING", "WAITING")]
  best = best_trial(study)
  final = None
  if final_seeds and best is not None and not pending:
    final_config = apply_params(config, trial_values(space, best.params))
    with final_config.unlocked():
      final_config.num_seeds = final_seeds
    final = os.path.join(workdir, FINAL_DIR)
    run_log.status(f"final: the best configuration (trial {best.number}) with {final_seeds} "
                   f"seeds -> {final}")
    trial_fn(final_config, final, on_epoch=None)
  elif final_seeds and pending:
    run_log.status(f"final: waiting for trials {pending} of other processes; run the same "
                   "command again when they have finished")
  paths = write_outputs(sweep, study, final_seeds if final else 0)
  return {"best_trial": best.number if best else None,
          "best_value": sweep.shown(best.value) if best else None,
          "best_params": trial_values(space, best.params) if best else None,
          "paths": paths, "final": final, "sweep": sweep, "study": study}


# --config (the base config), --workdir (the sweep folder) and --allow_config_change are the
# flags mer_jax.train defines (importing it registers them).
_SPACE = flags.DEFINE_string("space", None, "Search-space file (configs/sweeps/*.py).")
_TRIALS = flags.DEFINE_integer("trials", None, "Total number of trials of the study.")
_SAMPLER = flags.DEFINE_enum("sampler", "auto", SAMPLERS,
                             "grid | tpe | random; auto = grid for lists only, else TPE.")
_STORAGE = flags.DEFINE_string("storage", None, "SQLAlchemy URL of a shared study "
                               "(default: sqlite in --workdir).")
_STUDY = flags.DEFINE_string("study_name", STUDY_NAME, "Study name in the storage.")
_PRUNE = flags.DEFINE_bool("prune", False, "Median pruning on the per-epoch validation value.")
_FINAL_SEEDS = flags.DEFINE_integer("final_seeds", 0,
                                    "Train the best configuration with K seeds in DIR/final.")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_seconds", 60,
                                  "Trial heartbeat; twice this without one = a dead trial.")


def _config_label() -> str:
  """`--config` as given, with its `--config.*` overrides (for the reports)."""
  flag = flags.FLAGS["config"]
  overrides = config_flags.get_override_values(flag)
  return " ".join([config_flags.get_config_filename(flag)] + [
      f"--config.{k}={v}" for k, v in run_log.flatten_config(overrides).items()])


def main(argv):
  del argv
  flag_values = flags.FLAGS
  if flag_values.config is None or not _SPACE.value or not flag_values.workdir or (
      not _TRIALS.value):
    raise app.UsageError("--config, --space, --trials and --workdir are required")
  optuna = _optuna()
  if cli.verbosity() < 1:
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the sweep prints its own lines
  summary = run_sweep(flag_values.config, _SPACE.value, workdir=flag_values.workdir,
                      trials=_TRIALS.value, sampler=_SAMPLER.value, storage=_STORAGE.value,
                      study_name=_STUDY.value, prune=_PRUNE.value,
                      final_seeds=_FINAL_SEEDS.value, heartbeat_seconds=_HEARTBEAT.value,
                      config_label=_config_label())
  print(format_console(summary["sweep"], summary["study"], summary["paths"]))


if __name__ == "__main__":
  cli.run(main, program="sweep")
