"""Evaluation metrics (SPEC section 6): task metrics, calibration, robustness summaries.

Everything here runs on the host, after the compiled forward pass, on numpy arrays
(`jax.Array` inputs are converted with `np.asarray`); every metric is a plain Python
`float`. Only numpy and scikit-learn are used, so the numbers can be checked against the
field's reference scripts (MMSA, MulT, MMIN), which are sklearn-based. sklearn is always
called with the argument order `(truth, pred)`.

Conventions decided here (see docs/decisions.md):

- Regression binary labels: `has0` is negative (< 0) vs non-negative (>= 0) on every
  sample; `non0` is negative vs positive on the samples whose label is not 0. `acc5` /
  `acc7` round with `np.round` (half to even) after clipping, exactly as MMSA.
- Labels within [-1, 1] (SIMS) additionally get MMSA's SIMS binning (`acc2`, `f1`,
  `acc3`, `acc5`, intervals open on the left: (-1.01, -0.1], (-0.1, 0.1], ...) and, as
  MMSA, `mae`/`corr` of predictions clipped to [-1, 1]; they have no `acc7`.
- `acc2_non0`/`f1_non0` are NaN when no label is non-zero (undefined, not 0); `corr` is
  0.0 when either side is constant (no linear relation is captured).
- Regression calibration (MCUR A.2.6, Eq. 25-26): p = sigmoid(output) is P(label >= 0),
  scored against the `has0` binary label on every sample (the decision p >= 0.5 is the
  same as output >= 0, so it matches `acc2_has0`).
- Multilabel-binary `brier` is the binary Brier of Eq. 25 per emotion,
  (P(present) - y)^2, averaged over samples and emotions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, recall_score

TASKS = ("regression", "classification", "multilabel_binary")

# The seven fixed combinations, in the order of mer_jax.data.missing.COMBINATION_NAMES
# (repeated here because metrics imports no data or model code).
COMBINATION_NAMES = ("L", "A", "V", "LA", "LV", "AV", "LAV")
INCOMPLETE_COMBINATIONS = COMBINATION_NAMES[:-1]

# The headline metric of each task: model selection, plots and the per-set AUILC lead
# with it. Regression uses the negative/positive binary accuracy that MCUR, CMAD and EASE
# (right-hand value) report; `acc2_has0`, `acc7` and `mae` (DQF) are always computed too.
PRIMARY_METRIC = {
    "regression": "acc2_non0",
    "classification": "war",
    "multilabel_binary": "acc",
}
LOWER_IS_BETTER = frozenset({"mae", "nll", "brier", "entropy", "ece", "loss"})
# The accuracy and F1 metrics whose language dominance gap (MCUR Eq. 29, F1 and ACC in
# A.5.8) the summary reports.
LANG_DOM_GAP_METRICS = {
    "regression": ("acc2_has0", "f1_has0", "acc2_non0", "f1_non0"),
    "classification": ("war", "uar", "f1_weighted", "f1_macro"),
    "multilabel_binary": ("acc", "f1"),
}

ECE_BINS = 15
# The paper's stabiliser in Eq. 30.
BIAS_AMP_EPS = 1e-8
SIMS_BINS_2 = (-1.01, 0.0, 1.01)
SIMS_BINS_3 = (-1.01, -0.1, 0.1, 1.01)
SIMS_BINS_5 = (-1.01, -0.7, -0.1, 0.1, 0.7, 1.01)


# ----------------------------------------------------------------------------- helpers


def _as_float64(x) -> np.ndarray:
  return np.asarray(x).astype(np.float64)


def _softplus(x: np.ndarray) -> np.ndarray:
  return np.logaddexp(0.0, x)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _weighted_f1(truth, pred) -> float:
  # zero_division=0 is what sklearn's default "warn" returns, without the warning.
  return float(f1_score(truth, pred, average="weighted", zero_division=0))


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
  x = x - x.mean()
  y = y - y.mean()
  denominator = math.sqrt(float(np.sum(x * x)) * float(np.sum(y * y)))
  if denominator == 0.0:
    return 0.0
  return float(np.clip(np.sum(x * y) / denominator, -1.0, 1.0))


def _ece(confidence: np.ndarray, correct: np.ndarray, num_bins: int = ECE_BINS) -> float:
  """Expected calibration error with `num_bins` equal-width bins (lo, hi] of [0, 1]:
  sum_b |B_b|/N * |accuracy(B_b) - mean confidence(B_b)| (Guo et al., 2017)."""
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, num_bins - 1)
  correct_sum = np.bincount(bins, weights=correct.astype(np.float64), minlength=num_bins)
  confidence_sum = np.bincount(bins, weights=confidence, minlength=num_bins)
  return float(np.abs(correct_sum - confidence_sum).sum() / len(confidence))


def _sims_bin(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
  """MMSA's SIMS classes: class i holds values in (edges[i], edges[i + 1]]."""
  return np.searchsorted(np.asarray(edges), values, side="left") - 1


