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
(the compiled program of ``tests/test_weights.py`` shows exactly that). A
source replicated on every device needs no communication. Re-laying out thus
costs about one all-gather of the expert weights: do it every few hundred
steps, not every step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from eplb_jax._src import sharding

PyTree = object


def apply_placement(
  params: PyTree, phy2log: jax.Array, *, mesh: Mesh | None = None, expert_axis: str = "expert"
) -> PyTree:
  """Per-slot copies of stacked expert parameters: ``leaf[phy2log]`` for every leaf.

  Args:
    params: pytree of ``[E, ...]`` leaves with ``phy2log [P]``, or of
      ``[L, E, ...]`` leaves with ``phy2log [L, P]``.
    phy2log: int logical expert of each slot, ``[P]`` or ``[L, P]``.
    mesh: optional device mesh; with it every output leaf is laid out with
      its slot axis sharded over ``expert_axis``.
    expert_axis: the mesh axis name that splits slots (``P`` must be
      divisible by its size). Other dimensions keep their sharding (Explicit
      axes) or are left to the compiler (Auto axes).

  Returns:
    The pytree with ``[P, ...]`` (or ``[L, P, ...]``) leaves: slot ``s`` holds
    the parameters of expert ``phy2log[s]``.
  """
  if phy2log.ndim not in (1, 2):
    raise ValueError(f"phy2log must be [P] or [L, P], got shape {phy2log.shape}")
  layered = phy2log.ndim == 2
  index = (jnp.arange(phy2log.shape[0])[:, None], phy2log) if layered else (phy2log,)
  if mesh is None:
    return jax.tree.map(lambda leaf: jnp.asarray(leaf)[index], params)
  sharding.check_mesh_axis(mesh, expert_axis, phy2log.shape[-1], name="expert_axis", what="slots")
  slot_dim = phy2log.ndim - 1

  def gather(leaf: jax.typing.ArrayLike) -> jax.Array:
    leaf = jnp.asarray(leaf)
    if expert_axis in mesh.explicit_axes:
      # Explicit axes: keep the leaf's other dimensions sharded as they are.
      spec = list(jax.typeof(leaf).sharding.spec)
      spec += [None] * (leaf.ndim - len(spec))
      spec[slot_dim] = expert_axis
      return leaf.at[index].get(out_sharding=NamedSharding(mesh, P(*spec)))
    spec = [P.UNCONSTRAINED] * leaf.ndim
    spec[slot_dim] = expert_axis
    return jax.lax.with_sharding_constraint(leaf[index], NamedSharding(mesh, P(*spec)))

  return jax.tree.map(gather, params)


def relayout(
  params: PyTree,
  log2phy: jax.Array,
  new_phy2log: jax.Array,
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
    new_phy2log: the new placement's ``[P']`` (or ``[L, P']``) expert of each slot.
    mesh: as in :func:`apply_placement`.
    expert_axis: as in :func:`apply_placement`.

  Returns:
    The pytree laid out by the new placement: new slot ``s`` copies old slot
    ``log2phy[new_phy2log[s], 0]`` (the expert's first old replica).
  """
  first = log2phy[..., 0]
  if new_phy2log.ndim == 2:
    source = jnp.take_along_axis(first, new_phy2log, axis=-1)
  else:
    source = first[new_phy2log]
  return apply_placement(params, source, mesh=mesh, expert_axis=expert_axis)
