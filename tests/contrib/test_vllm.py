"""The vLLM adapter: vLLM's policy interface, torch in and out, old placements honoured."""

from __future__ import annotations

import abc
import inspect
import sys
import types

import chex
import numpy as np
import pytest

import eplb_jax
from eplb_jax.contrib import vllm as vllm_adapter

torch = pytest.importorskip("torch")

# (layers, experts, num_replicas, num_groups, num_nodes, num_ranks): 2 nodes x 4 GPUs x 3 slots.
SHAPE = (3, 16, 24, 4, 2, 8)
L, E, P, GROUPS, NODES, RANKS = SHAPE
SIZES = (P, GROUPS, NODES, RANKS)


def _loads(seed: int, dtype=torch.int64) -> torch.Tensor:
  """Skewed token counts [L, E], as vLLM's load window sums them."""
  rng = np.random.default_rng(seed)
  return torch.from_numpy((rng.gamma(0.7, 300.0, (L, E)) + 1).astype(np.int64)).to(dtype)


def _drift(loads: torch.Tensor, seed: int) -> torch.Tensor:
  rng = np.random.default_rng(seed)
  factor = np.exp(rng.normal(0.0, 0.15, tuple(loads.shape)))
  return torch.from_numpy(np.round(loads.numpy() * factor).astype(np.int64))


def _check_map(phy2log: torch.Tensor, num_experts: int, num_layers: int, num_slots: int) -> None:
  """vLLM's contract: an int64 CPU [L, P] map naming every expert at least once per layer."""
  assert isinstance(phy2log, torch.Tensor)
  assert phy2log.dtype == torch.int64
  assert phy2log.device == torch.device("cpu")
  assert tuple(phy2log.shape) == (num_layers, num_slots)
  values = phy2log.numpy()
  assert values.min() >= 0 and values.max() < num_experts
  for row in values:
    assert np.all(np.bincount(row, minlength=num_experts) >= 1)


def _moved(old: torch.Tensor, new: torch.Tensor) -> int:
  """Replicas arriving on a GPU that did not hold them (empty old slots hold nothing)."""
  old = np.where(old.numpy() < 0, E, old.numpy())  # E: an id no new slot holds
  moved, _ = eplb_jax.migration_cost(old, new.numpy(), RANKS)
  return int(np.asarray(moved).sum())


@pytest.fixture(scope="module")
def fresh() -> torch.Tensor:
  return vllm_adapter.EplbJaxPolicy.rebalance_experts(_loads(0), *SIZES)


def test_signature_is_vllms():
  # vllm/distributed/eplb/policy/abstract.py (vLLM 0.34.0): a classmethod with these parameters.
  assert isinstance(
    inspect.getattr_static(vllm_adapter.EplbJaxPolicy, "rebalance_experts"), classmethod
  )
  parameters = inspect.signature(vllm_adapter.EplbJaxPolicy.rebalance_experts).parameters
  assert list(parameters) == [
    "weight",
    "num_replicas",
    "num_groups",
    "num_nodes",
    "num_ranks",
    "old_global_expert_indices",
  ]
  assert parameters["old_global_expert_indices"].default is None


def test_fresh_returns_vllms_types(fresh):
  _check_map(fresh, E, L, P)


def test_equals_the_core(fresh):
  phy2log, _, _ = eplb_jax.rebalance_experts(_loads(0).numpy(), *SIZES)
  chex.assert_trees_all_equal(fresh.numpy(), np.asarray(phy2log, np.int64))


@pytest.mark.parametrize(
  "dtype", [torch.int32, torch.int64, torch.float32, torch.bfloat16], ids=str
)
def test_load_dtypes(dtype):
  phy2log = vllm_adapter.EplbJaxPolicy.rebalance_experts(_loads(0, dtype), *SIZES)
  _check_map(phy2log, E, L, P)


