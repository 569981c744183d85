"""Applying a placement to stacked expert parameters."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _sharded_checks import CHECKS
from _sharded_checks import run_checks

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


@pytest.fixture(scope="module")
def results() -> dict[str, str]:
  return run_checks("params")


@pytest.mark.heavy
@pytest.mark.parametrize("name", CHECKS["params"])
def test_on_eight_devices(results, name):
  assert results.get(name) == "ok", results.get(name, f"check {name} did not run")
