"""Preparing a TFDS builder's splits of any size without TensorFlow: examples are
streamed, in order, into array_record shards.

TFDS's own generator path (`GeneratorBasedBuilder` -> `writer.Writer`) passes every split
through its shuffler, which holds the serialized split in memory up to 1 GiB and then
spills it to bucket files through `tf.io.gfile`: a split past 1 GiB needs TensorFlow,
and with `disable_shuffling` every example lands in the same bucket, which is read back
whole. mer_jax's builders keep their examples in order anyway, so `ArrayRecordBuilder`
replaces only that step: each example is encoded and serialized by the dataset's own
TFDS features and serializer and appended to the current shard, and a shard is closed
once it holds `SHARD_BYTES`. At most one serialized example is held at a time. The files,
their names and `dataset_info.json` are those TFDS writes, so `as_data_source()` and
`tfds.builder_from_directory` read them unchanged (docs/decisions.md, "Preparing large
splits").
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable

import tensorflow_datasets as tfds
from array_record.python import array_record_module
from tensorflow_datasets.core import example_serializer

# Serialized bytes after which a shard is closed. TFDS aims at 64 MiB - 1 GiB shards;
# this keeps a MOSEI train split (2.9 GB) in a dozen files. Tests lower it.
SHARD_BYTES = 256 << 20
# Options of TFDS's own ArrayRecordFileAdapter: one record per group, so that
# `as_data_source()` reads any example without decoding its neighbours.
WRITER_OPTIONS = "group_size:1"
_PART_SUFFIX = ".part"


def write_split(split: str, examples: Iterable, *, features: tfds.features.FeaturesDict,
                template: tfds.core.ShardedFileTemplate,
                shard_bytes: int | None = None) -> tfds.core.SplitInfo:
  """Streams one split's examples into array_record shards, in the order given.

  Args:
    split: split name.
    examples: (key, example) pairs with strictly increasing integer keys (the order
      TFDS would sort them into under `disable_shuffling`).
    features: the dataset's features (encode and serialize each example).
    template: where the shards go and how they are named (the builder's own).
    shard_bytes: serialized bytes per shard (default `SHARD_BYTES`).

  Returns:
    The split's info: examples per shard and serialized bytes.
  """
  shard_bytes = shard_bytes or SHARD_BYTES
  serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
  # Shards are written under temporary names: the final names carry the shard count.
  part_paths, shard_lengths = [], []
  writer, shard_size, total_bytes, previous = None, 0, 0, None
  try:
    for key, example in examples:
      if not isinstance(key, int) or (previous is not None and key <= previous):
        raise ValueError(f"split {split!r}: example key {key!r} follows {previous!r}; keys "
                         f"must be increasing integers (examples are written in order)")
      previous = key
      try:
        record = serializer.serialize_example(features.encode_example(example))
      except Exception as error:  # noqa: BLE001 - re-raised with the example's place
        raise ValueError(f"split {split!r}: example {key} cannot be encoded: {error}") from error
      if writer is None:
        part_paths.append(f"{template.sharded_filepath(shard_index=0, num_shards=1)}"
                          f"{_PART_SUFFIX}{len(part_paths)}")
        writer = array_record_module.ArrayRecordWriter(part_paths[-1], WRITER_OPTIONS)
        shard_lengths.append(0)
        shard_size = 0
      writer.write(record)
      shard_lengths[-1] += 1
      shard_size += len(record)
      total_bytes += len(record)
      if shard_size >= shard_bytes:
        writer.close()
        writer = None
  finally:
    if writer is not None:
      writer.close()
  if not shard_lengths:
    raise ValueError(f"split {split!r} has no examples; TFDS cannot store an empty split")
  for index, path in enumerate(part_paths):
    os.replace(path, template.sharded_filepath(shard_index=index, num_shards=len(part_paths)))
  return tfds.core.SplitInfo(name=split, shard_lengths=shard_lengths, num_bytes=total_bytes,
                             filename_template=template)


class ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder):
  """A `GeneratorBasedBuilder` that prepares array_record files without TensorFlow, in
  bounded memory (`write_split`); subclasses keep `disable_shuffling=True` and yield
  increasing integer keys. Reading is TFDS's own (`as_data_source()`)."""

  def _download_and_prepare(self, dl_manager, download_config):
    file_format = self.info.file_format
    if file_format is None or file_format.value != tfds.core.FileFormat.ARRAY_RECORD.value:
      raise ValueError(f"{self.name}: prepared as {file_format}; mer_jax writes array_record "
                       f"only (no TensorFlow)")
    if not self.info.disable_shuffling:
      raise ValueError(f"{self.name}: examples are written in order; set "
                       f"disable_shuffling=True in its DatasetInfo")
    limit = download_config.max_examples_per_split
    if limit == 0:  # TFDS's meaning: prepare no split
      return
    infos = []
    for split, examples in self._split_generators(dl_manager).items():
      if limit is not None:
        examples = itertools.islice(examples, limit)
      infos.append(write_split(split, examples, features=self.info.features,
                               template=self._get_filename_template(split)))
    self.info.set_splits(tfds.core.SplitDict(infos))