def test_return_maps_gives_three_cpu_int64_tensors(fresh):
  class ThreeMaps(vllm_adapter.EplbJaxPolicy):
    return_maps = True

  phy2log, log2phy, logcnt = ThreeMaps.rebalance_experts(_loads(0), *SIZES)
  for tensor in (phy2log, log2phy, logcnt):
    assert tensor.dtype == torch.int64 and tensor.device == torch.device("cpu")
  chex.assert_trees_all_equal(phy2log.numpy(), fresh.numpy())
  assert tuple(log2phy.shape) == (L, E, P - E + 1)
  for layer in range(L):
    np.testing.assert_array_equal(np.bincount(phy2log[layer].numpy(), minlength=E), logcnt[layer])
    for expert in range(E):
      slots = log2phy[layer, expert, : logcnt[layer, expert]].numpy()
      assert np.all(phy2log[layer].numpy()[slots] == expert)


def test_honours_old_placement(fresh):
  new_loads = _drift(_loads(0), 1)
  with_old = vllm_adapter.EplbJaxPolicy.rebalance_experts(new_loads, *SIZES, fresh)
  without = vllm_adapter.EplbJaxPolicy.rebalance_experts(new_loads, *SIZES)
  _check_map(with_old, E, L, P)
  assert _moved(fresh, with_old) < _moved(fresh, without)


def test_kept_experts_stay_in_their_old_slots(fresh):
  # The property vLLM's test_preserve_intragpu_slots checks of its default policy.
  new = vllm_adapter.EplbJaxPolicy.rebalance_experts(_drift(_loads(0), 2), *SIZES, fresh)
  per_gpu = P // RANKS
  for old_row, new_row in zip(fresh.numpy(), new.numpy(), strict=True):
    for gpu in range(RANKS):
      old_seg = old_row[gpu * per_gpu : (gpu + 1) * per_gpu].tolist()
      new_seg = new_row[gpu * per_gpu : (gpu + 1) * per_gpu].tolist()
      for expert in set(old_seg) & set(new_seg):
        assert new_seg[old_seg.index(expert)] == expert


