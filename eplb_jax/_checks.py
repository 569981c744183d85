"""Argument validation shared by the public entry points.

Shape and configuration checks run at trace time and raise ``ValueError``
naming the offending argument. Value checks (negative or NaN loads) need
concrete values, so they run only when the call is eager; under ``jax.jit``
the loads are sanitised instead (see :func:`sanitize_weight`).
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("greedy", "refined")


def check_size(value: object, name: str) -> int:
  """Returns ``value`` as a positive Python int, or raises ``ValueError``."""
  if isinstance(value, bool):
    raise ValueError(f"{name} must be a static Python int, got bool")
  try:
    size = operator.index(value)
  except TypeError:
    raise ValueError(f"{name} must be a static Python int, got {type(value).__name__}") from None
  if size <= 0:
    raise ValueError(f"{name} must be positive, got {size}")
  return size


def check_mode(mode: str) -> str:
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  return mode


def check_weight(weight: jax.typing.ArrayLike, name: str = "weight") -> jax.Array | np.ndarray:
  """Validates a ``[rows, items]`` load matrix and returns it as float32.

  Raises ``ValueError`` if it is not 2-D or not of a real numeric dtype and,
  when its values are concrete, if any load is negative or not finite. A jax
  array stays a jax array; host input comes back as a NumPy array, which the
  jitted core takes directly (its own transfer is a few microseconds, an
  eager ``jnp.asarray`` about 20).
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
  if np.ndim(weight) != 2:
    raise ValueError(f"{name} must be 2-D [layers, experts], got shape {np.shape(weight)}")
  if isinstance(weight, jax.core.Tracer):
    return sanitize_weight(jnp.asarray(weight, jnp.float32))
  values = np.asarray(weight, np.float32)
  if not np.all(np.isfinite(values)):
    raise ValueError(f"{name} must be finite, found NaN or inf loads")
  if np.any(values < 0):
    raise ValueError(f"{name} must be non-negative, found negative loads")
  return jnp.asarray(weight, jnp.float32) if isinstance(weight, jax.Array) else values


def sanitize_weight(weight: jax.Array) -> jax.Array:
  """Maps negative, NaN and infinite loads to 0 (the documented jit behaviour)."""
  return jnp.where(jnp.isfinite(weight) & (weight > 0), weight, 0.0)
