"""expert_location: every expert's replicas and each GPU's dispatch choice, on device."""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest

import eplb_jax

# 3 layers x 16 experts onto 24 slots, 4 groups, 2 nodes x 4 GPUs x 3 slots.
L, E, P, GROUPS, NODES, GPUS = 3, 16, 24, 4, 2, 8
SLOTS_PER_GPU, GPUS_PER_NODE = P // GPUS, GPUS // NODES
TOPOLOGY = eplb_jax.Topology(P, GROUPS, NODES, GPUS)


@pytest.fixture(scope="module")
def placement():
  rng = np.random.default_rng(0)
  weight = rng.gamma(0.7, 300.0, (L, E)) + 1
  return eplb_jax.rebalance(weight, TOPOLOGY)


@pytest.fixture(scope="module")
def location(placement):
  return eplb_jax.expert_location(placement, TOPOLOGY)


def test_fields(placement, location):
  phy2log = np.asarray(placement.phy2log)
  chex.assert_shape(list(location), [(L, P), (L, E, P - E + 1), (L, E), (L, GPUS, E)])
  for field in location:
    assert field.dtype == np.int32
  np.testing.assert_array_equal(location.physical_to_logical_map, phy2log)
  np.testing.assert_array_equal(location.logical_to_all_physical_map_num_valid, placement.logcnt)
  for layer in range(L):
    for expert in range(E):
      slots = np.flatnonzero(phy2log[layer] == expert)
      row = np.asarray(location.logical_to_all_physical_map[layer, expert])
      np.testing.assert_array_equal(row[: slots.size], slots)
      np.testing.assert_array_equal(row[slots.size :], -1)


def test_dispatch_prefers_gpu_then_node_and_spreads_the_rest(placement, location):
  phy2log = np.asarray(placement.phy2log)
  dispatch = np.asarray(location.logical_to_rank_dispatch_physical_map)
  for layer in range(L):
    for expert in range(E):
      slots = np.flatnonzero(phy2log[layer] == expert)
      chosen = dispatch[layer, :, expert]
      assert np.all(phy2log[layer, chosen] == expert)
      shared = {}  # (node or None, candidate replicas) -> the picks of the GPUs that share them
      for gpu in range(GPUS):
        local = slots[slots // SLOTS_PER_GPU == gpu]
        node = slots[slots // (SLOTS_PER_GPU * GPUS_PER_NODE) == gpu // GPUS_PER_NODE]
        if local.size:
          assert chosen[gpu] == local[0]
          continue
        candidates = tuple(node if node.size else slots)
        assert chosen[gpu] in candidates
        tier = gpu // GPUS_PER_NODE if node.size else None
        shared.setdefault((tier, candidates), []).append(chosen[gpu])
      for (_, candidates), picks in shared.items():
        uses = [picks.count(slot) for slot in candidates]
        assert max(uses) - min(uses) <= 1, (candidates, picks)


def test_jit_and_numpy_input(placement, location):
  jitted = jax.jit(eplb_jax.expert_location, static_argnums=1)(placement, TOPOLOGY)
  chex.assert_trees_all_equal(tuple(jitted), tuple(location))
  host = eplb_jax.Placement(*(np.asarray(field) for field in placement))
  chex.assert_trees_all_equal(tuple(eplb_jax.expert_location(host, TOPOLOGY)), tuple(location))


def test_one_node_spreads_over_all_replicas():
  # Expert 0 has 3 replicas, slots 0 and 1 on GPU 0, slot 2 on GPU 1; GPUs 2 and 3 share them.
  phy2log = np.array([[0, 0, 0, 1, 2, 3, 4, 5]])
  log2phy = np.full((1, 6, 3), -1)
  log2phy[0, 0] = [0, 1, 2]
  log2phy[0, 1:, 0] = [3, 4, 5, 6, 7]
  placement = eplb_jax.Placement(phy2log, log2phy, np.array([[3, 1, 1, 1, 1, 1]]))
  location = eplb_jax.expert_location(placement, eplb_jax.Topology(8, 1, 1, 4))
  np.testing.assert_array_equal(
    location.logical_to_rank_dispatch_physical_map[0, :, 0], [0, 2, 0, 1]
  )


@pytest.mark.parametrize(
  ("topology", "message"),
  [
    ((P, GROUPS, NODES, GPUS), "topology must be a Topology"),
    (
      eplb_jax.Topology(2 * P, GROUPS, NODES, GPUS),
      r"placement must have topology.num_replicas \(48\)",
    ),
  ],
  ids=["sizes", "other-slots"],
)
def test_bad_topology(placement, topology, message):
  with pytest.raises(ValueError, match=message):
    eplb_jax.expert_location(placement, topology)
