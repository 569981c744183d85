"""Per-step split: how many of a step's tokens of each expert each of its replicas takes.

A placement fixes which slots hold each expert; a step's router then sends
``c[e]`` tokens to expert ``e``, and the step takes as long as its heaviest
GPU. Choosing the quotas ``x[s] >= 0`` of each slot (summing to ``c[e]`` over
the slots of ``e``) to minimise the heaviest GPU is a min-max transportation
problem on the bipartite graph experts -> GPUs. Its GPU loads form the base
polytope of a supermodular function, so the load vector of least Euclidean
norm is also the one of least maximum (Fujishige); the solver minimises
``1/2 sum_g load[g]**2``:

* **Variables**: one per (expert, GPU) pair; an expert's duplicates on one
  GPU share its quota (evenly, at the end). Slots are sorted once by
  (expert, GPU), so every per-expert sum is a segment sum.
* **Iteration**: accelerated projected gradient (FISTA, step ``1 / d`` for a
  GPU holding at most ``d`` variables, which is the gradient's Lipschitz
  constant) with a restart whenever the objective rises. The projection on
  ``{x >= 0, sum over e's pairs = c[e]}`` is exact (Michelot's active-set
  iteration, at most one step per replica).
* **Certificate**: with GPUs ranked by load, the experts whose every replica
  lies among the ``k`` heaviest GPUs weigh at least ``k`` times the optimum
  on those GPUs, so ``max_k`` of that sum over ``k`` is a lower bound. At the
  optimum it is tight (an expert feeding the top level set only has replicas
  there), so the loop stops when the heaviest GPU is within ``tolerance`` of
  the bound or at most its ceiling (no split into whole tokens beats that),
  or after ``max_steps`` steps; the best iterate is kept, and the start is
  the even split, so the result is never heavier than it.
* **Rounding**: per expert, quotas are differences of the rounded cumulative
  fractional quotas: integers that add up to ``c[e]``, each within one token
  of its fractional value, so a GPU gains less than one token per slot.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from eplb_jax._src import checks
from eplb_jax._src import ops
from eplb_jax._src import placement as placement_lib
from eplb_jax._src.placement import Placement
from eplb_jax._src.topology import Topology

# Default stopping rule: the heaviest GPU within 0.1% of the certified lower bound.
DEFAULT_TOLERANCE = 1e-3
DEFAULT_MAX_STEPS = 128
# Solver steps between two certificates: the bound costs about half a step.
_CHECK_EVERY = 4


class _Pairs(NamedTuple):
  """One layer's slots sorted by (expert, slot): the solver's variables and their segments.

  An expert's slots on one GPU are adjacent (slots are numbered GPU by GPU)
  and form a *pair* (expert, GPU); the first slot of a pair carries the
  pair's quota while solving.
  """

  order: jax.Array  # [P] slot at each sorted position
  expert: jax.Array  # [P] its expert, E for an empty slot
  gpu: jax.Array  # [P] its GPU
  first: jax.Array  # [P] bool: the first slot of its pair (and of a held expert)
  start: jax.Array  # [P] bool: the first slot of its expert
  end: jax.Array  # [P] bool: the last slot of its expert
  copy: jax.Array  # [P] rank of the slot among its pair's slots
  copies: jax.Array  # [P] slots in its pair


def _segment_scan(values: jax.Array, start: jax.Array) -> jax.Array:
  """Inclusive cumulative sums of ``values`` restarted where ``start`` is True."""

  def add(a, b):
    value_a, start_a = a
    value_b, start_b = b
    return jnp.where(start_b, value_b, value_a + value_b), start_a | start_b

  return jax.lax.associative_scan(add, (values, start))[0]


def _pairs(phy2log: jax.Array, num_experts: int, slots_per_gpu: int) -> _Pairs:
  num_slots = phy2log.shape[0]
  slot = jnp.arange(num_slots, dtype=jnp.int32)
  slot_expert = jnp.where(phy2log >= 0, phy2log, num_experts)
  if (num_experts + 1) * num_slots < 2**31:
    # One sort of distinct int32 keys (expert, slot): the slot comes back from the key.
    key = jax.lax.sort(slot_expert * num_slots + slot)
    order, expert = key % num_slots, key // num_slots
  else:
    order = jnp.argsort(slot_expert, stable=True).astype(jnp.int32)
    expert = slot_expert[order]
  gpu = order // slots_per_gpu
  differs = jnp.ones(1, bool)
  start = jnp.concatenate([differs, expert[1:] != expert[:-1]])
  end = jnp.concatenate([expert[1:] != expert[:-1], differs])
  first = (start | jnp.concatenate([differs, gpu[1:] != gpu[:-1]])) & (expert < num_experts)
  # Copies of an expert on one GPU, counted among the GPU's slots.
  by_gpu = slot_expert.reshape(-1, slots_per_gpu)
  same = by_gpu[:, :, None] == by_gpu[:, None, :]
  earlier = jnp.arange(slots_per_gpu)[None, :] < jnp.arange(slots_per_gpu)[:, None]
  copy = (same & earlier).sum(-1, dtype=jnp.int32).reshape(-1)[order]
  copies = same.sum(-1, dtype=jnp.int32).reshape(-1)[order]
  return _Pairs(order, expert, gpu, first, start, end, copy, copies)


def _per_expert(values: jax.Array, pairs: _Pairs, num_experts: int) -> jax.Array:
  """``[E + 1]`` sums of ``values`` (per sorted position) over each expert's slots."""
  return jax.ops.segment_sum(values, pairs.expert, num_experts + 1, indices_are_sorted=True)


