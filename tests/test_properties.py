"""Property tests (hypothesis): missing-modality protocols and metrics over random shapes,
rates and labels, degenerate cases included (batch size 1, a single class, all labels 0,
every frame of a modality padded). Each returns a defined value or a documented error,
never an unexplained NaN. Shapes come from small sets so that few programs compile."""

import math

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mer_jax import metrics
from mer_jax.data import missing

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**31 - 1)
rates = st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(0.0, 1.0))
# The protocols run jitted, as in the training and evaluation steps (one compile per
# static configuration instead of one per eager op).
random_modality_mask = jax.jit(missing.random_modality_mask, static_argnums=(1, 2))
training_drop_mask = jax.jit(missing.training_drop_mask, static_argnums=(1,))
apply_frame_masking = jax.jit(missing.apply_frame_masking,
                              static_argnames=("mode", "fill", "flag_dropped"))


# ----------------------------------------------------------------------------- protocols


@SETTINGS
@given(seed=seeds, num_samples=st.sampled_from([1, 2, 7]),
       rate=st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 1.0]))
@pytest.mark.slow
def test_random_modality_mask_has_the_exact_rate_and_keeps_a_modality(seed, num_samples, rate):
  mask = np.asarray(random_modality_mask(jax.random.key(seed), num_samples, rate))
  assert mask.shape == (num_samples, 3) and mask.dtype == bool
  assert mask.any(axis=1).all()  # every sample keeps at least one modality
  # round(MR * N * M) missing slots, at most N * (M - 1) (Python rounds half to even).
  assert (~mask).sum() == min(round(rate * num_samples * 3), 2 * num_samples)


@SETTINGS
@given(num_samples=st.integers(1, 12), rate=st.one_of(st.floats(-10, -1e-9),
                                                     st.floats(1 + 1e-9, 10)))
def test_random_modality_mask_rejects_rates_outside_0_1(num_samples, rate):
  with pytest.raises(ValueError, match="missing_rate must be in"):
    missing.random_modality_mask(jax.random.key(0), num_samples, rate)


@SETTINGS
@given(seed=seeds, num_samples=st.sampled_from([1, 5]),
       weights=st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0]), min_size=7, max_size=7).filter(
           lambda w: sum(w) > 0))
def test_training_drop_draws_only_allowed_combinations(seed, num_samples, weights):
  mask, ids = training_drop_mask(jax.random.key(seed), num_samples, np.float32(weights))
  mask, ids = np.asarray(mask), np.asarray(ids)
  assert ids.shape == (num_samples,)
  assert all(weights[i] > 0 for i in ids)
  np.testing.assert_array_equal(mask, missing.COMBINATIONS[ids])
  np.testing.assert_array_equal(np.asarray(missing.combination_ids(mask)), ids)


@st.composite
def frame_batches(draw):
  """A batch of 1 or 3 samples; modalities of 1 or 4 frames of width 2; some modality
  may have every frame padded."""
  batch_size = draw(st.sampled_from([1, 3]))
  rng = np.random.default_rng(draw(seeds))
  batch = {}
  lengths_per_modality = draw(st.sampled_from([(1, 4, 4), (4, 4, 1)]))
  for name, length in zip(("text", "audio", "vision"), lengths_per_modality, strict=True):
    lengths = rng.integers(0, length + 1, batch_size)
    if draw(st.booleans()):
      lengths[:] = 0  # every frame padded
    mask = np.arange(length)[None] < lengths[:, None]
    batch[name] = np.where(mask[..., None], rng.normal(size=(batch_size, length, 2)),
                           0.0).astype(np.float32)
    batch[f"{name}_mask"] = mask
  return batch


@SETTINGS
@given(batch=frame_batches(), seed=seeds, frame_rates=st.tuples(rates, rates, rates),
       mode=st.sampled_from(missing.FRAME_MODES), fill=st.sampled_from(missing.FILLS))
