"""Relabelling: renumber a placement's nodes, GPUs and slots to overlap the old one most.

Nodes are interchangeable, and so are the GPUs of a node and the slots of a
GPU: renumbering them changes nothing in balance but can keep many replicas
where they already are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from eplb_jax._src import ops
from eplb_jax._src.migration.cost import kept


def greedy_assign(score: jax.Array, capacity: int) -> jax.Array:
  """Assigns each row of ``score [n, m]`` a column, at most ``capacity`` rows per column.

  Repeatedly takes the highest-scoring (row, column) pair whose row is free
  and whose column has room. Returns the column of each row, ``[n]`` int32.
  """
  n, m = score.shape
  score = score.astype(jnp.float32)

  def take(_, state):
    column_of, used = state
    free = (column_of < 0)[:, None] & (used < capacity)[None, :]
    best = ops.argmax_first(jnp.where(free, score, -jnp.inf).reshape(-1))
    row, column = best // m, best % m
    return jnp.where(jnp.arange(n) == row, column, column_of), used + (jnp.arange(m) == column)

  init = (jnp.full(n, -1, jnp.int32), jnp.zeros(m, jnp.int32))
  return jax.lax.fori_loop(0, n, take, init)[0]


def relabel_gpus(old: jax.Array, new: jax.Array) -> jax.Array:
  """Permutes the GPUs ``new [g, s]`` (one node's contents) to overlap ``old [g, s]`` most."""
  overlap = kept(old[None, :, :], new[:, None, :]).sum(-1)  # [new gpu, old gpu]
  position = greedy_assign(overlap, 1)
  return jnp.zeros_like(new).at[position].set(new)


def align_slots(old: jax.Array, new: jax.Array) -> jax.Array:
  """Reorders the slots of one GPU, ``new [s]``, so that kept replicas sit in their ``old`` slot."""
  new_rank, old_rank = ops.occurrence_rank(new), ops.occurrence_rank(old)
  match = (new[:, None] == old[None, :]) & (new_rank[:, None] == old_rank[None, :])
  matched, taken = match.any(1), match.any(0)
  # The k-th unmatched replica goes to the k-th slot no kept replica takes.
  spare_rank = jnp.cumsum(~matched) - 1
  free_rank = jnp.cumsum(~taken) - 1
  fill = ~matched[:, None] & ~taken[None, :] & (spare_rank[:, None] == free_rank[None, :])
  position = ops.argmax_first(match | fill, axis=1)
  return jnp.zeros_like(new).at[position].set(new)
