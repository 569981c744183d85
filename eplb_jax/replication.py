"""Replication: give hot experts extra replicas in the redundant slots.

DeepSeek's greedy adds one replica at a time to the expert whose per-replica
load ``w_e / cnt_e`` is largest (ties to the lower expert index). Because
``w_e / c`` decreases in ``c``, the sequence of picks is the merge of the
per-expert sequences ``w_e / 1, w_e / 2, ...``: the first ``R`` picks are the
``R`` largest candidates ``w_e / c`` (``c = 1..R``), in descending order. One
``lax.top_k`` therefore replaces the ``R``-step loop, with identical results:
the candidates are laid out expert-major, and ``top_k`` breaks ties towards the
lower index, i.e. the lower expert and then the lower ``c``, like argmax.

This greedy minimises the largest per-replica load, so both modes use it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from eplb_jax import _checks


def replicate_rows(weight: jax.Array, num_phy: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Unchecked core of :func:`replicate_experts` (``weight`` float32 ``[X, n]``)."""
  rows, num_log = weight.shape
  num_redundant = num_phy - num_log
  identity = jnp.broadcast_to(jnp.arange(num_log, dtype=jnp.int32), (rows, num_log))
  if num_redundant == 0:
    return identity, jnp.zeros_like(identity), jnp.ones_like(identity)
  # candidates[x, e, c - 1] = w_e / c: the load per replica before adding
  # replica c + 1 (same float32 division as the reference's weight / logcnt).
  counts = jnp.arange(1, num_redundant + 1, dtype=jnp.float32)
  candidates = (weight[:, :, None] / counts).reshape(rows, -1)
  _, picks = jax.lax.top_k(candidates, num_redundant)
  expert = (picks // num_redundant).astype(jnp.int32)
  rank = (picks % num_redundant + 1).astype(jnp.int32)
  phy2log = jnp.concatenate([identity, expert], axis=1)
  phyrank = jnp.concatenate([jnp.zeros_like(identity), rank], axis=1)
  extra = jax.nn.one_hot(expert, num_log, dtype=jnp.int32).sum(axis=1)
  return phy2log, phyrank, 1 + extra


def replicate_experts(
  weight: jax.typing.ArrayLike, num_phy: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Replicates ``num_log`` experts into ``num_phy`` slots, minimising the max load per replica.

  Args:
    weight: ``[X, num_log]`` load of each logical expert (int or float).
    num_phy: total number of replicas, ``>= num_log``.

  Returns:
    ``(phy2log, rank, logcnt)``, int32: ``phy2log [X, num_phy]`` the logical
    expert of each slot (slot ``i < num_log`` holds expert ``i``; the redundant
    slots follow in greedy order), ``rank [X, num_phy]`` the replica index of
    each slot within its expert, ``logcnt [X, num_log]`` replicas per expert.
  """
  weight = _checks.check_weight(weight)
  num_phy = _checks.check_size(num_phy, "num_phy")
  if num_phy < weight.shape[1]:
    raise ValueError(f"num_phy must be >= the number of experts ({weight.shape[1]}), got {num_phy}")
  return _replicate_jit(weight, num_phy)


_replicate_jit = jax.jit(replicate_rows, static_argnums=1)
