r"""Robustness evaluation of a trained run under every missing-modality protocol.

    python -m mer_jax.evaluate --workdir /tmp/run [--checkpoint best|latest] [--embeddings]

Runs the 7 fixed combinations, random modality-level missing MR0.1..MR0.7 and the
frame-level curves (with AUILC) of `config.eval`, through one compiled forward, and
writes DIR/eval/results.json, results.csv and robustness.png (SPEC section 10).
`--embeddings` also saves the fused representations per scenario and a t-SNE figure.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from mer_jax import cli, parallel, run_log
from mer_jax import metrics as metrics_lib
from mer_jax.data import missing, pipeline
from mer_jax.methods import build_stages
from mer_jax.trainer import Predictor, load_stage_params


def scenario_inputs(scenario, num_rows: int, key):
  """(modality_mask (N, 3), frame_rates (3,), noise_intensity) of one scenario."""
  rates = np.zeros(3, np.float32)
  noise = 0.0
  if scenario.kind == "fixed":
    modality_mask = missing.fixed_modality_mask(num_rows, scenario.combination)
  elif scenario.kind == "random_mr":
    modality_mask = missing.random_modality_mask(key, num_rows, scenario.rate)
  elif scenario.kind == "frame":
    modality_mask = missing.fixed_modality_mask(num_rows, 6)
    rates = scenario.rate * missing.MASKED_SETS[scenario.combination].astype(np.float32)
  elif scenario.kind == "noise":
    modality_mask = missing.fixed_modality_mask(num_rows, 6)
    noise = scenario.rate
  else:
    raise ValueError(f"unknown scenario kind {scenario.kind!r}")
  return np.asarray(modality_mask, bool), rates, noise


def run_scenarios(predictor: Predictor, params, method_state, split, spec, eval_config, *,
                  key, keep_embeddings: bool = False):
  """Metrics per scenario (+ "summary"), and the embeddings when asked.

  Scenarios run `eval_config.scenarios_per_call` at a time through one compiled,
  scenario-vmapped forward; the last group is padded with copies of its last scenario
  so that every call has the same shapes (one compilation). Scenarios that only remove
  whole modalities are grouped apart from those with frame drops or noise, so that
  their calls take the predictor's modality-only forward. A scenario of that kind whose
  modality masks equal an earlier one's (frame rate 0 of every masked set is the full
  combination `LAV`) is not run again: nothing random enters it, so it shares the
  earlier one's outputs.
  """
  num_rows = len(split["label"])
  scenarios = missing.eval_scenarios(eval_config)
  keys = [jax.random.fold_in(key, index) for index in range(len(scenarios))]
  inputs = [scenario_inputs(s, num_rows, k) for s, k in zip(scenarios, keys, strict=True)]
  modalities_only = [not np.any(rates) and not noise for _, rates, noise in inputs]
  same_as = _same_inputs(inputs, modalities_only)
  to_run = [i for i in range(len(scenarios)) if same_as[i] == i]
  per_call = max(1, min(int(eval_config.get("scenarios_per_call", 8)), len(to_run)))
  results, embeddings = {}, {}
  for group in _scenario_groups(to_run, modalities_only, per_call):
    padded = group + [group[-1]] * (per_call - len(group))
    outputs = predictor.predict_scenarios(
        params, method_state, split,
        modality_masks=np.stack([inputs[i][0] for i in padded]),
        frame_rates=np.stack([inputs[i][1] for i in padded]),
        noise_intensities=np.asarray([inputs[i][2] for i in padded], np.float32),
        keys=jnp.stack([keys[i] for i in padded]))
    for position, index in enumerate(group):
      name = scenarios[index].name
      results[name] = metrics_lib.compute_metrics(
          outputs["output"][position], split["label"], spec.task,
          label_range=spec.label_range, names=spec.class_names or None)
      if keep_embeddings:
        embeddings[name] = outputs["embedding"][position]
  for index, first in enumerate(same_as):
    if first != index:
      results[scenarios[index].name] = dict(results[scenarios[first].name])
      if keep_embeddings:
        embeddings[scenarios[index].name] = embeddings[scenarios[first].name]
  results = {s.name: results[s.name] for s in scenarios}  # the protocol's order
  results["summary"] = metrics_lib.summarize(results, spec.task)
  return results, embeddings


def _same_inputs(inputs, modalities_only: list[bool]) -> list[int]:
  """For each scenario, the index of the first modality-only scenario with the same
  modality masks (its own index when none, or when frames drop or noise is added)."""
  first_with, same_as = {}, []
  for index, ((modality_mask, _, _), only) in enumerate(zip(inputs, modalities_only,
                                                             strict=True)):
    same_as.append(first_with.setdefault(modality_mask.tobytes(), index) if only else index)
  return same_as


def _scenario_groups(indices: list[int], modalities_only: list[bool],
                     per_call: int) -> list[list[int]]:
  """`indices` in calls of at most `per_call` scenarios, each call of one kind."""
  groups = []
  for kind in (True, False):
    indices_of_kind = [i for i in indices if modalities_only[i] == kind]
    groups += [indices_of_kind[start:start + per_call]
               for start in range(0, len(indices_of_kind), per_call)]
  return groups


def aggregate_seeds(per_seed: Mapping[int, Mapping[str, Mapping[str, float]]]) -> dict:
  """Mean and 95% interval (Student t, over seeds) of every metric of every scenario.

  Returns `{scenario: {metric: mean, metric + "_ci95": half-width, ...}}` with the
  per-seed values under `seeds` (`{seed: {scenario: {metric: value}}}`).
  """
  from scipy import stats

  runs = list(per_seed.values())
  count = len(runs)
  t_value = float(stats.t.ppf(0.975, count - 1)) if count > 1 else 0.0
  aggregated = {}
  for scenario in runs[0]:
    row = {}
    for metric, value in runs[0][scenario].items():
      if not isinstance(value, (int, float)):
        continue
      values = np.array([r[scenario][metric] for r in runs], np.float64)
      row[metric] = float(values.mean())
      spread = values.std(ddof=1) if count > 1 else 0.0
      row[f"{metric}_ci95"] = float(t_value * spread / np.sqrt(count))
    aggregated[scenario] = row
  aggregated["seeds"] = {str(seed): dict(result) for seed, result in per_seed.items()}
  return aggregated


def write_results(eval_dir: str, results: Mapping[str, Mapping[str, float]]):
  """results.json ({scenario: {metric: value}} + summary) and results.csv (a row each)."""
  os.makedirs(eval_dir, exist_ok=True)
  # Whole or not at all (a killed evaluation leaves the last complete results): a run
  # that finds results.json skips evaluating again, and the comparison runner reads it.
  run_log.write_atomic(os.path.join(eval_dir, "results.json"),
                       json.dumps(results, indent=2, sort_keys=False))
  rows = {name: row for name, row in results.items() if name != "seeds"}
  columns = sorted({m for r in rows.values() for m in r})
  run_log.write_atomic(os.path.join(eval_dir, "results.csv"), run_log.csv_text([
      ["scenario"] + columns, *([name] + [row.get(c, "") for c in columns]
                                for name, row in rows.items())]))


def plot_robustness(path: str, results: Mapping[str, Mapping[str, float]], task: str,
                    title: str = ""):
  """Metric vs missing rate (modality-level and frame-level) and bars per combination."""
  plt = run_log.pyplot()

  metric = metrics_lib.PRIMARY_METRIC[task]
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  names = [n for n in missing.COMBINATION_NAMES if n in results]
  ax = axes[0]
  ax.bar(names, [results[n][metric] for n in names], color="tab:blue")
  ax.set_title(f"{metric} per available combination")
  ax.set_xlabel("available modalities")
  ax.set_ylabel(metric)
  for i, n in enumerate(names):
    ax.text(i, results[n][metric], f"{results[n][metric]:.3f}", ha="center", va="bottom",
            fontsize=8)

  ax = axes[1]
  mr = sorted((metrics_lib.parse_scenario(n)[2], r[metric]) for n, r in results.items()
              if n != "summary" and metrics_lib.parse_scenario(n)[0] == "random_mr")
  if mr:
    ax.plot([m for m, _ in mr], [v for _, v in mr], "o-", color="tab:orange")
  ax.set_title(f"{metric} vs modality missing rate (MR)")
  ax.set_xlabel("missing rate")
  ax.set_ylabel(metric)

  ax = axes[2]
  curves = {}
  for n, r in results.items():
    if n == "summary":
      continue
    kind, masked_set, rate = metrics_lib.parse_scenario(n)
    if kind == "frame":
      curves.setdefault(masked_set, []).append((rate, r[metric]))
  for masked_set, points in curves.items():
    points.sort()
    ax.plot([p for p, _ in points], [v for _, v in points], "o-", ms=3,
            label=f"masked {masked_set}")
  ax.set_title(f"{metric} vs frame missing rate")
  ax.set_xlabel("frame missing rate")
  ax.set_ylabel(metric)
  if curves:
    ax.legend(fontsize=7)
  for ax in axes:
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  run_log.save_figure(fig, path)


def plot_tsne(path: str, embeddings: Mapping[str, np.ndarray], labels: np.ndarray, task: str,
              seed: int = 0):
  """t-SNE of the fused representations, one panel per fixed combination."""
  plt = run_log.pyplot()
  from sklearn.manifold import TSNE

  names = [n for n in missing.COMBINATION_NAMES if n in embeddings]
  if task == "regression":
    colours = np.asarray(labels)
  elif task == "multilabel_binary":
    colours = np.argmax(labels, axis=-1)
  else:
    colours = np.asarray(labels)
  fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), squeeze=False)
  for ax, name in zip(axes[0], names, strict=True):
    points = embeddings[name]
    perplexity = float(min(30, max(2, (len(points) - 1) // 3)))
    projected = TSNE(2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(
        points)
    ax.scatter(projected[:, 0], projected[:, 1], c=colours, s=6,
               cmap="coolwarm" if task == "regression" else "tab10")
    ax.set_title(name)
    ax.set_xticks([])
    ax.set_yticks([])
  fig.tight_layout()
  run_log.save_figure(fig, path)


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a mer_jax run directory?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def evaluate_run(workdir: str, config=None, *, checkpoint: str | None = None,
                 embeddings: bool | None = None, split_name: str | None = None,
                 data=None, mesh=None, eval_data=None, adapt_widths: bool = False,
                 stages=None) -> dict:
  """Evaluates every stage of a run; writes DIR/eval/ for the final stage and
  DIR/eval/<stage>/ for earlier ones. Returns the final stage's results.

  Cross-dataset evaluation (MCUR A.5.9): `eval_data` (a `config.data` section naming
  another dataset of the same task) is evaluated instead of the run's own data, into
  DIR/eval_<name>/; with `adapt_widths` feature widths that differ from the trained
  ones are zero-padded / truncated (`sources.cross_dataset`, which logs a warning),
  without it they are an error naming both. `stages`: the run's `build_stages` (the
  trainer's own, whose compiled forwards the evaluation then reuses).
  """
  config = config or load_run_config(workdir)
  checkpoint = checkpoint or config.eval.checkpoint
  keep_embeddings = config.eval.embeddings if embeddings is None else embeddings
  split_name = split_name or config.eval.split
  eval_root = "eval"
  if eval_data is not None:
    from mer_jax.data import sources
    from mer_jax.data.builders import files

    if not config.data.get("spec"):
      raise ValueError(f"{workdir}/config.json has no data.spec (the trained widths); "
                       "cross-dataset evaluation needs a run written by this version")
    other_splits, other_spec = pipeline.load_data(eval_data)
    data = sources.cross_dataset(other_splits, other_spec,
                                 files.spec_from_dict(config.data.spec), adapt=adapt_widths)
    eval_root = f"eval_{eval_data.name}"
  splits, spec = data or pipeline.load_data(config.data)
  mesh = mesh or parallel.make_mesh(config.num_devices)
  split = splits[split_name]
  stages = stages or build_stages(config, spec)
  example = {k: v[:2] for k, v in pipeline.device_arrays(split).items()}
  eval_key = jax.random.fold_in(jax.random.key(config.seed), 10_000)
  all_results = {}
  for index, stage in enumerate(stages):
    params, method_state, epoch = load_stage_params(workdir, stage, example, checkpoint=checkpoint)
    # Laid out as training left them: the forward that validation compiled for
    # replicated params is then reused, not traced and compiled again for host arrays.
    params, method_state = parallel.replicate((params, method_state), mesh)
    predictor = Predictor.from_config(stage, mesh, config)
    results, stage_embeddings = run_scenarios(
        predictor, params, method_state, split, spec, config.eval, key=eval_key,
        keep_embeddings=keep_embeddings)
    results["summary"]["checkpoint_epoch"] = epoch
    is_final = index == len(stages) - 1
    eval_dir = os.path.join(workdir, eval_root, "" if is_final else stage.name)
    if jax.process_index() == 0:
      write_results(eval_dir, results)
      plot_robustness(os.path.join(eval_dir, "robustness.png"), results, spec.task,
                      title=" ".join(filter(None, [config.method, stage.name, "on",
                                                        config.data.name, f"({split_name})"])))
      if keep_embeddings:
        np.savez_compressed(os.path.join(eval_dir, "embeddings.npz"),
                            labels=split["label"], **stage_embeddings)
        plot_tsne(os.path.join(eval_dir, "tsne.png"), stage_embeddings, split["label"],
                  spec.task, seed=config.seed)
    all_results[stage.name or "final"] = results
  if len(stages) > 1 and jax.process_index() == 0:
    write_stage_comparison(os.path.join(workdir, eval_root), all_results, spec.task,
                           title=f"{config.method} on {config.data.name} ({split_name})")
  return all_results[stages[-1].name or "final"]


def comparison_scenarios(results: Mapping[str, Mapping[str, float]]) -> list[str]:
  """The MCUR protocol's scenarios present in `results`: the 7 fixed combinations and
  the random missing rates MR*, in that order (14 with the default config.eval)."""
  fixed = [n for n in missing.COMBINATION_NAMES if n in results]
  rates = sorted((metrics_lib.parse_scenario(n)[2], n) for n in results
                 if metrics_lib.parse_scenario(n)[0] == "random_mr")
  return fixed + [n for _, n in rates]


def stage_comparison(stage_results: Mapping[str, Mapping[str, Mapping[str, float]]],
                     task: str) -> dict:
  """Stages of one run side by side on the fixed + MR scenarios (MCUR Table 1 / A.5.8).

  Args:
    stage_results: stage name -> evaluation results ({scenario: {metric: value}}), in
      training order (e.g. teacher, then student).
    task: the DataSpec task.

  Returns:
    A JSON-ready dict: `stages`, `scenarios`, `primary_metric`; `per_scenario`
    {scenario: {stage: {metric: value}}}; `average` {stage: {metric: mean over the
    scenarios}} (MCUR's 14-case "Avg."); `worst` {stage: {metric: worst scenario value}};
    `delta` {metric: last stage - first stage average}; `lang_dom_gap` {stage: {metric:
    Eq. 29}} and `bias_amp` {metric: Eq. 30, last stage over first} when L, A, V and AV
    were evaluated; `last_beats_first`: whether the last stage's average primary metric
    is better than the first's.
  """
  names = list(stage_results)
  first, last = names[0], names[-1]
  scenarios = comparison_scenarios(stage_results[last])
  scenarios = [s for s in scenarios if all(s in stage_results[n] for n in names)]
  shared = sorted(set.intersection(*(
      {m for m, v in stage_results[n][s].items() if isinstance(v, (int, float))}
      for n in names for s in scenarios))) if scenarios else []
  per_scenario = {s: {n: {m: float(stage_results[n][s][m]) for m in shared} for n in names}
                  for s in scenarios}
  average, worst = {}, {}
  for n in names:
    values = {m: [per_scenario[s][n][m] for s in scenarios] for m in shared}
    average[n] = {m: float(np.mean(v)) for m, v in values.items()}
    worst[n] = {m: float(np.max(v) if m in metrics_lib.LOWER_IS_BETTER else np.min(v))
                for m, v in values.items()}
  primary = metrics_lib.PRIMARY_METRIC[task]
  comparison = {
      "stages": names, "scenarios": scenarios, "primary_metric": primary,
      "per_scenario": per_scenario, "average": average, "worst": worst,
      "delta": {m: average[last][m] - average[first][m] for m in shared},
  }
  gap_metrics = [m for m in metrics_lib.LANG_DOM_GAP_METRICS[task] if m in shared]
  if gap_metrics and all(c in scenarios for c in ("L", "A", "V", "AV")):
    comparison["lang_dom_gap"] = {
        n: {m: metrics_lib.lang_dom_gap(stage_results[n], m) for m in gap_metrics}
        for n in names}
    comparison["bias_amp"] = {
        m: metrics_lib.bias_amp(comparison["lang_dom_gap"][last][m],
                                comparison["lang_dom_gap"][first][m]) for m in gap_metrics}
  if primary in shared:
    sign = -1.0 if primary in metrics_lib.LOWER_IS_BETTER else 1.0
    comparison["last_beats_first"] = bool(
        sign * (average[last][primary] - average[first][primary]) > 0)
  return comparison


def write_stage_comparison(eval_dir: str, stage_results, task: str, title: str = "") -> dict:
  """Writes `comparison.json` (`stage_comparison`), `comparison.csv` (scenario, metric,
  one column per stage, last - first) and `comparison.png` (primary metric, Brier and
  NLL per scenario and on average) into `eval_dir`. Returns the comparison."""
  comparison = stage_comparison(stage_results, task)
  os.makedirs(eval_dir, exist_ok=True)
  run_log.write_atomic(os.path.join(eval_dir, "comparison.json"),
                       json.dumps(comparison, indent=2))
  names = comparison["stages"]
  rows = [(s, comparison["per_scenario"][s]) for s in comparison["scenarios"]]
  rows.append(("average", comparison["average"]))
  header = ["scenario", "metric"] + names + [f"{names[-1]}-{names[0]}"]
  lines = []
  for scenario, values in rows:
    for metric in sorted(values[names[0]]):
      row = [values[n][metric] for n in names]
      lines.append([scenario, metric] + row + [row[-1] - row[0]])
  run_log.write_atomic(os.path.join(eval_dir, "comparison.csv"),
                       run_log.csv_text([header, *lines]))
  plot_stage_comparison(os.path.join(eval_dir, "comparison.png"), comparison, title=title)
  return comparison


def plot_stage_comparison(path: str, comparison: Mapping, title: str = ""):
  """Grouped bars per scenario (+ the average) for the primary metric, Brier and NLL."""
  plt = run_log.pyplot()

  names, scenarios = comparison["stages"], comparison["scenarios"] + ["avg"]
  metrics = [m for m in (comparison["primary_metric"], "brier", "nll")
             if m in comparison["average"].get(names[0], {})]
  fig, axes = plt.subplots(len(metrics), 1, figsize=(max(8, 0.7 * len(scenarios)),
                                                      3.2 * max(len(metrics), 1)),
                           squeeze=False)
  width = 0.8 / len(names)
  positions = np.arange(len(scenarios))
  for ax, metric in zip(axes[:, 0], metrics, strict=False):
    for i, name in enumerate(names):
      values = [comparison["per_scenario"][s][name][metric] for s in comparison["scenarios"]]
      values.append(comparison["average"][name][metric])
      ax.bar(positions + (i - (len(names) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(positions, scenarios)
    better = "lower" if metric in metrics_lib.LOWER_IS_BETTER else "higher"
    ax.set_ylabel(f"{metric} ({better} is better)")
    ax.grid(alpha=0.3, axis="y")
  handles, labels = axes[0, 0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="upper right", ncol=len(names), fontsize=9)
  if title:
    fig.suptitle(title)
  fig.tight_layout(rect=(0, 0, 1, 0.97))
  run_log.save_figure(fig, path)


def _define_flags():
  """Command-line flags, defined only when this module is the program (so that
  importing it from another CLI defines no duplicate flags)."""
  global _WORKDIR, _CHECKPOINT, _EMBEDDINGS, _SPLIT
  _WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by mer_jax.train.")
  _CHECKPOINT = flags.DEFINE_enum("checkpoint", None, ["best", "latest"],
                                  "Which checkpoint to evaluate (default: config.eval.checkpoint).")
  _EMBEDDINGS = flags.DEFINE_bool("embeddings", False,
                                  "Also save fused embeddings per scenario and a t-SNE plot.")
  _SPLIT = flags.DEFINE_enum("split", None, ["valid", "test"], "Split (default config.eval.split).")
  global _EVAL_SOURCE, _EVAL_NAME, _EVAL_DIR, _ADAPT_WIDTHS
  _EVAL_SOURCE = flags.DEFINE_string(
      "eval_source", None, "Cross-dataset evaluation: the other dataset's config.data.source "
      "(default: the run's). Results go to DIR/eval_<name>/.")
  _EVAL_NAME = flags.DEFINE_string("eval_name", None,
                                   "Cross-dataset evaluation: the other dataset's name.")
  _EVAL_DIR = flags.DEFINE_string("eval_dir", None,
                                  "Cross-dataset evaluation: the other dataset's folder.")
  _ADAPT_WIDTHS = flags.DEFINE_bool(
      "adapt_widths", False, "Zero-pad / truncate feature widths that differ from the trained "
      "ones (MCUR A.5.9); a warning names each change.")


def main(argv):
  del argv
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  eval_data = None
  if _EVAL_NAME.value or _EVAL_DIR.value or _EVAL_SOURCE.value:
    if not _EVAL_NAME.value:
      raise app.UsageError("--eval_name is required for cross-dataset evaluation")
    eval_data = ml_collections.ConfigDict(load_run_config(_WORKDIR.value).data.to_dict())
    eval_data.source = _EVAL_SOURCE.value or eval_data.source
    eval_data.name = _EVAL_NAME.value
    eval_data.dir = _EVAL_DIR.value or ""
    eval_data.file = ""  # the run's file (e.g. EASE's unaligned_50.pkl) names its own dataset's
  workdir = _WORKDIR.value
  config = load_run_config(workdir)
  evaluate_run(workdir, config, checkpoint=_CHECKPOINT.value,
               embeddings=_EMBEDDINGS.value or None, split_name=_SPLIT.value,
               eval_data=eval_data, adapt_widths=_ADAPT_WIDTHS.value)
  eval_root = f"eval_{eval_data.name}" if eval_data is not None else "eval"
  logger = run_log.RunLogger(workdir, config)
  logger.figures(os.path.join(workdir, eval_root))
  logger.close()
  if jax.process_index() == 0:
    print(run_log.run_report(workdir, config.data.task, method=config.method,
                             eval_root=eval_root, split=_SPLIT.value or config.eval.split))


if __name__ == "__main__":
  _define_flags()
  cli.run(main, program="evaluate")