def _is_sims_range(label_range) -> bool:
  low, high = (float(v) for v in label_range)
  return max(abs(low), abs(high)) <= 1.0


def _binary_calibration(logits: np.ndarray, targets: np.ndarray) -> dict[str, float]:
  """Brier, NLL (Eq. 25-26), mean entropy and ECE of p = sigmoid(logits) against
  binary `targets`; computed from log-sigmoids so large |logits| stay finite."""
  log_p, log_not_p = -_softplus(-logits), -_softplus(logits)
  prob = np.exp(log_p)
  nll = -(targets * log_p + (1.0 - targets) * log_not_p)
  entropy = -(prob * log_p + (1.0 - prob) * log_not_p)
  predicted = logits >= 0
  confidence = np.where(predicted, prob, 1.0 - prob)
  return {
      "brier": float(np.mean((prob - targets) ** 2)),
      "nll": float(np.mean(nll)),
      "entropy": float(np.mean(entropy)),
      "ece": _ece(confidence, predicted == (targets > 0.5)),
  }


def _softmax_calibration(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """Multi-class Brier (sum over classes), NLL, mean entropy and ECE of softmax(logits)."""
  log_probs = _log_softmax(logits)
  probs = np.exp(log_probs)
  onehot = np.eye(logits.shape[-1])[labels]
  predicted = probs.argmax(axis=-1)
  return {
      "brier": float(np.mean(np.sum((probs - onehot) ** 2, axis=-1))),
      "nll": float(-np.mean(np.take_along_axis(log_probs, labels[:, None], axis=-1))),
      "entropy": float(np.mean(-np.sum(probs * log_probs, axis=-1))),
      "ece": _ece(probs.max(axis=-1), predicted == labels),
  }


# ----------------------------------------------------------------------------- task metrics


def regression_metrics(preds, labels, *, label_range=(-3.0, 3.0)) -> dict[str, float]:
  """MMSA-style sentiment metrics plus calibration.

  Args:
    preds: (N,) (or (N, 1)) regression outputs.
    labels: (N,) sentiment labels.
    label_range: (low, high) of the labels. Labels within [-1, 1] (SIMS) get MMSA's SIMS
      metrics; any other range the MOSI/MOSEI set.

  Returns:
    Always: `acc2_has0`, `f1_has0` (label >= 0 vs pred >= 0, all samples), `acc2_non0`,
    `f1_non0` (label > 0 vs pred > 0 on samples with label != 0; NaN if there are none),
    `mae`, `corr` (Pearson; 0.0 if a side is constant), `brier`, `nll`, `entropy`, `ece`
    (p = sigmoid(pred) against label >= 0).
    MOSI/MOSEI: `acc5` (clip to [-2, 2], round), `acc7` (clip to [-3, 3], round).
    SIMS: `acc2`, `f1`, `acc3`, `acc5` with the bins (-1.01, 0, 1.01),
    (-1.01, -0.1, 0.1, 1.01), (-1.01, -0.7, -0.1, 0.1, 0.7, 1.01) (classes open on the
    left) after clipping both sides to [-1, 1]; `mae` and `corr` are of the clipped values.
    F1 is sklearn's weighted F1.
  """
  preds = _as_float64(preds).reshape(-1)
  labels = _as_float64(labels).reshape(-1)
  if preds.shape != labels.shape or preds.size == 0:
    raise ValueError(f"regression_metrics: preds {preds.shape} and labels {labels.shape} "
                     "must have the same non-zero number of elements")
  sims = _is_sims_range(label_range)

  truth_has0, pred_has0 = labels >= 0, preds >= 0
  non0 = labels != 0
  result = {
      "acc2_has0": float(accuracy_score(truth_has0, pred_has0)),
      "f1_has0": _weighted_f1(truth_has0, pred_has0),
  }
  if non0.any():
    truth_non0, pred_non0 = labels[non0] > 0, preds[non0] > 0
    result["acc2_non0"] = float(accuracy_score(truth_non0, pred_non0))
    result["f1_non0"] = _weighted_f1(truth_non0, pred_non0)
  else:
    result["acc2_non0"] = result["f1_non0"] = float("nan")

  if sims:
    preds_c, labels_c = np.clip(preds, -1.0, 1.0), np.clip(labels, -1.0, 1.0)
    for name, edges in (("2", SIMS_BINS_2), ("3", SIMS_BINS_3), ("5", SIMS_BINS_5)):
      truth_bin, pred_bin = _sims_bin(labels_c, edges), _sims_bin(preds_c, edges)
      result[f"acc{name}"] = float(accuracy_score(truth_bin, pred_bin))
      if name == "2":
        result["f1"] = _weighted_f1(truth_bin, pred_bin)
    result["mae"] = float(np.mean(np.abs(preds_c - labels_c)))
    result["corr"] = _pearson(preds_c, labels_c)
  else:
    for name, bound in (("acc5", 2.0), ("acc7", 3.0)):
      result[name] = float(np.mean(np.round(np.clip(preds, -bound, bound))
                                   == np.round(np.clip(labels, -bound, bound))))
    result["mae"] = float(np.mean(np.abs(preds - labels)))
    result["corr"] = _pearson(preds, labels)

  result.update(_binary_calibration(preds, truth_has0.astype(np.float64)))
  return result


def classification_metrics(logits, labels) -> dict[str, float]:
  """Single-label classification metrics plus calibration.

  Args:
    logits: (N, K).
    labels: (N,) ints in [0, K).

  Returns:
    `war` (accuracy), `uar` (mean recall over the classes present in `labels`), `f1_weighted`,
    `f1_macro` (mean F1 over the classes present in `labels` or in the predictions; a class
    in neither has no F1 and is not counted as 0), `brier` (mean over samples of
    sum_k (p_k - onehot_k)^2), `nll` (mean cross-entropy of the softmax), `entropy` (mean
    softmax entropy, nats), `ece` (15 bins, confidence = max probability).
  """
  logits = _as_float64(logits)
  labels = np.asarray(labels).astype(np.int64).reshape(-1)
  if logits.ndim != 2 or logits.shape[0] != labels.shape[0] or labels.size == 0:
    raise ValueError(f"classification_metrics: logits {logits.shape} must be (N, K) and "
                     f"labels {labels.shape} (N,), N > 0")
  num_classes = logits.shape[1]
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"classification_metrics: labels must be in [0, {num_classes})")
  preds = logits.argmax(axis=-1)
  present = np.unique(labels)
  seen = np.union1d(present, preds)
  result = {
      "war": float(accuracy_score(labels, preds)),
      "uar": float(recall_score(labels, preds, labels=present, average="macro",
                                zero_division=0)),
      "f1_weighted": float(f1_score(labels, preds, labels=np.arange(num_classes),
                                    average="weighted", zero_division=0)),
      "f1_macro": float(f1_score(labels, preds, labels=seen, average="macro",
                                 zero_division=0)),
  }
  result.update(_softmax_calibration(logits, labels))
  return result


