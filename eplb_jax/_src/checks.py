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

import functools

import jax
import jax.numpy as jnp
import numpy as np

from eplb_jax._src.topology import check_size

__all__ = [
  "check_counts",
  "check_ids",
  "check_num_gpus",
  "check_scalar",
  "check_served",
  "check_size",
  "check_solver",
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


def check_num_gpus(num_gpus: object, num_slots: int) -> int:
  """The slots per GPU, ``num_slots / num_gpus``: ``ValueError`` naming ``num_gpus`` unless it
  is a positive static int that divides ``num_slots``."""
  num_gpus = check_size(num_gpus, "num_gpus")
  if num_slots % num_gpus:
    raise ValueError(f"num_gpus must divide the number of slots ({num_slots}), got {num_gpus}")
  return num_slots // num_gpus


@functools.partial(jax.jit, static_argnums=1)
def _held(phy2log: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
  """``[L, E]`` whether each layer of ``phy2log`` holds each expert, and whether all do (one
  dispatch, for an eager call)."""
  num_layers = phy2log.shape[0]
  expert = jnp.where(phy2log >= 0, phy2log, num_experts)
  held = jnp.zeros((num_layers, num_experts + 1), bool)
  held = held.at[jnp.arange(num_layers)[:, None], expert].set(True)[:, :num_experts]
  return held, held.all()


def check_served(phy2log: jax.Array, num_experts: int, name: str) -> None:
  """Value check of a placement ``phy2log [L, P]`` (ids in ``[0, E)``, -1 for a slot that
  serves nothing): ``ValueError`` naming ``name`` if a layer leaves an expert without a replica.

  Does nothing when ``phy2log`` is traced. Counted where ``phy2log`` is; only
  the verdict comes to the host, unless an expert is missing.
  """
  if not is_concrete(phy2log) or not phy2log.size:
    return
  with jax.ensure_compile_time_eval():  # concrete inside a trace too
    held, every = _held(phy2log, num_experts)
    if bool(every):
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