# Michelot rounds per projection: exact for an expert on at most this many GPUs.
_PROJECTION_ROUNDS = 2


def _project(v: jax.Array, counts: jax.Array, pairs: _Pairs, num_experts: int) -> jax.Array:
  """A point of ``{x >= 0 on pairs, sum over e's pairs = counts[e]}`` near ``v``.

  Michelot's active-set rounds (each drops the pairs at or below the current
  threshold) give the exact Euclidean projection once the active set stops
  shrinking, which takes at most one round per pair of the expert. After a
  fixed number of rounds the positive parts are scaled to the count, so the
  point is always feasible, and it is the projection for every expert on up
  to ``_PROJECTION_ROUNDS`` GPUs (and any expert whose active set settled).
  """
  target = jnp.append(counts, 0.0)
  active = pairs.first
  for _ in range(_PROJECTION_ROUNDS):
    sums = _per_expert(
      jnp.stack([jnp.where(active, v, 0.0), active.astype(v.dtype)], -1), pairs, num_experts
    )
    tau = ((sums[:, 0] - target) / jnp.maximum(sums[:, 1], 1.0))[pairs.expert]
    active = active & (v > tau)
  x = jnp.where(active, v - tau, 0.0)
  total = _per_expert(x, pairs, num_experts)
  scale = jnp.where(total > 0, target / jnp.where(total > 0, total, 1.0), 0.0)
  return x * scale[pairs.expert]


def _bound(loads: jax.Array, counts: jax.Array, pairs: _Pairs, num_experts: int) -> jax.Array:
  """Lower bound on the heaviest GPU: the densest set of the ``k`` heaviest GPUs.

  Any order of the GPUs gives a valid bound; ranking by load gives the tight one.
  """
  num_gpus = loads.shape[0]
  rank = ops.inverse_permutation(ops.argsort_descending(loads, exact=False))
  deepest = jax.ops.segment_max(
    jnp.where(pairs.first, rank[pairs.gpu], -1),
    pairs.expert,
    num_experts + 1,
    indices_are_sorted=True,
  )[:num_experts]
  served = deepest >= 0
  inside = (
    jnp.zeros(num_gpus, jnp.float32)
    .at[jnp.where(served, deepest, 0)]
    .add(jnp.where(served, counts, 0.0))
  )
  prefix = jnp.arange(num_gpus)[:, None] <= jnp.arange(num_gpus)[None, :]
  return jnp.max((inside @ prefix) / jnp.arange(1, num_gpus + 1, dtype=jnp.float32))


class _Iterate(NamedTuple):
  x: jax.Array  # current point (per sorted position)
  y: jax.Array  # extrapolated point
  x_loads: jax.Array  # GPU loads of x
  y_loads: jax.Array  # GPU loads of y (linear in y, so extrapolated alongside it)
  t: jax.Array  # FISTA momentum
  energy: jax.Array  # 1/2 sum of squared GPU loads about their mean, at x
  best: jax.Array  # the iterate with the lightest heaviest GPU so far
  best_max: jax.Array
  bound: jax.Array
  step: jax.Array


