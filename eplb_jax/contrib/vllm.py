"""eplb_jax as a vLLM EPLB policy.

:class:`EplbJaxPolicy` has the interface of vLLM's policies
(``vllm/distributed/eplb/policy/abstract.py``, checked against vLLM 0.34.0):
a classmethod ``rebalance_experts(weight, num_replicas, num_groups, num_nodes,
num_ranks, old_global_expert_indices=None)`` that takes the logical loads
``[L, E]`` as a torch tensor and returns the new ``physical_to_logical_map
[L, P]`` as an int64 CPU tensor, as vLLM's ``DefaultEplbPolicy`` does (vLLM
calls ``.numpy()`` on it and asserts it is on the CPU). The placement in
service, ``old_global_expert_indices`` (vLLM passes its current
``physical_to_logical_map``, ``[L, P]``, despite the docstring's
``[layers, num_logical_experts]``), is honoured through eplb_jax's
migration-aware rebalancing: replicas stay on their GPUs, and in their slots,
as far as balance allows. Its -1 entries (empty slots after an elastic-EP
scale-up) count as empty.

Enabling it in vLLM
-------------------
vLLM looks the policy up by name, ``EPLB_POLICIES[eplb_config.policy]``, when
a model is added to its EPLB state, in every worker process. In vLLM 0.34.0
``EPLBConfig.policy`` is ``Literal["default"]`` (a pydantic field, so
``--eplb-config '{"policy": "eplb_jax"}'`` is rejected), and async EPLB
(``use_async``, on by default) is refused for any policy but ``"default"``.
So the working route is to install eplb_jax in place of the default policy,
in every vLLM process, through vLLM's general-plugin entry point group
(loaded in the API server, engine core and every worker). eplb-jax declares
that entry point in its ``pyproject.toml``::

  [project.entry-points."vllm.general_plugins"]
  eplb_jax = "eplb_jax.contrib.vllm:plugin"

so installing eplb-jax next to vLLM is enough; then run vLLM with
``EPLB_JAX_VLLM=gpu_aware`` (or another mode: ``refined``, ``greedy``) in the environment, together
with ``--enable-eplb`` and the usual ``--eplb-config '{"window_size": ..., "step_interval": ...,
"num_redundant_experts": ...}'``. Without ``EPLB_JAX_VLLM`` the plugin only
adds the policy under the name ``"eplb_jax"`` and changes nothing. In a
script that builds the engine in-process, ``register(replace_default=True)``
before ``LLM(...)`` does the same, but only for that process.

JAX in a vLLM process
---------------------
The policy runs on the host (vLLM hands it CPU tensors), so JAX needs no
accelerator there. A JAX with a CUDA backend would preallocate most of the
GPU's memory as soon as it starts; :func:`plugin` therefore selects JAX's CPU
platform unless ``JAX_PLATFORMS`` is set. Set ``JAX_PLATFORMS=cpu`` yourself
when you call :func:`register` instead.

torch is imported only when the policy runs (:func:`place` is the same
computation on NumPy arrays, without torch); vLLM only in :func:`register`.
"""

from __future__ import annotations

import inspect
import os
from typing import TYPE_CHECKING
from typing import Any

import jax
import numpy as np

import eplb_jax
from eplb_jax._src import checks
from eplb_jax._src import modes

if TYPE_CHECKING:
  import torch

POLICY_NAME = "eplb_jax"
MODES = tuple(modes.MODES)
# Environment variable read by :func:`plugin`: a mode installs eplb_jax as vLLM's default policy.
ENV_MODE = "EPLB_JAX_VLLM"


