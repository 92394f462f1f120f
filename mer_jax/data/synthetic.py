"""Synthetic multimodal data with the shapes of the real benchmarks (SPEC section 9).

Each preset has the feature widths and sequence lengths of one real dataset, so that a
config trained on `:synthetic` data builds exactly the model the real data would need.
The data are generated, deterministic from `(seed, preset, split)`, and have a
structure a model can learn:

  label -> code c (q dims: scaled one-hot of the class, or (u, u^2 - 1/3) of the
           sentiment u = label / half-range), plus noise shared by all modalities
        -> per modality m, frames in an r_m-dim subspace:
           f_t = gain_m * (envelope_m(t) * G_m c + wave_m(t) * W_m c)
                 + per-sample nuisance + per-frame noise
        -> features x_t = scale_m * (P_m f_t + isotropic noise)   (D_m dims)

`G_m`, `W_m` have unit-norm columns, so every modality carries the label with the same
energy and `gain_m` alone sets how informative it is: text > audio > vision (vision weak
but not useless), as in the real benchmarks. `envelope_m` is a positive waveform (its
time average carries the label, so a probe on mean-pooled features finds it); `wave_m` is
a zero-mean oscillation whose label direction `W_m c` mostly cancels under mean pooling
and rewards temporal models. Each modality has its own frequencies and phases. The noise
shared by all modalities caps what any model, unimodal or fused, can reach.

Regression labels follow the shape of the real label distributions (many near 0, a
spread to the range ends, a share of exact zeros from the annotation grid); class labels
follow the real class priors. Real lengths vary per sample (at least 30% of T_m; padding
is zeros with mask False); one utterance duration drives all modalities of a sample.

Everything shared between splits (read-outs, projections, phases, scales) comes from
`(seed, preset)` only; the samples of a split come from `(seed, preset, split)` in fixed
chunks, so asking for fewer samples returns a prefix of the full split.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import numpy as np

from mer_jax.data.spec import MODALITIES, DataSpec

# Bump when the generated numbers change: TFDS caches prepared data under this version.
GENERATOR_VERSION = "1.0.0"

SPLITS = ("train", "valid", "test")
DEFAULT_SIZES = {"train": 1024, "valid": 256, "test": 256}
# Presets whose splits would exceed ~200 MB of float32 at the default sizes get these.
_LARGE_SIZES = {"train": 512, "valid": 128, "test": 128}

SUBSPACE_DIM = 8  # rank r_m of each modality's signal subspace (capped by D_m)
CHUNK_SIZE = 128  # samples per independently seeded chunk (makes prefixes stable)
MIN_LENGTH_FRACTION = 0.3  # the shortest real sequence is this share of T_m

# Per-modality generative constants, order (L, A, V). The gain sets informativeness.
MODALITY_GAIN = (1.0, 0.6, 0.42)
ENVELOPE_FREQUENCY = (1.0, 3.0, 2.0)  # cycles per full sequence
WAVE_FREQUENCY = (2.0, 5.0, 3.0)
CODE_SCALE = 1.5  # norm of the label code
SHARED_NOISE = 0.45  # label-independent part of the code, shared by all modalities
NUISANCE_NOISE = 0.7  # per-sample, per-modality offset in the signal subspace
FRAME_NOISE = 0.8  # per-frame noise in the signal subspace
ISOTROPIC_NOISE = 0.6  # per-frame noise in every feature dimension


@dataclasses.dataclass(frozen=True)
class Preset:
  """Facts of one synthetic preset.

  Attributes:
    name: preset name, also the DataSpec name.
    task: the natural task (`regression` or `classification`).
    dims: feature widths (L, A, V).
    lengths: sequence lengths (L, A, V).
    aligned: whether the modalities share one time axis (same real length per sample).
    label_range: regression label range.
    label_step: regression labels lie on this annotation grid (averaged annotator scores).
    label_mean, label_std: location and spread of the regression labels before clipping.
    class_names: class names (classification).
    class_priors: class frequencies of the real training data (classification).
    sizes: default split sizes.
    source: where the widths and lengths come from.
  """

  name: str
  task: str
  dims: tuple[int, int, int]
  lengths: tuple[int, int, int]
  aligned: bool
  label_range: tuple[float, float] | None = None
  label_step: float = 0.0
  label_mean: float = 0.0
  label_std: float = 1.0
  class_names: tuple[str, ...] = ()
  class_priors: tuple[float, ...] = ()
  sizes: dict[str, int] = dataclasses.field(default_factory=lambda: dict(DEFAULT_SIZES))
  source: str = ""

  @property
  def num_classes(self) -> int:
    return len(self.class_names) if self.task == "classification" else 1


def _priors(*counts: float) -> tuple[float, ...]:
  total = float(sum(counts))
  return tuple(c / total for c in counts)


_EMOTIONS4 = ("neutral", "happy", "sad", "angry")

PRESETS: dict[str, Preset] = {
    "mosi": Preset(
        name="mosi", task="regression", dims=(768, 5, 20), lengths=(50, 50, 50), aligned=True,
        label_range=(-3.0, 3.0), label_step=0.2, label_mean=0.0, label_std=1.5,
        source="MMSA aligned_50.pkl: BERT 768, COVAREP 5, Facet 20, 50 steps"),
    "mosei": Preset(
        name="mosei", task="regression", dims=(768, 74, 35), lengths=(50, 50, 50), aligned=True,
        label_range=(-3.0, 3.0), label_step=1.0 / 3.0, label_mean=0.15, label_std=1.1,
        source="MMSA aligned_50.pkl: BERT 768, COVAREP 74, Facet 35, 50 steps"),
    "sims": Preset(
        name="sims", task="regression", dims=(768, 33, 709), lengths=(39, 400, 55),
        aligned=False, label_range=(-1.0, 1.0), label_step=0.2, label_mean=-0.1,
        label_std=0.55, sizes=dict(_LARGE_SIZES),
        source="MMSA unaligned_39.pkl: BERT 768 x 39, LibROSA 33 x 400, OpenFace 709 x 55"),
    "iemocap": Preset(
        name="iemocap", task="classification", dims=(300, 74, 35), lengths=(20, 20, 20),
        aligned=True, class_names=_EMOTIONS4, class_priors=_priors(1708, 1636, 1084, 1103),
        source="MulT iemocap_data.pkl: GloVe 300, COVAREP 74, Facet 35, 20 steps; priors as "
               "CM-ARR Table 1"),
    "meld": Preset(
        name="meld", task="classification", dims=(5120, 1024, 768), lengths=(16, 16, 16),
        aligned=True,
        class_names=("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"),
        class_priors=_priors(4710, 1205, 268, 683, 1743, 271, 1109), sizes=dict(_LARGE_SIZES),
        source="DQF Sec. 4.2 (MERBench features): Baichuan-13B 5120, wav2vec 2.0 large 1024, "
               "CLIP ViT-L/14 768, frame-aligned to 16 steps; priors = MELD train counts"),
    "msp_improv": Preset(
        name="msp_improv", task="classification", dims=(768, 768, 342), lengths=(32, 50, 50),
        aligned=False, class_names=_EMOTIONS4, class_priors=_priors(1733, 999, 627, 460),
        sizes=dict(_LARGE_SIZES),
        source="CM-ARR Sec. 3.1.1: BERT-base 768 x 32 tokens, wav2vec2-base 768 pooled to 50 "
               "steps, Denseface 342 x 50 frames; priors as CM-ARR Table 1"),
}


def _preset(name: str) -> Preset:
  if name not in PRESETS:
    raise ValueError(f"unknown synthetic preset {name!r}: expected one of {sorted(PRESETS)}")
  return PRESETS[name]


def default_sizes(preset: str) -> dict[str, int]:
  """Default number of samples per split of a preset."""
  return dict(_preset(preset).sizes)


def spec_for(preset: str, task: str | None = None) -> DataSpec:
  """The DataSpec of a preset for `task` (default: the preset's natural task).

  Classification presets also serve the MulT-style `multilabel_binary` task (one binary
  head per emotion, the label one-hot); regression presets only serve regression.
  """
  info = _preset(preset)
  task = task or info.task
  allowed = ("regression",) if info.task == "regression" else ("classification",
                                                               "multilabel_binary")
  if task not in allowed:
    raise ValueError(f"synthetic preset {preset!r} supports task in {allowed}, got {task!r}")
  return DataSpec(name=info.name, task=task, num_classes=info.num_classes, dims=info.dims,
                  lengths=info.lengths, label_range=info.label_range,
                  class_names=info.class_names)


def to_multilabel_binary(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Class ids (N,) -> int32 (N, K) binaries, 1 for the sample's class (MulT IEMOCAP form)."""
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels must be (N,) class ids in [0, {num_classes}), got shape "
                     f"{labels.shape}")
  return (labels[:, None] == np.arange(num_classes)[None]).astype(np.int32)


