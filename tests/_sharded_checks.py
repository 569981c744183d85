"""Checks that need 8 devices, run in a subprocess by the test files.

The main pytest process keeps one CPU device, so tests on a mesh call
:func:`run_checks`, which runs
``XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/_sharded_checks.py GROUP``:
that runs every check of ``GROUP`` and prints one JSON object
``{check name: "ok" or the failure}``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import json
import os
import subprocess
import sys
import traceback

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import eplb_jax
from eplb_jax import workloads
from eplb_jax._src import sharding
from eplb_jax.runtime import moe
from eplb_jax.runtime import params

XLA_FLAGS = "--xla_force_host_platform_device_count=8"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")
# (num_replicas, num_groups, num_nodes, num_gpus): hierarchical, then global.
CONFIGS = ((24, 4, 2, 8), (20, 3, 2, 4))
CHECKS: dict[str, dict] = {"sharding": {}, "params": {}, "moe": {}}


class SkipCheck(Exception):
  """Raised by a check that cannot run here (a missing optional package); the test skips."""


def require(module: str):
  """``module`` imported, or :class:`SkipCheck` if it is not installed."""
  try:
    return importlib.import_module(module)
  except ImportError as error:
    raise SkipCheck(f"{module} is not installed") from error


def check(group: str):
  def register(fn):
    CHECKS[group][fn.__name__] = fn
    return fn

  return register


def auto_mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def explicit_mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(AxisType.Explicit,) * len(shape))


def loads(num_layers=16, num_experts=16, seed=0):
  return workloads.skewed_loads(num_layers, num_experts, seed=seed)


def assert_sharded_like(outputs, mesh, layer_axis):
  expected = NamedSharding(mesh, P(layer_axis))
  for out in outputs:
    assert out.sharding.is_equivalent_to(expected, out.ndim), (out.sharding, expected)
    assert out.sharding.spec[0] == layer_axis, out.sharding.spec


# (mesh, layer_axis, index into CONFIGS, mode); compilation dominates the run
# time, so each case compiles one configuration, and the other checks reuse
# the refined mode's (how layers are split does not depend on the mode).
CASES = (
  (lambda: auto_mesh((8,), ("x",)), "x", 0, "refined"),
  (lambda: explicit_mesh((8,), ("x",)), "x", 1, "greedy"),
  (lambda: auto_mesh((2, 4), ("a", "x")), "x", 1, "greedy"),
  (lambda: explicit_mesh((2, 4), ("a", "x")), ("a", "x"), 0, "refined"),
)


@check("sharding")
def equal_to_unsharded_without_collectives():
  weight = loads()
  expected = {
    (config, mode): eplb_jax.rebalance_experts(weight, *CONFIGS[config], mode=mode)
    for _, _, config, mode in CASES
  }
  for make, axis, config, mode in CASES:
    mesh = make()

    def fn(w, mesh=mesh, axis=axis, config=config, mode=mode):
      return eplb_jax.rebalance_experts(w, *CONFIGS[config], mode=mode, mesh=mesh, layer_axis=axis)

    # Replicated and already-sharded inputs alike compile to device-local code.
    args = [weight]
    if config == 0:
      args.append(jax.device_put(weight, NamedSharding(mesh, P(axis))))
    for arg in args:
      compiled = jax.jit(fn).lower(arg).compile()
      found = [name for name in COLLECTIVES if name in compiled.as_text()]
      assert not found, (mesh, axis, found)
      got = compiled(arg)
      chex.assert_trees_all_equal(got, expected[config, mode])
      assert_sharded_like(got, mesh, axis)
    if isinstance(axis, tuple):
      got = fn(weight)  # eagerly
      chex.assert_trees_all_equal(got, expected[config, mode])
      assert_sharded_like(got, mesh, axis)


@check("sharding")
def migration_sharded_like_unsharded():
  mesh = auto_mesh((8,), ("x",))
  sizes = CONFIGS[0]
  previous = eplb_jax.rebalance_experts(loads(seed=4), *sizes, mode="refined")[0]
  weight = loads(seed=5)
  expected = eplb_jax.rebalance_experts(weight, *sizes, mode="refined", previous_phy2log=previous)
  fn = jax.jit(
    lambda w, p: eplb_jax.rebalance_experts(
      *(w, *sizes), mode="refined", previous_phy2log=p, mesh=mesh, layer_axis="x"
    )
  )
  compiled = fn.lower(weight, previous).compile()
  found = [name for name in COLLECTIVES if name in compiled.as_text()]
  assert not found, found
  got = compiled(weight, previous)
  chex.assert_trees_all_equal(got, expected)
  assert_sharded_like(got, mesh, "x")


@check("sharding")
def no_retrace_with_new_loads():
  mesh = auto_mesh((8,), ("x",))
  sizes = CONFIGS[0]

  @jax.jit
  @chex.assert_max_traces(n=1)
  def fn(w):
    return eplb_jax.rebalance_experts(w, *sizes, mode="refined", mesh=mesh, layer_axis="x")

  for seed in range(3):
    weight = loads(seed=seed)
    expected = eplb_jax.rebalance_experts(weight, *sizes, mode="refined")
    chex.assert_trees_all_equal(fn(weight), expected)
  # Eager calls reuse one compiled program too.
  before = sharding.shard_layers._cache_size()
  for seed in range(3, 6):
    eplb_jax.rebalance_experts(loads(seed=seed), *sizes, mode="refined", mesh=mesh, layer_axis="x")
  assert sharding.shard_layers._cache_size() <= before + 1


@check("sharding")
def sharded_weight_without_mesh():
  mesh = auto_mesh((8,), ("x",))
  weight = loads(seed=2)
  presharded = jax.device_put(weight, NamedSharding(mesh, P("x")))
  sizes = CONFIGS[0]
  expected = eplb_jax.rebalance_experts(weight, *sizes, mode="refined")
  fn = jax.jit(lambda w: eplb_jax.rebalance_experts(w, *sizes, mode="refined"))
  chex.assert_trees_all_equal(fn(presharded), expected)
  got = eplb_jax.rebalance_experts(presharded, *sizes, mode="refined")
  chex.assert_trees_all_equal(got, expected)


@check("sharding")
def explicit_sharded_loads():
  """Loads typed with Explicit axes (make_mesh's default), with and without mesh= and set_mesh."""
  mesh = explicit_mesh((8,), ("x",))
  sizes = CONFIGS[1]
  weight = loads(seed=6)
  expected = eplb_jax.rebalance_experts(weight, *sizes, mode="greedy")
  jitted = jax.jit(lambda w: eplb_jax.rebalance_experts(w, *sizes, mode="greedy"))
  for spec in (P("x"), P(None, "x")):
    arg = jax.device_put(weight, NamedSharding(mesh, spec))
    for in_context in (False, True):
      with jax.set_mesh(mesh) if in_context else contextlib.nullcontext():
        chex.assert_trees_all_equal(jitted(arg), expected)
        got = eplb_jax.rebalance_experts(arg, *sizes, mode="greedy")
        chex.assert_trees_all_equal(got, expected)
        if spec == P("x"):  # balanced where the loads are
          assert_sharded_like(got, mesh, "x")
        got = eplb_jax.rebalance_experts(arg, *sizes, mode="greedy", mesh=mesh, layer_axis="x")
        chex.assert_trees_all_equal(got, expected)
  # Zero layers on a mesh: empty maps.
  got = eplb_jax.rebalance_experts(weight[:0], *sizes, mode="greedy", mesh=mesh, layer_axis="x")
  assert [a.shape for a in got] == [(0, 20), (0, 16, 5), (0, 16)], got


@check("sharding")
def bad_mesh_arguments():
  mesh = auto_mesh((2, 4), ("a", "x"))
  weight = loads(num_layers=6)
  cases = (
    (dict(mesh=mesh, layer_axis="y"), "layer_axis"),
    (dict(mesh=mesh, layer_axis=("a", "a")), "layer_axis"),
    (dict(mesh=mesh, layer_axis=()), "layer_axis"),
    (dict(mesh=mesh, layer_axis=None), "layer_axis"),
    (dict(mesh=mesh, layer_axis="x"), "divisible by the size of layer_axis"),
    (dict(mesh=mesh, layer_axis=("a", "x")), "divisible by the size of layer_axis"),
    (dict(mesh="mesh", layer_axis="x"), "mesh must be"),
  )
  for kwargs, message in cases:
    try:
      eplb_jax.rebalance_experts(weight, *CONFIGS[0], **kwargs)
    except ValueError as e:
      assert message in str(e), (kwargs, str(e))
    else:
      raise AssertionError(f"no ValueError for {kwargs}")
  # Six layers do divide the 2-device axis "a".
  eplb_jax.rebalance_experts(weight, *CONFIGS[0], mesh=mesh, layer_axis="a")


def expert_params(num_layers, num_experts):
  size = num_layers * num_experts
  return {
    "w": jnp.arange(size * 6, dtype=jnp.float32).reshape(num_layers, num_experts, 2, 3),
    "b": jnp.arange(size, dtype=jnp.float32).reshape(num_layers, num_experts),
  }


@check("params")
def placement_sharded_over_experts():
  weight = loads(num_layers=2)
  phy2log, log2phy, _ = eplb_jax.rebalance_experts(weight, *CONFIGS[0])
  logical = expert_params(2, 16)
  expected = jax.tree.map(
    lambda x: np.take_along_axis(
      np.asarray(x), np.asarray(phy2log).reshape(2, 24, *[1] * (x.ndim - 2)), axis=1
    ),
    logical,
  )
  for make in (auto_mesh, explicit_mesh):
    mesh = make((8,), ("expert",))
    source = jax.device_put(logical, NamedSharding(mesh, P(None, "expert")))
    fn = jax.jit(lambda p, i, mesh=mesh: params.apply_placement(p, i, mesh=mesh))
    for out in (fn(source, phy2log), params.apply_placement(source, phy2log, mesh=mesh)):
      chex.assert_trees_all_equal(out, expected)
      for leaf in jax.tree.leaves(out):
        assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "expert")), leaf.ndim), (
          leaf.sharding
        )
    # The communication the docstring of eplb_jax.runtime.params states.
    hlo = fn.lower(source, phy2log).compile().as_text()
    assert [name for name in COLLECTIVES if name in hlo] == ["all-gather"]
    replicated = jax.device_put(logical, NamedSharding(mesh, P()))
    hlo = fn.lower(replicated, phy2log).compile().as_text()
    assert not [name for name in COLLECTIVES if name in hlo]
    moved = jax.jit(lambda p, mesh=mesh: params.relayout(p, log2phy, phy2log, mesh=mesh))
    chex.assert_trees_all_equal(moved(fn(source, phy2log)), expected)


