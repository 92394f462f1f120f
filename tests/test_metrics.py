"""mer_jax.metrics against hand-computed values and independent numpy / sklearn references."""

import math
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import f1_score, recall_score

from mer_jax import metrics

# ----------------------------------------------------------------------------- references


def ref_sigmoid(z):
  return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def ref_softmax(logits):
  e = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def ref_ece(confidence, correct, num_bins=15):
  """Loop form of Guo et al.'s ECE with bins (lo, hi]."""
  total = 0.0
  for b in range(num_bins):
    lo, hi = b / num_bins, (b + 1) / num_bins
    in_bin = (confidence > lo) & (confidence <= hi)
    if in_bin.any():
      total += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
  return total


# ----------------------------------------------------------------------------- regression

# Hand-made MOSI-style case. Index 2 has label 0 (excluded from non0); index 4 exercises
# np.round's half-to-even (-2.5 -> -2); index 3 exercises the clip before rounding.
PREDS = np.array([2.4, -0.4, 0.0, 3.7, -2.5, 0.3])
LABELS = np.array([3.0, -1.0, 0.0, 3.0, -2.0, -0.2])


def test_regression_hand_computed_values():
  r = metrics.regression_metrics(PREDS, LABELS)
  # has0: truth >= 0 = [1,0,1,1,0,0], pred >= 0 = [1,0,1,1,0,1].
  assert r["acc2_has0"] == pytest.approx(5 / 6)
  # Class 1: P=3/4, R=1, F1=6/7; class 0: P=1, R=2/3, F1=4/5; supports 3 and 3.
  assert r["f1_has0"] == pytest.approx((6 / 7 + 4 / 5) / 2)
  # non0 (index 2 dropped): truth > 0 = [1,0,1,0,0], pred > 0 = [1,0,1,0,1].
  assert r["acc2_non0"] == pytest.approx(4 / 5)
  # Class 1: P=2/3, R=1 -> 0.8; class 0: P=1, R=2/3 -> 0.8.
  assert r["f1_non0"] == pytest.approx(0.8)
  # acc7 rounds [2, -0, 0, 3, -2, 0] vs [3, -1, 0, 3, -2, -0]: 4 hits.
  assert r["acc7"] == pytest.approx(4 / 6)
  # acc5 rounds [2, -0, 0, 2, -2, 0] vs [2, -1, 0, 2, -2, -0]: 5 hits.
  assert r["acc5"] == pytest.approx(5 / 6)
  assert r["mae"] == pytest.approx((0.6 + 0.6 + 0.0 + 0.7 + 0.5 + 0.5) / 6)
  assert r["corr"] == pytest.approx(np.corrcoef(PREDS, LABELS)[0, 1])
  assert set(r) == {"acc2_has0", "f1_has0", "acc2_non0", "f1_non0", "acc5", "acc7", "mae",
                    "corr", "brier", "nll", "entropy", "ece"}
  assert all(type(v) is float for v in r.values())


def test_regression_f1_uses_truth_pred_order():
  r = metrics.regression_metrics(PREDS, LABELS)
  truth, pred = LABELS >= 0, PREDS >= 0
  assert r["f1_has0"] == pytest.approx(f1_score(truth, pred, average="weighted"))
  # The swapped order (an old MMSA bug) gives a different number on this case.
  assert abs(r["f1_has0"] - f1_score(pred, truth, average="weighted")) > 5e-3


def test_regression_calibration_matches_mcur_equations():
  r = metrics.regression_metrics(PREDS, LABELS)
  p = ref_sigmoid(PREDS)
  y = (LABELS >= 0).astype(np.float64)
  assert r["brier"] == pytest.approx(np.mean((p - y) ** 2))  # Eq. 25
  assert r["nll"] == pytest.approx(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))  # Eq. 26
  assert r["entropy"] == pytest.approx(-np.mean(p * np.log(p) + (1 - p) * np.log(1 - p)))
  predicted = PREDS >= 0
  confidence = np.where(predicted, p, 1 - p)
  assert r["ece"] == pytest.approx(ref_ece(confidence, predicted == (y > 0.5)))


