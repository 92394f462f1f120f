"""Shared config defaults. Every `configs/<method>_<dataset>.py` starts from
`base_config()` and overrides what its paper decides.

The defaults live in the package (not in `configs/`) so that a config file loads the
same way from any working directory. Configs come back locked: a misspelt override
(`--config.train.num_epoch=3`) is an error, not a silently ignored new field.
"""

from __future__ import annotations

import ml_collections

from mer_jax.data.missing import COMBINATION_NAMES
from mer_jax.data.pipeline import DEVICE_MEMORY_SHARE

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
  # num_seeds > 1: train the seeds stacked in one vmapped program (accelerators), or one
  # after another (False; on a 2-core CPU the stacked step measured 1.4x slower than K
  # single steps, docs/performance.md). Each seed's results are the same either way.
  config.seeds_in_one_program = True
  config.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
  config.num_devices = 0  # 0 = every visible device.

  # Data: where the features come from and which task they define (SPEC section 9).
  config.data = ml_collections.ConfigDict()
  config.data.source = "synthetic"
  config.data.name = "mosei"
  config.data.dir = ""  # Real sources: the folder with the user's files (read-only).
  # The file to read in that folder where a source has several (MMSA MOSI/MOSEI:
  # aligned_50.pkl | unaligned_50.pkl); "" = the source's default.
  config.data.file = ""
  config.data.fold = 0
  config.data.task = "regression"
  config.data.on_device = True  # Keep whole splits on the accelerator when they fit:
  # a split is resident only if it takes at most this share of one device's memory (CPU:
  # of host memory); larger ones stream from host memory with prefetch, same batches.
  config.data.device_memory_share = DEVICE_MEMORY_SHARE
  config.data.seed = 0  # Synthetic data seed: the data stay fixed when config.seed changes.
  config.data.num_train = 0  # Synthetic sizes; 0 = the preset's default.
  config.data.num_valid = 0
  config.data.num_test = 0
  config.data.cache_dir = ""  # Where TFDS builders write; "" = ~/.cache/mer_jax/tfds.
  # Per modality (text, audio, vision), which features a source reads; () = the source's
  # default: merbench Baichuan-13B-Base-FRA / wav2vec2-large-960h-FRA /
  # clip-vit-large-patch14-FRA, mmin bert_large / comparE (MSP-IMPROV comparE_raw) /
  # denseface, npz the keys text / audio / vision. mmsa and mult have one feature set.
  config.data.features = ()
  # Per modality, the longest sequence kept (longer ones are average-pooled to it);
  # () = as stored. Read by merbench and mmin.
  config.data.max_lengths = ()

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
  # A NaN/inf loss or gradient: "stop" the run with a message naming the step, the
  # terms and the last good checkpoint, or "skip" the update and count it in the log.
  config.train.on_nonfinite = "stop"
  config.train.log_every_steps = 10
  config.train.progress = True  # tqdm bars
  # Model selection on the validation split: this metric, averaged over the 7 fixed
  # combinations ("fixed"), on full modalities ("full"), or on full modalities with every
  # modality's frames dropped at `selection_frame_rate` ("frame", LNLN's protocol).
  config.train.selection_metric = ""  # "" = the task's primary metric
  config.train.selection_scenarios = "fixed"
  config.train.selection_frame_rate = 0.5
  # Checkpoints: `latest` every N epochs, and also mid-epoch once this many seconds have
  # passed since the last write (0 = off); the best state waits on the devices and is
  # written with the next `latest`. SIGTERM always writes one (exit 75); a SIGKILL loses
  # at most one interval.
  config.train.checkpoint_every_epochs = 1
  config.train.checkpoint_every_seconds = 0.0

  # Training-time missing-modality protocol (SPEC section 5); methods override.
  config.missing = ml_collections.ConfigDict()
  config.missing.kind = "none"  # none | drop | random_mr | frame_lnln | frame_dqf | noise
  config.missing.probs = (1 / 7,) * 7
  config.missing.missing_rate = 0.0
  config.missing.fill = "zero"  # zero | normal: what a dropped frame becomes
  # Dropped frames are replaced and stay unflagged in the frame masks (LNLN, EASE, DQF):
  # the model sees the corrupted sequence. True also masks them out like padding, in
  # training and in every frame-level evaluation scenario.
  config.missing.flag_dropped_frames = False
  config.missing.noise_intensity = 0.0

  # Evaluation protocols run at the end of training and by `mer_jax.evaluate`.
  config.eval = ml_collections.ConfigDict()
  config.eval.fixed = True
  config.eval.missing_rates = MISSING_RATES
  config.eval.frame_rates = FRAME_RATES
  config.eval.frame_sets = COMBINATION_NAMES
  config.eval.frame_mode = "random"  # random: each frame w.p. r | span: one run (DQF supp.)
  config.eval.frame_fill = "zero"  # zero | normal
  config.eval.noise_intensities = ()
  config.eval.batch_size = 256
  # Scenarios evaluated together in one compiled call (vmapped); memory grows with it.
  config.eval.scenarios_per_call = 8
  config.eval.checkpoint = "best"  # best | latest
  config.eval.embeddings = False
  config.eval.split = "test"

  config.model = ml_collections.ConfigDict()
  # Text branch: "features" reads the data's text features; "bert" fine-tunes a BERT
  # (nn/bert.py) on the token ids the data carry (MMSA `text_bert`), loaded from a local
  # Hugging Face folder (config.json + model.safetensors); see docs/methods.md#fine-tuning-bert.
  config.model.text_encoder = "features"
  config.model.text_encoder_path = ""
  config.model.text_encoder_remat = False  # recompute BERT layers in the backward pass
  # The encoder's own peak learning rate (same schedule); 0 = config.train.learning_rate.
  config.train.text_encoder_learning_rate = 0.0
  config.loss = ml_collections.ConfigDict()

  # Logging: log.jsonl always; TensorBoard event files in DIR/tensorboard/ (tensorboardX,
  # no TensorFlow): train and validation scalars, evaluation figures, the config.
  config.log = ml_collections.ConfigDict()
  config.log.tensorboard = True
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


