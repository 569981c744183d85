"""Packing: assign ``n`` weighted items to ``m`` packs of exactly ``g = n / m`` items.

Used twice by the hierarchical policy: expert groups onto nodes, and replicas
onto the GPUs of a node. Row functions take one row (a layer, or a layer's
node) and are ``vmap``-ped over rows.

* ``greedy`` is DeepSeek's algorithm, reproduced exactly: items in descending
  weight order (stable: ties to the lower index), each into the lightest pack
  that is not full (ties to the lower pack), one ``lax.fori_loop`` step per
  item, float32 loads accumulated in the reference's order.
* ``refined`` starts from the balanced largest differencing method (Karmarkar
  and Karp's differencing with equal pack sizes, "BLDM"): ``g - 1`` merges of
  ``m``-tuples instead of one step per item, and a better start than the
  greedy on skewed loads. Swap refinement (:mod:`eplb_jax.refinement`) then
  lowers its heaviest packs; it never makes the heaviest pack heavier. When
  the rows are the nodes of layers, only each layer's rows with the heaviest
  packs are refined.

Both produce ``slots [m, g]``: row ``p`` lists the items of pack ``p``, the
column being the item's rank in the pack (the placement uses them as the
slot order of the GPUs); :func:`balanced_packing` converts them into
DeepSeek's ``(pack_index, rank_in_pack)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from eplb_jax import _checks
from eplb_jax import _ops
from eplb_jax import refinement


def greedy_slots(weight: jax.Array, num_packs: int) -> jax.Array:
  """DeepSeek's greedy packing of one row ``[n]``, as ``slots [m, g]``."""
  n = weight.shape[0]
  per_pack = n // num_packs
  order = _ops.argsort_descending(weight)
  sorted_weight = weight[order]

  def place(i, state):
    loads, counts, slots = state
    pack = _ops.argmin_first(jnp.where(counts < per_pack, loads, jnp.inf))
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
  index order, see :func:`_ops.descending_ranks`), are cut into ``g`` rounds
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
  rounds = _ops.argsort_descending(weight, exact=False).reshape(g, m)[:, ::-1]
  partial = jnp.arange(g, dtype=jnp.int32)
  position = jnp.arange(m, dtype=jnp.int32)[:, None]

  def merge(_, state):
    loads, owner, slots = state
    spread = jnp.where(owner == partial, loads[:, -1] - loads[:, 0], -jnp.inf)
    a = _ops.argmax_first(spread)
    b = _ops.argmax_first(jnp.where(partial == a, -jnp.inf, spread))
    merged = loads[a] + loads[b][::-1]  # pack j of a takes pack m - 1 - j of b
    order = _ops.argsort_descending(-merged, exact=False)[:, None]  # ascending
    source = jnp.where(owner == a, order, jnp.where(owner == b, m - 1 - order, position))
    slots = jnp.take_along_axis(slots, source, axis=0)
    loads = loads.at[a].set(merged[order[:, 0]])
    return loads, jnp.where(owner == b, a, owner), slots

  init = (weight[rounds], partial, rounds.T)
  loads, owner, slots = jax.lax.fori_loop(0, g - 1, merge, init)
  return slots, loads[owner[0]]


# Of the rows that share a layer (its nodes), only this many, those with the
# heaviest packs after differencing, are refined: the layer's heaviest GPU
# sets its balance. On the hierarchical benchmark shapes refining all rows
# gives the same balancedness.
REFINED_ROWS_PER_LAYER = 2

# On that path the refinement runs in two rounds: every chosen row takes the
# first steps of the budget; then, of each layer, only the chosen row with the
# heaviest pack (the one that sets the layer's balance) takes the rest. On the
# hierarchical benchmark shapes the result equals the whole budget for every
# chosen row.
_FIRST_ROUND_STEPS = 6


def rows_to_refine(heaviest: jax.Array, rows_per_layer: int) -> jax.Array:
  """Which rows the refinement takes, given the heaviest pack load of each row ``[X]``.

  Runs of ``rows_per_layer`` rows share a layer; of each run, the
  ``REFINED_ROWS_PER_LAYER`` rows with the heaviest packs (all rows if the run
  is no longer). Returns int32 row indices, layer by layer.
  """
  rows = heaviest.shape[0]
  if rows_per_layer <= REFINED_ROWS_PER_LAYER:
    return jnp.arange(rows, dtype=jnp.int32)
  order = _ops.argsort_descending(heaviest.reshape(-1, rows_per_layer), exact=False)
  first_row = jnp.arange(0, rows, rows_per_layer, dtype=jnp.int32)[:, None]
  return (order[:, :REFINED_ROWS_PER_LAYER] + first_row).reshape(-1)