def multilabel_binary_metrics(logits, labels, *, names: Sequence[str] | None = None
                              ) -> dict[str, float]:
  """Per-emotion binary metrics (the MulT/CMAD IEMOCAP protocol) plus calibration.

  Args:
    logits: (N, K, 2), logit 1 = emotion present.
    labels: (N, K) in {0, 1}.
    names: K emotion names for the per-emotion keys; default `e0`, `e1`, ...

  Returns:
    `acc_<name>` and `f1_<name>` (accuracy and sklearn weighted F1 of argmax per emotion),
    their means over emotions `acc` and `f1`; `brier` ((P(present) - y)^2), `nll`
    (two-class cross-entropy), `entropy` and `ece`, each averaged over samples and then
    emotions.
  """
  logits = _as_float64(logits)
  labels = np.asarray(labels).astype(np.int64)
  if logits.ndim != 3 or logits.shape[-1] != 2 or labels.shape != logits.shape[:2]:
    raise ValueError(f"multilabel_binary_metrics: logits {logits.shape} must be (N, K, 2) "
                     f"and labels {labels.shape} (N, K)")
  num_emotions = logits.shape[1]
  names = [f"e{k}" for k in range(num_emotions)] if names is None else list(names)
  if len(names) != num_emotions:
    raise ValueError(f"multilabel_binary_metrics: {len(names)} names for {num_emotions} "
                     "emotions")
  result, accs, f1s, calibrations = {}, [], [], []
  for k, name in enumerate(names):
    truth, preds = labels[:, k], logits[:, k].argmax(axis=-1)
    accs.append(float(accuracy_score(truth, preds)))
    f1s.append(_weighted_f1(truth, preds))
    result[f"acc_{name}"], result[f"f1_{name}"] = accs[-1], f1s[-1]
    # A two-logit head is a binary classifier on the logit difference.
    calibrations.append(_binary_calibration(logits[:, k, 1] - logits[:, k, 0],
                                            truth.astype(np.float64)))
  result["acc"] = float(np.mean(accs))
  result["f1"] = float(np.mean(f1s))
  for key in ("brier", "nll", "entropy", "ece"):
    result[key] = float(np.mean([c[key] for c in calibrations]))
  return result


