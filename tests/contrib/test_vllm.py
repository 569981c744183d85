"""The vLLM adapter: vLLM's policy interface, torch in and out, old placements honoured.

The placement logic (:func:`vllm_adapter.place`) is tested on NumPy arrays, so it runs
without torch (CI installs only the ``test`` extra); the torch boundary is tested
where torch is installed.
"""

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

# (layers, experts, num_replicas, num_groups, num_nodes, num_ranks): 2 nodes x 4 GPUs x 3 slots.
SHAPE = (3, 16, 24, 4, 2, 8)
L, E, P, GROUPS, NODES, RANKS = SHAPE
SIZES = (P, GROUPS, NODES, RANKS)


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch")


def _loads(seed: int) -> np.ndarray:
  """Skewed token counts [L, E], as vLLM's load window sums them."""
  rng = np.random.default_rng(seed)
  return (rng.gamma(0.7, 300.0, (L, E)) + 1).astype(np.int64)


def _drift(loads: np.ndarray, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return np.round(loads * np.exp(rng.normal(0.0, 0.15, loads.shape))).astype(np.int64)


def _check_map(phy2log, num_experts: int = E, num_layers: int = L, num_slots: int = P) -> None:
  """A [L, P] map naming every expert at least once per layer."""
  values = np.asarray(phy2log)
  assert values.shape == (num_layers, num_slots)
  assert values.min() >= 0 and values.max() < num_experts
  for row in values:
    assert np.all(np.bincount(row, minlength=num_experts) >= 1)


def _moved(old, new) -> int:
  """Replicas arriving on a GPU that did not hold them (empty old slots hold nothing)."""
  old = np.where(np.asarray(old) < 0, E, old)  # E: an id no new slot holds
  moved, _ = eplb_jax.migration_cost(old, np.asarray(new), RANKS)
  return int(np.asarray(moved).sum())


def _place(weight, old=None):
  return np.asarray(vllm_adapter.place(weight, *SIZES, old).phy2log)


@pytest.fixture(scope="module")
def fresh() -> np.ndarray:
  return _place(_loads(0))


def test_place_equals_the_core(fresh):
  phy2log, _, _ = eplb_jax.rebalance_experts(_loads(0), *SIZES)
  chex.assert_trees_all_equal(fresh, np.asarray(phy2log))


def test_honours_old_placement(fresh):
  new_loads = _drift(_loads(0), 1)
  with_old = _place(new_loads, fresh)
  _check_map(with_old)
  assert _moved(fresh, with_old) < _moved(fresh, _place(new_loads))


def test_kept_experts_stay_in_their_old_slots(fresh):
  # The property vLLM's test_preserve_intragpu_slots checks of its default policy.
  new = _place(_drift(_loads(0), 2), fresh)
  per_gpu = P // RANKS
  for old_row, new_row in zip(fresh, new, strict=True):
    for gpu in range(RANKS):
      old_seg = old_row[gpu * per_gpu : (gpu + 1) * per_gpu].tolist()
      new_seg = new_row[gpu * per_gpu : (gpu + 1) * per_gpu].tolist()
      for expert in set(old_seg) & set(new_seg):
        assert new_seg[old_seg.index(expert)] == expert


def test_empty_slots_in_old_map(fresh):
  # After an elastic-EP scale-up vLLM's map holds -1 in the slots that are new.
  old = fresh.copy()
  old[:, -RANKS // 2 * (P // RANKS) :] = -1
  new = _place(_drift(_loads(0), 3), old)
  _check_map(new)
  assert _moved(old, new) < _moved(old, _place(_drift(_loads(0), 3)))


def test_all_empty_old_map_is_fresh(fresh):
  chex.assert_trees_all_equal(_place(_loads(0), np.full((L, P), -1)), fresh)


@pytest.mark.parametrize(
  "columns", [P + P // RANKS * 2, P - P // RANKS * 2], ids=["wider", "narrower"]
)
def test_old_map_of_another_width(fresh, columns):
  # Elastic EP: the old map covers more (scale-down) or fewer (scale-up) slots.
  old = np.concatenate([fresh, fresh], axis=1)[:, :columns]
  _check_map(_place(_drift(_loads(0), 4), old))


@pytest.mark.parametrize(
  "weight, message",
  [
    (np.ones(E), "weight must be 2-D"),
    (np.full((L, E), -1.0), "non-negative"),
    (np.full((L, E), np.nan), "finite"),
    (np.ones((L, E), dtype=bool), "integer or float"),
  ],
  ids=["1d", "negative", "nan", "bool"],
)
def test_bad_loads(weight, message):
  with pytest.raises(ValueError, match=message):
    vllm_adapter.place(weight, *SIZES)


def test_bad_old_map(fresh):
  with pytest.raises(ValueError, match="expert ids below"):
    vllm_adapter.place(_loads(0), *SIZES, fresh + E)
  with pytest.raises(ValueError, match="layers"):
    vllm_adapter.place(_loads(0), *SIZES, fresh[:1])
  with pytest.raises(ValueError, match="mode"):
    vllm_adapter.place(_loads(0), *SIZES, mode="fast")


# ------------------------------------------------------------------ the torch boundary


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


def _check_tensor(torch, tensor) -> None:
  """vLLM's contract: int64 on the CPU (vLLM asserts the device and calls .numpy())."""
  assert isinstance(tensor, torch.Tensor)
  assert tensor.dtype == torch.int64
  assert tensor.device == torch.device("cpu")


@pytest.mark.parametrize("dtype", ["int32", "int64", "float32", "bfloat16"])
def test_policy_takes_and_returns_torch(torch, fresh, dtype):
  weight = torch.from_numpy(_loads(0)).to(getattr(torch, dtype))
  old = torch.from_numpy(fresh.astype(np.int64))
  phy2log = vllm_adapter.EplbJaxPolicy.rebalance_experts(weight, *SIZES)
  _check_tensor(torch, phy2log)
  _check_map(phy2log.numpy())
  if dtype == "int64":
    chex.assert_trees_all_equal(phy2log.numpy(), fresh.astype(np.int64))
    with_old = vllm_adapter.EplbJaxPolicy.rebalance_experts(weight, *SIZES, old)
    chex.assert_trees_all_equal(with_old.numpy(), _place(_loads(0), fresh).astype(np.int64))


def test_return_maps_gives_three_cpu_int64_tensors(torch, fresh):
  class ThreeMaps(vllm_adapter.EplbJaxPolicy):
    return_maps = True

  phy2log, log2phy, logcnt = ThreeMaps.rebalance_experts(torch.from_numpy(_loads(0)), *SIZES)
  for tensor in (phy2log, log2phy, logcnt):
    _check_tensor(torch, tensor)
  chex.assert_trees_all_equal(phy2log.numpy(), fresh.astype(np.int64))
  assert tuple(log2phy.shape) == (L, E, P - E + 1)
  np.testing.assert_array_equal(logcnt.numpy(), [np.bincount(row, minlength=E) for row in fresh])


def test_cuda_loads_give_cpu_map(torch):
  if not torch.cuda.is_available():
    pytest.skip("no CUDA device")
  phy2log = vllm_adapter.EplbJaxPolicy.rebalance_experts(torch.from_numpy(_loads(0)).cuda(), *SIZES)
  _check_tensor(torch, phy2log)


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
  # tuple[Tensor, ...] up to v0.14 and Tensor from v0.23 (object stands in for torch.Tensor).
  returned = tuple[object, object, object] if returns_tuple else object
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
  assert registered.return_maps and registered.mode == "gpu_aware"


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
