"""Small array primitives tuned for XLA:CPU, with the tie rules of the reference.

XLA:CPU runs variadic reductions (``argmin``/``argmax``) and ``sort`` an order
of magnitude slower than plain reductions and elementwise code, and the
balancer calls them inside its loops. These replacements keep the exact
semantics the reference relies on (first index among ties, stable order)
using only plain reductions and comparisons.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sum_last(x: jax.Array) -> jax.Array:
  """Sum over the last axis, added left to right.

  XLA:CPU's reduction order (and so the float32 rounding) depends on the
  shape of the whole array; an unrolled chain of adds gives the same bits for
  a row whatever the batch around it, so results do not depend on how many
  layers are balanced together (or on which device).
  """
  total = x[..., 0]
  for i in range(1, x.shape[-1]):
    total = total + x[..., i]
  return total


def argmin_first(x: jax.Array, axis: int = -1) -> jax.Array:
  """``jnp.argmin``: index of the first minimum along ``axis`` (int32)."""
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis % x.ndim)
  at_min = x == x.min(axis=axis, keepdims=True)
  return jnp.where(at_min, iota, x.shape[axis]).min(axis=axis)


def argmax_first(x: jax.Array, axis: int = -1) -> jax.Array:
  """``jnp.argmax``: index of the first maximum along ``axis`` (int32)."""
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis % x.ndim)
  at_max = x == x.max(axis=axis, keepdims=True)
  return jnp.where(at_max, iota, x.shape[axis]).min(axis=axis)


def descending_ranks(x: jax.Array) -> jax.Array:
  """Position of each element of ``x [..., n]`` in a stable descending sort (int32).

  Counts, for each element, the elements that sort before it (larger, or
  equal with a lower index): one fused ``[..., n, n]`` pass.
  """
  n = x.shape[-1]
  iota = jnp.arange(n)
  before = (x[..., None, :] > x[..., :, None]) | (
    (x[..., None, :] == x[..., :, None]) & (iota[None, :] < iota[:, None])
  )
  return before.sum(axis=-1, dtype=jnp.int32)


def _rank_count_argsort(x: jax.Array) -> jax.Array:
  """Stable descending argsort of short rows ``x [..., n]``, from :func:`descending_ranks`."""
  iota = jnp.broadcast_to(jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape)
  return jnp.put_along_axis(jnp.zeros_like(iota), descending_ranks(x), iota, axis=-1, inplace=False)


def _sorted_runs(key: jax.Array, run: int) -> tuple[jax.Array, jax.Array]:
  """Sorts each run of ``run`` elements of ``key [..., size]`` by rank counting.

  Runs alternate direction, descending first, as a bitonic network leaves
  them; returns the keys and their indices along the last axis.
  """
  *batch, size = key.shape
  runs = key.reshape(*batch, size // run, run)
  order = _rank_count_argsort(runs)
  ascending = jnp.arange(size // run) % 2 == 1
  order = jnp.where(ascending[:, None], order[..., ::-1], order)
  sorted_runs = jnp.take_along_axis(runs, order, axis=-1)
  idx = order + (jnp.arange(size // run, dtype=jnp.int32) * run)[:, None]
  return sorted_runs.reshape(key.shape), idx.reshape(key.shape)


# Above this length the O(n^2) rank count costs more than a sorting network.
_RANK_COUNT_MAX = 128

# A longer row is cut into runs of this many elements, sorted by rank
# counting, then merged by the bitonic network: as fast as the network's
# first stages, and fewer stages to compile. (Runs of 128 are as fast on
# rows of 512 but twice as slow on rows of 1024 inside the placement.)
_BITONIC_RUN = 64


def _bitonic_argsort_descending(x: jax.Array) -> jax.Array:
  """Stable descending argsort of ``x [..., n]`` by a bitonic sorting network.

  Runs of ``_BITONIC_RUN`` are sorted by rank counting, then merged by
  compare-exchange stages of elementwise code (``log2(n / run)`` phases);
  keys are compared as ``(value, -index)``, a total order, so the result is
  the stable order.
  """
  *batch, n = x.shape
  size = 1 << max(n - 1, 0).bit_length()
  pad = [(0, 0)] * len(batch) + [(0, size - n)]
  run = min(size, _BITONIC_RUN)
  key, idx = _sorted_runs(jnp.pad(x, pad, constant_values=-jnp.inf), run)
  k = 2 * run
  while k <= size:
    j = k // 2
    while j >= 1:
      shape = (*batch, size // (2 * j), 2, j)
      key2, idx2 = key.reshape(shape), idx.reshape(shape)
      k_lo, k_hi = key2[..., 0, :], key2[..., 1, :]
      i_lo, i_hi = idx2[..., 0, :], idx2[..., 1, :]
      lo_first = (k_lo > k_hi) | ((k_lo == k_hi) & (i_lo < i_hi))
      # Blocks alternate direction so that each k-run ends up bitonic-merged.
      descending = ((jnp.arange(size // (2 * j)) * 2 * j) // k) % 2 == 0
      swap = lo_first != descending[:, None]
      key = jnp.stack([jnp.where(swap, k_hi, k_lo), jnp.where(swap, k_lo, k_hi)], -2)
      idx = jnp.stack([jnp.where(swap, i_hi, i_lo), jnp.where(swap, i_lo, i_hi)], -2)
      key, idx = key.reshape(*batch, size), idx.reshape(*batch, size)
      j //= 2
    k *= 2
  return idx[..., :n]


def argsort_descending(x: jax.Array) -> jax.Array:
  """Stable descending argsort of ``x [..., n]`` (ties to the lower index), int32."""
  n = x.shape[-1]
  if n > _RANK_COUNT_MAX:
    return _bitonic_argsort_descending(x)
  return _rank_count_argsort(x)