@pytest.mark.slow
def test_frame_masking_only_drops_real_frames(batch, seed, frame_rates, mode, fill):
  key, rates = jax.random.key(seed), np.float32(frame_rates)
  # One key drops the same frames in both variants: the flagged one marks them in the
  # masks, the default (LNLN/DQF) replaces them and keeps the masks as they were.
  flagged = apply_frame_masking(key, batch, rates, mode=mode, fill=fill, flag_dropped=True)
  kept_masks = apply_frame_masking(key, batch, rates, mode=mode, fill=fill)
  for index, name in enumerate(("text", "audio", "vision")):
    old_mask, new_mask = batch[f"{name}_mask"], np.asarray(flagged[f"{name}_mask"])
    features = np.asarray(flagged[name])
    assert np.isfinite(features).all()
    assert not (new_mask & ~old_mask).any()  # padding never becomes real
    np.testing.assert_array_equal(np.asarray(kept_masks[f"{name}_mask"]), old_mask)
    np.testing.assert_array_equal(np.asarray(kept_masks[name]), features)
    kept = new_mask[..., None] | ~old_mask[..., None]
    np.testing.assert_array_equal(np.where(kept, features, 0), np.where(kept, batch[name], 0))
    dropped = old_mask & ~new_mask
    if fill == "zero":
      assert (features[dropped] == 0).all()
    rate = np.float32(frame_rates[index])
    if rate == 0:
      np.testing.assert_array_equal(new_mask, old_mask)
    num_real = old_mask.sum(axis=1)
    if mode == "span":  # round(r * n_real) consecutive real frames, half to even
      span = np.round(rate * num_real.astype(np.float32))  # float32, as the protocol
      np.testing.assert_array_equal(dropped.sum(axis=1), span)
      for row in dropped:
        positions = np.flatnonzero(row)
        assert len(positions) == 0 or positions[-1] - positions[0] + 1 == len(positions)
    elif rate == 1:
      assert not new_mask.any()


@SETTINGS
@given(batch=frame_batches(), combination=st.integers(0, 6), seed=seeds)
def test_modality_mask_zeroes_absent_modalities(batch, combination, seed):
  del seed
  modality_mask = missing.fixed_modality_mask(batch["text"].shape[0], combination)
  out = missing.apply_modality_mask(batch, modality_mask)
  for index, name in enumerate(("text", "audio", "vision")):
    if missing.COMBINATIONS[combination][index]:
      np.testing.assert_array_equal(out[name], batch[name])
      np.testing.assert_array_equal(out[f"{name}_mask"], batch[f"{name}_mask"])
    else:
      assert not np.asarray(out[name]).any() and not np.asarray(out[f"{name}_mask"]).any()
  assert (np.asarray(missing.combination_ids(out["modality_mask"])) == combination).all()
  assert (np.asarray(missing.combination_ids(np.zeros((2, 3), bool))) == -1).all()