def test_regression_sims_binning_hand_computed():
  preds = np.array([0.05, -0.4, 0.0, 1.3, -0.75, 0.1])
  labels = np.array([0.1, -1.0, 0.0, 1.0, -0.6, -0.2])
  r = metrics.regression_metrics(preds, labels, label_range=(-1.0, 1.0))
  # MMSA SIMS 2 classes: (-1.01, 0] -> 0, (0, 1.01] -> 1 (0 is negative here).
  truth2, pred2 = np.array([1, 0, 0, 1, 0, 0]), np.array([1, 0, 0, 1, 0, 1])
  assert r["acc2"] == pytest.approx(5 / 6)
  assert r["f1"] == pytest.approx(f1_score(truth2, pred2, average="weighted"))
  # 3 classes: truth [1,0,1,2,0,0], preds [1,0,1,2,0,1].
  assert r["acc3"] == pytest.approx(5 / 6)
  # 5 classes: truth [2,0,2,4,1,1], preds [2,1,2,4,0,2].
  assert r["acc5"] == pytest.approx(3 / 6)
  # MAE and corr of predictions clipped to [-1, 1] (1.3 -> 1.0), as MMSA.
  assert r["mae"] == pytest.approx((0.05 + 0.6 + 0.0 + 0.0 + 0.15 + 0.3) / 6)
  clipped = np.clip(preds, -1, 1)
  assert r["corr"] == pytest.approx(np.corrcoef(clipped, labels)[0, 1])
  # has0/non0 are still reported (EASE reports both on SIMS); has0 counts 0 as positive.
  assert r["acc2_has0"] == pytest.approx(5 / 6)
  assert r["acc2_non0"] == pytest.approx(4 / 5)
  assert "acc7" not in r
  assert {"acc2", "f1", "acc3", "acc5", "brier", "nll", "entropy", "ece"} <= set(r)


def test_regression_all_zero_labels_make_non0_undefined():
  r = metrics.regression_metrics(np.array([0.3, -0.2, 0.0]), np.zeros(3))
  assert math.isnan(r["acc2_non0"]) and math.isnan(r["f1_non0"])
  assert r["acc2_has0"] == pytest.approx(2 / 3)  # label 0 is non-negative


def test_regression_constant_predictions_give_zero_corr_without_warnings():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    r = metrics.regression_metrics(np.full(5, 0.7), np.array([-1.0, 0.5, 2.0, -0.4, 1.0]))
    constant_labels = metrics.regression_metrics(np.array([0.1, 0.2, 0.3]), np.ones(3))
  assert r["corr"] == 0.0
  assert constant_labels["corr"] == 0.0
  assert all(not math.isnan(v) for v in r.values())


def test_regression_accepts_jax_arrays_and_column_outputs():
  expected = metrics.regression_metrics(PREDS, LABELS)
  got = metrics.regression_metrics(jnp.asarray(PREDS, jnp.float32)[:, None],
                                   jnp.asarray(LABELS, jnp.float32))
  for key in expected:
    assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key


def test_regression_large_outputs_keep_calibration_finite():
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no overflow in exp
    r = metrics.regression_metrics(np.array([800.0, -800.0]), np.array([-1.0, 1.0]))
  # Both confidently wrong: NLL = |z| each, Brier = 1.
  assert r["nll"] == pytest.approx(800.0)
  assert r["brier"] == pytest.approx(1.0)
  assert r["entropy"] == pytest.approx(0.0, abs=1e-12)


def test_regression_is_permutation_invariant():
  perm = np.random.default_rng(0).permutation(len(PREDS))
  a = metrics.regression_metrics(PREDS, LABELS)
  b = metrics.regression_metrics(PREDS[perm], LABELS[perm])
  assert a == pytest.approx(b)


def test_regression_shape_mismatch_raises():
  with pytest.raises(ValueError):
    metrics.regression_metrics(np.zeros(3), np.zeros(4))


# ----------------------------------------------------------------------------- classification


