"""sglang-jax's ExpertLocationMetadata fields from a placement, and SGLang's static dispatch map."""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest

import eplb_jax
from eplb_jax.contrib import sglang

# 2 nodes of 4 GPUs, 3 slots each; 16 experts.
L, E, P, GROUPS, NODES, GPUS = 2, 16, 24, 4, 2, 8
SLOTS_PER_GPU = P // GPUS


@pytest.fixture(scope="module")
def result() -> eplb_jax.Placement:
  rng = np.random.default_rng(0)
  weight = rng.gamma(0.5, 100.0, (L, E)).astype(np.float32)
  return eplb_jax.rebalance_experts(weight, P, GROUPS, NODES, GPUS)


@pytest.fixture(scope="module")
def placement(result) -> tuple[np.ndarray, np.ndarray]:
  return np.asarray(result.phy2log), np.asarray(result.logcnt)


def test_fields_match_the_placement(placement):
  phy2log, logcnt = placement
  fields = sglang.expert_location_metadata(phy2log, E, ep_size=GPUS, num_nodes=NODES)
  assert set(fields) == {
    "ep_dispatch_algorithm",
    "logical_to_rank_dispatch_physical_map",
    "logical_to_all_physical_map",
    "logical_to_all_physical_map_num_valid",
    "physical_to_logical_map",
    "num_physical_experts",
  }
  assert fields["ep_dispatch_algorithm"] == "static" and fields["num_physical_experts"] == P
  all_physical = fields["logical_to_all_physical_map"]
  chex.assert_shape(all_physical, (L, E, int(logcnt.max())))
  chex.assert_trees_all_equal(fields["logical_to_all_physical_map_num_valid"], logcnt)
  chex.assert_trees_all_equal(fields["physical_to_logical_map"], phy2log)
  for key in ("logical_to_rank_dispatch_physical_map", "logical_to_all_physical_map"):
    assert fields[key].dtype == np.int32
  for layer in range(L):
    for expert in range(E):
      slots = all_physical[layer, expert]
      valid = slots[: logcnt[layer, expert]]
      assert np.all(np.diff(valid) > 0)  # ascending, as both engines list them
      np.testing.assert_array_equal(phy2log[layer, valid], expert)
      assert np.all(slots[logcnt[layer, expert] :] == -1)


def test_first_dispatch_is_sglang_jax(placement):
  phy2log, _ = placement
  fields = sglang.expert_location_metadata(phy2log, E, ep_size=GPUS, dispatch="first")
  chex.assert_trees_all_equal(
    fields["logical_to_rank_dispatch_physical_map"], fields["logical_to_all_physical_map"][..., 0]
  )


def test_eplb_jax_dispatch_is_expert_locations_row(result):
  location = eplb_jax.expert_location(result, eplb_jax.Topology(P, GROUPS, NODES, GPUS))
  for rank in (0, GPUS - 1):
    fields = sglang.expert_location_metadata(
      result.phy2log, E, ep_size=GPUS, ep_rank=rank, num_nodes=NODES, dispatch="eplb_jax"
    )
    chex.assert_trees_all_equal(
      fields["logical_to_rank_dispatch_physical_map"],
      np.asarray(location.logical_to_rank_dispatch_physical_map[:, rank]),
    )


def test_as_jax(placement):
  phy2log, _ = placement
  fields = sglang.expert_location_metadata(phy2log, E, ep_size=GPUS, as_jax=True)
  for key, value in fields.items():
    if key.endswith("_map") or key.endswith("_valid"):
      assert isinstance(value, jax.Array) and value.dtype == np.int32, key


@pytest.mark.parametrize("collapse", [True, False])
def test_sglang_dispatch_prefers_gpu_then_node(placement, collapse):
  phy2log, _ = placement
  gpus_per_node = GPUS // NODES
  all_ranks = [
    sglang.sglang_dispatch_map(phy2log, E, GPUS, rank, num_nodes=NODES, collapse=collapse)
    for rank in range(GPUS)
  ]
  for layer in range(L):
    for expert in range(E):
      slots = np.flatnonzero(phy2log[layer] == expert)
      gpus = slots // SLOTS_PER_GPU
      nodes = gpus // gpus_per_node
      picks = []
      for rank, dispatch in enumerate(all_ranks):
        slot = dispatch[layer, expert]
        assert slot in slots
        if rank in gpus:
          assert slot == slots[gpus == rank][0]
        elif np.any(nodes == rank // gpus_per_node) and not np.all(nodes == rank // gpus_per_node):
          assert slot == slots[nodes == rank // gpus_per_node][0]
        else:
          picks.append(slot)
      # The ranks left share the replicas evenly when one computation draws for all of them;
      # with collapse each rank draws in its own computation (as in SGLang), so only roughly.
      if picks and not collapse:
        share = np.array([picks.count(slot) for slot in slots])
        assert share.max() - share.min() <= 1


def test_sglang_dispatch_is_deterministic_and_seeded(placement):
  phy2log, _ = placement
  once = sglang.sglang_dispatch_map(phy2log, E, GPUS, 3, num_nodes=NODES)
  chex.assert_trees_all_equal(
    once, sglang.sglang_dispatch_map(phy2log, E, GPUS, 3, num_nodes=NODES)
  )
  # Single-node: no same-node step, so more choices are drawn.
  seeds = {
    sglang.sglang_dispatch_map(phy2log, E, GPUS, 3, seed=seed).tobytes() for seed in range(4)
  }
  assert len(seeds) > 1


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(ep_size=5), "ep_size must divide"),
    (dict(ep_size=GPUS, num_nodes=3), "num_nodes must divide"),
    (dict(ep_size=0), "ep_size must be a positive int"),
    (dict(ep_size=GPUS, dispatch="random"), "dispatch"),
    (dict(ep_size=GPUS, ep_dispatch_algorithm="lp"), "ep_dispatch_algorithm"),
    (dict(ep_size=GPUS, ep_rank=GPUS, dispatch="eplb_jax"), "ep_rank"),
    (dict(ep_size=GPUS, ep_rank=1.0), "ep_rank must be an int"),
    (dict(ep_size=GPUS, ep_rank=1.0, dispatch="eplb_jax"), "ep_rank must be an int"),
    (dict(ep_size=GPUS, ep_rank=None), "ep_rank must be an int"),
  ],
)
def test_bad_arguments(placement, kwargs, message):
  phy2log, _ = placement
  with pytest.raises(ValueError, match=message):
    sglang.expert_location_metadata(phy2log, E, **kwargs)


def test_missing_expert_is_refused():
  phy2log = np.zeros((1, P), np.int64)
  with pytest.raises(ValueError, match="every logical expert"):
    sglang.expert_location_metadata(phy2log, E, ep_size=GPUS)
  with pytest.raises(ValueError, match="ep_rank"):
    sglang.sglang_dispatch_map(np.arange(P)[None] % E, E, GPUS, GPUS)
  with pytest.raises(ValueError, match="ep_rank must be an int"):
    sglang.sglang_dispatch_map(np.arange(P)[None] % E, E, GPUS, 1.0)
