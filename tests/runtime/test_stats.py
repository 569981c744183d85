"""Expert load statistics: counting router choices and accumulating them over steps."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eplb_jax.runtime import stats


def numpy_counts(ids: np.ndarray, num_experts: int, mask: np.ndarray | None = None) -> np.ndarray:
  """Reference: per-row weighted bincount of ``ids [rows, tokens, k]``, ignoring bad ids."""
  out = np.zeros((ids.shape[0], num_experts))
  for row in range(ids.shape[0]):
    for token in range(ids.shape[1]):
      for expert in ids[row, token]:
        if 0 <= expert < num_experts:
          out[row, expert] += 1 if mask is None else mask[row, token]
  return out


class ExpertCountsTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_layered_counts_match_numpy(self):
    ids = np.random.default_rng(0).integers(0, 6, size=(3, 50, 2)).astype(np.int32)
    counts = self.variant(stats.expert_counts, static_argnums=1)(ids, 6)
    chex.assert_type(counts, jnp.int32)
    chex.assert_trees_all_equal(counts, numpy_counts(ids, 6).astype(np.int32))

  @chex.variants(with_jit=True, without_jit=True)
  def test_one_layer_and_float_dtype(self):
    ids = np.random.default_rng(1).integers(0, 5, size=(40, 3)).astype(np.int32)
    counts = self.variant(stats.expert_counts, static_argnums=1, static_argnames="dtype")(
      ids, 5, dtype=jnp.float32
    )
    chex.assert_shape(counts, (5,))
    chex.assert_type(counts, jnp.float32)
    chex.assert_trees_all_equal(counts, numpy_counts(ids[None], 5)[0].astype(np.float32))

  @chex.variants(with_jit=True, without_jit=True)
  def test_mask_and_out_of_range_ids(self):
    rng = np.random.default_rng(2)
    ids = rng.integers(-2, 7, size=(2, 30, 2)).astype(np.int32)  # -2, -1, 5, 6 are bad ids
    mask = rng.random((2, 30)) < 0.7
    counts = self.variant(stats.expert_counts, static_argnums=1)(ids, 5, mask=mask)
    chex.assert_trees_all_equal(counts, numpy_counts(ids, 5, mask).astype(np.int32))
    assert counts.sum() < mask.sum() * 2  # bad ids counted nothing

  def test_per_token_mask_broadcasts_over_layers(self):
    ids = np.random.default_rng(3).integers(0, 4, size=(2, 10, 2)).astype(np.int32)
    mask = np.arange(10) < 6  # padding tokens at the end, shared by the layers
    expected = numpy_counts(ids, 4, np.broadcast_to(mask, (2, 10)))
    chex.assert_trees_all_equal(stats.expert_counts(ids, 4, mask=mask), expected.astype(np.int32))

  def test_bad_arguments(self):
    with pytest.raises(ValueError, match="expert_ids"):
      stats.expert_counts(jnp.zeros(4, jnp.int32), 4)
    with pytest.raises(ValueError, match="num_experts"):
      stats.expert_counts(jnp.zeros((4, 2), jnp.int32), 0)


class WindowTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_sum_of_the_last_steps(self):
    window, shape = 3, (2, 4)
    steps = np.random.default_rng(0).integers(0, 10, size=(7, *shape)).astype(np.int32)
    update = self.variant(stats.window_update)
    state = stats.window_init(window, shape)
    chex.assert_trees_all_equal(stats.window_load(state), np.zeros(shape, np.int32))
    for step in range(len(steps)):
      state = update(state, steps[step])
      expected = steps[max(0, step + 1 - window) : step + 1].sum(0)
      chex.assert_trees_all_equal(stats.window_load(state), expected)
      assert int(state.step) == step + 1

  def test_keeps_dtype_and_shape_and_never_retraces(self):
    state = stats.window_init(2, (3,), dtype=jnp.float32)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def update(state, counts):
      return stats.window_update(state, counts)

    for step in range(4):
      new = update(state, jnp.full(3, step, jnp.int32))
      chex.assert_trees_all_equal_shapes_and_dtypes(new, state)
      state = new
    chex.assert_trees_all_equal(stats.window_load(state), np.full(3, 5.0, np.float32))

  def test_bad_window(self):
    with pytest.raises(ValueError, match="window"):
      stats.window_init(0, (2, 4))


class EmaTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_the_recurrence(self):
    decay = 0.9
    steps = np.random.default_rng(0).random((5, 2, 3)).astype(np.float32) * 100
    state = stats.ema_init((2, 3), decay)
    update = self.variant(stats.ema_update)
    average = np.zeros((2, 3))
    for step, counts in enumerate(steps, start=1):
      state = update(state, counts)
      average = decay * average + (1 - decay) * counts
      np.testing.assert_allclose(stats.ema_load(state), average / (1 - decay**step), rtol=1e-5)

  def test_constant_counts_are_their_own_average(self):
    state = stats.ema_init((4,), 0.99)
    chex.assert_trees_all_equal(stats.ema_load(state), np.zeros(4, np.float32))
    counts = jnp.asarray([1, 0, 5, 2], jnp.int32)
    for _ in range(3):
      state = stats.ema_update(state, counts)
    np.testing.assert_allclose(stats.ema_load(state), counts, rtol=1e-5)

  def test_bad_decay(self):
    for decay in (-0.1, 1.0):
      with pytest.raises(ValueError, match="decay"):
        stats.ema_init((2,), decay)
