"""Tests of migration-aware rebalancing (:func:`eplb_jax.rebalance_with_previous`)."""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest
from conftest import CONFIGS

import eplb_jax
from eplb_jax import metrics
from eplb_jax import workloads
from eplb_jax._src.migration import warm

HIERARCHICAL = CONFIGS["hierarchical"]  # 2 groups per node, 4 GPUs per node, 5 slots per GPU
GLOBAL = CONFIGS["global-one-group"]  # 1 % 2 groups: the global policy
# Edge layouts: each costs a compile of the migration-aware program, so they run in the heavy tier.
EDGE = [
  pytest.param(CONFIGS[name], marks=pytest.mark.heavy)
  for name in ("no-redundancy", "one-slot-per-gpu", "one-gpu-per-node")
]


def _ids(config) -> str:
  return "L{}-E{}-P{}-g{}-n{}-G{}".format(*config)


def _reference_moved(old: np.ndarray, new: np.ndarray, num_gpus: int) -> np.ndarray:
  """Per layer, sum over GPUs and experts of max(0, copies after - copies before).

  -1 is an empty slot, no expert.
  """
  num_experts = max(old.max(), new.max()) + 1
  moved = []
  for old_layer, new_layer in zip(old, new, strict=True):
    total = 0
    for before, after in zip(
      old_layer.reshape(num_gpus, -1), new_layer.reshape(num_gpus, -1), strict=True
    ):
      gained = np.bincount(after[after >= 0], minlength=num_experts) - np.bincount(
        before[before >= 0], minlength=num_experts
      )
      total += np.maximum(gained, 0).sum()
    moved.append(total)
  return np.array(moved)


