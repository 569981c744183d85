"""Sharded placement: each device of a mesh balances its own layers, with no communication.

The tests on an 8-device mesh are in the heavy tier; the argument checks on a
one-device mesh run by default.
"""

from __future__ import annotations

import contextlib

import chex
import jax
import numpy as np
import pytest
from conftest import auto_mesh
from conftest import collectives
from conftest import explicit_mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import eplb_jax
from eplb_jax import workloads
from eplb_jax._src import sharding

# (num_replicas, num_groups, num_nodes, num_gpus): hierarchical, then global.
HIERARCHICAL, GLOBAL = (24, 4, 2, 8), (20, 3, 2, 4)


def loads(num_layers=16, num_experts=16, seed=0):
  return workloads.skewed_loads(num_layers, num_experts, seed=seed)


def assert_sharded_like(outputs, mesh, layer_axis):
  expected = NamedSharding(mesh, P(layer_axis))
  for out in outputs:
    assert out.sharding.is_equivalent_to(expected, out.ndim), (out.sharding, expected)
    assert out.sharding.spec[0] == layer_axis, out.sharding.spec


# Compilation dominates the run time, so each mesh compiles one configuration.
@pytest.mark.heavy
@pytest.mark.parametrize(
  ("make_mesh", "shape", "names", "axis", "sizes", "mode"),
  [
    (auto_mesh, (8,), ("x",), "x", HIERARCHICAL, "refined"),
    (explicit_mesh, (8,), ("x",), "x", GLOBAL, "greedy"),
    (auto_mesh, (2, 4), ("a", "x"), "x", GLOBAL, "greedy"),
    (explicit_mesh, (2, 4), ("a", "x"), ("a", "x"), HIERARCHICAL, "refined"),
  ],
  ids=["auto-8", "explicit-8", "auto-2x4", "explicit-2x4-both-axes"],
)
def test_equal_to_unsharded_without_collectives(make_mesh, shape, names, axis, sizes, mode):
  weight = loads()
  expected = eplb_jax.rebalance_experts(weight, *sizes, mode=mode)
  mesh = make_mesh(shape, names)

  def fn(w):
    return eplb_jax.rebalance_experts(w, *sizes, mode=mode, mesh=mesh, layer_axis=axis)

  # Replicated and already-sharded inputs alike compile to device-local code.
  args = [weight]
  if sizes == HIERARCHICAL:
    args.append(jax.device_put(weight, NamedSharding(mesh, P(axis))))
  for arg in args:
    compiled = jax.jit(fn).lower(arg).compile()
    assert not collectives(compiled), (mesh, axis, collectives(compiled))
    got = compiled(arg)
    chex.assert_trees_all_equal(got, expected)
    assert_sharded_like(got, mesh, axis)
  if isinstance(axis, tuple):
    got = fn(weight)  # eagerly
    chex.assert_trees_all_equal(got, expected)
    assert_sharded_like(got, mesh, axis)


@pytest.mark.heavy
def test_migration_sharded_like_unsharded():
  mesh = auto_mesh((8,), ("x",))
  previous = eplb_jax.rebalance_experts(loads(seed=4), *HIERARCHICAL, mode="refined")[0]
  weight = loads(seed=5)
  expected = eplb_jax.rebalance_experts(
    weight, *HIERARCHICAL, mode="refined", previous_phy2log=previous
  )
  fn = jax.jit(
    lambda w, p: eplb_jax.rebalance_experts(
      *(w, *HIERARCHICAL), mode="refined", previous_phy2log=p, mesh=mesh, layer_axis="x"
    )
  )
  compiled = fn.lower(weight, previous).compile()
  assert not collectives(compiled), collectives(compiled)
  got = compiled(weight, previous)
  chex.assert_trees_all_equal(got, expected)
  assert_sharded_like(got, mesh, "x")


@pytest.mark.heavy
def test_no_retrace_with_new_loads():
  mesh = auto_mesh((8,), ("x",))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def fn(w):
    return eplb_jax.rebalance_experts(w, *HIERARCHICAL, mode="refined", mesh=mesh, layer_axis="x")

  for seed in range(3):
    weight = loads(seed=seed)
    expected = eplb_jax.rebalance_experts(weight, *HIERARCHICAL, mode="refined")
    chex.assert_trees_all_equal(fn(weight), expected)
  # Eager calls reuse one compiled program too.
  before = sharding.shard_layers._cache_size()
  for seed in range(3, 6):
    eplb_jax.rebalance_experts(
      loads(seed=seed), *HIERARCHICAL, mode="refined", mesh=mesh, layer_axis="x"
    )
  assert sharding.shard_layers._cache_size() <= before + 1, sharding.shard_layers._cache_size()


