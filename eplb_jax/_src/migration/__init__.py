"""Migration-aware rebalancing: keep expert replicas on the GPUs that already hold them.

A rebalance that puts an expert on a GPU that did not hold it before costs a
transfer of its weights. :func:`migrate` returns a placement as balanced as
a fresh one (per layer, a heaviest GPU at most ``1 + tolerance`` times the
fresh placement's) that moves few replicas, built from two kinds of
candidates per layer:

* *warm* (:mod:`.warm`): each node keeps the old replicas that are still
  wanted and exchanges replicas between GPUs until every GPU is under the
  target load;
* *fresh*: the fresh placement with its nodes and GPUs relabelled
  (:mod:`.relabel`) to overlap the old placement most.

The warm placement is tried twice, as one batch: with the fresh placement's
groups-to-nodes assignment and replica counts, each node then taking the
warm or the fresh GPU packing (warm when it is under the target), so that
this candidate always meets the target; and with the old placement's
assignment (on the hierarchical policy) and counts, repaired where they are
no placement of a node (:func:`.warm.repair_counts`: an expert whose replicas
were all on a failed GPU gets one back from the expert that loses least), used
when all its nodes meet the target and it moves fewer replicas. Finally
every GPU puts the experts it keeps back in their old slots.

:func:`migration_cost` is the public measure of a change (:mod:`.cost`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from eplb_jax._src import checks
from eplb_jax._src import placement
from eplb_jax._src.migration import cost
from eplb_jax._src.migration import relabel
from eplb_jax._src.migration import warm
from eplb_jax._src.modes import Mode
from eplb_jax._src.topology import Topology

# Allowed relative excess of the heaviest GPU over a fresh placement's.
DEFAULT_TOLERANCE = 1e-3


def migrate(
  weight: jax.Array, old: jax.Array, tolerance: jax.Array, topology: Topology, mode: Mode
) -> placement.Placement:
  """The placement of ``weight [L, E]`` that moves few replicas away from ``old [L, P]``.

  ``old`` holds expert ids in ``[0, E)`` or -1 (an empty slot); ``tolerance``
  is a float32 scalar in ``[0, 1]``.
  """
  domains = topology.packing_domains()
  num_groups, num_nodes = domains.num_groups, domains.num_nodes
  num_replicas, num_gpus = topology.num_replicas, topology.num_gpus
  num_layers, num_logical = weight.shape
  group_size = num_logical // num_groups
  rows = jnp.arange(num_layers)[:, None]

  fresh, _, fresh_count = placement.place_rows(weight, domains, mode)
  target = placement.gpu_loads(weight, fresh, fresh_count, num_gpus).max(-1) * (1 + tolerance)

  # overlap[l, g, k]: old slots of node k that hold an expert of group g.
  slot_node = jnp.arange(num_replicas, dtype=jnp.int32) // domains.slots_per_node
  old_group = jnp.where(old >= 0, old // group_size, num_groups)
  overlap = jnp.zeros((num_layers, num_groups + 1, num_nodes), jnp.int32)
  overlap = overlap.at[rows, old_group, slot_node].add(1)[:, :num_groups]
  # Each node of the fresh placement goes to the old node it overlaps most.
  fresh_node = jnp.zeros((num_layers, num_logical), jnp.int32).at[rows, fresh].set(slot_node)
  fresh_group_node = fresh_node[:, ::group_size]
  pack_overlap = jax.vmap(lambda g, o: jnp.zeros((num_nodes, num_nodes), jnp.int32).at[g].add(o))(
    fresh_group_node, overlap
  )
  pack_node = jax.vmap(relabel.greedy_assign, (0, None))(pack_overlap, 1)
  group_node = jnp.take_along_axis(pack_node, fresh_group_node, -1)

  old_gpus = old.reshape(num_layers, num_nodes, domains.gpus_per_node, -1)
  fresh_nodes = fresh.reshape(num_layers, num_nodes, domains.slots_per_node)
  fresh_nodes = jnp.zeros_like(fresh_nodes).at[rows, pack_node].set(fresh_nodes)
  relabel_nodes = jax.vmap(jax.vmap(relabel.relabel_gpus))
  fresh_nodes = relabel_nodes(old_gpus, fresh_nodes.reshape(old_gpus.shape))
  fresh_nodes = fresh_nodes.reshape(num_layers, num_nodes, domains.slots_per_node)

  # Two warm candidates, run as one batch of layers: the fresh groups-to-nodes
  # assignment with the fresh counts, and a second one that keeps more: with
  # several nodes the old assignment, else the fresh one; with the old
  # counts (warm_row repairs them where they are no placement of a node).
  second = group_node
  if num_nodes > 1:
    kept_node = jax.vmap(functools.partial(relabel.greedy_assign, capacity=num_groups // num_nodes))
    second = kept_node(overlap)
  second_count = placement.replica_counts(old, num_logical)
  candidate, candidate_max = warm.warm_candidate(
    jnp.tile(weight, (2, 1)),
    jnp.concatenate([fresh_count, second_count]),
    jnp.tile(old, (2, 1)),
    jnp.concatenate([group_node, second]),
    jnp.tile(target, 2),
    num_nodes,
    num_gpus,
  )
  # The first, node by node where it meets the target, else the fresh
  # placement relabelled; the second where all its nodes meet the target
  # and it moves fewer replicas.
  use_warm = candidate_max[:num_layers] <= target[:, None]
  phy2log = jnp.where(use_warm[..., None], candidate[:num_layers], fresh_nodes)
  phy2log = phy2log.reshape(num_layers, num_replicas)
  stay = candidate[num_layers:].reshape(num_layers, num_replicas)
  better = (candidate_max[num_layers:] <= target[:, None]).all(-1) & (
    cost.migration_cost(old, stay, num_gpus)[0] < cost.migration_cost(old, phy2log, num_gpus)[0]
  )
  phy2log = jnp.where(better[:, None], stay, phy2log)

  phy2log = jax.vmap(jax.vmap(relabel.align_slots))(
    old.reshape(num_layers, num_gpus, -1), phy2log.reshape(num_layers, num_gpus, -1)
  ).reshape(num_layers, num_replicas)
  return placement.from_phy2log(phy2log, num_logical)


@functools.partial(jax.jit, static_argnums=2)
def _migration_cost(old: jax.Array, new: jax.Array, num_gpus: int):
  return cost.migration_cost(old, new, num_gpus)


def migration_cost(
  old_phy2log: jax.typing.ArrayLike, new_phy2log: jax.typing.ArrayLike, num_gpus: int
) -> tuple[jax.Array, jax.Array]:
  """Replicas a placement change moves onto GPUs, and slots it rewrites.

  Args:
    old_phy2log: ``[L, P]`` expert of each slot before (``P / num_gpus``
      consecutive slots per GPU).
    new_phy2log: ``[L, P]`` expert of each slot after.
    num_gpus: GPUs in total; must divide ``P``.

  Returns:
    ``(moved, changed_slots)``, int32 ``[L]``: ``moved`` counts the replicas
    that must arrive on a GPU, i.e. per GPU and expert the copies the GPU holds
    after beyond those it held before (a GPU that had expert 3 once and now has
    it twice receives one replica; an empty slot, -1, receives none);
    ``changed_slots`` counts the slots whose expert changes.

  Example:
    >>> import jax.numpy as jnp
    >>> import eplb_jax
    >>> old = jnp.array([[0, 1, 2, 3]])  # two slots per GPU on 2 GPUs
    >>> eplb_jax.migration_cost(old, jnp.array([[1, 0, 2, 3]]), num_gpus=2)  # within GPU 0
    (Array([0], dtype=int32), Array([2], dtype=int32))
    >>> eplb_jax.migration_cost(old, jnp.array([[0, 2, 1, 3]]), num_gpus=2)  # across GPUs
    (Array([2], dtype=int32), Array([2], dtype=int32))
  """
  old = checks.check_phy2log(old_phy2log, "old_phy2log")
  new = checks.check_phy2log(new_phy2log, "new_phy2log")
  if old.shape != new.shape:
    raise ValueError(f"new_phy2log must have the shape of old_phy2log {old.shape}, got {new.shape}")
  num_gpus = checks.check_size(num_gpus, "num_gpus")
  checks.check_num_gpus(num_gpus, new.shape[1])
  return _migration_cost(old, new, num_gpus)
