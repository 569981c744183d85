"""Argument checks of the public entry points, in two kinds kept apart.

* Static checks (shape, dtype, sizes, configuration) need no values: they
  run at trace time, under ``jax.jit`` too, and raise ``ValueError`` naming
  the argument.
* Value checks (negative, NaN or infinite loads) need concrete values, so
  they run only on concrete input, i.e. in an eager call. Under ``jax.jit``
  the jitted core sanitises the loads instead (:func:`sanitize_weight`): the
  documented, safe behaviour is that such loads count as 0.

Loads are balanced in float32. Placements depend only on the ratios of the
loads, so loads too large for float32 sums are scaled by a power of two per
row (exact, and never done to loads whose sums fit).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from eplb_jax._src import elastic
from eplb_jax._src import placement
from eplb_jax._src.placement import Placement
from eplb_jax._src.topology import Topology
from eplb_jax._src.topology import check_num_gpus
from eplb_jax._src.topology import check_size

__all__ = [
  "check_counts",
  "check_gate",
  "check_ids",
  "check_in_service",
  "check_loads",
  "check_mesh",
  "check_new",
  "check_num_gpus",
  "check_num_packs",
  "check_num_replicas",
  "check_phy2log",
  "check_scalar",
  "check_served",
  "check_size",
  "check_solver",
  "check_threshold",
  "check_tolerance",
  "check_topology",
  "check_weight",
  "check_weight_values",
  "is_concrete",
  "layer_steps",
  "narrow_ids",
  "sanitize_weight",
  "sum_window",
]

# Loads of a row are scaled down until the row's sum stays below 2**126, so
# that sums, and the tolerance factor (at most 2) the migration applies to
# them, stay finite in float32.
_SUM_EXPONENT = 126


def is_concrete(x: object) -> bool:
  """Whether ``x`` has values now (it is not a tracer of an enclosing transformation)."""
  return not isinstance(x, jax.core.Tracer)


def check_weight(
  weight: jax.typing.ArrayLike, name: str = "weight", *, window: bool = False
) -> jax.Array | np.ndarray:
  """Static check of a ``[rows, items]`` load matrix; returns it as float32.

  Raises ``ValueError`` naming ``name`` if it is not 2-D (with ``window``:
  2-D or a window of them, 3-D ``[steps, rows, items]``), has no items, or
  is not of a real numeric dtype. A jax array (or tracer) comes back as a
  float32 jax array; host input as a float32 NumPy array, which the jitted
  core takes directly. Rows of wider floats beyond float32's range are first
  scaled by a power of two (:func:`_fit_float32`).
  """
  if not hasattr(weight, "dtype"):
    try:
      weight = np.asarray(weight)
    except ValueError as error:  # ragged nested lists
      raise ValueError(f"{name} must be a [layers, experts] array: {error}") from None
  dtype = weight.dtype
  if dtype == np.bool_ or not (
    jnp.issubdtype(dtype, np.integer) or jnp.issubdtype(dtype, np.floating)
  ):
    raise ValueError(f"{name} must have an integer or float dtype, got {dtype}")
  if window and np.ndim(weight) not in (2, 3):
    raise ValueError(
      f"{name} must be 2-D [layers, experts] or 3-D [steps, layers, experts], "
      f"got shape {np.shape(weight)}"
    )
  if not window and np.ndim(weight) != 2:
    raise ValueError(f"{name} must be 2-D [layers, experts], got shape {np.shape(weight)}")
  if not np.shape(weight)[-1]:
    raise ValueError(f"{name} must have at least one expert, got shape {np.shape(weight)}")
  weight = _fit_float32(weight)
  if isinstance(weight, jax.Array):
    return weight.astype(jnp.float32)
  return np.asarray(weight, np.float32)


def _fit_float32(weight: jax.Array | np.ndarray) -> jax.Array | np.ndarray:
  """Scales the rows of float64 ``weight`` whose largest load is beyond float32's range.

  Each such row (of a window ``[N, L, E]``: each layer, all steps alike) is
  multiplied by a power of two that brings its largest magnitude below
  ``2**127``; other rows, and narrower dtypes, are returned unchanged. NaN
  and infinite loads stay what they are.
  """
  if not jnp.issubdtype(weight.dtype, np.floating) or np.finfo(weight.dtype).maxexp <= 128:
    return weight
  xp = jnp if isinstance(weight, jax.Array) else np
  magnitude = xp.abs(weight)
  axes = (0, 2) if weight.ndim == 3 else 1
  peak = xp.max(xp.where(xp.isfinite(magnitude), magnitude, 0), axis=axes, keepdims=True)
  shift = xp.maximum(xp.frexp(peak)[1] - 127, 0)  # peak < 2**exponent
  return xp.where(shift > 0, xp.ldexp(weight, -shift), weight)


def check_scalar(value: object, name: str) -> jax.Array | np.ndarray:
  """Static check of a real scalar: a Python int or float, or a 0-d integer or float array
  (traced or not). Returns it as an array; ``ValueError`` naming ``name`` otherwise (None, a
  bool, a string, an array of another shape)."""
  if isinstance(value, bool) or not (hasattr(value, "dtype") or isinstance(value, int | float)):
    raise ValueError(f"{name} must be a real number, got {value!r}")
  value = value if hasattr(value, "dtype") else np.asarray(value)
  if value.dtype == np.bool_ or not (
    jnp.issubdtype(value.dtype, np.integer) or jnp.issubdtype(value.dtype, np.floating)
  ):
    raise ValueError(f"{name} must be a real number, got dtype {value.dtype}")
  if np.ndim(value) != 0:
    raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}")
  return value


def check_weight_values(weight: jax.Array | np.ndarray, name: str = "weight") -> None:
  """Value check of float32 loads: raises ``ValueError`` on negative, NaN or inf loads.

  Does nothing when ``weight`` is traced (see :func:`sanitize_weight`). Loads
  on a device are reduced there; only the verdict comes to the host.
  """
  if not is_concrete(weight):
    return
  xp = jnp if isinstance(weight, jax.Array) else np
  with jax.ensure_compile_time_eval():  # concrete loads inside a trace, e.g. a jit's constant
    finite, negative = bool(xp.all(xp.isfinite(weight))), bool(xp.any(weight < 0))
  if not finite:
    raise ValueError(f"{name} must be finite, found NaN or inf loads")
  if negative:
    raise ValueError(f"{name} must be non-negative, found negative loads")


def sanitize_weight(weight: jax.Array) -> jax.Array:
  """Maps negative, NaN and infinite loads of float32 ``weight [X, n]`` to 0, and fits the sums.

  Setting bad loads to 0 is the documented jit behaviour. A row whose sum
  could overflow float32 (``n * max >= 2**126``) is multiplied by the power
  of two that brings it below; the product is exact (short of subnormal
  results), so the row's placement is that of its loads. Other rows come
  back bit for bit.
  """
  weight = jnp.where(jnp.isfinite(weight) & (weight > 0), weight, 0.0)
  # max < 2**(biased exponent - 126) and n <= 2**bits: the sum is below 2**126
  # once scaled by 2**-shift.
  biased = jax.lax.bitcast_convert_type(weight.max(axis=-1, keepdims=True), jnp.int32) >> 23
  bits = max(weight.shape[-1] - 1, 0).bit_length()
  shift = jnp.clip(biased - 126 + bits - _SUM_EXPONENT, 0, 126)
  return weight * jax.lax.bitcast_convert_type((127 - shift) << 23, jnp.float32)


# Jitted: an eager check_served runs one program, not the counts' ops one by one.
_replica_counts = jax.jit(placement.replica_counts, static_argnums=1)


def check_served(phy2log: jax.Array, num_experts: int, name: str) -> None:
  """Value check of a placement ``phy2log [L, P]`` (ids in ``[0, E)``, -1 for a slot that
  serves nothing): ``ValueError`` naming ``name`` if a layer leaves an expert without a replica.

  Does nothing when ``phy2log`` is traced. Counted where ``phy2log`` is; only
  the verdict comes to the host, unless an expert is missing.
  """
  if not is_concrete(phy2log) or not phy2log.size:
    return
  with jax.ensure_compile_time_eval():  # concrete inside a trace too
    held = _replica_counts(phy2log, num_experts) > 0
    if bool(held.all()):
      return
  layer, expert = np.argwhere(~np.asarray(held))[0]
  raise ValueError(
    f"{name} must give every expert a replica on an active GPU in every layer: layer {layer} "
    f"has none of expert {expert}"
  )


def check_ids(ids: jax.typing.ArrayLike, name: str) -> jax.Array | np.ndarray:
  """Static check of an array of ids (experts or slots): an integer array, or a list of ints.

  Returns a NumPy array for host input (so that 64-bit ids are compared
  before anything narrows them, see :func:`narrow_ids`), the jax array
  otherwise. Raises ``ValueError`` naming ``name`` for any other dtype.
  """
  if not hasattr(ids, "dtype"):
    try:
      ids = np.asarray(ids)
    except ValueError as error:  # ragged nested lists
      raise ValueError(f"{name} must be an integer array: {error}") from None
    if ids.size == 0:
      ids = ids.astype(np.int32)
  if ids.dtype == np.bool_ or not jnp.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"{name} must have an integer dtype, got {ids.dtype}")
  return ids


def narrow_ids(ids: jax.Array | np.ndarray, limit: int, fill: int) -> jax.Array:
  """int32 ``ids``, with every id outside ``[0, limit)`` replaced by ``fill``.

  The range test runs in the ids' own dtype, so a 64-bit id such as
  ``2**32 + 1`` is out of range rather than wrapped onto a valid id.
  """
  xp = np if isinstance(ids, np.ndarray) else jnp
  valid = (ids >= 0) & (ids < limit)
  return jnp.asarray(xp.where(valid, ids, fill).astype(xp.int32))


def layer_steps(weight: jax.Array | np.ndarray) -> jax.Array:
  """A checked window ``[N, L, E]`` as ``[L, N, E]``, sanitised layer by layer.

  Each layer's steps are scaled together (:func:`sanitize_weight` on the
  layer's ``N * E`` entries), so that any sum of them, plain or weighted by
  factors up to 1, stays finite in float32.
  """
  steps, layers, experts = weight.shape
  by_layer = jnp.swapaxes(weight, 0, 1).reshape(layers, steps * experts)
  return sanitize_weight(by_layer).reshape(layers, steps, experts)


def sum_window(weight: jax.Array | np.ndarray) -> jax.Array | np.ndarray:
  """Loads ``[L, E]`` of a checked window ``[N, L, E]``: the sum over its steps.

  Entries are sanitised before the sum, so under ``jax.jit`` a bad entry of one
  step counts as 0 without spoiling the other steps; each layer's steps are
  scaled together, so that their sum stays finite (:func:`layer_steps`).
  ``[L, E]`` is returned as is.
  """
  if weight.ndim == 2:
    return weight
  return layer_steps(weight).sum(axis=1)


def check_solver(tolerance: object, max_steps: object) -> tuple[float, int]:
  """Static check of an iterative solver's settings: a tolerance >= 0 and a positive step cap."""
  if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not tolerance >= 0:
    raise ValueError(f"tolerance must be a non-negative Python float, got {tolerance!r}")
  return float(tolerance), check_size(max_steps, "max_steps")