@SETTINGS
@given(seed=seeds, batch_size=st.sampled_from([1, 2, 5]))
def test_lnln_rates_keep_half_of_the_samples_intact(seed, batch_size):
  frame_rates = np.asarray(missing.lnln_frame_rates(jax.random.key(seed), batch_size))
  assert frame_rates.shape == (batch_size, 3)
  assert ((frame_rates >= 0) & (frame_rates < 1)).all()
  assert ((frame_rates == 0).sum(axis=0) >= batch_size // 2).all()


# ----------------------------------------------------------------------------- metrics

# Sentiment labels on the MMSA grid (thirds in [-3, 3]), with zeros likely.
sentiment = st.sampled_from(np.round(np.linspace(-3, 3, 19), 4).tolist() + [0.0] * 4)
predictions = st.floats(-4, 4, allow_nan=False, width=32)


@SETTINGS
@given(data=st.data(), num=st.integers(1, 16), sims=st.booleans())
def test_regression_metrics_are_defined(data, num, sims):
  labels = np.array(data.draw(st.one_of(
      st.lists(sentiment, min_size=num, max_size=num),
      st.just([0.0] * num),  # every label 0: the non-0 metrics are undefined
      st.lists(st.just(2.0), min_size=num, max_size=num))))  # one class
  preds = np.array(data.draw(st.lists(predictions, min_size=num, max_size=num)))
  if sims:
    labels, preds = labels / 3, preds / 3
  result = metrics.regression_metrics(preds, labels,
                                      label_range=(-1.0, 1.0) if sims else (-3.0, 3.0))
  undefined = {"acc2_non0", "f1_non0"} if not (labels != 0).any() else set()
  for name, value in result.items():
    assert isinstance(value, float)
    # Documented: acc2_non0 / f1_non0 are NaN exactly when no label is non-zero.
    assert math.isnan(value) == (name in undefined), (name, value)
  for name in ("acc2_has0", "f1_has0", "acc2_non0", "f1_non0", "acc5", "acc7", "acc3", "ece"):
    if name in result and name not in undefined:
      assert 0.0 <= result[name] <= 1.0, name
  assert -1.0 <= result["corr"] <= 1.0
  reference = np.clip(preds, -1, 1) - np.clip(labels, -1, 1) if sims else preds - labels
  assert result["mae"] == pytest.approx(np.mean(np.abs(reference)))
  assert result["acc2_has0"] == pytest.approx(np.mean((preds >= 0) == (labels >= 0)))


@SETTINGS
@given(data=st.data(), num=st.integers(1, 12), num_classes=st.integers(2, 5),
       scale=st.sampled_from([1.0, 1e4]))
def test_classification_metrics_are_defined(data, num, num_classes, scale):
  labels = np.array(data.draw(st.one_of(
      st.lists(st.integers(0, num_classes - 1), min_size=num, max_size=num),
      st.lists(st.just(num_classes - 1), min_size=num, max_size=num))))  # a single class
  logits = scale * np.random.default_rng(data.draw(seeds)).normal(size=(num, num_classes))
  result = metrics.classification_metrics(logits, labels)
  assert all(isinstance(v, float) and math.isfinite(v) for v in result.values()), result
  assert result["war"] == pytest.approx(np.mean(logits.argmax(1) == labels))
  for name in ("war", "uar", "f1_weighted", "f1_macro", "ece"):
    assert 0.0 <= result[name] <= 1.0
  assert 0.0 <= result["brier"] <= 2.0 and result["nll"] >= 0
  assert result["entropy"] <= math.log(num_classes) + 1e-9


@SETTINGS
@given(data=st.data(), num=st.integers(1, 10), num_emotions=st.integers(1, 4))
def test_multilabel_metrics_are_defined(data, num, num_emotions):
  labels = np.array(data.draw(st.one_of(
      st.lists(st.lists(st.integers(0, 1), min_size=num_emotions, max_size=num_emotions),
               min_size=num, max_size=num),
      st.just([[0] * num_emotions] * num))))  # no emotion present anywhere
  logits = np.random.default_rng(data.draw(seeds)).normal(size=(num, num_emotions, 2))
  result = metrics.multilabel_binary_metrics(logits, labels)
  assert all(math.isfinite(v) for v in result.values()), result
  accuracy = (logits.argmax(-1) == labels).mean(axis=0)
  assert result["acc"] == pytest.approx(accuracy.mean())


@SETTINGS
@given(data=st.data(), num=st.integers(1, 8))
def test_auilc_is_a_weighted_mean_of_the_values(data, num):
  grid = st.sampled_from([round(0.05 * i, 2) for i in range(21)])
  points = data.draw(st.lists(grid, min_size=num, max_size=num, unique=True))
  values = data.draw(st.lists(st.floats(-5, 5), min_size=num, max_size=num))
  area = metrics.auilc(points, values)
  assert math.isfinite(area)
  assert min(values) - 1e-9 <= area <= max(values) + 1e-9
  assert metrics.auilc(points, [values[0]] * num) == pytest.approx(values[0])
  if num > 1:
    with pytest.raises(ValueError, match="repeated rates"):
      metrics.auilc(points + points[:1], values + values[:1])


@pytest.mark.parametrize("call", [
    lambda: metrics.regression_metrics(np.zeros(0), np.zeros(0)),
    lambda: metrics.classification_metrics(np.zeros((2, 3)), np.array([0, 3])),
    lambda: metrics.multilabel_binary_metrics(np.zeros((2, 2, 3)), np.zeros((2, 2))),
    lambda: metrics.auilc([], []),
])
def test_degenerate_metric_inputs_are_documented_errors(call):
  with pytest.raises(ValueError):
    call()