@check("params")
def bad_expert_axis():
  mesh = auto_mesh((8,), ("e",))
  phy2log = jnp.zeros((2, 20), jnp.int32)
  for axis, message in (("expert", "expert_axis"), ("e", "number of slots (20)")):
    try:
      params.apply_placement(expert_params(2, 16), phy2log, mesh=mesh, expert_axis=axis)
    except ValueError as e:
      assert message in str(e), str(e)
    else:
      raise AssertionError(f"no ValueError for expert_axis={axis!r}")


# MoE layer: one layer of 8 experts on 16 slots, 16 tokens per device, top-2.
MOE_EXPERTS, MOE_SLOTS, MOE_TOKENS, MOE_DIMS, MOE_TOP_K = 8, 16, 128, (8, 16), 2


# The ready ReLU MLP: one slot's rows, or (with group_sizes) a device's slots on ragged groups.
moe_mlp = moe.expert_mlp


def moe_placement(load, seed=0):
  """One layer's placement of ``MOE_SLOTS`` slots: replicas for the heaviest ``load / count``,
  then the slots shuffled, so replicas of an expert sit on different devices."""
  logcnt = np.ones(MOE_EXPERTS, np.int32)
  for _ in range(MOE_SLOTS - MOE_EXPERTS):
    logcnt[np.argmax(load / logcnt)] += 1
  phy2log = np.random.default_rng(seed).permutation(np.repeat(np.arange(MOE_EXPERTS), logcnt))
  log2phy = np.full((MOE_EXPERTS, MOE_SLOTS - MOE_EXPERTS + 1), -1, np.int32)
  for expert in range(MOE_EXPERTS):
    slots = np.flatnonzero(phy2log == expert)
    log2phy[expert, : len(slots)] = slots
  return eplb_jax.Placement(*map(jnp.asarray, (phy2log.astype(np.int32), log2phy, logcnt)))


