"""The balancer's entry points on a :class:`Topology`: check the arguments, run a jitted core.

:func:`rebalance` serves the fresh placement, the migration-aware one (given
the placement in service) and both sharded over a device mesh;
:func:`rebalance_with_previous` is the migration-aware one with DeepSeek's
sizes. DeepSeek's own signatures are in :mod:`.deepseek`, the gate in
:mod:`.gate`, the argument checks in :mod:`.checks`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from eplb_jax._src import checks
from eplb_jax._src import elastic
from eplb_jax._src import migration
from eplb_jax._src import placement
from eplb_jax._src import sharding
from eplb_jax._src.modes import DEFAULT_MODE
from eplb_jax._src.modes import Mode
from eplb_jax._src.modes import check_mode
from eplb_jax._src.placement import Placement
from eplb_jax._src.topology import Topology

DEFAULT_TOLERANCE = migration.DEFAULT_TOLERANCE


def over_rows(core):
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
@over_rows
def _place(weight: jax.Array, topology: Topology, mode: Mode) -> Placement:
  survivors = placement.place(checks.sanitize_weight(weight), topology.survivors(), mode)
  return elastic.to_full(survivors, topology)


@functools.partial(jax.jit, static_argnums=(3, 4))
@over_rows
def _migrate(
  weight: jax.Array, previous: jax.Array, tolerance: jax.Array, topology: Topology, mode: Mode
) -> Placement:
  weight = checks.sanitize_weight(weight)
  tolerance = jnp.clip(tolerance, 0.0, 1.0)
  previous = elastic.to_survivors(previous, topology)  # replicas on failed GPUs are lost
  survivors = migration.migrate(weight, previous, tolerance, topology.survivors(), mode)
  return elastic.to_full(survivors, topology)


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
  checks.check_topology(topology)
  mode = check_mode(mode)
  weight = checks.check_loads(weight, topology)
  checks.check_mesh(mesh, layer_axis)
  previous = None
  if previous_phy2log is not None:
    previous = checks.check_in_service(previous_phy2log, weight, topology, "previous_phy2log")
    tolerance = checks.check_tolerance(tolerance)
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
