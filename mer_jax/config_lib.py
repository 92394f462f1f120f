"""Shared config defaults. Every `configs/<method>_<dataset>.py` starts from
`base_config()` and overrides what its paper decides.

The defaults live in the package (not in `configs/`) so that a config file loads the
same way from any working directory. Configs come back locked: a misspelt override
(`--config.train.num_epoch=3`) is an error, not a silently ignored new field.
"""

from __future__ import annotations

import ml_collections

from mer_jax.data.missing import COMBINATION_NAMES

VARIANTS = ("", "synthetic", "tiny")

# Eval rates used by the papers: MCUR/MMIN random missing rates; DQF frame rates.
MISSING_RATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
FRAME_RATES = tuple(round(0.1 * i, 1) for i in range(11))


def parse_variant(arg: str | None) -> str:
  """`get_config(arg)` accepts "", "synthetic" or "tiny" (the part after `:`)."""
  arg = (arg or "").strip()
  if arg not in VARIANTS:
    raise ValueError(f"unknown config variant {arg!r}: expected one of "
                     f"{[v for v in VARIANTS if v]} (or none for the real dataset)")
  return arg


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.method = ""
  config.seed = 0
  config.num_seeds = 1
  config.dtype = "float32"
  config.num_devices = 0  # 0 = every visible device.

  # Data: where the features come from and which task they define (SPEC section 9).
  config.data = ml_collections.ConfigDict()
  config.data.source = "synthetic"
  config.data.name = "mosei"
  config.data.dir = ""  # Real sources: the folder with the user's files (read-only).
  config.data.fold = 0
  config.data.task = "regression"
  config.data.on_device = True  # Keep whole splits on the accelerator when they fit.
  config.data.seed = 0  # Synthetic data seed: the data stay fixed when config.seed changes.
  config.data.num_train = 0  # Synthetic sizes; 0 = the preset's default.
  config.data.num_valid = 0
  config.data.num_test = 0
  config.data.cache_dir = ""  # Where TFDS builders write; "" = ~/.cache/mer_jax/tfds.

  # Optimiser and loop.
  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 64
  config.train.num_epochs = 20
  config.train.optimizer = "adamw"  # adamw | adam | sgd
  config.train.learning_rate = 1e-4
  config.train.weight_decay = 1e-4
  config.train.momentum = 0.9  # sgd only
  config.train.schedule = "constant"  # constant | cosine | linear
  config.train.warmup_epochs = 0
  config.train.grad_clip = 1.0  # global-norm clip; 0 disables
  config.train.log_every_steps = 10
  config.train.progress = True  # tqdm bars
  # Model selection on the validation split: this metric, averaged over the 7 fixed
  # combinations ("fixed") or on full modalities ("full").
  config.train.selection_metric = ""  # "" = the task's primary metric
  config.train.selection_scenarios = "fixed"

  # Training-time missing-modality protocol (SPEC section 5); methods override.
  config.missing = ml_collections.ConfigDict()
  config.missing.kind = "none"  # none | drop | random_mr | frame_lnln | frame_dqf | noise
  config.missing.probs = (1 / 7,) * 7
  config.missing.missing_rate = 0.0
  config.missing.fill = "zero"  # zero | normal
  config.missing.noise_intensity = 0.0

  # Evaluation protocols run at the end of training and by `mer_jax.evaluate`.
  config.eval = ml_collections.ConfigDict()
  config.eval.fixed = True
  config.eval.missing_rates = MISSING_RATES
  config.eval.frame_rates = FRAME_RATES
  config.eval.frame_sets = COMBINATION_NAMES
  config.eval.noise_intensities = ()
  config.eval.batch_size = 256
  config.eval.checkpoint = "best"  # best | latest
  config.eval.embeddings = False
  config.eval.split = "test"

  config.model = ml_collections.ConfigDict()
  config.loss = ml_collections.ConfigDict()
  return config


def apply_variant(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """`:synthetic` trains on the embedded data with the real shapes; `:tiny` shrinks
  data, model-independent loop settings and evaluation to a seconds-long run."""
  if variant in ("synthetic", "tiny"):
    config.data.source = "synthetic"
  if variant == "tiny":
    config.data.num_train = 64
    config.data.num_valid = 32
    config.data.num_test = 32
    config.train.batch_size = 16
    config.train.num_epochs = 2
    config.train.log_every_steps = 2
    config.train.progress = False
    config.eval.missing_rates = (0.3, 0.7)
    config.eval.frame_rates = (0.0, 0.5, 1.0)
    config.eval.frame_sets = ("L", "LAV")
    config.eval.batch_size = 32
  return config


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config.lock()
  return config
