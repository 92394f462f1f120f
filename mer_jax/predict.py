r"""Predictions, with uncertainty, for inputs with any modality or frames absent.

    python -m mer_jax.predict --workdir /tmp/run --input features.npz --output preds.json

The input is the bring-your-own npz layout (docs/data.md): `text`, `audio`, `vision`
arrays (N, T, D) of the widths the model was trained on — any of them may be absent
(the modality is then treated as missing) — optional `<modality>_lengths` (N,) or
`<modality>_mask` (N, T) for missing/padded frames, and optional `id` (N,).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from mer_jax import parallel
from mer_jax.data.spec import MODALITIES, DataSpec
from mer_jax.evaluate import load_run_config
from mer_jax.losses.task import predicted_probabilities, predictive_entropy
from mer_jax.methods import build_stages
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


def prepare_inputs(arrays: Mapping[str, np.ndarray], spec: DataSpec, *, source: str = "input"):
  """Bring-your-own arrays -> (batch arrays in the model's layout, modality_mask (N, 3)).

  Absent modalities become zeros flagged missing; sequences are padded or cut to the
  trained length; lengths/masks mark missing frames. Errors name the key and the
  expected form.
  """
  present = [m for m in MODALITIES if m in arrays]
  if not present:
    raise ValueError(f"{source}: none of the keys {MODALITIES} is present; found "
                     f"{sorted(arrays)}")
  num = int(np.asarray(arrays[present[0]]).shape[0])
  batch, modality_mask = {}, np.zeros((num, 3), bool)
  for index, name in enumerate(MODALITIES):
    length, width = spec.lengths[index], spec.dims[index]
    features = np.zeros((num, length, width), np.float32)
    frame_mask = np.zeros((num, length), bool)
    if name in arrays:
      x = np.asarray(arrays[name], np.float32)
      if x.ndim == 2:  # utterance-level features: one frame
        x = x[:, None, :]
      if x.ndim != 3 or x.shape[0] != num or x.shape[2] != width:
        raise ValueError(f"{source}: key {name!r} has shape {x.shape}; expected ({num}, T, "
                         f"{width}) — the width this model was trained on")
      if not np.all(np.isfinite(x)):
        raise ValueError(f"{source}: key {name!r} contains NaN or inf values")
      mask = np.ones(x.shape[:2], bool)
      if f"{name}_mask" in arrays:
        mask = np.asarray(arrays[f"{name}_mask"], bool)
        if mask.shape != x.shape[:2]:
          raise ValueError(f"{source}: key {name}_mask has shape {mask.shape}; expected "
                           f"{x.shape[:2]}")
      elif f"{name}_lengths" in arrays:
        lengths = np.asarray(arrays[f"{name}_lengths"]).astype(np.int64)
        if lengths.shape != (num,) or lengths.min() < 0:
          raise ValueError(f"{source}: key {name}_lengths must be ({num},) non-negative ints")
        mask = np.arange(x.shape[1])[None, :] < lengths[:, None]
      keep = min(length, x.shape[1])
      features[:, :keep] = np.where(mask[:, :keep, None], x[:, :keep], 0.0)
      frame_mask[:, :keep] = mask[:, :keep]
      modality_mask[:, index] = frame_mask.any(axis=1)
    batch[name] = features
    batch[f"{name}_mask"] = frame_mask
  batch["label"] = np.zeros((num,) + ((spec.num_classes,) if spec.task == "multilabel_binary"
                                      else ()), np.float32 if spec.task == "regression"
                            else np.int32)
  return batch, modality_mask


class Model:
  """A trained run, ready for predictions: `Model(workdir)(arrays) -> list of dicts`."""

  def __init__(self, workdir: str, *, checkpoint: str = "best"):
    self.config = load_run_config(workdir)
    self.spec = spec_from_config(self.config)
    self.stage = build_stages(self.config, self.spec)[-1]
    self.mesh = parallel.make_mesh(1)
    example, _ = prepare_inputs({"text": np.zeros((2, 1, self.spec.dims[0]), np.float32)},
                                self.spec)
    self.params, self.method_state, _ = load_stage_params(workdir, self.stage, example,
                                                          checkpoint=checkpoint)
    self.predictor = Predictor(self.stage, self.mesh, 32, on_device=False)

  def __call__(self, arrays: Mapping[str, np.ndarray], *, source: str = "input") -> list[dict]:
    batch, modality_mask = prepare_inputs(arrays, self.spec, source=source)
    outputs = self.predictor.predict_split(self.params, self.method_state, batch,
                                           modality_mask=modality_mask)["output"]
    task = self.spec.task
    probabilities = np.asarray(predicted_probabilities(jnp.asarray(outputs), task))
    entropy = np.asarray(predictive_entropy(jnp.asarray(outputs), task))
    ids = arrays.get("id")
    records = []
    for i in range(len(outputs)):
      record = {"id": str(ids[i]) if ids is not None else i,
                "available": [m for m, p in zip(MODALITIES, modality_mask[i], strict=True) if p],
                "entropy": float(entropy[i])}
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
  with np.load(input_path, allow_pickle=False) as data:
    arrays = {k: data[k] for k in data.files}
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
    with open(_OUTPUT.value, "w") as f:
      f.write(text)
  elif jax.process_index() == 0:
    print(text)


if __name__ == "__main__":
  parallel.enable_compilation_cache()
  _define_flags()
  app.run(main)
