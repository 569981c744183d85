"""Array primitives of the balancer, each picking its implementation by backend.

``lax.platform_dependent`` lowers only the branch of the platform being
compiled for: XLA:CPU takes :mod:`.cpu` (rank counting, sorts of single int32 keys and
plain reductions, since its variadic sorts and reductions are slow), every
other backend :mod:`.xla` (XLA's ``sort``, ``argmin``, ``argmax``). Both give
the same results bit for bit, so a placement does not depend on where it was
computed. The tie rules are the reference's: first index among equal values,
stable orders.

In a process whose only backend is the CPU nothing else can be compiled
for, so the CPU version is traced alone: ``lax.platform_dependent`` traces
every branch (and under ``vmap`` batches every branch), about a third of the
default mode's tracing time. A program exported there for other platforms
too (``jax.export``) then runs the CPU versions everywhere: same results,
slower on accelerators.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.extend.backend
import jax.numpy as jnp

from eplb_jax._src.ops import cpu as cpu_ops
from eplb_jax._src.ops import xla as xla_ops


def by_platform(x: jax.Array, *, cpu: Callable, default: Callable):
  """``cpu(x)`` when compiling for CPU, ``default(x)`` otherwise."""
  if set(jax.extend.backend.backends()) == {"cpu"}:
    return cpu(x)
  return jax.lax.platform_dependent(x, cpu=cpu, default=default)


def argmin_first(x: jax.Array, axis: int = -1) -> jax.Array:
  """Index of the first minimum along ``axis`` (int32)."""
  return by_platform(
    x,
    cpu=functools.partial(cpu_ops.argmin_first, axis=axis),
    default=functools.partial(xla_ops.argmin_first, axis=axis),
  )


def argmax_first(x: jax.Array, axis: int = -1) -> jax.Array:
  """Index of the first maximum along ``axis`` (int32)."""
  return by_platform(
    x,
    cpu=functools.partial(cpu_ops.argmax_first, axis=axis),
    default=functools.partial(xla_ops.argmax_first, axis=axis),
  )


def argsort_descending(x: jax.Array, exact: bool = True) -> jax.Array:
  """Stable descending argsort of float32 ``x [..., n]`` (ties to the lower index), int32.

  ``exact=False`` orders by coarse keys instead (:func:`.keys.coarse_key`:
  exact to a relative ``2**(ceil(log2 n) - 23)``), about half the work.
  """
  return by_platform(
    x,
    cpu=functools.partial(cpu_ops.argsort_descending, exact=exact),
    default=functools.partial(xla_ops.argsort_descending, exact=exact),
  )


def descending_ranks(x: jax.Array, exact: bool = True) -> jax.Array:
  """Position of each element of float32 ``x [..., n]`` in :func:`argsort_descending`'s
  order (int32): its inverse permutation, without a sort on XLA:CPU for short rows."""
  return by_platform(
    x,
    cpu=functools.partial(cpu_ops.descending_ranks, exact=exact),
    default=functools.partial(_sorted_ranks, exact=exact),
  )


def _sorted_ranks(x: jax.Array, exact: bool) -> jax.Array:
  """:func:`descending_ranks` from XLA's sort: the inverse of its order."""
  return inverse_permutation(xla_ops.argsort_descending(x, exact))


# Rows up to this long are summed by one unrolled chain of adds.
_CHAIN_MAX = 64


def sum_last(x: jax.Array) -> jax.Array:
  """Sum over the last axis in a fixed order, whatever the batch around it.

  XLA's reduction order (and so the float32 rounding) depends on the shape of
  the whole array; an unrolled chain of adds gives the same bits for a row
  whatever the batch around it, so results do not depend on how many layers
  are balanced together (or on which device). Rows up to 64 are added left to
  right; longer rows by blocks of 64, then the block sums left to right in a
  loop, which keeps the program small (and keeps XLA from recomputing a long
  chain inside every consumer it would fuse it into).
  """
  n = x.shape[-1]
  if n > _CHAIN_MAX:
    blocks = -(-n // _CHAIN_MAX)
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, blocks * _CHAIN_MAX - n)])
    partial = sum_last(padded.reshape(*x.shape[:-1], blocks, _CHAIN_MAX))

    def add_block(i, total):
      return total + jax.lax.dynamic_index_in_dim(partial, i, axis=-1, keepdims=False)

    return jax.lax.fori_loop(1, blocks, add_block, partial[..., 0])
  total = x[..., 0]
  for i in range(1, n):
    total = total + x[..., i]
  return total


# Rows up to this long are ranked by an [n, n] comparison, longer ones by a sort.
_COUNT_MAX = 64


def occurrence_rank(x: jax.Array) -> jax.Array:
  """Rank of each entry of int ``x [..., n]`` among the equal entries before it (int32)."""
  n = x.shape[-1]
  if n <= _COUNT_MAX:
    earlier = jnp.arange(n)[None, :] < jnp.arange(n)[:, None]
    return ((x[..., :, None] == x[..., None, :]) & earlier).sum(-1, dtype=jnp.int32)
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  sorted_x, order = jax.lax.sort((x, iota), dimension=x.ndim - 1, num_keys=1, is_stable=True)
  starts = jnp.concatenate(
    [jnp.ones_like(sorted_x[..., :1], bool), sorted_x[..., 1:] != sorted_x[..., :-1]], axis=-1
  )
  rank = iota - jax.lax.cummax(jnp.where(starts, iota, 0), axis=x.ndim - 1)
  return jnp.put_along_axis(jnp.zeros_like(iota), order, rank, axis=-1, inplace=False)


def inverse_permutation(perm: jax.Array) -> jax.Array:
  """Inverse of each row of the int32 permutations ``perm [..., n]``."""
  iota = jax.lax.broadcasted_iota(jnp.int32, perm.shape, perm.ndim - 1)
  return jnp.put_along_axis(jnp.zeros_like(perm), perm, iota, axis=-1, inplace=False)


def where_rows(take: jax.Array, a, b):
  """Per row, ``a``'s row where ``take [rows]`` is True and ``b``'s elsewhere.

  ``a`` and ``b`` are pytrees of one structure whose leaves share the leading ``rows`` axis.
  """
  return jax.tree.map(
    lambda x, y: jnp.where(take.reshape(take.shape + (1,) * (x.ndim - take.ndim)), x, y), a, b
  )
