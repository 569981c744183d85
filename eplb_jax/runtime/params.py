"""Applying a placement to expert parameters.

Expert weights are stacked along an expert axis: a pytree whose leaves are
``[E, ...]`` (one layer) or ``[L, E, ...]``. A placement turns them into
per-slot weights ``[P, ...]`` (or ``[L, P, ...]``): slot ``s`` holds a copy
of expert ``phy2log[s]``. With a ``mesh``, the slot axis is sharded over its
``expert_axis``, ``P / n`` consecutive slots per device (``n`` the axis size),
which is the slot numbering of :func:`eplb_jax.rebalance_experts` (GPU by GPU).

Communication: the result is a gather along the expert axis, whose indices
are data. When the source is sharded over ``expert_axis`` too, each device
must receive the weights of every replica it hosts that another device
holds; XLA's SPMD partitioner compiles this data-dependent gather as an
all-gather of the source over ``expert_axis`` followed by a local gather, so
each device receives the ``n - 1`` shards it lacks, whatever the placement
(the compiled program of ``tests/runtime/test_params.py`` shows exactly that). A
source replicated on every device needs no communication. Re-laying out thus
costs about one all-gather of the expert weights: do it every few hundred
steps, not every step, or spread it over steps with :func:`transition_step`,
which moves a few layers per step while every layer stays served by one
consistent placement (:class:`Transition`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from eplb_jax._src import checks
from eplb_jax._src import ops
from eplb_jax._src import sharding
from eplb_jax._src.placement import Placement

PyTree = object


def apply_placement(
  params: PyTree,
  phy2log: jax.typing.ArrayLike,
  *,
  mesh: Mesh | None = None,
  expert_axis: str = "expert",
) -> PyTree:
  """Per-slot copies of stacked expert parameters: ``leaf[phy2log]`` for every leaf.

  Args:
    params: pytree of ``[E, ...]`` leaves with ``phy2log [P]``, or of
      ``[L, E, ...]`` leaves with ``phy2log [L, P]``; every leaf has the
      same ``E``.
    phy2log: int logical expert of each slot, ``[P]`` or ``[L, P]``. An id
      outside ``[0, E)`` raises ``ValueError`` when called eagerly; under
      ``jax.jit`` its slot gets zeros.
    mesh: optional device mesh; with it every output leaf is laid out with
      its slot axis sharded over ``expert_axis``.
    expert_axis: the mesh axis name that splits slots (``P`` must be
      divisible by its size). Other dimensions keep their sharding (Explicit
      axes) or are left to the compiler (Auto axes).

  Returns:
    The pytree with ``[P, ...]`` (or ``[L, P, ...]``) leaves: slot ``s`` holds
    the parameters of expert ``phy2log[s]``.

  Raises:
    ValueError: ``phy2log`` is not an integer ``[P]`` or ``[L, P]`` array,
      the leaves do not have ``phy2log``'s layers and one common ``E``, or
      (eagerly) ``phy2log`` holds an id outside ``[0, E)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from eplb_jax.runtime import params
    >>> logical = {"w": jnp.arange(4.0)}  # one parameter per expert
    >>> params.apply_placement(logical, jnp.array([0, 1, 3, 0, 2, 3]))
    {'w': Array([0., 1., 3., 0., 2., 3.], dtype=float32)}
  """
  phy2log = _check_map(phy2log, "phy2log")
  leaves = _check_leaves(params, phy2log)
  num_experts = leaves[0].shape[phy2log.ndim - 1] if leaves else 0
  _check_range(phy2log, "phy2log", num_experts, "experts along the expert axis of params")
  return _gather(params, checks.narrow_ids(phy2log, num_experts, num_experts), mesh, expert_axis)


def _check_map(ids: jax.typing.ArrayLike, name: str) -> jax.Array | np.ndarray:
  ids = checks.check_ids(ids, name)
  if ids.ndim not in (1, 2):
    raise ValueError(f"{name} must be [P] or [L, P], got shape {ids.shape}")
  return ids


def _check_leaves(params: PyTree, phy2log: jax.Array | np.ndarray) -> list[jax.Array]:
  """The leaves of ``params`` as arrays: ``[E, ...]``, or ``[L, E, ...]`` for a map ``[L, P]``."""
  leaves = [jnp.asarray(leaf) for leaf in jax.tree.leaves(params)]
  layers = phy2log.shape[:-1]
  for leaf in leaves:
    if leaf.ndim < phy2log.ndim or leaf.shape[: len(layers)] != layers:
      layout = "[L, E, ...]" if layers else "[E, ...]"
      raise ValueError(
        f"params leaves must be {layout} for phy2log of shape {phy2log.shape}, "
        f"got a leaf of shape {leaf.shape}"
      )
  experts = {leaf.shape[len(layers)] for leaf in leaves}
  if len(experts) > 1:
    raise ValueError(f"params leaves must share one number of experts, got {sorted(experts)}")
  return leaves


def _check_range(ids: jax.Array | np.ndarray, name: str, limit: int, what: str) -> None:
  """Eager value check: every id of ``ids`` in ``[0, limit)``."""
  if checks.is_concrete(ids) and ids.size:
    with jax.ensure_compile_time_eval():  # concrete inside a trace too
      low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= limit:
      raise ValueError(f"{name} must hold ids in [0, {limit}), the {what}; found [{low}, {high}]")


def _gather(params: PyTree, ids: jax.Array, mesh: Mesh | None, expert_axis: str) -> PyTree:
  """``leaf[ids]`` along each leaf's expert axis; an out-of-bounds id gives zeros."""
  layered = ids.ndim == 2
  index = (jnp.arange(ids.shape[0])[:, None], ids) if layered else (ids,)
  if mesh is None:
    return jax.tree.map(
      lambda leaf: jnp.asarray(leaf).at[index].get(mode="fill", fill_value=0), params
    )
  sharding.check_mesh_axis(mesh, expert_axis, ids.shape[-1], name="expert_axis", what="slots")
  slot_dim = ids.ndim - 1

  def gather(leaf: jax.typing.ArrayLike) -> jax.Array:
    leaf = jnp.asarray(leaf)
    if expert_axis in mesh.explicit_axes:
      # Explicit axes: keep the leaf's other dimensions sharded as they are.
      spec = list(jax.typeof(leaf).sharding.spec)
      spec += [None] * (leaf.ndim - len(spec))
      spec[slot_dim] = expert_axis
      out_sharding = NamedSharding(mesh, P(*spec))
      return leaf.at[index].get(mode="fill", fill_value=0, out_sharding=out_sharding)
    spec = [P.UNCONSTRAINED] * leaf.ndim
    spec[slot_dim] = expert_axis
    gathered = leaf.at[index].get(mode="fill", fill_value=0)
    return jax.lax.with_sharding_constraint(gathered, NamedSharding(mesh, P(*spec)))

  return jax.tree.map(gather, params)


