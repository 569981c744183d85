"""Property tests: a valid result or a clear ValueError, whatever the input.

Over random loads, dtypes and ids (the balancer, the runtime's ids), slot
maps (the :class:`Placement` views), placements in service and candidates
(the gate, candidates without some expert included), token counts, slot
counts and capacity factors (``moe_layer`` on one device) and output files
(the CLI's writes). Shapes come from a few fixed configurations, so each
compiles once; the values, dtypes and edge cases are what Hypothesis varies.
The slower properties are in the heavy tier.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import pathlib
import stat
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS
from conftest import check_placement
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from moe_problem import moe_mlp
from moe_problem import moe_problem

import eplb_jax
from eplb_jax import cli
from eplb_jax import metrics
from eplb_jax._src.placement import from_phy2log
from eplb_jax.runtime import dispatch
from eplb_jax.runtime import moe
from eplb_jax.runtime import params
from eplb_jax.runtime import stats

settings.register_profile("eplb", max_examples=8, deadline=None, derandomize=True)
settings.load_profile("eplb")

NUM_LAYERS, NUM_EXPERTS, *SIZES = CONFIGS["readme"]
NUM_REPLICAS = SIZES[0]
EDGE = [0.0, 1e-45, 1e-30, 1.0, 1e30, 3e38, np.finfo(np.float32).max, 1e300, -1.0, np.nan, np.inf]
DTYPES = [np.float32, np.float64, np.int32, np.int64, np.uint8]
JITTED = jax.jit(eplb_jax.rebalance_experts, static_argnums=(1, 2, 3, 4))
MIGRATE = jax.jit(
  lambda w, p: eplb_jax.rebalance_experts(w, *SIZES, previous_phy2log=p), static_argnums=()
)


@st.composite
def weights(draw):
  dtype = draw(st.sampled_from(DTYPES))
  values = draw(
    st.lists(
      st.one_of(st.sampled_from(EDGE), st.floats(0, 1e6)),
      min_size=NUM_LAYERS * NUM_EXPERTS,
      max_size=NUM_LAYERS * NUM_EXPERTS,
    )
  )
  array = np.array(values, np.float64).reshape(NUM_LAYERS, NUM_EXPERTS)
  if np.issubdtype(dtype, np.integer):
    info = np.iinfo(dtype)
    array = np.clip(np.nan_to_num(array, posinf=info.max), info.min, info.max)
  with np.errstate(over="ignore", invalid="ignore"):
    return array.astype(dtype)


@pytest.mark.heavy
@given(weights())
def test_rebalance_valid_or_value_error(weight):
  try:
    got = eplb_jax.rebalance_experts(weight, *SIZES)
  except ValueError as error:
    assert str(error).startswith("weight must be"), error
    assert not np.all(np.isfinite(weight.astype(np.float64)) & (weight >= 0))
  else:
    check_placement(*got, NUM_EXPERTS, NUM_REPLICAS, NUM_LAYERS)
  # Under jit, always a valid placement (bad loads count as 0).
  check_placement(*JITTED(jnp.asarray(weight), *SIZES), NUM_EXPERTS, NUM_REPLICAS, NUM_LAYERS)


@pytest.mark.heavy
@given(
  weights(),
  st.lists(
    st.integers(-3, NUM_EXPERTS + 2),
    min_size=NUM_REPLICAS * NUM_LAYERS,
    max_size=NUM_REPLICAS * NUM_LAYERS,
  ),
)
def test_migration_valid_or_value_error(weight, previous):
  previous = np.array(previous, np.int64).reshape(NUM_LAYERS, NUM_REPLICAS)
  with np.errstate(over="ignore"):  # values beyond float32 become inf, then 0
    weight = np.nan_to_num(weight.astype(np.float32), nan=0, posinf=0, neginf=0).clip(0)
  try:
    got = eplb_jax.rebalance_experts(weight, *SIZES, previous_phy2log=previous)
  except ValueError as error:
    assert str(error).startswith("previous_phy2log must"), error
  else:
    check_placement(*got, NUM_EXPERTS, NUM_REPLICAS, NUM_LAYERS)
  check_placement(*MIGRATE(weight, previous), NUM_EXPERTS, NUM_REPLICAS, NUM_LAYERS)


IDS = st.lists(
  st.one_of(
    st.integers(-2, NUM_EXPERTS + 1), st.sampled_from([2**31 - 1, 2**32, 2**32 + 1, -(2**40)])
  ),
  min_size=8,
  max_size=8,
)
PLACEMENT = eplb_jax.rebalance_experts(np.arange(24.0).reshape(2, 12), *SIZES)


@given(IDS, st.sampled_from([np.int32, np.int64, list]))
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_runtime_ids(jit, ids, kind):
  values = np.array(ids, np.int64).reshape(1, 4, 2)
  # jax.jit narrows 64-bit arguments to int32 before any code sees them (x64
  # off), so only eager calls get the 64-bit ids.
  narrow = np.int32 if jit or kind is np.int32 else np.int64
  values = np.where(values == values.astype(narrow), values, -1)
  ids_in = values.tolist() if kind is list else values.astype(kind)
  valid = (values >= 0) & (values < NUM_EXPERTS)
  call = jax.jit if jit else (lambda f, **_: f)
  if jit and kind is list:
    ids_in = np.asarray(ids_in, np.int32)
  counts = call(stats.expert_counts, static_argnums=1)(ids_in, NUM_EXPERTS)
  np.testing.assert_array_equal(counts[0], np.bincount(values[valid], minlength=NUM_EXPERTS))
  log2phy, logcnt = PLACEMENT.log2phy[:1], PLACEMENT.logcnt[:1]
  slots = np.asarray(call(dispatch.physical_slots)(log2phy, logcnt, ids_in))
  np.testing.assert_array_equal(slots < 0, ~valid)
  experts = np.asarray(call(dispatch.logical_experts)(PLACEMENT.phy2log[:1], slots))
  np.testing.assert_array_equal(experts, np.where(valid, values, -1))
  flat = values.reshape(-1)
  source = {"w": jnp.arange(1.0, NUM_EXPERTS + 1)}
  if jit:
    got = np.asarray(
      jax.jit(params.apply_placement)(source, flat.clip(-1, 99).astype(np.int32))["w"]
    )
    ok = (flat >= 0) & (flat < NUM_EXPERTS)
    np.testing.assert_array_equal(got, np.where(ok, flat + 1, 0))
  elif not valid.all():
    with pytest.raises(ValueError, match="^phy2log"):
      params.apply_placement(source, flat)


# ------------------------------------------------------------------ Placement views

VIEW_SLOTS = 16


@st.composite
def slot_maps(draw):
  """A placement from any slot map ``[L, 16]`` (empty slots and missing experts included), and
  loads for it."""
  num_layers = draw(st.sampled_from([0, 1, 3]))
  num_experts = draw(st.sampled_from([4, 12]))
  phy2log = draw(
    hnp.arrays(np.int32, (num_layers, VIEW_SLOTS), elements=st.integers(-1, num_experts - 1))
  )
  weight = draw(
    hnp.arrays(np.float32, (num_layers, num_experts), elements=st.floats(0, 1e6, width=32))
  )
  return from_phy2log(jnp.asarray(phy2log), num_experts), weight


@given(slot_maps(), st.sampled_from([1, 2, 4, 16, 0, 3, 32, 2.0, -4]))
def test_placement_views(case, num_gpus):
  placement, weight = case
  views = (
    lambda: placement.gpu_experts(num_gpus),
    lambda: placement.gpu_loads(weight, num_gpus),
    lambda: metrics.gpu_loads(weight, placement.phy2log, placement.logcnt, num_gpus),
  )
  if not (isinstance(num_gpus, int) and num_gpus > 0 and VIEW_SLOTS % num_gpus == 0):
    for view in views:
      with pytest.raises(ValueError, match="^num_gpus must"):
        view()
    return
  phy2log = np.asarray(placement.phy2log)
  num_layers, num_experts = weight.shape
  experts, loads, jitted = (view() for view in views)
  per_gpu = VIEW_SLOTS // num_gpus
  np.testing.assert_array_equal(experts, phy2log.reshape(num_layers, num_gpus, per_gpu))
  logcnt = np.array([np.bincount(row[row >= 0], minlength=num_experts) for row in phy2log])
  np.testing.assert_array_equal(placement.logcnt, logcnt.reshape(num_layers, num_experts))
  per_replica = weight.astype(np.float64) / np.maximum(logcnt, 1).reshape(weight.shape)
  slot = np.where(phy2log >= 0, np.take_along_axis(per_replica, phy2log.clip(0), -1), 0.0)
  expected = slot.reshape(num_layers, num_gpus, per_gpu).sum(-1)
  chex.assert_shape((loads, jitted), (num_layers, num_gpus))
  # XLA on CPU flushes subnormal results to zero: the absolute tolerance covers them.
  np.testing.assert_allclose(
    loads, expected, rtol=1e-5, atol=VIEW_SLOTS * np.finfo(np.float32).tiny
  )
  chex.assert_trees_all_equal(jitted, loads)


# ------------------------------------------------------------------ gate

GATE_TOPOLOGIES = [eplb_jax.Topology(8, 1, 1, 4), eplb_jax.Topology(8, 1, 1, 4, failed_gpus=(1,))]
GATE_EXPERTS = 4
THRESHOLDS = [0.0, 0.1, 1e6, -1.0, np.nan, np.inf, None, np.array([0.1, 0.2]), "0.1"]


def _gate_jit(topology, per_layer):
  return jax.jit(
    lambda w, c, n, t: eplb_jax.gate_placement(w, topology, c, n, t, per_layer=per_layer)
  )


GATE_JIT = {(t, p): _gate_jit(t, p) for t in GATE_TOPOLOGIES for p in (True, False)}


def _served(phy2log, topology):
  """``[L]`` bool: every expert has a replica on an active GPU (other ids serve nothing)."""
  active = np.zeros(topology.num_replicas, bool)
  active[topology.active_slots()] = True
  held = [set(row[active & (row >= 0) & (row < GATE_EXPERTS)].tolist()) for row in phy2log]
  return np.array([len(experts) == GATE_EXPERTS for experts in held], bool)


def _check_gated(decided, weight, current, new, topology):
  """What any decision must satisfy: a layer of new without some expert is never taken, a
  current one without some expert is left wherever new has them all, and the placement served
  is new's where rebalanced, else the one in service."""
  current = np.where((current >= 0) & (current < GATE_EXPERTS), current, -1)
  current[:, ~np.isin(np.arange(8), topology.active_slots())] = -1
  served_new, served_current = (
    _served(np.asarray(new.phy2log), topology),
    _served(current, topology),
  )
  rebalanced = np.asarray(decided.rebalanced)
  assert not np.any(rebalanced & ~served_new)
  assert np.all(rebalanced | served_current | ~served_new)
  np.testing.assert_array_equal(np.asarray(decided.new_heaviest) == np.inf, ~served_new)
  np.testing.assert_array_equal(np.asarray(decided.current_heaviest) == np.inf, ~served_current)
  kept = from_phy2log(jnp.asarray(current, jnp.int32), GATE_EXPERTS)
  for layer, taken in enumerate(rebalanced):
    source = new if taken else kept
    chex.assert_trees_all_equal(
      jax.tree.map(lambda a, layer=layer: a[layer], decided.placement),
      jax.tree.map(lambda a, layer=layer: jnp.asarray(a[layer], jnp.int32), source),
    )