def _drift(weight: np.ndarray, sigma: float, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return (weight * np.exp(rng.normal(0.0, sigma, weight.shape))).astype(np.float32)


def test_migration_cost_hand_example():
  # 2 GPUs of 3 slots.
  old = np.array(
    [
      [0, 1, 1, 2, 3, 3],
      [0, 1, 2, 3, 4, 5],
      [0, 1, 2, 3, 4, 5],
      [0, 0, 1, 2, 3, 3],
      [0, 1, 1, 2, 3, 3],
    ]
  )
  new = np.array(
    [
      # GPU 0 keeps both 1s and gains a third; GPU 1 keeps 3 and 2, gains 0.
      [1, 1, 1, 3, 2, 0],
      [0, 1, 2, 3, 4, 5],  # unchanged
      [3, 1, 2, 0, 4, 5],  # 0 and 3 exchange GPUs
      [1, 0, 0, 3, 3, 2],  # slots permuted within each GPU: nothing arrives
      [-1, -1, -1, 2, 3, 0],  # GPU 0 emptied (failed): only 0 arrives, on GPU 1
    ]
  )
  moved, changed = eplb_jax.migration_cost(old, new, 2)
  chex.assert_trees_all_equal(moved, np.array([2, 0, 2, 0, 1], np.int32))
  chex.assert_trees_all_equal(changed, np.array([4, 0, 2, 4, 4], np.int32))


@pytest.mark.parametrize("num_gpus", [1, 4, 12])
def test_migration_cost_matches_reference(num_gpus):
  rng = np.random.default_rng(num_gpus)
  # Few distinct experts, so that GPUs hold duplicates.
  old = rng.integers(-1, 5, size=(6, 24))  # -1: an empty slot
  new = np.where(rng.random(old.shape) < 0.3, rng.integers(-1, 5, size=old.shape), old)
  moved, changed = eplb_jax.migration_cost(old, new, num_gpus)
  np.testing.assert_array_equal(moved, _reference_moved(old, new, num_gpus))
  np.testing.assert_array_equal(changed, (old != new).sum(-1))


def test_migration_cost_rejects_bad_input():
  old = np.zeros((2, 8), np.int32)
  with pytest.raises(ValueError, match="new_phy2log must have the shape"):
    eplb_jax.migration_cost(old, np.zeros((2, 6), np.int32), 2)
  with pytest.raises(ValueError, match="num_gpus must divide"):
    eplb_jax.migration_cost(old, old, 3)
  with pytest.raises(ValueError, match="old_phy2log must have an integer dtype"):
    eplb_jax.migration_cost(old.astype(np.float32), old, 2)
  with pytest.raises(ValueError, match="new_phy2log must be 2-D"):
    eplb_jax.migration_cost(old, old[0], 2)


# The global layout compiles its own migration-aware program: heavy tier, as the edge layouts.
@pytest.mark.parametrize(
  "config", [HIERARCHICAL, pytest.param(GLOBAL, marks=pytest.mark.heavy), *EDGE], ids=_ids
)
def test_identical_loads_keep_the_placement(config):
  num_layers, num_experts, *sizes = config
  weight = workloads.skewed_loads(num_layers, num_experts, seed=1)
  previous = eplb_jax.rebalance_experts(weight, *sizes)[0]
  phy2log, _, _ = eplb_jax.rebalance_with_previous(weight, *sizes, previous)
  chex.assert_trees_all_equal(phy2log, previous)
  moved, changed = eplb_jax.migration_cost(previous, phy2log, sizes[-1])
  chex.assert_trees_all_equal(moved, np.zeros(num_layers, np.int32))
  chex.assert_trees_all_equal(changed, np.zeros(num_layers, np.int32))


def _previous_placements(config, seed):
  """A fresh placement of other loads, and an arbitrary one (every slot random)."""
  num_layers, num_experts, num_replicas, *_ = config
  old_weight = workloads.skewed_loads(num_layers, num_experts, seed=seed + 100)
  rng = np.random.default_rng(seed)
  return {
    "fresh": eplb_jax.rebalance_experts(old_weight, *config[2:])[0],
    "random": rng.integers(0, num_experts, size=(num_layers, num_replicas)),
  }


@pytest.mark.parametrize("config", [HIERARCHICAL, GLOBAL, *EDGE], ids=_ids)
@pytest.mark.parametrize("loads", ["skewed", "tied", "zero"])
def test_returns_a_valid_placement_as_balanced_as_fresh(config, loads, assert_valid_placement):
  num_layers, num_experts, num_replicas, num_groups, num_nodes, num_gpus = config
  sizes = config[2:]
  weight = {
    "skewed": workloads.skewed_loads(num_layers, num_experts, seed=3),
    "tied": np.random.default_rng(3).integers(0, 4, (num_layers, num_experts)).astype(np.int32),
    "zero": np.zeros((num_layers, num_experts), np.float32),
  }[loads]
  fresh_phy2log, _, fresh_logcnt = eplb_jax.rebalance_experts(weight, *sizes)
  fresh_max = metrics.gpu_loads(weight, fresh_phy2log, fresh_logcnt, num_gpus).max(-1)
  for previous in _previous_placements(config, seed=3).values():
    phy2log, log2phy, logcnt = eplb_jax.rebalance_with_previous(weight, *sizes, previous)
    assert_valid_placement(phy2log, log2phy, logcnt, num_experts, num_replicas, num_layers)
    peak = metrics.gpu_loads(weight, phy2log, logcnt, num_gpus).max(-1)
    assert np.all(peak <= fresh_max * (1 + 1e-3) * (1 + 1e-6)), (peak, fresh_max)
    if num_groups % num_nodes == 0:
      # Hierarchical policy: all the replicas of a group sit on one node.
      group = np.asarray(phy2log) // (num_experts // num_groups)
      node = np.arange(num_replicas) // (num_replicas // num_nodes)
      for layer in group:
        assert all(len(set(node[layer == g])) == 1 for g in range(num_groups))


@pytest.mark.parametrize("config", [HIERARCHICAL, GLOBAL], ids=_ids)
@pytest.mark.parametrize("tolerance", [0.0, 1e-3, 1e-2])
def test_drifted_loads_move_few_replicas(config, tolerance):
  num_layers, num_experts, *sizes = config
  num_gpus = sizes[-1]
  moved, fresh_moved = 0, 0
  for seed in range(3):
    old_weight = workloads.skewed_loads(num_layers, num_experts, seed=seed)
    previous = eplb_jax.rebalance_experts(old_weight, *sizes)[0]
    weight = _drift(old_weight, 0.1, seed)
    fresh, _, fresh_logcnt = eplb_jax.rebalance_experts(weight, *sizes)
    phy2log, _, logcnt = eplb_jax.rebalance_with_previous(
      weight, *sizes, previous, tolerance=tolerance
    )
    peak = metrics.gpu_loads(weight, phy2log, logcnt, num_gpus).max(-1)
    fresh_peak = metrics.gpu_loads(weight, fresh, fresh_logcnt, num_gpus).max(-1)
    assert np.all(peak <= fresh_peak * (1 + tolerance) * (1 + 1e-6)), (peak, fresh_peak)
    moved += int(eplb_jax.migration_cost(previous, phy2log, num_gpus)[0].sum())
    fresh_moved += int(eplb_jax.migration_cost(previous, fresh, num_gpus)[0].sum())
  # At tolerance 0 the warm placement must match the fresh heaviest GPU
  # exactly, so more layers fall back to (relabelled) fresh placements.
  assert moved < fresh_moved * (0.75 if tolerance == 0 else 0.5), (moved, fresh_moved)


def test_greedy_mode_is_the_reference():
  num_layers, num_experts, *sizes = GLOBAL
  num_gpus = sizes[-1]
  weight = workloads.skewed_loads(num_layers, num_experts, seed=5)
  previous = eplb_jax.rebalance_experts(_drift(weight, 0.2, 5), *sizes)[0]
  fresh, _, fresh_logcnt = eplb_jax.rebalance_experts(weight, *sizes, mode="greedy")
  phy2log, _, logcnt = eplb_jax.rebalance_with_previous(
    weight, *sizes, previous, mode="greedy", tolerance=0.0
  )
  peak = metrics.gpu_loads(weight, phy2log, logcnt, num_gpus).max(-1)
  fresh_peak = metrics.gpu_loads(weight, fresh, fresh_logcnt, num_gpus).max(-1)
  assert np.all(peak <= fresh_peak * (1 + 1e-6))


@pytest.mark.parametrize(
  ("home", "expert"),
  [
    # GPU 2's replicas are already away from home: exchanging with it sends
    # one replica away instead of two.
    ([[0, 0], [1, 1], [-1, -1]], [[0, 1], [2, 3], [4, 5]]),
    # GPU 1 holds expert 1 already: exchanging with it would duplicate it.
    ([[0, 0], [1, 1], [2, 2]], [[0, 1], [4, 1], [2, 3]]),
  ],
)
def test_settle_takes_the_cheapest_exchange(home, expert):
  # GPU 0 (load 6) must send its 2.0 replica away for a 1.0 to get under 5;
  # GPUs 1 and 2 both fit it, and ties would go to GPU 1.
  load = np.array([[4.0, 2.0], [1.0, 1.5], [1.0, 1.0]], np.float32)
  settled, settled_load = warm.settle(load, np.array(expert), np.array(home), 5.0)
  want = np.array(expert)
  want[0, 1], want[2, 0] = want[2, 0], want[0, 1]
  chex.assert_trees_all_equal(settled, want)
  assert settled_load.sum(1).max() <= 5.0


class MigrationCostVariantsTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_traced_and_eager_agree(self):
    cost = self.variant(eplb_jax.migration_cost, static_argnums=2)
    old = np.array([[0, 1, 2, 3], [0, 0, 1, 1]])
    new = np.array([[1, 0, 2, 2], [1, 0, 0, 1]])
    chex.assert_trees_all_equal(
      cost(old, new, 2), (np.array([1, 2], np.int32), np.array([3, 2], np.int32))
    )


def test_jit_traces_once(assert_valid_placement):
  num_layers, num_experts, num_replicas, *_ = GLOBAL
  sizes = GLOBAL[2:]

  @jax.jit
  @chex.assert_max_traces(n=1)
  def rebalance(weight, previous, tolerance):
    return eplb_jax.rebalance_with_previous(weight, *sizes, previous, tolerance=tolerance)

  chex.clear_trace_counter()
  weight = workloads.skewed_loads(num_layers, num_experts, seed=0)
  previous = eplb_jax.rebalance_experts(weight, *sizes)[0]
  for seed in range(3):
    drifted = _drift(weight, 0.1, seed)
    jitted = rebalance(drifted, previous, 1e-3 * seed)
    chex.assert_trees_all_equal(
      jitted, eplb_jax.rebalance_with_previous(drifted, *sizes, previous, tolerance=1e-3 * seed)
    )
    previous = jitted[0]
  # Under jit, out-of-range expert ids count as empty slots.
  empty = np.full((num_layers, num_replicas), -1, np.int32)
  assert_valid_placement(*rebalance(weight, empty, 0.0), num_experts, num_replicas, num_layers)


def test_rejects_bad_previous():
  num_layers, num_experts, num_replicas, *_ = GLOBAL
  sizes = GLOBAL[2:]
  weight = workloads.skewed_loads(num_layers, num_experts, seed=0)
  previous = np.zeros((num_layers, num_replicas), np.int32)
  with pytest.raises(ValueError, match="previous_phy2log must have shape"):
    eplb_jax.rebalance_with_previous(weight, *sizes, previous[:, :-1])
  with pytest.raises(ValueError, match="previous_phy2log must hold expert ids"):
    eplb_jax.rebalance_with_previous(weight, *sizes, previous + num_experts)
  with pytest.raises(ValueError, match="previous_phy2log must have an integer dtype"):
    eplb_jax.rebalance_with_previous(weight, *sizes, previous.astype(np.float32))
  with pytest.raises(ValueError, match="tolerance must be"):
    eplb_jax.rebalance_with_previous(weight, *sizes, previous, tolerance=-0.1)
  for tolerance, message in ((None, "a real number"), (np.array([0.1, 0.2]), "a scalar")):
    with pytest.raises(ValueError, match=f"^tolerance must be {message}"):
      eplb_jax.rebalance_with_previous(weight, *sizes, previous, tolerance=tolerance)
  with pytest.raises(ValueError, match="num_replicas must be a multiple"):
    eplb_jax.rebalance_with_previous(weight, num_replicas + 1, *sizes[1:], previous)