def _round(x: jax.Array, counts: jax.Array, pairs: _Pairs) -> jax.Array:
  """Integer quotas per sorted position from the pairs' fractional quotas ``x``.

  Per expert, the rounded cumulative quotas (the last forced to the count)
  are differenced: integers adding up to the count, each within one token of
  its fractional value. A pair's quota is then spread over its copies.
  """
  num_slots = x.shape[0]
  limit = jnp.append(counts, 0)[pairs.expert]
  cumulative = jnp.clip(jnp.round(_segment_scan(x, pairs.start)), 0, limit).astype(jnp.int32)
  cumulative = jnp.where(pairs.end, limit, cumulative)
  before = jnp.where(pairs.start, 0, jnp.roll(cumulative, 1))
  position = jnp.arange(num_slots, dtype=jnp.int32)
  pair_first = position - pairs.copy
  share = cumulative[pair_first + pairs.copies - 1] - before[pair_first]
  quota = share // pairs.copies + (pairs.copy < share % pairs.copies)
  return jnp.where(pairs.expert < counts.shape[0], quota, 0)


def _split_layer(
  counts: jax.Array,
  phy2log: jax.Array,
  num_gpus: int,
  tolerance: float,
  max_steps: int,
  start: jax.Array | None = None,
) -> jax.Array:
  """Integer quotas ``[P]`` of one layer's step, from the even split or from ``start``.

  ``start``: a feasible fractional split ``[P]`` (each expert's slots adding
  up to its count) to start from instead of the even split; the result is
  never heavier than it, before rounding.
  """
  num_experts, num_slots = counts.shape[0], phy2log.shape[0]
  pairs = _pairs(phy2log, num_experts, num_slots // num_gpus)
  counts_f = counts.astype(jnp.float32)

  def gpu_loads(x):
    return jax.ops.segment_sum(x, pairs.gpu, num_gpus)

  # Per expert: its slots, and its pairs (the GPUs holding it).
  slots_of, spread = jnp.moveaxis(
    _per_expert(jnp.stack([jnp.ones(num_slots), pairs.first], -1), pairs, num_experts), -1, 0
  )
  expert_count = jnp.append(counts_f, 0.0)[pairs.expert]
  movable = pairs.first & (spread[pairs.expert] > 1)
  # The start (by default the even split: each slot of e takes counts[e] /
  # (slots of e)), the loads of the experts on one GPU alone, and the
  # gradient's Lipschitz constant: the most pairs one GPU holds of experts
  # that can move.
  if start is None:
    x0 = jnp.where(pairs.first, expert_count * pairs.copies / slots_of[pairs.expert], 0.0)
  else:  # a pair's quota is the sum over its slots, carried by its first slot
    pair_first = jnp.arange(num_slots) - pairs.copy
    x0 = jnp.zeros(num_slots, jnp.float32).at[pair_first].add(start[pairs.order])
    x0 = jnp.where(pairs.first, x0, 0.0)
  fixed = jnp.where(pairs.first & ~movable, expert_count, 0.0)
  loads, fixed_loads, degree = jnp.moveaxis(
    gpu_loads(jnp.stack([x0, fixed, movable.astype(jnp.float32)], -1)), -1, 0
  )
  rate = 1.0 / jnp.maximum(jnp.max(degree), 1.0)

  # The total load is the same at every feasible point, so the energy is
  # measured about the mean load: the same comparisons, far fewer float32 digits.
  mean_load = jnp.sum(counts_f) / num_gpus

  def energy(loads):
    return 0.5 * jnp.sum(jnp.square(loads - mean_load))

  def done(it):
    # Within the tolerance of the bound, or at most its ceiling, which no
    # split into whole tokens can beat.
    target = jnp.maximum(it.bound * (1.0 + tolerance), jnp.ceil(it.bound))
    return (it.best_max <= target) | (it.step >= max_steps)

  def step(_, it):
    x_new = _project(it.y - rate * it.y_loads[pairs.gpu], counts_f, pairs, num_experts)
    loads = gpu_loads(x_new)
    e_new = energy(loads)
    # A rise undoes the momentum (a restart); a plain projected-gradient step
    # (t == 1) never rises in exact arithmetic, so it is kept whatever the rounding.
    rises = (e_new > it.energy) & (it.t > 1.0)
    t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * it.t * it.t))
    momentum = (it.t - 1.0) / t_new
    heaviest = jnp.max(loads)
    better = heaviest < it.best_max
    return _Iterate(
      x=jnp.where(rises, it.x, x_new),
      y=jnp.where(rises, it.x, x_new + momentum * (x_new - it.x)),
      x_loads=jnp.where(rises, it.x_loads, loads),
      y_loads=jnp.where(rises, it.x_loads, loads + momentum * (loads - it.x_loads)),
      t=jnp.where(rises, 1.0, t_new),
      energy=jnp.where(rises, it.energy, e_new),
      best=jnp.where(better, x_new, it.best),
      best_max=jnp.minimum(heaviest, it.best_max),
      bound=it.bound,
      step=it.step + 1,
    )

  def body(it):
    # _CHECK_EVERY steps, then the certificate of the best point so far.
    it = jax.lax.fori_loop(0, _CHECK_EVERY, step, it)
    best_bound = _bound(gpu_loads(it.best), counts_f, pairs, num_experts)
    return it._replace(bound=jnp.maximum(it.bound, best_bound))

  # GPUs ranked by their fixed loads as well: the ranking by load can miss a
  # densest set that ties with a GPU still carrying movable tokens.
  first_iterate = _Iterate(
    x0,
    x0,
    loads,
    loads,
    jnp.float32(1.0),
    energy(loads),
    x0,
    jnp.max(loads),
    jnp.maximum(
      _bound(loads, counts_f, pairs, num_experts),
      _bound(fixed_loads, counts_f, pairs, num_experts),
    ),
    jnp.int32(0),
  )
  final = jax.lax.while_loop(lambda it: ~done(it), body, first_iterate)
  quotas = _round(final.best, counts, pairs)
  return jnp.zeros(num_slots, jnp.int32).at[pairs.order].set(quotas)


