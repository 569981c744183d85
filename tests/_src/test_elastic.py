"""Failed GPUs (elastic EP): replicas only on active GPUs, every expert served, few moves."""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest
from conftest import CONFIGS
from conftest import loads

import eplb_jax
from eplb_jax import metrics
from eplb_jax import workloads
from eplb_jax.runtime import dispatch

# 2 layers x 32 experts onto 40 slots, 8 groups, 4 nodes, 8 GPUs of 5 slots.
NUM_LAYERS, NUM_EXPERTS, *SIZES = CONFIGS["deepseek-like"]


@pytest.mark.parametrize(
  ("failed", "message"),
  [
    ((8,), r"hold GPU ids in \[0, 8\)"),
    ((-1,), r"hold GPU ids in \[0, 8\)"),
    (range(8), "leave at least one GPU active"),
    ("3", "be an iterable of GPU ids"),
    (3, "be an iterable of GPU ids"),
    ((True,), "hold static int GPU ids"),
    ((1.0,), "hold static int GPU ids"),
  ],
)
def test_failed_gpus_are_checked(failed, message):
  with pytest.raises(ValueError, match="failed_gpus must " + message):
    eplb_jax.Topology(*SIZES, failed_gpus=failed)


def test_survivors():
  topology = eplb_jax.Topology(*SIZES, failed_gpus=[5, 3, 3])
  assert topology.failed_gpus == (3, 5)
  assert topology.active_gpus == (0, 1, 2, 4, 6, 7)
  np.testing.assert_array_equal(topology.active_slots()[10:20], np.r_[10:15, 20:25])
  # Part of a node failed: the global policy over the 6 active GPUs.
  assert topology.survivors() == eplb_jax.Topology(30, 1, 1, 6)
  # A whole node failed and the 12 groups split over the 3 others: still hierarchical.
  whole_node = eplb_jax.Topology(48, 12, 4, 16, failed_gpus=range(4, 8))
  assert whole_node.survivors() == eplb_jax.Topology(36, 12, 3, 12)
  assert whole_node.survivors().policy == "hierarchical"
  # 8 groups do not split over 3 nodes.
  assert eplb_jax.Topology(48, 8, 4, 16, failed_gpus=range(4)).survivors().policy == "global"
  no_failure = eplb_jax.Topology(*SIZES)
  assert no_failure.survivors() is no_failure
  assert hash(topology) == hash(eplb_jax.Topology(*SIZES, failed_gpus=(5, 3)))


def test_too_few_active_slots_raise():
  weight = loads("float", (NUM_LAYERS, NUM_EXPERTS), seed=0)
  topology = eplb_jax.Topology(*SIZES, failed_gpus=(0, 1, 2))  # 25 slots for 32 experts
  with pytest.raises(ValueError, match=r"failed_gpus must leave .* \(32\).* leave 25 of 40"):
    eplb_jax.rebalance(weight, topology)
  with pytest.raises(ValueError, match="failed_gpus must leave"):  # a static check: under jit too
    jax.jit(lambda w: eplb_jax.rebalance(w, topology))(weight)


