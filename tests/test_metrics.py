"""Placement quality metrics on tiny hand-computed examples."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import eplb_jax
from eplb_jax import metrics

# Two layers, 4 experts, 6 slots on 2 GPUs (3 slots each). Layer 0 gives expert
# 0 and expert 3 two replicas each; layer 1 has no load at all.
WEIGHT = np.array([[6.0, 3.0, 1.0, 2.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
PHY2LOG = np.array([[0, 1, 3, 0, 2, 3], [0, 1, 2, 3, 0, 1]], np.int32)
LOGCNT = np.array([[2, 1, 1, 2], [2, 2, 1, 1]], np.int32)
# GPU 0 of layer 0: 6/2 + 3 + 2/2 = 7; GPU 1: 6/2 + 1 + 2/2 = 5.
LOADS = np.array([[7.0, 5.0], [0.0, 0.0]], np.float32)


def test_gpu_loads():
  np.testing.assert_allclose(metrics.gpu_loads(WEIGHT, PHY2LOG, LOGCNT, 2), LOADS, rtol=1e-6)
  # One GPU holds everything; six GPUs hold one slot each.
  np.testing.assert_allclose(metrics.gpu_loads(WEIGHT, PHY2LOG, LOGCNT, 1), [[12.0], [0.0]])
  np.testing.assert_allclose(
    metrics.gpu_loads(WEIGHT, PHY2LOG, LOGCNT, 6), [[3, 3, 1, 3, 1, 1], [0] * 6], rtol=1e-6
  )


def test_balancedness():
  # Layer 0: mean 6 / max 7; the all-zero layer counts as perfectly balanced.
  np.testing.assert_allclose(metrics.layer_balancedness(LOADS), [6 / 7, 1.0], rtol=1e-6)
  np.testing.assert_allclose(metrics.balancedness(LOADS), (6 / 7 + 1) / 2, rtol=1e-6)
  np.testing.assert_allclose(metrics.balancedness(np.zeros((3, 4), np.float32)), 1.0)
  np.testing.assert_allclose(metrics.balancedness(np.full((1, 4), 2.5, np.float32)), 1.0)
  np.testing.assert_allclose(metrics.balancedness(np.array([[1.0, 3.0]], np.float32)), 2 / 3)


def test_lower_bound():
  # Layer 0: the average 12 / 2 = 6 dominates; the best 2 extra replicas go to
  # expert 0 (6 -> 3 -> 2), leaving a largest replica of 3.
  np.testing.assert_allclose(
    metrics.lower_bound(WEIGHT, eplb_jax.Topology(6, 1, 1, 2)), [6.0, 0.0], rtol=1e-6
  )
  # No redundant slot: the heaviest expert (10) exceeds the average (12 / 2).
  weight = np.array([[10.0, 1.0, 1.0, 0.0]], np.float32)
  np.testing.assert_allclose(
    metrics.lower_bound(weight, eplb_jax.Topology(4, 1, 1, 2)), [10.0], rtol=1e-6
  )
  # Two redundant slots both go to expert 0 (10 -> 5 -> 10/3); on 6 GPUs that
  # replica exceeds the average 12 / 6 = 2.
  np.testing.assert_allclose(
    metrics.lower_bound(weight, eplb_jax.Topology(6, 1, 1, 6)), [10.0 / 3.0], rtol=1e-6
  )
  # Four redundant slots on 4 GPUs: the average 3 exceeds the largest replica 10 / 5.
  np.testing.assert_allclose(
    metrics.lower_bound(weight, eplb_jax.Topology(8, 1, 1, 4)), [3.0], rtol=1e-6
  )
  # Two slots per GPU and no spare slot: the GPU of the 10 holds another
  # expert, at least a 4 (the average is 11).
  weight = np.array([[10.0, 4.0, 4.0, 4.0]], np.float32)
  np.testing.assert_allclose(
    metrics.lower_bound(weight, eplb_jax.Topology(4, 1, 1, 2)), [14.0], rtol=1e-6
  )
  # Hierarchical policy, two groups of two on two nodes of one GPU: the two
  # 8s share a GPU (the global bound is 9).
  weight = np.array([[8.0, 8.0, 1.0, 1.0]], np.float32)
  np.testing.assert_allclose(
    metrics.lower_bound(weight, eplb_jax.Topology(4, 1, 1, 2)), [9.0], rtol=1e-6
  )
  np.testing.assert_allclose(
    metrics.lower_bound(weight, eplb_jax.Topology(4, 2, 2, 2)), [16.0], rtol=1e-6
  )


def test_bound_ratio():
  bound = np.array([6.0, 0.0], np.float32)
  # Layer 0: max 7 / bound 6; a zero bound counts as optimal.
  np.testing.assert_allclose(metrics.bound_ratio(LOADS, bound), (7 / 6 + 1) / 2, rtol=1e-6)
  np.testing.assert_allclose(metrics.bound_ratio(LOADS[:1], np.float32([7.0])), 1.0, rtol=1e-6)


def _best_packing(items: list[float], num_gpus: int) -> float:
  """The lightest possible heaviest GPU for ``items`` on GPUs of equal slot counts (exhaustive)."""
  per_gpu = len(items) // num_gpus
  best = np.inf
  for assignment in itertools.product(range(num_gpus), repeat=len(items)):
    if np.all(np.bincount(assignment, minlength=num_gpus) == per_gpu):
      loads = np.bincount(assignment, weights=items, minlength=num_gpus)
      best = min(best, loads.max())
  return best


def _domain_optimum(weight: np.ndarray, num_slots: int, num_gpus: int) -> float:
  """The optimum of one domain over every replica count vector and every packing."""
  n = weight.shape[0]
  best = np.inf
  for cuts in itertools.combinations(range(1, num_slots), n - 1):
    counts = np.diff((0, *cuts, num_slots))
    items = np.repeat(weight.astype(np.float64) / counts, counts)
    best = min(best, _best_packing(list(items), num_gpus))
  return best


def _policy_optimum(weight, num_replicas, num_groups, num_nodes, num_gpus) -> float:
  """Min over the ways to put the groups on nodes of the heaviest node's optimum."""
  if num_nodes == 1:
    return _domain_optimum(weight, num_replicas, num_gpus)
  group_size = weight.shape[0] // num_groups
  best = np.inf
  for first in itertools.combinations(range(1, num_groups), num_groups // num_nodes - 1):
    node0 = (0, *first)
    node1 = tuple(g for g in range(num_groups) if g not in node0)
    peak = max(
      _domain_optimum(
        np.concatenate([weight[g * group_size : (g + 1) * group_size] for g in node]),
        num_replicas // num_nodes,
        num_gpus // num_nodes,
      )
      for node in (node0, node1)
    )
    best = min(best, peak)
  return best


@pytest.mark.parametrize(
  "sizes",
  [(4, 6, 1, 1, 2), (3, 6, 1, 1, 3), (4, 8, 1, 1, 2), (4, 8, 4, 2, 4), (4, 4, 4, 2, 2)],
  ids=str,
)
def test_lower_bound_never_exceeds_the_optimum(sizes):
  """On small random domains (heavy tails, ties, zeros), against exhaustive search."""
  num_experts, num_replicas, num_groups, num_nodes, num_gpus = sizes
  rng = np.random.default_rng(num_replicas * 10 + num_gpus)
  weight = np.concatenate(
    [
      rng.pareto(1.2, (12, num_experts)) * 100,
      rng.integers(0, 4, (6, num_experts)),
      rng.lognormal(0.0, 2.0, (6, num_experts)),
    ]
  ).astype(np.float32)
  bound = np.asarray(
    metrics.lower_bound(weight, eplb_jax.Topology(num_replicas, num_groups, num_nodes, num_gpus))
  )
  optimum = np.array(
    [_policy_optimum(w, num_replicas, num_groups, num_nodes, num_gpus) for w in weight]
  )
  assert np.all(bound <= optimum * (1 + 1e-5)), (bound, optimum)
  # At least the average and the heaviest replica of water-filling.
  _, _, logcnt = eplb_jax.replicate_experts(weight, num_replicas)
  simple = np.maximum(weight.sum(1) / num_gpus, (weight / logcnt).max(1))
  assert np.all(bound >= simple * (1 - 1e-6))