def check_counts(counts: jax.typing.ArrayLike) -> jax.Array:
  """Static check of a step's (or a window's) token counts; eagerly also their values."""
  counts = check_ids(counts, "counts")
  if counts.ndim not in (2, 3):
    raise ValueError(
      f"counts must be [layers, experts] or a window [steps, layers, experts], got shape "
      f"{counts.shape}"
    )
  if not counts.shape[-1]:
    raise ValueError(f"counts must have at least one expert, got shape {counts.shape}")
  if is_concrete(counts):
    host = jax.device_get(counts)
    if (host < 0).any():
      raise ValueError("counts must be non-negative")
    if (host.astype("int64").sum(-1) >= 2**31).any():
      raise ValueError("counts of one layer must add up to less than 2**31")
  return jnp.asarray(counts).astype(jnp.int32)


def check_topology(topology: object) -> Topology:
  """Static check: ``topology`` is a :class:`Topology`."""
  if not isinstance(topology, Topology):
    raise ValueError(f"topology must be a Topology, got {type(topology).__name__}")
  return topology


def check_loads(weight: jax.typing.ArrayLike, topology: Topology, **kwargs) -> jax.Array:
  """Static and value checks of ``weight``, ``[L, E]`` or a window ``[N, L, E]``, against
  ``topology`` (``kwargs`` go to :meth:`Topology.check_experts`); returns float32 loads
  ``[L, E]`` (a window summed over its steps)."""
  weight = check_weight(weight, window=True)
  topology.check_experts(weight.shape[-1], **kwargs)
  check_weight_values(weight)
  return sum_window(weight)