def _check_placement(
  placement: Placement | jax.typing.ArrayLike, num_gpus: int | Topology, counts: jax.Array
) -> tuple[jax.Array, int]:
  """``(phy2log [L, P] int32, num_gpus)`` from a :class:`Placement` or a ``phy2log`` array."""
  if isinstance(num_gpus, Topology):
    num_gpus = num_gpus.num_gpus
  phy2log = placement.phy2log if isinstance(placement, Placement) else placement
  phy2log = checks.check_ids(phy2log, "phy2log")
  if phy2log.ndim != 2:
    raise ValueError(f"phy2log must be [layers, slots], got shape {phy2log.shape}")
  if phy2log.shape[0] != counts.shape[-2]:
    raise ValueError(
      f"counts must have the {phy2log.shape[0]} layers of the placement, got shape {counts.shape}"
    )
  checks.check_num_gpus(num_gpus, phy2log.shape[1])
  num_experts = counts.shape[-1]
  if checks.is_concrete(phy2log):
    host = jax.device_get(phy2log)
    if ((host < -1) | (host >= num_experts)).any():
      raise ValueError(f"phy2log entries must be -1 (an empty slot) or in [0, {num_experts})")
  return checks.narrow_ids(phy2log, num_experts, -1), num_gpus


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _split(counts, phy2log, num_gpus, tolerance, max_steps):
  # A window's steps are more rows of one batch: [N, L] -> [N * L].
  rows = jnp.maximum(counts, 0).reshape(-1, counts.shape[-1])
  maps = jnp.broadcast_to(phy2log, (*counts.shape[:-1], phy2log.shape[-1])).reshape(
    rows.shape[0], -1
  )
  split_layer = jax.vmap(_split_layer, in_axes=(0, 0, None, None, None))
  return split_layer(rows, maps, num_gpus, tolerance, max_steps).reshape(*counts.shape[:-1], -1)


def _checked_split(
  counts: jax.typing.ArrayLike,
  placement: Placement | jax.typing.ArrayLike,
  num_gpus: int | Topology,
  tolerance: float,
  max_steps: int,
) -> tuple[jax.Array, jax.Array]:
  """``(quotas, phy2log)`` of :func:`split_tokens`, its arguments checked once."""
  tolerance, max_steps = checks.check_solver(tolerance, max_steps)
  counts = checks.check_counts(counts)
  phy2log, num_gpus = _check_placement(placement, num_gpus, counts)
  if not counts.shape[-2]:
    return jnp.zeros((*counts.shape[:-1], phy2log.shape[1]), jnp.int32), phy2log
  return _split(counts, phy2log, num_gpus, tolerance, max_steps), phy2log


