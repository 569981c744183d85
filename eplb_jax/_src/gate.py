"""Gated rebalancing: keep the placement in service unless the new one is worth the re-layout.

Moving expert weights costs bandwidth and, in a serving engine, a pause; a
new placement that balances the new loads barely better than the one in
service is not worth it. SGLang skips a rebalance when the placement in
service is already balanced enough (``--eplb-min-rebalancing-utilization-
threshold``, an absolute bound on its mean / max GPU load); vLLM rebalances on
a fixed step interval. :func:`gate` compares the two placements on the same,
new loads instead: a layer keeps its placement when its heaviest GPU is at
most ``1 + threshold`` times the new placement's. A step waits for each
layer's heaviest GPU, so that ratio is the slowdown the skip costs.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from eplb_jax._src import placement
from eplb_jax._src.placement import Placement


class GatedPlacement(NamedTuple):
  """What :func:`eplb_jax.gate_placement` decided, the placement to serve, and the scores.

  Attributes:
    placement: the :class:`Placement` to serve: per layer the new placement
      where ``rebalanced``, else the one in service (its maps rebuilt from
      its ``phy2log``, failed GPUs' slots emptied).
    rebalanced: ``[L]`` bool, whether each layer takes the new placement.
    current_heaviest: ``[L]`` float32, the heaviest GPU load of the placement
      in service under the new loads; ``inf`` in a layer where it leaves an
      expert without a replica (such a layer is always rebalanced).
    new_heaviest: ``[L]`` float32, the heaviest GPU load of the new placement.
  """

  placement: Placement
  rebalanced: jax.Array
  current_heaviest: jax.Array
  new_heaviest: jax.Array


def gate(
  weight: jax.Array,
  current: jax.Array,
  new: Placement,
  threshold: jax.Array,
  num_gpus: int,
  per_layer: bool,
) -> GatedPlacement:
  """Chooses between the placement in service ``current [L, P]`` and ``new`` under ``weight``.

  ``weight [L, E]`` is sanitised; ``current`` holds expert ids or -1 (an
  empty slot); ``threshold`` is a float32 scalar ``>= 0``. Per layer, or
  (``per_layer=False``) for all layers at once by the sums of their heaviest
  GPUs, the new placement is taken where the current one's heaviest GPU is
  above ``1 + threshold`` times the new one's; a layer whose current
  placement leaves an expert without a replica is rebalanced in any case.
  """
  num_logical = weight.shape[1]
  kept = placement.from_phy2log(current, num_logical)
  unserved = (kept.logcnt == 0).any(-1)
  current_max = placement.gpu_loads(weight, current, kept.logcnt, num_gpus).max(-1)
  new_max = placement.gpu_loads(weight, new.phy2log, new.logcnt, num_gpus).max(-1)
  if per_layer:
    worse = current_max > (1 + threshold) * new_max
  else:
    worse = jnp.broadcast_to(current_max.sum() > (1 + threshold) * new_max.sum(), unserved.shape)
  rebalanced = worse | unserved
  chosen = jax.tree.map(
    lambda a, b: jnp.where(rebalanced.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, kept
  )
  return GatedPlacement(
    Placement(*chosen), rebalanced, jnp.where(unserved, jnp.inf, current_max), new_max
  )
