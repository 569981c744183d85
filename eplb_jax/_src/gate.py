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
:func:`gate_placement` and :func:`gated_rebalance` are its public entry points.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from eplb_jax._src import api
from eplb_jax._src import checks
from eplb_jax._src import elastic
from eplb_jax._src import ops
from eplb_jax._src import placement
from eplb_jax._src.modes import DEFAULT_MODE
from eplb_jax._src.modes import Mode
from eplb_jax._src.modes import check_mode
from eplb_jax._src.placement import Placement
from eplb_jax._src.topology import Topology


class GatedPlacement(NamedTuple):
  """What :func:`eplb_jax.gate_placement` decided, the placement to serve, and the scores.

  Attributes:
    placement: the :class:`Placement` to serve: per layer the new placement
      where ``rebalanced``, else the one in service (its maps rebuilt from
      its ``phy2log``, failed GPUs' slots emptied).
    rebalanced: ``[L]`` bool, whether each layer takes the new placement.
    current_heaviest: ``[L]`` float32, the heaviest GPU load of the placement
      in service under the new loads; ``inf`` in a layer where it leaves an
      expert without a replica (such a layer is rebalanced unless the new
      placement leaves one too).
    new_heaviest: ``[L]`` float32, the heaviest GPU load of the new placement;
      ``inf`` in a layer where it leaves an expert without a replica (such a
      layer of the new placement is never taken).
  """

  placement: Placement
  rebalanced: jax.Array
  current_heaviest: jax.Array
  new_heaviest: jax.Array


def _unserved(phy2log: jax.Array, num_logical: int, topology: Topology) -> jax.Array:
  """``[L]`` bool: whether a layer of ``phy2log`` leaves an expert without a replica on an
  active GPU (a failed GPU's slots serve nothing; ids outside ``[0, E)`` count for no expert)."""
  counts = placement.replica_counts(elastic.clear_failed(phy2log, topology), num_logical)
  return (counts == 0).any(-1)


def gate(
  weight: jax.Array,
  current: jax.Array,
  new: Placement,
  threshold: jax.Array,
  topology: Topology,
  per_layer: bool,
) -> GatedPlacement:
  """Chooses between the placement in service ``current [L, P]`` and ``new`` under ``weight``.

  ``weight [L, E]`` is sanitised; ``current`` holds expert ids or -1 (an
  empty slot), its slots on ``topology``'s failed GPUs already emptied;
  ``threshold`` is a float32 scalar ``>= 0``. Per layer, or
  (``per_layer=False``) for all layers at once by the sums of their heaviest
  GPUs, the new placement is taken where the current one's heaviest GPU is
  above ``1 + threshold`` times the new one's; a layer whose current
  placement leaves an expert without a replica is rebalanced in any case. A
  layer of ``new`` that leaves an expert without a replica is scored as
  infinitely heavy and never taken.
  """
  num_logical = weight.shape[1]
  num_gpus = topology.num_gpus
  kept = placement.from_phy2log(current, num_logical)
  unserved = (kept.logcnt == 0).any(-1)
  broken = _unserved(new.phy2log, num_logical, topology)
  current_max = placement.gpu_loads(weight, current, kept.logcnt, num_gpus).max(-1)
  new_max = placement.gpu_loads(weight, new.phy2log, new.logcnt, num_gpus).max(-1)
  new_max = jnp.where(broken, jnp.inf, new_max)
  if per_layer:
    worse = current_max > (1 + threshold) * new_max
  else:
    worse = jnp.broadcast_to(current_max.sum() > (1 + threshold) * new_max.sum(), unserved.shape)
  rebalanced = (worse | unserved) & ~broken
  chosen = ops.where_rows(rebalanced, new, kept)
  return GatedPlacement(
    Placement(*chosen), rebalanced, jnp.where(unserved, jnp.inf, current_max), new_max
  )


