"""Checks and conversions shared by every reader of user files (the builders and
`mer_jax.predict`): feature arrays, frame masks, labels and splits.

Every check fails with a `DataError` whose message names the file, the key and the
expected form, so a user can fix the file without reading code.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from mer_jax.data.spec import MODALITIES

log = logging.getLogger(__name__)


class DataError(ValueError):
  """A data file does not have the documented form."""


def as_features(value, *, source: str, key: str, num: int | None = None,
                width: int | None = None) -> np.ndarray:
  """A feature array as float32 (N, T, D); (N, D) utterance-level features become T = 1.

  Raises:
    DataError: not numeric, not 2-D/3-D, N differs from `num` (the labels), the width
      differs from `width`, or NaN/inf values.
  """
  x = np.asarray(value)
  if x.dtype == object or not (np.issubdtype(x.dtype, np.floating)
                               or np.issubdtype(x.dtype, np.integer)):
    raise DataError(f"{source}: key {key!r} has dtype {x.dtype}; expected a float array "
                    f"(N, T, D)")
  if x.ndim == 2:
    x = x[:, None, :]
  if x.ndim != 3:
    raise DataError(f"{source}: key {key!r} has shape {x.shape}; expected (N, T, D) or (N, D)")
  if num is not None and x.shape[0] != num:
    raise DataError(f"{source}: key {key!r} has {x.shape[0]} samples but the labels have "
                    f"{num}; expected ({num}, T, D)")
  if width is not None and x.shape[2] != width:
    raise DataError(f"{source}: key {key!r} has shape {x.shape}; expected ({x.shape[0]}, T, "
                    f"{width}), the width this model was trained on")
  x = x.astype(np.float32, copy=False)
  check_finite(x, source=source, key=key)
  return x


def check_finite(x: np.ndarray, *, source: str, key: str):
  bad = ~np.isfinite(x)
  if bad.any():
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    nan = int(np.isnan(x).sum())
    raise DataError(f"{source}: key {key!r} has {int(bad.sum())} non-finite values ({nan} NaN, "
                    f"{int(bad.sum()) - nan} inf), the first at index {first}; expected finite "
                    f"features")


def lengths_to_mask(lengths, num: int, length: int, *, source: str, key: str,
                    clip: bool = False) -> np.ndarray:
  """(N,) real lengths -> (N, T) bool mask of the first `lengths[i]` frames.

  Args:
    clip: lengths above T mean features truncated to T by whoever wrote the file: clip
      them (with a logged warning) instead of failing.
  """
  values = np.asarray(lengths)
  if values.shape != (num,) or not (np.issubdtype(values.dtype, np.integer)
                                    or np.issubdtype(values.dtype, np.floating)):
    raise DataError(f"{source}: key {key!r} has shape {values.shape} and dtype {values.dtype}; "
                    f"expected ({num},) integer lengths")
  if np.issubdtype(values.dtype, np.floating) and not np.all(values == np.round(values)):
    raise DataError(f"{source}: key {key!r} holds non-integer lengths; expected ({num},) ints")
  values = values.astype(np.int64)
  if num and values.min() < 0:
    raise DataError(f"{source}: key {key!r} has negative lengths; expected ints in [0, {length}]")
  if num and values.max() > length:
    if not clip:
      raise DataError(f"{source}: key {key!r} has lengths up to {values.max()}; expected ints "
                      f"in [0, {length}] (the array has {length} frames)")
    log.warning("%s: %d values of %r exceed the %d stored frames; clipped to %d", source,
                int((values > length).sum()), key, length, length)
    values = np.minimum(values, length)
  return np.arange(length)[None, :] < values[:, None]


def frame_mask(arrays: Mapping[str, np.ndarray], name: str, shape: tuple[int, int], *,
               source: str) -> np.ndarray:
  """The (N, T) real-frame mask of modality `name` from `<name>_mask` or `<name>_lengths`
  (all frames real when neither is given)."""
  if f"{name}_mask" in arrays:
    mask = np.asarray(arrays[f"{name}_mask"])
    if mask.shape != shape:
      raise DataError(f"{source}: key {name}_mask has shape {mask.shape}; expected {shape} "
                      f"(True on real frames)")
    return mask.astype(bool)
  if f"{name}_lengths" in arrays:
    return lengths_to_mask(arrays[f"{name}_lengths"], shape[0], shape[1], source=source,
                           key=f"{name}_lengths")
  return np.ones(shape, bool)


def pool_frames(x: np.ndarray, length: int) -> np.ndarray:
  """(T, D) -> (length, D) by averaging `length` contiguous, nearly equal groups of frames
  (MERBench's compression of long sequences, without its zero padding)."""
  groups = np.array_split(np.arange(len(x)), length)
  return np.stack([x[g].mean(axis=0) for g in groups]).astype(np.float32)


def stack_sequences(sequences: Sequence[np.ndarray], *, source: str, key: str,
                    max_length: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Per-sample (T_i, D) or (D,) features -> padded float32 (N, T, D) and mask (N, T).

  A `None` entry is a sample without any frame (all-False mask).

  T is the longest sequence, or `max_length` when that is smaller (> 0): longer
  sequences are average-pooled down to it.
  """
  arrays = []
  for index, value in enumerate(sequences):
    if value is None:  # no frames at all (e.g. no face found): the modality is absent
      arrays.append(None)
      continue
    x = np.asarray(value)
    if x.ndim == 1:
      x = x[None, :]
    if x.ndim != 2 or x.dtype == object or not (np.issubdtype(x.dtype, np.floating)
                                                or np.issubdtype(x.dtype, np.integer)):
      raise DataError(f"{source}: {key} of sample {index} has shape {x.shape} and dtype "
                      f"{x.dtype}; expected (T, D) or (D,) numbers")
    arrays.append(x)
  widths = {x.shape[1] for x in arrays if x is not None}
  if len(widths) > 1:
    raise DataError(f"{source}: {key} has different feature widths across samples: "
                    f"{sorted(widths)}; expected one width D")
  width = widths.pop() if widths else 1
  longest = max((len(x) for x in arrays if x is not None), default=1)
  length = max(1, min(longest, max_length) if max_length > 0 else longest)
  out = np.zeros((len(arrays), length, width), np.float32)
  mask = np.zeros((len(arrays), length), bool)
  pooled = 0
  for index, x in enumerate(arrays):
    if x is None:
      continue
    x = x.astype(np.float32, copy=False)
    if len(x) > length:
      x = pool_frames(x, length)
      pooled += 1
    out[index, :len(x)] = x
    mask[index, :len(x)] = True
  if pooled:
    log.info("%s: %s: %d sequences longer than %d frames average-pooled to %d", source, key,
             pooled, length, length)
  check_finite(out, source=source, key=key)
  return out, mask


def pad_frames(x: np.ndarray, mask: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
  """Zero-pads (N, T, D) features and their (N, T) mask to `length` >= T frames;
  padding frames are zero whatever the file held there."""
  x = np.where(mask[..., None], x, 0.0).astype(np.float32)
  extra = length - x.shape[1]
  if extra < 0:
    raise ValueError(f"pad_frames: cannot pad {x.shape[1]} frames to {length}")
  if extra:
    x = np.pad(x, ((0, 0), (0, extra), (0, 0)))
    mask = np.pad(mask, ((0, 0), (0, extra)))
  return x, mask


def regression_labels(value, *, source: str, key: str, num: int | None = None,
                      label_range: tuple[float, float] | None = None) -> np.ndarray:
  """Labels as float32 (N,) (a trailing (N, 1) or (N, 1, 1) is squeezed), finite and,
  when `label_range` is given, inside it."""
  y = np.asarray(value)
  if y.dtype == object or not (np.issubdtype(y.dtype, np.floating)
                               or np.issubdtype(y.dtype, np.integer)):
    raise DataError(f"{source}: key {key!r} has dtype {y.dtype}; expected numeric (N,) labels")
  count = y.shape[0] if y.ndim else -1
  if y.ndim == 0 or y.size != count:
    raise DataError(f"{source}: key {key!r} has shape {y.shape}; expected (N,) regression "
                    f"labels")
  if num is not None and count != num:
    raise DataError(f"{source}: key {key!r} has {count} labels but the features have {num} "
                    f"samples")
  y = y.reshape(count).astype(np.float32)
  check_finite(y, source=source, key=key)
  if label_range is not None and count:
    low, high = label_range
    outside = (y < low) | (y > high)
    if outside.any():
      raise DataError(f"{source}: key {key!r} has {int(outside.sum())} labels outside "
                      f"[{low}, {high}] (min {y.min():g}, max {y.max():g}); expected "
                      f"sentiment in [{low}, {high}]")
  return y


def class_labels(value, *, source: str, key: str, num: int | None = None,
                 num_classes: int | None = None) -> np.ndarray:
  """Class ids as int32 (N,); one-hot or score rows (N, K) become their argmax."""
  y = np.asarray(value)
  if y.dtype == object or not (np.issubdtype(y.dtype, np.integer)
                               or np.issubdtype(y.dtype, np.floating)
                               or y.dtype == bool):
    raise DataError(f"{source}: key {key!r} has dtype {y.dtype}; expected integer class ids "
                    f"(N,) or one-hot (N, K)")
  if y.ndim == 2 and y.shape[1] > 1:
    if num_classes is not None and y.shape[1] != num_classes:
      raise DataError(f"{source}: key {key!r} has shape {y.shape}; expected one-hot "
                      f"(N, {num_classes})")
    y = y.argmax(axis=1)
  y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
  if y.ndim != 1:
    raise DataError(f"{source}: key {key!r} has shape {np.asarray(value).shape}; expected (N,) "
                    f"class ids or (N, K) one-hot")
  if num is not None and len(y) != num:
    raise DataError(f"{source}: key {key!r} has {len(y)} labels but the features have {num} "
                    f"samples")
  if np.issubdtype(y.dtype, np.floating):
    check_finite(y, source=source, key=key)
    if not np.all(y == np.round(y)):
      raise DataError(f"{source}: key {key!r} holds non-integer class ids; expected ints")
  y = y.astype(np.int64)
  if len(y) and (y.min() < 0 or (num_classes is not None and y.max() >= num_classes)):
    bound = f"[0, {num_classes - 1}]" if num_classes is not None else ">= 0"
    raise DataError(f"{source}: key {key!r} has class ids from {y.min()} to {y.max()}; "
                    f"expected ids in {bound}")
  return y.astype(np.int32)


def multilabel_labels(value, *, source: str, key: str, num: int | None = None,
                      num_emotions: int | None = None) -> np.ndarray:
  """Per-emotion binaries as int32 (N, K) in {0, 1}; MulT's (N, K, 2) one-hot pairs
  become their argmax."""
  y = np.asarray(value)
  if y.dtype == object:
    raise DataError(f"{source}: key {key!r} has dtype object; expected (N, K) 0/1 labels")
  if y.ndim == 3 and y.shape[2] == 2:
    y = y.argmax(axis=2)
  if y.ndim != 2 or (num_emotions is not None and y.shape[1] != num_emotions):
    expected = f"(N, {num_emotions})" if num_emotions is not None else "(N, K)"
    raise DataError(f"{source}: key {key!r} has shape {np.asarray(value).shape}; expected "
                    f"{expected} 0/1 labels or (N, K, 2) one-hot pairs")
  if num is not None and len(y) != num:
    raise DataError(f"{source}: key {key!r} has {len(y)} labels but the features have {num} "
                    f"samples")
  if not np.isin(y, (0, 1)).all():
    raise DataError(f"{source}: key {key!r} has values other than 0 and 1; expected (N, K) "
                    f"binaries")
  return y.astype(np.int32)


def num_rows(value, *, source: str, key: str) -> int:
  """The number of samples (first axis) of an array-like."""
  array = np.asarray(value)
  if array.ndim == 0:
    raise DataError(f"{source}: key {key!r} is a scalar; expected one entry per sample")
  return int(array.shape[0])


def check_num_samples(num: int, *, source: str, split: str):
  if num == 0:
    raise DataError(f"{source}: split {split!r} has zero samples; every split needs at least one")


def as_ids(value, num: int, *, source: str, key: str = "id") -> np.ndarray:
  """(N,) str ids; rows of several parts (MulT's (N, 3) ids) are joined with '_'; bytes
  are decoded."""
  ids = np.asarray(value)
  if len(ids) != num:
    raise DataError(f"{source}: key {key!r} has {len(ids)} entries; expected {num}")

  def text(item):
    if isinstance(item, bytes):
      return item.decode("utf-8", errors="replace")
    if isinstance(item, np.ndarray):
      return "_".join(text(part) for part in item.reshape(-1))
    if isinstance(item, (list, tuple)):
      return "_".join(text(part) for part in item)
    return str(item)

  return np.asarray([text(item) for item in ids], dtype=str)


def modality_presence(split: Mapping[str, np.ndarray]) -> np.ndarray:
  """(N, 3) bool: whether each sample has at least one real frame of each modality."""
  return np.stack([np.asarray(split[f"{m}_mask"]).any(axis=1) for m in MODALITIES], axis=1)
