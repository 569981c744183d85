"""The packing problem the packers solve: items with loads, and what each item is.

Each row (a layer, or a node of a layer) packs its ``n`` items into ``m``
packs (nodes or GPUs) of ``n / m`` items. Besides its load, an item knows
the expert it is a replica of, so a packer can treat replicas of one expert
differently from unrelated items (keep them apart, or together where that
is cheaper).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class PackingProblem(NamedTuple):
  """Rows of items to pack, ``[X, n]`` each.

  Attributes:
    weight: float32 load of each item.
    expert: int32 the logical expert each item is a replica of (the item's
      own index when items are not replicas, e.g. expert groups).
  """

  weight: jax.Array
  expert: jax.Array

  @classmethod
  def distinct(cls, weight: jax.Array) -> PackingProblem:
    """Items that are all different experts: item ``i`` is expert ``i``."""
    expert = jnp.broadcast_to(jnp.arange(weight.shape[-1], dtype=jnp.int32), weight.shape)
    return cls(weight, expert)
