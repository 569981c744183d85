"""Placement: the pipeline from expert loads to the three placement maps.

Hierarchical policy (DeepSeek's, see :class:`Topology`):

1. pack expert groups onto nodes, balancing the group loads;
2. inside each node, replicate its experts into the node's slots;
3. pack each node's replicas onto its GPUs.

The global policy runs the same pipeline with one group on one node. One
path serves every mode: the mode (:class:`.modes.base.Mode`) decides each
step, and may try several groups-to-nodes packings, of which each layer
keeps the lightest. Shapes use ``L`` layers, ``E`` logical experts, ``P``
physical slots.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from eplb_jax._src import ops
from eplb_jax._src.modes import Mode
from eplb_jax._src.topology import Topology
from eplb_jax._src.topology import check_num_gpus


class Placement(NamedTuple):
  """Where the replicas of every logical expert live; unpacks as DeepSeek's triple.

  Slots are numbered GPU by GPU: with ``S = P / num_gpus`` slots per GPU,
  slot ``s`` is on GPU ``s // S``.

  Attributes:
    phy2log: ``[L, P]`` int32, the logical expert in each physical slot; -1
      for an empty slot (every slot of a failed GPU, see
      :attr:`Topology.failed_gpus`).
    log2phy: ``[L, E, P - E + 1]`` int32, the slots of each expert, -1 padded;
      never an empty slot.
    logcnt: ``[L, E]`` int32, the number of replicas of each expert; empty
      slots count for no expert.
  """

  phy2log: jax.Array
  log2phy: jax.Array
  logcnt: jax.Array

  def gpu_experts(self, num_gpus: int) -> jax.Array:
    """``[L, num_gpus, P / num_gpus]``: the experts each GPU holds, slot by slot."""
    num_layers, num_slots = self.phy2log.shape
    return self.phy2log.reshape(num_layers, num_gpus, check_num_gpus(num_gpus, num_slots))

  def replica_loads(self, weight: jax.typing.ArrayLike) -> jax.Array:
    """``[L, P]`` float32: the load each slot serves, ``weight[e] / logcnt[e]`` for its expert."""
    return replica_loads(weight, self.phy2log, self.logcnt)

  def gpu_loads(self, weight: jax.typing.ArrayLike, num_gpus: int) -> jax.Array:
    """``[L, num_gpus]`` float32: each GPU's load under ``weight [L, E]``."""
    return gpu_loads(weight, self.phy2log, self.logcnt, num_gpus)


def replica_loads(weight: jax.typing.ArrayLike, phy2log: jax.Array, logcnt: jax.Array) -> jax.Array:
  """``[L, P]``: the load of each slot, ``weight[e] / logcnt[e]`` of the expert ``e`` it holds.

  An empty slot (-1) carries no load.
  """
  per_replica = jnp.asarray(weight, jnp.float32) / jnp.maximum(logcnt, 1)
  return jnp.where(phy2log >= 0, _take(per_replica, jnp.maximum(phy2log, 0)), 0.0)


def gpu_loads(
  weight: jax.typing.ArrayLike, phy2log: jax.Array, logcnt: jax.Array, num_gpus: int
) -> jax.Array:
  """``[L, num_gpus]``: each GPU's load, the sum of its slots' :func:`replica_loads`."""
  slot_load = replica_loads(weight, phy2log, logcnt)
  num_layers, num_slots = slot_load.shape
  per_gpu = check_num_gpus(num_gpus, num_slots)  # explicit: -1 fails on zero layers
  return slot_load.reshape(num_layers, num_gpus, per_gpu).sum(-1)


def _take(values: jax.Array, indices: jax.Array) -> jax.Array:
  return jnp.take_along_axis(values, indices, axis=-1)


def _node_major(mgroup2group: jax.Array, num_logical: int) -> jax.Array:
  """``mlog2log [L, E]``: experts numbered node by node, given the groups of each node.

  Each node owns a contiguous range of ``E / num_nodes`` experts ("node-major
  logical" numbers), its groups in the order the packing lists them.
  """
  num_layers, num_groups = mgroup2group.shape
  group_size = num_logical // num_groups
  within = jnp.arange(group_size, dtype=jnp.int32)
  return ((mgroup2group * group_size)[..., None] + within).reshape(num_layers, num_logical)


