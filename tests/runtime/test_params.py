"""Applying a placement to stacked expert parameters; on an 8-device mesh in the heavy tier."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import auto_mesh
from conftest import collectives
from conftest import explicit_mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import eplb_jax
from eplb_jax import workloads
from eplb_jax.runtime import params


def stacked_params(num_layers: int, num_experts: int, seed: int = 0) -> dict:
  """A pytree of ``[L, E, ...]`` leaves of several ranks and dtypes."""
  rng = np.random.default_rng(seed)
  return {
    "w": rng.normal(size=(num_layers, num_experts, 3, 2)).astype(np.float32),
    "b": {"bias": rng.normal(size=(num_layers, num_experts)).astype(np.float32)},
    "id": np.arange(num_layers * num_experts, dtype=np.int32).reshape(num_layers, num_experts),
  }


def placement(num_layers: int = 3, seed: int = 0, num_experts: int = 8, num_slots: int = 12):
  """A random valid placement ``(phy2log [L, P], log2phy [L, E, P - E + 1])``."""
  rng = np.random.default_rng(seed)
  width = num_slots - num_experts + 1
  phy2log = np.empty((num_layers, num_slots), np.int32)
  log2phy = np.full((num_layers, num_experts, width), -1, np.int32)
  for layer in range(num_layers):
    extra = rng.integers(0, num_experts, num_slots - num_experts)
    phy2log[layer] = rng.permutation(np.concatenate([np.arange(num_experts), extra]))
    for expert in range(num_experts):
      slots = np.flatnonzero(phy2log[layer] == expert)
      log2phy[layer, expert, : len(slots)] = slots
  return jnp.asarray(phy2log), jnp.asarray(log2phy)


def numpy_gather(tree, phy2log):
  index = np.asarray(phy2log)

  def gather(leaf):
    return np.stack([leaf[layer][index[layer]] for layer in range(index.shape[0])])

  return jax.tree.map(gather, tree)


class ApplyPlacementTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_layered_matches_numpy(self):
    phy2log, _ = placement()
    logical = stacked_params(3, 8)
    out = self.variant(params.apply_placement)(logical, phy2log)
    chex.assert_trees_all_equal(out, numpy_gather(logical, phy2log))
    chex.assert_shape(out["w"], (3, 12, 3, 2))

  @chex.variants(with_jit=True, without_jit=True)
  def test_one_layer_matches_numpy(self):
    phy2log, _ = placement(num_layers=1)
    logical = jax.tree.map(lambda x: x[0], stacked_params(1, 8))
    out = self.variant(params.apply_placement)(logical, phy2log[0])
    chex.assert_trees_all_equal(out, jax.tree.map(lambda x: x[np.asarray(phy2log[0])], logical))

  @chex.variants(with_jit=True, without_jit=True)
  def test_relayout_equals_placing_logical_weights(self):
    old_phy2log, old_log2phy = placement(seed=0)
    new_phy2log, _ = placement(seed=1)
    assert not np.array_equal(old_phy2log, new_phy2log)
    logical = stacked_params(3, 8)
    per_slot = params.apply_placement(logical, old_phy2log)
    moved = self.variant(params.relayout)(per_slot, old_log2phy, new_phy2log)
    chex.assert_trees_all_equal(moved, params.apply_placement(logical, new_phy2log))

  def test_relayout_one_layer(self):
    old_phy2log, old_log2phy = placement(num_layers=1, seed=0)
    new_phy2log, _ = placement(num_layers=1, seed=1)
    logical = jax.tree.map(lambda x: x[0], stacked_params(1, 8))
    per_slot = params.apply_placement(logical, old_phy2log[0])
    moved = params.relayout(per_slot, old_log2phy[0], new_phy2log[0])
    chex.assert_trees_all_equal(moved, params.apply_placement(logical, new_phy2log[0]))

  def test_no_retrace_for_new_placements(self):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def fn(tree, phy2log):
      return params.apply_placement(tree, phy2log)

    logical = stacked_params(3, 8)
    for seed in range(3):
      phy2log, _ = placement(seed=seed)
      chex.assert_trees_all_equal(fn(logical, phy2log), numpy_gather(logical, phy2log))

  def test_bad_phy2log(self):
    with pytest.raises(ValueError, match="phy2log"):
      params.apply_placement(stacked_params(1, 8), jnp.zeros((1, 1, 12), jnp.int32))

  def test_mesh_of_one_device(self):
    mesh = jax.make_mesh((1,), ("expert",))
    phy2log, _ = placement()
    out = params.apply_placement(stacked_params(3, 8), phy2log, mesh=mesh)
    chex.assert_trees_all_equal(out, numpy_gather(stacked_params(3, 8), phy2log))
    with pytest.raises(ValueError, match="expert_axis"):
      params.apply_placement(stacked_params(3, 8), phy2log, mesh=mesh, expert_axis="experts")


class ReplicaGradientTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_sum_replicas_matches_numpy(self):
    phy2log, _ = placement()
    rng = np.random.default_rng(1)
    grads = {"w": rng.normal(size=(3, 12, 3, 2)), "b": rng.normal(size=(3, 12))}
    grads = jax.tree.map(lambda g: g.astype(np.float32), grads)
    out = self.variant(params.sum_replicas, static_argnums=2)(grads, phy2log, 8)
    index = np.asarray(phy2log)
    for layer in range(3):
      for slot in range(12):
        same = index[layer] == index[layer, slot]
        for name in grads:
          expected = np.asarray(grads[name])[layer][same].sum(0)
          np.testing.assert_allclose(out[name][layer, slot], expected, rtol=1e-6)

  def test_sum_replicas_one_layer_and_errors(self):
    phy2log, _ = placement(num_layers=1)
    grads = jnp.arange(12.0)
    out = params.sum_replicas(grads, phy2log[0], 8)
    totals = np.bincount(np.asarray(phy2log[0]), weights=np.arange(12.0), minlength=8)
    np.testing.assert_array_equal(out, totals[np.asarray(phy2log[0])])
    with pytest.raises(ValueError, match="num_experts"):
      params.sum_replicas(grads, phy2log[0], 0)
    with pytest.raises(ValueError, match="12 slots"):
      params.sum_replicas(jnp.arange(8.0), phy2log[0], 8)
    with pytest.raises(ValueError, match=r"phy2log must hold ids in \[0, 4\)"):
      params.sum_replicas(grads, phy2log[0], 4)


class RelayoutStateTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_adam_moments_move_with_their_parameters(self):
    optax = pytest.importorskip("optax")
    old_phy2log, old_log2phy = placement(seed=0)
    new_phy2log, _ = placement(seed=1)
    tree = stacked_params(3, 8)
    logical = {"w": tree["w"], "b": tree["b"]["bias"]}
    adam = optax.adam(0.1)

    def adam_state(experts):
      # One step with the parameters as gradients: moments differ per expert, and
      # are equal over an expert's replicas. The head is [L, P] too, but no expert.
      model = {"experts": experts, "head": jnp.ones((3, 12))}
      grads = {"experts": experts, "head": jnp.full((3, 12), 2.0)}
      return adam.update(grads, adam.init(model), model)[1]

    per_slot = params.apply_placement(logical, old_phy2log)
    state = adam_state(per_slot)
    moved = self.variant(params.relayout_state)(state, per_slot, old_log2phy, new_phy2log)
    logical_state = adam_state(logical)
    for field in ("mu", "nu"):
      chex.assert_trees_all_equal(
        getattr(moved[0], field)["experts"],
        params.apply_placement(getattr(logical_state[0], field)["experts"], new_phy2log),
      )
      chex.assert_trees_all_equal(
        getattr(moved[0], field)["head"], getattr(state[0], field)["head"]
      )
    chex.assert_trees_all_equal(moved[0].count, state[0].count)


def expert_params(num_layers, num_experts):
  size = num_layers * num_experts
  return {
    "w": jnp.arange(size * 6, dtype=jnp.float32).reshape(num_layers, num_experts, 2, 3),
    "b": jnp.arange(size, dtype=jnp.float32).reshape(num_layers, num_experts),
  }


@pytest.mark.heavy
@pytest.mark.parametrize("make_mesh", [auto_mesh, explicit_mesh], ids=["auto", "explicit"])
def test_placement_sharded_over_experts(make_mesh):
  # 2 layers, 16 experts on 24 slots over 8 GPUs.
  sizes = (24, 4, 2, 8)
  weight = workloads.skewed_loads(2, 16, seed=0)
  phy2log, log2phy, _ = eplb_jax.rebalance_experts(weight, *sizes)
  logical = expert_params(2, 16)
  expected = numpy_gather(logical, phy2log)
  mesh = make_mesh((8,), ("expert",))
  source = jax.device_put(logical, NamedSharding(mesh, P(None, "expert")))
  fn = jax.jit(lambda p, i: params.apply_placement(p, i, mesh=mesh))
  for out in (fn(source, phy2log), params.apply_placement(source, phy2log, mesh=mesh)):
    chex.assert_trees_all_equal(out, expected)
    for leaf in jax.tree.leaves(out):
      assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "expert")), leaf.ndim), (
        leaf.sharding
      )
  # The communication the docstring of eplb_jax.runtime.params states.
  found = collectives(fn.lower(source, phy2log).compile())
  assert found == ["all-gather"], found
  replicated = jax.device_put(logical, NamedSharding(mesh, P()))
  found = collectives(fn.lower(replicated, phy2log).compile())
  assert not found, found
  moved = jax.jit(lambda p: params.relayout(p, log2phy, phy2log, mesh=mesh))
  chex.assert_trees_all_equal(moved(fn(source, phy2log)), expected)


@pytest.mark.heavy
@pytest.mark.parametrize(
  ("axis", "message"), [("expert", "expert_axis"), ("e", r"number of slots \(20\)")]
)
def test_bad_expert_axis(axis, message):
  mesh = auto_mesh((8,), ("e",))
  phy2log = jnp.zeros((2, 20), jnp.int32)
  with pytest.raises(ValueError, match=message):
    params.apply_placement(expert_params(2, 16), phy2log, mesh=mesh, expert_axis=axis)
