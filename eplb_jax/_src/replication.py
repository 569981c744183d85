"""Replication: give hot experts extra replicas in the redundant slots.

DeepSeek's greedy adds one replica at a time to the expert whose per-replica
load ``w_e / cnt_e`` is largest (ties to the lower expert index). Because
``w_e / c`` decreases in ``c``, the sequence of picks is the merge of the
per-expert sequences ``w_e / 1, w_e / 2, ...``: the ``R`` redundant slots go to
the ``R`` largest candidates ``w_e / c`` (``c = 1..R``), ordered by value, then
expert, then ``c``. So the picks need no loop over them, though on CPU the
loop is the cheapest way to make a few:

* on accelerators one ``lax.top_k`` over the ``[E * R]`` candidates, laid out
  expert-major, finds them (``top_k`` breaks ties towards the lower index);
* on CPU, where ``top_k`` is slow, up to 32 picks are made by the greedy's
  own loop (``R`` steps over ``[E]``); for more, a bisection finds the
  ``R``-th largest candidate value in 32 steps over ``[E]``, which fixes how
  many picks each expert gets; the picks are then ordered by a rank count.

All give the reference's result exactly, float32 division included. The
greedy minimises the largest per-replica load, so both modes use it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from eplb_jax._src import ops


def _picks_top_k(weight: jax.Array, num_redundant: int) -> tuple[jax.Array, jax.Array]:
  """The greedy's picks for one row ``[E]``: expert and ``c`` of each, in order, ``[R]``."""
  # XLA rewrites a division by anything it can see is constant along a
  # dimension into a multiplication by the inverse, which does not round like
  # the reference's division. Adding 0 * w (exactly 0: loads are finite and
  # non-negative here) makes the divisor depend on the loads, so it is kept.
  counts = jnp.arange(1, num_redundant + 1, dtype=jnp.float32) + 0 * weight[:, None]
  candidates = weight[:, None] / counts
  _, picks = jax.lax.top_k(candidates.reshape(-1), num_redundant)
  return picks // num_redundant, picks % num_redundant + 1


def _picks_loop(weight: jax.Array, num_redundant: int) -> tuple[jax.Array, jax.Array]:
  """Same result as :func:`_picks_top_k`: the greedy itself, one pick per step."""
  num_log = weight.shape[0]

  def pick(i, state):
    counts, per_replica, expert, c = state
    e = ops.argmax_first(per_replica)
    chosen = jnp.arange(num_log) == e
    # Only the chosen expert's load per replica changes: one division per row.
    per_replica = jnp.where(chosen, weight[e] / (counts[e] + 1), per_replica)
    c = c.at[i].set(counts[e].astype(jnp.int32))
    return counts + chosen, per_replica, expert.at[i].set(e), c

  zeros = jnp.zeros(num_redundant, jnp.int32)
  init = (jnp.ones_like(weight), weight, zeros, zeros)
  _, _, expert, c = jax.lax.fori_loop(0, num_redundant, pick, init)
  return expert, c


def _count_at_least(weight: jax.Array, threshold: jax.Array, limit: int) -> jax.Array:
  """Per expert, how many ``c`` in ``1..limit`` have ``fl(w / c) >= threshold``.

  ``fl(w / c)`` decreases with ``c``, so this is the largest such ``c``: an
  estimate from ``w / threshold``, corrected by one step either way with the
  exact float32 quotients.
  """
  estimate = jnp.floor(weight / threshold)
  count = jnp.clip(jnp.where(jnp.isfinite(estimate), estimate, limit), 0, limit)
  count = jnp.where((count < limit) & (weight / (count + 1) >= threshold), count + 1, count)
  count = jnp.where((count > 0) & (weight / jnp.maximum(count, 1) < threshold), count - 1, count)
  return count.astype(jnp.int32)


def _picks_bisection(weight: jax.Array, num_redundant: int) -> tuple[jax.Array, jax.Array]:
  """Same result as :func:`_picks_top_k`, with work linear in ``E``."""
  num_log = weight.shape[0]

  def count_at_least(bits):
    return _count_at_least(weight, jax.lax.bitcast_convert_type(bits, jnp.float32), num_redundant)

  # Non-negative float32 values order like their bit patterns. Invariant:
  # at least R candidates are >= float(lo), fewer than R are >= float(hi).
  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = count_at_least(mid).sum(dtype=jnp.int32) >= num_redundant
    return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

  top = jax.lax.bitcast_convert_type(weight.max(), jnp.int32) + 1
  threshold, _ = jax.lax.fori_loop(0, 32, halve, (jnp.int32(0), top))
  above = count_at_least(threshold + 1)  # candidates strictly above the R-th
  tied = count_at_least(threshold) - above
  # Candidates equal to the R-th go to the lower experts first.
  missing = num_redundant - above.sum(dtype=jnp.int32)
  taken = jnp.clip(missing - (jnp.cumsum(tied, dtype=jnp.int32) - tied), 0, tied)
  extra = above + taken  # [E], sums to R

  # List the picks expert by expert, then order them by value (stable).
  expert = jnp.repeat(
    jnp.arange(num_log, dtype=jnp.int32), extra, total_repeat_length=num_redundant
  )
  first = jnp.cumsum(extra, dtype=jnp.int32) - extra
  c = jnp.arange(num_redundant, dtype=jnp.int32) - first[expert] + 1
  order = ops.argsort_descending(weight[expert] / c.astype(jnp.float32))
  return expert[order], c[order]


# On CPU, the greedy's loop up to this many picks; beyond, the bisection (whose
# 32 steps cost about as much as this many picks).
_CPU_LOOP_MAX_PICKS = 32


def picks(weight: jax.Array, num_redundant: int) -> tuple[jax.Array, jax.Array]:
  """The water-filling's picks for one row ``[E]``: expert and ``c`` of each, int32 ``[R]``.

  Pick ``i`` gives expert ``expert[i]`` its ``c[i] + 1``-th replica.
  """
  cpu = _picks_loop if num_redundant <= _CPU_LOOP_MAX_PICKS else _picks_bisection
  expert, c = ops.by_platform(
    weight,
    cpu=functools.partial(cpu, num_redundant=num_redundant),
    default=functools.partial(_picks_top_k, num_redundant=num_redundant),
  )
  return expert.astype(jnp.int32), c.astype(jnp.int32)


def replicate_rows(weight: jax.Array, num_replicas: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Replicates the experts of each row of float32 ``weight [X, n]`` into ``num_replicas`` slots.

  Returns ``(phy2log, rank, logcnt)``, int32: ``phy2log [X, num_replicas]``
  the expert of each slot (slot ``i < n`` holds expert ``i``; the redundant
  slots follow in greedy order), ``rank`` each slot's replica index within
  its expert, ``logcnt [X, n]`` the replicas of each expert.
  """
  rows, num_log = weight.shape
  num_redundant = num_replicas - num_log
  identity = jnp.broadcast_to(jnp.arange(num_log, dtype=jnp.int32), (rows, num_log))
  if num_redundant == 0:
    return identity, jnp.zeros_like(identity), jnp.ones_like(identity)
  expert, rank = jax.vmap(functools.partial(picks, num_redundant=num_redundant))(weight)
  phy2log = jnp.concatenate([identity, expert], axis=1)
  phyrank = jnp.concatenate([jnp.zeros_like(identity), rank], axis=1)
  logcnt = jnp.ones_like(identity).at[jnp.arange(rows)[:, None], expert].add(1)
  return phy2log, phyrank, logcnt
