"""The interface every placement mode implements, with DeepSeek's pipeline as its defaults.

The placement (:func:`eplb_jax._src.placement.place_rows`) runs one path
for every mode, calling the mode at each step:

1. :meth:`Mode.group_candidates`: the groups-to-nodes packings to try;
2. :meth:`Mode.fill_domains`: for every (candidate, layer, node) row, the
   replica counts of the node's experts and their packing onto its GPUs;
3. each layer keeps the candidate whose heaviest GPU is lightest (ties to
   the first);
4. :meth:`Mode.finish_domains`: the final packing of the kept rows.

The defaults are DeepSeek's pipeline: one groups-to-nodes packing,
water-filling counts, and the mode's own packing (:meth:`Mode.pack_rows`)
both times. A mode is a frozen dataclass subclassing :class:`Mode`, so it is
hashable and passed as a static argument through the jitted core: its
fields are plain Python values, and two equal modes share one compiled
program.
"""

from __future__ import annotations

import abc
from typing import ClassVar
from typing import NamedTuple

import jax
import jax.numpy as jnp

from eplb_jax._src import ops
from eplb_jax._src import packing
from eplb_jax._src import replication
from eplb_jax._src.problem import PackingProblem
from eplb_jax._src.topology import Topology


class Domains(NamedTuple):
  """Rows of packed domains ``[X, ...]`` (a node of a layer): replica counts and their packing.

  Shapes use a domain's ``n`` experts, ``S`` slots and ``G`` GPUs of ``k``
  slots. Replicas are numbered as :func:`.replication.replicate_rows` lays
  them out: replica ``e < n`` is expert ``e`` (rank 0), then the extra ones.

  Attributes:
    expert: ``[X, S]`` the expert of each replica (numbered within the node).
    rank: ``[X, S]`` each replica's rank within its expert.
    count: ``[X, n]`` replicas of each expert.
    slots: ``[X, G, k]`` the replicas of each GPU.
    load: ``[X, S]`` the load of each replica.
    heaviest: ``[X]`` the heaviest GPU load.
  """

  expert: jax.Array
  rank: jax.Array
  count: jax.Array
  slots: jax.Array
  load: jax.Array
  heaviest: jax.Array


class Mode(abc.ABC):
  """A placement mode: how replica counts are chosen and replicas packed.

  Attributes:
    name: the name ``mode=`` takes for the mode's defaults.
  """

  name: ClassVar[str]

  @abc.abstractmethod
  def pack_rows(self, problem: PackingProblem, num_packs: int, domains_per_layer: int) -> jax.Array:
    """Packs each row of ``problem`` (``[X, n]``, ``n > num_packs``): ``slots [X, m, g]``.

    Runs of ``domains_per_layer`` consecutive rows share a layer. Row ``p``
    of ``slots`` lists the items of pack ``p`` (see :mod:`.packing`).
    """

  def group_candidates(self, weight: jax.Array, topology: Topology) -> jax.Array:
    """``mgroup2group [C, L, num_groups]``: the groups-to-nodes packings to try.

    Default: one, this mode's packing of the group loads.
    """
    return group_nodes(weight, topology, self)[None]

  def fill_domains(self, load: jax.Array, topology: Topology) -> Domains:
    """Counts and packing of the domains ``load [X, n]`` onto ``topology.gpus_per_node`` GPUs.

    Rows are (candidate, layer, node), ``topology.num_nodes`` consecutive rows
    per layer; each has ``topology.slots_per_node`` slots. Default: the
    water-filling counts (DeepSeek's), packed by :meth:`pack_rows`.
    """
    expert, rank, count = replication.replicate_rows(load, topology.slots_per_node)
    replica_load = jnp.take_along_axis(load / count, expert, axis=-1)
    problem = PackingProblem(replica_load, expert)
    slots = packing.pack_slots(problem, topology.gpus_per_node, self, topology.num_nodes)
    heaviest = packing.heaviest_pack(replica_load, slots)
    return Domains(expert, rank, count, slots, replica_load, heaviest)

  def finish_domains(self, domains: Domains) -> jax.Array:
    """``slots [X, G, k]``: the final packing of the kept domains. Default: as packed."""
    return domains.slots


def group_loads(weight: jax.Array, num_groups: int) -> jax.Array:
  """``[L, num_groups]``: the load of each group of consecutive experts of ``weight [L, E]``."""
  num_layers, num_logical = weight.shape
  group_size = num_logical // num_groups
  return ops.sum_last(weight.reshape(num_layers, num_groups, group_size))


def group_nodes(weight: jax.Array, topology: Topology, mode: Mode) -> jax.Array:
  """``mgroup2group [L, num_groups]``: expert groups packed onto nodes by ``mode``, node by node."""
  num_layers = weight.shape[0]
  problem = PackingProblem.distinct(group_loads(weight, topology.num_groups))
  return packing.pack_slots(problem, topology.num_nodes, mode).reshape(num_layers, -1)