def test_classification_hand_computed_values():
  # argmax of each row: [0, 1, 1, 2, 0, 2]; labels [0, 1, 2, 2, 1, 0].
  logits = np.array([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 1.0, 0.5], [0.0, 0.0, 4.0],
                     [1.0, 0.5, 0.0], [0.0, 0.0, 1.0]])
  labels = np.array([0, 1, 2, 2, 1, 0])
  r = metrics.classification_metrics(logits, labels)
  assert r["war"] == pytest.approx(3 / 6)
  # Recalls: class 0 1/2, class 1 1/2, class 2 1/2.
  assert r["uar"] == pytest.approx(0.5)
  preds = logits.argmax(-1)
  assert r["f1_weighted"] == pytest.approx(f1_score(labels, preds, average="weighted"))
  assert r["f1_macro"] == pytest.approx(f1_score(labels, preds, average="macro"))
  p = ref_softmax(logits)
  onehot = np.eye(3)[labels]
  assert r["brier"] == pytest.approx(np.mean(np.sum((p - onehot) ** 2, axis=1)))
  assert r["nll"] == pytest.approx(-np.mean(np.log(p[np.arange(6), labels])))
  assert r["entropy"] == pytest.approx(np.mean(-np.sum(p * np.log(p), axis=1)))
  assert r["ece"] == pytest.approx(ref_ece(p.max(1), preds == labels))
  assert all(type(v) is float for v in r.values())


def test_classification_ece_hand_computed():
  # Four samples at confidence 0.9 (half right) and two at 0.6 (both right):
  # ECE = 4/6 * |0.5 - 0.9| + 2/6 * |1 - 0.6| = 0.4.
  probs = np.array([[0.9, 0.1]] * 4 + [[0.4, 0.6]] * 2)
  labels = np.array([0, 1, 0, 1, 1, 1])
  r = metrics.classification_metrics(np.log(probs), labels)
  assert r["ece"] == pytest.approx(0.4)
  assert r["war"] == pytest.approx(4 / 6)


def test_classification_absent_classes():
  # K = 4; class 3 is never a label and never predicted; class 2 is predicted, never a label.
  logits = np.array([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0], [0, 2.0, 0, 0],
                     [2.0, 0, 0, 0]])
  labels = np.array([0, 1, 1, 1, 0])
  preds = logits.argmax(-1)
  r = metrics.classification_metrics(logits, labels)
  # Recall over the classes that occur in the truth: class 0 2/2, class 1 2/3.
  assert r["uar"] == pytest.approx((1 + 2 / 3) / 2)
  assert r["uar"] == pytest.approx(recall_score(labels, preds, labels=[0, 1], average="macro"))
  # Macro F1 counts the predicted-but-absent class 2 (F1 0), not the unseen class 3.
  assert r["f1_macro"] == pytest.approx(
      f1_score(labels, preds, labels=[0, 1, 2], average="macro", zero_division=0))
  assert r["f1_weighted"] == pytest.approx(f1_score(labels, preds, average="weighted"))
  assert r["brier"] == pytest.approx(
      np.mean(np.sum((ref_softmax(logits) - np.eye(4)[labels]) ** 2, axis=1)))


def test_classification_invariant_to_relabelling_classes():
  rng = np.random.default_rng(1)
  logits, labels = rng.normal(size=(40, 5)), rng.integers(0, 5, 40)
  perm = rng.permutation(5)
  inverse = np.argsort(perm)
  a = metrics.classification_metrics(logits, labels)
  b = metrics.classification_metrics(logits[:, perm], inverse[labels])
  assert a == pytest.approx(b)


def test_classification_rejects_out_of_range_labels():
  with pytest.raises(ValueError):
    metrics.classification_metrics(np.zeros((2, 3)), np.array([0, 3]))


# ----------------------------------------------------------------------------- multilabel


