"""Swap search: lower the heaviest packs by exchanging items between packs.

One kernel serves both users of exchanges; they differ only in how they rank
the candidate exchanges (a *cost*):

* refinement (:func:`refine_slots`) ranks by the heavier of the two packs
  afterwards, the min-max rule; the modes refine rows of packings through
  :func:`refine_rows`, choosing them with :func:`heaviest_rows`;
* migration (:mod:`eplb_jax._src.migration.warm`) ranks first by replicas
  moved away from the GPU that holds them, then by load.

Exchanging item ``a`` of a heavy pack ``h`` with item ``b`` of pack ``p``
moves ``w_a - w_b`` from ``h`` to ``p``; its *score* is the heavier of the
two packs afterwards, ``max(L_h - w_a + w_b, L_p - w_b + w_a)``. Only
exchanges whose score is below ``L_h`` qualify (by more than a relative
``1e-6``, so float32 rounding cannot make a loop cycle): an exchange never
makes the heaviest pack heavier.

Packs are laid out ``[k, r, g]``: ``k`` groups of ``r`` packs of ``g``
items. In each step the heaviest pack of every group (its head) makes the
exchange its cost ranks first with the other packs of one partner group,
the partner rotating from step to step (group ``j`` pairs with
``(j + step) % k``); heads are never partners, so the ``k`` exchanges are
disjoint. With ``k = 1`` this is the single heavy pack scanning every other
pack. Costs are tuples of keys compared lexicographically, lowest first.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from eplb_jax._src import ops

# An exchange must lower the heavy pack by more than this fraction of its load.
REL_TOL = 1e-6


class Packs(NamedTuple):
  """Items laid out ``[k, r, g]``: group, pack within the group, slot within the pack.

  Attributes:
    load: float32 load of each item.
    payload: a pytree of arrays of the same shape that move with the items
      (item ids, experts, where each item is stored now).
  """

  load: jax.Array
  payload: Any


class Candidates(NamedTuple):
  """The exchanges a cost ranks: head item ``a`` of each group with partner item ``b``.

  Shapes use ``k`` groups, ``A`` head items (all ``g`` of them, or the one
  chosen) and ``B = r * g`` partner items, flattened pack by pack.

  Attributes:
    score: ``[k, A, B]`` the heavier of the two packs after the exchange
      (``inf`` where ``b`` sits in a head).
    head_load: ``[k]`` the load of each head.
    head_row: ``[k]`` the head's pack index within its group.
    head: :class:`Packs` ``[k, A]``, the head items considered.
    head_pack: :class:`Packs` ``[k, g]``, all items of the head.
    partner: :class:`Packs` ``[k, B]``, the items of the partner group.
    partner_load: ``[k, B]`` the load of the pack each partner item is in.
  """

  score: jax.Array
  head_load: jax.Array
  head_row: jax.Array
  head: Packs
  head_pack: Packs
  partner: Packs
  partner_load: jax.Array


Cost = Callable[[Candidates], tuple[jax.Array, ...]]


def min_max_cost(candidates: Candidates) -> tuple[jax.Array, ...]:
  """The refinement's cost: the heavier of the two packs after the exchange."""
  return (candidates.score,)


def _lexicographic_min(keys: tuple[jax.Array, ...]) -> tuple[tuple[jax.Array, ...], jax.Array]:
  """Lexicographic minimum of ``keys [..., n]`` over the last axis.

  Returns the minimum of each key (``[..., 1]``) and the mask of the entries
  that attain all of them.
  """
  best, tied = [], None
  for key in keys:
    low = (key if tied is None else jnp.where(tied, key, jnp.inf)).min(axis=-1, keepdims=True)
    best.append(low)
    tied = key == low if tied is None else tied & (key == low)
  return tuple(best), tied


def _lexicographic_argmin(keys: tuple[jax.Array, ...]) -> jax.Array:
  """Index of the first lexicographic minimum of ``keys [..., n]`` (int32 ``[...]``)."""
  if len(keys) == 1:
    return ops.argmin_first(keys[0])
  _, tied = _lexicographic_min(keys)
  return ops.argmax_first(tied.astype(jnp.int32))