def test_empty_slots_in_old_map(fresh):
  # After an elastic-EP scale-up vLLM's map holds -1 in the slots that are new.
  old = fresh.clone()
  old[:, -RANKS // 2 * (P // RANKS) :] = -1
  new = vllm_adapter.EplbJaxPolicy.rebalance_experts(_drift(_loads(0), 3), *SIZES, old)
  _check_map(new, E, L, P)
  without = vllm_adapter.EplbJaxPolicy.rebalance_experts(_drift(_loads(0), 3), *SIZES)
  assert _moved(old, new) < _moved(old, without)


def test_all_empty_old_map_is_fresh(fresh):
  old = torch.full((L, P), -1, dtype=torch.int64)
  chex.assert_trees_all_equal(
    vllm_adapter.EplbJaxPolicy.rebalance_experts(_loads(0), *SIZES, old).numpy(), fresh.numpy()
  )


@pytest.mark.parametrize(
  "columns", [P + P // RANKS * 2, P - P // RANKS * 2], ids=["wider", "narrower"]
)
def test_old_map_of_another_width(fresh, columns):
  # Elastic EP: the old map covers more (scale-down) or fewer (scale-up) slots.
  if columns > P:
    old = torch.cat([fresh, fresh[:, : columns - P]], dim=1)
  else:
    old = fresh[:, :columns]
  new = vllm_adapter.EplbJaxPolicy.rebalance_experts(_drift(_loads(0), 4), *SIZES, old)
  _check_map(new, E, L, P)


@pytest.mark.parametrize(
  "weight, message",
  [
    (torch.ones(E), "weight must be 2-D"),
    (torch.full((L, E), -1.0), "non-negative"),
    (torch.full((L, E), float("nan")), "finite"),
    (torch.ones((L, E), dtype=torch.bool), "integer or float"),
  ],
  ids=["1d", "negative", "nan", "bool"],
)
def test_bad_loads(weight, message):
  with pytest.raises(ValueError, match=message):
    vllm_adapter.EplbJaxPolicy.rebalance_experts(weight, *SIZES)


def test_bad_old_map(fresh):
  with pytest.raises(ValueError, match="expert ids below"):
    vllm_adapter.EplbJaxPolicy.rebalance_experts(_loads(0), *SIZES, fresh + E)
  with pytest.raises(ValueError, match="layers"):
    vllm_adapter.EplbJaxPolicy.rebalance_experts(_loads(0), *SIZES, fresh[:1])


def test_bad_mode():
  class Bad(vllm_adapter.EplbJaxPolicy):
    mode = "fast"

  with pytest.raises(ValueError, match="mode"):
    Bad.rebalance_experts(_loads(0), *SIZES)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_loads_give_cpu_map():
  phy2log = vllm_adapter.EplbJaxPolicy.rebalance_experts(_loads(0).cuda(), *SIZES)
  _check_map(phy2log, E, L, P)


# ------------------------------------------------------------------ register() and plugin()


def _fake_vllm(monkeypatch, returns_tuple: bool) -> types.ModuleType:
  """Installs a stand-in for ``vllm.distributed.eplb.policy`` with vLLM's registry layout."""

  class AbstractEplbPolicy(abc.ABC):
    @classmethod
    @abc.abstractmethod
    def rebalance_experts(
      cls, weight, num_replicas, num_groups, num_nodes, num_ranks, old_global_expert_indices=None
    ):
      raise NotImplementedError

  # vLLM's abstract.py has no postponed annotations: the return annotation is a real type,
  # tuple[...] up to v0.14 and torch.Tensor from v0.23.
  returned = tuple[torch.Tensor, torch.Tensor, torch.Tensor] if returns_tuple else torch.Tensor
  AbstractEplbPolicy.rebalance_experts.__func__.__annotations__["return"] = returned

  class DefaultEplbPolicy(AbstractEplbPolicy):
    @classmethod
    def rebalance_experts(cls, *args, **kwargs):
      raise NotImplementedError

  modules = [
    types.ModuleType(name) for name in ("vllm", "vllm.distributed", "vllm.distributed.eplb")
  ]
  policy = types.ModuleType("vllm.distributed.eplb.policy")
  policy.AbstractEplbPolicy = AbstractEplbPolicy
  policy.EPLB_POLICIES = {"default": DefaultEplbPolicy}
  for parent, child in zip(modules, [*modules[1:], policy], strict=True):
    setattr(parent, child.__name__.rsplit(".", 1)[1], child)
  for module in (*modules, policy):
    monkeypatch.setitem(sys.modules, module.__name__, module)
  return policy


def test_register_without_vllm(monkeypatch):
  monkeypatch.setitem(sys.modules, "vllm", None)
  assert vllm_adapter.register() is None


def test_register_adds_a_vllm_policy(monkeypatch):
  policy = _fake_vllm(monkeypatch, returns_tuple=False)
  registered = vllm_adapter.register(mode="greedy")
  assert policy.EPLB_POLICIES["eplb_jax"] is registered
  assert policy.EPLB_POLICIES["default"] is not registered
  assert issubclass(registered, policy.AbstractEplbPolicy)
  assert not inspect.isabstract(registered)
  assert registered.mode == "greedy" and not registered.return_maps


def test_register_replaces_default_and_follows_return_type(monkeypatch):
  policy = _fake_vllm(monkeypatch, returns_tuple=True)
  registered = vllm_adapter.register(replace_default=True)
  assert policy.EPLB_POLICIES["default"] is registered
  assert registered.return_maps and registered.mode == "refined"


def test_plugin_reads_the_environment(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  policy = _fake_vllm(monkeypatch, returns_tuple=False)
  monkeypatch.delenv(vllm_adapter.ENV_MODE, raising=False)
  vllm_adapter.plugin()
  assert "eplb_jax" in policy.EPLB_POLICIES
  assert not issubclass(policy.EPLB_POLICIES["default"], vllm_adapter.EplbJaxPolicy)
  monkeypatch.setenv(vllm_adapter.ENV_MODE, "greedy")
  vllm_adapter.plugin()
  assert policy.EPLB_POLICIES["default"].mode == "greedy"
  monkeypatch.setenv(vllm_adapter.ENV_MODE, "fastest")
  with pytest.raises(ValueError, match="mode"):
    vllm_adapter.plugin()