def compute_metrics(outputs, labels, task: str, *, label_range=None,
                    names: Sequence[str] | None = None) -> dict[str, float]:
  """The metrics of `task` ("regression", "classification", "multilabel_binary").

  `label_range` (regression; default (-3, 3)) selects the MOSI/MOSEI or SIMS set;
  `names` names the emotions of multilabel_binary. Both are ignored by other tasks.
  """
  if task == "regression":
    return regression_metrics(outputs, labels,
                              label_range=(-3.0, 3.0) if label_range is None else label_range)
  if task == "classification":
    return classification_metrics(outputs, labels)
  if task == "multilabel_binary":
    return multilabel_binary_metrics(outputs, labels, names=names)
  raise ValueError(f"task must be one of {TASKS}, got {task!r}")


# ----------------------------------------------------------------------------- robustness


def auilc(rates, values) -> float:
  """Area Under the Indicator Line Chart (DQF): the trapezoid area under the
  metric-vs-missing-rate polyline divided by the rate range.

  Args:
    rates: (R,) distinct missing rates, any order (sorted here).
    values: (R,) the metric at each rate.

  Returns:
    The range-normalised area, in the metric's units (a constant curve gives that
    constant); with a single rate, its value.
  """
  rates = _as_float64(rates).reshape(-1)
  values = _as_float64(values).reshape(-1)
  if rates.shape != values.shape or rates.size == 0:
    raise ValueError(f"auilc: rates {rates.shape} and values {values.shape} must have the "
                     "same non-zero length")
  order = np.argsort(rates, kind="stable")
  rates, values = rates[order], values[order]
  if np.any(np.diff(rates) == 0):
    raise ValueError(f"auilc: repeated rates {rates.tolist()}")
  if rates.size == 1:
    return float(values[0])
  area = np.sum(np.diff(rates) * (values[1:] + values[:-1]) / 2.0)
  return float(area / (rates[-1] - rates[0]))