def moe_problem(seed=0):
  """Logical weights, tokens, skewed routing and a placement for its loads."""
  d, h = MOE_DIMS
  keys = jax.random.split(jax.random.key(seed), 5)
  logical = {
    "w_in": jax.random.normal(keys[0], (MOE_EXPERTS, d, h)) / np.sqrt(d),
    "w_out": jax.random.normal(keys[1], (MOE_EXPERTS, h, d)) / np.sqrt(h),
  }
  x = jax.random.normal(keys[2], (MOE_TOKENS, d))
  skew = 1.5 * jax.random.normal(keys[3], (MOE_EXPERTS,))
  logits = jax.random.normal(keys[4], (MOE_TOKENS, MOE_EXPERTS)) + skew
  gates, ids = moe.top_k_routing(logits, MOE_TOP_K)
  load = np.bincount(np.asarray(ids).ravel(), minlength=MOE_EXPERTS)
  return logical, x, gates, ids, moe_placement(load, seed)


@functools.cache
def moe_value_and_grad(
  logical_model, capacity_factor, split="even", capacity_per="slot", spare_slots=0
):
  """Jitted ``(x, weights, gates, ids, log2phy, logcnt) -> ((y, stats), (dx, dweights))``.

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


def layer_equals_reference(split, capacity_per="slot", spare_slots=0):
  """The layer's outputs, gradients and stats are the logical reference's, with and without
  drops, for ``split``, ``capacity_per`` and ``spare_slots``."""
  logical, x, gates, ids, placement = moe_problem()
  mesh = auto_mesh((8,), ("expert",))
  per_slot = params.apply_placement(logical, placement.phy2log, mesh=mesh)
  maps = (placement.log2phy, placement.logcnt)
  # Per device, the weight gradients of the ragged products sum their rows in another order
  # than the logical model's; entries that cancel to ~1e-3 then differ by ~1e-6.
  weight_atol = 1e-6 if capacity_per == "slot" else 1e-5
  for factor in (1.0, 1.25, None):
    grad = moe_value_and_grad(False, factor, split, capacity_per, spare_slots)
    (y, stats), (dx, dw) = grad(x, per_slot, gates, ids, *maps)
    reference = moe_value_and_grad(True, factor, split, capacity_per, spare_slots)
    (ref, ref_stats), (ref_dx, ref_dw) = reference(x, logical, gates, ids, *maps)
    chex.assert_trees_all_equal(stats, ref_stats)
    if capacity_per == "slot":
      assert (int(stats.dropped.sum()) > 0) == (factor is not None), stats.dropped
    else:
      # Each device keeps min(its pairs, capacity): drops are what its load exceeds it by.
      capacity = moe.device_capacity(MOE_TOKENS // 8, MOE_TOP_K, 8, factor)
      per_device = stats.dropped.sum(0).reshape(8, -1).sum(-1)
      np.testing.assert_array_equal(per_device, np.maximum(stats.gpu_tokens() - capacity, 0))
    chex.assert_trees_all_close(y, ref, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(dx, ref_dx, rtol=1e-5, atol=1e-6)
    summed = params.sum_replicas(dw, placement.phy2log, MOE_EXPERTS)
    expected = params.apply_placement(ref_dw, placement.phy2log)
    chex.assert_trees_all_close(summed, expected, rtol=1e-5, atol=weight_atol)
    if split == "balanced":
      # Every slot receives its quota of the step's split: the GPUs carry its loads.
      counts = np.bincount(np.asarray(ids).ravel(), minlength=MOE_EXPERTS)[None]
      if spare_slots:
        service = placement.phy2log[None]
        plan = eplb_jax.plan_spare_slots(counts, service, 8, spare_slots=spare_slots)
        source = np.asarray(plan.source)[0]
        assert (source >= 0).any(), "no copy on the skewed step"
        quotas = plan.quotas[0]
      else:
        quotas = eplb_jax.split_tokens(counts, placement.phy2log[None], 8)[0]
      np.testing.assert_array_equal(stats.routed.sum(0), quotas)
  # Without drops: the plain logical MoE, every token's choices weighted by its gates.
  every = jax.vmap(moe_mlp, in_axes=(0, None))(logical, x)  # [E, T, d]
  plain = jnp.einsum("tk,tkd->td", gates, every[ids, jnp.arange(MOE_TOKENS)[:, None]])
  chex.assert_trees_all_close(y, plain, rtol=1e-5, atol=1e-6)


@check("moe")
def layer_equals_logical_reference():
  layer_equals_reference("even")


@check("moe")
def balanced_split_layer_equals_logical_reference():
  layer_equals_reference("balanced")


@check("moe")
def device_capacity_layer_equals_logical_reference():
  layer_equals_reference("even", "device")


@check("moe")
def device_capacity_balanced_split_layer_equals_logical_reference():
  layer_equals_reference("balanced", "device")


@check("moe")
def spare_slots_layer_equals_logical_reference():
  layer_equals_reference("balanced", "slot", spare_slots=1)


@check("moe")
def spare_slots_device_capacity_layer_equals_logical_reference():
  layer_equals_reference("balanced", "device", spare_slots=2)


@check("moe")
def spare_fetch_copies_slots_and_sums_their_gradients():
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


@check("moe")
def padded_exchange_follows_ragged_all_to_all_semantics():
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


@check("moe")
def adam_step_after_rebalance_matches_logical():
  optax = require("optax")
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


@functools.cache
def example():
  """The training example's module, a short configuration and its expert-parallel run."""
  require("optax")
  sys.path.insert(0, EXAMPLES)
  import train_moe

  cfg = train_moe.Config(num_layers=1, window=10, rebalance_every=10)
  mesh = train_moe.make_mesh(cfg)
  return train_moe, cfg, mesh, train_moe.train(cfg, 20, mesh)


