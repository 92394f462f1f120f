"""What a run tells a person and a dashboard.

Every record of a run (a log step, an epoch, an event) flows through one `RunLogger`,
which fans it out to:

- `DIR/log.jsonl`: one JSON object per record (resumed runs append);
- TensorBoard event files in `DIR/tensorboard/` (tensorboardX, no TensorFlow), unless
  `config.log.tensorboard` is False: train scalars per log step as `<stage>/train/<k>`,
  per epoch `<stage>/val/...`, `<stage>/train_epoch/<k>`, `<stage>/selection`; the test
  summary as `test/...`, the evaluation figures as images and the resolved config as text
  and as TensorBoard hparams. The seeds of a `num_seeds=K` run log into their own
  `DIR/seed{s}/tensorboard/`, so `tensorboard --logdir DIR` shows them as K runs;
- the console: one line per epoch (stage, epoch, train loss, validation selection value,
  best so far, epoch seconds) on stderr, next to the tqdm bar;
- an optional `on_epoch(record)` hook, called after each epoch's record (the sweep's
  pruning reads the validation value there).

The helpers below also format what a command prints when it ends: a compact table of
the main metric (7 combinations, MR average, frame-level AUILC) and the output paths.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
import tqdm

from mer_jax import metrics as metrics_lib
from mer_jax.data.missing import COMBINATION_NAMES

TENSORBOARD_DIR = "tensorboard"
MR_AVG, AUILC = "MR avg", "AUILC"


def is_main_process() -> bool:
  return jax.process_index() == 0


def status(message: str) -> None:
  """One console line on stderr (process 0), printed above any tqdm bar."""
  if is_main_process():
    tqdm.tqdm.write(message, file=sys.stderr)
    sys.stderr.flush()


def _plain(value):
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    return value.item()
  return value


def _number(value) -> float | None:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return float(value)


def flatten_config(tree: Mapping, prefix: str = "") -> dict:
  """{"train.learning_rate": 1e-4, ...} of a (JSON) config."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten_config(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _config_json(config) -> dict | None:
  if config is None:
    return None
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(dict(config), default=str))


def tensorboard_enabled(config) -> bool:
  """`config.log.tensorboard`, True for configs without a `log` section."""
  log = config.get("log") if config is not None and hasattr(config, "get") else None
  return bool(log.get("tensorboard", True)) if log is not None else True


