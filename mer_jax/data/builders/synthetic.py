"""TFDS builder of the synthetic presets (`mer_jax.data.synthetic`), written as array_record.

    builder = SyntheticMer(config=make_config("mosei", seed=0), data_dir=DIR,
                           file_format="array_record")
    builder.download_and_prepare(file_format="array_record",
                                 download_config=NO_NETWORK_DOWNLOAD_CONFIG)
    train = builder.as_data_source()["train"]

No TensorFlow is needed: the generated chunks are streamed into array_record shards
(`streaming.ArrayRecordBuilder`, any split size in bounded memory) and read through
`as_data_source()`. Examples keep the generation order, so a prepared split equals
`synthetic.generate(...)` row for row. Labels are stored as
generated (float sentiment or class id); `common.load_synthetic` turns class ids into
MulT-style binaries when the task asks for them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from mer_jax.data import synthetic
from mer_jax.data.builders.streaming import ArrayRecordBuilder
from mer_jax.data.spec import MODALITIES

# Nothing to download, and no GCS look-up: preparing must work on a machine offline.
NO_NETWORK_DOWNLOAD_CONFIG = tfds.download.DownloadConfig(try_download_gcs=False)


@dataclasses.dataclass(eq=False, kw_only=True)
class SyntheticMerConfig(tfds.core.BuilderConfig):
  """One preset at one seed and split sizes.

  Attributes:
    preset: a key of `synthetic.PRESETS`.
    seed: data seed.
    num_train, num_valid, num_test: split sizes.
  """

  preset: str = "mosei"
  seed: int = 0
  num_train: int = synthetic.DEFAULT_SIZES["train"]
  num_valid: int = synthetic.DEFAULT_SIZES["valid"]
  num_test: int = synthetic.DEFAULT_SIZES["test"]

  @property
  def sizes(self) -> dict[str, int]:
    return {"train": self.num_train, "valid": self.num_valid, "test": self.num_test}


def config_name(preset: str, seed: int, sizes: dict[str, int]) -> str:
  """Name that encodes everything the data depend on, e.g. `mosei_s0_n1024-256-256`."""
  counts = "-".join(str(sizes[split]) for split in synthetic.SPLITS)
  return f"{preset}_s{seed}_n{counts}"


def make_config(preset: str, *, seed: int = 0,
                sizes: dict[str, int] | None = None) -> SyntheticMerConfig:
  """Config of `preset` at `seed`; `sizes` overrides some or all of the default sizes."""
  full_sizes = synthetic.default_sizes(preset)
  unknown = set(sizes or {}) - set(full_sizes)
  if unknown:
    raise ValueError(f"unknown split(s) {sorted(unknown)} in sizes: expected a subset of "
                     f"{synthetic.SPLITS}")
  full_sizes.update({k: int(v) for k, v in (sizes or {}).items()})
  if any(v < 1 for v in full_sizes.values()):
    # TFDS cannot write an empty split.
    raise ValueError(f"synthetic split sizes must be >= 1, got {full_sizes}")
  info = synthetic.PRESETS[preset]
  return SyntheticMerConfig(
      name=config_name(preset, seed, full_sizes), version=synthetic.GENERATOR_VERSION,
      description=f"Synthetic {preset} ({info.task}): {info.source}", preset=preset,
      seed=int(seed), num_train=full_sizes["train"], num_valid=full_sizes["valid"],
      num_test=full_sizes["test"])


class SyntheticMer(ArrayRecordBuilder):
  """Synthetic multimodal emotion/sentiment data with the shapes of the real benchmarks."""

  VERSION = tfds.core.Version(synthetic.GENERATOR_VERSION)
  RELEASE_NOTES = {synthetic.GENERATOR_VERSION: "Label-driven latent code, L > A > V."}
  # One registered config per preset at seed 0 and default sizes, so that
  # `SyntheticMer(config="mosei")` works; other seeds and sizes go through `make_config`.
  BUILDER_CONFIGS = [
      dataclasses.replace(make_config(preset), name=preset) for preset in synthetic.PRESETS
  ]
  DEFAULT_CONFIG_NAME = "mosei"

  def _info(self) -> tfds.core.DatasetInfo:
    info = synthetic.PRESETS[self.builder_config.preset]
    features = {}
    for index, name in enumerate(MODALITIES):
      length, width = info.lengths[index], info.dims[index]
      # Raw bytes: the default encoding writes a float list per value, several times larger.
      features[name] = tfds.features.Tensor(shape=(length, width), dtype=np.float32,
                                            encoding=tfds.features.Encoding.BYTES)
      features[f"{name}_mask"] = tfds.features.Tensor(shape=(length,), dtype=np.bool_,
                                                      encoding=tfds.features.Encoding.BYTES)
    label_dtype = np.float32 if info.task == "regression" else np.int32
    features["label"] = tfds.features.Tensor(shape=(), dtype=label_dtype)
    features["id"] = tfds.features.Text()
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.builder_config.description,
        features=tfds.features.FeaturesDict(features),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Generated, nothing to download.
    return {split: self._generate_examples(split) for split in synthetic.SPLITS}

  def _generate_examples(self, split: str):
    config = self.builder_config
    index = 0
    for chunk in synthetic.iterate_chunks(config.preset, split, seed=config.seed,
                                          num_samples=config.sizes[split]):
      for row in range(len(chunk["label"])):
        yield index, {key: value[row] for key, value in chunk.items()}
        index += 1