_CHOICES = {
    "dtype": ("float32", "bfloat16"),
    "train.optimizer": ("adamw", "adam", "sgd"),
    "train.schedule": ("constant", "cosine", "linear"),
    "train.on_nonfinite": ("stop", "skip"),
    "train.selection_scenarios": ("fixed", "full", "frame"),
    "teacher.selection": ("best", "last"),
    "eval.checkpoint": ("best", "latest"),
    "missing.fill": ("zero", "normal"),
    "eval.frame_mode": ("random", "span"),
    "eval.frame_fill": ("zero", "normal"),
    "model.text_encoder": ("features", "bert"),
    # DQF's Table 4 ablations (mer_jax.methods.dqf).
    "model.unimodal_encoder": ("qua", "transformer"),
    "model.pair_fusion": ("qca", "transformer", "mult"),
}
# Which sources read the per-modality `config.data` options.
DATA_OPTION_READERS = {"features": ("merbench", "mmin", "npz"),
                       "max_lengths": ("merbench", "mmin")}
# Sources whose splits carry token ids (`text_ids`, `text_segments`) for a text encoder.
TOKEN_ID_SOURCES = ("mmsa",)


def _get(config, name: str):
  value = config
  for part in name.split("."):
    value = value.get(part) if hasattr(value, "get") else None
  return value


