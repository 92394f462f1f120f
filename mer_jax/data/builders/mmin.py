"""TFDS builder of MMIN-format features (AIM3-RUC/MMIN; IF-MMIN, DiCMoR and CM-ARR use
the same layout): IEMOCAP (10 folds) and MSP-IMPROV (12 folds), 4 emotions.

    <dir>/A/<audio type>.h5     {utterance: (T, D) features}   e.g. comparE.h5 (130)
    <dir>/V/<vision type>.h5    e.g. denseface.h5 (342)
    <dir>/L/<text type>.h5      e.g. bert_large.h5 (1024)
    <dir>/A/<audio type>_mean_std.h5   optional {fold: {"mean", "std"}} (MMIN's comparE)
    <dir>/target/<k>/{trn,val,tst}_label.npy     one-hot (N, 4) or class ids (N,)
    <dir>/target/<k>/{trn,val,tst}_int2name.npy  utterance names (N,) or (N, 1) bytes

Folds: MMIN's folds k = 1..10 (IEMOCAP) / 1..12 (MSP-IMPROV) leave one session out and
use one of its two speakers for validation and the other for test (folds 2s-1 and 2s
share session s). `config.data.num_folds` picks the protocol: the number of target
folders (speaker folds: fold i reads target/<i+1> as it is) or half of it (session folds,
CM-ARR's 5 / 6): fold i tests on the whole session i+1 (both speakers: tst and val of
target/<2i+1>, which must be those of target/<2i+2> too), trains on that folder's trn
(the other sessions) minus a fixed 10% of it that is the validation split
(`files.hold_out_validation`, seeded by the fold), so no speaker of the test session is
seen in training or model selection.

Normalisation, per fold as MMIN: a modality with a `<type>_mean_std.h5` is standardised
with that fold's statistics; an audio type ending in `_raw` (MMIN's `comparE_raw`) with
statistics of the fold's training split (MMIN uses every utterance; using only the
training split keeps test data out). Padding frames stay zero.

Reading needs `h5py`. The target .npy files may hold pickled objects: read only files
from a source you trust.
"""

from __future__ import annotations

import os

import numpy as np

from mer_jax.data import validation
from mer_jax.data.builders import files
from mer_jax.data.spec import MODALITIES, DataSpec

MODALITY_DIRS = ("L", "A", "V")  # MMIN's folder per modality, order (text, audio, vision)
SPEAKER_FOLDS = {"iemocap": 10, "msp_improv": 12}
DEFAULT_FEATURES = {"iemocap": ("bert_large", "comparE", "denseface"),
                    "msp_improv": ("bert_large", "comparE_raw", "denseface")}
CLASS_NAMES = ("angry", "happy", "neutral", "sad")  # MMIN's ids 0..3
TARGET_SPLITS = {"train": "trn", "valid": "val", "test": "tst"}

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
MMIN-format features (read-only; nothing is written into this folder).

  config.data.dir = the feature root of IEMOCAP (config.data.name=iemocap) or MSP-IMPROV
  (config.data.name=msp_improv), holding
    L/<text type>.h5, A/<audio type>.h5, V/<vision type>.h5   {utterance: (T, D) array}
        types from config.data.features (text, audio, vision); default
        (bert_large, comparE, denseface) for IEMOCAP, (bert_large, comparE_raw, denseface)
        for MSP-IMPROV; configs/cmarr_*.py read (bert_base, wav2vec2_base, denseface)
    A/comparE_mean_std.h5   (optional: per-fold normalisation statistics)
    target/<k>/{trn,val,tst}_label.npy and {trn,val,tst}_int2name.npy for k = 1..10
        (IEMOCAP) or 1..12 (MSP-IMPROV)