def _refine_rows(weight: jax.Array, slots: jax.Array, max_steps: int) -> jax.Array:
  return jax.vmap(functools.partial(refinement.refine_slots, max_steps=max_steps))(weight, slots)


def _refined_rows(weight: jax.Array, num_packs: int, rows_per_layer: int) -> jax.Array:
  """Differencing plus swap refinement of ``weight [X, n]``, as ``slots [X, m, g]``."""
  slots, start_loads = jax.vmap(functools.partial(differencing_slots, num_packs=num_packs))(weight)
  if weight.shape[1] <= 2 * num_packs:
    # Two items per pack: differencing pairs the i-th heaviest item with the
    # i-th lightest, which minimises the heaviest pack; nothing to refine.
    return slots
  if rows_per_layer <= REFINED_ROWS_PER_LAYER:
    return _refine_rows(weight, slots, refinement.MAX_STEPS)
  chosen = rows_to_refine(start_loads.max(axis=1), rows_per_layer)
  chosen_weight = weight[chosen]
  refined = _refine_rows(chosen_weight, slots[chosen], _FIRST_ROUND_STEPS)
  # Of each layer's refined rows, the one with the heaviest pack continues.
  heaviest = jax.vmap(lambda w, s: _ops.sum_last(w[s]).max())(chosen_weight, refined)
  per_layer = heaviest.reshape(-1, REFINED_ROWS_PER_LAYER)
  again = _ops.argmax_first(per_layer) + jnp.arange(0, chosen.shape[0], REFINED_ROWS_PER_LAYER)
  steps = refinement.MAX_STEPS - _FIRST_ROUND_STEPS
  refined = refined.at[again].set(_refine_rows(chosen_weight[again], refined[again], steps))
  return slots.at[chosen].set(refined)


def pack_slots(weight: jax.Array, num_packs: int, mode: str, rows_per_layer: int = 1) -> jax.Array:
  """Unchecked core of :func:`balanced_packing`: float32 ``weight [X, n]`` as ``slots [X, m, g]``.

  Runs of ``rows_per_layer`` consecutive rows share a layer; in refined mode
  only ``REFINED_ROWS_PER_LAYER`` rows of each layer are refined.
  """
  rows, n = weight.shape
  if n == num_packs:
    # One item per pack: every assignment is equally balanced, and the
    # reference keeps the identity order.
    return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (rows, n, 1))
  if mode == "greedy":
    return jax.vmap(functools.partial(greedy_slots, num_packs=num_packs))(weight)
  return _refined_rows(weight, num_packs, rows_per_layer)


def balanced_packing(
  weight: jax.typing.ArrayLike, num_packs: int, *, mode: str = "refined"
) -> tuple[jax.Array, jax.Array]:
  """Packs ``n`` weighted items into ``num_packs`` packs of ``n / num_packs`` items each.

  Args:
    weight: ``[X, n]`` weight of each item; each row is packed independently.
    num_packs: number of packs; must divide ``n``.
    mode: ``"greedy"`` (DeepSeek's placement, exactly) or ``"refined"``
      (balanced differencing plus swap refinement).

  Returns:
    ``(pack_index, rank_in_pack)``, int32 ``[X, n]``: the pack of each item and
    its position inside that pack.
  """
  weight = _checks.check_weight(weight)
  num_packs = _checks.check_size(num_packs, "num_packs")
  mode = _checks.check_mode(mode)
  if weight.shape[1] % num_packs:
    raise ValueError(
      f"num_packs must divide the number of items ({weight.shape[1]}), got {num_packs}"
    )
  return _pack_jit(weight, num_packs, mode)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _pack_jit(weight: jax.Array, num_packs: int, mode: str) -> tuple[jax.Array, jax.Array]:
  return jax.vmap(slots_to_index)(pack_slots(weight, num_packs, mode))
