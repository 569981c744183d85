"""Warm start: pack a node's replicas onto its GPUs starting from the old placement.

Each node keeps the old replicas that are still wanted, in their old slots;
new replicas fill the freed slots, heaviest first onto the lightest GPUs;
then :func:`settle` exchanges replicas between the heaviest GPU and the
others (the shared swap kernel, :mod:`eplb_jax._src.swap`, with
:func:`migration_cost` ranking the exchanges) until every GPU is under the
target load.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from eplb_jax._src import ops
from eplb_jax._src import swap


class Replica(NamedTuple):
  """What a migration exchange moves with each replica: its expert and where it is stored now."""

  expert: jax.Array
  home: jax.Array  # the GPU that holds it already, -1 if none


def migration_cost(target: jax.Array) -> swap.Cost:
  """Ranks exchanges by replicas sent away from home, duplicates, then load.

  The cost of an exchange is the change in replicas away from the GPU that
  holds them plus the change in duplicates (an expert twice on a GPU: its
  replicas then share their load swings, which hurts balance on later
  loads). While the heaviest GPU is over ``target``: exchanges that leave
  both GPUs at or under ``target`` first, then the cheapest, then the one
  moving the least load (which keeps the most room on the partner) or, over
  the target, the one leaving the lower load. Under ``target``: only free
  exchanges (cost at most 0), the one leaving the lowest load first.

  Laid out for one group (``k = 1``) holding every GPU of the node, so that
  pack rows are GPUs.
  """

  def cost(c: swap.Candidates) -> tuple[jax.Array, ...]:
    groups, num_a, num_b = c.score.shape
    per_gpu = c.head_pack.load.shape[-1]
    head, partner = c.head.payload, c.partner.payload
    gpu_b = (jnp.arange(num_b) // per_gpu)[None, None, :]
    gpu_h = c.head_row[:, None, None]
    home_a, home_b = head.home[:, :, None], partner.home[:, None, :]
    away = (home_a != gpu_b).astype(jnp.int32) - (home_a != gpu_h) + (home_b != gpu_h)
    away = away - (home_b != gpu_b)

    expert_a, expert_b = head.expert[:, :, None], partner.expert[:, None, :]
    same = expert_a == expert_b  # [k, A, B]
    head_experts = c.head_pack.payload.expert  # [k, g]
    partner_gpus = partner.expert.reshape(groups, -1, per_gpu)  # [k, r, g]
    # Copies of a's expert on b's GPU, and of b's expert on the heavy GPU.
    on_b_gpu = (partner_gpus[:, None, :, :] == head.expert[:, :, None, None]).sum(-1)
    on_b_gpu = jnp.repeat(on_b_gpu, per_gpu, axis=-1)  # [k, A, B]
    on_h = (head_experts[:, :, None] == partner.expert[:, None, :]).sum(1)[:, None, :]
    twice_a = (head_experts[:, None, :] == head.expert[:, :, None]).sum(-1) > 1  # [k, A]
    twice_b = (partner_gpus[..., :, None] == partner_gpus[..., None, :]).sum(-1) > 1
    dupes = (
      (on_b_gpu - same > 0).astype(jnp.int32)  # a joins a copy of itself on b's GPU
      + (on_h - same > 0)  # b joins a copy of itself on the heavy GPU
      - twice_a[:, :, None]
      - twice_b.reshape(groups, 1, -1)
    )
    cost = (away + dupes).astype(jnp.float32)

    delta = c.head.load[:, :, None] - c.partner.load[:, None, :]
    over_target = (c.head_load > target)[:, None, None]
    fits = c.score <= target
    return (
      jnp.where(over_target, jnp.where(fits, 0.0, 1.0), jnp.where(cost <= 0, 0.0, jnp.inf)),
      jnp.where(over_target, cost, 0.0),
      jnp.where(over_target & fits, delta, c.score),
      # Ties go to the lowest partner slot, then to the lowest head slot.
      jnp.broadcast_to(jnp.arange(num_b, dtype=jnp.float32), c.score.shape),
    )

  return cost


def settle(
  load: jax.Array, expert: jax.Array, home: jax.Array, target: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Exchanges replicas between GPUs until none is above ``target``, moving few.

  Args:
    load: ``[m, g]`` load of the replica in each slot of each GPU.
    expert: ``[m, g]`` its expert.
    home: ``[m, g]`` the GPU it is already stored on, -1 if none.
    target: scalar load every GPU should end at or below.

  Each step exchanges a replica of the heaviest GPU with a replica of
  another GPU, among the exchanges that lower the heaviest, as
  :func:`migration_cost` ranks them; it stops when no exchange qualifies,
  after at most ``m * g`` exchanges.

  Returns:
    ``(expert [m, g], load [m, g])`` after the exchanges.
  """
  packs = swap.Packs(load[None], Replica(expert[None], home[None]))
  packs = swap.run(packs, migration_cost(target), max_steps=load.size)
  return packs.payload.expert[0], packs.load[0]