class RunLogger:
  """The one place a run's records flow through (module docstring).

  Args:
    workdir: the run folder (`log.jsonl` and `tensorboard/` go there).
    config: the run config: `config.log.tensorboard` switches TensorBoard; its resolved
      values are logged as text and hparams. None: TensorBoard on, no config logged.
    on_epoch: called as `on_epoch(record)` after each epoch record, with
      `record["global_epoch"]` = epochs of the earlier stages (`epoch_offset`) + epoch.
      It may raise to stop the run (e.g. `optuna.TrialPruned`): the epoch's checkpoint is
      then not written.
    label: prefix of the console lines (e.g. "seed 3").
  """

  def __init__(self, workdir: str, config=None, *, on_epoch: Callable | None = None,
               label: str = ""):
    self.workdir = workdir
    self.path = os.path.join(workdir, "log.jsonl")
    self.config = config
    self.on_epoch = on_epoch
    self.label = label
    self.epoch_offset = 0  # set by mer_jax.train before each stage
    self._tensorboard = tensorboard_enabled(config) and is_main_process()
    self._writer = None
    self._last_step = 0
    self._children: dict[str, RunLogger] = {}

  # --------------------------------------------------------------------------- records

  def write(self, record: Mapping) -> None:
    record = {k: _plain(v) for k, v in record.items()}
    if is_main_process():
      os.makedirs(self.workdir, exist_ok=True)
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")
    is_epoch = "selection" in record and "event" not in record
    if self._tensorboard:
      self._to_tensorboard(record, is_epoch)
    if is_epoch:
      print_epoch(record, self.label)
      if self.on_epoch is not None:
        self.on_epoch({**record, "global_epoch": self.epoch_offset + int(record["epoch"])})

  def for_seeds(self, workdirs: Sequence[str], seeds: Sequence[int]) -> list[RunLogger]:
    """The loggers of the seed folders of a `num_seeds=K` run (made once, then reused:
    the trainer and `mer_jax.train` write to the same ones)."""
    loggers = []
    for workdir, seed in zip(workdirs, seeds, strict=True):
      if workdir not in self._children:
        self._children[workdir] = RunLogger(workdir, self.config, label=f"seed {seed}")
      loggers.append(self._children[workdir])
    return loggers

  def close(self) -> None:
    for child in self._children.values():
      child.close()
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  # --------------------------------------------------------------------------- tensorboard

  @property
  def writer(self):
    if self._writer is None:
      from tensorboardX import SummaryWriter

      self._writer = SummaryWriter(os.path.join(self.workdir, TENSORBOARD_DIR), flush_secs=30)
      if self.config is not None:
        self._writer.add_text("config", _config_markdown(_config_json(self.config)))
    return self._writer

  def _scalars(self, values: Mapping[str, float], step: int) -> None:
    for tag, value in values.items():
      self.writer.add_scalar(tag, value, global_step=step)

  def _to_tensorboard(self, record: Mapping, is_epoch: bool) -> None:
    event = record.get("event")
    if event == "evaluated":
      tests = {k: v for k, v in record.items() if k.startswith("test/") and _number(v) is not None}
      self._scalars(tests, self._last_step)
      self._hparams(tests)
      self.writer.flush()
      return
    if event is not None or "stage" not in record or "step" not in record:
      return
    stage, step = record["stage"], int(record["step"])
    self._last_step = max(self._last_step, step)
    values = {}
    for key, value in record.items():
      if key in ("stage", "step", "epoch", "num_epochs", "best_epoch") or _number(value) is None:
        continue
      if is_epoch and key.startswith("train/"):
        key = "train_epoch/" + key.removeprefix("train/")
      elif is_epoch and not key.startswith("val/"):
        key = {"selection": "val/selection", "best_selection": "val/best_selection"}.get(
            key, "perf/" + key)
      values[f"{stage}/{key}"] = _number(value)
    self._scalars(values, step)
    if is_epoch:
      self.writer.flush()

  def _hparams(self, metrics: Mapping[str, float]) -> None:
    """The resolved config and the headline test metrics in TensorBoard's HParams tab."""
    config = _config_json(self.config)
    if config is None:
      return
    from tensorboardX.summary import hparams

    values = {}
    for key, value in flatten_config(config).items():
      if key.startswith("data.spec"):
        continue
      values[key] = value if isinstance(value, (bool, int, float, str)) else str(value)
    task = config.get("data", {}).get("task")
    primary = metrics_lib.PRIMARY_METRIC.get(task, "")
    shown = {k: v for k, v in metrics.items() if k.endswith("/" + primary)} or dict(metrics)
    # Into the run's own folder (SummaryWriter.add_hparams would make a new run for them).
    file_writer = self.writer._get_file_writer()
    for summary in hparams(values, shown):
      file_writer.add_summary(summary)

  def figures(self, folder: str) -> None:
    """Logs every PNG under `folder` (e.g. DIR/eval) as an image `figures/<relative path>`."""
    if not self._tensorboard or not os.path.isdir(folder):
      return
    import matplotlib.image

    for root, _, files in sorted(os.walk(folder)):
      for name in sorted(f for f in files if f.endswith(".png")):
        path = os.path.join(root, name)
        image = matplotlib.image.imread(path)
        if image.dtype != np.uint8:
          image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        if image.ndim == 3:
          image = image[..., :3]
        relative = os.path.relpath(path, self.workdir).removesuffix(".png")
        self.writer.add_image(f"figures/{relative}", image, global_step=self._last_step,
                              dataformats="HWC" if image.ndim == 3 else "HW")
    self.writer.flush()


def _config_markdown(config: Mapping) -> str:
  # Indented lines are a code block in TensorBoard's markdown.
  return "\n".join("    " + line for line in json.dumps(config, indent=2).splitlines())


# ----------------------------------------------------------------------------- console


def _shown(metric: str, selection_value: float) -> float:
  """The metric itself from a higher-is-better selection value (negated for MAE, ...)."""
  return -selection_value if metric in metrics_lib.LOWER_IS_BETTER else selection_value


def format_epoch(record: Mapping, label: str = "") -> str:
  """`[student] epoch  3/20  train loss 0.5123  val acc2_non0 0.6123  best 0.6200 (epoch 2)
  12.3 s` (one line)."""
  metric = record.get("selection_metric", "")
  value = record.get(f"val/{metric}", record.get("selection", float("nan")))
  best = record.get("best_selection")
  digits = len(str(record.get("num_epochs", record["epoch"])))
  parts = [f"[{' '.join(filter(None, [record.get('stage', ''), label]))}]",
           f"epoch {record['epoch']:>{digits}}/{record.get('num_epochs', '?')}",
           f"train loss {record.get('train/loss', float('nan')):.4f}",
           f"val {metric} {value:.4f}"]
  if best is not None:
    parts.append(f"best {_shown(metric, best):.4f} (epoch {record.get('best_epoch')})")
  parts.append(f"{record.get('epoch_seconds', float('nan')):.1f} s")
  return "  ".join(parts)


def print_epoch(record: Mapping, label: str = "") -> None:
  status(format_epoch(record, label))


# ----------------------------------------------------------------------------- tables