def split_tokens(
  counts: jax.typing.ArrayLike,
  placement: Placement | jax.typing.ArrayLike,
  num_gpus: int | Topology,
  *,
  tolerance: float = DEFAULT_TOLERANCE,
  max_steps: int = DEFAULT_MAX_STEPS,
) -> jax.Array:
  """Splits a step's tokens of each expert over its replicas, for the lightest heaviest GPU.

  Given how many tokens the router sent to each expert in this step, it
  returns how many of them each physical slot takes: quotas that add up to
  each expert's count over its slots, are zero on slots that do not hold it
  and on empty slots, and keep each layer's heaviest GPU within
  ``tolerance`` of the least possible (the optimum of the fractional split,
  certified by a lower bound) plus less than one token per slot for the
  rounding. The even split (each replica ``1 / logcnt``) is the solver's
  start, so the result is never heavier than it before rounding.

  Pure and jit-friendly: ``num_gpus``, ``tolerance`` and ``max_steps`` are
  static; the solver is a bounded ``lax.while_loop`` per layer, vmapped. It
  runs in float32: quotas are always integers adding up to the counts, and
  within one token of the fractional split for experts of up to ``2**24``
  tokens per step.
  Under ``jax.jit`` a negative count counts as 0 and placement entries
  outside ``[-1, E)`` as empty slots; called eagerly they raise.

  Args:
    counts: ``[L, E]`` int tokens (or (token, choice) pairs) routed to each
      logical expert in this step, e.g. from
      :func:`eplb_jax.runtime.stats.expert_counts`; or a window ``[N, L, E]``
      of ``N`` steps, each split on its own. Each layer's counts must add up
      to less than ``2**31``.
    placement: a :class:`Placement`, or its ``phy2log [L, P]`` (-1: an empty
      slot).
    num_gpus: the GPUs the slots are numbered over (``P / num_gpus`` slots
      each), or the :class:`Topology` the placement was made for.
    tolerance: stop once the heaviest GPU is within this fraction of the
      lower bound.
    max_steps: at most this many solver steps per layer.

  Returns:
    int32 quotas ``[L, P]`` (``[N, L, P]`` for a window).

  Raises:
    ValueError: shapes or dtypes that do not fit, a bad size or solver
      setting; eagerly, negative counts or bad placement entries.

  Example:
    >>> import numpy as np
    >>> import eplb_jax
    >>> topology = eplb_jax.Topology(6, num_groups=1, num_nodes=1, num_gpus=2)
    >>> placement = eplb_jax.rebalance(np.array([[4.0, 1.0, 1.0, 2.0]]), topology)
    >>> placement.phy2log
    Array([[0, 1, 3, 0, 2, 3]], dtype=int32)
    >>> eplb_jax.split_tokens(np.array([[10, 2, 2, 6]]), placement, topology)  # 10 tokens a GPU
    Array([[5, 2, 3, 5, 2, 3]], dtype=int32)
  """
  return _checked_split(counts, placement, num_gpus, tolerance, max_steps)[0]


def split_probabilities(
  counts: jax.typing.ArrayLike,
  placement: Placement | jax.typing.ArrayLike,
  num_gpus: int | Topology,
  *,
  tolerance: float = DEFAULT_TOLERANCE,
  max_steps: int = DEFAULT_MAX_STEPS,
) -> jax.Array:
  """The split of :func:`split_tokens` as sampling probabilities over each expert's replicas.

  The shape of ``placement.log2phy``, as a serving engine that samples a
  replica per token takes it (SGLang's ``log2phy_prob``): entry ``[l, e, r]``
  is the share of expert ``e``'s tokens that its replica ``log2phy[l, e, r]``
  takes, 0 on padding. An expert with no tokens in this step gets the even
  split. Arguments as :func:`split_tokens`; ``placement`` given as ``phy2log``
  has its replicas ranked in slot order (as :func:`Placement` views do).

  Returns:
    float32 ``[L, E, R]`` (``[N, L, E, R]`` for a window), each listed
    expert's row summing to 1.
  """
  quotas, phy2log = _checked_split(counts, placement, num_gpus, tolerance, max_steps)
  if not isinstance(placement, Placement):
    placement = placement_lib.from_phy2log(phy2log, jnp.shape(counts)[-1])
  return _probabilities(quotas, jnp.asarray(placement.log2phy), jnp.asarray(placement.logcnt))


@jax.jit
def _probabilities(quotas: jax.Array, log2phy: jax.Array, logcnt: jax.Array) -> jax.Array:
  listed = log2phy >= 0
  gather = jax.vmap(lambda q, slots: q[slots])
  if quotas.ndim == 3:
    gather = jax.vmap(gather, in_axes=(0, None))
  per_replica = jnp.where(listed, gather(quotas, jnp.where(listed, log2phy, 0)), 0).astype(
    jnp.float32
  )
  total = per_replica.sum(-1, keepdims=True)
  even = jnp.where(listed, 1.0 / jnp.maximum(logcnt[..., None], 1), 0.0)
  return jnp.where(total > 0, per_replica / jnp.maximum(total, 1.0), even)
