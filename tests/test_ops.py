"""The CPU-friendly primitives keep the reference's tie rules exactly."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from eplb_jax import _ops


@pytest.mark.parametrize("n", [1, 2, 72, 96, 97, 127, 128, 129, 200, 448, 640, 1000])
def test_argsort_descending_is_the_stable_order(n):
  """Rank counting (n <= 128) and two sorts by bitonic networks (longer rows), on ties,
  values one ulp apart (only the low part of the key differs), signs and signed zeros."""
  rng = np.random.default_rng(n)
  tied = rng.integers(0, 7, size=(3, n)).astype(np.float32)
  distinct = rng.permutation(3 * n).reshape(3, n).astype(np.float32)
  ulps = rng.integers(0, 4, size=(2, n)).astype(np.float32) * np.float32(2**-23)
  near = (np.float32(1.0) + ulps) * rng.choice([-1, 1], size=(2, n)).astype(np.float32)
  signed = rng.choice(np.array([-1.0, -0.0, 0.0, 2.5], np.float32), size=(2, n))
  for x in (tied, distinct, np.zeros((2, n), np.float32), near, signed):
    order = np.asarray(jax.jit(_ops.argsort_descending)(x))
    assert order.dtype == np.int32
    np.testing.assert_array_equal(order, np.argsort(-x, axis=-1, kind="stable"))


@pytest.mark.parametrize("n", [5, 96, 97, 128, 129, 448])
def test_coarse_argsort_ignores_only_the_lowest_bits(n):
  """exact=False: a permutation; the stable order of values that differ by more than its
  precision, and index order among values that differ by less."""
  rng = np.random.default_rng(n)
  spaced = (rng.permutation(n) * 0.01 + 1.0).astype(np.float32)  # 1% apart
  near = np.float32(1.0) + rng.integers(0, 4, size=n).astype(np.float32) * np.float32(2**-23)
  mixed = np.stack([spaced, near, -spaced])
  for fn in (_ops.argsort_descending, lambda x, exact: _ops.descending_ranks(x, exact).argsort(-1)):
    order = np.asarray(jax.jit(fn, static_argnums=1)(mixed, False))
    assert order.dtype == np.int32
    np.testing.assert_array_equal(order[0], np.argsort(-spaced, kind="stable"))
    np.testing.assert_array_equal(order[1], np.arange(n))
    np.testing.assert_array_equal(order[2], np.argsort(spaced, kind="stable"))


def test_argmin_argmax_first_take_the_first_of_ties():
  x = np.array([[3.0, 1.0, 1.0, 3.0], [2.0, 2.0, 2.0, 2.0]], np.float32)
  np.testing.assert_array_equal(_ops.argmin_first(x), [1, 0])
  np.testing.assert_array_equal(_ops.argmax_first(x), [0, 0])
  np.testing.assert_array_equal(_ops.argmax_first(x, axis=0), [0, 1, 1, 0])


def test_sum_last_does_not_depend_on_the_batch():
  """Each row's sum has the same bits alone and inside a larger batch."""
  x = np.random.default_rng(0).lognormal(size=(64, 9)).astype(np.float32)
  whole = np.asarray(jax.jit(_ops.sum_last)(x))
  alone = np.stack([np.asarray(jax.jit(_ops.sum_last)(row[None]))[0] for row in x[:5]])
  np.testing.assert_array_equal(whole[:5], alone)