def _canonical_combination(name: str) -> str | None:
  """"A+V", "VA", "AV" -> "AV"; None when `name` is not a combination of L, A, V."""
  letters = name.replace("+", "").replace(" ", "").upper()
  if not letters or len(set(letters)) != len(letters) or not set(letters) <= set("LAV"):
    return None
  return "".join(m for m in "LAV" if m in letters)


def lang_dom_gap(scenario_scores: Mapping, metric: str | None = None) -> float:
  """Language dominance gap, MCUR Eq. 29:

      LangDomGap = F1(L) - (F1(A) + F1(V) + F1(A+V)) / 3

  evaluated on the fixed-combination scenarios of Eq. 28 (only L, A, V and A+V enter).
  Larger means stronger reliance on language. The paper uses F1 and notes the same
  statistic for accuracy; any higher-is-better metric can be used.

  Args:
    scenario_scores: combination name -> score (float), or, with `metric`, scenario name
      -> metric dict (an evaluation's results). Names may be written "A+V" or "AV".
    metric: key of the metric in each scenario's dict; None when the values are floats.
  """
  scores = {}
  for name, value in scenario_scores.items():
    combination = _canonical_combination(str(name))
    if combination is not None:
      scores[combination] = float(value[metric] if metric is not None else value)
  missing = [c for c in ("L", "A", "V", "AV") if c not in scores]
  if missing:
    raise ValueError(f"lang_dom_gap needs the combinations L, A, V, AV; missing {missing}")
  return scores["L"] - (scores["A"] + scores["V"] + scores["AV"]) / 3.0


def bias_amp(student, teacher, *, metric: str | None = None) -> float:
  """Bias amplification of a distilled student, MCUR Eq. 30:

      BiasAmp = LangDomGap_student / (LangDomGap_teacher + 1e-8)

  Below 1 the student attenuates the teacher's language dominance.

  Args:
    student, teacher: LangDomGap values (floats), or scenario scores / results that
      `lang_dom_gap(..., metric)` turns into them.
    metric: passed to `lang_dom_gap` for mapping arguments.
  """
  def gap(x):
    return lang_dom_gap(x, metric) if isinstance(x, Mapping) else float(x)

  return gap(student) / (gap(teacher) + BIAS_AMP_EPS)


_RATE = r"(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)"
_SCENARIO_PATTERNS = (
    ("random_mr", re.compile(rf"MR{_RATE}")),
    ("frame", re.compile(rf"frame{_RATE}_([LAV]+)")),
    ("noise", re.compile(rf"noise{_RATE}")),
)


def parse_scenario(name: str) -> tuple[str, str | None, float | None]:
  """Scenario name -> (kind, combination or masked set, rate).

  "LA" -> ("fixed", "LA", None); "MR0.3" -> ("random_mr", None, 0.3);
  "frame0.3_LA" -> ("frame", "LA", 0.3) (frames of L and A dropped at rate 0.3);
  "noise0.5" -> ("noise", None, 0.5); any other name (e.g. "summary") ->
  ("other", name, None).
  """
  if name in COMBINATION_NAMES:
    return "fixed", name, None
  for kind, pattern in _SCENARIO_PATTERNS:
    match = pattern.fullmatch(name)
    if match:
      subset = match.group(2) if kind == "frame" else None
      if kind == "frame" and subset not in COMBINATION_NAMES:
        break
      return kind, subset, float(match.group(1))
  return "other", name, None