class EplbJaxPolicy:
  """vLLM EPLB policy backed by :func:`eplb_jax.rebalance_experts`.

  Stateless, like vLLM's policies: vLLM calls the classmethod on the class.
  Subclass it (or use :func:`register`'s ``mode``) to change the class
  attributes.

  Attributes:
    mode: eplb_jax's mode, ``"gpu_aware"`` (default), ``"refined"`` or
      ``"greedy"`` (DeepSeek's placement, the algorithm of vLLM's default policy).
    return_maps: return ``(phy2log, log2phy, logcnt)`` instead of ``phy2log``
      alone, for vLLM releases whose policies return the three maps (the
      abstract policy of v0.13 and v0.14 does); :func:`register` sets it from
      the installed vLLM.
  """

  mode: str = modes.DEFAULT_MODE
  return_maps: bool = False

  @classmethod
  def rebalance_experts(
    cls,
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
    old_global_expert_indices: torch.Tensor | None = None,
  ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entry point with vLLM's policy signature.

    Uses the hierarchical policy when ``num_groups % num_nodes == 0`` and the
    global one otherwise, like vLLM's default policy.

    Args:
      weight: ``[L, E]`` load of each logical expert (any real dtype, any
        device); vLLM passes the window's token counts, summed over steps.
      num_replicas: ``P``, physical expert slots; a multiple of ``num_ranks``.
      num_groups: expert groups of the model.
      num_nodes: server nodes; ``num_ranks`` must be a multiple of it.
      num_ranks: EP ranks (GPUs); slot ``s`` is on rank ``s // (P / num_ranks)``.
      old_global_expert_indices: optional placement in service, ``[L, P_old]``
        integer, -1 for an empty slot. When ``P_old != P`` (elastic EP), the
        first ``P`` columns are taken (the surviving ranks are assumed to be
        the first ones, as vLLM's default policy assumes) or the missing
        columns count as empty.

    Returns:
      ``physical_to_logical_map [L, P]``, int64 on the CPU (with
      ``return_maps``: also ``logical_to_physical_map [L, E, P - E + 1]``,
      -1 padded, and ``logical_replica_count [L, E]``, both int64 on the CPU).

    Raises:
      ValueError: for loads that are not 2-D, negative or not finite, sizes
        that do not fit (eplb_jax's messages name the argument), or an old
        map of the wrong rank or with ids ``>= E``. vLLM's default policy
        raises ``AssertionError`` for the sizes instead.
    """
    import torch

    placement = place(
      weight,
      num_replicas,
      num_groups,
      num_nodes,
      num_ranks,
      old_global_expert_indices,
      mode=cls.mode,
    )
    phy2log, log2phy, logcnt = (torch.from_numpy(np.asarray(a, np.int64)) for a in placement)
    if cls.return_maps:
      return phy2log, log2phy, logcnt
    return phy2log


def place(
  weight: Any,
  num_replicas: int,
  num_groups: int,
  num_nodes: int,
  num_ranks: int,
  old_global_expert_indices: Any = None,
  *,
  mode: str = modes.DEFAULT_MODE,
) -> eplb_jax.Placement:
  """:meth:`EplbJaxPolicy.rebalance_experts` without torch: arrays in, a :class:`Placement` out.

  Takes NumPy arrays or torch tensors (any device) with the policy's
  arguments and rules, and returns eplb_jax's int32 maps.
  """
  loads = _loads_to_numpy(weight)
  previous = _previous_to_numpy(old_global_expert_indices, loads.shape, num_replicas)
  return eplb_jax.rebalance_experts(
    loads,
    num_replicas,
    num_groups,
    num_nodes,
    num_ranks,
    mode=_check_mode(mode),
    previous_phy2log=previous,
  )


def _check_mode(mode: str) -> str:
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  return mode


def _to_numpy(tensor: Any) -> np.ndarray:
  """A host NumPy copy of a torch tensor (any device), or ``np.asarray`` of anything else."""
  if hasattr(tensor, "detach"):
    tensor = tensor.detach().cpu()
    if str(tensor.dtype) in ("torch.bfloat16", "torch.float16"):
      tensor = tensor.float()
    return tensor.numpy()
  return np.asarray(tensor)


def _loads_to_numpy(weight: Any) -> np.ndarray:
  """The loads ``[L, E]`` as float32, checked eagerly (the traced path would zero bad values)."""
  loads = checks.check_weight(_to_numpy(weight))
  checks.check_weight_values(loads)
  return loads


def _previous_to_numpy(
  old: Any, loads_shape: tuple[int, int], num_replicas: int
) -> np.ndarray | None:
  """The old map as int32 ``[L, P]`` with -1 for empty slots, or None when it holds no replica."""
  if old is None:
    return None
  previous = _to_numpy(old)
  num_layers, num_experts = loads_shape
  if previous.ndim != 2 or previous.shape[0] != num_layers:
    raise ValueError(
      f"old_global_expert_indices must be [layers, slots] with {num_layers} layers, "
      f"got shape {previous.shape}"
    )
  if not np.issubdtype(previous.dtype, np.integer):
    raise ValueError(f"old_global_expert_indices must be integer, got {previous.dtype}")
  if previous.size and previous.max() >= num_experts:
    raise ValueError(
      f"old_global_expert_indices must hold expert ids below {num_experts} (or -1), "
      f"found {previous.max()}"
    )
  previous = previous.astype(np.int64)[:, :num_replicas]
  missing = num_replicas - previous.shape[1]
  if missing:
    previous = np.pad(previous, ((0, 0), (0, missing)), constant_values=-1)
  previous = np.where(previous < 0, -1, previous).astype(np.int32)
  if np.all(previous < 0):
    return None
  return previous


def _returns_three_maps(abstract_policy: type | None) -> bool:
  """Whether vLLM's abstract policy annotates ``rebalance_experts`` as returning a tuple."""
  if abstract_policy is None:
    return False
  annotation = inspect.signature(abstract_policy.rebalance_experts).return_annotation
  if isinstance(annotation, str):
    return annotation.replace(" ", "").startswith(("tuple", "Tuple"))
  return getattr(annotation, "__origin__", None) is tuple


def register(
  name: str = POLICY_NAME, *, replace_default: bool = False, mode: str | None = None
) -> type | None:
  """Adds eplb_jax to vLLM's EPLB policy registry, when vLLM is importable.

  Only affects the calling process: vLLM's workers run in other processes,
  so call it from a ``vllm.general_plugins`` entry point (see :func:`plugin`)
  for a served model.

  Args:
    name: the registry key. vLLM 0.34.0 only accepts ``"default"`` as
      ``eplb_config.policy``, so a new name is visible in the registry but not
      selectable there without ``replace_default``.
    replace_default: also install the policy under ``"default"``, which is
      what vLLM then uses (async EPLB included).
    mode: one of :data:`MODES`; default the class's, ``"gpu_aware"``.

  Returns:
    The registered policy class (a subclass of :class:`EplbJaxPolicy` and of
    vLLM's ``AbstractEplbPolicy``), or None when vLLM is not installed.
  """
  if mode is not None:
    _check_mode(mode)
  try:
    from vllm.distributed.eplb import policy as vllm_policy
  except ImportError:
    return None
  abstract_policy = getattr(vllm_policy, "AbstractEplbPolicy", None)
  bases = (EplbJaxPolicy,) if abstract_policy is None else (EplbJaxPolicy, abstract_policy)
  attributes: dict[str, Any] = {"return_maps": _returns_three_maps(abstract_policy)}
  if mode is not None:
    attributes["mode"] = mode
  policy = type("EplbJaxPolicy", bases, attributes)
  vllm_policy.EPLB_POLICIES[name] = policy
  if replace_default:
    vllm_policy.EPLB_POLICIES["default"] = policy
  return policy


def plugin() -> None:
  """Entry point for vLLM's ``vllm.general_plugins`` group (run in every vLLM process).

  Registers the policy as ``"eplb_jax"``. When ``EPLB_JAX_VLLM`` is set to a
  mode (``gpu_aware``, ``refined`` or ``greedy``) it also replaces vLLM's default policy,
  and, unless ``JAX_PLATFORMS`` is set, keeps JAX on the CPU so that it does
  not claim GPU memory in vLLM's processes.
  """
  mode = os.environ.get(ENV_MODE) or None
  if mode is not None:
    _check_mode(mode)
    if not os.environ.get("JAX_PLATFORMS"):
      jax.config.update("jax_platforms", "cpu")
  register(replace_default=mode is not None, mode=mode)
