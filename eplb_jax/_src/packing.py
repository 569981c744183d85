"""Packing: assign ``n`` weighted items to ``m`` packs of exactly ``g = n / m`` items.

Used twice by the hierarchical policy: expert groups onto nodes, and replicas
onto the GPUs of a node. Row functions take one row (a layer, or a layer's
node) and are ``vmap``-ped over rows; :func:`pack_slots` packs rows the way a
mode does (:meth:`.Mode.pack_rows`). The packers the modes build on:

* :func:`greedy_slots` is DeepSeek's algorithm, reproduced exactly: items in
  descending weight order (stable: ties to the lower index), each into the
  lightest pack that is not full (ties to the lower pack), one
  ``lax.fori_loop`` step per item, float32 loads accumulated in the
  reference's order.
* :func:`differencing_slots` is the balanced largest differencing method
  (Karmarkar and Karp's differencing with equal pack sizes, "BLDM"): ``g - 1``
  merges of ``m``-tuples instead of one step per item; the refined mode
  (:mod:`.modes.refined`) then lowers its heaviest packs by swaps.

Both produce ``slots [m, g]``: row ``p`` lists the items of pack ``p``, the
column being the item's rank in the pack (the placement uses them as the
slot order of the GPUs); :func:`balanced_packing` converts them into
DeepSeek's ``(pack_index, rank_in_pack)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from eplb_jax._src import ops
from eplb_jax._src.problem import PackingProblem

if TYPE_CHECKING:  # the modes use this module's packers
  from eplb_jax._src.modes import Mode


def greedy_slots(weight: jax.Array, num_packs: int) -> jax.Array:
  """DeepSeek's greedy packing of one row ``[n]``, as ``slots [m, g]``."""
  n = weight.shape[0]
  per_pack = n // num_packs
  order = ops.argsort_descending(weight)
  sorted_weight = weight[order]

  def place(i, state):
    loads, counts, slots = state
    pack = ops.argmin_first(jnp.where(counts < per_pack, loads, jnp.inf))
    chosen = jnp.arange(num_packs) == pack
    return (
      jnp.where(chosen, loads + sorted_weight[i], loads),
      counts + chosen,
      slots.at[pack, counts[pack]].set(order[i]),
    )

  init = (
    jnp.zeros(num_packs, jnp.float32),
    jnp.zeros(num_packs, jnp.int32),
    jnp.zeros((num_packs, per_pack), jnp.int32),
  )
  return jax.lax.fori_loop(0, n, place, init)[2]


def slots_to_index(slots: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Converts ``slots [m, g]`` into ``(pack_index [n], rank_in_pack [n])``."""
  num_packs, per_pack = slots.shape
  items = slots.reshape(-1)
  pack = jnp.repeat(jnp.arange(num_packs, dtype=jnp.int32), per_pack)
  rank = jnp.tile(jnp.arange(per_pack, dtype=jnp.int32), num_packs)
  empty = jnp.zeros(items.shape, jnp.int32)
  return empty.at[items].set(pack), empty.at[items].set(rank)


def differencing_slots(weight: jax.Array, num_packs: int) -> tuple[jax.Array, jax.Array]:
  """Balanced largest differencing packing of one row ``[n]``: ``(slots [m, g], loads [m])``.

  The items, sorted by weight (coarsely: near-equal weights may come in
  index order, see :func:`ops.argsort_descending`), are cut into ``g`` rounds
  of ``m``; each round is a partial packing of one item per pack. Each of the
  ``g - 1`` steps merges the two partial packings whose pack loads spread the
  most (max - min), pairing the heaviest pack of one with the lightest of the
  other, until one packing is left. Partial packings keep their packs in
  ascending load order, so a merge is one addition and one re-sort of ``m``
  loads. Column ``i`` of ``slots`` holds round ``i``'s items by position in
  the partial packing that owns the round; a merge permutes the columns of
  the two merged partials (one gather of ``m x g`` items).
  """
  m = num_packs
  g = weight.shape[0] // m
  rounds = ops.argsort_descending(weight, exact=False).reshape(g, m)[:, ::-1]
  partial = jnp.arange(g, dtype=jnp.int32)
  position = jnp.arange(m, dtype=jnp.int32)[:, None]

  def merge(_, state):
    loads, owner, slots = state
    spread = jnp.where(owner == partial, loads[:, -1] - loads[:, 0], -jnp.inf)
    a = ops.argmax_first(spread)
    b = ops.argmax_first(jnp.where(partial == a, -jnp.inf, spread))
    merged = loads[a] + loads[b][::-1]  # pack j of a takes pack m - 1 - j of b
    order = ops.argsort_descending(-merged, exact=False)[:, None]  # ascending
    source = jnp.where(owner == a, order, jnp.where(owner == b, m - 1 - order, position))
    slots = jnp.take_along_axis(slots, source, axis=0)
    loads = loads.at[a].set(merged[order[:, 0]])
    return loads, jnp.where(owner == b, a, owner), slots

  init = (weight[rounds], partial, rounds.T)
  loads, owner, slots = jax.lax.fori_loop(0, g - 1, merge, init)
  return slots, loads[owner[0]]


def heaviest_pack(weight: jax.Array, slots: jax.Array) -> jax.Array:
  """``[X]``: the heaviest pack load of each packing ``slots [X, m, g]`` of ``weight [X, n]``."""
  return jax.vmap(lambda w, s: ops.sum_last(w[s]).max())(weight, slots)


def pack_slots(
  problem: PackingProblem, num_packs: int, mode: Mode, domains_per_layer: int = 1
) -> jax.Array:
  """Packs each row of ``problem`` (``[X, n]``) into ``num_packs`` packs: ``slots [X, m, g]``.

  Runs of ``domains_per_layer`` consecutive rows share a layer (see
  :meth:`.Mode.pack_rows`, which packs rows of more items than packs).
  """
  rows, n = problem.weight.shape
  if n == num_packs:
    # One item per pack: every assignment is equally balanced, and the
    # reference keeps the identity order.
    return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (rows, n, 1))
  return mode.pack_rows(problem, num_packs, domains_per_layer)
