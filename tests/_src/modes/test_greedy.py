"""mode="greedy" reproduces DeepSeek's greedy EPLB, checked against the NumPy oracle.

Each configuration compiles once; the seeds only change the loads. Tie-free
float loads and heavily tied small-integer loads must both match exactly: the
oracle and eplb_jax follow the same stable tie rules.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from conftest import CONFIGS
from conftest import loads

import eplb_jax
from eplb_jax._src import replication

SEEDS = range(3)
KINDS = ("float", "tied")


def _assert_same_placement(got, expected) -> None:
  """``phy2log`` and ``logcnt`` equal; ``log2phy`` equal as a set of slots per expert."""
  phy2log, log2phy, logcnt = (np.asarray(a) for a in got)
  ref_phy2log, ref_log2phy, ref_logcnt = expected
  chex.assert_trees_all_equal(
    (phy2log, logcnt), (ref_phy2log.astype(np.int32), ref_logcnt.astype(np.int32))
  )
  # The -1 padding sorts first, so the sorted rows compare the slot sets.
  chex.assert_trees_all_equal(
    np.sort(log2phy, axis=-1), np.sort(ref_log2phy, axis=-1).astype(np.int32)
  )


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_rebalance_experts(config):
  num_layers, num_experts, *sizes = config
  for kind in KINDS:
    for seed in SEEDS:
      weight = loads(kind, (num_layers, num_experts), seed)
      got = eplb_jax.rebalance_experts(weight, *sizes, mode="greedy")
      try:
        _assert_same_placement(got, reference.rebalance_experts(weight, *sizes))
      except AssertionError as error:
        raise AssertionError(f"{kind} loads, seed {seed}") from error


def test_deepseek_readme_example():
  weight = np.array(
    [
      [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
      [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
    ]
  )
  phy2log, log2phy, logcnt = eplb_jax.rebalance_experts(weight, 16, 4, 2, 8, mode="greedy")
  expected = np.array(
    [
      [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
      [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
    ],
    np.int32,
  )
  chex.assert_trees_all_equal(phy2log, expected)
  _assert_same_placement(
    (phy2log, log2phy, logcnt), reference.rebalance_experts(weight, 16, 4, 2, 8)
  )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["readme", "one-node", "deepseek-like"])
def test_rebalance_experts_hierarchical(name, kind):
  config = CONFIGS[name]
  num_layers, num_experts, *sizes = config
  for seed in SEEDS:
    weight = loads(kind, (num_layers, num_experts), seed)
    phy2log, phyrank, logcnt = eplb_jax.rebalance_experts_hierarchical(
      weight, *sizes, mode="greedy"
    )
    ref_phy2log, _, ref_logcnt = reference.rebalance_experts_hierarchical(weight, *sizes)
    chex.assert_trees_all_equal(
      (phy2log, logcnt), (ref_phy2log.astype(np.int32), ref_logcnt.astype(np.int32))
    )
    # Replicas of one expert are interchangeable: each expert's ranks are 0 .. logcnt - 1.
    phy2log, phyrank, logcnt = (np.asarray(a) for a in (phy2log, phyrank, logcnt))
    for layer in range(num_layers):
      order = np.lexsort((phyrank[layer], phy2log[layer]))
      expected = np.concatenate([np.arange(c) for c in logcnt[layer]])
      np.testing.assert_array_equal(phyrank[layer][order], expected)


# (rows, items, num_packs)
PACKING_SHAPES = [(3, 12, 4), (2, 8, 8), (2, 6, 1), (4, 20, 5), (1, 32, 2)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", PACKING_SHAPES, ids=str)
def test_balanced_packing(shape, kind):
  rows, items, num_packs = shape
  for seed in SEEDS:
    weight = loads(kind, (rows, items), seed)
    got = eplb_jax.balanced_packing(weight, num_packs, mode="greedy")
    expected = reference.balanced_packing(weight, num_packs)
    chex.assert_trees_all_equal(got, tuple(a.astype(np.int32) for a in expected))


# (rows, num_log, num_replicas)
REPLICATION_SHAPES = [(3, 8, 12), (2, 5, 5), (4, 6, 20), (1, 1, 4), (2, 16, 40)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", REPLICATION_SHAPES, ids=str)
def test_replicate_experts(shape, kind):
  rows, num_log, num_replicas = shape
  for seed in SEEDS:
    weight = loads(kind, (rows, num_log), seed)
    got = eplb_jax.replicate_experts(weight, num_replicas)
    expected = reference.replicate_experts(weight, num_replicas)
    chex.assert_trees_all_equal(got, tuple(a.astype(np.int32) for a in expected))


@pytest.mark.parametrize("picks", ["_picks_top_k", "_picks_loop", "_picks_bisection"])
@pytest.mark.parametrize("shape", [(4, 3, 52), (6, 40, 100), (3, 64, 72)], ids=str)
def test_every_replication_algorithm(shape, picks):
  """Every way to find the greedy's picks (top_k on accelerators; on CPU the
  loop for few picks, bisection for many) matches the oracle, on ties across
  experts too: with loads 2, 3, 4 the candidates 2/14, 3/21 and 4/28 are
  equal floats."""
  rows, num_log, num_replicas = shape
  rng = np.random.default_rng(num_log)
  weight = rng.integers(0, 5, size=(rows, num_log)).astype(np.float32)
  weight[0, :3] = [2, 3, 4]
  weight[1] = 0
  find = jax.jit(
    jax.vmap(functools.partial(getattr(replication, picks), num_redundant=num_replicas - num_log))
  )
  expert, rank = find(jnp.asarray(weight))
  phy2log, phyrank, _ = reference.replicate_experts(weight, num_replicas)
  np.testing.assert_array_equal(expert, phy2log[:, num_log:])
  np.testing.assert_array_equal(rank, phyrank[:, num_log:])