@given(
  st.sampled_from(GATE_TOPOLOGIES),
  hnp.arrays(np.float32, (2, GATE_EXPERTS), elements=st.floats(0, 100, width=32)),
  hnp.arrays(np.int64, (2, 8), elements=st.integers(-2, GATE_EXPERTS + 1)),
  hnp.arrays(np.int32, (2, 8), elements=st.integers(-1, GATE_EXPERTS - 1)),
  st.sampled_from(THRESHOLDS),
  st.booleans(),
)
def test_gate_valid_or_value_error(topology, weight, current, new_phy2log, threshold, per_layer):
  new = from_phy2log(jnp.asarray(new_phy2log), GATE_EXPERTS)
  try:
    decided = eplb_jax.gate_placement(
      weight, topology, current, new, threshold, per_layer=per_layer
    )
  except ValueError as error:
    message = str(error)
    assert message.startswith(("threshold must", "current_phy2log must", "new must")), message
    if message.startswith("new must"):
      assert not _served(new_phy2log, topology).all()
    if message.startswith("current_phy2log must"):
      assert np.any((current < -1) | (current >= GATE_EXPERTS))
  else:
    _check_gated(decided, weight, current, new, topology)
  if threshold is None or isinstance(threshold, str):  # not a jit argument
    return
  if np.ndim(threshold):
    with pytest.raises(ValueError, match="^threshold must be a scalar"):
      GATE_JIT[topology, per_layer](weight, current.astype(np.int32), new, threshold)
  else:  # under jit: always a decision, never onto a layer of new without some expert
    decided = GATE_JIT[topology, per_layer](weight, current.astype(np.int32), new, threshold)
    _check_gated(decided, weight, current, new, topology)