@pytest.mark.heavy
def test_sharded_weight_without_mesh():
  mesh = auto_mesh((8,), ("x",))
  weight = loads(seed=2)
  presharded = jax.device_put(weight, NamedSharding(mesh, P("x")))
  expected = eplb_jax.rebalance_experts(weight, *HIERARCHICAL, mode="refined")
  fn = jax.jit(lambda w: eplb_jax.rebalance_experts(w, *HIERARCHICAL, mode="refined"))
  chex.assert_trees_all_equal(fn(presharded), expected)
  got = eplb_jax.rebalance_experts(presharded, *HIERARCHICAL, mode="refined")
  chex.assert_trees_all_equal(got, expected)


@pytest.mark.heavy
@pytest.mark.parametrize("spec", [P("x"), P(None, "x")], ids=["layers", "experts"])
@pytest.mark.parametrize("in_context", [False, True], ids=["", "set_mesh"])
def test_explicit_sharded_loads(spec, in_context):
  """Loads typed with Explicit axes (make_mesh's default), with and without mesh= and set_mesh."""
  mesh = explicit_mesh((8,), ("x",))
  weight = loads(seed=6)
  expected = eplb_jax.rebalance_experts(weight, *GLOBAL, mode="greedy")
  jitted = jax.jit(lambda w: eplb_jax.rebalance_experts(w, *GLOBAL, mode="greedy"))
  arg = jax.device_put(weight, NamedSharding(mesh, spec))
  with jax.set_mesh(mesh) if in_context else contextlib.nullcontext():
    chex.assert_trees_all_equal(jitted(arg), expected)
    got = eplb_jax.rebalance_experts(arg, *GLOBAL, mode="greedy")
    chex.assert_trees_all_equal(got, expected)
    if spec == P("x"):  # balanced where the loads are
      assert_sharded_like(got, mesh, "x")
    got = eplb_jax.rebalance_experts(arg, *GLOBAL, mode="greedy", mesh=mesh, layer_axis="x")
    chex.assert_trees_all_equal(got, expected)


@pytest.mark.heavy
def test_zero_layers_on_a_mesh():
  mesh = explicit_mesh((8,), ("x",))
  weight = loads(seed=6)[:0]
  got = eplb_jax.rebalance_experts(weight, *GLOBAL, mode="greedy", mesh=mesh, layer_axis="x")
  assert [a.shape for a in got] == [(0, 20), (0, 16, 5), (0, 16)], got


@pytest.mark.heavy
@pytest.mark.parametrize(
  ("layer_axis", "message"),
  [
    ("y", "layer_axis"),
    (("a", "a"), "layer_axis"),
    ((), "layer_axis"),
    ("x", "divisible by the size of layer_axis"),
    (("a", "x"), "divisible by the size of layer_axis"),
  ],
)
def test_bad_mesh_axes(layer_axis, message):
  mesh = auto_mesh((2, 4), ("a", "x"))
  with pytest.raises(ValueError, match=message):
    eplb_jax.rebalance_experts(loads(num_layers=6), *HIERARCHICAL, mesh=mesh, layer_axis=layer_axis)


@pytest.mark.heavy
def test_six_layers_divide_a_two_device_axis():
  mesh = auto_mesh((2, 4), ("a", "x"))
  weight = loads(num_layers=6)
  got = eplb_jax.rebalance_experts(weight, *HIERARCHICAL, mesh=mesh, layer_axis="a")
  chex.assert_trees_all_equal(got, eplb_jax.rebalance_experts(weight, *HIERARCHICAL))


@pytest.mark.parametrize(
  "kwargs, num_replicas, message",
  [
    (dict(layer_axis="y"), 4, "layer_axis"),
    (dict(layer_axis=["x"]), 4, "layer_axis"),
    (dict(layer_axis=None), 4, "mesh must be given with layer_axis"),
    (dict(mesh=None), 4, "mesh must be"),
    (dict(mesh="mesh"), 4, "mesh must be"),
    (dict(), 3, "num_replicas"),
  ],
)
def test_bad_arguments(kwargs, num_replicas, message):
  kwargs = {"mesh": jax.make_mesh((1,), ("x",)), "layer_axis": "x", **kwargs}
  with pytest.raises(ValueError, match=message):
    eplb_jax.rebalance_experts(np.ones((2, 4), np.float32), num_replicas, 1, 1, 1, **kwargs)
