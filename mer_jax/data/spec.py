"""What a model needs to know about a dataset: tasks, widths, lengths, classes.

Every data source (synthetic, mmsa, mult, merbench, mmin, npz) loads into the same
in-memory layout, one dict of numpy arrays per split:

  text, audio, vision            float32 (N, T_m, D_m); absent modalities are all zeros
  text_mask, audio_mask, vision_mask   bool (N, T_m), True on real frames
  label                          regression float32 (N,); classification int32 (N,);
                                 multilabel_binary int32 (N, K) with values in {0, 1}
  id                             str (N,)

and describes itself with a `DataSpec`.
"""

from __future__ import annotations

import dataclasses

MODALITIES = ("text", "audio", "vision")
MASK_KEYS = tuple(f"{m}_mask" for m in MODALITIES)
TASKS = ("regression", "classification", "multilabel_binary")


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Shape and task facts of one dataset.

  Attributes:
    name: dataset name (`mosei`, `iemocap`, ...).
    task: one of `TASKS`.
    num_classes: 1 for regression, K classes for classification, K emotions for
      multilabel_binary (each with 2 logits).
    dims: feature width per modality, order (L, A, V).
    lengths: sequence length per modality, order (L, A, V).
    label_range: (low, high) of regression labels, None otherwise.
    class_names: names of the classes / emotions (empty for regression).
  """

  name: str
  task: str
  num_classes: int
  dims: tuple[int, int, int]
  lengths: tuple[int, int, int]
  label_range: tuple[float, float] | None = None
  class_names: tuple[str, ...] = ()

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"DataSpec.task must be one of {TASKS}, got {self.task!r}")

  @property
  def output_shape(self) -> tuple[int, ...]:
    """Per-sample shape of a model's prediction output."""
    if self.task == "regression":
      return ()
    if self.task == "classification":
      return (self.num_classes,)
    return (self.num_classes, 2)