def test_multilabel_binary_hand_computed_values():
  # Emotion 0 predictions [1, 0, 1, 0] vs [1, 0, 0, 0]; emotion 1 [0, 1, 1, 1] vs [0, 1, 1, 1].
  logits = np.array([[[0.0, 2.0], [1.0, 0.0]], [[1.0, -1.0], [0.0, 3.0]],
                     [[0.0, 0.5], [-1.0, 1.0]], [[2.0, 0.0], [0.0, 0.2]]])
  labels = np.array([[1, 0], [0, 1], [0, 1], [0, 1]])
  r = metrics.multilabel_binary_metrics(logits, labels, names=("happy", "sad"))
  assert r["acc_happy"] == pytest.approx(3 / 4)
  assert r["acc_sad"] == pytest.approx(1.0)
  assert r["acc"] == pytest.approx((3 / 4 + 1) / 2)
  preds = logits.argmax(-1)
  f1_happy = f1_score(labels[:, 0], preds[:, 0], average="weighted")
  assert r["f1_happy"] == pytest.approx(f1_happy)
  assert r["f1_sad"] == pytest.approx(1.0)
  assert r["f1"] == pytest.approx((f1_happy + 1.0) / 2)
  p = ref_softmax(logits)  # (N, K, 2)
  assert r["brier"] == pytest.approx(np.mean((p[..., 1] - labels) ** 2))
  picked = np.take_along_axis(p, labels[..., None], axis=-1)[..., 0]
  assert r["nll"] == pytest.approx(-np.mean(np.log(picked)))
  assert r["entropy"] == pytest.approx(np.mean(-np.sum(p * np.log(p), axis=-1)))
  eces = [ref_ece(p[:, k].max(-1), preds[:, k] == labels[:, k]) for k in range(2)]
  assert r["ece"] == pytest.approx(np.mean(eces))


def test_multilabel_binary_default_names_and_shape_checks():
  rng = np.random.default_rng(2)
  r = metrics.multilabel_binary_metrics(rng.normal(size=(6, 3, 2)), rng.integers(0, 2, (6, 3)))
  assert {"acc_e0", "acc_e1", "acc_e2", "f1_e0", "f1_e1", "f1_e2"} <= set(r)
  with pytest.raises(ValueError):
    metrics.multilabel_binary_metrics(np.zeros((6, 3, 2)), np.zeros((6, 2), int))
  with pytest.raises(ValueError):
    metrics.multilabel_binary_metrics(np.zeros((6, 3, 2)), np.zeros((6, 3), int), names=("a",))


# ----------------------------------------------------------------------------- dispatch


def test_compute_metrics_dispatches_on_task():
  assert metrics.compute_metrics(PREDS, LABELS, "regression") == \
      metrics.regression_metrics(PREDS, LABELS)
  sims = metrics.compute_metrics(PREDS / 3, LABELS / 3, "regression", label_range=(-1.0, 1.0))
  assert "acc3" in sims and "acc7" not in sims
  logits, labels = np.eye(3)[[0, 1, 2, 1]], np.array([0, 1, 2, 2])
  assert metrics.compute_metrics(logits, labels, "classification")["war"] == pytest.approx(0.75)
  ml = metrics.compute_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2), int), "multilabel_binary",
                               names=("x", "y"))
  assert "acc_x" in ml
  with pytest.raises(ValueError):
    metrics.compute_metrics(PREDS, LABELS, "ranking")


def test_metric_tables_are_consistent():
  assert set(metrics.PRIMARY_METRIC) == set(metrics.TASKS)
  assert metrics.PRIMARY_METRIC["regression"] in metrics.regression_metrics(PREDS, LABELS)
  assert {"mae", "nll", "brier", "entropy", "ece"} <= metrics.LOWER_IS_BETTER
  assert not set(metrics.PRIMARY_METRIC.values()) & metrics.LOWER_IS_BETTER


# ----------------------------------------------------------------------------- AUILC


def test_auilc_closed_forms():
  rates = np.linspace(0.0, 1.0, 11)
  assert metrics.auilc(rates, np.full(11, 0.7)) == pytest.approx(0.7)
  # A linear ramp's normalised area is its value at the middle rate.
  assert metrics.auilc(rates, 0.9 - 0.5 * rates) == pytest.approx(0.9 - 0.25)
  sub = np.array([0.2, 0.4, 0.8])
  assert metrics.auilc(sub, 1.0 + 2.0 * sub) == pytest.approx(1.0 + 2.0 * 0.5)
  # Triangle-ish polyline: area 0.5 * 1 + 0.5 * 0.5 over range 1.
  assert metrics.auilc([0.0, 0.5, 1.0], [1.0, 1.0, 0.0]) == pytest.approx(0.75)
  # Unequal spacing: segments (0, 0.1) and (0.1, 1.0).
  assert metrics.auilc([0.0, 0.1, 1.0], [1.0, 0.0, 0.0]) == pytest.approx(0.05)
  assert metrics.auilc([0.3], [0.42]) == pytest.approx(0.42)


