"""Placement: the full pipeline from expert loads to the three placement maps.

Hierarchical policy (DeepSeek's, used when ``num_groups % num_nodes == 0``):

1. pack expert groups onto nodes, balancing the group loads;
2. inside each node, replicate its experts into the node's slots;
3. pack each node's replicas onto its GPUs.

Otherwise the global policy runs the same pipeline with one group and one
node. Shapes use ``L`` layers, ``E`` logical experts, ``P`` physical slots.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from eplb_jax import _checks
from eplb_jax import _ops
from eplb_jax import packing
from eplb_jax import replication


def _inverse(perm: jax.Array) -> jax.Array:
  """Inverse of each row of ``perm [X, n]``."""
  rows, n = perm.shape
  iota = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), perm.shape)
  return jnp.zeros_like(perm).at[jnp.arange(rows)[:, None], perm].set(iota)


def _take(values: jax.Array, indices: jax.Array) -> jax.Array:
  return jnp.take_along_axis(values, indices, axis=-1)


def hierarchical_rows(
  weight: jax.Array,
  num_physical_experts: int,
  num_groups: int,
  num_nodes: int,
  num_gpus: int,
  mode: str,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Unchecked core of :func:`rebalance_experts_hierarchical`."""
  num_layers, num_logical = weight.shape
  group_size = num_logical // num_groups
  experts_per_node = num_logical // num_nodes

  # 1. Groups -> nodes. mlog ("node-major logical") numbers the experts node
  # by node, so each node owns a contiguous range of experts_per_node.
  # 2. Replicas within each node; rows are (layer, node) pairs from here on.
  group_load = _ops.sum_last(weight.reshape(num_layers, num_groups, group_size))
  mgroup2group = packing.pack_slots(group_load, num_nodes, mode).reshape(num_layers, -1)
  mlog2log = (
    (mgroup2group * group_size)[..., None] + jnp.arange(group_size, dtype=jnp.int32)
  ).reshape(num_layers, num_logical)
  log2mlog = _inverse(mlog2log)
  mlog_load = _take(weight, mlog2log).reshape(-1, experts_per_node)
  phy2mlog, phyrank, mlogcnt = replication.replicate_rows(
    mlog_load, num_physical_experts // num_nodes
  )

  # 3. Replicas -> GPUs of their node; pphy numbers slots GPU by GPU.
  replica_load = _take(mlog_load / mlogcnt, phy2mlog)
  gpu_slots = packing.pack_slots(replica_load, num_gpus // num_nodes, mode, num_nodes)
  pphy2phy = gpu_slots.reshape(replica_load.shape)

  node_offset = jnp.arange(0, num_logical, experts_per_node, dtype=jnp.int32)
  pphy2mlog = _take(phy2mlog, pphy2phy).reshape(num_layers, num_nodes, -1)
  pphy2mlog = (pphy2mlog + node_offset[:, None]).reshape(num_layers, -1)
  pphy2log = _take(mlog2log, pphy2mlog)
  pphyrank = _take(phyrank, pphy2phy).reshape(num_layers, -1)
  logcnt = _take(mlogcnt.reshape(num_layers, -1), log2mlog)
  return pphy2log, pphyrank, logcnt


def logical_to_physical(phy2log: jax.Array, phyrank: jax.Array, num_logical: int) -> jax.Array:
  """Builds ``log2phy [L, E, P - E + 1]``: the slots of each expert by rank, -1 padded."""
  num_layers, num_physical = phy2log.shape
  max_count = num_physical - num_logical + 1
  slots = jnp.broadcast_to(jnp.arange(num_physical, dtype=jnp.int32), phy2log.shape)
  flat = jnp.full((num_layers, num_logical * max_count), -1, jnp.int32)
  flat = flat.at[jnp.arange(num_layers)[:, None], phy2log * max_count + phyrank].set(slots)
  return flat.reshape(num_layers, num_logical, max_count)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _hierarchical_jit(weight, num_physical_experts, num_groups, num_nodes, num_gpus, mode):
  return hierarchical_rows(weight, num_physical_experts, num_groups, num_nodes, num_gpus, mode)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def rebalance_jit(weight, num_replicas, num_groups, num_nodes, num_gpus, mode):
  """Unchecked, jitted core of :func:`eplb_jax.rebalance_experts` (float32 ``weight``)."""
  if num_groups % num_nodes:
    num_groups, num_nodes = 1, 1
  phy2log, phyrank, logcnt = hierarchical_rows(
    weight, num_replicas, num_groups, num_nodes, num_gpus, mode
  )
  return phy2log, logical_to_physical(phy2log, phyrank, weight.shape[1]), logcnt


def _check_config(
  weight: jax.typing.ArrayLike,
  num_physical_experts: int,
  num_groups: int,
  num_nodes: int,
  num_gpus: int,
  mode: str,
  replicas_name: str,
) -> tuple[jax.Array, int, int, int, int, str]:
  weight = _checks.check_weight(weight)
  num_physical_experts = _checks.check_size(num_physical_experts, replicas_name)
  num_groups = _checks.check_size(num_groups, "num_groups")
  num_nodes = _checks.check_size(num_nodes, "num_nodes")
  num_gpus = _checks.check_size(num_gpus, "num_gpus")
  mode = _checks.check_mode(mode)
  num_logical = weight.shape[1]
  if num_physical_experts < num_logical:
    raise ValueError(
      f"{replicas_name} must be >= the number of logical experts "
      f"({num_logical}), got {num_physical_experts}"
    )
  if num_physical_experts % num_gpus:
    raise ValueError(
      f"{replicas_name} must be a multiple of num_gpus ({num_gpus}), got {num_physical_experts}"
    )
  if num_gpus % num_nodes:
    raise ValueError(f"num_gpus must be a multiple of num_nodes ({num_nodes}), got {num_gpus}")
  return weight, num_physical_experts, num_groups, num_nodes, num_gpus, mode


def _check_hierarchy(num_logical: int, num_groups: int, num_nodes: int) -> None:
  if num_logical % num_groups:
    raise ValueError(
      f"num_groups must divide the number of logical experts ({num_logical}) "
      f"on the hierarchical path, got {num_groups}"
    )
  if num_groups % num_nodes:
    raise ValueError(
      f"num_groups must be a multiple of num_nodes ({num_nodes}) on the "
      f"hierarchical path, got {num_groups}"
    )


def rebalance_experts_hierarchical(
  weight: jax.typing.ArrayLike,
  num_physical_experts: int,
  num_groups: int,
  num_nodes: int,
  num_gpus: int,
  *,
  mode: str = "refined",
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Hierarchical placement: groups onto nodes, then replicas onto GPUs.

  Args:
    weight: ``[L, E]`` load of each logical expert.
    num_physical_experts: ``P``, total slots; a multiple of ``num_gpus``, ``>= E``.
    num_groups: expert groups; must divide ``E`` and be a multiple of ``num_nodes``.
    num_nodes: server nodes (fast intra-node links); must divide ``num_gpus``.
    num_gpus: GPUs in total.
    mode: ``"greedy"`` (DeepSeek's placement) or ``"refined"``.

  Returns:
    ``(phy2log, phyrank, logcnt)``, int32: ``phy2log [L, P]`` the expert in each
    slot (slots numbered GPU by GPU), ``phyrank [L, P]`` each slot's replica
    index within its expert, ``logcnt [L, E]`` the replicas of each expert.
  """
  weight, num_physical_experts, num_groups, num_nodes, num_gpus, mode = _check_config(
    weight,
    num_physical_experts,
    num_groups,
    num_nodes,
    num_gpus,
    mode,
    "num_physical_experts",
  )
  _check_hierarchy(weight.shape[1], num_groups, num_nodes)
  return _hierarchical_jit(weight, num_physical_experts, num_groups, num_nodes, num_gpus, mode)


def check_rebalance_args(
  weight: jax.typing.ArrayLike,
  num_replicas: int,
  num_groups: int,
  num_nodes: int,
  num_gpus: int,
  mode: str,
) -> tuple[jax.Array, int, int, int, int, str]:
  """Validates the arguments of :func:`eplb_jax.rebalance_experts` (either policy)."""
  weight, num_replicas, num_groups, num_nodes, num_gpus, mode = _check_config(
    weight, num_replicas, num_groups, num_nodes, num_gpus, mode, "num_replicas"
  )
  if num_groups % num_nodes == 0:
    _check_hierarchy(weight.shape[1], num_groups, num_nodes)
  return weight, num_replicas, num_groups, num_nodes, num_gpus, mode
