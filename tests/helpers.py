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


def parse_flags(*argv):
  """A config as `mer_jax.train` parses it (`--config FILE[:variant]` then
  `--config.a.b=value` overrides), in-process."""
  from absl import flags
  from ml_collections import config_flags

  argv = ["train", *argv]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


def random_params(model, batch, seed=0, scale=0.3):
  """Params of `model` for `batch` with every leaf drawn from N(0, scale^2) (LayerNorm
  scales around 1): shapes from `jax.eval_shape`, so nothing is compiled for them."""
  import jax

  shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, batch,
                                             train=False))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    values = rng.normal(scale=scale, size=leaf.shape)
    if getattr(path[-1], "key", None) == "scale":
      values = 1.0 + values
    return values.astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def toy_train_config(**train):
  """A base config for trainer tests on `Toy` stages: batch 8, 3 epochs, no progress bars;
  `train` overrides `config.train` fields."""
  from mer_jax import config_lib

  config = config_lib.base_config()
  config.method = "toy"
  config.train.batch_size = 8
  config.train.num_epochs = 3
  config.train.learning_rate = 1e-2
  config.train.log_every_steps = 2
  config.train.progress = False
  config.eval.batch_size = 16
  config.train.update(train)
  return config


def load_config(name: str = "dqf_mosei.py", arg: str = "tiny"):
  """`configs/<name>`'s `get_config(arg)`."""
  import importlib.util
  import os

  from conftest import REPO

  spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, "configs", name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def read_log(workdir) -> list[dict]:
  """The records of `workdir/log.jsonl` (a line cut short by a kill is left out)."""
  import json
  import os

  path = os.path.join(workdir, "log.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def epoch_records(workdir, stage: str | None = None) -> list[dict]:
  """The per-epoch records (those with a validation loss), of one stage if given."""
  return [r for r in read_log(workdir)
          if "val/loss" in r and (stage is None or r["stage"] == stage)]


# The shared trained run (`conftest.tiny_run`): `dqf_mosei.py:tiny` on every device, every
# step logged and a small evaluation protocol. As command-line overrides for subprocesses
# that must train the same run (tests/test_multiprocess.py).
TINY_RUN_ARGS = ["--config", "configs/dqf_mosei.py:tiny", "--config.train.log_every_steps=1",
                 "--config.eval.missing_rates=(0.5,)", "--config.eval.frame_rates=(0.0,1.0)"]


def tiny_run_config():
  config = load_config("dqf_mosei.py", "tiny")
  config.train.log_every_steps = 1
  config.eval.missing_rates = (0.5,)
  config.eval.frame_rates = (0.0, 1.0)
  return config


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