def headline_row(results: Mapping, metric: str) -> dict[str, float]:
  """`metric` on the 7 fixed combinations, its MR average and its frame-level AUILC
  (means over seeds for aggregated results); absent scenarios are left out."""
  row = {name: float(results[name][metric]) for name in COMBINATION_NAMES
         if name in results and metric in results[name]}
  summary = results.get("summary", {})
  for column, key in ((MR_AVG, f"mr/{metric}"), (AUILC, f"auilc/{metric}")):
    if key in summary:
      row[column] = float(summary[key])
  return row


def format_table(rows: Mapping[str, Mapping[str, float]], title: str) -> str:
  """A fixed-width table: one line per row label, the columns of `headline_row`."""
  columns = [c for c in (*COMBINATION_NAMES, MR_AVG, AUILC)
             if any(c in row for row in rows.values())]
  width = max([len(title), *map(len, rows)]) + 2
  lines = [f"{title:<{width}}" + "".join(f"{c:>8}" for c in columns)]
  for label, row in rows.items():
    cells = [row.get(c, math.nan) for c in columns]
    lines.append(f"{label:<{width}}" + "".join(
        f"{v:>8.4f}" if math.isfinite(v) else f"{'-':>8}" for v in cells))
  return "\n".join(lines)


@contextlib.contextmanager
def replaced_whole(path: str):
  """Yields a temporary path next to `path` to write to, then renames it into place: a
  reader (another process of the run, a restarted run) sees the old file or the new one,
  never a partial one, also when the writer is killed mid-write. A write that fails
  leaves no temporary file."""
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_atomic(path: str, text: str):
  """Writes `text` to `path` whole or not at all (`replaced_whole`)."""
  with replaced_whole(path) as tmp, open(tmp, "w") as f:
    f.write(text)


def csv_text(rows: Iterable[Sequence]) -> str:
  """`rows` (the header first) as CSV text, one "\n"-ended line each: every CSV a run,
  a comparison or a sweep writes (through `write_atomic`)."""
  out = io.StringIO()
  csv.writer(out, lineterminator="\n").writerows(rows)
  return out.getvalue()


def pyplot():
  """matplotlib.pyplot on the Agg backend: figures are files, no display is assumed."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def save_figure(fig, path: str):
  """Writes `fig` to `path` as a PNG, whole or not at all (`replaced_whole`), and closes
  it."""
  try:
    with replaced_whole(path) as tmp:
      fig.savefig(tmp, dpi=110, format="png")
  finally:
    pyplot().close(fig)


def read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def stage_results(eval_dir: str, final_label: str) -> dict[str, dict]:
  """{stage: results} of an evaluation folder, in training order: earlier stages from
  `<stage>/results.json` (ordered as comparison.json lists them), the final stage from
  `results.json` under `final_label`."""
  final = read_json(os.path.join(eval_dir, "results.json"))
  comparison = read_json(os.path.join(eval_dir, "comparison.json")) or {}
  stages = list(comparison.get("stages", []))
  found = {}
  for name in stages[:-1]:
    results = read_json(os.path.join(eval_dir, name, "results.json"))
    if results is not None:
      found[name] = results
  if final is not None:
    found[stages[-1] if stages else final_label] = final
  return found


def figure_paths(folder: str) -> list[str]:
  return sorted(os.path.join(root, f) for root, _, files in os.walk(folder)
                for f in files if f.endswith(".png"))


def run_report(workdir: str, task: str, *, method: str, eval_root: str = "eval",
               split: str = "test", seeds: int = 1) -> str:
  """What `train` and `evaluate` print at the end: the headline table of every stage
  and where the results, figures and TensorBoard files are."""
  metric = metrics_lib.PRIMARY_METRIC[task]
  eval_dir = os.path.join(workdir, eval_root)
  rows = {name: headline_row(results, metric)
          for name, results in stage_results(eval_dir, method).items()}
  title = f"{split} {metric}" + (f" (mean of {seeds} seeds)" if seeds > 1 else "")
  lines = [format_table(rows, title), ""] if rows else []
  lines += output_lines({"results": [os.path.join(eval_dir, "results.json"),
                                     os.path.join(eval_dir, "results.csv")],
                         "figures": figure_paths(eval_dir)})
  if os.path.isdir(os.path.join(workdir, TENSORBOARD_DIR)) or seeds > 1:
    lines.append(f"{'tensorboard':<12}tensorboard --logdir {workdir}")
  return "\n".join(lines)


def output_lines(groups: Mapping[str, Sequence[str]]) -> list[str]:
  """`results     a.json` / `            b.csv` lines, one path each."""
  lines = []
  for name, paths in groups.items():
    for index, path in enumerate(paths):
      lines.append(f"{name if index == 0 else '':<12}{path}")
  return lines
