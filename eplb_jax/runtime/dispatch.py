"""Replica-aware dispatch: which physical slot serves each routed token.

The router picks logical experts; with a placement, an expert with
``logcnt[e]`` replicas has that many physical slots, and its tokens must be
spread over them for the replication to balance anything.
:func:`physical_slots` does it deterministically and exactly evenly: the
``j``-th assignment to expert ``e``, counting (token, choice) pairs in
row-major order of ``expert_ids``, goes to replica ``j mod logcnt[e]``, so
each replica of ``e`` receives ``floor`` or ``ceil`` of ``n_e / logcnt[e]``
of its ``n_e`` assignments. The rank ``j`` comes from a stable sort of the
ids (``O(N log N)`` for ``N = tokens * k``, ``O(N)`` memory).

Since replicas hold identical weights, the choice of replica never changes
the math: a token's output is still its gate-weighted sum over its chosen
logical experts. :func:`logical_experts` maps slots back to their experts
(``phy2log`` lookup), for combining outputs per logical expert.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _slots_one_layer(log2phy: jax.Array, logcnt: jax.Array, expert_ids: jax.Array) -> jax.Array:
  num_experts = log2phy.shape[0]
  flat = expert_ids.reshape(-1)
  valid = (flat >= 0) & (flat < num_experts)
  key = jnp.where(valid, flat, num_experts).astype(jnp.int32)
  order = jnp.argsort(key, stable=True)
  counts = jnp.zeros(num_experts + 1, jnp.int32).at[key].add(1)
  starts = jnp.cumsum(counts) - counts
  positions = jnp.arange(flat.shape[0], dtype=jnp.int32)
  rank = jnp.zeros_like(positions).at[order].set(positions - starts[key[order]])
  expert = jnp.minimum(key, num_experts - 1)
  replica = rank % jnp.maximum(logcnt[expert], 1)
  slots = jnp.where(valid, log2phy[expert, replica], -1)
  return slots.reshape(expert_ids.shape)


def physical_slots(log2phy: jax.Array, logcnt: jax.Array, expert_ids: jax.Array) -> jax.Array:
  """Chooses a physical slot for each (token, choice), spreading experts over replicas.

  Args:
    log2phy: ``[E, R]`` int slots of each expert, -1 padded (as returned by
      :func:`eplb_jax.rebalance_experts`), or ``[L, E, R]`` for ``L`` layers.
    logcnt: ``[E]`` (or ``[L, E]``) int replicas of each expert.
    expert_ids: ``[tokens, k]`` (or ``[L, tokens, k]``) logical expert ids
      chosen by the router.

  Returns:
    int32 slots, the shape of ``expert_ids``: ``log2phy[e, j mod logcnt[e]]``
    for the ``j``-th (row-major) assignment to ``e``; -1 where the id is not
    in ``[0, E)``.
  """
  if log2phy.ndim == 3:
    return jax.vmap(_slots_one_layer)(log2phy, logcnt, expert_ids)
  if log2phy.ndim != 2:
    raise ValueError(f"log2phy must be [E, R] or [L, E, R], got shape {log2phy.shape}")
  return _slots_one_layer(log2phy, logcnt, expert_ids)


def logical_experts(phy2log: jax.Array, slots: jax.Array) -> jax.Array:
  """The logical expert behind each slot: ``phy2log[slot]``, -1 where ``slot`` is -1.

  Args:
    phy2log: ``[P]`` (or ``[L, P]``) logical expert of each physical slot.
    slots: ``[...]`` (or ``[L, ...]``) int slots, e.g. from :func:`physical_slots`.

  Returns:
    int32 logical expert ids, the shape of ``slots``.
  """
  if phy2log.ndim == 2:
    return jax.vmap(logical_experts)(phy2log, slots)
  if phy2log.ndim != 1:
    raise ValueError(f"phy2log must be [P] or [L, P], got shape {phy2log.shape}")
  return jnp.where(slots >= 0, phy2log[jnp.maximum(slots, 0)], -1).astype(jnp.int32)
