"""Gated rebalancing: keep the placement in service unless the new one is enough better."""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest

import eplb_jax
from eplb_jax._src.placement import from_phy2log

# 4 experts onto 8 slots on 4 GPUs of 2 slots (the global policy); every load
# below is exact in float32, so are the GPU loads.
TOPOLOGY = eplb_jax.Topology(8, 1, 1, 4)
WEIGHT = np.array([[3, 1, 1, 3], [1, 1, 1, 1]], np.float32)
# Layer 0: counts (2, 2, 2, 2), experts 0 and 3 together on GPUs 0 and 1: heaviest GPU 3.
# Layer 1: every GPU at 1, the optimum.
CURRENT = np.array([[0, 3, 0, 3, 1, 2, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]], np.int32)
# Layer 0: counts (3, 1, 1, 3), every GPU at 2, the optimum; layer 1 as CURRENT.
NEW = from_phy2log(np.array([[0, 1, 0, 2, 0, 3, 3, 3], CURRENT[1]], np.int32), 4)


def _gate(threshold, current=CURRENT, **kwargs):
  return eplb_jax.gate_placement(WEIGHT, TOPOLOGY, current, NEW, threshold, **kwargs)


def test_scores_and_threshold_boundary():
  kept = _gate(0.5)  # 3 <= 1.5 * 2: the boundary keeps
  chex.assert_trees_all_equal(kept.current_heaviest, np.array([3.0, 1.0], np.float32))
  chex.assert_trees_all_equal(kept.new_heaviest, np.array([2.0, 1.0], np.float32))
  chex.assert_trees_all_equal(kept.rebalanced, np.array([False, False]))
  chex.assert_trees_all_equal(kept.placement.phy2log, CURRENT)
  chex.assert_trees_all_equal(kept.placement, from_phy2log(CURRENT, 4))
  below = _gate(np.nextafter(np.float32(1.5), np.float32(0)) - 1)  # 1 + threshold just below 1.5
  chex.assert_trees_all_equal(below.rebalanced, np.array([True, False]))
  chex.assert_trees_all_equal(below.placement.phy2log, np.asarray(NEW.phy2log))
  # Threshold 0: layer 1 is no worse than the new placement, so it stays.
  chex.assert_trees_all_equal(_gate(0.0).rebalanced, np.array([True, False]))


def test_whole_model_decision():
  # Sums of the heaviest GPUs: 4 now, 3 new.
  chex.assert_trees_all_equal(_gate(0.5, per_layer=False).rebalanced, np.array([False, False]))
  decided = _gate(0.25, per_layer=False)
  chex.assert_trees_all_equal(decided.rebalanced, np.array([True, True]))
  chex.assert_trees_all_equal(decided.placement, NEW)


def test_an_unserved_expert_forces_the_rebalance():
  current = CURRENT.copy()
  current[1, [3, 7]] = -1  # expert 3 of layer 1 has no replica left
  decided = _gate(1e6, current)
  chex.assert_trees_all_equal(decided.rebalanced, np.array([False, True]))
  assert decided.current_heaviest[1] == np.inf


# Layer 0 of BROKEN holds no replica of expert 3, and is far lighter than CURRENT's under WEIGHT.
BROKEN = from_phy2log(np.array([[0, 1, 0, 2, 0, 1, 0, 2], CURRENT[1]], np.int32), 4)


def test_a_new_placement_without_some_expert_raises():
  with pytest.raises(ValueError, match="^new must give every expert a replica.*layer 0 .* 3"):
    eplb_jax.gate_placement(WEIGHT, TOPOLOGY, CURRENT, BROKEN, 0.0)
  # Its only replicas of expert 3 on a failed GPU: none on an active one.
  topology = eplb_jax.Topology(8, 1, 1, 4, failed_gpus=(2,))
  new = from_phy2log(np.array([[0, 1, 0, 2, 3, 3, -1, -1], CURRENT[1]]), 4)
  with pytest.raises(ValueError, match="^new must give every expert a replica.*layer 0 .* 3"):
    eplb_jax.gate_placement(WEIGHT, topology, CURRENT, new, 0.0)
  with pytest.raises(ValueError, match=r"^new.phy2log must hold expert ids in \[0, 4\)"):
    eplb_jax.gate_placement(WEIGHT, TOPOLOGY, CURRENT, NEW._replace(phy2log=NEW.phy2log + 1), 0)


