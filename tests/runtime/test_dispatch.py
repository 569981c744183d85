"""Replica-aware dispatch: physical slot per routed token, and back to logical experts."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eplb_jax
from eplb_jax import workloads
from eplb_jax.runtime import dispatch

NUM_EXPERTS, NUM_SLOTS = 8, 16


def placement(num_layers: int = 2, seed: int = 0):
  loads = workloads.skewed_loads(num_layers, NUM_EXPERTS, seed=seed)
  return eplb_jax.rebalance_experts(loads, NUM_SLOTS, 1, 1, 4)


def router_ids(shape, seed=0):
  """Top-k ids (distinct per token) skewed towards the low experts."""
  rng = np.random.default_rng(seed)
  p = np.exp(-0.4 * np.arange(NUM_EXPERTS))
  p /= p.sum()
  *batch, tokens, k = shape
  flat = [rng.choice(NUM_EXPERTS, size=k, replace=False, p=p) for _ in range(np.prod(shape[:-1]))]
  return np.asarray(flat, np.int32).reshape(shape)


def numpy_slots(log2phy, logcnt, ids):
  """Reference for one layer: the j-th assignment to e goes to replica j mod logcnt[e]."""
  seen = np.zeros(log2phy.shape[0], np.int64)
  out = np.full(ids.size, -1, np.int32)
  for i, expert in enumerate(ids.reshape(-1)):
    if 0 <= expert < log2phy.shape[0]:
      out[i] = log2phy[expert, seen[expert] % logcnt[expert]]
      seen[expert] += 1
  return out.reshape(ids.shape)


class PhysicalSlotsTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_reference_and_serves_the_chosen_expert(self):
    phy2log, log2phy, logcnt = placement()
    ids = router_ids((2, 64, 2))
    slots = self.variant(dispatch.physical_slots)(log2phy, logcnt, ids)
    chex.assert_type(slots, jnp.int32)
    for layer in range(2):
      expected = numpy_slots(np.asarray(log2phy[layer]), np.asarray(logcnt[layer]), ids[layer])
      chex.assert_trees_all_equal(slots[layer], expected)
    chex.assert_trees_all_equal(dispatch.logical_experts(phy2log, slots), ids)

  def test_spread_is_exactly_even(self):
    _, log2phy, logcnt = placement(num_layers=1)
    ids = router_ids((1, 300, 2), seed=1)
    slots = np.asarray(dispatch.physical_slots(log2phy, logcnt, ids))
    per_slot = np.bincount(slots.reshape(-1), minlength=NUM_SLOTS)
    per_expert = np.bincount(ids.reshape(-1), minlength=NUM_EXPERTS)
    assert (np.asarray(logcnt[0]) > 1).any()  # the test needs replicated experts
    for expert in range(NUM_EXPERTS):
      replicas = np.asarray(log2phy[0, expert, : logcnt[0, expert]])
      share = per_expert[expert] / len(replicas)
      assert set(per_slot[replicas]) <= {np.floor(share), np.ceil(share)}, expert

  def test_one_layer_equals_layered(self):
    _, log2phy, logcnt = placement()
    ids = router_ids((2, 40, 3), seed=2)
    layered = dispatch.physical_slots(log2phy, logcnt, ids)
    for layer in range(2):
      chex.assert_trees_all_equal(
        dispatch.physical_slots(log2phy[layer], logcnt[layer], ids[layer]), layered[layer]
      )

  def test_invalid_ids_get_no_slot(self):
    phy2log, log2phy, logcnt = placement(num_layers=1)
    ids = router_ids((1, 20, 2), seed=3)
    ids[0, ::3, 1] = -1
    ids[0, 1, 0] = NUM_EXPERTS
    slots = dispatch.physical_slots(log2phy, logcnt, ids)
    valid = (ids >= 0) & (ids < NUM_EXPERTS)
    chex.assert_trees_all_equal(slots[~valid], np.full((~valid).sum(), -1, np.int32))
    chex.assert_trees_all_equal(slots[0], numpy_slots(log2phy[0], logcnt[0], ids[0]))
    logical = dispatch.logical_experts(phy2log, slots)
    chex.assert_trees_all_equal(logical, np.where(valid, ids, -1).astype(np.int32))

  def test_no_retrace_for_new_ids_and_placements(self):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def route(log2phy, logcnt, ids):
      return dispatch.physical_slots(log2phy, logcnt, ids)

    for seed in range(3):
      _, log2phy, logcnt = placement(seed=seed)
      ids = router_ids((2, 32, 2), seed=seed)
      expected = numpy_slots(np.asarray(log2phy[1]), np.asarray(logcnt[1]), ids[1])
      chex.assert_trees_all_equal(route(log2phy, logcnt, ids)[1], expected)

  def test_bad_shapes(self):
    with pytest.raises(ValueError, match="log2phy"):
      dispatch.physical_slots(jnp.zeros(4, jnp.int32), jnp.ones(4, jnp.int32), jnp.zeros((2, 1)))
    with pytest.raises(ValueError, match="phy2log"):
      dispatch.logical_experts(jnp.zeros((1, 1, 4), jnp.int32), jnp.zeros((2, 1), jnp.int32))


# Quota dispatch. A hand-made layer on 3 GPUs of 4 slots: empty slots (-1), expert 0
# twice on GPU 0, expert 5 without a slot.
QUOTA_PHY2LOG = np.asarray([0, 0, 1, -1, 2, 3, 0, 4, 1, -1, 3, 2], np.int32)
QUOTA_EXPERTS, QUOTA_GPUS = 6, 3


def maps_of(phy2log, num_experts):
  """``log2phy [E, R]`` (replicas in slot order, -1 padded at the end) and ``logcnt [E]``."""
  width = phy2log.shape[-1] - num_experts + 1
  log2phy = np.full((num_experts, max(width, 1)), -1, np.int32)
  logcnt = np.zeros(num_experts, np.int32)
  for expert in range(num_experts):
    slots = np.flatnonzero(phy2log == expert)
    log2phy[expert, : len(slots)] = slots
    logcnt[expert] = len(slots)
  return log2phy, logcnt


def numpy_quota_slots(log2phy, quotas, ids, offsets=None, counts=None, device=None):
  """Reference for one layer: rank j of each assignment, then the replica whose cumulative
  quota first exceeds j, or replica j mod n beyond the expert's total quota."""
  num_experts = log2phy.shape[0]
  seen = np.zeros(num_experts, np.int64)
  out = np.full(ids.size, -1, np.int32)
  for pos, expert in enumerate(ids.reshape(-1)):
    if not 0 <= expert < num_experts:
      continue
    i = seen[expert]
    seen[expert] += 1
    if counts is not None:
      column = counts[:, expert]
      j = np.minimum(column, i).sum() + (column[:device] > i).sum()
    else:
      j = i + (0 if offsets is None else offsets[expert])
    replicas = [s for s in log2phy[expert] if s >= 0]
    if not replicas:
      continue
    cumulative = np.cumsum([quotas[s] if s < len(quotas) else 0 for s in replicas])
    if j < cumulative[-1]:
      out[pos] = replicas[int(np.argmax(cumulative > j))]
    else:
      out[pos] = replicas[j % len(replicas)]
  return out.reshape(ids.shape)


