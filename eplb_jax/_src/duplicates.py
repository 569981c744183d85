"""Duplicate separation: two replicas of one expert share a GPU only where that is lighter.

Replicas of one expert on one GPU add nothing to the expert's spread (they
serve the same tokens from the same place) and swing together when its load
changes. :func:`separate` moves them apart with exchanges that never raise
the domain's heaviest GPU, so it costs no balance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from eplb_jax._src import ops
from eplb_jax._src.problem import PackingProblem

# Duplicates examined per exchange step (the first ones not yet found stuck).
_PER_STEP = 4


def separate(problem: PackingProblem, slots: jax.Array) -> jax.Array:
  """Separates duplicate replicas in the packing ``slots [m, g]`` of one row of items ``[n]``.

  While a GPU ``p`` holds two replicas of an expert ``e``, looks for an
  exchange of one of them with a replica of an expert ``f`` on another GPU
  ``q`` such that ``p`` holds no ``f``, ``q`` holds no ``e``, and both GPUs
  end at or under the heaviest GPU load; makes the one leaving the lighter
  of the two GPUs lightest. Each exchange removes a duplicate, so it stops
  after at most ``n / 2`` of them. At the end no duplicate can be removed by
  one such exchange.

  Returns:
    ``[m, g]``: the same items, the heaviest pack no heavier.
  """
  weight, expert = problem
  num_items = weight.shape[0]  # expert ids are below it: every expert has an item
  num_packs, per_pack = slots.shape
  flat = jnp.arange(num_packs * per_pack)
  position = flat.reshape(num_packs, per_pack)

  def duplicates(slots):  # [m, g]: a later replica of an expert already on its GPU
    return ops.occurrence_rank(expert[slots]) > 0

  def cond(state):
    return state[2].any()

  def body(state):
    slots, stuck, pending = state
    e, x = expert[slots], weight[slots]
    loads = ops.sum_last(x)
    limit = loads.max()
    # The first _PER_STEP pending duplicates: their flat positions.
    order = jnp.cumsum(pending.reshape(-1)).reshape(pending.shape) - 1
    is_d = pending[None] & (order[None] == jnp.arange(_PER_STEP)[:, None, None])  # [D, m, g]
    valid = is_d.any(axis=(1, 2))
    at = jnp.where(is_d, position[None], 0).sum(axis=(1, 2))  # [D]
    p = at // per_pack
    e_d, x_d = e.reshape(-1)[at], x.reshape(-1)[at]
    q_has_e = (e[None] == e_d[:, None, None]).any(axis=2)  # [D, m]
    # Whether GPU p of each duplicate holds expert f: a presence table per duplicate.
    on_p = (
      jnp.zeros((_PER_STEP, num_items), bool).at[jnp.arange(_PER_STEP)[:, None], e[p]].set(True)
    )
    p_has_f = jnp.take_along_axis(on_p, jnp.broadcast_to(e.reshape(-1), (_PER_STEP, e.size)), 1)
    p_has_f = p_has_f.reshape(_PER_STEP, num_packs, per_pack)  # [D, m, g]
    new_p = loads[p][:, None, None] - x_d[:, None, None] + x[None]
    new_q = loads[None, :, None] + x_d[:, None, None] - x[None]
    allowed = (
      valid[:, None, None]
      & (jnp.arange(num_packs)[None, :, None] != p[:, None, None])
      & ~q_has_e[:, :, None]
      & ~p_has_f
      & (new_p <= limit)
      & (new_q <= limit)
    )
    score = jnp.where(allowed, jnp.maximum(new_p, new_q), jnp.inf).reshape(-1)
    best = ops.argmin_first(score)
    found = jnp.isfinite(score[best])
    a, b = at[best // (num_packs * per_pack)], best % (num_packs * per_pack)
    items = slots.reshape(-1)
    exchanged = jnp.where(flat == a, items[b], jnp.where(flat == b, items[a], items))
    slots = jnp.where(found, exchanged.reshape(slots.shape), slots)
    # An exchange may free the stuck ones; otherwise the examined ones are stuck.
    stuck = jnp.where(found, False, stuck | (pending & (order < _PER_STEP)))
    return slots, stuck, duplicates(slots) & ~stuck

  init = (slots, jnp.zeros(slots.shape, bool), duplicates(slots))
  return jax.lax.while_loop(cond, body, init)[0]
