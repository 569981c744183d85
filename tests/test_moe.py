"""The expert-parallel MoE layer, its logical reference, and the training examples.

The layer itself needs a mesh of 8 devices: those checks run in one subprocess
(``_sharded_checks.py moe``), which also trains the examples briefly.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _sharded_checks import CHECKS
from _sharded_checks import moe_mlp
from _sharded_checks import moe_problem
from _sharded_checks import run_checks

from eplb_jax.runtime import dispatch
from eplb_jax.runtime import moe


@pytest.mark.parametrize(
  ("tokens", "top_k", "num_replicas", "factor", "expected"),
  [
    (256, 2, 32, 1.0, 16),
    (256, 2, 32, 1.25, 20),
    (100, 2, 24, 1.0, 9),  # ceil(8.33)
    (16, 2, 16, 1.25, 3),  # ceil(2.5)
    (4, 8, 4, 2.0, 4),  # at most one pair per token and slot
    (16, 2, 16, None, 16),
  ],
)
def test_capacity(tokens, top_k, num_replicas, factor, expected):
  assert moe.capacity(tokens, top_k, num_replicas, factor) == expected


@pytest.mark.parametrize(
  "factor", [0, -1.0, "1.25", jnp.float32(1.0), np.inf, np.nan, True], ids=repr
)
def test_capacity_rejects_bad_factors(factor):
  with pytest.raises(ValueError, match="capacity_factor"):
    moe.capacity(16, 2, 16, factor)


def test_capacity_of_huge_factors_is_the_bound():
  assert moe.capacity(16, 2, 16, 1e308) == moe.capacity(16, 2, 16, 10**400) == 16


def test_top_k_routing():
  logits = jnp.asarray([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 0.0, 3.5]])
  gates, ids = moe.top_k_routing(logits, 2)
  np.testing.assert_array_equal(ids, [[1, 2], [3, 0]])
  chex.assert_trees_all_close(gates.sum(-1), jnp.ones(2))
  probs = jax.nn.softmax(logits)
  chex.assert_trees_all_close(gates[0, 0] / gates[0, 1], probs[0, 1] / probs[0, 2], rtol=1e-6)
  with pytest.raises(ValueError, match="top_k"):
    moe.top_k_routing(logits, 5)


def numpy_keep(ids, log2phy, logcnt, num_gpus, capacity):
  """Which (token, choice) pairs fit: per group of tokens, the first ``capacity`` per slot."""
  tokens, top_k = ids.shape
  groups = ids.reshape(num_gpus, tokens // num_gpus, top_k)
  slots = np.asarray(jax.vmap(lambda i: dispatch.physical_slots(log2phy, logcnt, i))(groups))
  keep = np.zeros(slots.shape, bool)
  routed = np.zeros((num_gpus, (log2phy >= 0).sum()), int)
  for g, t, k in np.ndindex(slots.shape):
    keep[g, t, k] = routed[g, slots[g, t, k]] < capacity
    routed[g, slots[g, t, k]] += 1
  return keep.reshape(ids.shape), routed


def test_reference_keeps_the_first_pairs_of_each_group_and_slot():
  logical, x, gates, ids, placement = moe_problem()
  capacity = moe.capacity(16, 2, 16, 1.0)
  reference = jax.jit(
    lambda *a: moe.moe_reference(*a[:3], a[3], moe_mlp, *a[4:], num_gpus=8, capacity_factor=1.0)
  )
  y, stats = reference(x, gates, ids, logical, placement.log2phy, placement.logcnt)
  keep, routed = numpy_keep(np.asarray(ids), placement.log2phy, placement.logcnt, 8, capacity)
  assert 0 < (~keep).sum() < keep.size
  np.testing.assert_array_equal(stats.routed, routed)
  np.testing.assert_array_equal(stats.dropped, np.maximum(routed - capacity, 0))
  np.testing.assert_array_equal(stats.gpu_tokens(), routed.sum(0).reshape(8, 2).sum(-1))
  w_in, w_out, x = (np.asarray(a, np.float64) for a in (logical["w_in"], logical["w_out"], x))
  outputs = np.maximum(np.einsum("td,edh->eth", x, w_in), 0) @ w_out  # [E, T, d]
  chosen = outputs[np.asarray(ids), np.arange(len(x))[:, None]]  # [T, k, d]
  expected = (np.where(keep, gates, 0)[..., None] * chosen).sum(1)
  chex.assert_trees_all_close(y, expected, rtol=1e-5, atol=1e-6)


def test_bad_shapes_raise():
  logical, x, gates, ids, placement = moe_problem()
  mesh = jax.make_mesh((1,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
  per_slot = jax.tree.map(lambda w: w[placement.phy2log], logical)
  maps = (placement.log2phy, placement.logcnt)

  def layer(x=x, gates=gates, ids=ids, weights=per_slot, axis="expert"):
    return moe.moe_layer(x, gates, ids, weights, moe_mlp, *maps, mesh=mesh, expert_axis=axis)

  for kwargs, message in (
    ({"x": x[None]}, "x must be"),
    ({"gates": gates[:-1]}, "gates must be"),
    ({"ids": ids[:, :1]}, "expert_ids must have the shape"),
    ({"ids": ids.astype(jnp.float32)}, "integer dtype"),
    ({"weights": {"w_in": per_slot["w_in"], "w_out": per_slot["w_out"][:-1]}}, "expert_params"),
    ({"axis": "x"}, "expert_axis"),
  ):
    with pytest.raises(ValueError, match=message):
      layer(**kwargs)
  with pytest.raises(ValueError, match="divisible by num_gpus"):
    moe.moe_reference(x, gates, ids, logical, moe_mlp, *maps, num_gpus=32)
  with pytest.raises(ValueError, match=r"expert_params leaves must be \[8, ...\]"):
    moe.moe_reference(x, gates, ids, per_slot, moe_mlp, *maps, num_gpus=8)


def _one_device_layer(x, gates, ids, weights, placement, **kwargs):
  mesh = jax.make_mesh((1,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
  maps = (placement.log2phy, placement.logcnt)
  return moe.moe_layer(x, gates, ids, weights, moe_mlp, *maps, mesh=mesh, **kwargs)


# Eager shard_map dispatches op by op (about 10 s here): the eager run is in the heavy tier.
@pytest.mark.parametrize(
  "jit", [pytest.param(False, marks=pytest.mark.heavy), True], ids=["eager", "jit"]
)
def test_zero_tokens(jit):
  logical, x, gates, ids, placement = moe_problem()
  per_slot = jax.tree.map(lambda w: w[placement.phy2log], logical)
  layer = jax.jit(_one_device_layer) if jit else _one_device_layer
  y, stats = layer(x[:0], gates[:0], ids[:0], per_slot, placement)
  chex.assert_trees_all_equal(y, jnp.zeros((0, x.shape[1]), x.dtype))
  zeros = jnp.zeros((1, placement.phy2log.shape[0]), jnp.int32)
  chex.assert_trees_all_equal(stats, moe.DispatchStats(zeros, zeros))
  maps = (placement.log2phy, placement.logcnt)
  reference = moe.moe_reference(x[:0], gates[:0], ids[:0], logical, moe_mlp, *maps, num_gpus=1)
  chex.assert_trees_all_equal((y, stats), reference)


def test_params_of_another_slot_count_raise():
  logical, x, gates, ids, placement = moe_problem()  # 16 slots
  for slots in (placement.phy2log[:8], jnp.concatenate([placement.phy2log] * 2)):
    per_slot = jax.tree.map(lambda w, s=slots: w[s], logical)
    with pytest.raises(ValueError, match=r"^expert_params leaves must be \[16, ...\]"):
      _one_device_layer(x, gates, ids, per_slot, placement)
    with pytest.raises(ValueError, match=r"^expert_params leaves must be \[16, ...\]"):
      jax.jit(_one_device_layer)(x, gates, ids, per_slot, placement)
  with pytest.raises(ValueError, match=r"^log2phy must be \[E, P - E \+ 1\]"):
    _one_device_layer(x, gates, ids, logical, placement._replace(log2phy=placement.log2phy[None]))


@pytest.fixture(scope="module")
def results() -> dict[str, str]:
  return run_checks("moe")


@pytest.mark.heavy
@pytest.mark.parametrize("name", CHECKS["moe"])
def test_on_eight_devices(results, name):
  result = results.get(name, f"check {name} did not run")
  if result.startswith("skipped: "):
    pytest.skip(result.removeprefix("skipped: "))
  assert result == "ok", result
