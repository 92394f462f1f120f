r"""Predictions, with uncertainty, for inputs with any modality or frames absent.

    python -m mer_jax.predict --workdir /tmp/run --input features.npz --output preds.json

The input is the bring-your-own npz layout (docs/data.md): `text`, `audio`, `vision`
arrays (N, T, D) of the widths the model was trained on — any of them may be absent
(the modality is then treated as missing) — optional `<modality>_lengths` (N,) or
`<modality>_mask` (N, T) for missing/padded frames, and optional `id` (N,). A run that
fine-tuned BERT (`config.model.text_encoder = "bert"`) reads the text as token ids
instead: `text_ids` (N, T) int, 0-padded, and optional `text_segments` (N, T).

A sample that cannot be predicted (NaN/inf in its real frames, no modality with a real
frame, a length out of range) gets an `error` field instead of a prediction; problems
of the whole input (unknown keys, wrong widths, dtypes or sample counts) raise an error
naming the key before anything runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from mer_jax import cli, parallel, run_log
from mer_jax.data.spec import MODALITIES, DataSpec
from mer_jax.evaluate import load_run_config
from mer_jax.losses.task import predicted_probabilities, predictive_entropy
from mer_jax.methods import build_stages
from mer_jax.methods.text_encoder import TOKEN_KEYS, TextEncoderModel
from mer_jax.trainer import Predictor, load_stage_params


def spec_from_config(config) -> DataSpec:
  """The DataSpec a run was trained with (saved as config.data.spec by mer_jax.train)."""
  saved = config.data.get("spec")
  if saved is None:
    raise ValueError("config.json of this run has no data.spec; it was written by an older "
                     "mer_jax — retrain or evaluate it with mer_jax.evaluate")
  return DataSpec(name=saved["name"], task=saved["task"], num_classes=int(saved["num_classes"]),
                  dims=tuple(saved["dims"]), lengths=tuple(saved["lengths"]),
                  label_range=tuple(saved["label_range"]) if saved.get("label_range") else None,
                  class_names=tuple(saved.get("class_names") or ()))


# Keys a prediction input may carry besides the modalities and their masks/lengths;
# anything else is refused, so that a misspelt modality is not silently treated as absent.
IGNORED_KEYS = ("id", "label", "unimodal_labels", "raw_text")


def _input_keys() -> tuple[str, ...]:
  return (*MODALITIES, *(f"{m}_mask" for m in MODALITIES),
          *(f"{m}_lengths" for m in MODALITIES), "modality_mask", *IGNORED_KEYS)


def _real_array(arrays, key: str, source: str) -> np.ndarray:
  x = np.asarray(arrays[key])
  if x.dtype == object or not (np.issubdtype(x.dtype, np.integer)
                               or np.issubdtype(x.dtype, np.floating)):
    raise ValueError(f"{source}: key {key!r} has dtype {x.dtype}; expected real numbers "
                     "(float32 features)")
  return x


def _frame_mask(arrays, name: str, x: np.ndarray, source: str):
  """(N, T) real frames of modality `name` from `<name>_mask` or `<name>_lengths`, and
  per-sample messages for lengths out of range."""
  num, frames = x.shape[:2]
  problems = [None] * num
  if f"{name}_mask" in arrays:
    key = f"{name}_mask"
    mask = np.asarray(arrays[key])
    if mask.dtype != bool:
      if not np.issubdtype(mask.dtype, np.integer) or not np.isin(mask, (0, 1)).all():
        raise ValueError(f"{source}: key {key!r} must be bool (or 0/1 integers), got dtype "
                         f"{mask.dtype}")
      mask = mask.astype(bool)
    if mask.shape != (num, frames):
      raise ValueError(f"{source}: key {key!r} has shape {mask.shape}; expected "
                       f"{(num, frames)} (the frames of {name!r})")
    return mask, problems
  if f"{name}_lengths" in arrays:
    key = f"{name}_lengths"
    lengths = np.asarray(arrays[key])
    if lengths.shape != (num,) or not (
        np.issubdtype(lengths.dtype, np.integer)
        or (np.issubdtype(lengths.dtype, np.floating) and np.all(lengths == np.round(lengths)))):
      raise ValueError(f"{source}: key {key!r} must be {num} whole numbers (shape ({num},)); "
                       f"got shape {lengths.shape}, dtype {lengths.dtype}")
    lengths = lengths.astype(np.int64)
    for i in np.flatnonzero((lengths < 0) | (lengths > frames)):
      problems[i] = f"{key} is {lengths[i]}, outside 0..{frames} (the frames of {name!r})"
    return np.arange(frames)[None, :] < lengths[:, None], problems
  return np.ones((num, frames), bool), problems


def _token_inputs(arrays, spec: DataSpec, source: str):
  """Text given as BERT token ids (runs with `config.model.text_encoder = "bert"`):
  (placeholder features (N, T, 1), frame mask, ids, segments), cut or padded to the
  trained length; real tokens are the non-zero ids ([PAD] = 0)."""
  length = spec.lengths[0]
  out = []
  for key in ("text_ids", "text_segments"):
    if key not in arrays:
      out.append(None)
      continue
    x = np.asarray(arrays[key])
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer) or (x < 0).any():
      raise ValueError(f"{source}: key {key!r} must be non-negative integers of shape (N, T); "
                       f"got shape {x.shape}, dtype {x.dtype}")
    padded = np.zeros((x.shape[0], length), np.int32)
    keep = min(length, x.shape[1])
    padded[:, :keep] = x[:, :keep]
    out.append(padded)
  ids, segments = out
  if segments is None:
    segments = np.zeros_like(ids)
  elif segments.shape != ids.shape:
    raise ValueError(f"{source}: key 'text_segments' has {segments.shape[0]} rows; 'text_ids' "
                     f"has {ids.shape[0]}")
  mask = ids != 0
  return np.zeros(ids.shape + (1,), np.float32), mask, ids, np.where(mask, segments, 0)


def prepare_inputs(arrays: Mapping[str, np.ndarray], spec: DataSpec, *, source: str = "input",
                   text_tokens: bool = False):
  """Bring-your-own arrays -> the model's batch layout, with per-sample errors.

  Absent modalities become zeros flagged missing; sequences are padded or cut to the
  trained length; `<modality>_lengths` / `<modality>_mask` mark missing frames and an
  optional `modality_mask` (N, 3) marks absent modalities. With `text_tokens` (a run
  that fine-tunes BERT) the text is `text_ids` (N, T) int, 0-padded, and optional
  `text_segments`, instead of `text` features.

  Returns:
    (batch, modality_mask (N, 3) bool, errors): `errors[i]` is None, or why sample i
    cannot be predicted (NaN/inf in its real frames, a length out of range, no real
    frame of any modality). Such a sample is all zeros and absent in the batch, so it
    affects no other sample; the caller reports the error instead of a prediction.

  Raises:
    ValueError: a problem of the whole input, naming the key and the expected form:
      unknown keys, no modality key, wrong rank, width, dtype or sample count.
  """
  allowed = set(_input_keys())
  if text_tokens:
    if "text" in arrays:
      raise ValueError(f"{source}: this run fine-tunes BERT on token ids: give 'text_ids' "
                       f"(N, T) (and optionally 'text_segments'), not 'text' features")
    allowed = (allowed - {"text", "text_mask", "text_lengths"}) | set(TOKEN_KEYS)
  unknown = sorted(set(arrays) - allowed)
  if unknown:
    raise ValueError(f"{source}: unknown keys {unknown}; expected any of "
                     f"{sorted(k for k in allowed if k not in IGNORED_KEYS)}, id")
  if not text_tokens and "text_ids" in arrays:
    raise ValueError(f"{source}: key 'text_ids' is for runs that fine-tune BERT; this run reads "
                     "'text' features")
  present = [m for m in MODALITIES if m in arrays]
  if text_tokens and "text_ids" in arrays:
    present = ["text_ids", *present]
  if not present:
    raise ValueError(f"{source}: none of the keys {MODALITIES} is present; found "
                     f"{sorted(arrays)}")
  num = int(np.shape(arrays[present[0]])[0]) if np.ndim(arrays[present[0]]) else 0
  errors: list[list[str]] = [[] for _ in range(num)]
  batch, modality_mask = {}, np.zeros((num, 3), bool)
  for index, name in enumerate(MODALITIES):
    length, width = spec.lengths[index], spec.dims[index]
    features = np.zeros((num, length, width), np.float32)
    frame_mask = np.zeros((num, length), bool)
    if name == "text" and text_tokens:
      ids = np.zeros((num, length), np.int32)
      batch["text_ids"], batch["text_segments"] = ids, ids
      features = np.zeros((num, length, 1), np.float32)
      if "text_ids" in arrays:
        features, frame_mask, batch["text_ids"], batch["text_segments"] = _token_inputs(
            arrays, spec, source)
        if features.shape[0] != num:
          raise ValueError(f"{source}: key 'text_ids' has {features.shape[0]} rows; expected "
                           f"{num}")
        modality_mask[:, index] = frame_mask.any(axis=1)
    elif name in arrays:
      x = _real_array(arrays, name, source)
      if x.ndim == 2:  # utterance-level features: one frame
        x = x[:, None, :]
      if x.ndim != 3 or x.shape[0] != num or x.shape[2] != width:
        raise ValueError(f"{source}: key {name!r} has shape {x.shape}; expected ({num}, T, "
                         f"{width}) — the width this model was trained on")
      mask, problems = _frame_mask(arrays, name, x, source)
      with np.errstate(over="ignore", invalid="ignore"):
        x = x.astype(np.float32)  # float64 beyond float32's range becomes inf: caught below
      bad = (mask & ~np.isfinite(x).all(axis=2)).any(axis=1)
      for i in range(num):
        if problems[i]:
          errors[i].append(problems[i])
        elif bad[i]:
          errors[i].append(f"key {name!r} has NaN or inf values in real frames")
      keep = min(length, x.shape[1])
      features[:, :keep] = np.where(mask[:, :keep, None], x[:, :keep], 0.0)
      frame_mask[:, :keep] = mask[:, :keep]
      modality_mask[:, index] = frame_mask.any(axis=1)
    batch[name] = features
    batch[f"{name}_mask"] = frame_mask
  if "modality_mask" in arrays:
    given = np.asarray(arrays["modality_mask"])
    if given.shape != (num, 3) or not (given.dtype == bool or np.isin(given, (0, 1)).all()):
      raise ValueError(f"{source}: key 'modality_mask' must be ({num}, 3) bool (L, A, V); got "
                       f"shape {given.shape}, dtype {given.dtype}")
    modality_mask &= given.astype(bool)
  if "id" in arrays and np.shape(arrays["id"])[:1] != (num,):
    raise ValueError(f"{source}: key 'id' has shape {np.shape(arrays['id'])}; expected ({num},)")
  for i in range(num):
    if not errors[i] and not modality_mask[i].any():
      errors[i].append("every modality is absent (no real frame of text, audio or vision)")
  invalid = np.array([bool(e) for e in errors], bool)
  for name in MODALITIES:
    # An invalid sample enters the forward pass as all-absent zeros.
    batch[name][invalid] = 0.0
    batch[f"{name}_mask"][invalid] = False
  if text_tokens:
    batch["text_ids"] = np.where(invalid[:, None], 0, batch["text_ids"])
  batch["label"] = np.zeros((num,) + ((spec.num_classes,) if spec.task == "multilabel_binary"
                                      else ()), np.float32 if spec.task == "regression"
                            else np.int32)
  return batch, modality_mask, [("; ".join(e) if e else None) for e in errors]


class Model:
  """A trained run, ready for predictions: `Model(workdir)(arrays) -> list of dicts`."""

  def __init__(self, workdir: str, *, checkpoint: str = "best"):
    self.config = load_run_config(workdir)
    self.spec = spec_from_config(self.config)
    self.stage = build_stages(self.config, self.spec)[-1]
    self.mesh = parallel.make_mesh(1)
    example, _, _ = prepare_inputs(
        {"text_ids": np.ones((2, 1), np.int32)} if self.text_tokens
        else {"text": np.zeros((2, 1, self.spec.dims[0]), np.float32)},
        self.spec, text_tokens=self.text_tokens)
    self.params, self.method_state, _ = load_stage_params(workdir, self.stage, example,
                                                          checkpoint=checkpoint)
    # On the device once, instead of copied from the host at every call.
    self.params, self.method_state = parallel.replicate((self.params, self.method_state),
                                                        self.mesh)
    self.predictor = Predictor(self.stage, self.mesh, 32, on_device=False)

  @property
  def text_tokens(self) -> bool:
    """Whether the run fine-tuned BERT, so that its text input is token ids."""
    return isinstance(self.stage.model, TextEncoderModel)

  def __call__(self, arrays: Mapping[str, np.ndarray], *, source: str = "input") -> list[dict]:
    """One record per sample: the prediction and its uncertainty, or an `error` field
    (and no prediction) for a sample that cannot be predicted (see `prepare_inputs`)."""
    batch, modality_mask, errors = prepare_inputs(arrays, self.spec, source=source,
                                                  text_tokens=self.text_tokens)
    if not errors:
      return []
    outputs = self.predictor.predict_split(
        self.params, self.method_state, batch,
        modality_mask=modality_mask & np.array([e is None for e in errors])[:, None])["output"]
    task = self.spec.task
    probabilities = np.asarray(predicted_probabilities(jnp.asarray(outputs), task))
    entropy = np.asarray(predictive_entropy(jnp.asarray(outputs), task))
    ids = arrays.get("id")
    records = []
    for i in range(len(outputs)):
      record = {"id": str(ids[i]) if ids is not None else i,
                "available": [m for m, p in zip(MODALITIES, modality_mask[i], strict=True) if p]}
      finite = np.isfinite(outputs[i]).all() and np.isfinite(probabilities[i]).all()
      if errors[i] is None and not finite:
        errors[i] = "the model output is not finite"
      if errors[i] is not None:
        record["error"] = errors[i]
        records.append(record)
        continue
      record["entropy"] = float(entropy[i])
      if task == "regression":
        record["score"] = float(outputs[i])
        record["probability_positive"] = float(probabilities[i])
      elif task == "classification":
        record["class"] = int(np.argmax(outputs[i]))
        if self.spec.class_names:
          record["class_name"] = self.spec.class_names[record["class"]]
        record["probabilities"] = [float(p) for p in probabilities[i]]
      else:
        record["present"] = [int(np.argmax(o)) for o in outputs[i]]
        record["probability_present"] = [float(p[1]) for p in probabilities[i]]
      records.append(record)
    return records


def predict_file(workdir: str, input_path: str, *, checkpoint: str = "best") -> list[dict]:
  if not os.path.exists(input_path):
    raise FileNotFoundError(f"--input {input_path} does not exist")
  arrays = {}
  with np.load(input_path, allow_pickle=False) as data:
    for key in data.files:
      try:
        arrays[key] = data[key]
      except ValueError as error:  # object arrays (ragged lists) need pickle
        raise ValueError(f"{input_path}: key {key!r} cannot be read as a plain array "
                         f"({error}); store features as float32 (N, T, D) arrays") from None
  return Model(workdir, checkpoint=checkpoint)(arrays, source=input_path)


def _define_flags():
  """Command-line flags, defined only when this module is the program (so that
  importing it from another CLI defines no duplicate flags)."""
  global _WORKDIR, _INPUT, _OUTPUT, _CHECKPOINT
  _WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by mer_jax.train.")
  _INPUT = flags.DEFINE_string("input", None, "Input .npz (bring-your-own layout).")
  _OUTPUT = flags.DEFINE_string("output", None, "Output .json (default: print).")
  _CHECKPOINT = flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Checkpoint to use.")


def main(argv):
  del argv
  if not _WORKDIR.value or not _INPUT.value:
    raise app.UsageError("--workdir and --input are required")
  records = predict_file(_WORKDIR.value, _INPUT.value, checkpoint=_CHECKPOINT.value)
  text = json.dumps(records, indent=1)
  if _OUTPUT.value:
    run_log.write_atomic(_OUTPUT.value, text)
  elif jax.process_index() == 0:
    print(text)


if __name__ == "__main__":
  _define_flags()
  cli.run(main, program="predict")
