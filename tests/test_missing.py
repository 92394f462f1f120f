"""Missing-modality protocols: exact MR, drop frequencies, frame masking, scenarios, jit."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import random_batch, tiny_spec

from mer_jax.config_lib import base_config
from mer_jax.data import missing

# ----------------------------------------------------------------------------- combinations


def test_combination_tables():
  expected = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1],
                       [1, 1, 1]], bool)
  np.testing.assert_array_equal(missing.COMBINATIONS, expected)
  np.testing.assert_array_equal(missing.MASKED_SETS, expected)
  assert missing.COMBINATION_NAMES == ("L", "A", "V", "LA", "LV", "AV", "LAV")
  np.testing.assert_allclose(sum(missing.UNIFORM_DROP), 1.0)
  np.testing.assert_allclose(np.array(missing.CMAD_DROP) * 14, [2, 3, 3, 1, 1, 3, 1])


def test_combination_ids_round_trip_and_empty_mask():
  ids = missing.combination_ids(missing.COMBINATIONS)
  np.testing.assert_array_equal(ids, np.arange(7))
  masks = jnp.asarray(missing.COMBINATIONS)[jnp.array([6, 0, 3, 5, 5])]
  np.testing.assert_array_equal(missing.combination_ids(masks), [6, 0, 3, 5, 5])
  assert int(missing.combination_ids(np.zeros((1, 3), bool))[0]) == -1


@pytest.mark.parametrize("combination", [0, 4, "AV", "LAV"])
def test_fixed_modality_mask(combination):
  mask = missing.fixed_modality_mask(5, combination)
  chex.assert_shape(mask, (5, 3))
  name = combination if isinstance(combination, str) else missing.COMBINATION_NAMES[combination]
  expected = np.array(["LAV"[m] in name for m in range(3)])
  np.testing.assert_array_equal(mask, np.tile(expected, (5, 1)))
  with pytest.raises(ValueError, match="unknown combination"):
    missing.fixed_modality_mask(2, "LX")


# ----------------------------------------------------------------------------- random MR


def _masks_over_keys(num_samples, rate, num_keys, num_modalities=3):
  draw = jax.jit(jax.vmap(functools.partial(missing.random_modality_mask,
                                            num_samples=num_samples, missing_rate=rate,
                                            num_modalities=num_modalities)))
  return np.asarray(draw(jax.random.split(jax.random.key(123), num_keys)))


@pytest.mark.parametrize("num_samples,rate", [(1, 0.5), (10, 0.1), (10, 0.5), (33, 0.3),
                                              (100, 0.6), (257, 0.2), (50, 2 / 3)])
def test_random_mr_exact_count_and_at_least_one(num_samples, rate):
  for mask in _masks_over_keys(num_samples, rate, num_keys=3):
    assert mask.shape == (num_samples, 3) and mask.dtype == bool
    assert (~mask).sum() == min(round(rate * num_samples * 3), 2 * num_samples)
    assert mask.any(axis=1).all()
    # The definition of SPEC section 5: MR = 1 - sum(a_i) / (N * m).
    np.testing.assert_allclose(1 - mask.sum() / (num_samples * 3),
                               round(rate * num_samples * 3) / (num_samples * 3))


def test_random_mr_cap_and_range():
  # MCUR's MR0.7 exceeds (m-1)/m = 2/3: capped, every sample keeps exactly one modality.
  mask = np.asarray(missing.random_modality_mask(jax.random.key(0), 40, 0.7))
  np.testing.assert_array_equal(mask.sum(axis=1), np.ones(40))
  mask = np.asarray(missing.random_modality_mask(jax.random.key(0), 40, 1.0))
  np.testing.assert_array_equal(mask.sum(axis=1), np.ones(40))
  assert np.asarray(missing.random_modality_mask(jax.random.key(0), 40, 0.0)).all()
  for bad in (-0.1, 1.5):
    with pytest.raises(ValueError, match="missing_rate"):
      missing.random_modality_mask(jax.random.key(0), 4, bad)
  # Two modalities: at most half the slots.
  mask = np.asarray(missing.random_modality_mask(jax.random.key(1), 9, 0.9, num_modalities=2))
  np.testing.assert_array_equal(mask.sum(axis=1), np.ones(9))


def test_random_mr_slot_marginals_are_uniform():
  masks = _masks_over_keys(num_samples=6, rate=0.5, num_keys=6000)
  frequency = (~masks).mean(axis=0)
  # k / (N M) = 9 / 18; binomial sd over 6000 draws ~ 0.0065.
  np.testing.assert_allclose(frequency, np.full((6, 3), 0.5), atol=0.03)


def test_random_mr_uniform_over_valid_assignments():
  # N=2, M=3, k=2: all C(6, 2) = 15 slot pairs are valid and must be equally likely
  # (a "keep one random slot per sample, then take k" sampler would give the 6 pairs
  # inside one sample only 1/3 in total instead of 6/15).
  num_keys = 15000
  masks = _masks_over_keys(num_samples=2, rate=1 / 3, num_keys=num_keys)
  flat = (~masks).reshape(num_keys, 6)
  assert (flat.sum(axis=1) == 2).all()
  subsets = list(itertools.combinations(range(6), 2))
  codes = {sum(1 << s for s in subset): i for i, subset in enumerate(subsets)}
  observed = np.bincount([codes[int(c)] for c in flat @ (1 << np.arange(6))],
                         minlength=len(subsets))
  expected = num_keys / len(subsets)
  chi2 = ((observed - expected) ** 2 / expected).sum()
  assert chi2 < 36.1, (chi2, observed)  # df = 14, p = 0.001
  same_sample = sum(observed[i] for i, (a, b) in enumerate(subsets) if a // 3 == b // 3)
  np.testing.assert_allclose(same_sample / num_keys, 6 / 15, atol=0.02)


def test_random_mr_uniform_with_excluded_assignments():
  # N=3, k=5: C(9, 5) = 126 sets minus those emptying a sample (3 * C(6, 2) = 45) = 81.
  num_keys = 16000
  masks = _masks_over_keys(num_samples=3, rate=5 / 9, num_keys=num_keys)
  assert masks.any(axis=2).all()
  valid = [s for s in itertools.combinations(range(9), 5)
           if all(not {3 * i, 3 * i + 1, 3 * i + 2} <= set(s) for i in range(3))]
  assert len(valid) == 81
  codes = {sum(1 << s for s in subset): i for i, subset in enumerate(valid)}
  flat = (~masks).reshape(num_keys, 9)
  observed = np.bincount([codes[int(c)] for c in flat @ (1 << np.arange(9))],
                         minlength=len(valid))
  expected = num_keys / len(valid)
  chi2 = ((observed - expected) ** 2 / expected).sum()
  assert chi2 < 124.8, chi2  # df = 80, p = 0.001


# ----------------------------------------------------------------------------- training drop


@pytest.mark.parametrize("probs", [missing.UNIFORM_DROP, missing.CMAD_DROP])
def test_training_drop_frequencies(probs):
  num = 20000
  mask, ids = jax.jit(missing.training_drop_mask, static_argnums=1)(jax.random.key(3), num,
                                                                   jnp.asarray(probs))
  chex.assert_shape(mask, (num, 3))
  chex.assert_type(ids, jnp.int32)
  np.testing.assert_array_equal(mask, missing.COMBINATIONS[np.asarray(ids)])
  observed = np.bincount(np.asarray(ids), minlength=7)
  expected = num * np.asarray(probs)
  chi2 = ((observed - expected) ** 2 / expected).sum()
  assert chi2 < 22.46, (chi2, observed, expected)  # df = 6, p = 0.001


def test_training_drop_zero_probability_never_drawn():
  _, ids = missing.training_drop_mask(jax.random.key(0), 2000, (0, 0, 0, 1, 0, 0, 1))
  assert set(np.unique(np.asarray(ids))) == {3, 6}
  with pytest.raises(ValueError, match="shape"):
    missing.training_drop_mask(jax.random.key(0), 4, (0.5, 0.5))


# ----------------------------------------------------------------------------- apply masks


def test_apply_modality_mask_zeroes_only_absent():
  batch = random_batch(tiny_spec(), batch_size=4, seed=1)
  modality_mask = np.array([[1, 1, 1], [0, 1, 0], [1, 0, 1], [0, 0, 1]], bool)
  out = jax.jit(missing.apply_modality_mask)(batch, modality_mask)
  for index, name in enumerate(("text", "audio", "vision")):
    for row in range(4):
      if modality_mask[row, index]:
        np.testing.assert_array_equal(out[name][row], batch[name][row])
        np.testing.assert_array_equal(out[f"{name}_mask"][row], batch[f"{name}_mask"][row])
      else:
        assert not np.asarray(out[name][row]).any()
        assert not np.asarray(out[f"{name}_mask"][row]).any()
    assert out[name].dtype == jnp.float32
  np.testing.assert_array_equal(out["modality_mask"], modality_mask)
  assert "modality_mask" not in batch  # the input dict is untouched
  # An existing modality_mask is AND-ed.
  again = missing.apply_modality_mask(out, np.array([[0, 1, 1]] * 4, bool))
  np.testing.assert_array_equal(again["modality_mask"], modality_mask & [False, True, True])
  np.testing.assert_array_equal(again["label"], batch["label"])


def _long_batch(batch_size=64, seed=0):
  spec = tiny_spec(lengths=(40, 30, 20), dims=(3, 2, 2))
  rng = np.random.default_rng(seed)
  real = [rng.integers(5, length + 1, batch_size) for length in spec.lengths]
  return random_batch(spec, batch_size=batch_size, seed=seed, real_lengths=real)


def test_frame_drop_random_rate_and_padding():
  mask = _long_batch()["text_mask"]
  for rate in (0.0, 0.3, 0.8, 1.0):
    drops = []
    for seed in range(5):
      new = np.asarray(jax.jit(missing.frame_drop)(jax.random.key(seed), mask, rate))
      assert not (new & ~mask).any()  # padding never becomes real
      drops.append(1 - new.sum() / mask.sum())
    np.testing.assert_allclose(np.mean(drops), rate, atol=0.03)
  # Per-sample rates: rows with rate 0 untouched, rows with rate 1 emptied.
  rates = np.tile([0.0, 1.0], 32)
  new = np.asarray(missing.frame_drop(jax.random.key(0), mask, rates))
  np.testing.assert_array_equal(new[::2], mask[::2])
  assert not new[1::2].any()


def test_frame_drop_span_is_consecutive_with_right_length():
  mask = _long_batch()["audio_mask"]
  num_real = mask.sum(axis=1)
  starts = []
  for rate in (0.25, 0.5, 1.0):
    rates = np.full(64, rate, np.float32)
    for seed in range(4):
      new = np.asarray(missing.frame_drop(jax.random.key(seed), mask, rates, mode="span"))
      assert not (new & ~mask).any()
      dropped = mask & ~new
      expected_length = np.round(rate * num_real)
      np.testing.assert_array_equal(dropped.sum(axis=1), expected_length)
      for row in range(64):
        positions = np.flatnonzero(dropped[row])
        if len(positions):
          np.testing.assert_array_equal(np.diff(positions), 1)
          assert positions[-1] < num_real[row]
          if rate == 0.25 and row == 0:
            starts.append(positions[0])
  assert len(set(starts)) > 1  # the start is random
  with pytest.raises(ValueError, match="mode"):
    missing.frame_drop(jax.random.key(0), mask, 0.5, mode="block")


def _replaced_frames(before, after):
  """(B, T) bool: real frames whose features the protocol changed (the synthetic
  features are N(0, 1), so a dropped frame is never left as it was)."""
  return (np.asarray(after) != np.asarray(before)).any(axis=-1)


@pytest.mark.parametrize("flag_dropped", [False, True])
@pytest.mark.parametrize("fill", ["zero", "normal"])
def test_apply_frame_masking_fill_masks_and_padding(fill, flag_dropped):
  batch = _long_batch(32)
  rates = np.array([0.5, 0.0, 1.0], np.float32)
  out = jax.jit(functools.partial(missing.apply_frame_masking, fill=fill,
                                  flag_dropped=flag_dropped))(jax.random.key(1), batch, rates)
  # Audio (rate 0) untouched.
  np.testing.assert_array_equal(out["audio"], batch["audio"])
  np.testing.assert_array_equal(out["audio_mask"], batch["audio_mask"])
  # The same draw whatever flag_dropped: it only decides what the masks say.
  reference = missing.apply_frame_masking(jax.random.key(1), batch, rates, fill=fill)
  np.testing.assert_array_equal(out["text"], reference["text"])
  dropped = _replaced_frames(batch["text"], out["text"])
  assert not (dropped & ~batch["text_mask"]).any()  # padding is never touched
  real = batch["text_mask"].sum()
  assert 0.4 < dropped.sum() / real < 0.6
  padding = ~batch["text_mask"]
  np.testing.assert_array_equal(np.asarray(out["text"])[padding], batch["text"][padding])
  kept = batch["text_mask"] & ~dropped
  np.testing.assert_array_equal(np.asarray(out["text"])[kept], batch["text"][kept])
  # Vision at rate 1: every real frame replaced.
  np.testing.assert_array_equal(_replaced_frames(batch["vision"], out["vision"]),
                                batch["vision_mask"])
  replaced = np.asarray(out["text"])[dropped]
  if fill == "zero":
    assert not replaced.any()
  else:
    assert abs(replaced.mean()) < 0.15 and abs(replaced.std() - 1.0) < 0.1
  if flag_dropped:  # dropped frames are masked out like padding
    np.testing.assert_array_equal(out["text_mask"], kept)
    assert not np.asarray(out["vision_mask"]).any()
  else:  # LNLN/DQF: the masks keep marking only padding
    for name in ("text", "audio", "vision"):
      np.testing.assert_array_equal(out[f"{name}_mask"], batch[f"{name}_mask"])
  assert missing.DROPPED_TEXT not in out  # no token ids in this batch
  with pytest.raises(ValueError, match="fill"):
    missing.apply_frame_masking(jax.random.key(0), batch, rates, fill="mean")


def test_apply_frame_masking_records_dropped_tokens_when_the_batch_has_ids():
  batch = _long_batch(16)
  batch["text_ids"] = np.where(batch["text_mask"], 1000, 0).astype(np.int32)
  out = missing.apply_frame_masking(jax.random.key(2), batch, np.array([0.5, 0.0, 0.0]))
  dropped = np.asarray(out[missing.DROPPED_TEXT])
  np.testing.assert_array_equal(dropped, _replaced_frames(batch["text"], out["text"]))
  np.testing.assert_array_equal(out["text_ids"], batch["text_ids"])
  np.testing.assert_array_equal(out["text_mask"], batch["text_mask"])
  # A second protocol adds its drops to the record.
  again = missing.apply_frame_masking(jax.random.key(3), out, np.array([0.5, 0.0, 0.0]))
  assert (np.asarray(again[missing.DROPPED_TEXT]) >= dropped).all()
  assert np.asarray(again[missing.DROPPED_TEXT]).sum() > dropped.sum()


def test_apply_frame_masking_per_sample_rates():
  batch = _long_batch(8)
  rates = np.zeros((8, 3), np.float32)
  rates[3] = 1.0
  for flag_dropped in (False, True):
    out = missing.apply_frame_masking(jax.random.key(0), batch, rates,
                                      flag_dropped=flag_dropped)
    for name in ("text", "audio", "vision"):
      replaced = _replaced_frames(batch[name], out[name])
      np.testing.assert_array_equal(np.delete(replaced, 3, axis=0), False)
      np.testing.assert_array_equal(replaced[3], batch[f"{name}_mask"][3])
      expected = batch[f"{name}_mask"] & ~replaced if flag_dropped else batch[f"{name}_mask"]
      np.testing.assert_array_equal(out[f"{name}_mask"], expected)


def test_lnln_frame_rates():
  rates = np.asarray(jax.jit(missing.lnln_frame_rates, static_argnums=1)(jax.random.key(0), 64))
  chex.assert_shape(rates, (64, 3))
  assert ((rates >= 0) & (rates < 1)).all()
  # Per modality, exactly half the samples keep r = 0, chosen independently per modality.
  np.testing.assert_array_equal((rates == 0).sum(axis=0), [32, 32, 32])
  assert not ((rates[:, 0] == 0) == (rates[:, 1] == 0)).all()
  nonzero = rates[rates > 0]
  np.testing.assert_allclose(nonzero.mean(), 0.5, atol=0.08)
  odd = np.asarray(missing.lnln_frame_rates(jax.random.key(1), 5))
  np.testing.assert_array_equal((odd == 0).sum(axis=0), [2, 2, 2])


def test_dqf_frame_rates():
  draws = np.asarray(jax.vmap(missing.dqf_frame_rates)(jax.random.split(jax.random.key(0),
                                                                        2000)))
  chex.assert_shape(draws, (2000, 3))
  assert ((draws >= 0) & (draws < 1)).all()
  np.testing.assert_allclose(draws.mean(axis=0), 0.5, atol=0.03)
  np.testing.assert_allclose(draws.var(axis=0), 1 / 12, atol=0.01)


def test_add_noise_only_present_real_frames():
  batch = missing.apply_modality_mask(random_batch(tiny_spec(), batch_size=6, seed=2),
                                      np.array([[1, 1, 1], [1, 0, 1]] * 3, bool))
  out = jax.jit(missing.add_noise)(jax.random.key(0), batch, 2.0)
  for index, name in enumerate(("text", "audio", "vision")):
    real = np.asarray(batch[f"{name}_mask"]) & np.asarray(batch["modality_mask"])[:, [index]]
    delta = np.asarray(out[name]) - np.asarray(batch[name])
    assert not delta[~real].any()
    if real.any():
      np.testing.assert_allclose(delta[real].std(), 2.0, rtol=0.3)
  zero = missing.add_noise(jax.random.key(0), batch, 0.0)
  chex.assert_trees_all_close(zero, batch)


# ----------------------------------------------------------------------------- training protocol


@pytest.mark.parametrize("kind", missing.TRAINING_KINDS)
def test_apply_training_protocol_kinds(kind):
  config = base_config().missing
  config.kind = kind
  config.probs = missing.CMAD_DROP
  config.missing_rate = 0.5
  config.noise_intensity = 1.0
  batch = _long_batch(16)
  step = jax.jit(lambda key, b: missing.apply_training_protocol(key, b, config))
  out, ids = step(jax.random.key(0), batch)
  chex.assert_shape(ids, (16,))
  chex.assert_shape(out["modality_mask"], (16, 3))
  np.testing.assert_array_equal(ids, missing.combination_ids(out["modality_mask"]))
  if kind in ("drop", "random_mr"):
    assert (np.asarray(ids) != 6).any()
    for index, name in enumerate(("text", "audio", "vision")):
      absent = ~np.asarray(out["modality_mask"])[:, index]
      assert not np.asarray(out[name])[absent].any()
  else:
    np.testing.assert_array_equal(ids, np.full(16, 6))
  if kind == "random_mr":
    assert (~np.asarray(out["modality_mask"])).sum() == 24
  if kind == "none":
    chex.assert_trees_all_equal({k: out[k] for k in batch}, batch)
  if kind.startswith("frame"):
    dropped = sum(_replaced_frames(batch[n], out[n]).sum() for n in ("text", "audio", "vision"))
    assert dropped > 0
    for name in ("text", "audio", "vision"):  # unflagged by default
      np.testing.assert_array_equal(out[f"{name}_mask"], batch[f"{name}_mask"])
    config.flag_dropped_frames = True
    flagged, _ = jax.jit(lambda key, b: missing.apply_training_protocol(key, b, config))(
        jax.random.key(0), batch)
    for name in ("text", "audio", "vision"):
      np.testing.assert_array_equal(
          flagged[f"{name}_mask"], batch[f"{name}_mask"] & ~_replaced_frames(batch[name],
                                                                           out[name]))
  if kind == "noise":
    assert not np.allclose(out["text"], batch["text"])


def test_apply_training_protocol_plain_dict_and_unknown_kind():
  batch = _long_batch(4)
  out, ids = missing.apply_training_protocol(jax.random.key(0), batch,
                                             ml_collections.ConfigDict({"kind": "frame_dqf"}))
  np.testing.assert_array_equal(ids, np.full(4, 6))
  with pytest.raises(ValueError, match=r"config\.missing\.kind.*frame_lnln"):
    missing.apply_training_protocol(jax.random.key(0), batch, {"kind": "dropout"})


# ----------------------------------------------------------------------------- evaluation


def test_eval_scenario_names_for_default_config():
  scenarios = missing.eval_scenarios(base_config().eval)
  names = [s.name for s in scenarios]
  expected = ["L", "A", "V", "LA", "LV", "AV", "LAV"]
  expected += [f"MR0.{i}" for i in range(1, 8)]
  rates = ["0.0", "0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9", "1.0"]
  for masked in ["L", "A", "V", "LA", "LV", "AV", "LAV"]:
    expected += [f"frame{r}_{masked}" for r in rates if not (masked == "LAV" and r == "1.0")]
  assert names == expected
  assert len(set(names)) == len(names) == 7 + 7 + 76
  by_name = {s.name: s for s in scenarios}
  assert by_name["frame0.3_LA"] == missing.Scenario("frame0.3_LA", "frame", 3, 0.3)
  assert by_name["LV"].kind == "fixed" and by_name["LV"].combination == 4
  assert by_name["MR0.7"].rate == 0.7
  hash(by_name["MR0.7"])


def test_eval_scenarios_defaults_and_noise():
  scenarios = missing.eval_scenarios({"fixed": False, "noise_intensities": [0.5, 20],
                                      "frame_rates": [0.5, 1.0], "frame_sets": ["LAV"]})
  assert [s.name for s in scenarios] == ["frame0.5_LAV", "noise0.5", "noise20.0"]
  assert scenarios[-1].kind == "noise" and scenarios[-1].rate == 20.0
  assert len(missing.eval_scenarios({})) == 7
  flagged = missing.eval_scenarios({"fixed": False, "frame_rates": [0.5]}, flag_dropped=True)
  assert flagged and all(s.flag_dropped for s in flagged)


def test_apply_scenario_random_mr_independent_of_batch_size():
  num_rows = 16
  split = _long_batch(num_rows)
  scenario = missing.Scenario("MR0.4", "random_mr", rate=0.4)
  run = jax.jit(missing.apply_scenario, static_argnames=("scenario", "num_samples"))
  key = jax.random.key(7)
  masks = {}
  for batch_size in (4, 8):
    chunks = []
    for start in range(0, num_rows, batch_size):
      rows = np.arange(start, start + batch_size)
      batch = {k: v[rows] for k, v in split.items()}
      chunks.append(np.asarray(run(key, batch, scenario=scenario, sample_index=rows,
                                   num_samples=num_rows)["modality_mask"]))
    masks[batch_size] = np.concatenate(chunks)
  np.testing.assert_array_equal(masks[4], masks[8])
  assert (~masks[4]).sum() == round(0.4 * num_rows * 3)
  np.testing.assert_array_equal(masks[4],
                                missing.random_modality_mask(key, num_rows, 0.4))


def test_apply_scenario_fixed_frame_noise():
  batch = _long_batch(8)
  run = jax.jit(missing.apply_scenario, static_argnames="scenario")
  key = jax.random.key(0)
  out = run(key, batch, missing.Scenario("LV", "fixed", 4))
  np.testing.assert_array_equal(out["modality_mask"], np.tile([True, False, True], (8, 1)))
  assert not np.asarray(out["audio"]).any()
  out = run(key, batch, missing.Scenario("frame1.0_AV", "frame", 5, 1.0))
  for name in ("text", "audio", "vision"):
    np.testing.assert_array_equal(out[f"{name}_mask"], batch[f"{name}_mask"])
  np.testing.assert_array_equal(out["text"], batch["text"])
  assert not np.asarray(out["audio"]).any() and not np.asarray(out["vision"]).any()
  assert np.asarray(out["modality_mask"]).all()
  out = run(key, batch, missing.Scenario("frame1.0_AV", "frame", 5, 1.0, flag_dropped=True))
  np.testing.assert_array_equal(out["text_mask"], batch["text_mask"])
  assert not np.asarray(out["audio_mask"]).any() and not np.asarray(out["vision_mask"]).any()
  out = run(key, batch, missing.Scenario("noise1.0", "noise", rate=1.0))
  assert not np.allclose(out["vision"], batch["vision"])
  np.testing.assert_array_equal(out["vision_mask"], batch["vision_mask"])