def validate_config(config, spec=None, *, num_train: int | None = None) -> None:
  """Checks a run config before any data loading or compilation.

  Without `spec`: names (method, source, task, optimiser, schedule, protocols), the
  device count and batch-size divisibility. With `spec` (the DataSpec the data
  loaded with) also the dataset's task against the config and the method, and with
  `num_train` the training batch against the training split.

  Raises:
    ValueError: naming the offending config field, its value and what is accepted.
  """
  import jax

  from mer_jax.data import missing
  from mer_jax.data.sources import SOURCES
  from mer_jax.data.spec import TASKS
  from mer_jax.methods import METHODS, SUPPORTED_TASKS

  def fail(field, message):
    raise ValueError(f"config.{field}={_get(config, field)!r}: {message}")

  if config.method not in METHODS:
    fail("method", f"unknown method; choose one of {METHODS}")
  if config.data.source not in SOURCES:
    fail("data.source", f"unknown data source; choose one of {SOURCES}")
  if config.data.task not in TASKS:
    fail("data.task", f"unknown task; choose one of {TASKS}")
  for field, choices in _CHOICES.items():
    if _get(config, field) is not None and _get(config, field) not in choices:
      fail(field, f"choose one of {choices}")
  for field in ("missing.kind", "teacher.missing.kind"):
    if _get(config, field) is not None and _get(config, field) not in missing.TRAINING_KINDS:
      fail(field, f"unknown training protocol; choose one of {missing.TRAINING_KINDS}")
  for prefix in ("missing", "teacher.missing"):
    probs, rate = _get(config, f"{prefix}.probs"), _get(config, f"{prefix}.missing_rate")
    if probs is not None and (len(probs) != 7 or min(probs) < 0 or sum(probs) <= 0):
      fail(f"{prefix}.probs", "must be 7 non-negative weights (one per combination L, A, V, "
           "LA, LV, AV, LAV) with a positive sum")
    if rate is not None and not 0.0 <= float(rate) <= 1.0:
      fail(f"{prefix}.missing_rate", "must be in [0, 1]")
  for field in ("num_seeds", "train.num_epochs", "train.log_every_steps", "train.batch_size",
                "eval.batch_size", "eval.scenarios_per_call"):
    if int(_get(config, field)) < 1:
      fail(field, "must be >= 1")
  if _get(config, "teacher.num_epochs") is not None and int(config.teacher.num_epochs) < 1:
    fail("teacher.num_epochs", "must be >= 1")
  if int(config.train.checkpoint_every_epochs) < 1:
    fail("train.checkpoint_every_epochs", "must be >= 1")
  if float(config.train.checkpoint_every_seconds) < 0:
    fail("train.checkpoint_every_seconds", "must be >= 0 (0 = no time-based writes)")
  if not 0.0 <= float(config.train.selection_frame_rate) <= 1.0:
    fail("train.selection_frame_rate", "must be in [0, 1]")
  for field in ("train.learning_rate", "teacher.learning_rate"):
    if _get(config, field) is not None and float(_get(config, field)) < 0:
      fail(field, "must be >= 0" + (" (0 = config.train.learning_rate)"
                                   if field.startswith("teacher") else ""))
  if _get(config, "model.text_encoder") == "bert":
    if not _get(config, "model.text_encoder_path"):
      fail("model.text_encoder_path", "this config fine-tunes BERT "
           "(config.model.text_encoder='bert'): pass --config.model.text_encoder_path=FOLDER, "
           "a local Hugging Face BERT folder holding config.json and model.safetensors "
           "(vocab.txt optional; docs/methods.md#fine-tuning-bert), or "
           "--config.model.text_encoder=features to train on the data's frozen text "
           "features instead (its numbers are not the papers')")
    if config.data.source not in TOKEN_ID_SOURCES:
      fail("data.source", f"gives no token ids; config.model.text_encoder='bert' reads the "
           f"ids of {TOKEN_ID_SOURCES} data (MMSA text_bert)")
  if float(_get(config, "train.text_encoder_learning_rate") or 0.0) < 0:
    fail("train.text_encoder_learning_rate", "must be >= 0 (0 = config.train.learning_rate)")

  for field, readers in DATA_OPTION_READERS.items():
    value = tuple(_get(config, f"data.{field}") or ())
    if value and config.data.source not in readers:
      fail(f"data.{field}", f"is not read by config.data.source={config.data.source!r}; "
           f"only by {readers} (leave it () for the source's own features)")
    if value and len(value) != 3:
      fail(f"data.{field}", "must have three entries (text, audio, vision), or be () for the "
           "source's default")
  if any(int(v) < 0 for v in tuple(_get(config, "data.max_lengths") or ())):
    fail("data.max_lengths", "must be >= 0 per modality (0 = as stored)")

  visible = jax.device_count()
  if config.num_devices < 0 or config.num_devices > visible:
    fail("num_devices", f"must be between 0 (every device) and the {visible} visible devices")
  devices = config.num_devices or visible
  for field in ("train.batch_size", "eval.batch_size"):
    if int(_get(config, field)) % devices:
      fail(field, f"must be divisible by the number of devices ({devices}); the batch is "
           "split evenly over them")

  if spec is None:
    _check_method_fields(config)
  else:
    if spec.task != config.data.task:
      fail("data.task", f"but the dataset {spec.name!r} from config.data.source="
           f"{config.data.source!r} is a {spec.task!r} dataset")
    supported = SUPPORTED_TASKS[config.method]
    if spec.task not in supported:
      fail("method", f"cannot do the {spec.task!r} task of dataset {spec.name!r} "
           f"(config.data.task); it supports {supported}")
  if num_train is not None and num_train < config.train.batch_size:
    fail("train.batch_size", f"is larger than the training split ({num_train} samples): "
         "no full batch can be drawn")


def _check_method_fields(config) -> None:
  """Builds the method's stages for a stand-in dataset of the config's task, so that
  everything a method checks when it is built (its `config.model` / `config.loss`
  choices, a BERT folder's files) fails before any data are loaded. Building creates
  modules and loss closures only; nothing is initialised or compiled."""
  from mer_jax.data.spec import DataSpec
  from mer_jax.methods import build_stages

  task = config.data.task
  stand_in = DataSpec(name=config.data.name or "stand_in", task=task,
                      num_classes=1 if task == "regression" else 4, dims=(8, 8, 8),
                      lengths=(4, 4, 4), label_range=(-3.0, 3.0) if task == "regression"
                      else None)
  build_stages(config, stand_in)


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config.lock()
  return config
