"""Small shared fixtures for tests: a tiny DataSpec, a random batch in the layout and a
toy model for trainer tests."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mer_jax.data.spec import DataSpec


def tiny_spec(task="regression", lengths=(6, 5, 4), dims=(7, 5, 3), num_classes=None):
  num_classes = num_classes or {"regression": 1, "classification": 4,
                                "multilabel_binary": 4}[task]
  return DataSpec(name="tiny", task=task, num_classes=num_classes, dims=dims, lengths=lengths,
                  label_range=(-3.0, 3.0) if task == "regression" else None)


def random_batch(spec, batch_size=4, seed=0, real_lengths=None):
  rng = np.random.default_rng(seed)
  batch = {}
  for index, name in enumerate(("text", "audio", "vision")):
    length = spec.lengths[index]
    real = (real_lengths[index] if real_lengths is not None
            else rng.integers(1, length + 1, batch_size))
    mask = np.arange(length)[None] < np.asarray(real).reshape(-1, 1)
    mask = np.broadcast_to(mask, (batch_size, length)).copy()
    x = rng.normal(size=(batch_size, length, spec.dims[index])).astype(np.float32)
    batch[name] = np.where(mask[..., None], x, 0.0).astype(np.float32)
    batch[f"{name}_mask"] = mask
  if spec.task == "regression":
    batch["label"] = rng.uniform(-3, 3, batch_size).astype(np.float32)
  elif spec.task == "classification":
    batch["label"] = rng.integers(0, spec.num_classes, batch_size).astype(np.int32)
  else:
    batch["label"] = rng.integers(0, 2, (batch_size, spec.num_classes)).astype(np.int32)
  return batch


class Toy(nn.Module):
  """Masked mean of each modality -> Dense -> regression output; with `log_output` the
  output is log(mean of the first text feature), NaN where that mean is negative."""

  log_output: bool = False

  @nn.compact
  def __call__(self, batch, train=False):
    del train
    pooled = []
    for name in ("text", "audio", "vision"):
      mask = batch[f"{name}_mask"][..., None]
      pooled.append((batch[name] * mask).sum(1) / jnp.maximum(mask.sum(1), 1))
    embedding = nn.Dense(4)(jnp.concatenate(pooled, axis=-1))
    output = nn.Dense(1)(embedding)[:, 0]
    if self.log_output:
      output = jnp.log(pooled[0][:, 0]) + 0.0 * output
    return {"output": output, "embedding": embedding}


def force_streamed_shards(monkeypatch):
  """The large-split path at test size: one example per array_record shard, and TFDS's
  shuffler told to spill at once (its spill needs TensorFlow, so a builder that still
  went through it fails). Needs a machine without TensorFlow, as mer_jax's."""
  import importlib.util

  import pytest
  import tensorflow_datasets.core.shuffle

  from mer_jax.data.builders import streaming

  if importlib.util.find_spec("tensorflow") is not None:
    pytest.skip("TensorFlow is installed: preparing without it cannot be checked here")
  monkeypatch.setattr(streaming, "SHARD_BYTES", 1)
  monkeypatch.setattr(tensorflow_datasets.core.shuffle, "MAX_MEM_BUFFER_SIZE", 0)