@check("moe")
def training_example_rebalances_and_matches_logical():
  train_moe, cfg, mesh, run = example()
  logical = train_moe.train(dataclasses.replace(cfg, logical=True), 20, mesh)
  np.testing.assert_allclose(run["loss"], logical["loss"], rtol=1e-4)
  np.testing.assert_array_equal(run["dropped"], logical["dropped"])
  first, *rest = train_moe.periods(run, cfg.rebalance_every)
  assert len(rest) == 1 and len(train_moe.table([first, *rest])) == 4
  # The gate lets the first rebalance through: the uniform start is far from balanced.
  assert run["layers_rebalanced"][cfg.rebalance_every - 1] == cfg.num_layers, run
  for period in rest:
    # The targets: drops at capacity factor 1.25 fall at least 5x, and the
    # measured GPU imbalance is within 10% of the placement's prediction.
    assert period.dropped[1.25] * 5 <= first.dropped[1.25], (first, period)
    assert period.dropped[1.0] < first.dropped[1.0], (first, period)
    assert period.measured <= 1.1 * period.predicted, period
    assert period.measured < 0.6 * first.measured, (first, period)


@check("moe")
def training_example_with_balanced_split_matches_logical():
  train_moe, cfg, mesh, _ = example()
  cfg = dataclasses.replace(cfg, split="balanced")
  run = train_moe.train(cfg, 20, mesh)
  logical = train_moe.train(dataclasses.replace(cfg, logical=True), 20, mesh)
  train_moe.check_same_model(run, logical, tight_steps=20, rtol=1e-5, loose_rtol=1e-5)
  # In service, the balanced split's figures are the run's own; after the first rebalance
  # it keeps every step's heaviest device within 5% of the mean, below the even split's.
  np.testing.assert_array_equal(run["imbalance"], run["imbalance[balanced]"])
  after = train_moe.after_first_rebalance(run)
  assert after["balanced"]["max/mean"] <= 1.05, after
  assert after["balanced"]["max/mean"] < after["even"]["max/mean"], after


