"""Per-step replication: spare slots filled for the step's counts, against exhaustive search."""

from __future__ import annotations

import itertools

import chex
import jax
import numpy as np
import pytest
from test_split import check_quotas
from test_split import lp_optimum
from test_split import random_case

import eplb_jax


def check_plan(plan, counts, phy2log, num_gpus: int, spare_slots: int) -> None:
  """The extended placement keeps the service slots, its copies are fetchable and new on
  their GPU, and its quotas are a valid, near-optimal split of it."""
  extended, quotas, source = map(np.asarray, plan)
  num_layers, num_slots = phy2log.shape
  per_gpu = num_slots // num_gpus
  assert extended.dtype == source.dtype == np.int32
  assert extended.shape == (num_layers, num_slots + num_gpus * spare_slots)
  assert source.shape == (num_layers, num_gpus * spare_slots)
  by_gpu = extended.reshape(num_layers, num_gpus, per_gpu + spare_slots)
  np.testing.assert_array_equal(by_gpu[:, :, :per_gpu].reshape(num_layers, -1), phy2log)
  copies = by_gpu[:, :, per_gpu:].reshape(num_layers, -1)
  np.testing.assert_array_equal(source < 0, copies < 0)
  for layer in range(num_layers):
    filled = copies[layer] >= 0
    # The source slot holds the copy's expert in the placement in service.
    np.testing.assert_array_equal(phy2log[layer][source[layer][filled]], copies[layer][filled])
    for gpu in range(num_gpus):
      row = by_gpu[layer, gpu]
      new = row[per_gpu:][row[per_gpu:] >= 0]
      assert not np.isin(new, row[:per_gpu]).any(), "a copy of an expert its GPU holds"
      assert len(set(new)) == len(new), "two copies of one expert on a GPU"
  check_quotas(quotas, counts, extended, num_gpus)


def heaviest(quotas, num_gpus: int) -> np.ndarray:
  quotas = np.asarray(quotas)
  return quotas.reshape(*quotas.shape[:-1], num_gpus, -1).sum(-1).max(-1)


# (GPUs, slots per GPU, experts, spare slots per GPU); each compiles its own programs.
SIZES = ((4, 3, 9, 1), pytest.param((8, 5, 42, 2), marks=pytest.mark.heavy), (1, 4, 3, 1))


@pytest.mark.parametrize("sizes", SIZES)
def test_random_plans_are_valid_and_never_heavier_than_the_split(sizes):
  num_gpus, per_gpu, num_experts, spare_slots = sizes
  rng = np.random.default_rng(sum(sizes))
  counts, phy2log, _ = random_case(rng, num_gpus, per_gpu, num_experts)
  plan = eplb_jax.plan_spare_slots(counts, phy2log, num_gpus, spare_slots=spare_slots)
  check_plan(plan, counts, phy2log, num_gpus, spare_slots)
  served = heaviest(eplb_jax.split_tokens(counts, phy2log, num_gpus), num_gpus)
  # The extended placement holds the served one: within the solver's tolerance and rounding.
  assert (heaviest(plan.quotas, num_gpus) <= served * 1.001 + per_gpu + spare_slots).all()


def exhaustive(counts: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> float:
  """The least heaviest GPU over every filling of one spare slot per GPU (one layer)."""
  per_gpu = phy2log.shape[0] // num_gpus
  by_gpu = phy2log.reshape(num_gpus, per_gpu)
  choices = [
    [-1, *(e for e in range(counts.shape[0]) if e not in by_gpu[g])] for g in range(num_gpus)
  ]
  best = np.inf
  for fill in itertools.product(*choices):
    extended = np.concatenate([by_gpu, np.array(fill)[:, None]], 1).reshape(-1)
    best = min(best, lp_optimum(counts, extended, num_gpus))
  return best


def test_greedy_filling_against_the_best_filling_on_small_steps():
  """One spare per GPU on 3 GPUs, one replica per expert in service, skewed steps: never
  lighter than the best of every possible filling (which would be an invalid split), and as
  light (plus the rounding) on most steps. The greedy is myopic: it can fill a slot that a
  chain of moves over existing replicas needed elsewhere (5% heavier on one step here)."""
  rng = np.random.default_rng(3)
  num_gpus, num_experts = 3, 6
  gaps = []
  for _ in range(12):
    phy2log = rng.permutation(num_experts)[None].astype(np.int32)
    counts = rng.multinomial(600, rng.dirichlet(np.full(num_experts, 0.5)))[None]
    plan = eplb_jax.plan_spare_slots(counts, phy2log, num_gpus)
    best = exhaustive(counts[0], phy2log[0], num_gpus)
    gaps.append(heaviest(plan.quotas, num_gpus)[0] / best)
    assert heaviest(plan.quotas, num_gpus)[0] >= best - 1e-6 * best
  exact = np.array(gaps) <= 1.0 + 3 / 200  # 3 slots per GPU round by under a token each
  assert exact.mean() >= 0.75, gaps


class PlanSpareSlotsTest(chex.TestCase):
  def test_docstring_example(self):
    plan = eplb_jax.plan_spare_slots(np.array([[90, 10, 10, 10]]), np.array([[0, 1, 2, 3]]), 2)
    chex.assert_trees_all_equal(
      tuple(plan),
      (np.array([[0, 1, -1, 2, 3, 0]]), np.array([[50, 10, 0, 10, 10, 40]]), np.array([[-1, 0]])),
    )

  def test_balanced_steps_leave_the_spares_empty(self):
    phy2log = np.arange(8, dtype=np.int32).reshape(1, 8)
    for counts in (np.zeros((1, 8), np.int32), np.full((1, 8), 100, np.int32)):
      plan = eplb_jax.plan_spare_slots(counts, phy2log, 4, spare_slots=2)
      assert (np.asarray(plan.source) == -1).all()
      np.testing.assert_array_equal(
        np.asarray(plan.quotas).reshape(4, 4)[:, :2].reshape(-1), counts[0]
      )

  def test_window_is_its_steps_and_traces_once_per_shape(self):
    rng = np.random.default_rng(0)
    counts, phy2log, _ = random_case(rng, 4, 3, 9)
    window = np.stack([counts, counts[::-1]])
    phy2log = np.broadcast_to(phy2log[:1], phy2log.shape)
    plan = jax.jit(chex.assert_max_traces(eplb_jax.plan_spare_slots, n=2), static_argnums=2)
    together = plan(window, phy2log, 4)
    for step in range(2):
      chex.assert_trees_all_equal(
        jax.tree.map(lambda x, s=step: x[s], together), plan(window[step], phy2log, 4)
      )

  @pytest.mark.heavy  # compiles the balancer and two plans
  def test_topology_and_placement_arguments(self):
    weight = np.random.default_rng(1).pareto(1.0, (2, 12)) * 100
    topology = eplb_jax.Topology(16, num_groups=1, num_nodes=2, num_gpus=4)
    placement = eplb_jax.rebalance(weight, topology)
    counts = weight.astype(np.int32)
    chex.assert_trees_all_equal(
      eplb_jax.plan_spare_slots(counts, placement, topology),
      eplb_jax.plan_spare_slots(counts, placement.phy2log, 4),
    )


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(spare_slots=0), "spare_slots"),
    (dict(spare_slots=1.5), "spare_slots"),
    (dict(tolerance=-1.0), "tolerance"),
  ],
)
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    eplb_jax.plan_spare_slots(np.ones((1, 4), np.int32), np.arange(4)[None], 2, **kwargs)
