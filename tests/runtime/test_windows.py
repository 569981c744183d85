"""Load windows [N, L, E]: the balancer sums them; decayed_load weights recent steps."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eplb_jax
from eplb_jax.runtime import stats

SIZES = (16, 4, 2, 8)  # 2 layers x 12 experts, as DeepSeek's example
WINDOW = np.random.default_rng(0).integers(0, 200, (3, 2, 12)).astype(np.int32)


def test_window_is_summed():
  expected = eplb_jax.rebalance_experts(WINDOW.sum(0), *SIZES)
  chex.assert_trees_all_equal(tuple(eplb_jax.rebalance_experts(WINDOW, *SIZES)), tuple(expected))
  jitted = jax.jit(lambda w: eplb_jax.rebalance_experts(w, *SIZES))(jnp.asarray(WINDOW))
  chex.assert_trees_all_equal(tuple(jitted), tuple(expected))


def test_window_values_checked_per_step():
  window = WINDOW.astype(np.float32)
  window[0, 0, 0] = -5.0  # the sum over steps would hide it
  with pytest.raises(ValueError, match="non-negative"):
    eplb_jax.rebalance_experts(window, *SIZES)
  # Under jit the bad entry alone counts as 0.
  jitted = jax.jit(lambda w: eplb_jax.rebalance_experts(w, *SIZES))(window)
  clean = np.where(window < 0, 0, window).sum(0)
  chex.assert_trees_all_equal(tuple(jitted), tuple(eplb_jax.rebalance_experts(clean, *SIZES)))


def test_window_shape_errors():
  with pytest.raises(ValueError, match=r"2-D \[layers, experts\] or 3-D"):
    eplb_jax.rebalance_experts(WINDOW[None], *SIZES)
  with pytest.raises(ValueError, match="2-D"):
    eplb_jax.replicate_experts(WINDOW, 16)  # only the balancer takes windows


def test_decayed_load():
  np.testing.assert_allclose(
    stats.decayed_load(WINDOW, 0.5), 0.25 * WINDOW[0] + 0.5 * WINDOW[1] + WINDOW[2]
  )
  np.testing.assert_allclose(stats.decayed_load(WINDOW, 1.0), WINDOW.sum(0))
  for decay in (0.0, 1.5):
    with pytest.raises(ValueError, match="decay"):
      stats.decayed_load(WINDOW, decay)


def test_decayed_load_of_a_ring_buffer():
  state = stats.window_init(3, (2, 12))
  for step in range(4):  # the fourth step overwrites row 0
    state = stats.window_update(state, jnp.full((2, 12), step + 1))
  ordered = jnp.roll(state.counts, -(int(state.step) % 3), axis=0)
  np.testing.assert_allclose(
    stats.decayed_load(ordered, 0.5), np.full((2, 12), 0.25 * 2 + 0.5 * 3 + 4)
  )