def check_mesh(mesh: object, layer_axis: object) -> None:
  """Static check: ``mesh`` and ``layer_axis`` are given together or not at all (what they
  are is :func:`.sharding.check_mesh_axis`'s to check)."""
  if (mesh is None) != (layer_axis is None):
    raise ValueError("mesh must be given with layer_axis, and layer_axis with mesh")


def check_phy2log(phy2log: jax.typing.ArrayLike, name: str) -> jax.Array:
  """Static check of a slot map ``[layers, num_replicas]`` of integer ids; returns it as int32."""
  if np.ndim(phy2log) != 2:
    raise ValueError(f"{name} must be 2-D [layers, num_replicas], got shape {np.shape(phy2log)}")
  phy2log = jnp.asarray(phy2log)
  if not jnp.issubdtype(phy2log.dtype, jnp.integer):
    raise ValueError(f"{name} must have an integer dtype, got {phy2log.dtype}")
  return phy2log.astype(jnp.int32)


def check_in_service(
  phy2log: jax.typing.ArrayLike, weight: jax.Array, topology: Topology, name: str
) -> jax.Array:
  """Checks a placement in service ``[L, P]``: expert ids in ``[0, E)``, or -1 for an empty slot.

  Returns it as int32, other ids (possible only when traced) as -1.
  """
  previous = check_ids(phy2log, name)
  if np.shape(previous) != (weight.shape[0], topology.num_replicas):
    raise ValueError(
      f"{name} must have shape [layers, num_replicas] = "
      f"{(weight.shape[0], topology.num_replicas)}, got {np.shape(previous)}"
    )
  if is_concrete(previous) and previous.size:
    with jax.ensure_compile_time_eval():  # concrete inside a trace too
      low, high = int(previous.min()), int(previous.max())
    if low < -1 or high >= weight.shape[1]:
      raise ValueError(
        f"{name} must hold expert ids in [0, {weight.shape[1]}) or -1 for an "
        f"empty slot, found [{low}, {high}]"
      )
  return narrow_ids(previous, weight.shape[1], -1)