def _check_on_active_gpus(placement, weight, topology):
  """A valid placement of ``weight`` on ``topology``'s active GPUs; failed GPUs' slots empty."""
  phy2log, log2phy, logcnt = (np.asarray(a) for a in placement)
  num_layers, num_experts = weight.shape
  num_replicas, num_gpus = topology.num_replicas, topology.num_gpus
  assert phy2log.shape == (num_layers, num_replicas)
  assert log2phy.shape == (num_layers, num_experts, num_replicas - num_experts + 1)
  dead = np.isin(np.arange(num_replicas) // topology.slots_per_gpu, topology.failed_gpus)
  np.testing.assert_array_equal(phy2log[:, dead], -1)
  assert np.all((phy2log[:, ~dead] >= 0) & (phy2log[:, ~dead] < num_experts))
  assert np.all(logcnt >= 1)
  ranks = np.arange(log2phy.shape[-1])
  np.testing.assert_array_equal(log2phy[ranks >= logcnt[..., None]], -1)
  for layer in range(num_layers):
    np.testing.assert_array_equal(
      np.bincount(phy2log[layer, ~dead], minlength=num_experts), logcnt[layer]
    )
    listed = log2phy[layer][ranks < logcnt[layer][:, None]]
    np.testing.assert_array_equal(np.sort(listed), np.flatnonzero(~dead))
    np.testing.assert_array_equal(
      phy2log[layer, listed], np.repeat(np.arange(num_experts), logcnt[layer])
    )
  # Derived views: failed GPUs carry nothing, the active ones all the load.
  gpu_loads = np.asarray(placement.gpu_loads(weight, num_gpus))
  np.testing.assert_array_equal(gpu_loads[:, list(topology.failed_gpus)], 0.0)
  np.testing.assert_allclose(gpu_loads.sum(-1), weight.sum(-1), rtol=1e-5)
  # Dispatch never picks an empty slot, and every GPU's dispatch map names a live replica.
  ids = np.random.default_rng(0).integers(0, num_experts, (num_layers, 64, 8), dtype=np.int32)
  slots = np.asarray(dispatch.physical_slots(log2phy, logcnt, ids))
  assert not np.any(dead[slots])
  chex.assert_trees_all_equal(dispatch.logical_experts(phy2log, slots), ids)
  location = eplb_jax.expert_location(placement, topology)
  targets = np.asarray(location.logical_to_rank_dispatch_physical_map)
  assert np.all(targets >= 0) and not np.any(dead[targets])


def _unserved(previous: np.ndarray, topology) -> np.ndarray:
  """``[L]``: experts whose replicas in ``previous`` were all on ``topology``'s failed GPUs."""
  previous = np.asarray(previous)
  dead = np.isin(np.arange(previous.shape[1]) // topology.slots_per_gpu, topology.failed_gpus)
  return np.array(
    [len(set(layer[dead]) - set(layer[~dead]) - {-1}) for layer in previous], np.int32
  )


@pytest.mark.parametrize(("num_replicas", "failed"), [(40, (3,)), (48, (0,))])
def test_failure_moves_only_the_experts_left_without_a_replica(num_replicas, failed):
  # Where balance allows (a large tolerance), the placement in service keeps
  # its counts: an expert whose replicas were all lost gets one back from an
  # expert that can spare one, and nothing else moves. The placement in
  # service has no duplicate on a GPU (the search would count one like a
  # moved replica and might separate it).
  weight = loads("float", (NUM_LAYERS, NUM_EXPERTS), seed=1)
  extra = np.random.default_rng(0).permutation(NUM_EXPERTS)[: num_replicas - NUM_EXPERTS]
  previous = np.tile(np.concatenate([np.arange(NUM_EXPERTS), extra]), (NUM_LAYERS, 1))
  topology = eplb_jax.Topology(num_replicas, 1, 1, 8, failed_gpus=failed)
  placement = eplb_jax.rebalance(
    weight, topology, mode="greedy", previous_phy2log=previous, tolerance=0.99
  )
  phy2log = np.asarray(placement.phy2log)
  assert np.all(np.asarray(placement.logcnt) >= 1)
  per_gpu = phy2log.reshape(NUM_LAYERS, 8, -1)
  np.testing.assert_array_equal(per_gpu[:, list(failed)], -1)
  moved, _ = eplb_jax.migration_cost(previous, phy2log, topology.num_gpus)
  unserved = _unserved(previous, topology)
  assert unserved.sum() > 0
  np.testing.assert_array_equal(moved, unserved)


@pytest.mark.heavy
def test_deepseek_v3_kill_one_gpu():
  """DeepSeek-V3 prefill (256 experts, 288 slots, 8 groups, 4 nodes, 32 GPUs): GPU 3 fails.

  The placement in service is the healthy one; after the failure the
  migration-aware placement must be as balanced as a fresh placement on the
  31 survivors (within the 0.1% tolerance) and move far fewer replicas.
  """
  shape = workloads.SHAPES["deepseek-v3-prefill"]
  num_layers, num_gpus = 2, shape.num_gpus
  weight = workloads.skewed_loads(num_layers, shape.num_experts, seed=0)
  previous = eplb_jax.rebalance(weight, shape.topology, mode="greedy").phy2log
  topology = eplb_jax.Topology(*shape.sizes, failed_gpus=(3,))
  fresh = eplb_jax.rebalance_experts(weight, *shape.sizes, mode="refined", failed_gpus=[3])
  moved = eplb_jax.rebalance(weight, topology, mode="refined", previous_phy2log=previous)
  for placement in (fresh, moved):
    _check_on_active_gpus(placement, weight, topology)
  peak, fresh_peak = (p.gpu_loads(weight, num_gpus).max(-1) for p in (moved, fresh))
  assert np.all(peak <= fresh_peak * (1 + 1e-3) * (1 + 1e-6)), (peak, fresh_peak)
  active = list(topology.active_gpus)
  balance = [
    float(metrics.balancedness(p.gpu_loads(weight, num_gpus)[:, active])) for p in (moved, fresh)
  ]
  cost = [
    int(eplb_jax.migration_cost(previous, p.phy2log, num_gpus)[0].sum()) for p in (moved, fresh)
  ]
  assert _unserved(previous, topology).sum() <= cost[0] < 0.3 * cost[1], cost
  assert balance[0] >= balance[1] / (1 + 1e-3) - 1e-6, balance
  # From the placement with the failure, the same loads move nothing.
  again = eplb_jax.rebalance(weight, topology, mode="refined", previous_phy2log=moved.phy2log)
  chex.assert_trees_all_equal(again.phy2log, moved.phy2log)