def relayout(
  params: PyTree,
  log2phy: jax.typing.ArrayLike,
  new_phy2log: jax.typing.ArrayLike,
  *,
  mesh: Mesh | None = None,
  expert_axis: str = "expert",
) -> PyTree:
  """Moves per-slot parameters from an old placement to a new one.

  Args:
    params: pytree of per-slot leaves ``[P, ...]`` (or ``[L, P, ...]``) laid
      out by the old placement; replicas of an expert must be identical.
    log2phy: the old placement's ``[E, R]`` (or ``[L, E, R]``) slots of each
      expert; every expert has at least one.
    new_phy2log: the new placement's ``[P']`` (or ``[L, P']``) expert of each
      slot. An id outside ``[0, E)`` raises ``ValueError`` when called
      eagerly; under ``jax.jit`` its slot gets zeros.
    mesh: as in :func:`apply_placement`.
    expert_axis: as in :func:`apply_placement`.

  Returns:
    The pytree laid out by the new placement: new slot ``s`` copies old slot
    ``log2phy[new_phy2log[s], 0]`` (the expert's first old replica).

  Raises:
    ValueError: as :func:`apply_placement`, for ``log2phy`` and ``new_phy2log``.
  """
  new_phy2log = _check_map(new_phy2log, "new_phy2log")
  log2phy = jnp.asarray(checks.check_ids(log2phy, "log2phy"))
  if log2phy.ndim != new_phy2log.ndim + 1 or log2phy.shape[:-2] != new_phy2log.shape[:-1]:
    layout = "[L, E, R]" if new_phy2log.ndim == 2 else "[E, R]"
    raise ValueError(
      f"log2phy must be {layout} for new_phy2log of shape {new_phy2log.shape}, "
      f"got shape {log2phy.shape}"
    )
  leaves = _check_leaves(params, new_phy2log)
  num_slots = leaves[0].shape[new_phy2log.ndim - 1] if leaves else 0
  num_experts = log2phy.shape[-2]
  _check_range(new_phy2log, "new_phy2log", num_experts, "experts of log2phy")
  # Index num_experts, padded with slot -1, stands for an id out of range.
  first = jnp.pad(log2phy[..., 0], [(0, 0)] * (log2phy.ndim - 2) + [(0, 1)], constant_values=-1)
  source = jnp.take_along_axis(first, checks.narrow_ids(new_phy2log, num_experts, num_experts), -1)
  _check_range(source, "log2phy", num_slots, "slots of params (first replicas)")
  return _gather(params, checks.narrow_ids(source, num_slots, num_slots), mesh, expert_axis)