def check_tolerance(tolerance: jax.typing.ArrayLike) -> jax.Array:
  """A migration tolerance: a real scalar, eagerly in ``[0, 1)``; returns it as float32."""
  value = check_scalar(tolerance, "tolerance")
  if is_concrete(value) and not 0 <= float(value) < 1:
    raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
  return jnp.asarray(value, jnp.float32)


def check_threshold(threshold: jax.typing.ArrayLike) -> jax.Array:
  """A gate threshold: a real scalar, eagerly finite and ``>= 0``; returns it as float32."""
  value = check_scalar(threshold, "threshold")
  if is_concrete(value) and not 0 <= float(value) < np.inf:
    raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
  return jnp.asarray(value, jnp.float32)


def check_gate(
  weight: jax.typing.ArrayLike,
  topology: Topology,
  current_phy2log: jax.typing.ArrayLike,
  threshold: jax.typing.ArrayLike,
  per_layer: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The checked ``(weight, current_phy2log, threshold)`` of the gate functions."""
  check_topology(topology)
  if not isinstance(per_layer, bool):
    raise ValueError(f"per_layer must be a bool, got {per_layer!r}")
  weight = check_loads(weight, topology)
  current = check_in_service(current_phy2log, weight, topology, "current_phy2log")
  return weight, current, check_threshold(threshold)


def check_new(new: Placement, weight: jax.Array, topology: Topology) -> Placement:
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
    array = check_ids(array, f"new.{name}")
    if np.shape(array) != shape:
      raise ValueError(f"new.{name} must have shape {shape}, got {np.shape(array)}")
    arrays.append(jnp.asarray(array, jnp.int32))
  # Values, so eager calls only: under jit, gate.gate never takes such a layer of new.
  phy2log = check_in_service(new[0], weight, topology, "new.phy2log")
  check_served(elastic.clear_failed(phy2log, topology), num_logical, "new")
  return Placement(*arrays)


def check_num_replicas(num_replicas: object, num_experts: int) -> int:
  """Static check of the replicas of ``num_experts`` experts: a size ``>= num_experts``."""
  num_replicas = check_size(num_replicas, "num_replicas")
  if num_replicas < num_experts:
    raise ValueError(
      f"num_replicas must be >= the number of experts ({num_experts}), got {num_replicas}"
    )
  return num_replicas


def check_num_packs(num_packs: object, num_items: int) -> int:
  """Static check of a number of packs of ``num_items`` items: a size that divides it."""
  num_packs = check_size(num_packs, "num_packs")
  if num_items % num_packs:
    raise ValueError(f"num_packs must divide the number of items ({num_items}), got {num_packs}")
  return num_packs
