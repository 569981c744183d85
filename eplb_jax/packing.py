"""Packing: assign ``n`` weighted items to ``m`` packs of exactly ``n / m`` items.

Used twice by the hierarchical policy: expert groups onto nodes, and replicas
onto the GPUs of a node. All row-level functions work on one row (a layer, or
a layer's node) and are ``vmap``-ped over rows.

Internally a packing is a ``slots [m, g]`` array of item indices: row ``p``
lists the ``g = n / m`` items of pack ``p`` and the column is the item's rank
in the pack.

* ``greedy`` is DeepSeek's algorithm, reproduced exactly: items in descending
  weight order (stable: ties to the lower index), each into the lightest pack
  that is not full (ties to the lower pack), one ``lax.fori_loop`` step per
  item, float32 loads accumulated in the reference's order.
* ``refined`` starts from a sorted round-robin: ``g`` rounds, each giving the
  next ``m`` heaviest items to the packs ordered lightest first, so it needs
  ``g`` sequential steps instead of ``n``. Swap refinement then repeatedly
  makes the best item exchange between the heaviest pack and any other pack
  (:mod:`eplb_jax.refinement`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from eplb_jax import _checks
from eplb_jax import refinement


def argsort_descending(weight: jax.Array) -> jax.Array:
  """Stable descending argsort of a 1-D array (ties to the lower index)."""
  iota = jnp.arange(weight.shape[0], dtype=jnp.int32)
  _, order = jax.lax.sort((-weight, iota), num_keys=1, is_stable=True)
  return order


def greedy_slots(weight: jax.Array, num_packs: int) -> jax.Array:
  """DeepSeek's greedy packing of one row ``[n]`` into ``slots [m, g]``."""
  n = weight.shape[0]
  per_pack = n // num_packs
  order = argsort_descending(weight)

  def place(i, state):
    loads, counts, slots = state
    item = order[i]
    pack = jnp.argmin(jnp.where(counts < per_pack, loads, jnp.inf))
    slots = slots.at[pack, counts[pack]].set(item)
    return loads.at[pack].add(weight[item]), counts.at[pack].add(1), slots

  init = (
    jnp.zeros(num_packs, jnp.float32),
    jnp.zeros(num_packs, jnp.int32),
    jnp.zeros((num_packs, per_pack), jnp.int32),
  )
  return jax.lax.fori_loop(0, n, place, init)[2]


def round_robin_slots(weight: jax.Array, num_packs: int) -> jax.Array:
  """Sorted round-robin packing of one row ``[n]`` into ``slots [m, g]``.

  Round ``r`` hands the items ranked ``r * m .. (r + 1) * m - 1`` by weight to
  the packs in increasing order of their current load, heaviest item to the
  lightest pack.
  """
  n = weight.shape[0]
  per_pack = n // num_packs
  rounds = argsort_descending(weight).reshape(per_pack, num_packs)

  def deal(r, state):
    loads, slots = state
    items = rounds[r]
    packs = jnp.argsort(loads, stable=True)
    slots = slots.at[packs, r].set(items)
    return loads.at[packs].add(weight[items]), slots

  init = (jnp.zeros(num_packs, jnp.float32), jnp.zeros((num_packs, per_pack), jnp.int32))
  return jax.lax.fori_loop(0, per_pack, deal, init)[1]


def pack_rows(weight: jax.Array, num_packs: int, mode: str) -> tuple[jax.Array, jax.Array]:
  """Unchecked core of :func:`balanced_packing` (``weight`` float32 ``[X, n]``)."""
  rows, n = weight.shape
  if n == num_packs:
    # One item per pack: every assignment is equally balanced, and the
    # reference keeps the identity order.
    identity = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (rows, n))
    return identity, jnp.zeros_like(identity)
  if mode == "greedy":
    slots = jax.vmap(functools.partial(greedy_slots, num_packs=num_packs))(weight)
  else:
    slots = jax.vmap(functools.partial(round_robin_slots, num_packs=num_packs))(weight)
    slots = jax.vmap(refinement.refine_slots)(weight, slots)
  return jax.vmap(slots_to_index)(slots)


def slots_to_index(slots: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Converts ``slots [m, g]`` into ``(pack_index [n], rank_in_pack [n])``."""
  num_packs, per_pack = slots.shape
  items = slots.reshape(-1)
  pack = jnp.repeat(jnp.arange(num_packs, dtype=jnp.int32), per_pack)
  rank = jnp.tile(jnp.arange(per_pack, dtype=jnp.int32), num_packs)
  empty = jnp.zeros(items.shape, jnp.int32)
  return empty.at[items].set(pack), empty.at[items].set(rank)


def balanced_packing(
  weight: jax.typing.ArrayLike, num_packs: int, *, mode: str = "refined"
) -> tuple[jax.Array, jax.Array]:
  """Packs ``n`` weighted items into ``num_packs`` packs of ``n / num_packs`` items each.

  Args:
    weight: ``[X, n]`` weight of each item; each row is packed independently.
    num_packs: number of packs; must divide ``n``.
    mode: ``"greedy"`` (DeepSeek's placement, exactly) or ``"refined"``
      (round-robin start plus swap refinement; lower heaviest pack).

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


_pack_jit = jax.jit(pack_rows, static_argnums=(1, 2))