def sum_replicas(
  grads: PyTree,
  phy2log: jax.typing.ArrayLike,
  num_experts: int,
  *,
  mesh: Mesh | None = None,
  expert_axis: str = "expert",
) -> PyTree:
  """Gives every slot the sum over the replicas of its expert: the logical expert's gradient.

  With replicas of one expert in several slots, the loss's gradient with
  respect to one slot's parameters covers only the tokens that slot served;
  the logical expert's gradient is the sum over its replicas. Applying it to
  every replica keeps replicas identical through the optimizer step, as the
  logical model would train them.

  Communication: a segment sum over the slot axis and a gather back; on a
  sharded slot axis XLA combines the per-device partial sums with one
  all-reduce of ``[E, ...]`` per leaf (``[L, E, ...]`` for layered leaves).

  Args:
    grads: pytree of per-slot leaves ``[P, ...]`` (or ``[L, P, ...]``).
    phy2log: int logical expert of each slot, ``[P]`` or ``[L, P]``. An id
      outside ``[0, num_experts)`` raises ``ValueError`` when called eagerly;
      under ``jax.jit`` its slot neither contributes nor receives (zeros).
    num_experts: ``E`` (static).
    mesh: as in :func:`apply_placement`.
    expert_axis: as in :func:`apply_placement`.

  Returns:
    The pytree of ``grads``' shapes: slot ``s`` holds the sum of ``grads``
    over the slots of expert ``phy2log[s]``.

  Raises:
    ValueError: ``phy2log`` is not an integer ``[P]`` or ``[L, P]`` array,
      the leaves do not have its layers and ``P`` slots, ``num_experts`` is
      not a positive int, or (eagerly) an id is outside ``[0, num_experts)``.
  """
  num_experts = checks.check_size(num_experts, "num_experts")
  phy2log = _check_map(phy2log, "phy2log")
  leaves = _check_leaves(grads, phy2log)
  if leaves and leaves[0].shape[phy2log.ndim - 1] != phy2log.shape[-1]:
    raise ValueError(
      f"grads leaves must have the {phy2log.shape[-1]} slots of phy2log, got a leaf of shape "
      f"{leaves[0].shape}"
    )
  _check_range(phy2log, "phy2log", num_experts, "experts")
  ids = checks.narrow_ids(phy2log, num_experts, num_experts)  # num_experts: dropped

  def per_expert(leaf: jax.typing.ArrayLike) -> jax.Array:
    total = functools.partial(jax.ops.segment_sum, num_segments=num_experts)
    return jax.vmap(total)(leaf, ids) if ids.ndim == 2 else total(leaf, ids)

  return _gather(jax.tree.map(per_expert, grads), ids, mesh, expert_axis)


def relayout_state(
  state: PyTree,
  params: PyTree,
  log2phy: jax.typing.ArrayLike,
  new_phy2log: jax.typing.ArrayLike,
  *,
  mesh: Mesh | None = None,
  expert_axis: str = "expert",
) -> PyTree:
  """Moves the per-slot parts of an optimizer state with the parameters they mirror.

  An optimizer keeps per-parameter statistics in trees shaped like the
  parameters (optax's Adam: ``mu`` and ``nu``) next to leaves of its own
  (step counts). Every subtree of ``state`` with the tree structure and leaf
  shapes of the per-slot ``params`` moves as :func:`relayout` moves
  ``params``; everything else is returned as it is. When replicas of an
  expert got identical updates (:func:`sum_replicas`), their statistics are
  identical too, and the moved state is the one the logical model would have
  under the new placement.

  Args:
    state: the optimizer state, any pytree (e.g. ``optimizer.init(params)``,
      or its part for the expert parameters).
    params: the per-slot parameters the statistics mirror, laid out by the
      old placement (only their structure and shapes are used).
    log2phy: as in :func:`relayout`.
    new_phy2log: as in :func:`relayout`.
    mesh: as in :func:`apply_placement`.
    expert_axis: as in :func:`apply_placement`.

  Returns:
    ``state`` with its per-slot subtrees laid out by the new placement.

  Raises:
    ValueError: as :func:`relayout`.
  """
  return _map_mirrors(
    state,
    params,
    lambda node: relayout(node, log2phy, new_phy2log, mesh=mesh, expert_axis=expert_axis),
  )