def _mean_rows(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
  """Metric-wise mean over rows, for the metrics every row has."""
  shared = set.intersection(*(set(r) for r in rows))
  return {m: float(np.mean([r[m] for r in rows])) for m in sorted(shared)}


def summarize(results: Mapping[str, Mapping[str, float]], task: str) -> dict[str, float]:
  """Robustness summary of one evaluation, a flat {key: float} dict.

  Keys (each group only when its scenarios are present; `<m>` ranges over the metrics):
    `fixed/<m>`: mean over the 7 fixed combinations (MCUR's per-combination average);
    `incomplete/<m>`: mean over the 6 incomplete combinations (EASE, CM-ARR);
    `mr/<m>`: mean over the random missing-rate scenarios `MR*`;
    `fixed_mr/<m>`: mean over the fixed and MR scenarios together (MCUR's 14-case "Avg");
    `frame/<m>`: mean over every frame-level scenario (EASE's average over rates);
    `auilc_<set>/<m>`: AUILC over frame rates for masked set <set> (DQF), and
    `auilc/<m>` its mean over the masked sets;
    `noise/<m>`: mean over the noise scenarios;
    `lang_dom_gap/<m>`: Eq. 29 for the task's accuracy and F1 metrics
    (`LANG_DOM_GAP_METRICS`; needs L, A, V and AV).
  AUILC is computed for every metric, so the primary one (`PRIMARY_METRIC[task]`) and the
  DQF set (acc7, acc2, mae; war, uar) are all there. Names `parse_scenario` does not know,
  and the "summary" entry, are skipped.

  Args:
    results: scenario name -> {metric: value}.
    task: "regression", "classification" or "multilabel_binary".
  """
  if task not in PRIMARY_METRIC:
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")
  groups: dict[str, dict[str, Mapping[str, float]]] = {}
  frame_curves: dict[str, list[tuple[float, Mapping[str, float]]]] = {}
  for name, row in results.items():
    if name == "summary" or not isinstance(row, Mapping):
      continue
    row = {m: float(v) for m, v in row.items()
           if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)}
    kind, subset, rate = parse_scenario(name)
    if kind == "other":
      continue
    groups.setdefault(kind, {})[name] = row
    if kind == "frame":
      frame_curves.setdefault(subset, []).append((rate, row))

  summary: dict[str, float] = {}

  def add(prefix: str, rows: Sequence[Mapping[str, float]]):
    if rows:
      summary.update({f"{prefix}/{m}": v for m, v in _mean_rows(rows).items()})

  fixed = groups.get("fixed", {})
  if all(c in fixed for c in COMBINATION_NAMES):
    add("fixed", [fixed[c] for c in COMBINATION_NAMES])
  if all(c in fixed for c in INCOMPLETE_COMBINATIONS):
    add("incomplete", [fixed[c] for c in INCOMPLETE_COMBINATIONS])
  mr_rows = list(groups.get("random_mr", {}).values())
  add("mr", mr_rows)
  if mr_rows and all(c in fixed for c in COMBINATION_NAMES):
    add("fixed_mr", [fixed[c] for c in COMBINATION_NAMES] + mr_rows)
  add("frame", list(groups.get("frame", {}).values()))

  set_auilcs: list[dict[str, float]] = []
  for subset in sorted(frame_curves, key=COMBINATION_NAMES.index):
    points = frame_curves[subset]
    shared = sorted(set.intersection(*(set(row) for _, row in points)))
    rates = [rate for rate, _ in points]
    curve = {m: auilc(rates, [row[m] for _, row in points]) for m in shared}
    set_auilcs.append(curve)
    summary.update({f"auilc_{subset}/{m}": v for m, v in curve.items()})
  add("auilc", set_auilcs)
  add("noise", list(groups.get("noise", {}).values()))

  if all(c in fixed for c in ("L", "A", "V", "AV")):
    for m in LANG_DOM_GAP_METRICS[task]:
      if all(m in fixed[c] for c in ("L", "A", "V", "AV")):
        summary[f"lang_dom_gap/{m}"] = lang_dom_gap(fixed, m)
  return summary


__all__ = [
    "COMBINATION_NAMES", "LANG_DOM_GAP_METRICS", "LOWER_IS_BETTER", "PRIMARY_METRIC", "TASKS",
    "auilc", "bias_amp", "classification_metrics", "compute_metrics", "lang_dom_gap",
    "multilabel_binary_metrics", "parse_scenario", "regression_metrics", "summarize",
]
