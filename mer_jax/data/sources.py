"""Real data sources (SPEC section 9) behind one entry point, `load(config.data)`.

    source     builder (mer_jax.data.builders.*)   files in config.data.dir
    mmsa       mmsa.Mmsa            aligned_50.pkl / unaligned_50.pkl / unaligned_39.pkl
    mult       mult.Mult            mosi_data.pkl / mosei_senti_data.pkl / iemocap_data.pkl
    merbench   merbench.Merbench    label*.npz + features/<extractor>/<utterance>.npy
    mmin       mmin.Mmin            {L,A,V}/<type>.h5 + target/<k>/{trn,val,tst}_*.npy
    npz        npz.NpzFeatures      train.npz / valid.npz / test.npz (bring your own)

Each builder reads and validates the user's files once, writes them as array_record into
the TFDS data dir (`config.data.cache_dir`, default `~/.cache/mer_jax/tfds` or
`$MER_JAX_DATA_DIR`), and later runs read the prepared copy; a changed source file is
detected by its fingerprint and prepared again. The user's folder is never written to.

Options read from `config.data` when a config defines them: `fold` and `num_folds`
(cross-validation), `features` (per modality (text, audio, vision): extractor folder,
h5 type or npz key), `max_lengths` (per modality; longer sequences are average-pooled).

When some sample has no real frame of a modality (a slot the dataset lacks, an utterance
without a detected face), every split also carries `modality_mask` (N, 3), False there,
which the missing-modality protocols AND with their own masks.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Mapping, Sequence

import numpy as np

from mer_jax.data import validation
from mer_jax.data.builders import files
from mer_jax.data.spec import MODALITIES, DataSpec

log = logging.getLogger(__name__)

# source -> (module under mer_jax.data.builders, builder class)
BUILDERS = {
    "mmsa": ("mmsa", "Mmsa"),
    "mult": ("mult", "Mult"),
    "merbench": ("merbench", "Merbench"),
    "mmin": ("mmin", "Mmin"),
    "npz": ("npz", "NpzFeatures"),
}
SOURCES = ("synthetic", *BUILDERS)


def _builder_module(source: str):
  if source not in BUILDERS:
    raise ValueError(f"config.data.source={source!r} is not available; choose one of {SOURCES}")
  return importlib.import_module(f"mer_jax.data.builders.{BUILDERS[source][0]}")


def builder_class(source: str) -> type[files.FileSourceBuilder]:
  """The TFDS builder class of a real source."""
  return getattr(_builder_module(source), BUILDERS[source][1])


def builder_config(data_config) -> files.FileSourceConfig:
  """The builder config `config.data` selects (checks the files exist, fingerprints them)."""
  return _builder_module(data_config.source).make_config(data_config)


def load(data_config) -> tuple[dict[str, dict[str, np.ndarray]], DataSpec]:
  """Every split of the real dataset `config.data` selects, and its DataSpec.

  Returns:
    ({"train" | "valid" | "test": arrays}, DataSpec); arrays in the layout of
    `mer_jax.data.spec`, plus `modality_mask` (N, 3) bool when some sample lacks a
    modality, and `unimodal_labels` (N, 3) for MMSA SIMS.

  Raises:
    FileNotFoundError: a file is missing (the message repeats where it goes and where to
      get it).
    validation.DataError: a file does not have the documented form (the message names
      the file, the key and the expected form).
  """
  config = builder_config(data_config)
  splits, spec = files.load(builder_class(data_config.source), config,
                            data_dir=files.option(data_config, "cache_dir", "") or None)
  presence = {name: validation.modality_presence(split) for name, split in splits.items()}
  if not all(p.all() for p in presence.values()):
    # Only then: a dataset with every modality everywhere keeps the plain layout.
    for name, split in splits.items():
      split["modality_mask"] = presence[name]
      log.info("%s %s: samples without any real frame per modality (L, A, V): %s",
               data_config.name, name, tuple(int(a) for a in (~presence[name]).sum(axis=0)))
  return splits, spec


def num_folds(data_config) -> int:
  """Number of cross-validation folds of the dataset `config.data` selects: IEMOCAP has 5
  session folds in MERBench; MMIN has 10 (IEMOCAP) / 12 (MSP-IMPROV) speaker folds, or
  half as many session folds when `config.data.num_folds` asks for them; synthetic data
  use `config.data.num_folds` (each fold a fresh draw); fixed-split datasets have 1."""
  if data_config.source == "synthetic":
    return int(files.option(data_config, "num_folds", 0) or 1)
  return int(_builder_module(data_config.source).num_folds(data_config))


def adapt_widths(split: Mapping[str, np.ndarray], from_dims: Sequence[int],
                 to_dims: Sequence[int], *, warn: bool = True) -> dict[str, np.ndarray]:
  """Zero-pads or truncates each modality's feature width from `from_dims` to `to_dims`.

  Cross-dataset evaluation (MCUR A.5.9): a model trained on features of one width reads
  another dataset's features. Extra channels are dropped and missing ones are zeros, so
  the result is only meaningful when the leading channels correspond; a warning says so.

  Args:
    split: arrays in the in-memory layout; modality arrays (N, T, from_dims[m]).
    from_dims, to_dims: widths (L, A, V).
    warn: log the warning (callers adapting several splits log it once).

  Returns:
    A new split (other arrays shared, not copied) with modality arrays (N, T, to_dims[m]).
  """
  from_dims, to_dims = tuple(int(d) for d in from_dims), tuple(int(d) for d in to_dims)
  if len(from_dims) != 3 or len(to_dims) != 3:
    raise ValueError(f"adapt_widths: from_dims {from_dims} and to_dims {to_dims} need three "
                     f"widths (text, audio, vision)")
  out = dict(split)
  changed = []
  for name, source_width, target_width in zip(MODALITIES, from_dims, to_dims, strict=True):
    x = np.asarray(split[name])
    if x.shape[-1] != source_width:
      raise ValueError(f"adapt_widths: {name!r} has width {x.shape[-1]}, not {source_width}")
    if source_width == target_width:
      continue
    if target_width < source_width:
      out[name] = np.ascontiguousarray(x[..., :target_width])
      changed.append(f"{name} {source_width}->{target_width} (truncated)")
    else:
      pad = [(0, 0)] * (x.ndim - 1) + [(0, target_width - source_width)]
      out[name] = np.pad(x, pad)
      changed.append(f"{name} {source_width}->{target_width} (zero-padded)")
  if changed and warn:
    log.warning("cross-dataset evaluation: feature widths adapted: %s; channels are matched by "
                "position, so this is meaningful only for features of the same extractor "
                "family", ", ".join(changed))
  return out


def cross_dataset(splits: Mapping[str, Mapping[str, np.ndarray]], data_spec: DataSpec,
                  trained_spec: DataSpec, *, adapt: bool
                  ) -> tuple[dict[str, dict[str, np.ndarray]], DataSpec]:
  """Makes another dataset's splits readable by a model trained on `trained_spec`.

  Args:
    splits: the evaluation dataset's splits.
    data_spec: its DataSpec.
    trained_spec: the DataSpec the model was trained with (`config.data.spec` of a run).
    adapt: zero-pad / truncate differing widths (`adapt_widths`); without it a width
      difference is an error that names the widths.

  Returns:
    (splits, spec): the spec has the trained model's dims and lengths (what builds the
    model) and the evaluation data's name, label range and class names (what the metrics
    use).
  """
  if (data_spec.task, data_spec.num_classes) != (trained_spec.task, trained_spec.num_classes):
    raise ValueError(f"cross-dataset evaluation needs the same task: the model predicts "
                     f"{trained_spec.task} with {trained_spec.num_classes} output(s), "
                     f"{data_spec.name} has {data_spec.task} with {data_spec.num_classes}")
  spec = dataclasses.replace(data_spec, dims=trained_spec.dims, lengths=trained_spec.lengths)
  if data_spec.dims == trained_spec.dims:
    return {k: dict(v) for k, v in splits.items()}, spec
  if not adapt:
    raise ValueError(f"{data_spec.name} has feature widths (L, A, V) = {data_spec.dims}; the "
                     f"model was trained on {trained_spec.dims}. Pass --adapt_widths to zero-pad "
                     f"/ truncate them (MCUR A.5.9)")
  return {name: adapt_widths(split, data_spec.dims, trained_spec.dims, warn=index == 0)
          for index, (name, split) in enumerate(splits.items())}, spec