@pytest.mark.parametrize("per_layer", [True, False])
def test_a_new_layer_without_some_expert_is_never_taken_under_jit(per_layer):
  gate = jax.jit(
    lambda c, n: eplb_jax.gate_placement(WEIGHT, TOPOLOGY, c, n, 0.0, per_layer=per_layer)
  )
  decided = gate(CURRENT, BROKEN)
  assert decided.new_heaviest[0] == np.inf
  # Per layer, layer 1 (no better) stays; for the whole model, nothing is taken.
  chex.assert_trees_all_equal(decided.rebalanced, np.array([False, False]))
  chex.assert_trees_all_equal(decided.placement.phy2log, CURRENT)
  # A current layer without some expert is rebalanced, except onto a new one without some expert.
  current = CURRENT.copy()
  current[:, [3, 7]] = -1  # expert 3 of both layers has no replica left
  decided = gate(current, BROKEN)
  chex.assert_trees_all_equal(decided.rebalanced, np.array([False, True]))
  chex.assert_trees_all_equal(decided.placement.phy2log[0], current[0])
  chex.assert_trees_all_equal(decided.placement.phy2log[1], CURRENT[1])


def test_failed_gpu_slots_serve_nothing():
  topology = eplb_jax.Topology(8, 1, 1, 4, failed_gpus=(1,))
  # Layer 1 is CURRENT's without GPU 1's slots.
  new = from_phy2log(np.array([[0, 1, -1, -1, 0, 2, 3, 3], [0, 1, -1, -1, 0, 1, 2, 3]]), 4)
  decided = eplb_jax.gate_placement(WEIGHT, topology, CURRENT, new, 0.0)
  # Layer 0 without GPU 1: experts 0 and 3 once each, both on GPU 0, at 3 + 3.
  chex.assert_trees_all_equal(decided.current_heaviest, np.array([6.0, 2.0], np.float32))
  chex.assert_trees_all_equal(decided.new_heaviest, np.array([3.0, 2.0], np.float32))
  chex.assert_trees_all_equal(decided.rebalanced, np.array([True, False]))
  np.testing.assert_array_equal(decided.placement.phy2log[:, 2:4], -1)


def test_jitted_gated_rebalance_traces_once():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(weight, current, threshold):
    return eplb_jax.gated_rebalance(weight, TOPOLOGY, current, threshold, mode="refined")

  chex.clear_trace_counter()
  first = step(WEIGHT, CURRENT, 0.0)
  chex.assert_trees_all_equal(first.rebalanced, np.array([True, False]))
  assert float(first.placement.gpu_loads(WEIGHT, 4).max(-1)[0]) == 2.0
  # Nothing changed: the placement in service is kept, bit for bit.
  again = step(WEIGHT, first.placement.phy2log, 0.0)
  chex.assert_trees_all_equal(again.rebalanced, np.array([False, False]))
  chex.assert_trees_all_equal(again.placement.phy2log, first.placement.phy2log)
  # Loads shift in layer 0 only: layer 0 is rebalanced.
  shifted = np.array([[1, 3, 3, 1], [1, 1, 1, 1]], np.float32)
  moved = step(shifted, first.placement.phy2log, 0.1)
  chex.assert_trees_all_equal(moved.rebalanced, np.array([True, False]))
  assert np.all(moved.placement.gpu_loads(shifted, 4).max(-1) == np.array([2.0, 1.0]))


@pytest.mark.parametrize(
  ("kwargs", "message"),
  [
    ({"threshold": -0.1}, "threshold must be a finite number >= 0"),
    ({"threshold": np.nan}, "threshold must be a finite number >= 0"),
    ({"threshold": np.inf}, "threshold must be a finite number >= 0"),
    ({"threshold": np.array([0.1, 0.2])}, r"threshold must be a scalar, got shape \(2,\)"),
    ({"threshold": np.array([0.1])}, r"threshold must be a scalar, got shape \(1,\)"),
    ({"threshold": None}, "threshold must be a real number, got None"),
    ({"threshold": "0.1"}, "threshold must be a real number"),
    ({"threshold": True}, "threshold must be a real number"),
    ({"per_layer": 1}, "per_layer must be a bool"),
    ({"current": CURRENT[:, :6]}, r"current_phy2log must have shape \[layers, num_replicas\]"),
    ({"current": CURRENT + 4}, r"current_phy2log must hold expert ids in \[0, 4\)"),
    ({"new": NEW[:2]}, "new must be a Placement"),
    ({"new": NEW._replace(logcnt=NEW.logcnt[:, :3])}, r"new.logcnt must have shape \(2, 4\)"),
  ],
)
def test_rejects_bad_arguments(kwargs, message):
  args = {"threshold": 0.1, "current": CURRENT, "new": NEW, "per_layer": True, **kwargs}
  with pytest.raises(ValueError, match=message):
    eplb_jax.gate_placement(
      WEIGHT, TOPOLOGY, args["current"], args["new"], args["threshold"], per_layer=args["per_layer"]
    )
  if "new" not in kwargs:
    with pytest.raises(ValueError, match=message):
      eplb_jax.gated_rebalance(
        WEIGHT, TOPOLOGY, args["current"], args["threshold"], per_layer=args["per_layer"]
      )