def _assemble(
  mlog2log: jax.Array,
  phy2mlog: jax.Array,
  phyrank: jax.Array,
  mlogcnt: jax.Array,
  gpu_slots: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The maps of the packed domains: ``(phy2log [L, P], phyrank [L, P], logcnt [L, E])``.

  Takes the node-major numbering ``mlog2log [L, E]`` and, per (layer, node)
  row, the expert of each replica ``phy2mlog [X, S]`` (node-local numbers),
  its rank ``phyrank [X, S]``, the counts ``mlogcnt [X, n]`` and the
  replicas of each GPU ``gpu_slots [X, G, k]``.
  """
  num_layers, num_logical = mlog2log.shape
  num_nodes = phy2mlog.shape[0] // num_layers
  experts_per_node = num_logical // num_nodes
  log2mlog = ops.inverse_permutation(mlog2log)
  pphy2phy = gpu_slots.reshape(phy2mlog.shape)
  node_offset = jnp.arange(0, num_logical, experts_per_node, dtype=jnp.int32)
  pphy2mlog = _take(phy2mlog, pphy2phy).reshape(num_layers, num_nodes, -1)
  pphy2mlog = (pphy2mlog + node_offset[:, None]).reshape(num_layers, -1)
  pphy2log = _take(mlog2log, pphy2mlog)
  pphyrank = _take(phyrank, pphy2phy).reshape(num_layers, -1)
  logcnt = _take(mlogcnt.reshape(num_layers, -1), log2mlog)
  return pphy2log, pphyrank, logcnt


def place_rows(
  weight: jax.Array, topology: Topology, mode: Mode
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The hierarchical pipeline on ``topology`` (taken as given, whatever its policy).

  Args:
    weight: ``[L, E]`` float32 loads, sanitised (finite, non-negative).
    topology: the slots, groups, nodes and GPUs; ``E`` must suit it.
    mode: the placement mode.

  Returns:
    ``(phy2log [L, P], phyrank [L, P], logcnt [L, E])``, int32: the expert of
    each slot (slots numbered GPU by GPU), each slot's replica index within
    its expert, and the replicas of each expert.
  """
  num_layers, num_logical = weight.shape
  num_nodes = topology.num_nodes
  experts_per_node = num_logical // num_nodes

  # 1. Groups -> nodes: every candidate the mode tries runs as one batch of
  # (candidate, layer, node) rows from here on.
  candidates = mode.group_candidates(weight, topology)
  num_candidates = candidates.shape[0]
  mlog2log = _node_major(candidates.reshape(-1, topology.num_groups), num_logical)
  mlog_load = _take(jnp.tile(weight, (num_candidates, 1)), mlog2log).reshape(-1, experts_per_node)
  # 2. Replicas within each node, and their packing onto the node's GPUs.
  domains = mode.fill_domains(mlog_load, topology)
  if num_candidates > 1:
    # 3. Per layer, the candidate with the lightest heaviest GPU (ties: the first).
    heaviest = domains.heaviest.reshape(num_candidates, num_layers, num_nodes).max(axis=2)
    best = ops.argmin_first(heaviest.T)  # [L]
    layer = jnp.arange(num_layers)

    def choose(x):
      x = x.reshape(num_candidates, num_layers, -1, *x.shape[1:])[best, layer]
      return x.reshape(-1, *x.shape[2:])

    domains = jax.tree.map(choose, domains)
    mlog2log = mlog2log.reshape(num_candidates, num_layers, -1)[best, layer]
  # 4. The mode finishes each kept packing.
  gpu_slots = mode.finish_domains(domains)
  return _assemble(mlog2log, domains.expert, domains.rank, domains.count, gpu_slots)


def logical_to_physical(phy2log: jax.Array, phyrank: jax.Array, num_logical: int) -> jax.Array:
  """Builds ``log2phy [L, E, P - E + 1]``: the slots of each expert by rank, -1 padded.

  Empty slots (-1 in ``phy2log``) are listed nowhere.
  """
  num_layers, num_physical = phy2log.shape
  max_count = num_physical - num_logical + 1
  slots = jnp.broadcast_to(jnp.arange(num_physical, dtype=jnp.int32), phy2log.shape)
  position = jnp.where(phy2log >= 0, phy2log * max_count + phyrank, num_logical * max_count)
  flat = jnp.full((num_layers, num_logical * max_count), -1, jnp.int32)
  flat = flat.at[jnp.arange(num_layers)[:, None], position].set(slots, mode="drop")
  return flat.reshape(num_layers, num_logical, max_count)


def replica_counts(phy2log: jax.Array, num_logical: int) -> jax.Array:
  """``logcnt [L, E]``: the replicas of each expert in ``phy2log [L, P]`` (-1: an empty slot)."""
  num_layers = phy2log.shape[0]
  # One flat segment sum (ids outside [0, E) count for no expert): XLA:CPU
  # scatters flat indices faster than (layer, expert) pairs.
  expert = jnp.where((phy2log >= 0) & (phy2log < num_logical), phy2log, num_logical)
  index = jnp.arange(num_layers, dtype=jnp.int32)[:, None] * (num_logical + 1) + expert
  counts = jax.ops.segment_sum(
    jnp.ones(index.size, jnp.int32), index.reshape(-1), num_layers * (num_logical + 1)
  )
  return counts.reshape(num_layers, num_logical + 1)[:, :num_logical]


def from_phy2log(phy2log: jax.Array, num_logical: int) -> Placement:
  """The :class:`Placement` of the slot map ``phy2log [L, P]`` (-1: an empty slot).

  Replicas of an expert are ranked in slot order.
  """
  phyrank = ops.occurrence_rank(phy2log)
  logcnt = replica_counts(phy2log, num_logical)
  return Placement(phy2log, logical_to_physical(phy2log, phyrank, num_logical), logcnt)


def place(weight: jax.Array, topology: Topology, mode: Mode) -> Placement:
  """The placement of ``weight [L, E]`` under ``topology``'s policy (unchecked core)."""
  phy2log, phyrank, logcnt = place_rows(weight, topology.packing_domains(), mode)
  return Placement(phy2log, logical_to_physical(phy2log, phyrank, weight.shape[1]), logcnt)
