"""Array primitives for XLA:CPU, with the tie rules of the reference.

XLA:CPU runs variadic reductions (``argmin``/``argmax``) and ``sort`` an order
of magnitude slower than plain reductions and elementwise code, and the
balancer calls them inside its loops. These versions give the same results
as :mod:`eplb_jax._src.ops.xla` (first index among ties, stable order) using
only plain reductions and comparisons. Long rows are sorted by a bitonic
network over distinct int32 keys (the value's order-preserving bits with the
index in the low bits); the exact order takes two such sorts, one per part
of the value's bits, as in a radix sort.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from eplb_jax._src.ops import keys


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


# Rows up to this long are rank-counted by an unrolled chain; longer ones by
# a reduction, whose compile time is shorter.
_UNROLL_MAX = 96


def _ranks(key: jax.Array, index: jax.Array | None) -> jax.Array:
  """Position of each element in the descending order of ``key [..., n]``.

  With ``index``, equal keys go to the lower index; without, keys are distinct.
  Counts the elements that come before each with an unrolled chain of
  compare-and-adds, one per element: XLA:CPU fuses it into one loop, whereas
  it materialises a ``[..., n, n]`` comparison for a reduction.
  """
  if key.shape[-1] > _UNROLL_MAX:
    before = key[..., None, :] > key[..., :, None]
    if index is not None:
      before |= (key[..., None, :] == key[..., :, None]) & (
        index[..., None, :] < index[..., :, None]
      )
    return before.sum(axis=-1, dtype=jnp.int32)
  count = jnp.zeros(key.shape, jnp.int32)
  for j in range(key.shape[-1]):
    before = key[..., j : j + 1] > key
    if index is not None:
      before |= (key[..., j : j + 1] == key) & (index[..., j : j + 1] < index)
    count = count + before
  return count


def descending_ranks(x: jax.Array, exact: bool = True) -> jax.Array:
  """Position of each element of ``x [..., n]`` in a stable descending sort (int32).

  ``exact=False`` orders by :func:`keys.coarse_key` instead (one compare per pair).
  """
  if exact:
    return _ranks(x, jnp.arange(x.shape[-1]))
  return _ranks(keys.coarse_key(x), None)


def _by_rank(x: jax.Array, ranks: jax.Array) -> jax.Array:
  return jnp.put_along_axis(jnp.zeros_like(x), ranks, x, axis=-1, inplace=False)


# Above this length the O(n^2) rank count costs more than a sorting network.
_RANK_COUNT_MAX = 128

# A longer row is cut into runs of this many elements, sorted by rank
# counting, then merged by the bitonic network: as fast as the network's
# first stages, and fewer stages to compile.
_BITONIC_RUN = 64


def _sort_indexed(key: jax.Array) -> jax.Array:
  """Descending order of distinct int32 ``key [..., size]`` (``size`` a power of two).

  The keys' ``log2(size)`` lowest bits hold ``size - 1 - index``; returns the
  indices in key order. Runs of ``_BITONIC_RUN`` are sorted by rank counting,
  then merged by compare-exchange stages of elementwise code
  (``log2(size / run)`` phases).
  """
  *batch, size = key.shape
  run = min(size, _BITONIC_RUN)
  runs = key.reshape(*batch, size // run, run)
  ranks = _ranks(runs, None)
  # Runs alternate direction, descending first, as the network expects them.
  ascending = jnp.arange(size // run) % 2 == 1
  key = _by_rank(runs, jnp.where(ascending[:, None], run - 1 - ranks, ranks)).reshape(key.shape)
  k = 2 * run
  while k <= size:
    j = k // 2
    while j >= 1:
      pairs = key.reshape(*batch, size // (2 * j), 2, j)
      lo, hi = pairs[..., 0, :], pairs[..., 1, :]
      # Blocks alternate direction so that each k-run ends up bitonic-merged.
      descending = ((jnp.arange(size // (2 * j)) * 2 * j) // k) % 2 == 0
      swap = (lo > hi) != descending[:, None]
      key = jnp.stack([jnp.where(swap, hi, lo), jnp.where(swap, lo, hi)], -2).reshape(key.shape)
      j //= 2
    k *= 2
  return (size - 1) - (key & (size - 1))


def argsort_descending(x: jax.Array, exact: bool = True) -> jax.Array:
  """Stable descending argsort of ``x [..., n]`` (ties to the lower index), int32.

  ``exact=False`` sorts by :func:`keys.coarse_key`: distinct int32 keys, so
  about half the work of the exact sort.
  """
  *batch, n = x.shape
  if n <= _RANK_COUNT_MAX:
    iota = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), x.shape)
    return _by_rank(iota, descending_ranks(x, exact))
  size = 1 << (n - 1).bit_length()
  padded = jnp.pad(x, [(0, 0)] * len(batch) + [(0, size - n)], constant_values=-jnp.inf)
  if not exact:
    return _sort_indexed(keys.coarse_key(padded))[..., :n]
  # Exact: two sorts of distinct keys, least significant part first (as in a
  # radix sort). The value's order-preserving bits split into a high and a low
  # part; the first sort orders by (low part, index), the second by (high
  # part, position after the first), which is the order by (value, index).
  index_bits = size.bit_length() - 1
  if index_bits > 15:  # the second key needs 1 + 2 * index_bits bits
    raise ValueError(f"exact sorts take rows of at most 32768 elements, got {n}")
  low_bits = 31 - index_bits
  iota = jax.lax.broadcasted_iota(jnp.int32, padded.shape, padded.ndim - 1)
  ordered = keys.exact_key(padded)
  by_low = _sort_indexed(((ordered & ((1 << low_bits) - 1)) << index_bits) | (size - 1 - iota))
  high = jnp.take_along_axis(ordered >> low_bits, by_low, axis=-1)
  by_high = _sort_indexed((high << index_bits) | (size - 1 - iota))
  return jnp.take_along_axis(by_low, by_high, axis=-1)[..., :n]
