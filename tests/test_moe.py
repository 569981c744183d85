"""The expert-parallel MoE layer, its logical reference, and the training examples.

The layer itself needs a mesh of 8 devices: those checks run in one subprocess
(``_sharded_checks.py moe``), which also trains the examples briefly.
"""

from __future__ import annotations

import functools
import itertools

import chex
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _sharded_checks import CHECKS
from _sharded_checks import moe_mlp
from _sharded_checks import moe_problem
from _sharded_checks import run_checks
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import eplb_jax
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


@pytest.mark.heavy  # about 12 s of compiles; the one-device layer check stays in the default run
def test_balanced_reference_routes_by_the_split():
  # Groups of tokens as 8 devices hold them: together they give every slot its quota of the
  # step's split, each group its interleaved share, and drops are per group and slot.
  logical, x, gates, ids, placement = moe_problem()
  capacity = moe.capacity(16, 2, 16, 1.0)
  maps = (placement.log2phy, placement.logcnt)
  reference = jax.jit(
    lambda *a, **kw: moe.moe_reference(*a[:3], a[3], moe_mlp, *a[4:], num_gpus=8, **kw),
    static_argnames=("capacity_factor", "split"),
  )
  y, stats = reference(x, gates, ids, logical, *maps, capacity_factor=1.0, split="balanced")
  counts = np.bincount(np.asarray(ids).ravel(), minlength=8)
  quotas = np.asarray(eplb_jax.split_tokens(counts[None], placement.phy2log[None], 8))[0]
  np.testing.assert_array_equal(stats.routed.sum(0), quotas)
  np.testing.assert_array_equal(stats.gpu_tokens(), quotas.reshape(8, 2).sum(-1))
  groups = np.asarray(ids).reshape(8, 16, 2)
  per_group = np.stack([np.bincount(g.ravel(), minlength=8) for g in groups])
  slots = jax.vmap(
    lambda i, d: dispatch.quota_slots(placement.log2phy, quotas, i, counts=per_group, device=d)
  )(groups, jnp.arange(8))
  routed = np.stack([np.bincount(s.ravel(), minlength=16) for s in np.asarray(slots)])
  np.testing.assert_array_equal(stats.routed, routed)
  np.testing.assert_array_equal(stats.dropped, np.maximum(routed - capacity, 0))
  assert stats.dropped.sum() > 0
  # The even split balances the GPUs less well on this step.
  even_y, even = reference(x, gates, ids, logical, *maps, capacity_factor=None, split="even")
  assert stats.gpu_tokens().max() < even.gpu_tokens().max(), (stats.gpu_tokens(), even)
  # Dropless, the split changes no output.
  dropless, _ = reference(x, gates, ids, logical, *maps, capacity_factor=None, split="balanced")
  chex.assert_trees_all_close(dropless, even_y, rtol=1e-6, atol=1e-7)
  assert not np.allclose(y, even_y)