def _stable_hash(text: str) -> int:
  return zlib.crc32(text.encode("utf-8"))


def _structure_rng(preset: str, seed: int) -> np.random.Generator:
  return np.random.default_rng([seed, _stable_hash(preset)])


def _chunk_rng(preset: str, split: str, seed: int, chunk: int) -> np.random.Generator:
  return np.random.default_rng([seed, _stable_hash(preset), _stable_hash(split), chunk])


def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
  """(rows, cols) with orthonormal columns (rows >= cols)."""
  q, r = np.linalg.qr(rng.standard_normal((rows, cols)))
  return q * np.sign(np.diag(r))[None]


def _code_dim(info: Preset) -> int:
  return info.num_classes if info.task == "classification" else 2


def _unit_columns(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
  """(rows, cols) with unit-norm columns, orthonormal when rows >= cols: every modality
  then carries the label with the same energy, and the gain alone sets informativeness."""
  if rows >= cols:
    return _orthonormal(rng, rows, cols)
  columns = rng.standard_normal((rows, cols))
  return columns / np.linalg.norm(columns, axis=0, keepdims=True)


def _structure(info: Preset, seed: int) -> dict:
  """Everything the splits share: label read-outs, projections, phases, scales."""
  rng = _structure_rng(info.name, seed)
  code_dim = _code_dim(info)
  structure = {}
  for index, name in enumerate(MODALITIES):
    width = info.dims[index]
    rank = min(SUBSPACE_DIM, width)
    structure[name] = {
        "readout": _unit_columns(rng, rank, code_dim).astype(np.float32),
        "wave_readout": _unit_columns(rng, rank, code_dim).astype(np.float32),
        # Scaled so that a unit subspace vector gives unit variance per feature dimension.
        "projection": (_orthonormal(rng, width, rank) * math.sqrt(width / rank)).astype(
            np.float32),
        "dim_scale": np.exp(0.25 * rng.standard_normal(width)).astype(np.float32),
        "envelope_phase": rng.uniform(0, 2 * np.pi),
        "wave_phase": rng.uniform(0, 2 * np.pi),
    }
  return structure


def _sample_labels(info: Preset, rng: np.random.Generator, count: int) -> np.ndarray:
  if info.task == "classification":
    return rng.choice(info.num_classes, size=count, p=np.asarray(info.class_priors)).astype(
        np.int32)
  low, high = info.label_range
  raw = rng.normal(info.label_mean, info.label_std, count)
  # Real sentiment labels are averages of annotator scores: they sit on a grid, which
  # puts a share of them at exactly 0.
  labels = np.round(np.clip(raw, low, high) / info.label_step) * info.label_step
  return np.clip(labels, low, high).astype(np.float32)


def _semantic_code(info: Preset, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """(N, q) code of the label that all modalities read, plus noise they all share (which
  caps what any model, unimodal or fused, can reach)."""
  if info.task == "classification":
    signal = CODE_SCALE * (labels[:, None] == np.arange(info.num_classes)[None])
  else:
    u = labels / info.label_range[1]
    signal = CODE_SCALE * np.stack([2.0 * u, 1.5 * (u ** 2 - 1.0 / 3.0)], axis=-1)
  noise = SHARED_NOISE * rng.standard_normal(signal.shape)
  return (signal + noise).astype(np.float32)


def _real_lengths(info: Preset, rng: np.random.Generator, count: int) -> list[np.ndarray]:
  """Per-modality real lengths (N,) each: one utterance duration per sample, so longer
  utterances are longer in every modality; unaligned modalities jitter around it."""
  duration = rng.uniform(MIN_LENGTH_FRACTION, 1.0, count)
  lengths = []
  for length in info.lengths:
    fraction = duration
    if not info.aligned:
      fraction = np.clip(duration + rng.uniform(-0.1, 0.1, count), MIN_LENGTH_FRACTION, 1.0)
    lengths.append(np.clip(np.round(fraction * length), math.ceil(MIN_LENGTH_FRACTION * length),
                           length).astype(np.int64))
  return lengths


def _modality_features(index: int, length: int, structure: dict, code: np.ndarray,
                       real_length: np.ndarray, rng: np.random.Generator):
  """Features (N, T, D) float32 and mask (N, T) bool of one modality."""
  params = structure[MODALITIES[index]]
  count = code.shape[0]
  rank, width = params["projection"].shape[1], params["projection"].shape[0]
  gain = MODALITY_GAIN[index]
  time = np.arange(length, dtype=np.float32) / length
  jitter = rng.uniform(-0.5, 0.5, (count, 1)).astype(np.float32)  # per-sample phase jitter
  envelope = 1.0 + 0.5 * np.sin(2 * np.pi * ENVELOPE_FREQUENCY[index] * time[None]
                                + params["envelope_phase"] + jitter)
  wave = np.cos(2 * np.pi * WAVE_FREQUENCY[index] * time[None] + params["wave_phase"] + jitter)
  view = code @ params["readout"].T  # (N, r)
  wave_view = code @ params["wave_readout"].T
  nuisance = NUISANCE_NOISE * rng.standard_normal((count, 1, rank), dtype=np.float32)
  frames = (gain * (envelope[..., None] * view[:, None] + wave[..., None] * wave_view[:, None])
            + nuisance
            + FRAME_NOISE * rng.standard_normal((count, length, rank), dtype=np.float32))
  features = frames @ params["projection"].T  # (N, T, D)
  features += ISOTROPIC_NOISE * rng.standard_normal((count, length, width), dtype=np.float32)
  features *= params["dim_scale"]
  mask = np.arange(length)[None] < real_length[:, None]
  features *= mask[..., None]
  return features.astype(np.float32, copy=False), mask


def _generate_chunk(info: Preset, structure: dict, split: str, seed: int, chunk: int,
                    count: int) -> dict[str, np.ndarray]:
  rng = _chunk_rng(info.name, split, seed, chunk)
  labels = _sample_labels(info, rng, count)
  code = _semantic_code(info, labels, rng)
  real_lengths = _real_lengths(info, rng, count)
  arrays = {}
  for index, name in enumerate(MODALITIES):
    arrays[name], arrays[f"{name}_mask"] = _modality_features(
        index, info.lengths[index], structure, code, real_lengths[index], rng)
  arrays["label"] = labels
  start = chunk * CHUNK_SIZE
  arrays["id"] = np.asarray([f"{info.name}_{split}_{i:05d}" for i in range(start, start + count)])
  return arrays


def iterate_chunks(preset: str, split: str, *, seed: int = 0, num_samples: int | None = None):
  """Yields the split as dicts of arrays of at most CHUNK_SIZE samples (class-id labels).

  Concatenating the chunks gives `generate(preset, split, seed=seed,
  num_samples=num_samples, task="classification" or "regression")`; builders use this to
  write large splits without holding them whole.
  """
  info = _preset(preset)
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
  num_samples = info.sizes[split] if num_samples is None else int(num_samples)
  if num_samples < 0:
    raise ValueError(f"num_samples must be >= 0, got {num_samples}")
  structure = _structure(info, seed)
  for chunk in range(math.ceil(num_samples / CHUNK_SIZE)):
    count = min(CHUNK_SIZE, num_samples - chunk * CHUNK_SIZE)
    # Always draw a whole chunk, so that a row's numbers do not depend on the split size.
    arrays = _generate_chunk(info, structure, split, seed, chunk, CHUNK_SIZE)
    yield arrays if count == CHUNK_SIZE else {k: v[:count] for k, v in arrays.items()}


def generate(preset: str, split: str, *, seed: int = 0, num_samples: int | None = None,
             task: str | None = None) -> dict[str, np.ndarray]:
  """One split of a preset in the in-memory layout of `mer_jax.data.spec`.

  Args:
    preset: a key of `PRESETS`.
    split: `train`, `valid` or `test`.
    seed: data seed; prototypes and projections depend on (seed, preset) only.
    num_samples: split size (default: the preset's size for the split). A smaller size
      gives a prefix of a larger one.
    task: default the preset's task; `multilabel_binary` turns class ids into (N, K)
      binaries.

  Returns:
    `text`/`audio`/`vision` float32 (N, T_m, D_m) (zeros on padding), their `_mask`
    bool (N, T_m), `label` (float32 (N,), int32 (N,) or int32 (N, K)), `id` str (N,).
  """
  spec = spec_for(preset, task)
  info = _preset(preset)
  chunks = list(iterate_chunks(preset, split, seed=seed, num_samples=num_samples))
  if chunks:
    arrays = {key: np.concatenate([c[key] for c in chunks]) for key in chunks[0]}
  else:
    arrays = {}
    for index, name in enumerate(MODALITIES):
      arrays[name] = np.zeros((0, info.lengths[index], info.dims[index]), np.float32)
      arrays[f"{name}_mask"] = np.zeros((0, info.lengths[index]), bool)
    arrays["label"] = np.zeros((0,), np.float32 if info.task == "regression" else np.int32)
    arrays["id"] = np.zeros((0,), str)
  if spec.task == "multilabel_binary":
    arrays["label"] = to_multilabel_binary(arrays["label"], spec.num_classes)
  return arrays