@check("moe")
def training_example_with_device_capacity_matches_logical():
  train_moe, cfg, mesh, _ = example()
  cfg = dataclasses.replace(cfg, split="balanced", capacity_per="device", capacity_factor=1.0)
  run = train_moe.train(cfg, 20, mesh)
  logical = train_moe.train(dataclasses.replace(cfg, logical=True), 20, mesh)
  train_moe.check_same_model(run, logical, tight_steps=20, rtol=1e-5, loose_rtol=1e-5)
  np.testing.assert_array_equal(run["dropped@1.0"], run["dropped@1.0[balanced/device]"])
  # After the first rebalance the balanced split's devices nearly fit the per-device capacity
  # at cf 1.0: far fewer drops than either split's per-slot capacity.
  after = train_moe.after_first_rebalance(run)
  device = after["balanced"]["dropped cf 1.0 per device"]
  assert device * 5 < min(after[s]["dropped cf 1.0 per slot"] for s in moe.SPLITS), after


@check("moe")
def nnx_example_matches_pure_example():
  require("flax")
  _, cfg, mesh, run = example()
  import train_moe_nnx

  nnx_run = train_moe_nnx.train(cfg, 20, mesh)
  np.testing.assert_allclose(nnx_run["loss"], run["loss"], rtol=1e-6)
  np.testing.assert_array_equal(nnx_run["before"], run["before"])
  np.testing.assert_array_equal(nnx_run["layers_rebalanced"], run["layers_rebalanced"])


def run_checks(group: str) -> dict[str, str]:
  """Runs the checks of ``group`` in a subprocess on 8 host devices; returns their results."""
  proc = subprocess.run(
    [sys.executable, __file__, group],
    env={
      **os.environ,
      "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {XLA_FLAGS}",
      # The eplb_jax of this checkout, not another installed copy.
      "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
    },
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(group: str) -> None:
  if jax.device_count() != 8:
    raise SystemExit(f"needs XLA_FLAGS={XLA_FLAGS} (8 devices), got {jax.device_count()}")
  results = {}
  for name, fn in CHECKS[group].items():
    try:
      fn()
      results[name] = "ok"
    except SkipCheck as reason:
      results[name] = f"skipped: {reason}"
    except Exception:  # noqa: BLE001 - reported to the parent test
      results[name] = traceback.format_exc()
  print(json.dumps(results))


if __name__ == "__main__":
  main(sys.argv[1])
