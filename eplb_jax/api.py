"""The public entry point: DeepSeek's ``rebalance_experts``, with JAX extras.

One function serves the fresh placement, the migration-aware one (given the
placement in service) and both sharded over a device mesh; it validates the
arguments once and picks the jitted core.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from eplb_jax import migration
from eplb_jax import placement
from eplb_jax import sharding


def rebalance_experts(
  weight: jax.typing.ArrayLike,
  num_replicas: int,
  num_groups: int,
  num_nodes: int,
  num_gpus: int,
  *,
  mode: str = "refined",
  previous_phy2log: jax.typing.ArrayLike | None = None,
  mesh: Mesh | None = None,
  layer_axis: sharding.AxisName | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Expert-parallelism load balancer: DeepSeek's ``rebalance_experts`` in JAX.

  Uses the hierarchical policy when ``num_groups % num_nodes == 0`` and the
  global one (a single group and node) otherwise. Sizes are static Python
  ints; ``weight`` may be traced, and a new ``weight`` never retraces.

  Under ``jax.jit`` negative, NaN and infinite loads count as 0; called
  eagerly they raise ``ValueError``.

  Args:
    weight: ``[L, E]`` load statistics of each logical expert, int or float.
    num_replicas: ``P``, physical expert slots; a multiple of ``num_gpus``, ``>= E``.
    num_groups: expert groups (the hierarchical path needs ``E % num_groups == 0``).
    num_nodes: server nodes; ``num_gpus`` must be a multiple of it.
    num_gpus: GPUs in total.
    mode: ``"refined"`` (default: differencing start plus swap refinement,
      better balanced) or ``"greedy"`` (DeepSeek's placement exactly).
    previous_phy2log: optional ``[L, P]`` placement in service. When given,
      the result keeps replicas where they are as far as it can while every
      layer's heaviest GPU stays within 0.1% of a fresh placement's (see
      :func:`eplb_jax.migration.rebalance_with_previous`).
    mesh: optional device mesh; with ``layer_axis``, each device balances its
      own layers (no communication) and the maps come back sharded as
      ``NamedSharding(mesh, P(layer_axis))``. ``L`` must divide evenly.
    layer_axis: the mesh axis name (or tuple of names) that splits the layers.

  Returns:
    ``(phy2log, log2phy, logcnt)``, int32: ``phy2log [L, P]`` the logical
    expert of each physical slot (``P / num_gpus`` consecutive slots per GPU),
    ``log2phy [L, E, P - E + 1]`` the slots of each expert, -1 padded, and
    ``logcnt [L, E]`` the number of replicas of each expert.
  """
  weight, *sizes, mode = placement.check_rebalance_args(
    weight, num_replicas, num_groups, num_nodes, num_gpus, mode
  )
  if (mesh is None) != (layer_axis is None):
    raise ValueError("mesh must be given with layer_axis, and layer_axis with mesh")
  if previous_phy2log is None:
    core, arrays = placement.rebalance_jit, (weight,)
  else:
    previous, tolerance = migration.check_previous(
      previous_phy2log, migration.DEFAULT_TOLERANCE, weight, num_replicas
    )
    core, arrays = migration.migrate_jit, (weight, previous, tolerance)
  if mesh is None:
    return core(*arrays, *sizes, mode)
  layer_axis = sharding.check_mesh_axis(mesh, layer_axis, weight.shape[0])
  return sharding.shard_layers(core, (*sizes, mode), mesh, layer_axis, *arrays)
