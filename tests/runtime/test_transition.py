"""Moving to a new placement a few layers per step (runtime.params.transition_*)."""

from __future__ import annotations

import chex
import jax
import numpy as np
import optax
import pytest

import eplb_jax
from eplb_jax.runtime import params as expert_params

TOPOLOGY = eplb_jax.Topology(8, num_groups=1, num_nodes=1, num_gpus=2)
NUM_LAYERS, NUM_EXPERTS = 5, 6


def placements():
  rng = np.random.default_rng(0)
  old = eplb_jax.rebalance(rng.pareto(1.0, (NUM_LAYERS, NUM_EXPERTS)), TOPOLOGY)
  new = eplb_jax.rebalance(rng.pareto(1.0, (NUM_LAYERS, NUM_EXPERTS)), TOPOLOGY)
  return old, new


def logical():
  rng = np.random.default_rng(1)
  return {
    "w": rng.normal(size=(NUM_LAYERS, NUM_EXPERTS, 3, 2)).astype(np.float32),
    "b": rng.normal(size=(NUM_LAYERS, NUM_EXPERTS, 2)).astype(np.float32),
  }


@pytest.mark.parametrize("layers_per_step", [1, 2, 5, 7])
def test_each_layer_moves_once_and_serves_one_placement(layers_per_step):
  chex.clear_trace_counter()
  old, new = placements()
  weights = logical()
  params = expert_params.apply_placement(weights, old.phy2log)
  state = optax.adam(1e-3).init(params)
  transition = expert_params.transition_start(old, new)
  step = jax.jit(
    chex.assert_max_traces(expert_params.transition_step, n=1),
    static_argnames="layers_per_step",
  )
  for _ in range(-(-NUM_LAYERS // layers_per_step)):
    transition, params, state = step(transition, params, state, layers_per_step=layers_per_step)
    moved = np.arange(NUM_LAYERS) < int(transition.next_layer)
    for layer in range(NUM_LAYERS):
      expected = new if moved[layer] else old
      chex.assert_trees_all_equal(
        jax.tree.map(lambda x, i=layer: x[i], transition.service),
        jax.tree.map(lambda x, i=layer: x[i], expected),
      )
    # Every layer's slots hold the experts its service placement names.
    chex.assert_trees_all_equal(
      params, expert_params.apply_placement(weights, transition.service.phy2log)
    )
  assert int(transition.next_layer) == NUM_LAYERS
  chex.assert_trees_all_equal(transition.service, new)
  chex.assert_trees_all_equal(state, optax.adam(1e-3).init(params))  # zeros moved as zeros
  # Once done, a step changes nothing.
  again = step(transition, params, state, layers_per_step=layers_per_step)
  chex.assert_trees_all_equal(again[1], params)


def test_the_optimizer_state_moves_with_the_parameters():
  old, new = placements()
  params = expert_params.apply_placement(logical(), old.phy2log)
  state = {"mu": jax.tree.map(lambda x: 2.0 * x, params), "count": np.int32(3)}
  transition = expert_params.transition_start(old, new)
  for _ in range(3):
    transition, params, state = expert_params.transition_step(
      transition, params, state, layers_per_step=2
    )
  chex.assert_trees_all_equal(state["mu"], jax.tree.map(lambda x: 2.0 * x, params))
  assert state["count"] == 3


def test_bad_arguments():
  old, new = placements()
  params = expert_params.apply_placement(logical(), old.phy2log)
  transition = expert_params.transition_start(old, new)
  with pytest.raises(ValueError, match="layers_per_step"):
    expert_params.transition_step(transition, params, layers_per_step=0)
  with pytest.raises(ValueError, match=r"\[L, P, \.\.\.\]"):
    expert_params.transition_step(transition, {"w": np.zeros((5, 3))}, layers_per_step=1)
  other = eplb_jax.rebalance(np.ones((NUM_LAYERS, NUM_EXPERTS)), eplb_jax.Topology(12, 1, 1, 2))
  with pytest.raises(ValueError, match="target"):
    expert_params.transition_start(old, other)
