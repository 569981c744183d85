"""Edge input: loads beyond float32, 64-bit mode, empty shapes, and the runtime pieces' ids.

Every input gets a valid placement or a ``ValueError`` naming the argument.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS
from conftest import check_placement
from conftest import loads

import eplb_jax
from eplb_jax import metrics
from eplb_jax.runtime import dispatch
from eplb_jax.runtime import params
from eplb_jax.runtime import stats

MODES = ("greedy", "refined")
README = CONFIGS["readme"]  # (layers, experts, num_replicas, num_groups, num_nodes, num_gpus)
SIZES = README[2:]
SHAPE = README[:2]


# Float32 sums that would overflow: the loads are scaled by a power of two per
# layer, which changes no placement.
@pytest.mark.parametrize("mode", MODES)
def test_loads_whose_sums_overflow_float32(mode):
  weight = loads("float", SHAPE, 0)
  expected = eplb_jax.rebalance_experts(weight, *SIZES, mode=mode)
  # Largest load just below float32's maximum: the sums overflow unscaled.
  huge = weight * np.float32(2.0**127 / weight.max())
  assert np.all(np.isfinite(huge)) and huge.sum(dtype=np.float64) > np.finfo(np.float32).max
  chex.assert_trees_all_equal(eplb_jax.rebalance_experts(huge, *SIZES, mode=mode), expected)
  # Equal loads at the top of the range: the case DeepSeek's greedy packs wrongly.
  flat = np.full((1, 8), 3e38, np.float32)
  check_placement(*eplb_jax.rebalance_experts(flat, 16, 1, 1, 2, mode=mode), 8, 16, 1)


@pytest.mark.parametrize("mode", MODES)
def test_balanced_packing_of_huge_weights(mode):
  pack, rank = eplb_jax.balanced_packing(np.full((1, 8), 3e38, np.float32), 2, mode=mode)
  np.testing.assert_array_equal(np.sort(np.asarray(pack[0]) * 4 + np.asarray(rank[0])), range(8))


def test_float64_loads_beyond_float32_range():
  weight = loads("float", SHAPE, 1)
  # Exact power-of-two scaling, far beyond float32's range.
  scaled = weight.astype(np.float64) * 2.0**1000
  chex.assert_trees_all_equal(
    eplb_jax.rebalance_experts(scaled, *SIZES), eplb_jax.rebalance_experts(weight, *SIZES)
  )
  with pytest.raises(ValueError, match="weight must be finite"):
    eplb_jax.rebalance_experts(np.where(weight > 500, np.inf, scaled), *SIZES)
  with pytest.raises(ValueError, match="weight must be non-negative"):
    eplb_jax.rebalance_experts(-scaled, *SIZES)


# Zero layers: empty maps of the right shapes and dtypes; zero experts: an error.
def _assert_empty(outputs, shapes):
  assert len(outputs) == len(shapes)
  for out, shape in zip(outputs, shapes, strict=True):
    assert out.shape == shape and out.dtype == jnp.int32, (out.shape, out.dtype, shape)


def test_zero_layers():
  num_experts, num_replicas = SHAPE[1], SIZES[0]
  maps = [(0, num_replicas), (0, num_experts, num_replicas - num_experts + 1), (0, num_experts)]
  weight = np.zeros((0, num_experts), np.float32)
  previous = np.zeros((0, num_replicas), np.int64)
  _assert_empty(eplb_jax.rebalance_experts(weight, *SIZES), maps)
  _assert_empty(eplb_jax.rebalance_experts(weight, *SIZES, previous_phy2log=previous), maps)
  _assert_empty(jax.jit(lambda w: eplb_jax.rebalance_experts(w, *SIZES))(weight), maps)
  _assert_empty(
    eplb_jax.rebalance_experts_hierarchical(weight, *SIZES),
    [(0, num_replicas), (0, num_replicas), (0, num_experts)],
  )
  _assert_empty(eplb_jax.balanced_packing(weight, 4), [(0, num_experts)] * 2)
  _assert_empty(
    eplb_jax.replicate_experts(weight, num_replicas),
    [(0, num_replicas), (0, num_replicas), (0, num_experts)],
  )
  _assert_empty(eplb_jax.migration_cost(previous, previous, 8), [(0,), (0,)])


@pytest.mark.parametrize("per_layer", [True, False])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_zero_layers_views_and_gate(jit, per_layer):
  num_experts, num_replicas, num_gpus = SHAPE[1], SIZES[0], SIZES[-1]
  topology = eplb_jax.Topology(*SIZES)
  weight = np.zeros((0, num_experts), np.float32)
  current = np.zeros((0, num_replicas), np.int32)
  new = eplb_jax.rebalance(weight, topology)
  call = jax.jit if jit else (lambda f: f)
  gated = (
    call(lambda w, c, p: eplb_jax.gate_placement(w, topology, c, p, 0.1, per_layer=per_layer))(
      weight, current, new
    ),
    call(lambda w, c: eplb_jax.gated_rebalance(w, topology, c, 0.1, per_layer=per_layer))(
      weight, current
    ),
  )
  for decided in gated:
    chex.assert_trees_all_equal(decided.placement, new)
    chex.assert_shape((decided.rebalanced, decided.current_heaviest, decided.new_heaviest), (0,))
  loads = call(lambda w, p: p.gpu_loads(w, num_gpus))(weight, new)
  chex.assert_trees_all_equal(loads, jnp.zeros((0, num_gpus), jnp.float32))
  chex.assert_trees_all_equal(metrics.gpu_loads(weight, new.phy2log, new.logcnt, num_gpus), loads)
  chex.assert_trees_all_equal(
    call(lambda p: p.gpu_experts(num_gpus))(new), jnp.zeros((0, num_gpus, 2), jnp.int32)
  )


@pytest.mark.parametrize("num_gpus", [0, 3, 2.0, 2**31])
def test_views_check_num_gpus(num_gpus):
  fresh = eplb_jax.rebalance_experts(loads("skewed", SHAPE, 0), *SIZES)
  for view in (
    lambda: fresh.gpu_experts(num_gpus),
    lambda: fresh.gpu_loads(loads("skewed", SHAPE, 0), num_gpus),
    lambda: metrics.gpu_loads(loads("skewed", SHAPE, 0), fresh.phy2log, fresh.logcnt, num_gpus),
  ):
    with pytest.raises(ValueError, match="^num_gpus must"):
      view()


def test_zero_experts():
  weight = np.zeros((3, 0), np.float32)
  for call in (
    lambda: eplb_jax.rebalance_experts(weight, *SIZES),
    lambda: eplb_jax.rebalance_experts(weight, *SIZES, previous_phy2log=np.zeros((3, 16), int)),
    lambda: eplb_jax.balanced_packing(weight, 4),
    lambda: eplb_jax.replicate_experts(weight, 4),
    lambda: eplb_jax.rebalance_experts_hierarchical(weight, *SIZES),
  ):
    with pytest.raises(ValueError, match="weight must have at least one expert"):
      call()


# 64-bit mode: every output keeps its dtype, every result its value.


def _runtime_outputs(placement, ids):
  counts = stats.expert_counts(ids, placement.logcnt.shape[-1])
  slots = dispatch.physical_slots(placement.log2phy, placement.logcnt, ids)
  window = stats.window_update(stats.window_init(2, counts.shape), counts)
  ema = stats.ema_update(stats.ema_init(counts.shape, 0.5), counts)
  expert_params = {"w": jnp.arange(counts.size, dtype=jnp.float32).reshape(counts.shape)}
  return (
    counts,
    slots,
    dispatch.logical_experts(placement.phy2log, slots),
    stats.window_load(window),
    stats.ema_load(ema),
    params.apply_placement(expert_params, placement.phy2log)["w"],
  )


# More than 32 replicas per node (the bisection path), on the hierarchical policy.
X64_CONFIG = (2, 4, 80, 2, 2, 4)


@pytest.mark.heavy
def test_x64():
  """Under ``jax_enable_x64`` the core paths keep their dtypes, and results their values.

  Fresh (refined: its replication and packing are the default mode's building
  blocks) and runtime results are compared with those without x64; the
  migration-aware placement must be valid.
  """
  num_layers, num_experts, *sizes = X64_CONFIG
  weight = loads("skewed", (num_layers, num_experts), 0)
  ids = np.random.default_rng(0).integers(-1, num_experts + 1, size=(num_layers, 20, 2))
  fresh = eplb_jax.rebalance_experts(weight, *sizes, mode="refined")
  expected = (fresh, _runtime_outputs(fresh, ids))
  before = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    fresh = eplb_jax.rebalance_experts(jnp.asarray(weight, jnp.float64), *sizes, mode="refined")
    got = (fresh, _runtime_outputs(fresh, jnp.asarray(ids, jnp.int64)))
    jax.tree.map(lambda g, w: np.testing.assert_array_equal(g, w), got, expected)
    jax.tree.map(lambda g, w: chex.assert_type(g, w.dtype), got, expected)
    previous = jnp.asarray(fresh.phy2log, jnp.int64)
    moved = eplb_jax.rebalance_experts(
      weight[::-1], *sizes, mode="greedy", previous_phy2log=previous
    )
    check_placement(*moved, num_experts, sizes[0], num_layers)
  finally:
    jax.config.update("jax_enable_x64", before)


# Runtime pieces: shapes checked at trace time; out-of-range ids never reach a
# real expert or slot (dropped, -1, or zeros for parameters).
def test_expert_counts_ids():
  assert stats.expert_counts(np.array([[2**32 + 1, 5]]), 8).tolist() == [0, 0, 0, 0, 0, 1, 0, 0]
  assert stats.expert_counts([[1, 1], [7, -1]], 8).tolist() == [0, 2, 0, 0, 0, 0, 0, 1]
  chex.assert_trees_all_equal(
    stats.expert_counts(np.zeros((3, 0, 2), np.int32), 4), jnp.zeros((3, 4), jnp.int32)
  )
  with pytest.raises(ValueError, match="^expert_ids"):
    stats.expert_counts(np.zeros((4, 2), np.float32), 8)
  with pytest.raises(ValueError, match="^mask"):
    stats.expert_counts(np.zeros((4, 2), np.int32), 8, mask=np.ones(3, bool))


def test_state_updates_check_shapes():
  with pytest.raises(ValueError, match="^counts"):
    stats.window_update(stats.window_init(2, (3, 4)), jnp.ones((1, 4), jnp.int32))
  with pytest.raises(ValueError, match="^counts"):
    stats.window_update(stats.window_init(2, (3, 4)), jnp.ones(4, jnp.int32))
  with pytest.raises(ValueError, match="^counts"):
    stats.ema_update(stats.ema_init((8,), 0.9), jnp.ones((3, 8)))
  state = stats.window_update(stats.window_init(2, (2,)), [1, 2])
  assert stats.window_load(state).tolist() == [1, 2]


def test_dispatch_out_of_range():
  phy2log = jnp.arange(16, dtype=jnp.int32) % 8
  assert dispatch.logical_experts(phy2log, jnp.array([16, 100, -1, 3])).tolist() == [-1, -1, -1, 3]
  assert dispatch.logical_experts(phy2log, np.array([2**32 + 3])).tolist() == [-1]
  assert dispatch.logical_experts([0, 1], [1, 0]).tolist() == [1, 0]
  fresh = eplb_jax.rebalance_experts(loads("skewed", SHAPE, 2), *SIZES)
  ids = np.array([[0, 2**32], [11, 12]])
  slots = np.asarray(dispatch.physical_slots(fresh.log2phy[0], fresh.logcnt[0], ids))
  assert slots[0, 1] == slots[1, 1] == -1
  assert np.asarray(fresh.phy2log[0])[slots[[0, 1], [0, 0]]].tolist() == [0, 11]
  with pytest.raises(ValueError, match="^logcnt"):
    dispatch.physical_slots(fresh.log2phy, fresh.logcnt[0], ids)
  with pytest.raises(ValueError, match="^expert_ids"):
    dispatch.physical_slots(fresh.log2phy, fresh.logcnt, np.zeros((3, 2), np.int32))
  with pytest.raises(ValueError, match="^slots"):
    dispatch.logical_experts(fresh.phy2log, jnp.zeros((3, 4), jnp.int32))
  # Another layer's counts: an error when eager; under jit, slots of the expert still.
  other = fresh.logcnt[1]
  if np.any(np.asarray(other) > np.asarray(fresh.logcnt[0])):
    with pytest.raises(ValueError, match="^logcnt"):
      dispatch.physical_slots(fresh.log2phy[0], other, ids)
  jitted = jax.jit(dispatch.physical_slots)(fresh.log2phy[0], other, np.arange(12)[:, None])
  np.testing.assert_array_equal(np.asarray(fresh.phy2log[0])[jitted[:, 0]], np.arange(12))


def test_apply_placement_out_of_range():
  expert_params = {"w": jnp.arange(4.0)}
  with pytest.raises(ValueError, match="^phy2log"):
    params.apply_placement(expert_params, jnp.array([4, -1]))
  got = jax.jit(params.apply_placement)(expert_params, jnp.array([4, -1, 2]))
  assert got["w"].tolist() == [0.0, 0.0, 2.0]
  layered = {"w": jnp.ones((2, 4, 3))}
  with pytest.raises(ValueError, match="^params"):
    params.apply_placement(layered, jnp.zeros((3, 6), jnp.int32))
  with pytest.raises(ValueError, match="^phy2log"):
    params.apply_placement(layered, np.array([0, 3, 1]))  # [L, E, ...] leaves need [L, P]
  with pytest.raises(ValueError, match="^params"):
    params.apply_placement({"a": jnp.ones(4), "b": jnp.ones(5)}, [0, 1])
  assert params.apply_placement(expert_params, [3, 0])["w"].tolist() == [3.0, 0.0]
  moved = jax.jit(params.relayout)({"w": jnp.arange(3.0)}, jnp.array([[1], [0]]), jnp.array([0, 5]))
  assert moved["w"].tolist() == [1.0, 0.0]
