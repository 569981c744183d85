"""Placement quality metrics on tiny hand-computed examples."""

from __future__ import annotations

import numpy as np

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
  np.testing.assert_allclose(metrics.lower_bound(WEIGHT, 6, 2), [6.0, 0.0], rtol=1e-6)
  # No redundant slot: the heaviest expert (10) exceeds the average (12 / 2).
  weight = np.array([[10.0, 1.0, 1.0, 0.0]], np.float32)
  np.testing.assert_allclose(metrics.lower_bound(weight, 4, 2), [10.0], rtol=1e-6)
  # Two redundant slots both go to expert 0 (10 -> 5 -> 10/3); on 6 GPUs that
  # replica exceeds the average 12 / 6 = 2.
  np.testing.assert_allclose(metrics.lower_bound(weight, 6, 6), [10.0 / 3.0], rtol=1e-6)
  # Four redundant slots on 4 GPUs: the average 3 exceeds the largest replica 10 / 5.
  np.testing.assert_allclose(metrics.lower_bound(weight, 8, 4), [3.0], rtol=1e-6)


def test_bound_ratio():
  bound = np.array([6.0, 0.0], np.float32)
  # Layer 0: max 7 / bound 6; a zero bound counts as optimal.
  np.testing.assert_allclose(metrics.bound_ratio(LOADS, bound), (7 / 6 + 1) / 2, rtol=1e-6)
  np.testing.assert_allclose(metrics.bound_ratio(LOADS[:1], np.float32([7.0])), 1.0, rtol=1e-6)
