"""Expert load statistics: what the balancer balances, recorded inside the step.

:func:`expert_counts` turns the router's top-k expert ids into per-expert
token counts. Two small pytree states accumulate them across steps, as the
load recorders of vLLM and SGLang do:

* :class:`WindowState`: the sum over the last ``W`` steps (a ring buffer);
* :class:`EmaState`: an exponential moving average.

Every function is pure and jit-friendly: sizes are static, values may be
traced, and states keep their shapes and dtypes across updates.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from eplb_jax._src import checks


def expert_counts(
  expert_ids: jax.Array,
  num_experts: int,
  *,
  mask: jax.Array | None = None,
  dtype: jnp.dtype = jnp.int32,
) -> jax.Array:
  """Counts how many (token, choice) pairs the router sent to each expert.

  Args:
    expert_ids: ``[..., tokens, k]`` integer top-k expert ids (an array or
      nested lists), e.g. ``[tokens, k]`` for one layer or ``[layers,
      tokens, k]``. Ids outside ``[0, num_experts)`` (e.g. -1 for dropped
      choices) are not counted, 64-bit ones included.
    num_experts: ``E``, the number of logical experts (static).
    mask: optional ``[..., tokens]`` per-token weight, broadcastable to
      ``expert_ids.shape[:-1]``: boolean (``False`` for padding tokens) or
      numeric (each choice of the token counts ``mask``, cast to ``dtype``).
    dtype: dtype of the counts (``int32`` or ``float32``).

  Returns:
    ``[..., E]`` counts: ``[E]`` for one layer, ``[layers, E]`` with a
    leading layer axis; zeros when there are no tokens.

  Raises:
    ValueError: ``expert_ids`` is not an integer array of rank >= 2, or
      ``mask`` does not broadcast to its tokens.

  Example:
    >>> import jax.numpy as jnp
    >>> from eplb_jax.runtime import stats
    >>> stats.expert_counts(jnp.array([[0, 2], [2, 1]]), num_experts=4)  # [tokens, top_k] ids
    Array([1, 1, 2, 0], dtype=int32)
  """
  num_experts = checks.check_size(num_experts, "num_experts")
  expert_ids = checks.check_ids(expert_ids, "expert_ids")
  if expert_ids.ndim < 2:
    raise ValueError(f"expert_ids must be [..., tokens, k], got shape {expert_ids.shape}")
  batch = expert_ids.shape[:-2]
  # Out-of-range ids go out of bounds of the scatter below, which drops them.
  ids = checks.narrow_ids(expert_ids, num_experts, num_experts)
  ids = ids.reshape(math.prod(batch), expert_ids.shape[-2] * expert_ids.shape[-1])
  if mask is None:
    amount = jnp.ones(ids.shape, dtype)
  else:
    tokens = expert_ids.shape[:-1]
    try:
      fits = np.broadcast_shapes(np.shape(mask), tokens) == tokens
    except ValueError:
      fits = False
    if not fits:
      raise ValueError(
        f"mask must broadcast to the tokens of expert_ids {tokens}, got shape {np.shape(mask)}"
      )
    per_token = jnp.broadcast_to(jnp.asarray(mask), tokens).astype(dtype)
    amount = jnp.broadcast_to(per_token[..., None], expert_ids.shape).reshape(ids.shape)
  rows = jnp.arange(ids.shape[0], dtype=jnp.int32)[:, None]
  counts = jnp.zeros((ids.shape[0], num_experts), dtype).at[rows, ids].add(amount, mode="drop")
  return counts.reshape(*batch, num_experts)


class WindowState(NamedTuple):
  """Per-step counts of the last ``W`` steps.

  Attributes:
    counts: ``[W, ...]`` ring buffer (e.g. ``[W, layers, E]``); row
      ``step % W`` holds the counts recorded at ``step``, zeros before.
    step: int32 scalar, the number of steps recorded so far.
  """

  counts: jax.Array
  step: jax.Array


def window_init(window: int, shape: tuple[int, ...], dtype: jnp.dtype = jnp.int32) -> WindowState:
  """An empty window of ``window`` steps of counts of ``shape`` (e.g. ``(layers, E)``)."""
  window = checks.check_size(window, "window")
  return WindowState(jnp.zeros((window, *shape), dtype), jnp.zeros((), jnp.int32))


def _check_counts(counts: jax.typing.ArrayLike, shape: tuple[int, ...]) -> jax.Array:
  """``counts`` as a jax array, or ``ValueError`` if its shape is not ``shape``."""
  if np.shape(counts) != shape:
    raise ValueError(f"counts must have the state's shape {shape}, got {np.shape(counts)}")
  return jnp.asarray(counts)


def window_update(state: WindowState, counts: jax.typing.ArrayLike) -> WindowState:
  """Records one step's ``counts`` (shape ``state.counts.shape[1:]``), overwriting the oldest.

  Raises ``ValueError`` if ``counts`` has another shape.
  """
  counts = _check_counts(counts, state.counts.shape[1:])
  index = state.step % state.counts.shape[0]
  buffer = jax.lax.dynamic_update_index_in_dim(
    state.counts, counts.astype(state.counts.dtype), index, axis=0
  )
  return WindowState(buffer, state.step + 1)


def window_load(state: WindowState) -> jax.Array:
  """Total counts over the last ``min(step, W)`` recorded steps, e.g. ``[layers, E]``."""
  return state.counts.sum(axis=0, dtype=state.counts.dtype)


class EmaState(NamedTuple):
  """Exponential moving average of per-step counts.

  Attributes:
    average: float32 ``[...]`` (e.g. ``[layers, E]``), the average before
      bias correction (it starts at zero).
    step: int32 scalar, the number of steps recorded so far.
    decay: float32 scalar in ``[0, 1)``, the weight of the past at each step.
  """

  average: jax.Array
  step: jax.Array
  decay: jax.Array


def ema_init(shape: tuple[int, ...], decay: float) -> EmaState:
  """An empty average of counts of ``shape``; ``decay`` a Python float in ``[0, 1)``."""
  if not 0.0 <= decay < 1.0:
    raise ValueError(f"decay must be in [0, 1), got {decay!r}")
  return EmaState(
    jnp.zeros(shape, jnp.float32), jnp.zeros((), jnp.int32), jnp.asarray(decay, jnp.float32)
  )


def ema_update(state: EmaState, counts: jax.typing.ArrayLike) -> EmaState:
  """Folds one step's ``counts`` in: ``average <- decay * average + (1 - decay) * counts``.

  Raises ``ValueError`` if ``counts`` does not have the shape of ``state.average``.
  """
  counts = _check_counts(counts, state.average.shape)
  average = state.decay * state.average + (1.0 - state.decay) * counts.astype(jnp.float32)
  return EmaState(average, state.step + 1, state.decay)


def ema_load(state: EmaState) -> jax.Array:
  """The bias-corrected average ``average / (1 - decay**step)``; zeros before any step."""
  correction = 1.0 - state.decay ** state.step.astype(jnp.float32)
  return jnp.where(state.step > 0, state.average / jnp.where(state.step > 0, correction, 1.0), 0.0)


def decayed_load(window: jax.typing.ArrayLike, decay: float) -> jax.Array:
  """Recency-weighted loads of a window of per-step counts, rows oldest to newest.

  ``sum_n decay**(N - 1 - n) * window[n]``: the newest row (the last) has
  weight 1, each older one ``decay`` times the next. ``decay=1`` is the plain
  sum, which the balancer applies itself to a window ``[N, L, E]``. A
  :class:`WindowState` ring buffer is not in time order: roll it first so that
  the newest row, ``(step - 1) % W``, comes last:
  ``jnp.roll(state.counts, -(state.step % W), axis=0)``.

  Args:
    window: ``[N, ...]`` counts (e.g. ``[N, layers, E]``), oldest row first.
    decay: a Python float in ``(0, 1]``.

  Returns:
    float32 ``window.shape[1:]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from eplb_jax.runtime import stats
    >>> stats.decayed_load(jnp.array([[1.0, 0.0], [0.0, 1.0]]), 0.5)  # older row weighs 0.5
    Array([0.5, 1. ], dtype=float32)
  """
  if not 0.0 < decay <= 1.0:
    raise ValueError(f"decay must be in (0, 1], got {decay!r}")
  window = jnp.asarray(window, jnp.float32)
  if window.ndim < 1:
    raise ValueError(f"window must have a leading steps axis, got shape {window.shape}")
  age = jnp.arange(window.shape[0] - 1, -1, -1, dtype=jnp.float32)
  weights = jnp.asarray(decay, jnp.float32) ** age
  return jnp.tensordot(weights, window, axes=1)