Where to get them: the corpora are licensed by their owners (IEMOCAP: sail.usc.edu/iemocap;
MSP-IMPROV: ecs.utdallas.edu/research/researchgroups/msp-lab); MMIN
(github.com/AIM3-RUC/MMIN, preprocess/) extracts the features and fold targets, and the
MMIN / IF-MMIN authors share the extracted features with licensees on request.
"""


def require_file(path: str, what: str) -> str:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found ({what}).\n\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")
  return path


def root_dir(source_path: str, dataset: str) -> str:
  if not source_path:
    raise FileNotFoundError(f"config.data.dir is empty: it must name the MMIN {dataset} feature "
                            f"root.\n\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")
  if not os.path.isdir(source_path):
    raise FileNotFoundError(f"{source_path} is not a folder.\n\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")
  return source_path


def target_folds(root: str) -> list[int]:
  """The fold numbers k of `target/<k>/` present."""
  target = os.path.join(root, "target")
  if not os.path.isdir(target):
    raise FileNotFoundError(f"{target} not found (the per-fold targets).\n\n"
                            f"{MANUAL_DOWNLOAD_INSTRUCTIONS}")
  return sorted(int(name) for name in os.listdir(target)
                if name.isdigit() and os.path.isdir(os.path.join(target, name)))


def fold_protocol(root: str, dataset: str, fold: int, requested: int) -> tuple[int, int, bool]:
  """(target folder k, number of folds, whole-session test) of `fold` under `requested`
  folds (0 = MMIN's speaker folds)."""
  available = target_folds(root)
  total = len(available)
  if total == 0:
    raise FileNotFoundError(f"{os.path.join(root, 'target')} has no fold folders 1..K.\n\n"
                            f"{MANUAL_DOWNLOAD_INSTRUCTIONS}")
  if available != list(range(1, total + 1)):
    raise validation.DataError(f"{os.path.join(root, 'target')}: fold folders {available}; "
                               f"expected 1..{total}")
  folds = requested or total
  if folds == total:
    step = 1
  elif 2 * folds == total:
    step = 2  # session folds: the first of each session's two speaker folds
  else:
    raise ValueError(f"config.data.num_folds={folds}: {dataset} has {total} speaker folds in "
                     f"target/ ({total} folds, or {total // 2} session folds)")
  if not 0 <= fold < folds:
    raise ValueError(f"config.data.fold={fold} is outside range({folds})")
  return step * fold + 1, folds, step == 2


def _h5py():
  try:
    import h5py
  except ImportError as error:
    raise ImportError("the mmin source reads .h5 files and needs h5py: pip install h5py") \
        from error
  return h5py


def read_h5_features(path: str, names: list[str]) -> list[np.ndarray]:
  h5py = _h5py()
  out = []
  with h5py.File(path, "r") as h5:
    for name in names:
      if name not in h5:
        raise validation.DataError(f"{path}: key {name!r} (an utterance of the fold's targets) is "
                                   f"missing; expected one (T, D) array per utterance")
      item = h5[name]
      if isinstance(item, h5py.Group):
        if "feat" not in item:
          raise validation.DataError(f"{path}: key {name!r} is a group with keys "
                                     f"{sorted(item)}; expected a (T, D) array")
        item = item["feat"]
      x = np.asarray(item[()])
      if x.ndim == 1:
        x = x[None, :]
      if x.ndim != 2 or not (np.issubdtype(x.dtype, np.floating)
                             or np.issubdtype(x.dtype, np.integer)):
        raise validation.DataError(f"{path}: key {name!r} has shape {x.shape} and dtype "
                                   f"{x.dtype}; expected (T, D) numbers")
      validation.check_finite(x.astype(np.float32), source=path, key=name)
      out.append(x)
  return out


def read_mean_std(path: str, cv: int) -> tuple[np.ndarray, np.ndarray]:
  with _h5py().File(path, "r") as h5:
    if str(cv) not in h5 or "mean" not in h5[str(cv)] or "std" not in h5[str(cv)]:
      raise validation.DataError(f"{path}: key '{cv}' with 'mean' and 'std' is missing; expected "
                                 f"one group per fold")
    return (np.asarray(h5[str(cv)]["mean"][()], np.float32).reshape(-1),
            np.asarray(h5[str(cv)]["std"][()], np.float32).reshape(-1))


def standardise(x: np.ndarray, mask: np.ndarray, mean: np.ndarray, std: np.ndarray,
                *, source: str) -> np.ndarray:
  if mean.shape != (x.shape[2],) or std.shape != (x.shape[2],):
    raise validation.DataError(f"{source}: mean/std have shapes {mean.shape}/{std.shape}; "
                               f"expected ({x.shape[2]},) each")
  std = np.where(std == 0, 1.0, std).astype(np.float32)
  return np.where(mask[..., None], (x - mean) / std, 0.0).astype(np.float32)


def read_names(path: str, num: int | None = None) -> list[str]:
  names = np.load(path, allow_pickle=True)
  return [str(name) for name in validation.as_ids(names, len(names) if num is None else num,
                                                  source=path, key="int2name")]


def read_target(target: str, prefix: str, split: str) -> tuple[list[str], np.ndarray, str]:
  """(utterance names, class ids, label file) of `target/<prefix>_{label,int2name}.npy`."""
  label_file = require_file(os.path.join(target, f"{prefix}_label.npy"), f"{split} labels")
  labels = np.load(label_file, allow_pickle=True)
  num = validation.num_rows(labels, source=label_file, key="labels")
  names = read_names(require_file(os.path.join(target, f"{prefix}_int2name.npy"),
                                  f"{split} utterance names"), num)
  return names, validation.class_labels(labels, source=label_file, key="labels", num=num,
                                        num_classes=len(CLASS_NAMES)), label_file


def split_targets(root: str, cv: int, *, fold: int, whole_session: bool):
  """{split: (names, class ids, label file)} of target folder `cv`; with `whole_session`
  the test split is the whole held-out session and validation comes from training."""
  target = os.path.join(root, "target", str(cv))
  parts = {split: read_target(target, prefix, split) for split, prefix in TARGET_SPLITS.items()}
  if not whole_session:
    return parts
  label_of = {n: y for names, ids, _ in parts.values() for n, y in zip(names, ids, strict=True)}
  session = parts["test"][0] + parts["valid"][0]
  partner = os.path.join(root, "target", str(cv + 1))
  partner_session = (read_target(partner, "tst", "test")[0]
                     + read_target(partner, "val", "valid")[0])
  if sorted(session) != sorted(partner_session):
    raise validation.DataError(
        f"{target} and {partner}: tst + val differ ({len(session)} vs {len(partner_session)} "
        f"utterances); expected MMIN's layout, in which folders {cv} and {cv + 1} split the "
        f"same held-out session into its two speakers")
  train, valid = files.hold_out_validation(parts["train"][0], fold=fold)
  source = f"{target} (session fold {fold})"
  return {split: (names, np.asarray([label_of[n] for n in names], np.int32), source)
          for split, names in (("train", train), ("valid", valid), ("test", session))}


def read(config: files.FileSourceConfig) -> tuple[dict[str, dict[str, np.ndarray]], DataSpec]:
  """The MMIN features of `config` (one fold) in the in-memory layout, and its DataSpec."""
  root = root_dir(config.source_path, config.dataset)
  cv, _, whole_session = fold_protocol(root, config.dataset, config.fold, config.num_folds)
  max_lengths = config.max_lengths or (0, 0, 0)
  parts = {}
  for split, (names, labels, label_file) in split_targets(
      root, cv, fold=config.fold, whole_session=whole_session).items():
    validation.check_num_samples(len(names), source=label_file, split=split)
    part = {}
    for index, (name, folder, kind) in enumerate(zip(MODALITIES, MODALITY_DIRS, config.features,
                                                     strict=True)):
      path = os.path.join(root, folder, f"{kind}.h5")
      part[name], part[f"{name}_mask"] = validation.stack_sequences(
          read_h5_features(path, names), source=path, key=f"{name} features",
          max_length=int(max_lengths[index]))
    part["label"] = labels
    part["id"] = np.asarray(names, dtype=str)
    parts[split] = part
  parts, dims, lengths = files.pad_splits(parts, source=root)
  for name, folder, kind in zip(MODALITIES, MODALITY_DIRS, config.features, strict=True):
    stats_file = os.path.join(root, folder, f"{kind}_mean_std.h5")
    if os.path.isfile(stats_file):
      mean, std = read_mean_std(stats_file, cv)
    elif kind.endswith("_raw"):
      train = parts["train"]
      frames = train[name][train[f"{name}_mask"]]
      mean, std = frames.mean(axis=0), frames.std(axis=0)
      stats_file = f"{kind} training frames of fold {cv}"
    else:
      continue
    for part in parts.values():
      part[name] = standardise(part[name], part[f"{name}_mask"], mean, std, source=stats_file)
  spec = DataSpec(name=config.dataset, task="classification", num_classes=len(CLASS_NAMES),
                  dims=dims, lengths=lengths, class_names=CLASS_NAMES)
  return parts, spec


class Mmin(files.FileSourceBuilder):
  """MMIN h5 features with per-fold targets (IEMOCAP, MSP-IMPROV)."""

  name = "mmin"
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def read_source(self, config):
    return read(config)


def num_folds(data_config) -> int:
  """`config.data.num_folds` if set, else the target folders present (MMIN's 10 / 12)."""
  requested = int(files.option(data_config, "num_folds", 0) or 0)
  if requested:
    return requested
  if data_config.dir and os.path.isdir(os.path.join(data_config.dir, "target")):
    return len(target_folds(data_config.dir))
  return SPEAKER_FOLDS.get(data_config.name, 1)


def make_config(data_config) -> files.FileSourceConfig:
  dataset = data_config.name
  if dataset not in SPEAKER_FOLDS:
    raise ValueError(f"config.data.name={dataset!r} is not an MMIN dataset; expected one of "
                     f"{sorted(SPEAKER_FOLDS)}")
  if data_config.task != "classification":
    raise ValueError(f"config.data.task={data_config.task!r}: MMIN {dataset} labels define the "
                     f"'classification' task (4 emotions)")
  root = root_dir(data_config.dir, dataset)
  cv, folds, whole_session = fold_protocol(root, dataset, int(data_config.fold),
                                           int(files.option(data_config, "num_folds", 0) or 0))
  features = files.per_modality(files.option(data_config, "features", ()), "features",
                                DEFAULT_FEATURES[dataset])
  max_lengths = files.per_modality(files.option(data_config, "max_lengths", ()), "max_lengths",
                                   (0, 0, 0))
  hashed = [require_file(os.path.join(root, folder, f"{kind}.h5"), f"{name} features")
            for name, folder, kind in zip(MODALITIES, MODALITY_DIRS, features, strict=True)]
  hashed += [p for folder, kind in zip(MODALITY_DIRS, features, strict=True)
             if os.path.isfile(p := os.path.join(root, folder, f"{kind}_mean_std.h5"))]
  for k in (cv, cv + 1) if whole_session else (cv,):
    target = os.path.join(root, "target", str(k))
    hashed += [os.path.join(target, f) for f in sorted(os.listdir(target)) if f.endswith(".npy")]
  return files.make_config(
      dataset=dataset, source_path=root, task="classification",
      fingerprint_digest=files.fingerprint(hashed, root=root), fold=int(data_config.fold),
      num_folds=folds, features=tuple(features), max_lengths=tuple(int(v) for v in max_lengths),
      description=(f"MMIN {dataset} fold {data_config.fold} of {folds} (target/{cv}"
                   f"{', whole-session test' if whole_session else ''})"))
