"""Swap refinement: lower the heaviest pack by exchanging items with other packs.

Each step looks at the heaviest pack ``h`` and every exchange of one of its
items ``a`` with an item ``b`` of another pack ``p``. The exchange moves
``d = w_a - w_b`` from ``h`` to ``p``; its score is the heavier of the two
packs afterwards, ``max(L_h - d, L_p + d)``. The best-scoring exchange is made
if it leaves both packs strictly lighter than ``L_h`` was; otherwise ``h``
cannot be lowered by one exchange and the loop stops. A ``lax.while_loop``
bounded by ``max_iters`` drives it, so the cost adapts to the input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# An exchange must lower the heaviest pack by more than this fraction of its
# load: float32 rounding must not make the loop cycle between equal packings.
_REL_TOL = 1e-6


def refine_slots(weight: jax.Array, slots: jax.Array, max_iters: int | None = None) -> jax.Array:
  """Refines the packing ``slots [m, g]`` of one row of item weights ``[n]``.

  Args:
    weight: ``[n]`` float32 item weights.
    slots: ``[m, g]`` item indices, row ``p`` holding the items of pack ``p``.
    max_iters: bound on the number of exchanges; default ``4 * n``.

  Returns:
    ``[m, g]`` refined slots; the heaviest pack is never heavier than before.
  """
  num_packs, per_pack = slots.shape
  if max_iters is None:
    max_iters = 4 * num_packs * per_pack
  pack_ids = jnp.arange(num_packs)

  def best_exchange(slots):
    items = weight[slots]  # [m, g]
    loads = items.sum(axis=1)
    heavy = jnp.argmax(loads)
    # delta[p, b, a]: load moved from the heaviest pack to pack p when its
    # item a is exchanged with item b of pack p.
    delta = items[heavy][None, None, :] - items[:, :, None]
    score = jnp.maximum(loads[heavy] - delta, loads[:, None, None] + delta)
    score = jnp.where((pack_ids == heavy)[:, None, None], jnp.inf, score)
    best = jnp.argmin(score)
    improves = score.reshape(-1)[best] < loads[heavy] * (1 - _REL_TOL)
    other, b, a = jnp.unravel_index(best, score.shape)
    return improves, heavy, a, other, b

  def cond(state):
    step, _, improves = state
    return (step < max_iters) & improves

  def body(state):
    step, slots, _ = state
    improves, heavy, a, other, b = best_exchange(slots)
    item_a, item_b = slots[heavy, a], slots[other, b]
    swapped = slots.at[heavy, a].set(item_b).at[other, b].set(item_a)
    return step + 1, jnp.where(improves, swapped, slots), improves

  return jax.lax.while_loop(cond, body, (0, slots, True))[1]