def _map_mirrors(state: PyTree, params: PyTree, fn) -> PyTree:
  """``fn`` applied to every subtree of ``state`` with the structure and leaf shapes of
  ``params``; everything else as it is."""
  treedef = jax.tree.structure(params)
  shapes = [jnp.shape(leaf) for leaf in jax.tree.leaves(params)]

  def mirrors(node: PyTree) -> bool:
    if jax.tree.structure(node) != treedef:
      return False
    return [jnp.shape(leaf) for leaf in jax.tree.leaves(node)] == shapes

  return jax.tree.map(lambda node: fn(node) if mirrors(node) else node, state, is_leaf=mirrors)


class Transition(NamedTuple):
  """A move to a new placement a few layers per step, with a consistent placement per layer.

  Attributes:
    service: the :class:`~eplb_jax.Placement` each layer's parameters are
      laid out by now (route with it): layers below ``next_layer`` have the
      target's, the others the placement the move started from.
    target: the placement being moved to.
    next_layer: int32 scalar, the first layer not moved yet (``L``: done).
  """

  service: Placement
  target: Placement
  next_layer: jax.Array


def transition_start(service: Placement, target: Placement) -> Transition:
  """A transition from ``service`` (``[L, ...]`` maps) to ``target``; nothing moved yet.

  Starting again mid-way is fine: ``service`` is then the mix in service.
  """
  if jnp.shape(service.phy2log) != jnp.shape(target.phy2log):
    raise ValueError(
      f"target must have the layers and slots of service {jnp.shape(service.phy2log)}, "
      f"got {jnp.shape(target.phy2log)}"
    )
  return Transition(service, target, jnp.zeros((), jnp.int32))


def transition_step(
  transition: Transition,
  params: PyTree,
  state: PyTree = None,
  *,
  layers_per_step: int,
  mesh: Mesh | None = None,
  expert_axis: str = "expert",
) -> tuple[Transition, PyTree, PyTree]:
  """Moves the next ``layers_per_step`` layers of ``params`` (and of an optimizer state).

  Per-slot leaves ``[L, P, ...]`` of the layers ``next_layer .. next_layer +
  layers_per_step - 1`` are laid out by the target (:func:`relayout`, and
  :func:`relayout_state` for ``state``); the others are left as they are,
  so a step moves ``layers_per_step / L`` of the weights instead of all of
  them, and every layer is served by exactly one placement, its service
  one. Once every layer has moved, a step changes nothing (the moved
  window is re-laid out onto itself).

  Args:
    transition: from :func:`transition_start` or a previous step.
    params: pytree of per-slot leaves ``[L, P, ...]`` laid out by
      ``transition.service``.
    state: optional optimizer state, moved with ``params`` as
      :func:`relayout_state` moves it (None: none).
    layers_per_step: layers moved per call (static, positive); the last
      call may move fewer.
    mesh, expert_axis: as in :func:`apply_placement`.

  Returns:
    ``(transition, params, state)`` after the move.

  Raises:
    ValueError: a bad ``layers_per_step``, or leaves that are not ``[L, P, ...]``.
  """
  layers_per_step = checks.check_size(layers_per_step, "layers_per_step")
  service, target = transition.service, transition.target
  num_layers = jnp.shape(service.phy2log)[0]
  count = min(layers_per_step, num_layers)
  # dynamic_slice keeps the window inside the layers: near the end it starts
  # earlier and re-lays out moved layers onto the target, which keeps them.
  first = jnp.clip(transition.next_layer, 0, num_layers - count)
  window = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=first, slice_size=count)
  log2phy, new_phy2log = window(service.log2phy), window(target.phy2log)
  shaped = [jnp.shape(leaf)[:2] for leaf in jax.tree.leaves(params)]
  if any(shape != jnp.shape(service.phy2log) for shape in shaped):
    raise ValueError(
      f"params leaves must be [L, P, ...] with the placement's {jnp.shape(service.phy2log)}, "
      f"got leading shapes {sorted(set(shaped))}"
    )

  def move(tree: PyTree) -> PyTree:
    moved = relayout(
      jax.tree.map(window, tree), log2phy, new_phy2log, mesh=mesh, expert_axis=expert_axis
    )
    return jax.tree.map(
      lambda leaf, new: jax.lax.dynamic_update_slice_in_dim(leaf, new, first, 0), tree, moved
    )

  if state is not None:
    state = _map_mirrors(state, params, move)
  params = move(params)
  next_layer = jnp.minimum(transition.next_layer + count, num_layers)
  moved = jnp.arange(num_layers) < next_layer
  service = ops.where_rows(moved, target, service)
  return Transition(service, target, next_layer.astype(jnp.int32)), params, state