def test_balanced_layer_on_one_device_equals_reference():
  capacity_factor = 1.0
  logical, x, gates, ids, placement = moe_problem()
  mesh = jax.make_mesh((1,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
  per_slot = jax.tree.map(lambda w: w[placement.phy2log], logical)
  maps = (placement.log2phy, placement.logcnt)
  kwargs = {"capacity_factor": capacity_factor, "split": "balanced"}
  y, stats = jax.jit(lambda *a: moe.moe_layer(*a[:3], a[3], moe_mlp, *a[4:], mesh=mesh, **kwargs))(
    x, gates, ids, per_slot, *maps
  )
  ref, ref_stats = jax.jit(
    lambda *a: moe.moe_reference(*a[:3], a[3], moe_mlp, *a[4:], num_gpus=1, **kwargs)
  )(x, gates, ids, logical, *maps)
  chex.assert_trees_all_equal(stats, ref_stats)
  chex.assert_trees_all_close(y, ref, rtol=1e-5, atol=1e-6)
  assert int(stats.dropped.sum()) > 0


def test_even_split_is_the_default():
  logical, x, gates, ids, placement = moe_problem()
  maps = (placement.log2phy, placement.logcnt)
  default = moe.moe_reference(x, gates, ids, logical, moe_mlp, *maps, num_gpus=8)
  even = moe.moe_reference(x, gates, ids, logical, moe_mlp, *maps, num_gpus=8, split="even")
  chex.assert_trees_all_equal(default, even)


@pytest.mark.parametrize("split", ["lp", "Even", None, ("even",)])
def test_bad_split_raises(split):
  logical, x, gates, ids, placement = moe_problem()
  mesh = jax.make_mesh((1,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
  per_slot = jax.tree.map(lambda w: w[placement.phy2log], logical)
  maps = (placement.log2phy, placement.logcnt)
  with pytest.raises(ValueError, match="split must be one of"):
    moe.moe_layer(x, gates, ids, per_slot, moe_mlp, *maps, mesh=mesh, split=split)
  with pytest.raises(ValueError, match="split must be one of"):
    moe.moe_reference(x, gates, ids, logical, moe_mlp, *maps, num_gpus=8, split=split)


@pytest.mark.parametrize("split", moe.SPLITS)
def test_dispatch_stats_are_the_reference_stats(split):
  logical, x, gates, ids, placement = moe_problem()
  maps = (placement.log2phy, placement.logcnt)
  kwargs = {"num_gpus": 8, "capacity_factor": 1.0, "split": split}
  reference = functools.partial(moe.moe_reference, expert_fn=moe_mlp, **kwargs)
  _, expected = jax.jit(reference)(x, gates, ids, logical, log2phy=maps[0], logcnt=maps[1])
  stats = jax.jit(functools.partial(moe.dispatch_stats, **kwargs))(ids, *maps)
  assert int(expected.dropped.sum()) > 0
  chex.assert_trees_all_equal(stats, expected)


def test_dispatch_stats_bad_arguments():
  _, _, _, ids, placement = moe_problem()
  maps = (placement.log2phy, placement.logcnt)
  for args, kwargs, message in (
    ((ids[:-1], *maps), {"num_gpus": 8}, "number of tokens"),
    ((ids, *maps), {"num_gpus": 32}, "number of slots"),
    ((ids.astype(jnp.float32), *maps), {"num_gpus": 8}, "expert_ids must be"),
    ((ids, placement.log2phy[None], placement.logcnt), {"num_gpus": 8}, "log2phy must be"),
    ((ids, *maps), {"num_gpus": 8, "split": "lp"}, "split must be"),
    ((ids, *maps), {"num_gpus": 0}, "num_gpus"),
  ):
    with pytest.raises(ValueError, match=message):
      moe.dispatch_stats(*args, **kwargs)


@pytest.mark.parametrize(
  ("tokens", "top_k", "num_gpus", "factor", "expected"),
  [
    (16, 2, 8, 1.0, 32),
    (16, 2, 8, 1.25, 40),
    (10, 3, 4, 1.1, 33),  # ceil(33.000000000000004)
    (4, 2, 2, 5.0, 16),  # at most every pair of the step
    (16, 2, 8, None, 256),
  ],
)
def test_device_capacity(tokens, top_k, num_gpus, factor, expected):
  assert moe.device_capacity(tokens, top_k, num_gpus, factor) == expected


def test_device_capacity_rejects_bad_factors():
  with pytest.raises(ValueError, match="capacity_factor"):
    moe.device_capacity(16, 2, 8, 0.0)


def numpy_device_kept(routed, capacity):
  """The per-device rule pair by pair: each level in turn, every stream still longer than the
  level keeps one more pair, streams into a device in (slot, sender) order, until full."""
  num_gpus, num_replicas = routed.shape
  kept = np.zeros_like(routed)
  for device in range(num_gpus):
    slots = range(device * num_replicas // num_gpus, (device + 1) * num_replicas // num_gpus)
    room = capacity
    for level in range(routed.max()):
      for slot, sender in itertools.product(slots, range(num_gpus)):
        if room and routed[sender, slot] > level:
          kept[sender, slot] += 1
          room -= 1
  return kept


@hypothesis.settings(deadline=None, max_examples=40)
@hypothesis.given(
  routed=hnp.arrays(np.int32, (4, 8), elements=st.integers(0, 9)),
  capacity=st.integers(0, 80),
)
def test_device_kept_pairs_fill_level_by_level(routed, capacity):
  kept = np.asarray(jax.jit(moe.kept_pairs, static_argnums=(1, 2))(routed, capacity, "device"))
  np.testing.assert_array_equal(kept, numpy_device_kept(routed, capacity))
  # Properties: streams keep at most their pairs, devices min(their pairs, capacity).
  assert np.all((0 <= kept) & (kept <= routed))
  loads = routed.sum(0).reshape(4, 2).sum(-1)
  np.testing.assert_array_equal(kept.sum(0).reshape(4, 2).sum(-1), np.minimum(loads, capacity))


def test_slot_kept_pairs_are_the_capacity_per_stream():
  routed = np.arange(12, dtype=np.int32).reshape(2, 6)
  np.testing.assert_array_equal(moe.kept_pairs(routed, 4), np.minimum(routed, 4))
  for args, message in (((routed, 4, "gpu"), "capacity_per"), ((routed, -1), "capacity")):
    with pytest.raises(ValueError, match=message):
      moe.kept_pairs(*args)
  with pytest.raises(ValueError, match="divisible"):
    moe.kept_pairs(routed[:, :5], 4, "device")


def _stats(ids, placement, **kwargs):
  maps = (placement.log2phy, placement.logcnt)
  names = ("num_gpus", "capacity_factor", "split", "capacity_per")
  return jax.jit(moe.dispatch_stats, static_argnames=names)(ids, *maps, num_gpus=8, **kwargs)


def _dropped(routed, capacity_factor, capacity_per):
  """Pairs dropped of ``routed [G, P]`` (8 devices, 16 tokens each, top-2)."""
  capacity = {"slot": moe.capacity(16, 2, 16, capacity_factor)}
  capacity["device"] = moe.device_capacity(16, 2, 8, capacity_factor)
  return int((routed - moe.kept_pairs(routed, capacity[capacity_per], capacity_per)).sum())


@pytest.mark.parametrize("split", moe.SPLITS)
def test_device_capacity_drops_what_device_loads_exceed(split):
  _, _, _, ids, placement = moe_problem()
  stats = _stats(ids, placement, capacity_factor=1.0, split=split, capacity_per="device")
  excess = np.maximum(np.asarray(stats.gpu_tokens()) - moe.device_capacity(16, 2, 8, 1.0), 0)
  assert excess.sum() > 0
  np.testing.assert_array_equal(stats.dropped.sum(0).reshape(8, 2).sum(-1), excess)
  # Dropless without a factor, and none dropped either once the heaviest device fits.
  dropless = _stats(ids, placement, capacity_factor=None, split=split, capacity_per="device")
  chex.assert_trees_all_equal(dropless.routed, stats.routed)
  assert int(dropless.dropped.sum()) == 0
  heaviest = int(stats.gpu_tokens().max())  # the capacity is factor * 32
  assert _dropped(stats.routed, heaviest / 32, "device") == 0
  at_most = _dropped(stats.routed, (heaviest - 1) / 32, "device")
  assert at_most == int((stats.gpu_tokens() == heaviest).sum())  # one pair from each heaviest


def test_balanced_split_with_device_capacity_drops_least():
  # The skewed step: per-device capacity with the balanced split drops less than the
  # per-slot capacity with either split, and than the even split per device.
  _, _, _, ids, placement = moe_problem()
  routed = {
    split: _stats(ids, placement, capacity_factor=None, split=split).routed for split in moe.SPLITS
  }
  for factor in (1.0, 1.25):
    dropped = {
      (split, per): _dropped(routed[split], factor, per)
      for split in moe.SPLITS
      for per in moe.CAPACITY_PER
    }
    best = dropped["balanced", "device"]
    assert best < min(dropped["even", "slot"], dropped["balanced", "slot"]), dropped
    assert best < dropped["even", "device"], dropped


@pytest.mark.parametrize("split", moe.SPLITS)
def test_device_capacity_layer_on_one_device_equals_reference(split):
  logical, x, gates, ids, placement = moe_problem()
  mesh = jax.make_mesh((1,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
  per_slot = jax.tree.map(lambda w: w[placement.phy2log], logical)
  maps = (placement.log2phy, placement.logcnt)
  kwargs = {"capacity_factor": 0.5, "split": split, "capacity_per": "device"}
  y, stats = jax.jit(lambda *a: moe.moe_layer(*a[:3], a[3], moe_mlp, *a[4:], mesh=mesh, **kwargs))(
    x, gates, ids, per_slot, *maps
  )
  ref, ref_stats = jax.jit(
    lambda *a: moe.moe_reference(*a[:3], a[3], moe_mlp, *a[4:], num_gpus=1, **kwargs)
  )(x, gates, ids, logical, *maps)
  chex.assert_trees_all_equal(stats, ref_stats)
  chex.assert_trees_all_close(y, ref, rtol=1e-5, atol=1e-6)
  assert int(stats.dropped.sum()) == 256 - 128


def test_ragged_collective_lowers_on_cpu():
  # XLA:CPU cannot compile ragged-all-to-all, but the layer's program with it lowers (forward
  # and gradient); the default on CPU is the padded exchange.
  logical, x, gates, ids, placement = moe_problem()
  mesh = jax.make_mesh((1,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
  per_slot = jax.tree.map(lambda w: w[placement.phy2log], logical)
  maps = (placement.log2phy, placement.logcnt)

  def loss(x, weights, ragged):
    y, _ = moe.moe_layer(
      x,
      gates,
      ids,
      weights,
      moe_mlp,
      *maps,
      mesh=mesh,
      capacity_per="device",
      ragged_collective=ragged,
    )
    return jnp.sum(y**2)

  for ragged, count in ((True, 2), (None, 0)):
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    text = grad.lower(x, per_slot, ragged).as_text()
    # Forward and return, and their transposes in the gradient.
    assert text.count("ragged_all_to_all") >= 2 * count, text.count("ragged_all_to_all")
    assert ("ragged_all_to_all" in text) == bool(count)


def test_bad_capacity_per_and_ragged_collective_raise():
  logical, x, gates, ids, placement = moe_problem()
  mesh = jax.make_mesh((1,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
  per_slot = jax.tree.map(lambda w: w[placement.phy2log], logical)
  maps = (placement.log2phy, placement.logcnt)
  layer = functools.partial(moe.moe_layer, x, gates, ids, per_slot, moe_mlp, *maps, mesh=mesh)
  for kwargs, message in (
    ({"capacity_per": "gpu"}, "capacity_per must be one of"),
    ({"ragged_collective": True}, "ragged_collective applies"),
    ({"capacity_per": "device", "ragged_collective": 1}, "ragged_collective must be"),
  ):
    with pytest.raises(ValueError, match=message):
      layer(**kwargs)
  with pytest.raises(ValueError, match="capacity_per must be one of"):
    moe.moe_reference(x, gates, ids, logical, moe_mlp, *maps, num_gpus=8, capacity_per=None)
  with pytest.raises(ValueError, match="capacity_per must be one of"):
    moe.dispatch_stats(ids, *maps, num_gpus=8, capacity_per="Device")
