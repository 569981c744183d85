"""Argument checks of the public entry points, in two kinds kept apart.

* Static checks (shape, dtype, sizes, configuration) need no values: they
  run at trace time, under ``jax.jit`` too, and raise ``ValueError`` naming
  the argument.
* Value checks (negative, NaN or infinite loads) need concrete values, so
  they run only on concrete input, i.e. in an eager call. Under ``jax.jit``
  the jitted core sanitises the loads instead (:func:`sanitize_weight`): the
  documented, safe behaviour is that such loads count as 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from eplb_jax._src.topology import check_size

__all__ = [
  "check_size",
  "check_weight",
  "check_weight_values",
  "is_concrete",
  "sanitize_weight",
  "sum_window",
]


def is_concrete(x: object) -> bool:
  """Whether ``x`` has values now (it is not a tracer of an enclosing transformation)."""
  return not isinstance(x, jax.core.Tracer)


def check_weight(
  weight: jax.typing.ArrayLike, name: str = "weight", *, window: bool = False
) -> jax.Array | np.ndarray:
  """Static check of a ``[rows, items]`` load matrix; returns it as float32.

  Raises ``ValueError`` naming ``name`` if it is not 2-D (with ``window``:
  2-D or a window of them, 3-D ``[steps, rows, items]``) or not of a real
  numeric dtype. A jax array (or tracer) comes back as a float32 jax array;
  host input as a float32 NumPy array, which the jitted core takes directly.
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
  if isinstance(weight, jax.Array):
    return weight.astype(jnp.float32)
  return np.asarray(weight, np.float32)


def check_weight_values(weight: jax.Array | np.ndarray, name: str = "weight") -> None:
  """Value check of float32 loads: raises ``ValueError`` on negative, NaN or inf loads.

  Does nothing when ``weight`` is traced (see :func:`sanitize_weight`). Loads
  on a device are reduced there; only the verdict comes to the host.
  """
  if not is_concrete(weight):
    return
  xp = jnp if isinstance(weight, jax.Array) else np
  if not bool(xp.all(xp.isfinite(weight))):
    raise ValueError(f"{name} must be finite, found NaN or inf loads")
  if bool(xp.any(weight < 0)):
    raise ValueError(f"{name} must be non-negative, found negative loads")


def sanitize_weight(weight: jax.Array) -> jax.Array:
  """Maps negative, NaN and infinite loads to 0 (the documented jit behaviour)."""
  return jnp.where(jnp.isfinite(weight) & (weight > 0), weight, 0.0)


def sum_window(weight: jax.Array | np.ndarray) -> jax.Array | np.ndarray:
  """Loads ``[L, E]`` of a checked window ``[N, L, E]``: the sum over its steps.

  Entries are sanitised before the sum, so under ``jax.jit`` a bad entry of one
  step counts as 0 without spoiling the other steps. ``[L, E]`` is returned as is.
  """
  return weight if weight.ndim == 2 else sanitize_weight(weight).sum(axis=0)
