"""The expert-parallel MoE layer and its logical reference.

The layer on a mesh of 8 devices is tested in the heavy tier; on one device, by default.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import auto_mesh
from moe_problem import MOE_EXPERTS
from moe_problem import MOE_TOKENS
from moe_problem import moe_mlp
from moe_problem import moe_placement
from moe_problem import moe_problem

import eplb_jax
from eplb_jax.runtime import dispatch
from eplb_jax.runtime import moe
from eplb_jax.runtime import params


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


@functools.cache
def moe_value_and_grad(logical_model, capacity_factor, split="even"):
  """Jitted ``(x, weights, gates, ids, log2phy, logcnt) -> ((y, stats), (dx, dweights))``, on 8
  devices or (``logical_model``) the reference for 8 GPUs.

  ``y`` and its gradients are of ``sum(y * cos(y))``, which weighs every output differently.
  """
  mesh = auto_mesh((8,), ("expert",))

  def objective(x, weights, gates, ids, log2phy, logcnt):
    args = (x, gates, ids, weights, moe_mlp, log2phy, logcnt)
    kwargs = {"capacity_factor": capacity_factor, "split": split}
    if logical_model:
      y, stats = moe.moe_reference(*args, num_gpus=8, **kwargs)
    else:
      y, stats = moe.moe_layer(*args, mesh=mesh, **kwargs)
    return jnp.sum(y * jnp.cos(y)), (y, stats)

  grad = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)
  return jax.jit(lambda *a: (lambda r: (r[0][1], r[1]))(grad(*a)))


@pytest.mark.heavy
@pytest.mark.parametrize("split", moe.SPLITS)
@pytest.mark.parametrize("capacity_factor", [1.0, None], ids=["drops", "dropless"])
def test_layer_on_eight_devices_equals_reference(split, capacity_factor):
  """Outputs, gradients and stats are the logical reference's, with and without drops."""
  logical, x, gates, ids, placement = moe_problem()
  mesh = auto_mesh((8,), ("expert",))
  per_slot = params.apply_placement(logical, placement.phy2log, mesh=mesh)
  maps = (placement.log2phy, placement.logcnt)
  (y, stats), (dx, dw) = moe_value_and_grad(False, capacity_factor, split)(
    x, per_slot, gates, ids, *maps
  )
  (ref, ref_stats), (ref_dx, ref_dw) = moe_value_and_grad(True, capacity_factor, split)(
    x, logical, gates, ids, *maps
  )
  chex.assert_trees_all_equal(stats, ref_stats)
  assert (int(stats.dropped.sum()) > 0) == (capacity_factor is not None), stats.dropped
  chex.assert_trees_all_close(y, ref, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(dx, ref_dx, rtol=1e-5, atol=1e-6)
  summed = params.sum_replicas(dw, placement.phy2log, MOE_EXPERTS)
  expected = params.apply_placement(ref_dw, placement.phy2log)
  chex.assert_trees_all_close(summed, expected, rtol=1e-5, atol=1e-6)
  if split == "balanced":
    # Every slot receives its quota of the step's split: the GPUs carry its loads.
    counts = np.bincount(np.asarray(ids).ravel(), minlength=MOE_EXPERTS)
    quotas = eplb_jax.split_tokens(counts[None], placement.phy2log[None], 8)[0]
    np.testing.assert_array_equal(stats.routed.sum(0), quotas)
  if capacity_factor is None:
    # Without drops: the plain logical MoE, every token's choices weighted by its gates.
    every = jax.vmap(moe_mlp, in_axes=(0, None))(logical, x)  # [E, T, d]
    plain = jnp.einsum("tk,tkd->td", gates, every[ids, jnp.arange(MOE_TOKENS)[:, None]])
    chex.assert_trees_all_close(y, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.heavy
def test_adam_step_after_rebalance_matches_logical():
  optax = pytest.importorskip("optax")
  logical, x, gates, ids, new = moe_problem()
  old = moe_placement(np.ones(MOE_EXPERTS), seed=1)
  assert not np.array_equal(old.phy2log, new.phy2log)
  mesh = auto_mesh((8,), ("expert",))
  adam = optax.adam(1e-2)

  def step(weights, opt_state, placement, logical_model):
    maps = (placement.log2phy, placement.logcnt)
    _, (_, grads) = moe_value_and_grad(logical_model, 1.0)(x, weights, gates, ids, *maps)
    if not logical_model:
      grads = params.sum_replicas(grads, placement.phy2log, MOE_EXPERTS, mesh=mesh)
    updates, opt_state = adam.update(grads, opt_state, weights)
    return optax.apply_updates(weights, updates), opt_state

  per_slot = params.apply_placement(logical, old.phy2log, mesh=mesh)
  ep, ep_state = step(per_slot, adam.init(per_slot), old, False)
  ref, ref_state = step(logical, adam.init(logical), old, True)
  ep_state = params.relayout_state(ep_state, ep, old.log2phy, new.phy2log, mesh=mesh)
  ep = params.relayout(ep, old.log2phy, new.phy2log, mesh=mesh)
  ep, ep_state = step(ep, ep_state, new, False)
  ref, ref_state = step(ref, ref_state, new, True)
  placed = functools.partial(params.apply_placement, phy2log=new.phy2log)
  chex.assert_trees_all_close(ep, placed(ref), rtol=1e-6, atol=1e-7)
  # The moments carry the gradients' rounding (replica sums and logical sums add in
  # different orders), amplified where a gradient entry cancels to near zero.
  chex.assert_trees_all_close(ep_state[0].mu, placed(ref_state[0].mu), rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(ep_state[0].nu, placed(ref_state[0].nu), rtol=1e-4, atol=1e-10)
  chex.assert_trees_all_equal(ep_state[0].count, ref_state[0].count)


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
