"""Placement for the steps: the candidate whose recorded steps, each split, are lightest.

A window's placement balances the window's sum, but every step is served by
the split of its own counts (:func:`eplb_jax.split_tokens`) and pays its own
heaviest GPU. :func:`rebalance_for_steps` takes the recorded steps ``[N, L,
E]``, places their sum with each candidate mode, splits every recorded step
on every candidate, and keeps per layer the candidate whose steps have the
least mean heaviest GPU (SGLang's recorder keeps such steps; its
``deepseek_vec`` minimises the same sum of per-step maxima, with its own
even split). DeepSeek's greedy placement is one of the default candidates,
so on the recorded steps the result is never heavier than greedy's, by
construction.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from eplb_jax._src import api
from eplb_jax._src import checks
from eplb_jax._src import split
from eplb_jax._src.modes import Mode
from eplb_jax._src.modes import check_mode
from eplb_jax._src.placement import Placement
from eplb_jax._src.topology import Topology

DEFAULT_CANDIDATES = ("gpu_aware", "greedy")


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _choose(
  counts: jax.Array, topology: Topology, modes: tuple[Mode, ...], tolerance: float, max_steps: int
) -> Placement:
  weight = counts.sum(0, dtype=jnp.float32)
  candidates = [api._solve(weight, topology, mode) for mode in modes]
  num_steps, num_layers, _ = counts.shape

  def step_cost(placement: Placement) -> jax.Array:
    quotas = split._split(counts, placement.phy2log, topology.num_gpus, tolerance, max_steps)
    per_gpu = quotas.reshape(num_steps, num_layers, topology.num_gpus, -1).sum(-1)
    return per_gpu.max(-1).mean(0, dtype=jnp.float32)  # [L]

  best = jnp.argmin(jnp.stack([step_cost(c) for c in candidates]), axis=0)  # first on ties

  def pick(*layers):
    stacked = jnp.stack(layers)
    index = best.reshape(1, num_layers, *([1] * (stacked.ndim - 2)))
    return jnp.take_along_axis(stacked, index, axis=0)[0]

  return jax.tree.map(pick, *candidates)


def rebalance_for_steps(
  counts: jax.typing.ArrayLike,
  topology: Topology,
  *,
  modes: tuple[str | Mode, ...] = DEFAULT_CANDIDATES,
  tolerance: float = split.DEFAULT_TOLERANCE,
  max_steps: int = split.DEFAULT_MAX_STEPS,
) -> Placement:
  """Places experts for the recorded steps, each served by its own split.

  Places the sum of ``counts`` with each mode of ``modes``, splits every
  recorded step on each candidate (:func:`eplb_jax.split_tokens`), and keeps
  per layer the candidate whose steps have the least mean heaviest GPU; ties
  go to the earlier mode. With the default ``modes`` the result's steps are
  never heavier on average than those of DeepSeek's greedy placement, and
  never than the default mode's. Pure and jit-friendly: ``topology``,
  ``modes``, ``tolerance`` and ``max_steps`` are static.

  Args:
    counts: ``[N, L, E]`` int tokens routed to each expert in each of ``N``
      recorded steps (e.g. a :func:`eplb_jax.runtime.stats.window_init`
      window's buffer).
    topology: slots, expert groups, nodes and GPUs, as for :func:`eplb_jax.rebalance`.
    modes: the candidate modes (names or instances), at least one.
    tolerance, max_steps: the split's solver settings (see :func:`eplb_jax.split_tokens`).

  Returns:
    The :class:`Placement`, layer by layer one of the candidates'.

  Raises:
    ValueError: ``counts`` is not an integer ``[N, L, E]`` array, a bad
      topology, mode or solver setting; eagerly, negative counts.
  """
  if not isinstance(topology, Topology):
    raise ValueError(f"topology must be a Topology, got {type(topology).__name__}")
  if isinstance(modes, str) or not isinstance(modes, tuple | list) or not modes:
    raise ValueError(f"modes must be a non-empty tuple of modes, got {modes!r}")
  modes = tuple(check_mode(mode) for mode in modes)
  tolerance, max_steps = checks.check_solver(tolerance, max_steps)
  counts = checks.check_counts(counts)
  if counts.ndim != 3:
    raise ValueError(f"counts must be [steps, layers, experts], got shape {counts.shape}")
  topology.check_experts(counts.shape[-1])
  if not counts.shape[1]:
    return api.rebalance(jnp.zeros(counts.shape[1:], jnp.float32), topology)
  checks.check_size(counts.shape[0], "the number of steps in counts")
  return _choose(counts, topology, modes, tolerance, max_steps)
