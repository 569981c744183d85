"""The public entry points: check the arguments, then run a jitted core.

:func:`rebalance` is the balancer on a :class:`Topology`; it serves the fresh
placement, the migration-aware one (given the placement in service) and both
sharded over a device mesh. :func:`rebalance_experts` is DeepSeek's
signature over it, and the other functions are DeepSeek's building blocks
and the migration cost.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from eplb_jax._src import checks
from eplb_jax._src import elastic
from eplb_jax._src import gate
from eplb_jax._src import migration
from eplb_jax._src import packing
from eplb_jax._src import placement
from eplb_jax._src import replication
from eplb_jax._src import sharding
from eplb_jax._src.modes import DEFAULT_MODE
from eplb_jax._src.modes import Mode
from eplb_jax._src.modes import check_mode
from eplb_jax._src.placement import Placement
from eplb_jax._src.problem import PackingProblem
from eplb_jax._src.topology import Topology

DEFAULT_TOLERANCE = migration.DEFAULT_TOLERANCE


def _rows(core):
  """Lets a jitted core over rows take zero rows: it then returns its outputs empty.

  ``core``'s array arguments (jax arrays of rank >= 1) share their first,
  row axis and come first; its other arguments are static. With zero rows
  the core is traced on one row, for the shapes and dtypes of its outputs.
  """

  @functools.wraps(core)
  def wrapped(*args):
    if args[0].shape[0]:
      return core(*args)
    is_rows = [isinstance(a, jax.Array) and a.ndim > 0 for a in args]
    count = is_rows.index(False) if False in is_rows else len(args)
    one_row = [jax.ShapeDtypeStruct((1, *a.shape[1:]), a.dtype) for a in args[:count]]
    shapes = jax.eval_shape(lambda *arrays: core(*arrays, *args[count:]), *one_row)
    return jax.tree.map(lambda s: jnp.zeros((0, *s.shape[1:]), s.dtype), shapes)

  return wrapped


@functools.partial(jax.jit, static_argnums=(1, 2))
@_rows
def _place(weight: jax.Array, topology: Topology, mode: Mode) -> Placement:
  survivors = placement.place(checks.sanitize_weight(weight), topology.survivors(), mode)
  return elastic.to_full(survivors, topology)


@functools.partial(jax.jit, static_argnums=(3, 4))
@_rows
def _migrate(
  weight: jax.Array, previous: jax.Array, tolerance: jax.Array, topology: Topology, mode: Mode
) -> Placement:
  weight = checks.sanitize_weight(weight)
  tolerance = jnp.clip(tolerance, 0.0, 1.0)
  previous = elastic.to_survivors(previous, topology)  # replicas on failed GPUs are lost
  survivors = migration.migrate(weight, previous, tolerance, topology.survivors(), mode)
  return elastic.to_full(survivors, topology)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _gate(
  weight: jax.Array,
  current: jax.Array,
  new: Placement,
  threshold: jax.Array,
  topology: Topology,
  per_layer: bool,
) -> gate.GatedPlacement:
  weight = checks.sanitize_weight(weight)
  current = elastic.clear_failed(current, topology)
  # NaN and negative thresholds count as 0, inf as the largest float32.
  threshold = jnp.where(threshold > 0, jnp.minimum(threshold, jnp.finfo(jnp.float32).max), 0.0)
  return gate.gate(weight, current, new, threshold, topology, per_layer)


def _check_weight(weight: jax.typing.ArrayLike, topology: Topology, **kwargs) -> jax.Array:
  """Static and value checks of ``weight``, ``[L, E]`` or a window ``[N, L, E]``, against
  ``topology``; returns float32 loads ``[L, E]`` (a window summed over its steps)."""
  weight = checks.check_weight(weight, window=True)
  topology.check_experts(weight.shape[-1], **kwargs)
  checks.check_weight_values(weight)
  return checks.sum_window(weight)


def _check_phy2log(phy2log: jax.typing.ArrayLike, name: str) -> jax.Array:
  if np.ndim(phy2log) != 2:
    raise ValueError(f"{name} must be 2-D [layers, num_replicas], got shape {np.shape(phy2log)}")
  phy2log = jnp.asarray(phy2log)
  if not jnp.issubdtype(phy2log.dtype, jnp.integer):
    raise ValueError(f"{name} must have an integer dtype, got {phy2log.dtype}")
  return phy2log.astype(jnp.int32)


def _check_in_service(
  phy2log: jax.typing.ArrayLike, weight: jax.Array, topology: Topology, name: str
) -> jax.Array:
  """Checks a placement in service ``[L, P]``: expert ids in ``[0, E)``, or -1 for an empty slot.

  Returns it as int32, other ids (possible only when traced) as -1.
  """
  previous = checks.check_ids(phy2log, name)
  if np.shape(previous) != (weight.shape[0], topology.num_replicas):
    raise ValueError(
      f"{name} must have shape [layers, num_replicas] = "
      f"{(weight.shape[0], topology.num_replicas)}, got {np.shape(previous)}"
    )
  if checks.is_concrete(previous) and previous.size:
    with jax.ensure_compile_time_eval():  # concrete inside a trace too
      low, high = int(previous.min()), int(previous.max())
    if low < -1 or high >= weight.shape[1]:
      raise ValueError(
        f"{name} must hold expert ids in [0, {weight.shape[1]}) or -1 for an "
        f"empty slot, found [{low}, {high}]"
      )
  return checks.narrow_ids(previous, weight.shape[1], -1)


def _check_tolerance(tolerance: jax.typing.ArrayLike) -> jax.Array:
  value = checks.check_scalar(tolerance, "tolerance")
  if checks.is_concrete(value) and not 0 <= float(value) < 1:
    raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
  return jnp.asarray(value, jnp.float32)


def rebalance(
  weight: jax.typing.ArrayLike,
  topology: Topology,
  *,
  mode: str | Mode = DEFAULT_MODE,
  previous_phy2log: jax.typing.ArrayLike | None = None,
  tolerance: jax.typing.ArrayLike = DEFAULT_TOLERANCE,
  mesh: Mesh | None = None,
  layer_axis: sharding.AxisName | None = None,
) -> Placement:
  """Places the replicas of every logical expert on ``topology``'s GPUs.

  Uses ``topology.policy``: hierarchical (expert groups packed onto nodes,
  then replicas onto each node's GPUs) or global. ``topology`` and ``mode``
  are static; ``weight`` may be traced, and a new ``weight`` never retraces.
  Under ``jax.jit`` negative, NaN and infinite loads count as 0; called
  eagerly they raise ``ValueError``.

  With ``topology.failed_gpus``, replicas go only to the active GPUs, every
  expert keeps at least one, and the failed GPUs' slots hold -1: the
  balancer solves ``topology.survivors()`` (the global policy over the
  active GPUs unless whole nodes failed, see :meth:`Topology.survivors`).
  Given ``previous_phy2log``, replicas that were on a failed GPU are lost
  and are placed again like any other missing replica.

  Args:
    weight: ``[L, E]`` load statistics of each logical expert, int or float;
      or a window ``[N, L, E]`` of ``N`` recorded steps, summed over ``N``
      (for a recency-weighted sum, reduce it first with
      :func:`eplb_jax.runtime.stats.decayed_load`).
    topology: slots, expert groups, nodes and GPUs.
    mode: ``"gpu_aware"`` (default: replica counts chosen for the heaviest
      GPU, never heavier than greedy's, see :class:`GpuAware`), ``"refined"``
      (DeepSeek's counts, a better packing; faster), ``"greedy"``
      (DeepSeek's placement exactly), or a mode instance.
    previous_phy2log: optional ``[L, P]`` placement in service (-1 marks an
      empty slot). When given, the result keeps replicas where they are as
      far as it can while every layer's heaviest GPU stays within
      ``1 + tolerance`` times a fresh placement's.
    tolerance: with ``previous_phy2log``, a scalar in ``[0, 1)``; may be
      traced (then clipped to ``[0, 1]``).
    mesh: optional device mesh; with ``layer_axis``, each device balances its
      own layers (no communication) and the maps come back sharded as
      ``NamedSharding(mesh, P(layer_axis))``. ``L`` must divide evenly.
    layer_axis: the mesh axis name (or tuple of names) that splits the layers.

  Returns:
    The :class:`Placement` (``phy2log``, ``log2phy``, ``logcnt``).

  Example:
    >>> import numpy as np
    >>> import eplb_jax
    >>> topology = eplb_jax.Topology(6, num_groups=1, num_nodes=1, num_gpus=2)
    >>> placement = eplb_jax.rebalance(np.array([[4.0, 1.0, 1.0, 2.0]]), topology)
    >>> placement.phy2log  # expert 0 and 3 got a second replica; slots 0-2 are on GPU 0
    Array([[0, 1, 3, 0, 2, 3]], dtype=int32)
    >>> placement.gpu_loads(np.array([[4.0, 1.0, 1.0, 2.0]]), num_gpus=2)
    Array([[4., 4.]], dtype=float32)
  """
  if not isinstance(topology, Topology):
    raise ValueError(f"topology must be a Topology, got {type(topology).__name__}")
  mode = check_mode(mode)
  weight = _check_weight(weight, topology)
  if (mesh is None) != (layer_axis is None):
    raise ValueError("mesh must be given with layer_axis, and layer_axis with mesh")
  previous = None
  if previous_phy2log is not None:
    previous = _check_in_service(previous_phy2log, weight, topology, "previous_phy2log")
    tolerance = _check_tolerance(tolerance)
  return _solve(weight, topology, mode, previous, tolerance, mesh, layer_axis)


def _solve(
  weight: jax.Array,
  topology: Topology,
  mode: Mode,
  previous: jax.Array | None = None,
  tolerance: jax.Array | None = None,
  mesh: Mesh | None = None,
  layer_axis: sharding.AxisName | None = None,
) -> Placement:
  """:func:`rebalance` on checked arguments: ``weight [L, E]`` float32 and, when
  ``previous`` is given, ``tolerance`` a float32 scalar."""
  if previous is None:
    core, arrays = _place, (weight,)
  else:
    core, arrays = _migrate, (weight, previous, tolerance)
  if mesh is None:
    # Loads split over Explicit mesh axes (their type says so) are balanced
    # where they are, as with mesh=; any other Explicit layout is gathered.
    split = sharding.rows_split(weight)
    if split is None:
      return core(*(sharding.replicate(a) for a in arrays), topology, mode)
    mesh, layer_axis = split
  layer_axis = sharding.check_mesh_axis(mesh, layer_axis, weight.shape[0])
  return sharding.shard_layers(core, (topology, mode), mesh, layer_axis, *arrays)


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


def rebalance_with_previous(
  weight: jax.typing.ArrayLike,
  num_replicas: int,
  num_groups: int,
  num_nodes: int,
  num_gpus: int,
  previous_phy2log: jax.typing.ArrayLike,
  *,
  mode: str | Mode = DEFAULT_MODE,
  tolerance: jax.typing.ArrayLike = DEFAULT_TOLERANCE,
) -> Placement:
  """:func:`rebalance_experts`, moving few replicas away from ``previous_phy2log``.

  Guarantee: in every layer the heaviest GPU load is at most ``1 + tolerance``
  times that of the fresh placement ``rebalance_experts(weight, ..., mode=mode)``
  (equivalently, balancedness at least the fresh one's divided by ``1 +
  tolerance``), up to float32 rounding. The placement follows the same policy
  (hierarchical: the experts of a group stay on one node).

  Args:
    weight: ``[L, E]`` load statistics of each logical expert, or a window
      ``[N, L, E]`` summed over ``N``.
    num_replicas: ``P``, physical expert slots; a multiple of ``num_gpus``, ``>= E``.
    num_groups: expert groups.
    num_nodes: server nodes.
    num_gpus: GPUs in total.
    previous_phy2log: ``[L, P]`` int, the placement in service (expert of each
      slot, -1 for an empty slot). Under ``jax.jit`` other values count as
      an empty slot.
    mode: placement mode of the fresh reference.
    tolerance: scalar in ``[0, 1)``, the allowed relative excess of the heaviest
      GPU over the fresh one's; may be traced (then clipped to ``[0, 1]``).

  Returns:
    The :class:`Placement`, as :func:`rebalance_experts`.
  """
  return rebalance(
    weight,
    Topology(num_replicas, num_groups, num_nodes, num_gpus),
    mode=mode,
    previous_phy2log=previous_phy2log,
    tolerance=tolerance,
  )


def _check_threshold(threshold: jax.typing.ArrayLike) -> jax.Array:
  value = checks.check_scalar(threshold, "threshold")
  if checks.is_concrete(value) and not 0 <= float(value) < np.inf:
    raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
  return jnp.asarray(value, jnp.float32)


def _check_new(new: Placement, weight: jax.Array, topology: Topology) -> Placement:
  """Checks a placement ``new`` of ``weight`` on ``topology``: shapes and dtypes; when
  concrete, ``phy2log``'s ids and a replica of every expert on the active GPUs in every layer."""
  num_layers, num_logical = weight.shape
  want = {
    "phy2log": (num_layers, topology.num_replicas),
    "log2phy": (num_layers, num_logical, topology.max_replicas(num_logical)),
    "logcnt": (num_layers, num_logical),
  }
  if not isinstance(new, tuple) or len(new) != 3:
    raise ValueError(
      f"new must be a Placement (phy2log, log2phy, logcnt), got {type(new).__name__}"
    )
  arrays = []
  for (name, shape), array in zip(want.items(), new, strict=True):
    array = checks.check_ids(array, f"new.{name}")
    if np.shape(array) != shape:
      raise ValueError(f"new.{name} must have shape {shape}, got {np.shape(array)}")
    arrays.append(jnp.asarray(array, jnp.int32))
  # Values, so eager calls only: under jit, gate.gate never takes such a layer of new.
  phy2log = _check_in_service(new[0], weight, topology, "new.phy2log")
  checks.check_served(elastic.clear_failed(phy2log, topology), num_logical, "new")
  return Placement(*arrays)


def _check_gate(
  weight: jax.typing.ArrayLike,
  topology: Topology,
  current_phy2log: jax.typing.ArrayLike,
  threshold: jax.typing.ArrayLike,
  per_layer: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The checked ``(weight, current_phy2log, threshold)`` of the gate functions."""
  if not isinstance(topology, Topology):
    raise ValueError(f"topology must be a Topology, got {type(topology).__name__}")
  if not isinstance(per_layer, bool):
    raise ValueError(f"per_layer must be a bool, got {per_layer!r}")
  weight = _check_weight(weight, topology)
  current = _check_in_service(current_phy2log, weight, topology, "current_phy2log")
  return weight, current, _check_threshold(threshold)


def gate_placement(
  weight: jax.typing.ArrayLike,
  topology: Topology,
  current_phy2log: jax.typing.ArrayLike,
  new: Placement,
  threshold: jax.typing.ArrayLike,
  *,
  per_layer: bool = True,
) -> gate.GatedPlacement:
  """Keeps the placement in service unless ``new`` balances ``weight`` enough better.

  Scores both placements on ``weight`` and keeps the one in service where
  its heaviest GPU is at most ``1 + threshold`` times ``new``'s: per layer,
  or with ``per_layer=False`` for all layers at once (by the sums over
  layers of the heaviest GPUs, what a step waits for). A layer whose
  placement in service leaves an expert without a replica (e.g. all its
  replicas on a failed GPU of ``topology``, whose slots serve nothing) is
  always rebalanced. Pure and jit-friendly: ``topology`` and ``per_layer``
  are static, the arrays and ``threshold`` may be traced, and new values
  never retrace.

  Args:
    weight: ``[L, E]`` loads, or a window ``[N, L, E]`` summed over ``N``.
    topology: slots, groups, nodes, GPUs and failed GPUs.
    current_phy2log: ``[L, P]`` int, the placement in service (-1: an empty
      slot). Under ``jax.jit`` ids outside ``[0, E)`` count as empty slots.
    new: the candidate :class:`Placement` on ``topology``, e.g. from
      :func:`rebalance`. Called eagerly, a ``new`` that leaves an expert
      without a replica on the active GPUs raises ``ValueError``; under
      ``jax.jit`` such a layer of ``new`` is scored as infinitely heavy
      (``new_heaviest`` inf) and never taken.
    threshold: scalar ``>= 0``, the relative excess of the heaviest GPU that
      the placement in service may have over ``new``'s and still be kept (0:
      keep it only where ``new`` is no lighter). Under ``jax.jit`` NaN and
      negative values count as 0.
    per_layer: decide layer by layer (default) or for the whole model.

  Returns:
    A :class:`GatedPlacement`: ``placement`` (``new`` where ``rebalanced``,
    the one in service elsewhere), ``rebalanced [L]``, and for logging
    ``current_heaviest [L]`` and ``new_heaviest [L]``.
  """
  weight, current, threshold = _check_gate(weight, topology, current_phy2log, threshold, per_layer)
  new = _check_new(new, weight, topology)
  return _gate(weight, current, new, threshold, topology, per_layer)


def gated_rebalance(
  weight: jax.typing.ArrayLike,
  topology: Topology,
  current_phy2log: jax.typing.ArrayLike,
  threshold: jax.typing.ArrayLike,
  *,
  mode: str | Mode = DEFAULT_MODE,
  tolerance: jax.typing.ArrayLike = DEFAULT_TOLERANCE,
  per_layer: bool = True,
) -> gate.GatedPlacement:
  """Rebalances from the placement in service only where the gain is worth the re-layout.

  :func:`gate_placement` of the migration-aware placement
  ``rebalance(weight, topology, mode=mode, previous_phy2log=current_phy2log,
  tolerance=tolerance)``: where a layer is rebalanced it moves few replicas,
  elsewhere it moves none. Arguments as those two functions'; pure and
  jit-friendly (``topology``, ``mode`` and ``per_layer`` static).

  Returns:
    A :class:`GatedPlacement` (see :func:`gate_placement`).
  """
  mode = check_mode(mode)
  weight, current, threshold = _check_gate(weight, topology, current_phy2log, threshold, per_layer)
  new = _solve(weight, topology, mode, current, _check_tolerance(tolerance))
  return _gate(weight, current, new, threshold, topology, per_layer)


@functools.partial(jax.jit, static_argnums=(1, 2))
@_rows
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
  weight = _check_weight(weight, topology, hierarchical=True)
  return _hierarchical(weight, topology, mode)


@functools.partial(jax.jit, static_argnums=1)
@_rows
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
  num_replicas = checks.check_size(num_replicas, "num_replicas")
  if num_replicas < weight.shape[1]:
    raise ValueError(
      f"num_replicas must be >= the number of experts ({weight.shape[1]}), got {num_replicas}"
    )
  checks.check_weight_values(weight)
  return _replicate(weight, num_replicas)


@functools.partial(jax.jit, static_argnums=(1, 2))
@_rows
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
  num_packs = checks.check_size(num_packs, "num_packs")
  mode = check_mode(mode)
  if weight.shape[1] % num_packs:
    raise ValueError(
      f"num_packs must divide the number of items ({weight.shape[1]}), got {num_packs}"
    )
  checks.check_weight_values(weight)
  return _pack(weight, num_packs, mode)


@functools.partial(jax.jit, static_argnums=2)
def _migration_cost(old: jax.Array, new: jax.Array, num_gpus: int):
  return migration.migration_cost(old, new, num_gpus)


def migration_cost(
  old_phy2log: jax.typing.ArrayLike, new_phy2log: jax.typing.ArrayLike, num_gpus: int
) -> tuple[jax.Array, jax.Array]:
  """Replicas a placement change moves onto GPUs, and slots it rewrites.

  Args:
    old_phy2log: ``[L, P]`` expert of each slot before (``P / num_gpus``
      consecutive slots per GPU).
    new_phy2log: ``[L, P]`` expert of each slot after.
    num_gpus: GPUs in total; must divide ``P``.

  Returns:
    ``(moved, changed_slots)``, int32 ``[L]``: ``moved`` counts the replicas
    that must arrive on a GPU, i.e. per GPU and expert the copies the GPU holds
    after beyond those it held before (a GPU that had expert 3 once and now has
    it twice receives one replica; an empty slot, -1, receives none);
    ``changed_slots`` counts the slots whose expert changes.

  Example:
    >>> import jax.numpy as jnp
    >>> import eplb_jax
    >>> old = jnp.array([[0, 1, 2, 3]])  # two slots per GPU on 2 GPUs
    >>> eplb_jax.migration_cost(old, jnp.array([[1, 0, 2, 3]]), num_gpus=2)  # within GPU 0
    (Array([0], dtype=int32), Array([2], dtype=int32))
    >>> eplb_jax.migration_cost(old, jnp.array([[0, 2, 1, 3]]), num_gpus=2)  # across GPUs
    (Array([2], dtype=int32), Array([2], dtype=int32))
  """
  old = _check_phy2log(old_phy2log, "old_phy2log")
  new = _check_phy2log(new_phy2log, "new_phy2log")
  if old.shape != new.shape:
    raise ValueError(f"new_phy2log must have the shape of old_phy2log {old.shape}, got {new.shape}")
  num_gpus = checks.check_size(num_gpus, "num_gpus")
  checks.check_num_gpus(num_gpus, new.shape[1])
  return _migration_cost(old, new, num_gpus)
