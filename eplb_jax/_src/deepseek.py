"""DeepSeek's signatures: the balancer and its building blocks on sizes given as Python ints.

:func:`rebalance_experts` is :func:`.api.rebalance` on the :class:`Topology`
of its sizes; the others are DeepSeek's steps on their own
(:func:`rebalance_experts_hierarchical`, :func:`replicate_experts`,
:func:`balanced_packing`), each a check of its arguments and a jitted core.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import jax
from jax.sharding import Mesh

from eplb_jax._src import checks
from eplb_jax._src import packing
from eplb_jax._src import placement
from eplb_jax._src import replication
from eplb_jax._src import sharding
from eplb_jax._src.api import over_rows
from eplb_jax._src.api import rebalance
from eplb_jax._src.modes import DEFAULT_MODE
from eplb_jax._src.modes import Mode
from eplb_jax._src.modes import check_mode
from eplb_jax._src.placement import Placement
from eplb_jax._src.problem import PackingProblem
from eplb_jax._src.topology import Topology


def rebalance_experts(
  weight: jax.typing.ArrayLike,
  num_replicas: int,
  num_groups: int,
  num_nodes: int,
  num_gpus: int,
  *,
  mode: str | Mode = DEFAULT_MODE,
  previous_phy2log: jax.typing.ArrayLike | None = None,
  failed_gpus: Iterable[int] = (),
  mesh: Mesh | None = None,
  layer_axis: sharding.AxisName | None = None,
) -> Placement:
  """Expert-parallelism load balancer: DeepSeek's ``rebalance_experts`` in JAX.

  Uses the hierarchical policy when ``num_groups % num_nodes == 0`` and the
  global one (a single group and node) otherwise. Sizes are static Python
  ints; ``weight`` may be traced, and a new ``weight`` never retraces.
  Under ``jax.jit`` negative, NaN and infinite loads count as 0; called
  eagerly they raise ``ValueError``.

  Args:
    weight: ``[L, E]`` load statistics of each logical expert, int or float;
      or a window ``[N, L, E]``, summed over ``N`` (as :func:`rebalance`).
    num_replicas: ``P``, physical expert slots; a multiple of ``num_gpus``, ``>= E``.
    num_groups: expert groups (the hierarchical path needs ``E % num_groups == 0``).
    num_nodes: server nodes; ``num_gpus`` must be a multiple of it.
    num_gpus: GPUs in total.
    mode: ``"gpu_aware"`` (default: replica counts chosen for the heaviest
      GPU, never heavier than greedy's, see :class:`GpuAware`), ``"refined"``
      (DeepSeek's counts, a better packing; faster), ``"greedy"``
      (DeepSeek's placement exactly), or a mode instance.
    previous_phy2log: optional ``[L, P]`` placement in service (-1 marks an
      empty slot). When given, the result keeps replicas where they are as
      far as it can while every layer's heaviest GPU stays within 0.1% of a
      fresh placement's (see :func:`rebalance_with_previous`).
    failed_gpus: static ids of GPUs that hold no replica (elastic EP; see
      :attr:`Topology.failed_gpus`); their slots come back as -1.
    mesh: optional device mesh; with ``layer_axis``, each device balances its
      own layers (no communication) and the maps come back sharded as
      ``NamedSharding(mesh, P(layer_axis))``. ``L`` must divide evenly.
    layer_axis: the mesh axis name (or tuple of names) that splits the layers.

  Returns:
    A :class:`Placement`, which unpacks as DeepSeek's ``(phy2log, log2phy,
    logcnt)``, int32: ``phy2log [L, P]`` the logical expert of each physical
    slot (``P / num_gpus`` consecutive slots per GPU; -1 on a failed GPU),
    ``log2phy [L, E, P - E + 1]`` the slots of each expert, -1 padded, and
    ``logcnt [L, E]`` the number of replicas of each expert.

  Example:
    >>> import numpy as np
    >>> import eplb_jax
    >>> weight = np.array([[4.0, 1.0, 1.0, 2.0]])  # one layer, four experts
    >>> phy2log, log2phy, logcnt = eplb_jax.rebalance_experts(weight, 6, 1, 1, 2)
    >>> logcnt
    Array([[2, 1, 1, 2]], dtype=int32)
    >>> log2phy[0, 0]  # the slots of expert 0
    Array([ 3,  0, -1], dtype=int32)
  """
  return rebalance(
    weight,
    Topology(num_replicas, num_groups, num_nodes, num_gpus, failed_gpus),
    mode=mode,
    previous_phy2log=previous_phy2log,
    mesh=mesh,
    layer_axis=layer_axis,
  )


@functools.partial(jax.jit, static_argnums=(1, 2))
@over_rows
def _hierarchical(weight: jax.Array, topology: Topology, mode: Mode):
  return placement.place_rows(checks.sanitize_weight(weight), topology, mode)


def rebalance_experts_hierarchical(
  weight: jax.typing.ArrayLike,
  num_replicas: int,
  num_groups: int,
  num_nodes: int,
  num_gpus: int,
  *,
  mode: str | Mode = DEFAULT_MODE,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Hierarchical placement: groups onto nodes, then replicas onto GPUs (DeepSeek's).

  Args:
    weight: ``[L, E]`` load of each logical expert, or a window ``[N, L, E]``
      summed over ``N``.
    num_replicas: ``P``, total slots (DeepSeek's ``num_physical_experts``); a
      multiple of ``num_gpus``, ``>= E``.
    num_groups: expert groups; must divide ``E`` and be a multiple of ``num_nodes``.
    num_nodes: server nodes (fast intra-node links); must divide ``num_gpus``.
    num_gpus: GPUs in total.
    mode: ``"gpu_aware"`` (default), ``"refined"``, ``"greedy"`` (DeepSeek's
      placement), or a mode instance.

  Returns:
    ``(phy2log, phyrank, logcnt)``, int32: ``phy2log [L, P]`` the expert in each
    slot (slots numbered GPU by GPU), ``phyrank [L, P]`` each slot's replica
    index within its expert, ``logcnt [L, E]`` the replicas of each expert.
  """
  topology = Topology(num_replicas, num_groups, num_nodes, num_gpus)
  mode = check_mode(mode)
  weight = checks.check_loads(weight, topology, hierarchical=True)
  return _hierarchical(weight, topology, mode)


@functools.partial(jax.jit, static_argnums=1)
@over_rows
def _replicate(weight: jax.Array, num_replicas: int):
  return replication.replicate_rows(checks.sanitize_weight(weight), num_replicas)


def replicate_experts(
  weight: jax.typing.ArrayLike, num_replicas: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Replicates ``n`` experts into ``num_replicas`` slots, minimising the max load per replica.

  Args:
    weight: ``[X, n]`` load of each logical expert (int or float).
    num_replicas: replicas per row in total (DeepSeek's ``num_phy``), ``>= n``.

  Returns:
    ``(phy2log, rank, logcnt)``, int32: ``phy2log [X, num_replicas]`` the
    logical expert of each slot (slot ``i < n`` holds expert ``i``; the
    redundant slots follow in greedy order), ``rank [X, num_replicas]`` the
    replica index of each slot within its expert, ``logcnt [X, n]`` replicas
    per expert.
  """
  weight = checks.check_weight(weight)
  num_replicas = checks.check_num_replicas(num_replicas, weight.shape[1])
  checks.check_weight_values(weight)
  return _replicate(weight, num_replicas)


@functools.partial(jax.jit, static_argnums=(1, 2))
@over_rows
def _pack(weight: jax.Array, num_packs: int, mode: Mode) -> tuple[jax.Array, jax.Array]:
  problem = PackingProblem.distinct(checks.sanitize_weight(weight))
  return jax.vmap(packing.slots_to_index)(packing.pack_slots(problem, num_packs, mode))


def balanced_packing(
  weight: jax.typing.ArrayLike, num_packs: int, *, mode: str | Mode = "refined"
) -> tuple[jax.Array, jax.Array]:
  """Packs ``n`` weighted items into ``num_packs`` packs of ``n / num_packs`` items each.

  Args:
    weight: ``[X, n]`` weight of each item; each row is packed independently.
    num_packs: number of packs; must divide ``n``.
    mode: ``"greedy"`` (DeepSeek's packing, exactly), ``"refined"``
      (balanced differencing plus swap refinement), or a mode instance
      (``"gpu_aware"`` packs as ``"refined"``: there are no counts to choose).

  Returns:
    ``(pack_index, rank_in_pack)``, int32 ``[X, n]``: the pack of each item and
    its position inside that pack.
  """
  weight = checks.check_weight(weight)
  num_packs = checks.check_num_packs(num_packs, weight.shape[1])
  mode = check_mode(mode)
  checks.check_weight_values(weight)
  return _pack(weight, num_packs, mode)
