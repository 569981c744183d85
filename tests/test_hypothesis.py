"""Property tests over random loads, dtypes and ids: a valid result or a clear ValueError.

Shapes come from a few fixed configurations, so each compiles once; the
values, dtypes and edge cases are what Hypothesis varies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS
from conftest import check_placement
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import eplb_jax
from eplb_jax.runtime import dispatch
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
