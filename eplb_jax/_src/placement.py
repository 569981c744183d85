"""Placement: the pipeline from expert loads to the three placement maps.

Hierarchical policy (DeepSeek's, see :class:`Topology`):

1. pack expert groups onto nodes, balancing the group loads;
2. inside each node, replicate its experts into the node's slots;
3. pack each node's replicas onto its GPUs.

The global policy runs the same pipeline with one group on one node. Shapes
use ``L`` layers, ``E`` logical experts, ``P`` physical slots.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from eplb_jax._src import ops
from eplb_jax._src import packing
from eplb_jax._src import replication
from eplb_jax._src.modes import Mode
from eplb_jax._src.problem import PackingProblem
from eplb_jax._src.topology import Topology


class Placement(NamedTuple):
  """Where the replicas of every logical expert live; unpacks as DeepSeek's triple.

  Slots are numbered GPU by GPU: with ``S = P / num_gpus`` slots per GPU,
  slot ``s`` is on GPU ``s // S``.

  Attributes:
    phy2log: ``[L, P]`` int32, the logical expert in each physical slot.
    log2phy: ``[L, E, P - E + 1]`` int32, the slots of each expert, -1 padded.
    logcnt: ``[L, E]`` int32, the number of replicas of each expert.
  """

  phy2log: jax.Array
  log2phy: jax.Array
  logcnt: jax.Array

  def gpu_experts(self, num_gpus: int) -> jax.Array:
    """``[L, num_gpus, P / num_gpus]``: the experts each GPU holds, slot by slot."""
    return self.phy2log.reshape(self.phy2log.shape[0], num_gpus, -1)

  def replica_loads(self, weight: jax.typing.ArrayLike) -> jax.Array:
    """``[L, P]`` float32: the load each slot serves, ``weight[e] / logcnt[e]`` for its expert."""
    return replica_loads(weight, self.phy2log, self.logcnt)

  def gpu_loads(self, weight: jax.typing.ArrayLike, num_gpus: int) -> jax.Array:
    """``[L, num_gpus]`` float32: each GPU's load under ``weight [L, E]``."""
    return gpu_loads(weight, self.phy2log, self.logcnt, num_gpus)


def replica_loads(weight: jax.typing.ArrayLike, phy2log: jax.Array, logcnt: jax.Array) -> jax.Array:
  """``[L, P]``: the load of each slot, ``weight[e] / logcnt[e]`` of the expert ``e`` it holds."""
  per_replica = jnp.asarray(weight, jnp.float32) / jnp.maximum(logcnt, 1)
  return jnp.take_along_axis(per_replica, phy2log, axis=-1)


def gpu_loads(
  weight: jax.typing.ArrayLike, phy2log: jax.Array, logcnt: jax.Array, num_gpus: int
) -> jax.Array:
  """``[L, num_gpus]``: each GPU's load, the sum of its slots' :func:`replica_loads`."""
  slot_load = replica_loads(weight, phy2log, logcnt)
  return slot_load.reshape(slot_load.shape[0], num_gpus, -1).sum(-1)


def _take(values: jax.Array, indices: jax.Array) -> jax.Array:
  return jnp.take_along_axis(values, indices, axis=-1)


def _groups_to_nodes(weight: jax.Array, topology: Topology, mode: Mode) -> jax.Array:
  """``mlog2log [L, E]``: experts numbered node by node after packing groups onto nodes.

  Each node owns a contiguous range of ``E / num_nodes`` experts ("node-major
  logical" numbers), its groups in the order the packing lists them.
  """
  num_layers, num_logical = weight.shape
  group_size = num_logical // topology.num_groups
  within = jnp.arange(group_size, dtype=jnp.int32)
  group_load = ops.sum_last(weight.reshape(num_layers, topology.num_groups, group_size))
  problem = PackingProblem.distinct(group_load)
  mgroup2group = packing.pack_slots(problem, topology.num_nodes, mode).reshape(num_layers, -1)
  return ((mgroup2group * group_size)[..., None] + within).reshape(num_layers, num_logical)


def place_rows(
  weight: jax.Array, topology: Topology, mode: Mode
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The hierarchical pipeline on ``topology`` (taken as given, whatever its policy).

  Args:
    weight: ``[L, E]`` float32 loads, sanitised (finite, non-negative).
    topology: the slots, groups, nodes and GPUs; ``E`` must suit it.
    mode: the packing mode.

  Returns:
    ``(phy2log [L, P], phyrank [L, P], logcnt [L, E])``, int32: the expert of
    each slot (slots numbered GPU by GPU), each slot's replica index within
    its expert, and the replicas of each expert.
  """
  num_layers, num_logical = weight.shape
  num_nodes = topology.num_nodes
  experts_per_node = num_logical // num_nodes

  # 1. Groups -> nodes. 2. Replicas within each node; rows are (layer, node)
  # pairs from here on.
  mlog2log = _groups_to_nodes(weight, topology, mode)
  log2mlog = ops.inverse_permutation(mlog2log)
  mlog_load = _take(weight, mlog2log).reshape(-1, experts_per_node)
  phy2mlog, phyrank, mlogcnt = replication.replicate_rows(mlog_load, topology.slots_per_node)

  # 3. Replicas -> GPUs of their node; pphy numbers slots GPU by GPU.
  replica_load = _take(mlog_load / mlogcnt, phy2mlog)
  problem = PackingProblem(replica_load, phy2mlog)
  gpu_slots = packing.pack_slots(problem, topology.gpus_per_node, mode, num_nodes)
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


def place(weight: jax.Array, topology: Topology, mode: Mode) -> Placement:
  """The placement of ``weight [L, E]`` under ``topology``'s policy (unchecked core)."""
  phy2log, phyrank, logcnt = place_rows(weight, topology.packing_domains(), mode)
  return Placement(phy2log, logical_to_physical(phy2log, phyrank, weight.shape[1]), logcnt)
