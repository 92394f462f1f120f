"""Repeated layers as one `nn.scan` (the big_vision / MaxText pattern), `nn.remat` optional.

Scanned, the layers' params are one array per parameter kind with a leading layer axis
(`<name>/...` of shape (num_layers, ...)): the compiled program holds the layer once, so
compile time and the number of checkpoint arrays do not grow with depth. Unrolled
(`scan=False`), layer i is the submodule `<name>_<i>`: the same numbers, one copy of the
program per layer (`stack_unrolled_params` turns one layout into the other).

A layer module takes `(carry, *broadcast)` and returns `(carry, None)`; `carry` is
whatever changes from layer to layer, `broadcast` what every layer reads unchanged
(masks, the other modality). Train/eval is a module attribute rather than an argument,
so that neither transform needs static arguments.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def layer_stack(layer_cls: type[nn.Module], num_layers: int, carry, *broadcast,
                scan: bool = True, remat: bool = False, name: str = "layers", **layer_kwargs):
  """Applies `num_layers` layers of `layer_cls(**layer_kwargs)` to `carry`.

  Call inside a compact method: the layers become submodules of the caller.

  Args:
    layer_cls: the layer module; `__call__(carry, *broadcast) -> (carry, None)`.
    num_layers: depth (0 returns `carry` unchanged).
    carry: pytree threaded through the layers.
    *broadcast: arrays every layer reads unchanged.
    scan: one `nn.scan` over stacked params (True) or a Python loop over `name_<i>`.
    remat: recompute each layer's activations in the backward pass (`nn.remat`).
    name: submodule name (scanned) or prefix (unrolled).
    **layer_kwargs: the layer's attributes.

  Returns:
    The carry after the last layer.
  """
  if num_layers == 0:
    return carry
  if remat:
    # Inside scan the loop boundary already keeps XLA from merging the recomputation
    # away; outside it, prevent_cse must stay on.
    layer_cls = nn.remat(layer_cls, prevent_cse=not scan)
  if scan:
    stacked = nn.scan(layer_cls, variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast,) * len(broadcast), length=num_layers)
    carry, _ = stacked(**layer_kwargs, name=name)(carry, *broadcast)
    return carry
  for i in range(num_layers):
    carry, _ = layer_cls(**layer_kwargs, name=f"{name}_{i}")(carry, *broadcast)
  return carry


def stack_unrolled_params(params, num_layers: int, name: str = "layers"):
  """The params of an unrolled `layer_stack` (`name_0` ... `name_<L-1>`) in the scanned
  layout (`name` with a leading layer axis); every other entry is kept as it is."""
  params = dict(params)
  layers = [params.pop(f"{name}_{i}") for i in range(num_layers)]
  params[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return params
