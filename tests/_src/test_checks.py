"""Bad input: ValueError naming the argument, and the documented jit behaviour for bad loads."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eplb_jax

# DeepSeek's README configuration: 12 experts, 16 slots, 4 groups, 2 nodes, 8 GPUs.
SIZES = (16, 4, 2, 8)
WEIGHT = np.arange(24, dtype=np.float32).reshape(2, 12)


def _raises(name: str):
  """Expects a ValueError whose message starts with the argument's name."""
  return pytest.raises(ValueError, match=rf"^{name}\b")


@pytest.mark.parametrize(
  "weight",
  [np.ones(12, np.float32), np.ones((1, 2, 3, 12), np.float32), np.float32(1.0)],
  ids=["1d", "4d", "scalar"],  # 3-D is a window [steps, layers, experts]
)
def test_weight_not_2d(weight):
  with _raises("weight"):
    eplb_jax.rebalance_experts(weight, *SIZES)


@pytest.mark.parametrize(
  "weight",
  [
    np.ones((2, 12), np.bool_),
    np.ones((2, 12), np.complex64),
    np.full((2, 12), "1"),
    jnp.ones((2, 12), jnp.bool_),
  ],
  ids=["bool", "complex", "str", "jax-bool"],
)
def test_weight_non_numeric(weight):
  with _raises("weight"):
    eplb_jax.rebalance_experts(weight, *SIZES)


def test_too_few_replicas():
  with _raises("num_replicas"):
    eplb_jax.rebalance_experts(WEIGHT, 8, 4, 2, 8)


def test_replicas_not_multiple_of_gpus():
  with _raises("num_replicas"):
    eplb_jax.rebalance_experts(WEIGHT, 18, 4, 2, 8)


def test_gpus_not_multiple_of_nodes():
  with _raises("num_gpus"):
    eplb_jax.rebalance_experts(WEIGHT, 18, 4, 4, 6)


def test_groups_must_divide_experts_on_hierarchical_path():
  with _raises("num_groups"):
    eplb_jax.rebalance_experts(WEIGHT, 16, 8, 2, 8)
  # The global policy (num_groups % num_nodes != 0) ignores the groups.
  eplb_jax.rebalance_experts(WEIGHT, 16, 5, 2, 8)


@pytest.mark.parametrize("index", range(4))
@pytest.mark.parametrize("value", [0, -2])
def test_non_positive_sizes(index, value):
  sizes = list(SIZES)
  sizes[index] = value
  name = ("num_replicas", "num_groups", "num_nodes", "num_gpus")[index]
  with _raises(name):
    eplb_jax.rebalance_experts(WEIGHT, *sizes)


# Sizes beyond int32, the core's integer type: refused by Topology before any JAX call.
@pytest.mark.parametrize("index", range(4))
@pytest.mark.parametrize("value", [2**31, 2**32, 2**63, np.uint64(2**32)], ids=repr)
def test_sizes_beyond_int32(index, value):
  sizes = list(SIZES)
  sizes[index] = value
  name = ("num_replicas", "num_groups", "num_nodes", "num_gpus")[index]
  with _raises(name):
    eplb_jax.rebalance_experts(WEIGHT, *sizes)
  with _raises(name):
    eplb_jax.Topology(*sizes)


@pytest.mark.parametrize("value", [16.0, 2.5, "16", jnp.array(16.0), None], ids=repr)
def test_non_int_sizes(value):
  with _raises("num_replicas"):
    eplb_jax.rebalance_experts(WEIGHT, value, 4, 2, 8)


def test_traced_size():
  with _raises("num_replicas"):
    jax.jit(lambda n: eplb_jax.rebalance_experts(WEIGHT, n, 4, 2, 8))(16)


def test_numpy_int_sizes_are_accepted():
  chex.assert_trees_all_equal(
    eplb_jax.rebalance_experts(WEIGHT, *(np.int64(s) for s in SIZES)),
    eplb_jax.rebalance_experts(WEIGHT, *SIZES),
  )


@pytest.mark.parametrize("mode", ["fast", "Greedy", None])
def test_bad_mode(mode):
  with _raises("mode"):
    eplb_jax.rebalance_experts(WEIGHT, *SIZES, mode=mode)


def test_hierarchical_checks():
  with _raises("num_replicas"):
    eplb_jax.rebalance_experts_hierarchical(WEIGHT, 8, 4, 2, 8)
  with _raises("num_groups"):
    eplb_jax.rebalance_experts_hierarchical(WEIGHT, 16, 3, 2, 8)
  with _raises("num_groups"):
    eplb_jax.rebalance_experts_hierarchical(WEIGHT, 16, 8, 2, 8)


def test_balanced_packing_checks():
  with _raises("num_packs"):
    eplb_jax.balanced_packing(WEIGHT, 5)
  with _raises("num_packs"):
    eplb_jax.balanced_packing(WEIGHT, 0)
  with _raises("weight"):
    eplb_jax.balanced_packing(np.ones(12), 4)
  with _raises("mode"):
    eplb_jax.balanced_packing(WEIGHT, 4, mode="best")


def test_replicate_experts_checks():
  with _raises("num_replicas"):
    eplb_jax.replicate_experts(WEIGHT, 11)
  with _raises("num_replicas"):
    eplb_jax.replicate_experts(WEIGHT, 2.0)
  with _raises("weight"):
    eplb_jax.replicate_experts(np.ones((2, 12), np.bool_), 16)


BAD_LOADS = {"negative": -5.0, "nan": np.nan, "inf": np.inf, "-inf": -np.inf}


def _with_bad_loads(value: float) -> tuple[np.ndarray, np.ndarray]:
  """Random loads with a few entries set to ``value``, and the same loads with those set to 0."""
  rng = np.random.default_rng(0)
  weight = rng.uniform(1.0, 100.0, size=(2, 12)).astype(np.float32)
  bad = np.zeros(weight.shape, bool)
  bad[0, 3] = bad[1, [0, 7, 11]] = True
  return np.where(bad, np.float32(value), weight), np.where(bad, np.float32(0), weight)


@pytest.mark.parametrize("value", BAD_LOADS.values(), ids=BAD_LOADS.keys())
def test_bad_loads_raise_when_eager(value):
  weight, _ = _with_bad_loads(value)
  with _raises("weight"):
    eplb_jax.rebalance_experts(weight, *SIZES)
  with _raises("weight"):
    eplb_jax.rebalance_experts(jnp.asarray(weight), *SIZES)
  with _raises("weight"):
    eplb_jax.balanced_packing(weight, 4)
  with _raises("weight"):
    eplb_jax.replicate_experts(weight, 16)


# One jitted planner per mode, shared by the cases below (each compiles once).
JITTED = {
  mode: jax.jit(
    functools.partial(eplb_jax.rebalance_experts, mode=mode), static_argnums=(1, 2, 3, 4)
  )
  for mode in ("greedy", "refined")
}


@pytest.mark.parametrize("mode", JITTED)
@pytest.mark.parametrize("value", BAD_LOADS.values(), ids=BAD_LOADS.keys())
def test_bad_loads_count_as_zero_under_jit(value, mode, assert_valid_placement):
  weight, zeroed = _with_bad_loads(value)
  got = JITTED[mode](weight, *SIZES)
  assert_valid_placement(*got, num_experts=12, num_replicas=16, num_layers=2)
  chex.assert_trees_all_equal(got, eplb_jax.rebalance_experts(zeroed, *SIZES, mode=mode))
