"""Configs: every file and variant loads, configs are locked, variants differ."""

import glob
import importlib.util
import os

import pytest
from conftest import REPO

CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def load(path, arg):
  spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
@pytest.mark.parametrize("arg", ["", "synthetic", "tiny"])
def test_every_config_loads_locked(path, arg):
  config = load(path, arg)
  assert config.method in os.path.basename(path)
  for name in ("seed", "num_seeds", "dtype", "data", "train", "missing", "eval", "model",
               "loss"):
    assert name in config
  for name in ("source", "name", "dir", "fold", "task"):
    assert name in config.data
  for name in ("batch_size", "num_epochs", "optimizer", "learning_rate", "weight_decay"):
    assert name in config.train
  if arg:
    assert config.data.source == "synthetic"
  with pytest.raises(AttributeError):
    config.train.num_epoch = 3  # misspelt: locked configs refuse new fields
  config.train.num_epochs = 3  # existing fields can be overridden


def test_tiny_is_smaller_than_synthetic():
  path = os.path.join(REPO, "configs", "dqf_mosei.py")
  tiny, synthetic = load(path, "tiny"), load(path, "synthetic")
  assert tiny.data.num_train and tiny.data.num_train < 200
  assert tiny.train.num_epochs <= synthetic.train.num_epochs


def test_unknown_variant_is_an_error():
  with pytest.raises(ValueError, match="unknown config variant"):
    load(os.path.join(REPO, "configs", "dqf_mosei.py"), "tinyy")
