"""Array primitives for GPU and TPU: XLA's own ``sort`` and ``argmin``/``argmax``.

Same results as :mod:`eplb_jax._src.ops.cpu`, bit for bit: ties go to the
lower index, and sorts order by the same int32 keys (:mod:`keys`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from eplb_jax._src.ops import keys


def argmin_first(x: jax.Array, axis: int = -1) -> jax.Array:
  """Index of the first minimum along ``axis`` (int32)."""
  return jnp.argmin(x, axis=axis).astype(jnp.int32)


def argmax_first(x: jax.Array, axis: int = -1) -> jax.Array:
  """Index of the first maximum along ``axis`` (int32)."""
  return jnp.argmax(x, axis=axis).astype(jnp.int32)


def argsort_descending(x: jax.Array, exact: bool = True) -> jax.Array:
  """Stable descending argsort of ``x [..., n]`` (ties to the lower index), int32.

  ``exact=False`` orders by :func:`keys.coarse_key`, as the CPU version does.
  """
  dimension = x.ndim - 1
  if not exact:
    # Distinct keys: one single-operand sort, the index read back from the low bits.
    low = (1 << keys.index_bits(x.shape[-1])) - 1
    return low - (~jax.lax.sort(~keys.coarse_key(x), dimension=dimension) & low)
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, dimension)
  # Ascending by the complemented key is descending by value; the stable sort
  # keeps equal values in index order.
  _, order = jax.lax.sort(
    (~keys.exact_key(x), iota), dimension=dimension, is_stable=True, num_keys=1
  )
  return order