def test_auilc_sorts_and_rejects_bad_input():
  rates, values = [0.0, 0.5, 1.0], [1.0, 1.0, 0.0]
  assert metrics.auilc(rates[::-1], values[::-1]) == pytest.approx(0.75)
  assert metrics.auilc(jnp.asarray([1.0, 0.0, 0.5]), jnp.asarray([0.0, 1.0, 1.0])) == \
      pytest.approx(0.75)
  with pytest.raises(ValueError):
    metrics.auilc([0.0, 0.5, 0.5], [1.0, 1.0, 0.0])
  with pytest.raises(ValueError):
    metrics.auilc([], [])
  with pytest.raises(ValueError):
    metrics.auilc([0.0, 1.0], [1.0])


# ----------------------------------------------------------------------------- MCUR Eq. 29-30


def test_lang_dom_gap_eq29():
  scores = {"L": 0.80, "A": 0.50, "V": 0.40, "AV": 0.60, "LA": 0.9, "LV": 0.1, "LAV": 0.95}
  # 0.8 - (0.5 + 0.4 + 0.6) / 3 = 0.3; LA, LV, LAV do not enter.
  assert metrics.lang_dom_gap(scores) == pytest.approx(0.3)
  paper_names = {"L": 0.80, "A": 0.50, "V": 0.40, "A+V": 0.60}
  assert metrics.lang_dom_gap(paper_names) == pytest.approx(0.3)
  results = {name: {"f1_non0": v, "acc2_non0": v / 2} for name, v in scores.items()}
  results["summary"] = {"fixed/f1_non0": 1.0}
  results["MR0.3"] = {"f1_non0": 0.0, "acc2_non0": 0.0}
  assert metrics.lang_dom_gap(results, "f1_non0") == pytest.approx(0.3)
  assert metrics.lang_dom_gap(results, "acc2_non0") == pytest.approx(0.15)
  with pytest.raises(ValueError):
    metrics.lang_dom_gap({"L": 0.8, "A": 0.5, "V": 0.4})


def test_bias_amp_eq30():
  assert metrics.bias_amp(0.2164, 0.3558) == pytest.approx(0.2164 / (0.3558 + 1e-8))
  student = {"L": 0.70, "A": 0.60, "V": 0.55, "AV": 0.65}  # gap 0.1
  teacher = {"L": 0.80, "A": 0.40, "V": 0.40, "AV": 0.40}  # gap 0.4
  assert metrics.bias_amp(student, teacher) == pytest.approx(0.1 / (0.4 + 1e-8))
  nested_s = {k: {"war": v} for k, v in student.items()}
  nested_t = {k: {"war": v} for k, v in teacher.items()}
  assert metrics.bias_amp(nested_s, nested_t, metric="war") == pytest.approx(0.25)
  # The 1e-8 keeps a zero teacher gap finite.
  assert metrics.bias_amp(1e-9, 0.0) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- scenarios


def test_parse_scenario():
  assert metrics.parse_scenario("LA") == ("fixed", "LA", None)
  assert metrics.parse_scenario("LAV") == ("fixed", "LAV", None)
  assert metrics.parse_scenario("MR0.3") == ("random_mr", None, 0.3)
  assert metrics.parse_scenario("frame0.3_LA") == ("frame", "LA", 0.3)
  assert metrics.parse_scenario("frame1.0_V") == ("frame", "V", 1.0)
  assert metrics.parse_scenario("frame0.25_LAV") == ("frame", "LAV", 0.25)
  assert metrics.parse_scenario("noise0.5") == ("noise", None, 0.5)
  assert metrics.parse_scenario("summary") == ("other", "summary", None)
  assert metrics.parse_scenario("frame0.3_AL")[0] == "other"  # not a canonical set name
  assert metrics.parse_scenario("MRx")[0] == "other"


