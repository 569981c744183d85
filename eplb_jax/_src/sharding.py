"""Sharded placement: each device balances its own layers, with no communication.

Layers are independent balancing problems, so splitting the ``[layers,
experts]`` loads over a mesh axis lets every device compute the placement of
its layers locally. :func:`shard_layers` runs an unsharded core under
:func:`jax.shard_map` over that axis: the compiled program holds no
collective, and the maps come back sharded like the loads,
``NamedSharding(mesh, P(layer_axis))``. :func:`eplb_jax.rebalance` uses it
when given ``mesh=``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AxisName = str | tuple[str, ...]


def check_mesh_axis(
  mesh: object, axis: object, length: int, *, name: str = "layer_axis", what: str = "layers"
) -> AxisName:
  """Validates ``mesh`` and the axis argument ``name`` that splits ``length`` items.

  Returns ``axis``, a mesh axis name or a tuple of names.

  Raises:
    ValueError: ``mesh`` is not a :class:`jax.sharding.Mesh`; ``axis`` is not
      a mesh axis name or a non-empty tuple of distinct ones; or ``length`` is
      not divisible by the product of those axis sizes (nothing is padded:
      pad the loads with zero rows and slice the maps back).
  """
  if not isinstance(mesh, Mesh | AbstractMesh):
    raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  names = (axis,) if isinstance(axis, str) else axis
  if not isinstance(names, tuple) or not names or len(set(names)) != len(names):
    raise ValueError(
      f"{name} must be a mesh axis name or a non-empty tuple of distinct names, got {axis!r}"
    )
  unknown = [n for n in names if n not in mesh.axis_names]
  if unknown:
    raise ValueError(f"{name} names {unknown} are not axes of the mesh {mesh.axis_names}")
  size = math.prod(mesh.shape[n] for n in names)
  if length % size:
    raise ValueError(
      f"the number of {what} ({length}) must be divisible by the size of {name} {axis!r} ({size})"
    )
  return axis


def explicit_sharding(x: object) -> NamedSharding | None:
  """The sharding of ``x``'s type when it splits ``x`` over Explicit mesh axes, else None.

  Explicit axes make the sharding part of the array type (the default of
  :func:`jax.make_mesh`), so code written for unsharded arrays cannot take
  such an array as it is. Auto axes, NumPy arrays and single-device arrays
  give None: the compiler lays those out.
  """
  if not isinstance(x, jax.Array):
    return None
  sharding = jax.typeof(x).sharding
  if not isinstance(sharding, NamedSharding) or not (
    set(sharding.mesh.explicit_axes) & _names(sharding.spec)
  ):
    return None
  return sharding


def rows_split(x: jax.Array) -> tuple[AbstractMesh, AxisName] | None:
  """The mesh and axis name(s) splitting the rows of ``x`` over Explicit axes, if any.

  None when ``x`` has no Explicit axes, or they do not split its first
  dimension alone (see :func:`replicate`).
  """
  sharding = explicit_sharding(x)
  if sharding is None or not sharding.spec or sharding.spec[0] is None:
    return None
  if _names(P(*sharding.spec[1:])):
    return None
  return sharding.mesh, sharding.spec[0]


def replicate(x: jax.typing.ArrayLike) -> jax.typing.ArrayLike:
  """``x``, replicated on every device if its type splits it over Explicit axes."""
  sharding = explicit_sharding(x)
  if sharding is None:
    return x
  return jax.reshard(x, NamedSharding(sharding.mesh, P()))


def lay_out(x: jax.Array, sharding: NamedSharding) -> jax.Array:
  """Lays ``x`` out as ``sharding``, inside or outside ``jax.jit``.

  Explicit mesh axes are part of the array type and need :func:`jax.reshard`;
  Auto axes take a :func:`jax.lax.with_sharding_constraint`.
  """
  if set(sharding.mesh.explicit_axes) & _names(sharding.spec):
    return jax.reshard(x, sharding)
  return jax.lax.with_sharding_constraint(x, sharding)


def _names(spec: P) -> set[str]:
  names = set()
  for entry in spec:
    if isinstance(entry, str):
      names.add(entry)
    elif entry is not None:
      names.update(entry)
  return names


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def shard_layers(
  core: Callable, static: tuple, mesh: Mesh, layer_axis: AxisName, *arrays: jax.Array
):
  """Runs ``core(*arrays, *static)`` on each device's layers of ``arrays``.

  Arrays of rank >= 1 are split over ``layer_axis`` along their first axis;
  scalars are replicated. ``core`` must be a hashable function (a module-level
  one) returning a pytree of ``[L, ...]`` arrays, which come back sharded as
  ``NamedSharding(mesh, P(layer_axis))``.
  """
  spec = P(layer_axis)
  specs = tuple(spec if jnp.ndim(a) else P() for a in arrays)
  # Explicit axes are part of the array type: shard_map wants its inputs laid
  # out as in_specs says already.
  arrays = tuple(lay_out(a, NamedSharding(mesh, s)) for a, s in zip(arrays, specs, strict=True))

  def local(*shards: jax.Array):
    return core(*shards, *static)

  # check_vma=False: the core's loop carries start from constants, which the
  # varying-axes type check would reject; the body has no collectives to check.
  return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=spec, check_vma=False)(*arrays)
