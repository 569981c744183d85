"""The GPU-aware mode, the default: replica counts chosen for the heaviest GPU, not replica.

A domain (a node of a layer) packs ``n`` experts into ``S`` slots on ``G``
GPUs of ``k = S / G`` slots, with ``R = S - n`` spare slots. Water-filling
(DeepSeek's counts, :mod:`.replication`) minimises the heaviest replica; the
heaviest GPU is what a step waits for, and on skewed loads other counts pack
better. So each domain builds a few count candidates
(:func:`candidate_counts`), packs them all (one more batch axis), and keeps
the lightest (:meth:`GpuAware.fill_domains`); DeepSeek's own placement of the
domain is a candidate too, so the result is never heavier than it. The
groups-to-nodes packing has candidates of its own
(:meth:`GpuAware.group_candidates`), and duplicates are separated last
(:meth:`GpuAware.finish_domains`). :class:`GpuAware` documents the rule.

Slot layout of a candidate, as :func:`.replication.replicate_rows`: slot
``e < n`` holds expert ``e`` (replica rank 0), slot ``n + i`` the ``i``-th
extra replica.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from eplb_jax._src import duplicates
from eplb_jax._src import ops
from eplb_jax._src import packing
from eplb_jax._src import replication
from eplb_jax._src import swap
from eplb_jax._src.modes.base import Domains
from eplb_jax._src.modes.base import Mode
from eplb_jax._src.modes.base import group_loads
from eplb_jax._src.modes.base import group_nodes
from eplb_jax._src.modes.greedy import Greedy
from eplb_jax._src.modes.refined import Refined
from eplb_jax._src.problem import PackingProblem
from eplb_jax._src.topology import Topology

# Rows of each layer (nodes) whose greedy packing the single-head swaps refine.
GREEDY_ROWS_PER_LAYER = 2


@dataclasses.dataclass(frozen=True)
class GpuAware(Mode):
  """Replica counts chosen for the heaviest GPU, not the heaviest replica (the default).

  A step takes as long as its most loaded GPU. Water-filling (DeepSeek's
  counts) minimises the largest *replica*; on skewed loads that can leave a
  hot expert with a count that does not tile the GPUs (5 + 5 replicas on 8
  GPUs puts two replicas on two GPUs, where 4 + 4 would not). So each packing
  domain (a node of a layer on the hierarchical policy, a layer on the
  global one), with ``R`` spare slots, tries a few counts and keeps the one
  whose packing has the lightest heaviest GPU:

  1. candidate ``j``, for ``j`` in ``{0, 1, 2, 3}`` and the powers of two up
     to ``ceil(R / 2)``: the first ``R - j`` replicas of the water-filling,
     then one more replica for each of the ``j`` heaviest experts that still
     have one (``j = 0`` is DeepSeek's counts; more candidates gain little:
     the best ``j`` is small where ``R`` is);
  2. every candidate is packed by balanced differencing, the one with the
     lightest heaviest GPU kept (ties to the smaller ``j``) and refined by
     swaps as :class:`Refined` does (``refined``), here until a full
     rotation of exchanges finds none (the refinement's own stopping rule),
     with a cap of 64 steps rather than 16 as a bound on the cost;
  3. DeepSeek's greedy packing of DeepSeek's counts is also a candidate,
     refined by up to ``greedy_steps`` single-head swaps (the heaviest
     GPU's best exchange with any other; on the hierarchical policy in the
     two nodes of each layer with the heaviest GPUs), which is the min-max
     refinement of the greedy that published balancers add to DeepSeek's;
     the lighter of (2) and (3) is kept (ties to (2));
  4. on the hierarchical policy with more than two groups per node, the
     expert groups are packed onto nodes three ways (greedy, refined, and
     greedy refined by single-head swaps), each runs 1-3, and each layer
     keeps the one with the lightest heaviest GPU (ties to greedy's);
  5. two replicas of one expert share a GPU only when no exchange of one of
     them with a replica of another expert, on a GPU of the domain that
     holds neither, keeps both GPUs at or under the domain's heaviest.

  Properties, by construction: every layer's heaviest GPU is at most that
  of :class:`Greedy` (DeepSeek's placement is among the candidates and no
  step raises a heaviest GPU), with or without spare slots; and (5) holds.

  Attributes:
    refined: the differencing and swap refinement of the kept candidate
      (and of the refined group packing); its ``max_steps`` defaults to 64.
    greedy_steps: the most single-head swap steps for greedy's packing (3)
      and for greedy's groups-to-nodes packing (4).
  """

  refined: Refined = Refined(max_steps=64)
  greedy_steps: int = 50

  name = "gpu_aware"

  def __post_init__(self):
    if not isinstance(self.refined, Refined):
      raise ValueError(f"refined must be a Refined instance, got {self.refined!r}")
    steps = self.greedy_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
      raise ValueError(f"greedy_steps must be a non-negative int, got {steps!r}")

  def pack_rows(self, problem: PackingProblem, num_packs: int, domains_per_layer: int) -> jax.Array:
    """:meth:`Refined.pack_rows` of :attr:`refined`: no counts to choose in a packing alone."""
    return self.refined.pack_rows(problem, num_packs, domains_per_layer)

  def group_candidates(self, weight: jax.Array, topology: Topology) -> jax.Array:
    """``mgroup2group [C, L, num_groups]``: greedy's packing, first (so that ties keep it).

    With more than two groups per node, where the pairing of groups is no
    longer obviously optimal, also the refined packing and greedy's refined
    by single-head swaps.
    """
    greedy = group_nodes(weight, topology, Greedy())
    if topology.num_groups <= 2 * topology.num_nodes:
      return greedy[None]
    refined = group_nodes(weight, topology, self.refined)
    num_layers = weight.shape[0]
    slots = greedy.reshape(num_layers, topology.num_nodes, -1)
    # One group of all the nodes: a single head, the heaviest node.
    group_load = group_loads(weight, topology.num_groups)
    swapped = swap.refine_rows(group_load, slots, self.greedy_steps, topology.num_nodes)
    return jnp.stack([greedy, refined, swapped.reshape(num_layers, -1)])

  def fill_domains(self, weight: jax.Array, topology: Topology) -> Domains:
    """GPU-aware counts and packing of the domains ``weight [X, n]`` (steps 1-3 of the rule).

    Up to :attr:`greedy_steps` single-head swap steps (the heaviest GPU's
    best exchange with any other GPU) refine greedy's packing of the
    water-filling counts, in the :data:`GREEDY_ROWS_PER_LAYER` rows of each
    layer with the heaviest GPU.
    """
    slots_per_node, gpus_per_node = topology.slots_per_node, topology.gpus_per_node
    rows = weight.shape[0]
    candidates = _candidates(weight, slots_per_node, gpus_per_node)
    water = Domains(
      candidates.expert[:, 0],
      candidates.rank[:, 0],
      candidates.count[:, 0],
      None,
      candidates.load[:, 0],
      None,
    )
    if candidates.slots is None:
      slots = jnp.broadcast_to(
        jnp.arange(slots_per_node, dtype=jnp.int32)[:, None], (rows, slots_per_node, 1)
      )
      return water._replace(slots=slots, heaviest=candidates.heaviest[:, 0])

    at = jnp.arange(rows)
    best = ops.argmin_first(candidates.heaviest)
    chosen = Domains(*(x[at, best] for x in candidates))
    if slots_per_node > 2 * gpus_per_node:
      slots = self.refined.refine(chosen.load, chosen.slots, chosen.heaviest, topology.num_nodes)
      chosen = chosen._replace(slots=slots, heaviest=packing.heaviest_pack(chosen.load, slots))

    # DeepSeek's placement of the domain: greedy packing of the water-filling.
    slots = jax.vmap(functools.partial(packing.greedy_slots, num_packs=gpus_per_node))(water.load)
    if self.greedy_steps and slots_per_node > 2 * gpus_per_node:
      heaviest = packing.heaviest_pack(water.load, slots)
      refined_rows = swap.heaviest_rows(heaviest, topology.num_nodes, GREEDY_ROWS_PER_LAYER)
      # One group of all the GPUs: a single head, the heaviest GPU.
      slots = swap.refine_rows(water.load, slots, self.greedy_steps, gpus_per_node, refined_rows)
    greedy = water._replace(slots=slots, heaviest=packing.heaviest_pack(water.load, slots))
    use_greedy = greedy.heaviest < chosen.heaviest
    return ops.where_rows(use_greedy, greedy, chosen)

  def finish_domains(self, domains: Domains) -> jax.Array:
    """Duplicate separation (step 5 of the rule, :func:`.duplicates.separate`)."""
    if domains.slots.shape[-1] == 1:  # one replica per GPU: no GPU holds two
      return domains.slots
    problem = PackingProblem(domains.load, domains.expert)
    return jax.vmap(duplicates.separate)(problem, domains.slots)


def sweep(num_spare: int) -> tuple[int, ...]:
  """The candidates ``j`` of a domain with ``num_spare`` spare slots.

  ``{0, 1, 2, 3}`` and the powers of two, up to ``ceil(num_spare / 2)``:
  every small ``j``, where the best one usually is, and a geometric grid
  above it (candidates near ``R`` give almost no expert a second replica).
  """
  top = (num_spare + 1) // 2
  powers = {1 << i for i in range(2, top.bit_length())}
  return tuple(sorted({j for j in (0, 1, 2, 3) if j <= top} | powers))


def candidate_counts(weight: jax.Array, slots_per_node: int, js: tuple[int, ...]):
  """The count candidates of one domain ``weight [n]`` (float32).

  Candidate ``j``: the first ``R - j`` picks of the water-filling, then one
  extra replica for each of the ``j`` heaviest experts that still have one
  (ties to the lower index); where fewer than ``j`` such experts exist, the
  water-filling itself (``j = 0``).

  Returns:
    ``(counts [J, n], extra [J, R], rank [J, R])``, int32: replicas of each
    expert, and the expert and replica rank of each extra slot.
  """
  n = weight.shape[0]
  num_spare = slots_per_node - n
  num_js = len(js)
  if num_spare == 0:
    empty = jnp.zeros((num_js, 0), jnp.int32)
    return jnp.ones((num_js, n), jnp.int32), empty, empty
  picks, pick_rank = replication.picks(weight, num_spare)
  j = jnp.asarray(js, jnp.int32)[:, None]
  candidate = jnp.broadcast_to(jnp.arange(num_js, dtype=jnp.int32)[:, None], (num_js, num_spare))
  kept = jnp.arange(num_spare, dtype=jnp.int32) < num_spare - j  # [J, R]
  filled = jnp.ones((num_js, n), jnp.int32)
  filled = filled.at[candidate, jnp.broadcast_to(picks, kept.shape)].add(kept.astype(jnp.int32))
  # The j heaviest experts with one replica are among the R heaviest experts
  # (at most R - j experts have more), so only those are scanned.
  scanned = min(num_spare, n)
  heaviest = ops.argsort_descending(weight, exact=False)[:scanned]
  heaviest_j = jnp.broadcast_to(heaviest, (num_js, scanned))
  single = jnp.take_along_axis(filled, heaviest_j, axis=1) == 1  # [J, scanned]
  single_rank = jnp.cumsum(single, axis=1) - 1
  given = single & (single_rank < j)
  enough = given.sum(axis=1) == j[:, 0]
  # Extra slots: the kept picks in pick order, then the given experts.
  destination = jnp.where(given, num_spare - j + single_rank, num_spare)
  given_expert = jnp.zeros(kept.shape, jnp.int32)
  given_expert = given_expert.at[candidate[:, :scanned], destination].set(heaviest_j, mode="drop")
  extra = jnp.where(kept, picks, given_expert)
  rank = jnp.where(kept, pick_rank, 1)
  counts = filled.at[candidate[:, :scanned], heaviest_j].add(given.astype(jnp.int32))

  def or_water_filling(x):
    return jnp.where(enough[:, None], x, x[0])

  return or_water_filling(counts), or_water_filling(extra), or_water_filling(rank)


def _replicas(weight: jax.Array, counts: jax.Array, extra: jax.Array):
  """``(expert [S], load [S])`` of one candidate of one domain."""
  expert = jnp.concatenate([jnp.arange(weight.shape[0], dtype=jnp.int32), extra])
  return expert, (weight / counts)[expert]


class _Candidates(NamedTuple):
  """The count candidates of domain rows, ``[X, J, ...]``, and their differencing packings.

  Fields as :class:`Domains`, one more axis.
  """

  expert: jax.Array
  rank: jax.Array
  count: jax.Array
  slots: jax.Array | None  # [X, J, G, k]; None with one slot per GPU
  load: jax.Array
  heaviest: jax.Array  # [X, J]


def _candidates(weight: jax.Array, slots_per_node: int, gpus_per_node: int) -> _Candidates:
  """Builds the count candidates of the domains ``weight [X, n]`` and packs each by differencing."""
  rows, n = weight.shape
  js = sweep(slots_per_node - n)
  counts, extra, rank = jax.vmap(
    functools.partial(candidate_counts, slots_per_node=slots_per_node, js=js)
  )(weight)
  rank = jnp.concatenate([jnp.zeros((rows, len(js), n), jnp.int32), rank], axis=2)
  expert, load = jax.vmap(jax.vmap(_replicas, in_axes=(None, 0, 0)))(weight, counts, extra)
  if slots_per_node == gpus_per_node:  # one replica per GPU: water-filling is optimal
    return _Candidates(expert, rank, counts, None, load, load.max(axis=2))
  difference = jax.vmap(functools.partial(packing.differencing_slots, num_packs=gpus_per_node))
  slots, pack_load = difference(load.reshape(rows * len(js), slots_per_node))
  slots = slots.reshape(rows, len(js), gpus_per_node, -1)
  return _Candidates(expert, rank, counts, slots, load, pack_load.max(axis=1).reshape(rows, -1))
