"""GPU-aware replica counts: per packing domain, the counts whose packing has the lightest GPU.

A domain packs ``n`` experts into ``S`` slots on ``G`` GPUs of ``k = S / G``
slots, with ``R = S - n`` spare slots. Water-filling (DeepSeek's counts,
:mod:`.replication`) minimises the heaviest replica; the heaviest GPU is
what a step waits for, and on skewed loads other counts pack better. So
each domain builds a few count candidates (:func:`candidate_counts`), packs
them all (one more batch axis), and keeps the lightest (:func:`domain_rows`);
DeepSeek's own placement of the domain is a candidate too, so the result is
never heavier than it. :class:`eplb_jax.GpuAware` documents the rule.

Slot layout of a candidate, as :func:`.replication.replicate_rows`: slot
``e < n`` holds expert ``e`` (replica rank 0), slot ``n + i`` the ``i``-th
extra replica.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from eplb_jax._src import ops
from eplb_jax._src import packing
from eplb_jax._src import replication
from eplb_jax._src import swap
from eplb_jax._src.modes import GpuAware

# Rows of each layer (nodes) whose greedy packing the single-head swaps refine.
GREEDY_ROWS_PER_LAYER = 2


def sweep(num_spare: int) -> tuple[int, ...]:
  """The candidates ``j`` of a domain with ``num_spare`` spare slots.

  ``{0, 1, 2, 3}`` and the powers of two, up to ``ceil(num_spare / 2)``:
  every small ``j``, where the best one usually is, and a geometric grid
  above it (candidates near ``R`` give almost no expert a second replica).
  """
  top = (num_spare + 1) // 2
  powers = {1 << i for i in range(2, top.bit_length())}
  return tuple(sorted({j for j in (0, 1, 2, 3) if j <= top} | powers))


def candidate_counts(weight: jax.Array, num_slots: int, js: tuple[int, ...]):
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
  num_spare = num_slots - n
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


class Domains(NamedTuple):
  """Rows of packed domains ``[X, ...]``: the chosen counts and their packing.

  Attributes:
    expert: ``[X, S]`` the expert of each replica (slot layout of the module doc).
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


def _candidates(weight: jax.Array, num_slots: int, num_gpus: int) -> _Candidates:
  """Builds the count candidates of the domains ``weight [X, n]`` and packs each by differencing."""
  rows, n = weight.shape
  js = sweep(num_slots - n)
  counts, extra, rank = jax.vmap(functools.partial(candidate_counts, num_slots=num_slots, js=js))(
    weight
  )
  rank = jnp.concatenate([jnp.zeros((rows, len(js), n), jnp.int32), rank], axis=2)
  expert, load = jax.vmap(jax.vmap(_replicas, in_axes=(None, 0, 0)))(weight, counts, extra)
  if num_slots == num_gpus:  # one replica per GPU: water-filling is optimal
    return _Candidates(expert, rank, counts, None, load, load.max(axis=2))
  difference = jax.vmap(functools.partial(packing.differencing_slots, num_packs=num_gpus))
  slots, pack_load = difference(load.reshape(rows * len(js), num_slots))
  slots = slots.reshape(rows, len(js), num_gpus, -1)
  return _Candidates(expert, rank, counts, slots, load, pack_load.max(axis=1).reshape(rows, -1))


def domain_rows(
  weight: jax.Array,
  num_slots: int,
  num_gpus: int,
  domains_per_layer: int,
  mode: GpuAware,
) -> Domains:
  """GPU-aware counts and packing of the domains ``weight [X, n]`` onto ``num_gpus`` GPUs each.

  Runs of ``domains_per_layer`` consecutive rows share a layer (for the
  refinement's choice of rows). Up to ``mode.greedy_steps`` single-head swap
  steps (the heaviest GPU's best exchange with any other GPU) refine greedy's
  packing of the water-filling counts, in the :data:`GREEDY_ROWS_PER_LAYER`
  rows of each layer with the heaviest GPU.
  """
  rows = weight.shape[0]
  candidates = _candidates(weight, num_slots, num_gpus)
  water = Domains(
    candidates.expert[:, 0],
    candidates.rank[:, 0],
    candidates.count[:, 0],
    None,
    candidates.load[:, 0],
    None,
  )
  if candidates.slots is None:
    slots = jnp.broadcast_to(jnp.arange(num_slots, dtype=jnp.int32)[:, None], (rows, num_slots, 1))
    return water._replace(slots=slots, heaviest=candidates.heaviest[:, 0])

  at = jnp.arange(rows)
  best = ops.argmin_first(candidates.heaviest)
  chosen = Domains(*(x[at, best] for x in candidates))
  if num_slots > 2 * num_gpus:
    slots = packing.refine_rows(
      chosen.load, chosen.slots, chosen.heaviest, domains_per_layer, mode.refined
    )
    chosen = chosen._replace(slots=slots, heaviest=packing.heaviest_pack(chosen.load, slots))

  # DeepSeek's placement of the domain: greedy packing of the water-filling.
  slots = jax.vmap(functools.partial(packing.greedy_slots, num_packs=num_gpus))(water.load)
  if mode.greedy_steps and num_slots > 2 * num_gpus:
    heaviest = packing.heaviest_pack(water.load, slots)
    refined_rows = swap.heaviest_rows(heaviest, domains_per_layer, GREEDY_ROWS_PER_LAYER)
    # One group of all the GPUs: a single head, the heaviest GPU.
    slots = swap.refine_rows(water.load, slots, mode.greedy_steps, num_gpus, refined_rows)
  greedy = water._replace(slots=slots, heaviest=packing.heaviest_pack(water.load, slots))
  use_greedy = greedy.heaviest < chosen.heaviest
  return jax.tree.map(
    lambda a, b: jnp.where(use_greedy.reshape((rows,) + (1,) * (a.ndim - 1)), b, a),
    chosen,
    greedy,
  )
