"""Array primitives for XLA:CPU, with the tie rules of the reference.

XLA:CPU runs variadic reductions (``argmin``/``argmax``) and sorts of
(value, index) pairs an order of magnitude slower than plain reductions,
elementwise code and single-operand sorts, and the balancer calls them inside
its loops. These versions give the same results as :mod:`eplb_jax._src.ops.xla`
(first index among ties, stable order) using only those fast operations:
short rows are ranked by counting, long rows sorted as distinct int32 keys
(the value's order-preserving bits with the index in the low bits); the exact
order takes two such sorts, one per part of the value's bits, as in a radix
sort.
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


# Rows up to this long are ranked by counting, longer ones sorted. Counting is
# an unrolled chain of compare-and-adds, one per element, which XLA:CPU fuses
# into one loop; its compile time grows with the row, and the alternative, an
# [..., n, n] comparison reduced, falls out of cache on batched rows.
_RANK_COUNT_MAX = 96


def _descending_ranks(x: jax.Array, exact: bool) -> jax.Array:
  """Position of each element of ``x [..., n]`` (``n <= _RANK_COUNT_MAX``) in a stable
  descending sort (int32); ``exact=False`` orders by :func:`keys.coarse_key`.

  Counts the elements that come before each; equal exact keys go to the lower index.
  """
  key = x if exact else keys.coarse_key(x)
  index = jnp.arange(x.shape[-1]) if exact else None
  count = jnp.zeros(key.shape, jnp.int32)
  for j in range(key.shape[-1]):
    before = key[..., j : j + 1] > key
    if index is not None:
      before |= (key[..., j : j + 1] == key) & (index[..., j : j + 1] < index)
    count = count + before
  return count


def _by_rank(x: jax.Array, ranks: jax.Array) -> jax.Array:
  return jnp.put_along_axis(jnp.zeros_like(x), ranks, x, axis=-1, inplace=False)


def _sort_indexed(key: jax.Array, bits: int) -> jax.Array:
  """Descending order of distinct int32 ``key [..., n]`` whose ``bits`` lowest bits hold ``~index``.

  One single-operand ``sort``: XLA:CPU sorts one int32 operand several times
  faster than an (operand, index) pair, and the index comes back from the
  key's low bits. Sorting ``~key`` ascending orders ``key`` descending.
  """
  low = (1 << bits) - 1
  return low - (~jax.lax.sort(~key, dimension=key.ndim - 1) & low)


def argsort_descending(x: jax.Array, exact: bool = True) -> jax.Array:
  """Stable descending argsort of ``x [..., n]`` (ties to the lower index), int32.

  ``exact=False`` sorts by :func:`keys.coarse_key`: distinct int32 keys, so
  about half the work of the exact sort.
  """
  n = x.shape[-1]
  if n <= _RANK_COUNT_MAX:
    iota = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), x.shape)
    return _by_rank(iota, _descending_ranks(x, exact))
  bits = keys.index_bits(n)
  if not exact:
    return _sort_indexed(keys.coarse_key(x), bits)
  # Exact: two sorts of distinct keys, least significant part first (as in a
  # radix sort). The value's order-preserving bits split into a high and a low
  # part; the first sort orders by (low part, index), the second by (high
  # part, position after the first), which is the order by (value, index).
  if bits > 15:  # the second key needs 1 + 2 * bits bits
    raise ValueError(f"exact sorts take rows of at most 32768 elements, got {n}")
  low_bits = 31 - bits
  not_iota = (1 << bits) - 1 - jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  ordered = keys.exact_key(x)
  by_low = _sort_indexed(((ordered & ((1 << low_bits) - 1)) << bits) | not_iota, bits)
  high = jnp.take_along_axis(ordered >> low_bits, by_low, axis=-1)
  by_high = _sort_indexed((high << bits) | not_iota, bits)
  return jnp.take_along_axis(by_low, by_high, axis=-1)


def descending_ranks(x: jax.Array, exact: bool = True) -> jax.Array:
  """Position of each element of ``x [..., n]`` in :func:`argsort_descending`'s order (int32)."""
  if x.shape[-1] <= _RANK_COUNT_MAX:
    return _descending_ranks(x, exact)
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return _by_rank(iota, argsort_descending(x, exact))
