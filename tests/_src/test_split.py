"""Per-step split: quotas of each expert's tokens over its replicas, against an LP optimum."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eplb_jax
from eplb_jax import workloads

optimize = pytest.importorskip("scipy.optimize")


def lp_optimum(counts: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> float:
  """The least heaviest GPU over fractional splits of one layer (HiGHS)."""
  num_slots, num_experts = phy2log.shape[0], counts.shape[0]
  gpu = np.arange(num_slots) // (num_slots // num_gpus)
  held = phy2log >= 0
  cost = np.zeros(num_slots + 1)
  cost[-1] = 1.0
  a_eq = np.zeros((num_experts, num_slots + 1))
  a_eq[phy2log[held], np.flatnonzero(held)] = 1.0
  a_ub = np.zeros((num_gpus, num_slots + 1))
  a_ub[gpu, np.arange(num_slots)] = 1.0
  a_ub[:, -1] = -1.0
  served = a_eq[:, :-1].any(1)  # an expert without a replica cannot be split
  bounds = [(0, None) if h else (0, 0) for h in held] + [(0, None)]
  result = optimize.linprog(
    cost, a_ub, np.zeros(num_gpus), a_eq[served], counts[served], bounds=bounds, method="highs"
  )
  assert result.status == 0, result.message
  return result.fun


def check_quotas(quotas, counts, phy2log, num_gpus: int, tolerance: float = 1e-3) -> None:
  """Valid quotas (the issue's rules) whose heaviest GPU is within the solver's guarantee."""
  quotas, counts, phy2log = map(np.asarray, (quotas, counts, phy2log))
  assert quotas.dtype == np.int32 and quotas.shape == phy2log.shape
  num_experts = counts.shape[-1]
  slots_per_gpu = phy2log.shape[-1] // num_gpus
  for layer in range(phy2log.shape[0]):
    q, c, p = quotas[layer], counts[layer], phy2log[layer]
    assert (q >= 0).all()
    assert (q[p < 0] == 0).all(), "an empty slot takes tokens"
    served = np.bincount(p[p >= 0], q[p >= 0], num_experts)
    held = np.bincount(p[p >= 0], minlength=num_experts) > 0
    np.testing.assert_array_equal(served[held], c[held])
    heaviest = q.reshape(num_gpus, slots_per_gpu).sum(1).max()
    optimum = lp_optimum(c, p, num_gpus)
    # Within the tolerance of the optimum, plus under one token per slot for the rounding.
    assert heaviest <= optimum * (1 + tolerance) + slots_per_gpu, (layer, heaviest, optimum)


# (GPUs, slots per GPU, experts): one GPU, one slot per GPU, more experts than slots, many
# copies; each compiles its own program, so the heavy tier takes half of them.
SIZES = (
  (1, 4, 3),
  (4, 3, 9),
  (8, 5, 42),
  pytest.param((4, 1, 4), marks=pytest.mark.heavy),
  pytest.param((16, 2, 20), marks=pytest.mark.heavy),
  pytest.param((3, 4, 14), marks=pytest.mark.heavy),
)


def random_case(rng: np.random.Generator, num_gpus: int, slots_per_gpu: int, num_experts: int):
  """16 random layers: placements with empty slots, copies on one GPU and experts left out,
  and counts from zero to thousands of tokens per GPU, with ties and zeros."""
  num_layers, num_slots = 16, num_gpus * slots_per_gpu
  phy2log = np.stack(
    [rng.permutation(np.arange(num_slots) % num_experts) for _ in range(num_layers)]
  )
  phy2log[: num_layers // 2] = rng.integers(0, num_experts, (num_layers // 2, num_slots))
  phy2log[rng.random(phy2log.shape) < 0.1] = -1
  counts = np.zeros((num_layers, num_experts), np.int64)
  for layer in range(num_layers):
    probs = rng.pareto(1.0, num_experts) + 1e-3
    tokens = int(rng.choice([0, 1, 7, 64 * num_gpus, 4096 * num_gpus]))
    counts[layer] = rng.multinomial(tokens, probs / probs.sum())
  counts[rng.random(counts.shape) < 0.1] = 0
  return counts.astype(np.int32), phy2log.astype(np.int32), num_gpus


@pytest.mark.parametrize("sizes", SIZES)
def test_random_placements_are_valid_and_near_optimal(sizes):
  counts, phy2log, num_gpus = random_case(np.random.default_rng(sum(sizes)), *sizes)
  check_quotas(eplb_jax.split_tokens(counts, phy2log, num_gpus), counts, phy2log, num_gpus)


class SplitTokensTest(chex.TestCase):
  def test_hand_example(self):
    # GPU 0 holds experts 0 and 1, GPU 1 experts 0 and 2: expert 0 evens the GPUs out.
    quotas = eplb_jax.split_tokens(np.array([[10, 0, 5]]), np.array([[0, 1, 0, 2]]), 2)
    chex.assert_trees_all_equal(quotas, np.array([[8, 0, 2, 5]], np.int32))

  def test_benchmark_shape_with_drifted_steps(self):
    shape = workloads.SHAPES["qwen3-30b-a3b"]
    window = workloads.skewed_loads(6, shape.num_experts, seed=3, sigma=1.5)
    placement = eplb_jax.rebalance(window, shape.topology, mode="greedy")
    rng = np.random.default_rng(1)
    drifted = window * rng.lognormal(0.0, 0.2, window.shape)
    counts = np.stack([rng.multinomial(8 * 4096, p / p.sum()) for p in drifted]).astype(np.int32)
    quotas = eplb_jax.split_tokens(counts, placement, shape.num_gpus)
    check_quotas(quotas, counts, placement.phy2log, shape.num_gpus)
    # Never heavier than the even split (each replica 1 / logcnt), up to the rounding.
    even_max = np.asarray(placement.gpu_loads(counts, shape.num_gpus)).max(-1)
    split_max = np.asarray(quotas).reshape(6, 16, -1).sum(-1).max(-1)
    assert (split_max <= even_max + 10).all()  # 10 slots per GPU
    assert split_max.mean() < 0.97 * even_max.mean()

  def test_one_replica_per_expert_is_the_identity(self):
    phy2log = np.array([[2, 0, 1, 3]])
    counts = np.array([[5, 6, 7, 8]])
    quotas = eplb_jax.split_tokens(counts, phy2log, 2)
    chex.assert_trees_all_equal(quotas, np.array([[7, 5, 6, 8]], np.int32))

  def test_copies_on_one_gpu_share_their_quota(self):
    # Expert 0 has two slots on GPU 0 and one on GPU 1.
    quotas = np.asarray(eplb_jax.split_tokens(np.array([[9, 0]]), np.array([[0, 0, 0, 1]]), 2))
    assert quotas[0, :2].sum() + quotas[0, 2] == 9
    assert abs(int(quotas[0, 0]) - int(quotas[0, 1])) <= 1
    assert quotas[0, :2].sum() in (4, 5)

  def test_window_splits_each_step(self):
    rng = np.random.default_rng(2)
    counts, phy2log, num_gpus = random_case(rng, 4, 3, 9)
    window = np.stack([counts, counts[::-1], np.zeros_like(counts)])
    quotas = eplb_jax.split_tokens(window, phy2log, num_gpus)
    chex.assert_shape(quotas, (3, *phy2log.shape))
    for step in range(3):
      chex.assert_trees_all_equal(
        quotas[step], eplb_jax.split_tokens(window[step], phy2log, num_gpus)
      )

  def test_a_row_does_not_depend_on_its_batch(self):
    # 12 experts on 16 slots: a placement holding every expert has at most 8 variables
    # (slots of experts held more than once); the second row, 8 experts twice each, has 16,
    # which sends the whole batch to the solver with one variable per slot.
    held = np.array([0, 1, 2, 3, 0, 4, 5, 6, 7, 8, 1, 9, 10, 11, 2, 3])
    twice = np.repeat(np.arange(8), 2)
    counts = np.random.default_rng(6).integers(0, 500, (2, 12)).astype(np.int32)
    together = eplb_jax.split_tokens(counts, np.stack([held, twice]), 4)
    chex.assert_trees_all_equal(together[0], eplb_jax.split_tokens(counts[:1], held[None], 4)[0])
    chex.assert_trees_all_equal(together[1], eplb_jax.split_tokens(counts[1:], twice[None], 4)[0])
    check_quotas(together, counts, np.stack([held, twice]), 4)

  def test_placement_and_topology_arguments(self):
    topology = eplb_jax.Topology(16, 1, 1, 4)
    placement = eplb_jax.rebalance(workloads.skewed_loads(2, 8), topology, mode="greedy")
    counts = np.random.default_rng(3).integers(0, 100, (2, 8)).astype(np.int32)
    chex.assert_trees_all_equal(
      eplb_jax.split_tokens(counts, placement, topology),
      eplb_jax.split_tokens(counts, placement.phy2log, 4),
    )

  def test_jit_does_not_retrace_and_sanitises(self):
    phy2log = np.array([[0, 1, 0, 2]], np.int32)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def split(counts):
      return eplb_jax.split_tokens(counts, phy2log, 2)

    for counts in ([[10, 0, 5]], [[3, 4, 5]], [[-4, 2, 1]]):
      quotas = split(jnp.asarray(counts, jnp.int32))
    # Under jit a negative count counts as 0.
    chex.assert_trees_all_equal(quotas, np.array([[0, 2, 0, 1]], np.int32))

  def test_zero_layers(self):
    quotas = eplb_jax.split_tokens(np.zeros((0, 4), np.int32), np.zeros((0, 8), np.int32), 2)
    chex.assert_shape(quotas, (0, 8))


class SplitProbabilitiesTest(chex.TestCase):
  def test_rows_follow_the_quotas_and_sum_to_one(self):
    topology = eplb_jax.Topology(16, 1, 1, 4)
    placement = eplb_jax.rebalance(workloads.skewed_loads(2, 8, seed=1), topology, mode="greedy")
    counts = np.random.default_rng(4).integers(0, 100, (2, 8)).astype(np.int32)
    counts[0, 3] = 0
    probs = np.asarray(eplb_jax.split_probabilities(counts, placement, topology))
    quotas = np.asarray(eplb_jax.split_tokens(counts, placement, topology))
    log2phy, logcnt = np.asarray(placement.log2phy), np.asarray(placement.logcnt)
    chex.assert_shape(probs, log2phy.shape)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    assert (probs[log2phy < 0] == 0).all()
    for layer in range(2):
      for expert in range(8):
        slots = log2phy[layer, expert, : logcnt[layer, expert]]
        if counts[layer, expert]:
          expected = quotas[layer, slots] / counts[layer, expert]
        else:  # no tokens this step: the even split
          expected = np.full(slots.shape, 1.0 / logcnt[layer, expert])
        np.testing.assert_allclose(probs[layer, expert, : slots.size], expected, rtol=1e-6)

  def test_phy2log_ranks_replicas_in_slot_order(self):
    probs = eplb_jax.split_probabilities(np.array([[10, 0, 5]]), np.array([[0, 1, 0, 2]]), 2)
    np.testing.assert_allclose(probs, [[[0.8, 0.2], [1.0, 0.0], [1.0, 0.0]]], rtol=1e-6)


@pytest.mark.parametrize(
  "call, match",
  [
    (lambda: eplb_jax.split_tokens(np.ones((1, 3)), np.zeros((1, 4), int), 2), "integer"),
    (lambda: eplb_jax.split_tokens(np.ones(3, int), np.zeros((1, 4), int), 2), "counts must"),
    (lambda: eplb_jax.split_tokens(np.ones((2, 3), int), np.zeros((1, 4), int), 2), "layers"),
    (lambda: eplb_jax.split_tokens(np.ones((1, 3), int), np.zeros((1, 4), int), 3), "divide"),
    (lambda: eplb_jax.split_tokens(-np.ones((1, 3), int), np.zeros((1, 4), int), 2), "negative"),
    (lambda: eplb_jax.split_tokens(np.ones((1, 3), int), np.full((1, 4), 3), 2), "phy2log entries"),
    (lambda: eplb_jax.split_tokens(np.ones((1, 3), int), np.zeros((1, 4), int), 0), "num_gpus"),
    (
      lambda: eplb_jax.split_tokens(np.ones((1, 3), int), np.zeros((1, 4), int), 2, tolerance=-1),
      "tolerance",
    ),
    (
      lambda: eplb_jax.split_tokens(np.ones((1, 3), int), np.zeros((1, 4), int), 2, max_steps=0),
      "max_steps",
    ),
    (
      lambda: eplb_jax.split_tokens(np.full((1, 3), 2**30), np.zeros((1, 4), int), 2),
      "2\\*\\*31",
    ),
  ],
)
def test_bad_arguments(call, match):
  with pytest.raises(ValueError, match=match):
    call()


class RebalanceForStepsTest(chex.TestCase):
  @pytest.mark.heavy  # compiles two balancers and a batched split
  def test_each_layer_is_the_candidate_with_the_lightest_steps(self):
    topology = eplb_jax.Topology(16, 1, 1, 4)
    rng = np.random.default_rng(5)
    probs = rng.lognormal(0.0, 1.5, (3, 8))
    counts = np.stack(
      [np.stack([rng.multinomial(256, p / p.sum()) for p in probs]) for _ in range(4)]
    ).astype(np.int32)
    modes = ("refined", "greedy")  # the faster compiles; the rule is the same for any modes
    chosen = eplb_jax.rebalance_for_steps(counts, topology, modes=modes)
    candidates = [eplb_jax.rebalance(counts, topology, mode=m) for m in modes]

    def heaviest(placement):  # [L]: mean over the steps of the split's heaviest GPU
      quotas = np.asarray(eplb_jax.split_tokens(counts, placement, topology))
      return quotas.reshape(4, 3, 4, 4).sum(-1).max(-1).mean(0)

    costs = np.stack([heaviest(c) for c in candidates])
    np.testing.assert_array_equal(heaviest(chosen), costs.min(0))
    for layer, best in enumerate(costs.argmin(0)):
      chex.assert_trees_all_equal(
        jax.tree.map(lambda a, layer=layer: a[layer], chosen),
        jax.tree.map(lambda a, layer=layer, best=best: a[layer], candidates[best]),
      )


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(counts=np.ones((2, 8), int)), "steps, layers, experts"),
    (dict(counts=np.ones((1, 2, 8))), "integer"),
    (dict(modes=()), "modes"),
    (dict(modes="greedy"), "modes"),
    (dict(modes=("fastest",)), "mode"),
    (dict(topology=(16, 1, 1, 4)), "topology"),
  ],
)
def test_rebalance_for_steps_bad_arguments(kwargs, match):
  arguments = dict(counts=np.ones((1, 2, 8), int), topology=eplb_jax.Topology(16, 1, 1, 4))
  arguments.update(kwargs)
  counts, topology = arguments.pop("counts"), arguments.pop("topology")
  with pytest.raises(ValueError, match=match):
    eplb_jax.rebalance_for_steps(counts, topology, **arguments)
