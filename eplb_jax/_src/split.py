"""Per-step split: how many of a step's tokens of each expert each of its replicas takes.

A placement fixes which slots hold each expert; a step's router then sends
``c[e]`` tokens to expert ``e``, and the step takes as long as its heaviest
GPU. Choosing the quotas ``x[s] >= 0`` of each slot (summing to ``c[e]`` over
the slots of ``e``) to minimise the heaviest GPU is a min-max transportation
problem on the bipartite graph experts -> GPUs. Its GPU loads form the base
polytope of a supermodular function, so the load vector of least Euclidean
norm is also the one of least maximum (Fujishige); the solver minimises
``1/2 sum_g load[g]**2``:

* **Variables**: an expert on one slot takes its whole count there; the
  solver's variables are the slots of experts on two or more slots, at most
  ``2 (P - E)`` per layer when every expert is held (each such expert has
  at least half its slots beyond one per expert). They are compacted and
  sorted by (expert, slot), so every per-expert sum is a segment sum over a
  few hundred entries, not the whole placement.
* **Iteration**: accelerated projected gradient (FISTA) with steps scaled
  per GPU: a GPU holding ``d`` variables moves each by ``1 / d`` of its
  load, a diagonal bound on its block of the Hessian, so GPUs with few
  variables take full steps. The projection on ``{x >= 0, sum over e's
  slots = c[e]}`` is one round of Michelot's active-set method, then a
  rescaling: always feasible, exact for an expert on two slots.
* **Batch**: the layers (and a window's steps) step together as one
  ``[B, V]`` problem with flat segment sums; a layer already done keeps its
  best point and bound, so its result is the one it would have alone.
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
# Solver steps between two certificates: the bound costs about a step.
_CHECK_EVERY = 4


class _Layout(NamedTuple):
  """A batch of ``B`` rows' slots (layers or steps), as the solver sees them.

  An expert on one slot leaves nothing to choose: it takes its count there
  (``fixed_quota``). The slots of experts on two or more slots are the
  solver's *variables*: ``V`` per row, sorted by (expert, slot), so each
  expert's variables are a run; positions past a row's last variable are
  padding (slot ``P``, count 0, and indices past the end, which sums drop).
  Indices address the flattened ``[B * G]`` GPU loads and ``[B * V]``
  variables, so every per-GPU and per-expert sum is one segment sum.
  """

  fixed_quota: jax.Array  # [B, P] int32 quotas of the experts on one slot, else 0
  fixed_loads: jax.Array  # [B, G] float32 GPU loads of those quotas
  slot: jax.Array  # [B, V] the variable's slot
  gpu: jax.Array  # [B, V] its GPU, as an index into [B * G]
  first: jax.Array  # [B, V] position of its expert's first variable in the row
  run: jax.Array  # [B, V] the same, as an index into [B * V] (past the end for padding)
  count: jax.Array  # [B, V] int32 its expert's tokens in this step
  replicas: jax.Array  # [B, V] int32 its expert's slots

  @property
  def start(self) -> jax.Array:
    """``[B, V]`` bool: the first variable of its expert."""
    return self.first == jnp.arange(self.first.shape[1], dtype=jnp.int32)

  @property
  def end(self) -> jax.Array:
    """``[B, V]`` bool: the last variable of its expert."""
    start = self.start
    return jnp.concatenate([start[:, 1:], jnp.ones_like(start[:, :1])], 1)


def _sum_by(values: jax.Array, index: jax.Array, width: int) -> jax.Array:
  """``[B, width]`` sums of ``values [B, V, ...]`` by flat ``index`` (out of range: dropped)."""
  rows = index.shape[0]
  flat = values.reshape(index.size, *values.shape[2:])
  return jax.ops.segment_sum(flat, index.reshape(-1), rows * width).reshape(
    rows, width, *values.shape[2:]
  )


def _take(table: jax.Array, index: jax.Array) -> jax.Array:
  """``table [B, W, ...]`` at flat ``index [B, V]`` (out of range: 0)."""
  flat = table.reshape(-1, *table.shape[2:])
  return (
    flat.at[index.reshape(-1)]
    .get(mode="fill", fill_value=0)
    .reshape(*index.shape, *table.shape[2:])
  )


def _take_rows(table: jax.Array, index: jax.Array) -> jax.Array:
  """``table [B, W]`` at per-row ``index [B, N]`` (in ``[0, W)``)."""
  rows, width = table.shape
  return _take(table, jnp.arange(rows, dtype=jnp.int32)[:, None] * width + index)


def _scan(op, values: jax.Array, first: jax.Array | None = None) -> jax.Array:
  """Inclusive scan of ``values [B, N]`` along rows by ``op``; with ``first [B, N]`` (where
  each position's segment starts), restarted at each segment.

  Doubling (Hillis-Steele): after round ``k`` each position holds its op over
  the ``2**k`` positions ending at it, within its segment. ``log2 N`` rounds
  of elementwise work in a loop: XLA:CPU's cumulative sums are quadratic in
  the row, and an associative scan's many slices slow compilation.
  """
  position = jnp.arange(values.shape[1], dtype=jnp.int32)
  start = jnp.zeros_like(position) if first is None else first

  def double(_, carry):
    values, shift = carry
    inside = position - shift >= start
    earlier = jnp.roll(values, shift, axis=1)
    return jnp.where(inside, op(earlier, values), values), 2 * shift

  rounds = max(values.shape[1] - 1, 0).bit_length()
  return jax.lax.fori_loop(0, rounds, double, (values, jnp.int32(1)))[0]


def _variable_bound(num_slots: int, num_experts: int) -> int:
  """Most variables a row holding every expert can have.

  An expert on ``r >= 2`` slots takes ``r - 1 >= r / 2`` of the ``P - E``
  slots beyond one per expert, so the variables number at most ``2 (P - E)``.
  """
  return min(num_slots, max(2 * (num_slots - num_experts), 1))


def _layout(
  counts: jax.Array, expert: jax.Array, replicas: jax.Array, num_gpus: int, size: int
) -> _Layout:
  """The solver's view of ``counts [B, E]`` (non-negative) on slots holding ``expert [B, P]``
  (``E`` on an empty slot), ``replicas [B, E + 1]`` slots per expert, with ``size``
  variables per row (at least the most any row has)."""
  num_rows, num_experts = counts.shape
  num_slots = expert.shape[1]
  row = jnp.arange(num_rows, dtype=jnp.int32)[:, None]
  variable = (expert < num_experts) & (_take_rows(replicas, expert) > 1)
  counts = jnp.pad(counts, ((0, 0), (0, 1)))  # an empty slot's expert E has no tokens
  fixed_quota = jnp.where(variable, 0, _take_rows(counts, expert))
  fixed_loads = fixed_quota.reshape(num_rows, num_gpus, -1).sum(-1).astype(jnp.float32)
  # Each variable's position in slot order.
  position = _scan(jnp.add, variable.astype(jnp.int32)) - 1
  var_slot = (
    jnp.full(num_rows * size, num_slots, jnp.int32)
    .at[jnp.where(variable, row * size + position, num_rows * size).reshape(-1)]
    .set(
      jnp.broadcast_to(jnp.arange(num_slots, dtype=jnp.int32), expert.shape).reshape(-1),
      mode="drop",
    )
    .reshape(num_rows, size)
  )
  var_expert = _take_rows(jnp.pad(expert, ((0, 0), (0, 1)), constant_values=num_experts), var_slot)
  # Sorted by (expert, slot): one sort of distinct int32 keys, the slot in
  # the low bits; padding last.
  bits = num_slots.bit_length()
  if (num_experts + 1) << bits < 2**31:
    key = jax.lax.sort((var_expert << bits) | var_slot, dimension=1)
    var_slot, var_expert = key & ((1 << bits) - 1), key >> bits
  else:
    var_expert, var_slot = jax.lax.sort((var_expert, var_slot), dimension=1, num_keys=2)
  held = var_expert < num_experts
  differs = jnp.ones((num_rows, 1), bool)
  start = jnp.concatenate([differs, var_expert[:, 1:] != var_expert[:, :-1]], 1)
  first = _scan(jnp.maximum, jnp.where(start, jnp.arange(size, dtype=jnp.int32), 0))
  return _Layout(
    fixed_quota=fixed_quota,
    fixed_loads=fixed_loads,
    slot=var_slot,
    gpu=jnp.where(held, row * num_gpus + var_slot // (num_slots // num_gpus), num_rows * num_gpus),
    run=jnp.where(held, row * size + first, num_rows * size),
    first=first,
    count=_take_rows(counts, var_expert),
    replicas=_take_rows(replicas, var_expert),
  )


def _per_expert(values: jax.Array, layout: _Layout) -> jax.Array:
  """Each variable's sum of ``values [B, V, ...]`` over its expert's variables."""
  return _take(_sum_by(values, layout.run, layout.run.shape[1]), layout.run)


def _project(v: jax.Array, weight: jax.Array, weight_sum: jax.Array, layout: _Layout) -> jax.Array:
  """A point of ``{x >= 0, sum over e's variables = count[e]}`` near ``v`` in the norm
  ``sum_i (x_i - v_i)**2 / weight_i`` (``weight_sum``: each expert's sum of weights).

  One round of Michelot's active-set method (the threshold of all of the
  expert's variables; those at or below it drop to 0), then the positive
  parts scaled to the count: always feasible, and the exact projection for
  an expert on two slots (or whose variables all stay positive).
  """
  target = layout.count.astype(jnp.float32)
  tau = (_per_expert(v, layout) - target) / weight_sum
  x = jnp.maximum(v - tau * weight, 0.0)
  total = _per_expert(x, layout)
  return x * jnp.where(total > 0, target / jnp.where(total > 0, total, 1.0), 0.0)


def _gpu_loads(x: jax.Array, layout: _Layout) -> jax.Array:
  return layout.fixed_loads + _sum_by(x, layout.gpu, layout.fixed_loads.shape[1])


def _bound(loads: jax.Array, layout: _Layout) -> jax.Array:
  """``[B]`` lower bounds on the heaviest GPU: the densest set of the ``k`` heaviest GPUs.

  The experts whose every slot lies among the ``k`` heaviest GPUs weigh at
  least ``k`` times the optimum on them. Any order of the GPUs gives a valid
  bound; ranking by load gives the tight one.
  """
  num_rows, num_gpus = loads.shape
  rank = ops.descending_ranks(loads, exact=False)
  # The deepest rank of each expert's GPUs, at its first variable's position.
  deepest = jax.ops.segment_max(
    _take(rank, layout.gpu).reshape(-1), layout.run.reshape(-1), layout.run.size
  ).reshape(layout.run.shape)
  # Tokens by the rank that takes them in: an expert on one slot at its GPU's
  # rank, an expert with variables at its deepest (once: at its first variable).
  row = jnp.arange(num_rows, dtype=jnp.int32)[:, None]
  leader = layout.start & (layout.replicas > 0)
  inside = _sum_by(
    jnp.concatenate([layout.fixed_loads, layout.count.astype(jnp.float32)], 1),
    jnp.concatenate(
      [row * num_gpus + rank, jnp.where(leader, row * num_gpus + deepest, num_rows * num_gpus)], 1
    ),
    num_gpus,
  )
  prefix = jnp.arange(num_gpus)[:, None] <= jnp.arange(num_gpus)[None, :]
  return jnp.max((inside @ prefix) / jnp.arange(1, num_gpus + 1, dtype=jnp.float32), axis=1)


class _Iterate(NamedTuple):
  x: jax.Array  # [B, V] current point
  y: jax.Array  # [B, V] extrapolated point
  x_loads: jax.Array  # [B, G] GPU loads of x
  y_loads: jax.Array  # [B, G] GPU loads of y (affine in y, so extrapolated alongside it)
  t: jax.Array  # FISTA momentum (the same for every row)
  best: jax.Array  # [B, V] the iterate with the lightest heaviest GPU so far
  best_loads: jax.Array  # [B, G] its GPU loads
  best_max: jax.Array  # [B]
  bound: jax.Array  # [B]
  step: jax.Array  # solver steps taken


def _round(x: jax.Array, layout: _Layout) -> jax.Array:
  """Integer quotas per variable from the fractional quotas ``x``.

  Per expert, the rounded cumulative quotas (the last forced to the count,
  kept non-decreasing) are differenced: integers adding up to the count,
  each within one token of its fractional value.
  """
  cumulative = jnp.round(_scan(jnp.add, x, layout.first))
  cumulative = jnp.clip(cumulative, 0, layout.count).astype(jnp.int32)
  cumulative = jnp.where(layout.end, layout.count, cumulative)
  cumulative = _scan(jnp.maximum, cumulative, layout.first)
  return cumulative - jnp.where(layout.start, 0, jnp.roll(cumulative, 1, axis=1))


def _solve(layout: _Layout, tolerance: float, max_steps: int, start: jax.Array | None) -> jax.Array:
  """Integer quotas ``[B, P]``: the variables' split by accelerated projected gradient."""
  num_gpus = layout.fixed_loads.shape[1]
  held = layout.replicas > 0
  count = layout.count.astype(jnp.float32)
  if start is None:  # the even split: each slot of e takes count[e] / (slots of e)
    x0 = jnp.where(held, count / jnp.maximum(layout.replicas, 1), 0.0)
  else:
    x0 = _take_rows(jnp.pad(start, ((0, 0), (0, 1))), layout.slot)
  loads = _gpu_loads(x0, layout)
  # Steps scaled per GPU: a GPU holding d variables moves each by 1 / d of its
  # load's gradient (its Hessian block 1 1^T is at most d I).
  degree = _sum_by(held.astype(jnp.float32), layout.gpu, num_gpus)
  rate = jnp.where(held, 1.0 / jnp.maximum(_take(degree, layout.gpu), 1.0), 0.0)
  rate_sum = _per_expert(rate, layout)
  rate_sum = jnp.where(rate_sum > 0, rate_sum, 1.0)

  def done(it):
    # Within the tolerance of the bound, or at most its ceiling, which no
    # split into whole tokens can beat.
    target = jnp.maximum(it.bound * (1.0 + tolerance), jnp.ceil(it.bound))
    return (it.best_max <= target) | (it.step >= max_steps)

  def step(_, it):
    x_new = _project(it.y - rate * _take(it.y_loads, layout.gpu), rate, rate_sum, layout)
    loads = _gpu_loads(x_new, layout)
    t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * it.t * it.t))
    momentum = (it.t - 1.0) / t_new
    heaviest = jnp.max(loads, axis=1)
    better = (heaviest < it.best_max)[:, None]
    return _Iterate(
      x=x_new,
      y=x_new + momentum * (x_new - it.x),
      x_loads=loads,
      y_loads=loads + momentum * (loads - it.x_loads),
      t=t_new,
      best=jnp.where(better, x_new, it.best),
      best_loads=jnp.where(better, loads, it.best_loads),
      best_max=jnp.minimum(heaviest, it.best_max),
      bound=it.bound,
      step=it.step + 1,
    )

  def body(it):
    # _CHECK_EVERY steps, then the certificate of the best point so far. The
    # batch steps together; a row already done keeps its best point and
    # bound, so its result is the one it would have on its own.
    running = ~done(it)
    new = jax.lax.fori_loop(0, _CHECK_EVERY, step, it)
    bound = jnp.maximum(new.bound, _bound(new.best_loads, layout))
    return new._replace(
      best=jnp.where(running[:, None], new.best, it.best),
      best_loads=jnp.where(running[:, None], new.best_loads, it.best_loads),
      best_max=jnp.where(running, new.best_max, it.best_max),
      bound=jnp.where(running, bound, it.bound),
    )

  # GPUs ranked by their fixed loads as well: the ranking by load can miss a
  # densest set that ties with a GPU still carrying movable tokens.
  first_iterate = _Iterate(
    x=x0,
    y=x0,
    x_loads=loads,
    y_loads=loads,
    t=jnp.float32(1.0),
    best=x0,
    best_loads=loads,
    best_max=jnp.max(loads, axis=1),
    bound=jnp.maximum(_bound(loads, layout), _bound(layout.fixed_loads, layout)),
    step=jnp.int32(0),
  )
  final = jax.lax.while_loop(lambda it: ~jnp.all(done(it)), body, first_iterate)
  row = jnp.arange(x0.shape[0])[:, None]
  return layout.fixed_quota.at[row, layout.slot].set(_round(final.best, layout), mode="drop")


def _split_rows(
  counts: jax.Array,
  phy2log: jax.Array,
  num_gpus: int,
  tolerance: float,
  max_steps: int,
  start: jax.Array | None = None,
) -> jax.Array:
  """Integer quotas ``[B, P]`` of ``B`` rows (layers or steps), from the even split or ``start``.

  ``counts [B, E]`` (non-negative), ``phy2log [B, P]``; ``start``: feasible
  fractional splits ``[B, P]`` (each expert's slots adding up to its count)
  to start from instead of the even split; the result is never heavier than
  its start, before rounding.

  Each row's result is the one it would have alone. The variables are solved
  in arrays of :func:`_variable_bound` entries per row; a batch with a row
  that has more (a placement that leaves experts out) is solved with one
  variable per slot.
  """
  num_experts, num_slots = counts.shape[1], phy2log.shape[1]
  expert = jnp.where(phy2log >= 0, phy2log, num_experts)
  # Slots per expert, and none for the empty slots' expert E.
  replicas = jnp.pad(placement_lib.replica_counts(phy2log, num_experts), ((0, 0), (0, 1)))

  def solve(size):
    return lambda: _solve(
      _layout(counts, expert, replicas, num_gpus, size), tolerance, max_steps, start
    )

  size = _variable_bound(num_slots, num_experts)
  if size == num_slots:
    return solve(size)()
  held = replicas[:, :num_experts]
  fits = jnp.max(jnp.where(held > 1, held, 0).sum(1)) <= size
  return jax.lax.cond(fits, solve(size), solve(num_slots))


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
  return _split_rows(rows, maps, num_gpus, tolerance, max_steps).reshape(*counts.shape[:-1], -1)


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
  static; the solver is one bounded ``lax.while_loop`` over all layers (and
  steps) at once, each keeping the result it would have alone. It runs in
  float32: quotas are always integers adding up to the counts, and
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
    max_steps: at most this many solver steps.

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
