"""Properties every placement must have, for random configurations and both modes."""

from __future__ import annotations

import chex
import numpy as np
import pytest
from conftest import CONFIGS
from conftest import check_hierarchy
from conftest import loads

import eplb_jax
from eplb_jax import metrics
from eplb_jax import workloads

MODES = ("greedy", "refined")


LOAD_KINDS = ("skewed", "tied", "one-hot", "zero")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_valid_placement(config, mode, assert_valid_placement):
  num_layers, num_experts, num_replicas, num_groups, num_nodes, num_gpus = config
  sizes = (num_replicas, num_groups, num_nodes, num_gpus)
  for seed in range(2):
    for kind in LOAD_KINDS:
      weight = loads(kind, (num_layers, num_experts), seed)
      phy2log, log2phy, logcnt = eplb_jax.rebalance_experts(weight, *sizes, mode=mode)
      try:
        assert_valid_placement(phy2log, log2phy, logcnt, num_experts, num_replicas, num_layers)
        if num_groups % num_nodes == 0:
          check_hierarchy(phy2log, num_experts, num_replicas, num_groups, num_nodes)
      except AssertionError as error:
        raise AssertionError(f"{kind} loads, seed {seed}") from error


def _peaks(weight, sizes, mode):
  phy2log, _, logcnt = eplb_jax.rebalance_experts(weight, *sizes, mode=mode)
  return np.asarray(metrics.gpu_loads(weight, phy2log, logcnt, sizes[-1])).max(-1)


def test_refined_at_least_as_balanced_as_greedy():
  """Over the shared configurations and three load seeds, the mean balancedness of
  refined is at least greedy's."""
  balance = {mode: [] for mode in MODES}
  for num_layers, num_experts, *sizes in CONFIGS.values():
    for seed in range(3):
      weight = loads("skewed", (num_layers, num_experts), seed)
      for mode in MODES:
        placement = eplb_jax.rebalance_experts(weight, *sizes, mode=mode)
        gpu_loads = placement.gpu_loads(weight, sizes[-1])
        balance[mode].append(np.asarray(metrics.layer_balancedness(gpu_loads)))
  greedy, refined = (np.concatenate(balance[mode]) for mode in MODES)
  assert refined.mean() >= greedy.mean() - 1e-6, (refined.mean(), greedy.mean())


def test_refined_beats_greedy_on_a_skewed_global_workload():
  """Refined lowers the heaviest GPU well below greedy's on a skewed workload."""
  weight = workloads.skewed_loads(8, 64, seed=0)
  sizes = (80, 1, 2, 16)
  greedy, refined = (_peaks(weight, sizes, mode) for mode in MODES)
  assert refined.mean() < greedy.mean() * (1 - 1e-3), (greedy, refined)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(3, 12, 4), (2, 8, 8), (2, 6, 1), (4, 20, 5)], ids=str)
def test_balanced_packing(shape, mode):
  rows, items, num_packs = shape
  weight = workloads.skewed_loads(rows, items, seed=7)
  pack, rank = (np.asarray(a) for a in eplb_jax.balanced_packing(weight, num_packs, mode=mode))
  assert pack.dtype == rank.dtype == np.int32
  assert pack.shape == rank.shape == (rows, items)
  per_pack = items // num_packs
  for row in range(rows):
    # Every (pack, rank) position is used by exactly one item.
    np.testing.assert_array_equal(
      np.sort(pack[row] * per_pack + rank[row]), np.arange(items), err_msg=f"row {row}"
    )


@pytest.mark.parametrize("shape", [(3, 12, 16), (2, 5, 5), (2, 6, 20), (1, 1, 4)], ids=str)
def test_replicate_experts(shape):
  rows, num_log, num_replicas = shape
  weight = workloads.skewed_loads(rows, num_log, seed=3)
  phy2log, rank, logcnt = (np.asarray(a) for a in eplb_jax.replicate_experts(weight, num_replicas))
  assert phy2log.dtype == rank.dtype == logcnt.dtype == np.int32
  assert phy2log.shape == rank.shape == (rows, num_replicas)
  for row in range(rows):
    np.testing.assert_array_equal(phy2log[row, :num_log], np.arange(num_log))
    np.testing.assert_array_equal(np.bincount(phy2log[row], minlength=num_log), logcnt[row])
    # The replicas of each expert are ranked 0 .. logcnt - 1.
    order = np.lexsort((rank[row], phy2log[row]))
    expected_rank = np.concatenate([np.arange(c) for c in logcnt[row]])
    np.testing.assert_array_equal(rank[row][order], expected_rank)
  # The largest per-replica load is no larger than any other split could make it:
  # moving one replica from the expert with the smallest w/(c-1) cannot help.
  per_replica = weight / logcnt
  donors = np.where(logcnt > 1, weight / np.maximum(logcnt - 1, 1), np.inf)
  assert np.all(per_replica.max(-1) <= donors.min(-1) * (1 + 1e-6))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
  "experts, sizes", [(128, (160, 1, 2, 16)), (64, (80, 8, 4, 16))], ids=["global", "hierarchical"]
)
def test_layers_do_not_depend_on_the_batch(mode, experts, sizes):
  """A layer's placement is the same whatever other layers are balanced with it.

  Sharded calls (each device balancing its own layers) rely on this; float
  sums whose rounding depends on the batch shape, or choices made across
  layers, would break it.
  """
  weight = workloads.skewed_loads(12, experts, seed=3)
  whole = eplb_jax.rebalance_experts(weight, *sizes, mode=mode)
  parts = [eplb_jax.rebalance_experts(weight[i : i + 4], *sizes, mode=mode) for i in (0, 4, 8)]
  chex.assert_trees_all_equal(
    whole, eplb_jax.Placement(*(np.concatenate(p) for p in zip(*parts, strict=True)))
  )
