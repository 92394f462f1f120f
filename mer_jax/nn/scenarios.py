"""Networks that take the modality masks of S scenarios at once (`Stage.masks_in_network`).

Such a network encodes every modality once on the unmasked batch and once on an absent
modality (zero features and no real frame, `missing.apply_modality_mask`: the same input
for every row, so one row of it), then selects per row, scenario and modality and runs
the rest on B S rows, scenarios minor. The outputs are those of S forwards on the
masked batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def combined_masks(batch, scenario_modality_mask):
  """(B, S, 3) presence: the scenarios' masks AND-ed with the modalities the data itself
  has (`modality_mask`, if the batch carries one)."""
  masks = jnp.asarray(scenario_modality_mask, bool)
  if "modality_mask" in batch:
    masks = masks & jnp.asarray(batch["modality_mask"], bool)[:, None, :]
  return masks


def flatten_scenarios(x):
  """(B, S, ...) as (B S, ...)."""
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def select_scenarios(present, encoded, absent):
  """(B S, ...): `encoded` (B, ...) where `present` (B, S, ...) holds, else `absent`
  (1, ...); `present`'s trailing axes index the leading axes of `encoded[0]`."""
  present = present.reshape(present.shape + (1,) * (encoded.ndim + 1 - present.ndim))
  return flatten_scenarios(jnp.where(present, encoded[:, None], absent[:, None]))


def unflatten_scenarios(outputs, scenario_modality_mask):
  """Network outputs on (B S) rows, scenarios minor, as (B, S, ...)."""
  leading = scenario_modality_mask.shape[:2]
  return jax.tree.map(lambda x: x.reshape(leading + x.shape[1:]), outputs)
