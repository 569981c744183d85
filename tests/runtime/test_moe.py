"""The expert-parallel MoE layer and its logical reference.

The layer on a mesh of 8 devices is tested in the heavy tier; on one device, by default.
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
from conftest import auto_mesh
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.sharding import PartitionSpec as P
from moe_problem import MOE_EXPERTS
from moe_problem import MOE_TOKENS
from moe_problem import MOE_TOP_K
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


def _one_device_layer_equals_reference(**kwargs) -> moe.DispatchStats:
  """Checks the jitted one-device layer against its reference with ``kwargs``; its stats."""
  logical, x, gates, ids, placement = moe_problem()
  per_slot = jax.tree.map(lambda w: w[placement.phy2log], logical)
  layer = jax.jit(functools.partial(_one_device_layer, **kwargs))
  y, stats = layer(x, gates, ids, per_slot, placement)
  maps = (placement.log2phy, placement.logcnt)
  ref, ref_stats = jax.jit(
    lambda *a: moe.moe_reference(*a[:3], a[3], moe_mlp, *a[4:], num_gpus=1, **kwargs)
  )(x, gates, ids, logical, *maps)
  chex.assert_trees_all_equal(stats, ref_stats)
  chex.assert_trees_all_close(y, ref, rtol=1e-5, atol=1e-6)
  return stats


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
def moe_value_and_grad(
  logical_model, capacity_factor, split="even", capacity_per="slot", spare_slots=0
):
  """Jitted ``(x, weights, gates, ids, log2phy, logcnt) -> ((y, stats), (dx, dweights))``, on 8
  devices or (``logical_model``) the reference for 8 GPUs.

  ``y`` and its gradients are of ``sum(y * cos(y))``, which weighs every output differently.
  """
  mesh = auto_mesh((8,), ("expert",))

  def objective(x, weights, gates, ids, log2phy, logcnt):
    args = (x, gates, ids, weights, moe_mlp, log2phy, logcnt)
    kwargs = {
      "capacity_factor": capacity_factor,
      "split": split,
      "capacity_per": capacity_per,
      "spare_slots": spare_slots,
    }
    if logical_model:
      y, stats = moe.moe_reference(*args, num_gpus=8, **kwargs)
    else:
      y, stats = moe.moe_layer(*args, mesh=mesh, **kwargs)
    return jnp.sum(y * jnp.cos(y)), (y, stats)

  grad = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)
  return jax.jit(lambda *a: (lambda r: (r[0][1], r[1]))(grad(*a)))


# (split, capacity_per, spare_slots) of the layer checks on 8 devices.
LAYERS = (
  ("even", "slot", 0),
  ("balanced", "slot", 0),
  ("even", "device", 0),
  ("balanced", "device", 0),
  ("balanced", "slot", 1),
  ("balanced", "device", 2),
)


@pytest.mark.heavy
@pytest.mark.parametrize("layer", LAYERS, ids=["-".join(map(str, layer)) for layer in LAYERS])
@pytest.mark.parametrize("capacity_factor", [1.0, 1.25, None], ids=["cf1", "cf1.25", "dropless"])
def test_layer_on_eight_devices_equals_reference(layer, capacity_factor):
  """Outputs, gradients and stats are the logical reference's, with and without drops, for
  each split, capacity and number of spare slots."""
  split, capacity_per, spare_slots = layer
  logical, x, gates, ids, placement = moe_problem()
  mesh = auto_mesh((8,), ("expert",))
  per_slot = params.apply_placement(logical, placement.phy2log, mesh=mesh)
  maps = (placement.log2phy, placement.logcnt)
  options = (capacity_factor, split, capacity_per, spare_slots)
  (y, stats), (dx, dw) = moe_value_and_grad(False, *options)(x, per_slot, gates, ids, *maps)
  (ref, ref_stats), (ref_dx, ref_dw) = moe_value_and_grad(True, *options)(
    x, logical, gates, ids, *maps
  )
  chex.assert_trees_all_equal(stats, ref_stats)
  if capacity_per == "slot":
    assert (int(stats.dropped.sum()) > 0) == (capacity_factor is not None), stats.dropped
  else:
    # Each device keeps min(its pairs, capacity): drops are what its load exceeds it by.
    capacity = moe.device_capacity(MOE_TOKENS // 8, MOE_TOP_K, 8, capacity_factor)
    per_device = stats.dropped.sum(0).reshape(8, -1).sum(-1)
    np.testing.assert_array_equal(per_device, np.maximum(stats.gpu_tokens() - capacity, 0))
  chex.assert_trees_all_close(y, ref, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(dx, ref_dx, rtol=1e-5, atol=1e-6)
  # Per device, the weight gradients of the ragged products sum their rows in another order
  # than the logical model's; entries that cancel to ~1e-3 then differ by ~1e-6.
  weight_atol = 1e-6 if capacity_per == "slot" else 1e-5
  summed = params.sum_replicas(dw, placement.phy2log, MOE_EXPERTS)
  expected = params.apply_placement(ref_dw, placement.phy2log)
  chex.assert_trees_all_close(summed, expected, rtol=1e-5, atol=weight_atol)
  if split == "balanced":
    # Every slot receives its quota of the step's split: the GPUs carry its loads.
    counts = np.bincount(np.asarray(ids).ravel(), minlength=MOE_EXPERTS)[None]
    if spare_slots:
      service = placement.phy2log[None]
      plan = eplb_jax.plan_spare_slots(counts, service, 8, spare_slots=spare_slots)
      assert (np.asarray(plan.source) >= 0).any(), "no copy on the skewed step"
      quotas = plan.quotas[0]
    else:
      quotas = eplb_jax.split_tokens(counts, placement.phy2log[None], 8)[0]
    np.testing.assert_array_equal(stats.routed.sum(0), quotas)
  if capacity_factor is None:
    # Without drops: the plain logical MoE, every token's choices weighted by its gates.
    every = jax.vmap(moe_mlp, in_axes=(0, None))(logical, x)  # [E, T, d]
    plain = jnp.einsum("tk,tkd->td", gates, every[ids, jnp.arange(MOE_TOKENS)[:, None]])
    chex.assert_trees_all_close(y, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.heavy
def test_spare_fetch_copies_slots_and_sums_their_gradients():
  # 8 devices of 2 slots, 2 spare slots each: copies of slot 3 (twice), 0, 15 and empty ones.
  mesh = auto_mesh((8,), ("x",))
  source = np.full(16, -1, np.int32)
  source[[0, 5, 6, 9, 14]] = [3, 3, 0, 15, 3]
  leaf = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  weight = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)

  def fetched(leaf):
    def local(leaf):
      return moe._fetch_spares(leaf, source, axis="x", num_gpus=8, spare_slots=2, ragged=False)

    return jax.shard_map(local, mesh=mesh, in_specs=P("x"), out_specs=P("x"))(leaf)

  copies = jax.jit(fetched)(leaf)
  expected = np.where((source >= 0)[:, None], leaf[np.maximum(source, 0)], 0.0)
  np.testing.assert_array_equal(copies, expected)
  grad = jax.jit(jax.grad(lambda v: jnp.sum(fetched(v) * weight)))(leaf)
  summed = np.zeros_like(leaf)
  np.add.at(summed, source[source >= 0], weight[source >= 0])
  np.testing.assert_allclose(grad, summed, rtol=1e-6)


@pytest.mark.heavy
def test_padded_exchange_follows_ragged_all_to_all_semantics():
  # The padded all_to_all stands in for jax.lax.ragged_all_to_all on XLA:CPU: the result its
  # docstring specifies, for random chunks (each device sends 3 chunks to every device).
  mesh = auto_mesh((8,), ("x",))
  num, chunks, rows, width = 8, 3, 100, 2
  rng = np.random.default_rng(0)
  sizes = rng.integers(0, 4, (num, num, chunks)).astype(np.int32)  # [sender, receiver, chunk]
  send_sizes = sizes.reshape(num, -1)
  # Senders' chunks at gapped offsets; receivers' chunks packed in (sender, chunk) order.
  input_offsets = (np.cumsum(send_sizes + 1, -1) - send_sizes - 1).astype(np.int32)
  recv_sizes = sizes.transpose(1, 0, 2).reshape(num, -1)  # [receiver, sender * chunk]
  recv_at = (np.cumsum(recv_sizes, -1) - recv_sizes).reshape(num, num, chunks)
  output_offsets = recv_at.transpose(1, 0, 2).reshape(num, -1).astype(np.int32)
  operand = rng.normal(size=(num, rows, width)).astype(np.float32)
  output = np.full((num, rows, width), -1.0, np.float32)
  expected = output.copy()
  for s, r, c in np.ndindex(num, num, chunks):
    n, src, dst = sizes[s, r, c], input_offsets[s, r * chunks + c], recv_at[r, s, c]
    expected[r, dst : dst + n] = operand[s, src : src + n]
  spec = P("x")
  exchange = functools.partial(
    moe._padded_ragged_all_to_all, axis_name="x", num_devices=num, block=num * chunks
  )
  result = jax.jit(
    jax.shard_map(
      lambda *a: exchange(*(b[0] for b in a))[None], mesh=mesh, in_specs=spec, out_specs=spec
    )
  )(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes)
  np.testing.assert_array_equal(result, expected)


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
  stats = _one_device_layer_equals_reference(capacity_factor=1.0, split="balanced")
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
  stats = _one_device_layer_equals_reference(
    capacity_factor=0.5, split=split, capacity_per="device"
  )
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