@functools.partial(jax.jit, static_argnums=(4, 5))
def _gate(
  weight: jax.Array,
  current: jax.Array,
  new: Placement,
  threshold: jax.Array,
  topology: Topology,
  per_layer: bool,
) -> GatedPlacement:
  weight = checks.sanitize_weight(weight)
  current = elastic.clear_failed(current, topology)
  # NaN and negative thresholds count as 0, inf as the largest float32.
  threshold = jnp.where(threshold > 0, jnp.minimum(threshold, jnp.finfo(jnp.float32).max), 0.0)
  return gate(weight, current, new, threshold, topology, per_layer)


def gate_placement(
  weight: jax.typing.ArrayLike,
  topology: Topology,
  current_phy2log: jax.typing.ArrayLike,
  new: Placement,
  threshold: jax.typing.ArrayLike,
  *,
  per_layer: bool = True,
) -> GatedPlacement:
  """Keeps the placement in service unless ``new`` balances ``weight`` enough better.

  Scores both placements on ``weight`` and keeps the one in service where
  its heaviest GPU is at most ``1 + threshold`` times ``new``'s: per layer,
  or with ``per_layer=False`` for all layers at once (by the sums over
  layers of the heaviest GPUs, what a step waits for). A layer whose
  placement in service leaves an expert without a replica (e.g. all its
  replicas on a failed GPU of ``topology``, whose slots serve nothing) is
  always rebalanced. Pure and jit-friendly: ``topology`` and ``per_layer``
  are static, the arrays and ``threshold`` may be traced, and new values
  never retrace.

  Args:
    weight: ``[L, E]`` loads, or a window ``[N, L, E]`` summed over ``N``.
    topology: slots, groups, nodes, GPUs and failed GPUs.
    current_phy2log: ``[L, P]`` int, the placement in service (-1: an empty
      slot). Under ``jax.jit`` ids outside ``[0, E)`` count as empty slots.
    new: the candidate :class:`Placement` on ``topology``, e.g. from
      :func:`rebalance`. Called eagerly, a ``new`` that leaves an expert
      without a replica on the active GPUs raises ``ValueError``; under
      ``jax.jit`` such a layer of ``new`` is scored as infinitely heavy
      (``new_heaviest`` inf) and never taken.
    threshold: scalar ``>= 0``, the relative excess of the heaviest GPU that
      the placement in service may have over ``new``'s and still be kept (0:
      keep it only where ``new`` is no lighter). Under ``jax.jit`` NaN and
      negative values count as 0.
    per_layer: decide layer by layer (default) or for the whole model.

  Returns:
    A :class:`GatedPlacement`: ``placement`` (``new`` where ``rebalanced``,
    the one in service elsewhere), ``rebalanced [L]``, and for logging
    ``current_heaviest [L]`` and ``new_heaviest [L]``.
  """
  weight, current, threshold = checks.check_gate(
    weight, topology, current_phy2log, threshold, per_layer
  )
  new = checks.check_new(new, weight, topology)
  return _gate(weight, current, new, threshold, topology, per_layer)


def gated_rebalance(
  weight: jax.typing.ArrayLike,
  topology: Topology,
  current_phy2log: jax.typing.ArrayLike,
  threshold: jax.typing.ArrayLike,
  *,
  mode: str | Mode = DEFAULT_MODE,
  tolerance: jax.typing.ArrayLike = api.DEFAULT_TOLERANCE,
  per_layer: bool = True,
) -> GatedPlacement:
  """Rebalances from the placement in service only where the gain is worth the re-layout.

  :func:`gate_placement` of the migration-aware placement
  ``rebalance(weight, topology, mode=mode, previous_phy2log=current_phy2log,
  tolerance=tolerance)``: where a layer is rebalanced it moves few replicas,
  elsewhere it moves none. Arguments as those two functions'; pure and
  jit-friendly (``topology``, ``mode`` and ``per_layer`` static).

  Returns:
    A :class:`GatedPlacement` (see :func:`gate_placement`).
  """
  mode = check_mode(mode)
  weight, current, threshold = checks.check_gate(
    weight, topology, current_phy2log, threshold, per_layer
  )
  new = api._solve(weight, topology, mode, current, checks.check_tolerance(tolerance))
  return _gate(weight, current, new, threshold, topology, per_layer)