# ------------------------------------------------------------------ moe_layer

MESH = jax.make_mesh((1,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))


@functools.cache
def _moe_problem():
  return moe_problem()


@functools.partial(jax.jit, static_argnames="factor")
def _moe_and_reference(x, gates, ids, per_slot, logical, log2phy, logcnt, factor):
  maps = (log2phy, logcnt)
  layer = moe.moe_layer(x, gates, ids, per_slot, moe_mlp, *maps, mesh=MESH, capacity_factor=factor)
  reference = moe.moe_reference(
    x, gates, ids, logical, moe_mlp, *maps, num_gpus=1, capacity_factor=factor
  )
  return layer, reference


@pytest.mark.heavy
@settings(max_examples=12)
@given(
  st.sampled_from([0, 1, 5, 16]),
  st.sampled_from([1, 2]),
  st.sampled_from([0, 0, -8, 8, -16]),
  st.sampled_from([None, 0.5, 1.25, 1e308, np.inf, 0.0, np.nan]),
)
def test_moe_layer_matches_the_reference_or_raises(tokens, top_k, extra_slots, factor):
  logical, x, _, _, placement = _moe_problem()
  logits = jax.random.normal(jax.random.key(tokens), (tokens, logical["w_in"].shape[0]))
  gates, ids = moe.top_k_routing(logits, top_k)
  slots = jnp.resize(placement.phy2log, (placement.phy2log.shape[0] + extra_slots,))
  args = (x[:tokens], gates, ids, jax.tree.map(lambda w: w[slots], logical), logical)
  args += (placement.log2phy, placement.logcnt)
  if extra_slots or not (factor is None or 0 < factor < np.inf):
    for call in (_moe_and_reference, _moe_and_reference.__wrapped__):  # jitted and eager
      with pytest.raises(ValueError) as error:
        call(*args, factor=factor)
      assert str(error.value).startswith(
        ("expert_params leaves must" if extra_slots else "capacity_factor must",)
      ), error.value
    return
  (y, stats), expected = _moe_and_reference(*args, factor=factor)
  chex.assert_shape(y, (tokens, x.shape[1]))
  chex.assert_trees_all_close((y, stats), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ CLI write paths

CLI_SIZES = ["--num-replicas", "16", "--num-gpus", "8", "--mode", "greedy", "--no-cache"]
CLI_WEIGHT = np.arange(24.0).reshape(2, 12) % 7 + 1
# Output names: a new file per format, the input itself and the --previous file.
OUTPUTS = ["maps.npz", "maps.json", "sglang.json", "sglang-jax.npy", "loads.npy", "old.json"]
FORMATS = {"sglang.json": "sglang", "sglang-jax.npy": "sglang-jax"}


def _snapshot(directory):
  return {p.name: (p.read_bytes(), stat.S_IMODE(p.stat().st_mode)) for p in directory.iterdir()}


@pytest.mark.heavy
@settings(max_examples=30)
@given(
  st.sampled_from([0, 2]),
  st.sampled_from(OUTPUTS),
  st.sampled_from([None, 0o600, 0o640, 0o444]),
  st.booleans(),
)
def test_cli_write_paths(num_layers, output, existing, use_previous):
  with tempfile.TemporaryDirectory() as name:
    directory = pathlib.Path(name)
    weight = CLI_WEIGHT[:num_layers]
    np.save(directory / "loads.npy", weight)
    fresh = eplb_jax.rebalance_experts(weight, 16, 1, 1, 8, mode="greedy")
    maps = {key: np.asarray(value).tolist() for key, value in fresh._asdict().items()}
    (directory / "old.json").write_text(json.dumps(maps))
    target = directory / output
    if output in ("loads.npy", "old.json"):
      existing = None  # files the run reads
    if existing is not None:
      target.write_bytes(b"previous")
      target.chmod(existing)
    before = _snapshot(directory)
    args = ["plan", str(directory / "loads.npy"), *CLI_SIZES, "--output", str(target)]
    args += ["--previous", str(directory / "old.json")] if use_previous else []
    args += ["--format", FORMATS[output]] if output in FORMATS else []
    with (
      contextlib.redirect_stdout(io.StringIO()),
      contextlib.redirect_stderr(io.StringIO()) as err,
    ):
      status = cli.main(args)
    refused = (
      output == "loads.npy"
      or (output == "old.json" and use_previous)
      or (output in FORMATS and num_layers == 0)  # the engines' files hold no empty map
      or (existing == 0o444 and os.geteuid() != 0)  # root may write any file
    )
    assert status == (2 if refused else 0), err.getvalue()
    after = _snapshot(directory)
    if refused:
      assert err.getvalue().startswith("eplb-jax: error: ")
      assert after == before  # nothing written, no temporary file left
      return
    assert sorted(after) == sorted(set(before) | {output})
    assert {k: v for k, v in after.items() if k != output} == {
      k: v for k, v in before.items() if k != output
    }
    if existing is not None:
      assert after[output][1] == existing
    # What was written reads back as the placement in service.
    np.testing.assert_array_equal(cli.load_previous(target, 16), fresh.phy2log)