def step(step_index: jax.Array, packs: Packs, cost: Cost) -> tuple[Packs, jax.Array]:
  """One round of disjoint exchanges, each group head with its partner group.

  Returns the new packs and whether the heaviest head made an exchange.
  """
  groups, rows, per_pack = packs.load.shape
  pack_load = ops.sum_last(packs.load)  # [k, r]
  head_row = ops.argmax_first(pack_load)  # [k]
  is_head = jnp.arange(rows) == head_row[:, None]
  head_load = pack_load.max(axis=-1)
  head_pack = jax.tree.map(lambda x: jnp.where(is_head[..., None], x, 0).sum(axis=1), packs)

  # Head j exchanges with group partner[j]; group i hears from head source[i].
  group_ids = jnp.arange(groups)
  partner = (group_ids + step_index) % groups
  source = (group_ids - step_index) % groups
  partner_packs = jax.tree.map(lambda x: x[partner].reshape(groups, -1), packs)
  partner_load = jnp.repeat(pack_load[partner], per_pack, axis=-1)
  rest = jnp.where(is_head, jnp.inf, pack_load)[..., None] - packs.load  # heads are no partners
  partner_rest = rest[partner].reshape(groups, -1)

  def keys(head: Packs) -> tuple[jax.Array, ...]:
    # Laid out [k, A, B], the long axis last; reduced over B, then over A.
    w_a = head.load[:, :, None]
    score = jnp.maximum(
      (head_load[:, None, None] - w_a) + partner_packs.load[:, None, :],
      partner_rest[:, None, :] + w_a,
    )
    candidates = Candidates(
      score, head_load, head_row, head, head_pack, partner_packs, partner_load
    )
    first, *others = cost(candidates)
    qualifies = score < (head_load * (1 - REL_TOL))[:, None, None]
    return (jnp.where(qualifies, first, jnp.inf), *others)

  per_a, _ = _lexicographic_min(keys(head_pack))  # [k, g, 1] each
  a = _lexicographic_argmin(tuple(key[..., 0] for key in per_a))  # [k]
  chosen = jax.tree.map(lambda x: jnp.take_along_axis(x, a[:, None], axis=1), head_pack)
  b = _lexicographic_argmin(tuple(key[:, 0, :] for key in keys(chosen)))  # [k], into r * g
  made = jnp.isfinite(jnp.take_along_axis(per_a[0][..., 0], a[:, None], axis=1)[:, 0])

  # Flat positions (pack row * g + slot) of the exchanged items in their group.
  flat_a = head_row * per_pack + a
  pos_a = jnp.where(made, flat_a, -1)  # in group j, taken by head j
  pos_b = jnp.where(made, b, -1)[source]  # in group i, taken by head source[i]
  flat = jnp.arange(rows * per_pack)

  def exchange(x: jax.Array) -> jax.Array:
    x = x.reshape(groups, -1)
    x_a = jnp.take_along_axis(x, flat_a[:, None], axis=1)
    x_b = jnp.take_along_axis(x[partner], b[:, None], axis=1)
    x = jnp.where(flat == pos_a[:, None], x_b, jnp.where(flat == pos_b[:, None], x_a[source], x))
    return x.reshape(groups, rows, per_pack)

  heaviest = ops.argmax_first(head_load)
  return jax.tree.map(exchange, packs), made[heaviest]


def run(packs: Packs, cost: Cost, max_steps: int) -> Packs:
  """Exchanges until the heaviest head found none in a full rotation, or ``max_steps`` steps.

  A full rotation is ``k`` consecutive steps (the heaviest pack has then met
  every other pack); with ``k = 1``, one step. Under ``vmap`` every row steps
  until the slowest row stops, so ``max_steps`` is what bounds the cost.
  """
  groups = packs.load.shape[0]

  def cond(state):
    count, _, idle = state
    return (count < max_steps) & (idle < groups)

  def body(state):
    count, packs, idle = state
    packs, progress = step(count, packs, cost)
    return count + 1, packs, jnp.where(progress, 0, idle + 1)

  return jax.lax.while_loop(cond, body, (0, packs, 0))[1]


def refinement_groups(num_packs: int, packs_per_group: int) -> int:
  """The largest divisor of ``num_packs`` that is at most ``num_packs / packs_per_group`` (>= 1)."""
  target = max(1, num_packs // packs_per_group)
  return max(k for k in range(1, target + 1) if num_packs % k == 0)


def refine_slots(
  weight: jax.Array, slots: jax.Array, max_steps: int, packs_per_group: int
) -> jax.Array:
  """Min-max refinement of the packing ``slots [m, g]`` of one row of item weights ``[n]``.

  The ``m`` packs are dealt by descending load into ``k`` groups (about
  ``m / packs_per_group``; the pack of rank ``j`` joins group ``j % k``), so
  the ``k`` heaviest packs head different groups, then :func:`run` exchanges
  by :func:`min_max_cost`.

  Returns:
    ``[m, g]`` refined slots: the same items regrouped (packs in any order),
    the heaviest pack no heavier than before.
  """
  num_packs, per_pack = slots.shape
  groups = refinement_groups(num_packs, packs_per_group)
  items = weight[slots]
  order = ops.argsort_descending(ops.sum_last(items), exact=False)
  shape = (num_packs // groups, groups, per_pack)
  slots, items = (x[order].reshape(shape).swapaxes(0, 1) for x in (slots, items))
  refined = run(Packs(items, slots), min_max_cost, max_steps)
  return refined.payload.reshape(num_packs, per_pack)


def heaviest_rows(
  heaviest: jax.Array, domains_per_layer: int, rows_per_layer: int
) -> jax.Array | None:
  """Which rows to refine, given the heaviest pack load of each row ``heaviest [X]``.

  Runs of ``domains_per_layer`` consecutive rows share a layer (the nodes of
  a layer); of each run, the ``rows_per_layer`` rows with the heaviest packs,
  since a layer's heaviest pack sets its balance. Returns int32 row indices,
  layer by layer, or ``None`` (every row) where a layer has no more rows.
  """
  if domains_per_layer <= rows_per_layer:
    return None
  num_rows = heaviest.shape[0]
  order = ops.argsort_descending(heaviest.reshape(-1, domains_per_layer), exact=False)
  first_row = jnp.arange(0, num_rows, domains_per_layer, dtype=jnp.int32)[:, None]
  return (order[:, :rows_per_layer] + first_row).reshape(-1)


def refine_rows(
  weight: jax.Array,
  slots: jax.Array,
  max_steps: int,
  packs_per_group: int,
  rows: jax.Array | None = None,
) -> jax.Array:
  """:func:`refine_slots` of the rows ``rows`` (every row if ``None``) of ``slots [X, m, g]``.

  Row ``x`` packs the items ``weight [X, n]`` of row ``x``; rows not listed
  come back unchanged.
  """
  refine = jax.vmap(
    functools.partial(refine_slots, max_steps=max_steps, packs_per_group=packs_per_group)
  )
  if rows is None:
    return refine(weight, slots)
  return slots.at[rows].set(refine(weight[rows], slots[rows]))
