"""Missing-modality protocols (SPEC section 5), computed in JAX inside compiled steps.

Modality-level protocols produce a `modality_mask` (B, 3) (True = present, order L, A,
V) and `apply_modality_mask` zeroes the absent modalities; frame-level protocols drop
frames of the present modalities (`frame_drop`, `apply_frame_masking`); `add_noise`
perturbs present real frames. `apply_training_protocol` dispatches on `config.missing`
and `eval_scenarios` / `apply_scenario` define and run the evaluation protocols.

Every function is jit- and vmap-compatible. Python arguments that fix shapes or a
protocol kind (`num_samples`, `missing_rate`, `mode`, `fill`, a `Scenario`) are static;
rates, intensities and masks may be traced.

Conventions decided here (see docs/decisions.md):
- An absent modality has its features zeroed *and* its frame mask set to False, so
  masked pooling and attention ignore it; models must therefore accept a modality with
  no real frame (the `mer_jax.nn` pooling/attention blocks return 0, not NaN).
- Frame-level masking replaces dropped frames (zeros, or N(0, 1) samples) and leaves
  the frame masks and `modality_mask` unchanged, as LNLN, EASE and DQF do: the model
  sees the corrupted sequence at its full length and must cope with it. Flagging the
  dropped frames in the masks (`flag_dropped=True`, `config.missing.flag_dropped_frames`)
  is the opt-in variant; it lets masked pooling and attention skip the gaps, which
  flattens frame-level robustness curves. With BERT token ids in the batch, the dropped
  text positions are recorded in `text_dropped` and the text encoder feeds [UNK] there
  (`methods.text_encoder.masked_token_ids`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mer_jax.data.spec import MODALITIES

COMBINATION_NAMES = ("L", "A", "V", "LA", "LV", "AV", "LAV")
# Row c: which modalities are *present* in combination c (order L, A, V).
COMBINATIONS = np.array([[("LAV"[m] in name) for m in range(3)] for name in COMBINATION_NAMES],
                        dtype=bool)
COMBINATIONS.setflags(write=False)
# Row s: which modalities are *masked* in frame-level set s (same names and order; the set
# "LA" masks text and audio frames).
MASKED_SETS = COMBINATIONS.copy()
MASKED_SETS.setflags(write=False)
FULL_COMBINATION = 6

# Training drop probabilities over the 7 combinations (order COMBINATION_NAMES).
UNIFORM_DROP = (1 / 7,) * 7  # MCUR
CMAD_DROP = tuple(w / 14 for w in (2, 3, 3, 1, 1, 3, 1))  # CMAD

TRAINING_KINDS = ("none", "drop", "random_mr", "frame_lnln", "frame_dqf", "noise")
SCENARIO_KINDS = ("fixed", "random_mr", "frame", "noise")
FRAME_MODES = ("random", "span")
FILLS = ("zero", "normal")
# Batch key of the text positions a frame-level protocol dropped, set when the batch
# carries BERT token ids (`text_ids`): the text encoder feeds [UNK] there.
DROPPED_TEXT = "text_dropped"

# Above this many count profiles the exact sampler's table would not fit comfortably;
# only reachable with many modalities (the profile lattice has M - 2 dimensions).
_MAX_PROFILES = 2_000_000


def _combination_index(combination) -> int:
  if isinstance(combination, str):
    if combination not in COMBINATION_NAMES:
      raise ValueError(f"unknown combination {combination!r}: expected one of "
                       f"{COMBINATION_NAMES}")
    return COMBINATION_NAMES.index(combination)
  return combination


# ----------------------------------------------------------------------------- modality level


def num_missing_slots(num_samples: int, missing_rate: float, num_modalities: int = 3) -> int:
  """round(MR * N * M) missing slots, MR capped at (M - 1) / M.

  The cap keeps at least one modality per sample: MCUR's MR0.7 (above 2/3 for three
  modalities) therefore means "every sample keeps exactly one modality". Python's
  `round` (half to even) is used on MR * N * M.
  """
  missing_rate = float(missing_rate)
  if not 0.0 <= missing_rate <= 1.0:
    raise ValueError(f"missing_rate must be in [0, 1], got {missing_rate}")
  if num_samples < 1 or num_modalities < 1:
    raise ValueError(f"need num_samples >= 1 and num_modalities >= 1, got {num_samples}, "
                     f"{num_modalities}")
  return min(round(missing_rate * num_samples * num_modalities),
             num_samples * (num_modalities - 1))


@functools.lru_cache(maxsize=64)
def _count_profiles(num_samples: int, num_missing: int, num_modalities: int):
  """Every count profile and its log-probability under the uniform valid assignment.

  A profile n = (n_0, ..., n_{M-1}) says how many samples lose s modalities. With
  sum(n) = N and sum(s * n_s) = k, the number of valid slot assignments having that
  profile is N! / prod(n_s!) * prod(C(M, s) ** n_s).

  Returns:
    profiles (P, M) int32 and their normalised log-probabilities (P,) float64.
  """
  levels = num_modalities
  # Enumerate n_{M-1}, ..., n_2 (rows of `partial`), then n_1 and n_0 follow.
  partial = np.zeros((1, 0), np.int64)
  slots_left = np.array([num_missing], np.int64)
  samples_left = np.array([num_samples], np.int64)
  for level in range(levels - 1, 1, -1):
    upper = np.minimum(slots_left // level, samples_left)
    reps = upper + 1
    if reps.sum() > _MAX_PROFILES:
      raise ValueError(f"random_modality_mask: too many count profiles for N={num_samples}, "
                       f"k={num_missing}, M={num_modalities}")
    counts = np.concatenate([np.arange(r) for r in reps])
    partial = np.concatenate([np.repeat(partial, reps, axis=0), counts[:, None]], axis=1)
    slots_left = np.repeat(slots_left, reps) - level * counts
    samples_left = np.repeat(samples_left, reps) - counts
  if levels >= 2:
    n1 = slots_left
    n0 = samples_left - n1
    profiles = np.concatenate([n0[:, None], n1[:, None], partial[:, ::-1]], axis=1)
  else:
    profiles = samples_left[:, None]
  profiles = profiles[(profiles >= 0).all(axis=1)]
  if len(profiles) == 0:
    raise ValueError(f"no valid assignment of {num_missing} missing slots to {num_samples} "
                     f"samples of {num_modalities} modalities")
  log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, num_samples + 1)))])
  log_choose = np.array([math.log(math.comb(levels, s)) for s in range(levels)])
  log_weight = (log_factorial[num_samples] - log_factorial[profiles].sum(axis=1)
                + profiles @ log_choose)
  log_weight -= log_weight.max()
  log_weight -= np.log(np.exp(log_weight).sum())
  return profiles.astype(np.int32), log_weight


def random_modality_mask(key, num_samples: int, missing_rate: float, num_modalities: int = 3):
  """Random modality-level missing at an exact missing rate (MCUR / MMIN protocol).

  Exactly `num_missing_slots(N, MR, M)` = round(MR * N * M) (sample, modality) slots are
  missing, drawn *uniformly* among all slot sets that leave every sample at least one
  modality. The draw is exact: first the count profile (how many samples lose 0, 1, ...,
  M-1 modalities) from its exact probability (enumerated on the host: at most N + 1
  profiles for M = 3), then a uniformly random assignment of those counts to samples,
  then uniformly random slots within each sample. By symmetry every slot is missing
  with the same marginal probability k / (N * M).

  Args:
    key: jax.random key.
    num_samples: N (static).
    missing_rate: MR in [0, 1] (static); values above (M - 1) / M are capped there.
    num_modalities: M (static).

  Returns:
    (N, M) bool, True where the modality is present.
  """
  num_missing = num_missing_slots(num_samples, missing_rate, num_modalities)
  profiles, log_prob = _count_profiles(num_samples, num_missing, num_modalities)
  profile_key, order_key, slot_key = jax.random.split(key, 3)
  if len(profiles) == 1:
    counts = jnp.asarray(profiles[0])
  else:
    index = jax.random.categorical(profile_key, jnp.asarray(log_prob, jnp.float32))
    counts = jnp.asarray(profiles)[index]
  # Sorted per-sample missing counts, then shuffled: a uniform arrangement of the profile.
  sorted_missing = jnp.repeat(jnp.arange(num_modalities), counts,
                              total_repeat_length=num_samples)
  missing_per_sample = sorted_missing[jax.random.permutation(order_key, num_samples)]
  # Rank of each slot within its sample under random priorities: the s lowest go missing.
  priority = jax.random.uniform(slot_key, (num_samples, num_modalities))
  slot_rank = jnp.argsort(jnp.argsort(priority, axis=1), axis=1)
  return slot_rank >= missing_per_sample[:, None]


def fixed_modality_mask(num_samples: int, combination):
  """Every sample gets the same combination.

  Args:
    num_samples: N (static).
    combination: combination id 0..6 (int, possibly traced) or name (`"LA"`, ...).

  Returns:
    (N, 3) bool, True where the modality is present.
  """
  row = jnp.asarray(COMBINATIONS)[_combination_index(combination)]
  return jnp.broadcast_to(row, (num_samples, 3))


def training_drop_mask(key, num_samples: int, probs):
  """Per sample, a combination drawn from `probs` over the 7 combinations.

  Args:
    key: jax.random key.
    num_samples: N (static).
    probs: (7,) non-negative weights in COMBINATION_NAMES order (normalised here), e.g.
      `UNIFORM_DROP` (MCUR) or `CMAD_DROP`.

  Returns:
    modality_mask (N, 3) bool and combination_ids (N,) int32.
  """
  probs = jnp.asarray(probs, jnp.float32)
  if probs.shape != (7,):
    raise ValueError(f"training drop probabilities must have shape (7,) (one per combination "
                     f"{COMBINATION_NAMES}), got {probs.shape}")
  ids = jax.random.categorical(key, jnp.log(probs / probs.sum()), shape=(num_samples,))
  ids = ids.astype(jnp.int32)
  return jnp.asarray(COMBINATIONS)[ids], ids


# Bit code L + 2A + 4V -> combination id; code 0 (nothing present) -> -1.
_CODE_TO_ID = np.full(8, -1, np.int32)
for _id, _row in enumerate(COMBINATIONS):
  _CODE_TO_ID[int(_row @ np.array([1, 2, 4]))] = _id


def combination_ids(modality_mask):
  """Combination id 0..6 of each row of a (N, 3) modality mask; -1 if nothing is present."""
  modality_mask = jnp.asarray(modality_mask, bool)
  code = modality_mask.astype(jnp.int32) @ jnp.array([1, 2, 4], jnp.int32)
  return jnp.asarray(_CODE_TO_ID)[code]


def apply_modality_mask(batch: Mapping, modality_mask) -> dict:
  """Removes absent modalities from a batch.

  Absent modalities get zero features and an all-False frame mask; `modality_mask` is
  set to the given mask AND-ed with the batch's own `modality_mask` if it has one.

  Args:
    batch: dict with `text`/`audio`/`vision` (B, T_m, D_m) and their `*_mask` (B, T_m).
    modality_mask: (B, 3) bool, True = present.

  Returns:
    A new dict (the input is not modified).
  """
  modality_mask = jnp.asarray(modality_mask, bool)
  if "modality_mask" in batch:
    modality_mask = modality_mask & jnp.asarray(batch["modality_mask"], bool)
  out = dict(batch)
  for index, name in enumerate(MODALITIES):
    if name not in batch:
      continue
    present = modality_mask[:, index]
    features = jnp.asarray(batch[name])
    out[name] = jnp.where(present[:, None, None], features, jnp.zeros((), features.dtype))
    out[f"{name}_mask"] = jnp.asarray(batch[f"{name}_mask"], bool) & present[:, None]
  out["modality_mask"] = modality_mask
  return out


# ----------------------------------------------------------------------------- frame level


def frame_drop(key, frame_mask, rate, *, mode: str = "random"):
  """Drops real frames of one modality.

  Args:
    key: jax.random key.
    frame_mask: (B, T) bool, True on real frames.
    rate: scalar or (B,) drop rate r in [0, 1] (may be traced).
    mode: "random": each real frame is dropped independently with probability r (the
      LNLN/EASE/DQF protocol). "span": one run of round(r * n_real) consecutive real
      frames (consecutive among the real frames, in time order) starting at a uniformly
      random position is dropped (DQF supplement); `jnp.round` rounds half to even.

  Returns:
    (B, T) bool frame mask; padding never becomes real.
  """
  frame_mask = jnp.asarray(frame_mask, bool)
  batch_size, length = frame_mask.shape
  rate = jnp.broadcast_to(jnp.asarray(rate, jnp.float32), (batch_size,))
  if mode == "random":
    # uniform is in [0, 1): r = 0 keeps every frame, r = 1 drops every frame.
    keep = jax.random.uniform(key, (batch_size, length)) >= rate[:, None]
    return frame_mask & keep
  if mode == "span":
    num_real = frame_mask.sum(axis=1)
    span = jnp.clip(jnp.round(rate * num_real).astype(jnp.int32), 0, num_real)
    start = jnp.floor(jax.random.uniform(key, (batch_size,)) * (num_real - span + 1))
    start = jnp.clip(start.astype(jnp.int32), 0, num_real - span)
    real_rank = jnp.cumsum(frame_mask, axis=1) - 1
    in_span = (real_rank >= start[:, None]) & (real_rank < (start + span)[:, None])
    return frame_mask & ~in_span
  raise ValueError(f"frame_drop mode must be one of {FRAME_MODES}, got {mode!r}")


def apply_frame_masking(key, batch: Mapping, rates, *, mode: str = "random",
                        fill: str = "zero", flag_dropped: bool = False) -> dict:
  """Frame-level missing on every modality of a batch (SPEC sections 4, 5 and 8).

  Args:
    key: jax.random key.
    batch: dict in the batch layout.
    rates: (3,) or (B, 3) drop rate per modality (L, A, V); 0 leaves a modality untouched.
    mode: "random" or "span" (see `frame_drop`).
    fill: dropped frames become zeros ("zero") or N(0, 1) samples ("normal").
    flag_dropped: also mark dropped frames False in `*_mask`, like padding (the opt-in
      variant); by default the masks keep marking only padding.

  Returns:
    A new dict with dropped real frames replaced; padded frames are untouched and
    `modality_mask` is unchanged. A batch with BERT token ids (`text_ids`) also gets
    `text_dropped` (B, T) bool, the text positions dropped so far, which the text encoder
    turns into [UNK] tokens ([CLS]/[SEP] are never replaced).
  """
  if fill not in FILLS:
    raise ValueError(f"frame fill must be one of {FILLS}, got {fill!r}")
  rates = jnp.asarray(rates, jnp.float32)
  out = dict(batch)
  keys = jax.random.split(key, len(MODALITIES))
  for index, name in enumerate(MODALITIES):
    if name not in batch:
      continue
    drop_key, fill_key = jax.random.split(keys[index])
    features = jnp.asarray(batch[name])
    old_mask = jnp.asarray(batch[f"{name}_mask"], bool)
    new_mask = frame_drop(drop_key, old_mask, rates[..., index], mode=mode)
    dropped = old_mask & ~new_mask
    if fill == "zero":
      replacement = jnp.zeros_like(features)
    else:
      replacement = jax.random.normal(fill_key, features.shape, features.dtype)
    out[name] = jnp.where(dropped[..., None], replacement, features)
    if flag_dropped:
      out[f"{name}_mask"] = new_mask
    if name == "text" and "text_ids" in batch:
      out[DROPPED_TEXT] = jnp.asarray(batch.get(DROPPED_TEXT, False), bool) | dropped
  return out


def lnln_frame_rates(key, batch_size: int):
  """LNLN/EASE training rates: (B, 3), r ~ U(0, 1) per sample and modality, then, for each
  modality independently, r = 0 for a random half (exactly B // 2) of the samples.

  This is LNLN's data loader (followed by EASE): per modality, `int(N / 2)` randomly
  chosen samples keep that modality intact.
  """
  rate_key, half_key = jax.random.split(key)
  rates = jax.random.uniform(rate_key, (batch_size, 3))
  priority = jax.random.uniform(half_key, (batch_size, 3))
  rank = jnp.argsort(jnp.argsort(priority, axis=0), axis=0)
  return jnp.where(rank < batch_size // 2, 0.0, rates)


def dqf_frame_rates(key):
  """DQF training rates: one r ~ U(0, 1) per modality for the whole batch, (3,)."""
  return jax.random.uniform(key, (3,))


def add_noise(key, batch: Mapping, intensity) -> dict:
  """`x + intensity * N(0, I)` on the real frames of present modalities (MCUR A.5.6).

  Args:
    key: jax.random key.
    batch: dict in the batch layout (its `modality_mask`, if any, selects the present
      modalities; otherwise all are present).
    intensity: scalar (may be traced).
  """
  intensity = jnp.asarray(intensity, jnp.float32)
  out = dict(batch)
  keys = jax.random.split(key, len(MODALITIES))
  for index, name in enumerate(MODALITIES):
    if name not in batch:
      continue
    features = jnp.asarray(batch[name])
    real = jnp.asarray(batch[f"{name}_mask"], bool)
    if "modality_mask" in batch:
      real = real & jnp.asarray(batch["modality_mask"], bool)[:, index:index + 1]
    noise = jax.random.normal(keys[index], features.shape, features.dtype)
    out[name] = jnp.where(real[..., None], features + intensity.astype(features.dtype) * noise,
                          features)
  return out


# ----------------------------------------------------------------------------- training


def _field(config, name: str, default=None):
  """`config.name` for a ConfigDict, a dict or any object with attributes."""
  if hasattr(config, "get"):
    return config.get(name, default)
  return getattr(config, name, default)


def _batch_size(batch: Mapping) -> int:
  for name in MODALITIES:
    if name in batch:
      return batch[name].shape[0]
  raise ValueError(f"batch has none of the modality keys {MODALITIES}")


def apply_training_protocol(key, batch: Mapping, missing_config):
  """The training-time missing protocol of `config.missing`.

  Kinds: "none" (full modalities), "drop" (`probs`, 7 weights), "random_mr"
  (`missing_rate`, exact MR within the batch), "frame_lnln" / "frame_dqf" (frame masking
  with `lnln_frame_rates` / `dqf_frame_rates`, `fill` default "zero", `mode` default
  "random", `flag_dropped_frames` default False), "noise" (`noise_intensity`).

  Returns:
    (batch with `modality_mask` set, combination_ids (B,) int32 of that mask).
  """
  kind = _field(missing_config, "kind", "none")
  batch_size = _batch_size(batch)
  modality_key, frame_key = jax.random.split(key)
  if kind == "drop":
    modality_mask, _ = training_drop_mask(modality_key, batch_size,
                                          _field(missing_config, "probs", UNIFORM_DROP))
  elif kind == "random_mr":
    modality_mask = random_modality_mask(modality_key, batch_size,
                                         float(_field(missing_config, "missing_rate", 0.0)))
  elif kind in ("none", "frame_lnln", "frame_dqf", "noise"):
    modality_mask = fixed_modality_mask(batch_size, FULL_COMBINATION)
  else:
    raise ValueError(f"config.missing.kind must be one of {TRAINING_KINDS}, got {kind!r}")
  batch = apply_modality_mask(batch, modality_mask)
  if kind in ("frame_lnln", "frame_dqf"):
    rates = (lnln_frame_rates(frame_key, batch_size) if kind == "frame_lnln"
             else dqf_frame_rates(frame_key))
    batch = apply_frame_masking(
        frame_key, batch, rates, mode=_field(missing_config, "mode", "random"),
        fill=_field(missing_config, "fill", "zero"),
        flag_dropped=bool(_field(missing_config, "flag_dropped_frames", False)))
  elif kind == "noise":
    batch = add_noise(frame_key, batch, _field(missing_config, "noise_intensity", 0.0))
  return batch, combination_ids(batch["modality_mask"])


# ----------------------------------------------------------------------------- evaluation


@dataclasses.dataclass(frozen=True)
class Scenario:
  """One evaluation scenario (hashable: pass it as a static argument).

  Attributes:
    name: result key, e.g. `LA`, `MR0.3`, `frame0.3_LA`, `noise0.5`.
    kind: one of SCENARIO_KINDS.
    combination: for "fixed", the combination id of the *present* modalities; for
      "frame", the id of the *masked* set (MASKED_SETS); 6 otherwise.
    rate: MR ("random_mr"), frame drop rate ("frame"), noise intensity ("noise").
    mode, fill, flag_dropped: frame masking options ("frame"; see `apply_frame_masking`).
  """

  name: str
  kind: str
  combination: int = FULL_COMBINATION
  rate: float = 0.0
  mode: str = "random"
  fill: str = "zero"
  flag_dropped: bool = False


def format_rate(rate: float) -> str:
  """0.3 -> "0.3", 1 -> "1.0", 0.25 -> "0.25" (one decimal unless more are needed)."""
  rate = float(rate)
  return f"{rate:.1f}" if round(rate, 1) == rate else f"{rate:g}"


def eval_scenarios(eval_config, *, flag_dropped: bool = False) -> list[Scenario]:
  """The scenarios of `config.eval`, in this order: the 7 fixed combinations (`fixed`),
  random MR (`missing_rates`), frame-level per masked set and rate (`frame_sets` x
  `frame_rates`, without rate 1.0 on the all-three set "LAV"; masked per `frame_mode`,
  `frame_fill` and `flag_dropped`, i.e. `config.missing.flag_dropped_frames`), noise
  (`noise_intensities`). Missing fields fall back to: fixed True, no MR, no frame
  rates, all 7 sets, no noise."""
  scenarios = []
  if _field(eval_config, "fixed", True):
    scenarios += [Scenario(name, "fixed", index) for index, name in enumerate(COMBINATION_NAMES)]
  for rate in _field(eval_config, "missing_rates", ()) or ():
    scenarios.append(Scenario(f"MR{format_rate(rate)}", "random_mr", rate=float(rate)))
  mode = _field(eval_config, "frame_mode", "random")
  fill = _field(eval_config, "frame_fill", "zero")
  frame_rates = tuple(_field(eval_config, "frame_rates", ()) or ())
  for set_name in _field(eval_config, "frame_sets", COMBINATION_NAMES) or ():
    set_index = _combination_index(set_name)
    for rate in frame_rates:
      # All three modalities entirely dropped is not a scenario (DQF excludes it).
      if set_name == "LAV" and float(rate) >= 1.0:
        continue
      scenarios.append(Scenario(f"frame{format_rate(rate)}_{set_name}", "frame", set_index,
                                float(rate), mode, fill, bool(flag_dropped)))
  for intensity in _field(eval_config, "noise_intensities", ()) or ():
    scenarios.append(Scenario(f"noise{format_rate(intensity)}", "noise", rate=float(intensity)))
  return scenarios


def apply_scenario(key, batch: Mapping, scenario: Scenario, sample_index=None,
                   num_samples: int | None = None) -> dict:
  """Applies one evaluation scenario to a batch (jit it with `scenario` static).

  For "random_mr" the exact-MR mask is drawn over the whole split of `num_samples` rows
  (static) with `key` and the batch's rows are gathered by `sample_index` (B,) (their
  global row indices), so a key gives each row the same mask whatever the batching.
  Without them the batch is treated as the whole split.

  Returns:
    A new batch with `modality_mask` set.
  """
  batch_size = _batch_size(batch)
  if scenario.kind == "fixed":
    return apply_modality_mask(batch, fixed_modality_mask(batch_size, scenario.combination))
  if scenario.kind == "random_mr":
    if (sample_index is None) != (num_samples is None):
      raise ValueError("apply_scenario: give both sample_index and num_samples (or neither)")
    if sample_index is None:
      modality_mask = random_modality_mask(key, batch_size, scenario.rate)
    else:
      split_mask = random_modality_mask(key, num_samples, scenario.rate)
      modality_mask = jnp.take(split_mask, jnp.asarray(sample_index), axis=0, mode="clip")
    return apply_modality_mask(batch, modality_mask)
  batch = apply_modality_mask(batch, fixed_modality_mask(batch_size, FULL_COMBINATION))
  if scenario.kind == "frame":
    rates = scenario.rate * jnp.asarray(MASKED_SETS[scenario.combination], jnp.float32)
    return apply_frame_masking(key, batch, rates, mode=scenario.mode, fill=scenario.fill,
                               flag_dropped=scenario.flag_dropped)
  if scenario.kind == "noise":
    return add_noise(key, batch, scenario.rate)
  raise ValueError(f"scenario kind must be one of {SCENARIO_KINDS}, got {scenario.kind!r}")


__all__ = [
    "CMAD_DROP", "COMBINATIONS", "COMBINATION_NAMES", "DROPPED_TEXT", "MASKED_SETS", "Scenario",
    "UNIFORM_DROP",
    "add_noise", "apply_frame_masking", "apply_modality_mask", "apply_scenario",
    "apply_training_protocol", "combination_ids", "dqf_frame_rates", "eval_scenarios",
    "fixed_modality_mask", "format_rate", "frame_drop", "lnln_frame_rates",
    "num_missing_slots", "random_modality_mask", "training_drop_mask",
]
