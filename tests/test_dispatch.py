"""Replica-aware dispatch: physical slot per routed token, and back to logical experts."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eplb_jax
from eplb_jax import workloads
from eplb_jax.runtime import dispatch

NUM_EXPERTS, NUM_SLOTS = 8, 16


def placement(num_layers: int = 2, seed: int = 0):
  loads = workloads.skewed_loads(num_layers, NUM_EXPERTS, seed=seed)
  return eplb_jax.rebalance_experts(loads, NUM_SLOTS, 1, 1, 4)


def router_ids(shape, seed=0):
  """Top-k ids (distinct per token) skewed towards the low experts."""
  rng = np.random.default_rng(seed)
  p = np.exp(-0.4 * np.arange(NUM_EXPERTS))
  p /= p.sum()
  *batch, tokens, k = shape
  flat = [rng.choice(NUM_EXPERTS, size=k, replace=False, p=p) for _ in range(np.prod(shape[:-1]))]
  return np.asarray(flat, np.int32).reshape(shape)


def numpy_slots(log2phy, logcnt, ids):
  """Reference for one layer: the j-th assignment to e goes to replica j mod logcnt[e]."""
  seen = np.zeros(log2phy.shape[0], np.int64)
  out = np.full(ids.size, -1, np.int32)
  for i, expert in enumerate(ids.reshape(-1)):
    if 0 <= expert < log2phy.shape[0]:
      out[i] = log2phy[expert, seen[expert] % logcnt[expert]]
      seen[expert] += 1
  return out.reshape(ids.shape)


class PhysicalSlotsTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_reference_and_serves_the_chosen_expert(self):
    phy2log, log2phy, logcnt = placement()
    ids = router_ids((2, 64, 2))
    slots = self.variant(dispatch.physical_slots)(log2phy, logcnt, ids)
    chex.assert_type(slots, jnp.int32)
    for layer in range(2):
      expected = numpy_slots(np.asarray(log2phy[layer]), np.asarray(logcnt[layer]), ids[layer])
      chex.assert_trees_all_equal(slots[layer], expected)
    chex.assert_trees_all_equal(dispatch.logical_experts(phy2log, slots), ids)

  def test_spread_is_exactly_even(self):
    _, log2phy, logcnt = placement(num_layers=1)
    ids = router_ids((1, 300, 2), seed=1)
    slots = np.asarray(dispatch.physical_slots(log2phy, logcnt, ids))
    per_slot = np.bincount(slots.reshape(-1), minlength=NUM_SLOTS)
    per_expert = np.bincount(ids.reshape(-1), minlength=NUM_EXPERTS)
    assert (np.asarray(logcnt[0]) > 1).any()  # the test needs replicated experts
    for expert in range(NUM_EXPERTS):
      replicas = np.asarray(log2phy[0, expert, : logcnt[0, expert]])
      share = per_expert[expert] / len(replicas)
      assert set(per_slot[replicas]) <= {np.floor(share), np.ceil(share)}, expert

  def test_one_layer_equals_layered(self):
    _, log2phy, logcnt = placement()
    ids = router_ids((2, 40, 3), seed=2)
    layered = dispatch.physical_slots(log2phy, logcnt, ids)
    for layer in range(2):
      chex.assert_trees_all_equal(
        dispatch.physical_slots(log2phy[layer], logcnt[layer], ids[layer]), layered[layer]
      )

  def test_invalid_ids_get_no_slot(self):
    phy2log, log2phy, logcnt = placement(num_layers=1)
    ids = router_ids((1, 20, 2), seed=3)
    ids[0, ::3, 1] = -1
    ids[0, 1, 0] = NUM_EXPERTS
    slots = dispatch.physical_slots(log2phy, logcnt, ids)
    valid = (ids >= 0) & (ids < NUM_EXPERTS)
    chex.assert_trees_all_equal(slots[~valid], np.full((~valid).sum(), -1, np.int32))
    chex.assert_trees_all_equal(slots[0], numpy_slots(log2phy[0], logcnt[0], ids[0]))
    logical = dispatch.logical_experts(phy2log, slots)
    chex.assert_trees_all_equal(logical, np.where(valid, ids, -1).astype(np.int32))

  def test_no_retrace_for_new_ids_and_placements(self):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def route(log2phy, logcnt, ids):
      return dispatch.physical_slots(log2phy, logcnt, ids)

    for seed in range(3):
      _, log2phy, logcnt = placement(seed=seed)
      ids = router_ids((2, 32, 2), seed=seed)
      expected = numpy_slots(np.asarray(log2phy[1]), np.asarray(logcnt[1]), ids[1])
      chex.assert_trees_all_equal(route(log2phy, logcnt, ids)[1], expected)

  def test_bad_shapes(self):
    with pytest.raises(ValueError, match="log2phy"):
      dispatch.physical_slots(jnp.zeros(4, jnp.int32), jnp.ones(4, jnp.int32), jnp.zeros((2, 1)))
    with pytest.raises(ValueError, match="phy2log"):
      dispatch.logical_experts(jnp.zeros((1, 1, 4), jnp.int32), jnp.zeros((2, 1), jnp.int32))
