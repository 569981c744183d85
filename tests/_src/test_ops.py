"""The array primitives keep the reference's tie rules, on every backend's implementation.

``ops`` dispatches by platform; ``cpu_ops`` and ``xla_ops`` are the two
implementations, both run here on CPU and required to agree bit for bit.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from eplb_jax._src import ops
from eplb_jax._src.ops import cpu as cpu_ops
from eplb_jax._src.ops import xla as xla_ops

VARIANTS = {"dispatch": ops, "cpu": cpu_ops, "xla": xla_ops}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n", [1, 2, 72, 96, 97, 128, 129, 448, 1000])
def test_argsort_descending_is_the_stable_order(n, variant):
  """Rank counting (n <= 96) and two sorts of single int32 keys (longer rows) on CPU, XLA's
  sort elsewhere: on ties, values one ulp apart (only the low part of the key differs),
  signs and signed zeros."""
  rng = np.random.default_rng(n)
  tied = rng.integers(0, 7, size=(3, n)).astype(np.float32)
  distinct = rng.permutation(3 * n).reshape(3, n).astype(np.float32)
  ulps = rng.integers(0, 4, size=(3, n)).astype(np.float32) * np.float32(2**-23)
  near = (np.float32(1.0) + ulps) * rng.choice([-1, 1], size=(3, n)).astype(np.float32)
  signed = rng.choice(np.array([-1.0, -0.0, 0.0, 2.5], np.float32), size=(3, n))
  x = np.stack([tied, distinct, np.zeros((3, n), np.float32), near, signed])
  module = VARIANTS[variant]
  order = np.asarray(jax.jit(module.argsort_descending)(x))
  assert order.dtype == np.int32
  np.testing.assert_array_equal(order, np.argsort(-x, axis=-1, kind="stable"))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n", [5, 96, 97, 129, 448])
def test_coarse_argsort_ignores_only_the_lowest_bits(n, variant):
  """exact=False: a permutation; the stable order of values that differ by more than its
  precision, and index order among values that differ by less."""
  rng = np.random.default_rng(n)
  spaced = (rng.permutation(n) * 0.01 + 1.0).astype(np.float32)  # 1% apart
  near = np.float32(1.0) + rng.integers(0, 4, size=n).astype(np.float32) * np.float32(2**-23)
  mixed = np.stack([spaced, near, -spaced])
  module = VARIANTS[variant]
  order = np.asarray(jax.jit(module.argsort_descending, static_argnums=1)(mixed, False))
  assert order.dtype == np.int32
  np.testing.assert_array_equal(order[0], np.argsort(-spaced, kind="stable"))
  np.testing.assert_array_equal(order[1], np.arange(n))
  np.testing.assert_array_equal(order[2], np.argsort(spaced, kind="stable"))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("n", [1, 96, 97])
def test_descending_ranks_invert_the_order(n, exact, variant):
  """Ranks by counting (short rows on CPU) or from the sorted order: each element's position
  in argsort_descending's order, ties included."""
  rng = np.random.default_rng(n)
  x = np.stack([rng.integers(0, 5, n), rng.permutation(n)]).astype(np.float32)
  module = VARIANTS[variant]
  # The XLA path: the inverse of its sorted order, as ops dispatches off CPU.
  ranks_of = ops._sorted_ranks if module is xla_ops else module.descending_ranks
  ranks = np.asarray(jax.jit(ranks_of, static_argnums=1)(x, exact))
  order = np.asarray(jax.jit(module.argsort_descending, static_argnums=1)(x, exact))
  assert ranks.dtype == np.int32
  np.testing.assert_array_equal(np.take_along_axis(ranks, order, -1), np.tile(np.arange(n), (2, 1)))


def test_coarse_orders_agree_across_variants():
  """The refined mode's coarse sorts give the same permutation on every backend."""
  x = np.random.default_rng(0).lognormal(size=(4, 300)).astype(np.float32)
  x[:, ::7] = x[:, 1::7][:, : x[:, ::7].shape[1]]  # exact ties
  orders = [
    np.asarray(jax.jit(m.argsort_descending, static_argnums=1)(x, False)) for m in VARIANTS.values()
  ]
  for order in orders[1:]:
    np.testing.assert_array_equal(order, orders[0])


@pytest.mark.parametrize("variant", VARIANTS)
def test_argmin_argmax_first_take_the_first_of_ties(variant):
  module = VARIANTS[variant]
  x = np.array([[3.0, 1.0, 1.0, 3.0], [2.0, 2.0, 2.0, 2.0], [-0.0, 0.0, -1.0, 0.0]], np.float32)
  np.testing.assert_array_equal(jax.jit(module.argmin_first)(x), [1, 0, 2])
  np.testing.assert_array_equal(jax.jit(module.argmax_first)(x), [0, 0, 0])
  np.testing.assert_array_equal(jax.jit(module.argmax_first, static_argnums=1)(x, 0), [0, 1, 1, 0])


@pytest.mark.parametrize("n", [9, 64, 65, 300])
def test_sum_last_does_not_depend_on_the_batch(n):
  """Each row's sum has the same bits alone and inside a larger batch."""
  x = np.random.default_rng(n).lognormal(size=(64, n)).astype(np.float32)
  whole = np.asarray(jax.jit(ops.sum_last)(x))
  alone = np.stack([np.asarray(jax.jit(ops.sum_last)(row[None]))[0] for row in x[:3]])
  np.testing.assert_array_equal(whole[:3], alone)
  np.testing.assert_allclose(whole, x.astype(np.float64).sum(-1), rtol=1e-5)


@pytest.mark.parametrize("n", [5, 64, 65, 200])
def test_occurrence_rank(n):
  x = np.random.default_rng(n).integers(0, 6, size=(3, n)).astype(np.int32)
  expected = np.array([[np.sum(row[:i] == row[i]) for i in range(n)] for row in x])
  np.testing.assert_array_equal(jax.jit(ops.occurrence_rank)(x), expected)
