"""jit behaviour: same results with and without jit, inside larger jitted code, no retraces."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import eplb_jax

# DeepSeek's README configuration: 12 experts, 16 slots, 4 groups, 2 nodes, 8 GPUs.
SIZES = (16, 4, 2, 8)
# A global-policy configuration (3 groups do not split over 2 nodes).
GLOBAL_SIZES = (16, 3, 2, 4)


def _loads(seed: int, num_layers: int = 2) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.uniform(0.0, 1000.0, size=(num_layers, 12)).astype(np.float32)


class VariantsTest(chex.TestCase):
  """``rebalance_experts`` gives the same maps eagerly and under ``jax.jit``."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(mode=("greedy", "refined"), sizes=(SIZES, GLOBAL_SIZES))
  def test_rebalance_experts(self, mode, sizes):
    num_replicas, num_groups, num_nodes, num_gpus = sizes
    plan = self.variant(
      functools.partial(
        eplb_jax.rebalance_experts,
        num_replicas=num_replicas,
        num_groups=num_groups,
        num_nodes=num_nodes,
        num_gpus=num_gpus,
        mode=mode,
      )
    )
    weight = _loads(0)
    got = plan(weight)
    chex.assert_trees_all_equal(got, eplb_jax.rebalance_experts(weight, *sizes, mode=mode))
    chex.assert_type(got, jnp.int32)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("greedy", "refined")
  def test_balanced_packing(self, mode):
    weight = _loads(1)
    pack = self.variant(functools.partial(eplb_jax.balanced_packing, num_packs=4, mode=mode))
    chex.assert_trees_all_equal(pack(weight), eplb_jax.balanced_packing(weight, 4, mode=mode))

  @chex.variants(with_jit=True, without_jit=True)
  def test_replicate_experts(self):
    weight = _loads(1)
    replicate = self.variant(functools.partial(eplb_jax.replicate_experts, num_replicas=20))
    chex.assert_trees_all_equal(replicate(weight), eplb_jax.replicate_experts(weight, 20))

  @chex.variants(with_jit=True, without_jit=True)
  def test_rebalance_experts_hierarchical(self):
    # Greedy only: the refined pipeline is the one test_rebalance_experts jits.
    weight = _loads(1)
    hierarchical = self.variant(
      functools.partial(
        eplb_jax.rebalance_experts_hierarchical,
        num_replicas=16,
        num_groups=4,
        num_nodes=2,
        num_gpus=8,
        mode="greedy",
      )
    )
    chex.assert_trees_all_equal(
      hierarchical(weight),
      eplb_jax.rebalance_experts_hierarchical(weight, *SIZES, mode="greedy"),
    )


@pytest.mark.parametrize("mode", ["greedy", "refined"])
def test_inside_a_larger_jitted_function(mode):
  def step(weight):
    phy2log, log2phy, logcnt = eplb_jax.rebalance_experts(weight * 2, *SIZES, mode=mode)
    return phy2log.sum() + log2phy.max() + logcnt[0, 0], phy2log

  weight = _loads(2)
  total, phy2log = jax.jit(step)(jnp.asarray(weight))
  expected, _, _ = eplb_jax.rebalance_experts(weight * 2, *SIZES, mode=mode)
  chex.assert_trees_all_equal(phy2log, expected)
  # Every slot of 16 holds one of 12 experts: phy2log sums to more than 0.
  assert int(total) > 0


@pytest.mark.parametrize("mode", ["greedy", "refined"])
def test_new_loads_do_not_retrace(mode):
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def plan(weight):
    return eplb_jax.rebalance_experts(weight, *SIZES, mode=mode)

  results = [plan(jnp.asarray(_loads(seed))) for seed in range(4)]
  results.append(plan(jnp.zeros((2, 12), jnp.float32)))
  # The loads differ, so at least one placement differs from the first.
  assert any(not np.array_equal(r[0], results[0][0]) for r in results[1:])


def test_assert_max_traces_catches_a_retrace():
  """Guards the test above: a new shape retraces, and the counter notices."""
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def plan(weight):
    return eplb_jax.rebalance_experts(weight, *SIZES, mode="greedy")

  plan(jnp.asarray(_loads(0)))
  with pytest.raises(AssertionError):
    plan(jnp.asarray(_loads(0, num_layers=3)))


# Loads of each supported kind: numpy and jax arrays, integer and float dtypes.
CASTS = {
  "jax-int32": lambda w: jnp.asarray(w, jnp.int32),
  "jax-float32": lambda w: jnp.asarray(w, jnp.float32),
  "numpy-int64": lambda w: w.astype(np.int64),
  "numpy-int32": lambda w: w.astype(np.int32),
  "numpy-uint8": lambda w: w.astype(np.uint8),
  "numpy-float64": lambda w: w.astype(np.float64),
}


@pytest.mark.parametrize(
  "cast",
  [
    *CASTS.values(),
    lambda w: jnp.asarray(w, jnp.bfloat16),
  ],
  ids=[*CASTS, "jax-bfloat16"],
)
def test_input_dtypes(cast):
  # Small integers, exact in every dtype above.
  weight = np.random.default_rng(3).integers(0, 200, size=(2, 12))
  got = eplb_jax.rebalance_experts(cast(weight), *SIZES)
  chex.assert_type(got, jnp.int32)
  chex.assert_trees_all_equal(got, eplb_jax.rebalance_experts(weight.astype(np.float32), *SIZES))
