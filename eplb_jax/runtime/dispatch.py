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

import math

import jax
import jax.numpy as jnp
import numpy as np

from eplb_jax._src import checks


def _slots_one_layer(log2phy: jax.Array, logcnt: jax.Array, expert_ids: jax.Array) -> jax.Array:
  num_experts = log2phy.shape[0]
  key = expert_ids.reshape(-1)  # int32, num_experts for an id out of range
  valid = key < num_experts
  order = jnp.argsort(key, stable=True)
  counts = jnp.zeros(num_experts + 1, jnp.int32).at[key].add(1)
  starts = jnp.cumsum(counts, dtype=jnp.int32) - counts
  positions = jnp.arange(key.shape[0], dtype=jnp.int32)
  rank = jnp.zeros_like(positions).at[order].set(positions - starts[key[order]])
  expert = jnp.minimum(key, num_experts - 1)
  # Only the replicas log2phy lists are used, whatever logcnt says; an expert
  # listing none gets log2phy's -1.
  listed = (log2phy >= 0).sum(-1, dtype=jnp.int32)
  replica = rank % jnp.clip(logcnt[expert], 1, jnp.maximum(listed[expert], 1))
  slots = jnp.where(valid, log2phy[expert, replica], -1)
  return slots.reshape(expert_ids.shape)


def physical_slots(
  log2phy: jax.typing.ArrayLike, logcnt: jax.typing.ArrayLike, expert_ids: jax.typing.ArrayLike
) -> jax.Array:
  """Chooses a physical slot for each (token, choice), spreading experts over replicas.

  Args:
    log2phy: ``[E, R]`` int slots of each expert, -1 padded (as returned by
      :func:`eplb_jax.rebalance_experts`), or ``[L, E, R]`` for ``L`` layers.
    logcnt: ``[E]`` (or ``[L, E]``) int replicas of each expert; a count
      beyond the slots ``log2phy`` lists for the expert is taken as that
      number (eagerly, it raises ``ValueError``).
    expert_ids: ``[tokens, k]`` (or ``[L, tokens, k]``) logical expert ids
      chosen by the router; any shape with that leading ``L`` works.

  Returns:
    int32 slots, the shape of ``expert_ids``: ``log2phy[e, j mod logcnt[e]]``
    for the ``j``-th (row-major) assignment to ``e``; -1 where the id is not
    in ``[0, E)``.

  Raises:
    ValueError: the arrays are not integer, or their shapes do not match.
  """
  log2phy = jnp.asarray(checks.check_ids(log2phy, "log2phy"))
  if log2phy.ndim not in (2, 3):
    raise ValueError(f"log2phy must be [E, R] or [L, E, R], got shape {log2phy.shape}")
  logcnt = checks.check_ids(logcnt, "logcnt")
  expert_ids = checks.check_ids(expert_ids, "expert_ids")
  if logcnt.shape != log2phy.shape[:-1]:
    raise ValueError(f"logcnt must have shape {log2phy.shape[:-1]}, got {logcnt.shape}")
  if log2phy.ndim == 3 and expert_ids.shape[:1] != log2phy.shape[:1]:
    raise ValueError(
      f"expert_ids must have the {log2phy.shape[0]} layers of log2phy first, got shape "
      f"{expert_ids.shape}"
    )
  num_experts = log2phy.shape[-2]
  if checks.is_concrete(logcnt) and checks.is_concrete(log2phy):
    listed = (np.asarray(log2phy) >= 0).sum(-1)
    if np.any(np.asarray(logcnt) > listed):
      raise ValueError("logcnt must not exceed the slots log2phy lists for each expert")
  logcnt = checks.narrow_ids(logcnt, log2phy.shape[-1] + 1, 0)
  expert_ids = checks.narrow_ids(expert_ids, num_experts, num_experts)
  if log2phy.ndim == 3:
    return jax.vmap(_slots_one_layer)(log2phy.astype(jnp.int32), logcnt, expert_ids)
  return _slots_one_layer(log2phy.astype(jnp.int32), logcnt, expert_ids)


def logical_experts(phy2log: jax.typing.ArrayLike, slots: jax.typing.ArrayLike) -> jax.Array:
  """The logical expert behind each slot: ``phy2log[slot]``, -1 where ``slot`` is not a slot.

  Args:
    phy2log: ``[P]`` (or ``[L, P]``) logical expert of each physical slot.
    slots: ``[...]`` (or ``[L, ...]``) int slots, e.g. from :func:`physical_slots`.

  Returns:
    int32 logical expert ids, the shape of ``slots``; -1 where ``slot`` is
    outside ``[0, P)`` (e.g. -1).

  Raises:
    ValueError: the arrays are not integer, or ``slots`` lacks ``phy2log``'s layers.
  """
  phy2log = jnp.asarray(checks.check_ids(phy2log, "phy2log"))
  slots = checks.check_ids(slots, "slots")
  if phy2log.ndim not in (1, 2):
    raise ValueError(f"phy2log must be [P] or [L, P], got shape {phy2log.shape}")
  if phy2log.ndim == 2 and slots.shape[:1] != phy2log.shape[:1]:
    raise ValueError(
      f"slots must have the {phy2log.shape[0]} layers of phy2log first, got shape {slots.shape}"
    )
  num_slots = phy2log.shape[-1]
  slots = checks.narrow_ids(slots, num_slots, num_slots)
  # The padded entry num_slots stands for "not a slot".
  end = [(0, 0)] * (phy2log.ndim - 1) + [(0, 1)]
  padded = jnp.pad(phy2log.astype(jnp.int32), end, constant_values=-1)
  if phy2log.ndim == 2:
    flat = slots.reshape(slots.shape[0], math.prod(slots.shape[1:]))
    return jnp.take_along_axis(padded, flat, axis=-1).reshape(slots.shape)
  return padded[slots]