def repair_counts(weight: jax.Array, count: jax.Array, num_slots: int) -> jax.Array:
  """The counts ``count [n]`` made a placement of one domain of ``num_slots`` slots.

  Every expert keeps its replicas or gets one; then, one replica at a time,
  while there are too many the expert left with the lightest replicas gives
  one up (lowest ``w / (c - 1)``), while there are too few the expert with
  the heaviest replicas gets one (highest ``w / c``, water-filling's pick).
  Counts that already are a placement come back unchanged.
  """
  count = jnp.maximum(count, 1)
  experts = jnp.arange(count.shape[0])

  def body(count):
    over = count.sum() > num_slots
    give_up = ops.argmin_first(jnp.where(count > 1, weight / (count - 1), jnp.inf))
    take = ops.argmax_first(weight / count)
    chosen = experts == jnp.where(over, give_up, take)
    return count + jnp.where(chosen, jnp.where(over, -1, 1), 0)

  return jax.lax.while_loop(lambda count: count.sum() != num_slots, body, count)


def warm_row(
  load: jax.Array, count: jax.Array, old: jax.Array, target: jax.Array, num_gpus: int
) -> tuple[jax.Array, jax.Array]:
  """Warm-started packing of one node's replicas onto its GPUs.

  Args:
    load: ``[n]`` load of each of the node's experts.
    count: ``[n]`` replicas wanted of each expert; where they are no
      placement of the node's ``q`` slots (an expert without a replica, or
      not ``q`` in total) they are repaired first (:func:`repair_counts`).
    old: ``[q]`` expert previously in each slot of the node, -1 for an expert
      not on this node now.
    target: scalar load to bring every GPU under.
    num_gpus: GPUs of the node.

  Returns:
    ``(content [q], max_load)``: the expert of each slot and the heaviest GPU's load.
  """
  num_slots = old.shape[0]
  per_gpu = num_slots // num_gpus
  count = repair_counts(load, count, num_slots)
  replica_load = load / count
  safe_old = jnp.maximum(old, 0)
  still_wanted = (old >= 0) & (ops.occurrence_rank(old) < count[safe_old])
  need = count - jnp.zeros_like(count).at[safe_old].add(still_wanted)
  new_experts = jnp.repeat(
    jnp.arange(load.shape[0], dtype=jnp.int32), need, total_repeat_length=num_slots
  )
  # The freed slots, on the lightest GPUs first, take the new replicas,
  # heaviest first; the exchanges below even out the rest.
  kept_load = jnp.where(still_wanted, replica_load[safe_old], 0.0)
  gpu_load = kept_load.reshape(num_gpus, per_gpu).sum(1)
  free_slots = ops.argsort_descending(
    jnp.where(still_wanted, -jnp.inf, -jnp.repeat(gpu_load, per_gpu))
  )
  num_new = num_slots - still_wanted.sum()
  heavy_first = ops.argsort_descending(
    jnp.where(jnp.arange(num_slots) < num_new, replica_load[new_experts], -jnp.inf)
  )
  filled = jnp.zeros_like(old).at[free_slots].set(new_experts[heavy_first])
  content = jnp.where(still_wanted, old, filled)

  home = jnp.where(still_wanted, jnp.arange(num_slots) // per_gpu, -1)
  content, content_load = settle(
    *(x.reshape(num_gpus, per_gpu) for x in (replica_load[content], content, home)), target
  )
  return content.reshape(-1), content_load.sum(1).max()


def node_major(group_node: jax.Array, num_logical: int, num_nodes: int) -> jax.Array:
  """``log2mlog [L, E]``: experts numbered node by node, groups of a node in index order."""
  num_layers, num_groups = group_node.shape
  group_size = num_logical // num_groups
  group_rank = ops.occurrence_rank(group_node)
  start = (group_node * (num_groups // num_nodes) + group_rank) * group_size
  return (start[..., None] + jnp.arange(group_size, dtype=jnp.int32)).reshape(num_layers, -1)


def warm_candidate(
  weight: jax.Array,
  count: jax.Array,
  old: jax.Array,
  group_node: jax.Array,
  target: jax.Array,
  num_nodes: int,
  num_gpus: int,
) -> tuple[jax.Array, jax.Array]:
  """Warm placement for a groups-to-nodes assignment ``group_node [L, num_groups]``.

  ``count [L, E]`` holds the replicas wanted of each expert (repaired per
  node by :func:`warm_row` where they are no placement of the node).

  Returns ``(phy2log [L, N, P / N], max_load [L, N])`` per node.
  """
  num_layers, num_logical = weight.shape
  experts_per_node = num_logical // num_nodes
  log2mlog = node_major(group_node, num_logical, num_nodes)
  mlog2log = ops.inverse_permutation(log2mlog)
  mlog_load = jnp.take_along_axis(weight, mlog2log, -1).reshape(-1, experts_per_node)
  count = jnp.take_along_axis(count, mlog2log, -1).reshape(-1, experts_per_node)
  offset = (jnp.arange(num_nodes, dtype=jnp.int32) * experts_per_node)[:, None]
  old_mlog = jnp.take_along_axis(log2mlog, jnp.maximum(old, 0), -1)
  local = old_mlog.reshape(num_layers, num_nodes, -1) - offset
  local = jnp.where((old.reshape(local.shape) >= 0) & (local >= 0), local, -1)
  local = jnp.where(local < experts_per_node, local, -1)
  content, max_load = jax.vmap(functools.partial(warm_row, num_gpus=num_gpus // num_nodes))(
    mlog_load, count, local.reshape(-1, local.shape[-1]), jnp.repeat(target, num_nodes)
  )
  mlog = content.reshape(num_layers, num_nodes, -1) + offset
  phy2log = jnp.take_along_axis(mlog2log, mlog.reshape(num_layers, -1), -1)
  return phy2log.reshape(mlog.shape), max_load.reshape(num_layers, num_nodes)
