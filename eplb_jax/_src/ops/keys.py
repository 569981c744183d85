"""Sort keys shared by every backend: float32 values as int32 in the same order.

Both backends sort by these keys, so they produce the same orders, and with
them the same placements, bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ordered_int(x: jax.Array) -> jax.Array:
  """Maps float32 ``x`` to int32 in the same order (``-0.0`` below ``0.0``)."""
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def index_bits(n: int) -> int:
  """Bits that hold an index below ``n``: ``ceil(log2 n)``."""
  return max(n - 1, 0).bit_length()


def coarse_key(x: jax.Array) -> jax.Array:
  """Distinct int32 keys that order ``x [..., n]`` (float32) descending, ties to the lower index.

  The float32 bits are mapped to int32 in the same order as the values; their
  ``ceil(log2 n)`` lowest bits are then replaced by the complement of the
  index. Values that differ only in those bits tie, so the order is exact to
  a relative ``2**(ceil(log2 n) - 23)`` of the values.
  """
  low = (1 << index_bits(x.shape[-1])) - 1
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return (ordered_int(x) & ~low) | (low - iota)


def exact_key(x: jax.Array) -> jax.Array:
  """``ordered_int`` of ``x`` with ``-0.0`` and ``0.0`` equal, as in a float comparison."""
  return ordered_int(jnp.where(x == 0, 0.0, x))