def _row(value):
  return {"acc": value, "f1": value / 2, "brier": 1 - value}


def test_summarize_groups_and_auilc():
  results = {name: _row(0.1 * (i + 1)) for i, name in enumerate(metrics.COMBINATION_NAMES)}
  results["MR0.1"] = _row(0.9)
  results["MR0.5"] = _row(0.5)
  for rate in (0.0, 0.5, 1.0):
    results[f"frame{rate:.1f}_L"] = _row(1.0 - 0.4 * rate)  # linear: AUILC 0.8
  for rate in (0.0, 0.5):
    results[f"frame{rate:.1f}_LAV"] = _row(0.6)  # constant: AUILC 0.6
  results["noise0.5"] = _row(0.3)
  results["summary"] = {"fixed/acc": -1.0}
  results["note"] = "not a metric row"
  s = metrics.summarize(results, "multilabel_binary")

  assert s["fixed/acc"] == pytest.approx(np.mean([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]))
  assert s["incomplete/acc"] == pytest.approx(np.mean([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]))
  assert s["mr/acc"] == pytest.approx(0.7)
  assert s["fixed_mr/acc"] == pytest.approx((2.8 + 1.4) / 9)
  assert s["frame/acc"] == pytest.approx((1.0 + 0.8 + 0.6 + 0.6 + 0.6) / 5)
  assert s["auilc_L/acc"] == pytest.approx(0.8)
  assert s["auilc_LAV/acc"] == pytest.approx(0.6)
  assert s["auilc/acc"] == pytest.approx(0.7)
  assert s["auilc_L/brier"] == pytest.approx(0.2)
  assert s["noise/acc"] == pytest.approx(0.3)
  # Eq. 29 on acc and f1: L=0.1, A=0.2, V=0.3, AV=0.6.
  assert s["lang_dom_gap/acc"] == pytest.approx(0.1 - (0.2 + 0.3 + 0.6) / 3)
  assert s["lang_dom_gap/f1"] == pytest.approx((0.1 - (0.2 + 0.3 + 0.6) / 3) / 2)
  assert "lang_dom_gap/brier" not in s
  assert not any(k.startswith("auilc_LA/") for k in s)
  assert all(type(v) is float for v in s.values())


def test_summarize_only_reports_present_groups():
  fixed_only = {name: {"war": 0.5, "nll": 1.0} for name in metrics.COMBINATION_NAMES}
  s = metrics.summarize(fixed_only, "classification")
  assert s["fixed/war"] == pytest.approx(0.5)
  assert s["lang_dom_gap/war"] == pytest.approx(0.0)
  assert not any(k.split("/")[0] in ("mr", "fixed_mr", "frame", "auilc", "noise") for k in s)
  frames_only = {"frame0.0_A": {"war": 0.9}, "frame1.0_A": {"war": 0.3}}
  s = metrics.summarize(frames_only, "classification")
  assert s == {"frame/war": pytest.approx(0.6), "auilc_A/war": pytest.approx(0.6),
               "auilc/war": pytest.approx(0.6)}
  with pytest.raises(ValueError):
    metrics.summarize(fixed_only, "ranking")


def test_summarize_real_regression_rows():
  rng = np.random.default_rng(3)
  labels = np.round(rng.uniform(-3, 3, 50), 1)
  results = {name: metrics.regression_metrics(labels + rng.normal(0, 0.3 * (i + 1), 50), labels)
             for i, name in enumerate(metrics.COMBINATION_NAMES)}
  s = metrics.summarize(results, "regression")
  primary = metrics.PRIMARY_METRIC["regression"]
  assert s[f"fixed/{primary}"] == pytest.approx(
      np.mean([results[c][primary] for c in metrics.COMBINATION_NAMES]))
  assert {"lang_dom_gap/acc2_non0", "lang_dom_gap/f1_non0", "lang_dom_gap/acc2_has0",
          "lang_dom_gap/f1_has0"} <= set(s)