def random_ids(shape, num_experts, seed):
  """Ids in [-1, num_experts]: skewed, with a few out of range."""
  rng = np.random.default_rng(seed)
  p = np.exp(-0.5 * np.arange(num_experts + 2))
  return (rng.choice(num_experts + 2, size=shape, p=p / p.sum()) - 1).astype(np.int32)


def random_layer(seed, num_experts=QUOTA_EXPERTS, num_slots=12):
  """A random phy2log with empty slots and duplicates, and quotas some of which are zero."""
  rng = np.random.default_rng(seed)
  phy2log = rng.integers(-1, num_experts, num_slots).astype(np.int32)
  quotas = rng.integers(0, 6, num_slots) * (rng.random(num_slots) < 0.8)
  return phy2log, quotas.astype(np.int32)


class QuotaSlotsTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_reference(self):
    for seed in range(4):
      phy2log, quotas = random_layer(seed)
      log2phy, _ = maps_of(phy2log, QUOTA_EXPERTS)
      ids = random_ids((30, 2), QUOTA_EXPERTS, seed)
      offsets = np.random.default_rng(seed).integers(0, 8, QUOTA_EXPERTS).astype(np.int32)
      counts = np.random.default_rng(seed).integers(0, 20, (4, QUOTA_EXPERTS)).astype(np.int32)
      slots = self.variant(dispatch.quota_slots)(log2phy, quotas, ids)
      chex.assert_type(slots, jnp.int32)
      chex.assert_trees_all_equal(slots, numpy_quota_slots(log2phy, quotas, ids))
      slots = self.variant(functools.partial(dispatch.quota_slots, offsets=offsets))(
        log2phy, quotas, ids
      )
      chex.assert_trees_all_equal(slots, numpy_quota_slots(log2phy, quotas, ids, offsets))
      for device in (0, 2, 3):
        slots = self.variant(dispatch.quota_slots)(
          log2phy, quotas, ids, counts=counts, device=device
        )
        expected = numpy_quota_slots(log2phy, quotas, ids, counts=counts, device=device)
        chex.assert_trees_all_equal(slots, expected)

  def test_every_replica_takes_its_quota(self):
    phy2log = QUOTA_PHY2LOG
    log2phy, _ = maps_of(phy2log, QUOTA_EXPERTS)
    ids = random_ids((QUOTA_GPUS, 40, 2), QUOTA_EXPERTS, seed=5)  # 3 senders
    counts = np.stack([np.bincount(g[(g >= 0) & (g < QUOTA_EXPERTS)], minlength=6) for g in ids])
    quotas = np.asarray(eplb_jax.split_tokens(counts.sum(0)[None], phy2log[None], QUOTA_GPUS))[0]
    offsets = np.cumsum(counts, 0) - counts
    contiguous = jax.vmap(lambda i, o: dispatch.quota_slots(log2phy, quotas, i, offsets=o))(
      ids, offsets
    )
    interleaved = jax.vmap(
      lambda i, d: dispatch.quota_slots(log2phy, quotas, i, counts=counts, device=d)
    )(ids, jnp.arange(QUOTA_GPUS))
    for slots in (np.stack(contiguous), np.asarray(interleaved)):
      np.testing.assert_array_equal(np.bincount(slots[slots >= 0], minlength=12), quotas)
      np.testing.assert_array_equal(
        dispatch.logical_experts(phy2log, slots),
        np.where(
          (ids >= 0) & (ids < 5),
          ids,
          -1,  # expert 5 has no slot
        ),
      )
    # Duplicates of an expert on one GPU share its quota.
    assert abs(int(quotas[0]) - int(quotas[1])) <= 1, quotas

  def test_interleaved_senders_spread_like_the_even_split(self):
    # Senders with the same counts each take their 1 / G of every replica's quota, within one.
    phy2log = QUOTA_PHY2LOG
    log2phy, _ = maps_of(phy2log, QUOTA_EXPERTS)
    rng = np.random.default_rng(6)
    pairs = random_ids((60, 2), 5, seed=6)
    ids = np.stack([rng.permutation(pairs) for _ in range(QUOTA_GPUS)])
    counts = np.stack([np.bincount(g[g >= 0], minlength=6)[:6] for g in ids]).astype(np.int32)
    quotas = np.asarray(eplb_jax.split_tokens(counts.sum(0)[None], phy2log[None], QUOTA_GPUS))[0]
    for device in range(QUOTA_GPUS):
      slots = np.asarray(
        dispatch.quota_slots(log2phy, quotas, ids[device], counts=counts, device=device)
      )
      per_slot = np.bincount(slots[slots >= 0], minlength=12)
      assert np.all(np.abs(per_slot - quotas / QUOTA_GPUS) <= 1), (device, per_slot, quotas)

  def test_zero_quotas_are_the_even_split(self):
    _, log2phy, logcnt = placement()
    ids = router_ids((2, 50, 2), seed=7)
    zeros = jnp.zeros((2, NUM_SLOTS), jnp.int32)
    chex.assert_trees_all_equal(
      dispatch.quota_slots(log2phy, zeros, ids), dispatch.physical_slots(log2phy, logcnt, ids)
    )

  def test_layers_and_vmap(self):
    layers = [random_layer(seed) for seed in range(3)]
    phy2log, quotas = (np.stack(a) for a in zip(*layers, strict=True))
    log2phy = np.stack([maps_of(p, QUOTA_EXPERTS)[0] for p in phy2log])
    ids = random_ids((3, 25, 3), QUOTA_EXPERTS, seed=8)
    counts = np.random.default_rng(8).integers(0, 9, (3, 2, QUOTA_EXPERTS)).astype(np.int32)
    layered = dispatch.quota_slots(log2phy, quotas, ids, counts=counts, device=1)
    mapped = jax.jit(jax.vmap(lambda *a: dispatch.quota_slots(*a[:3], counts=a[3], device=1)))(
      log2phy, quotas, ids, counts
    )
    chex.assert_trees_all_equal(layered, mapped)
    for layer in range(3):
      expected = numpy_quota_slots(
        log2phy[layer], quotas[layer], ids[layer], counts=counts[layer], device=1
      )
      chex.assert_trees_all_equal(layered[layer], expected)

  def test_no_retrace_for_new_quotas(self):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def route(log2phy, quotas, ids, counts, device):
      return dispatch.quota_slots(log2phy, quotas, ids, counts=counts, device=device)

    log2phy, _ = maps_of(QUOTA_PHY2LOG, QUOTA_EXPERTS)
    for seed in range(3):
      _, quotas = random_layer(seed)
      ids = random_ids((20, 2), QUOTA_EXPERTS, seed)
      counts = np.random.default_rng(seed).integers(0, 20, (3, QUOTA_EXPERTS)).astype(np.int32)
      expected = numpy_quota_slots(log2phy, quotas, ids, counts=counts, device=seed)
      chex.assert_trees_all_equal(route(log2phy, quotas, ids, counts, seed), expected)

  def test_bad_arguments(self):
    log2phy, _ = maps_of(QUOTA_PHY2LOG, QUOTA_EXPERTS)
    quotas, ids = np.ones(12, np.int32), np.zeros((4, 2), np.int32)
    counts = np.ones((3, QUOTA_EXPERTS), np.int32)
    for kwargs, message in (
      ({"quotas": np.ones((2, 12), np.int32)}, "quotas must be"),
      ({"quotas": np.ones(12)}, "quotas must have an integer dtype"),
      ({"quotas": -quotas}, "quotas must be in"),
      ({"offsets": np.ones(5, np.int32)}, "offsets must have shape"),
      ({"offsets": np.full(6, -1)}, "offsets must be in"),
      ({"offsets": np.ones(6, np.int32), "counts": counts, "device": 0}, "not both"),
      ({"counts": counts}, "counts and device"),
      ({"device": 0}, "counts and device"),
      ({"counts": counts[0], "device": 0}, "counts must be"),
      ({"counts": counts, "device": 3}, "device must be in"),
      ({"counts": counts, "device": np.zeros(2, np.int32)}, "device must be a scalar"),
      ({"expert_ids": np.zeros((4, 2))}, "expert_ids must have an integer dtype"),
    ):
      args = {"log2phy": log2phy, "quotas": quotas, "expert_ids": ids, **kwargs}
      with pytest.raises(ValueError, match=message):
        dispatch.quota_slots(**args)
    with pytest.raises(ValueError, match="expert_ids must have the 2 layers"):
      dispatch.quota_slots(np.stack([log2phy] * 2), np.ones((2, 12), np.int32), ids[None])
