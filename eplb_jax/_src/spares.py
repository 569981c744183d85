"""Per-step replication: fill spare slots with copies of the step's heaviest experts.

A window's placement serves many steps, and every step pays its own heaviest
GPU. :func:`eplb_jax.split_tokens` moves a step's tokens between the
replicas that exist; with ``k`` spare slots per GPU, the step can also add
replicas where its own counts need them, fetching their weights from a slot
that holds them. :func:`plan_spare_slots` chooses those copies and the
step's split over all slots:

* **Greedy filling**: start from the even split of the placement in service
  (each slot of ``e`` takes ``c[e] / replicas[e]``). ``G * k`` times: the
  heaviest GPU gives its largest quota's expert a copy on the lightest GPU
  that has a spare slot left and does not hold that expert, which takes
  ``min(quota, gap / 2)`` of it (half the gap evens the two GPUs), and the
  loop stops filling once a copy would take less than one token. Each move
  is a fixed number of array operations on ``[G, S + k]`` rows (``S`` slots
  per GPU), vmapped over layers.
* **Split**: the step's quotas over the service and the filled spare slots
  are :func:`eplb_jax.split_tokens`' solve of the extended placement. It
  holds the placement in service, so its optimal split is never heavier
  than the service placement's, and the solver certifies its result within
  its tolerance of that optimum.
* **Sources**: a copy fetches its weights from the slot whose tokens it
  takes over: the heavy GPU's service slot, or, for a copy of a copy, the
  service slot that one was fetched from. The fetches of a step come from
  the GPUs they relieve, and no sort of the placement is needed to find them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from eplb_jax._src import checks
from eplb_jax._src import ops
from eplb_jax._src import placement as placement_lib
from eplb_jax._src import split as split_lib
from eplb_jax._src.placement import Placement
from eplb_jax._src.topology import Topology


class SparePlan(NamedTuple):
  """One step's spare-slot copies and split (arrays ``[L, ...]``, ``[N, L, ...]`` for a window).

  The extended placement numbers slots GPU by GPU, ``S + k`` per GPU: GPU
  ``g``'s service slots ``S * g .. S * g + S - 1`` of the placement in
  service become ``(S + k) * g .. (S + k) * g + S - 1``, followed by its
  ``k`` spare slots.

  Attributes:
    phy2log: ``[L, G * (S + k)]`` int32 expert of each slot of the extended
      placement, -1 on a spare slot left empty (and on the service
      placement's empty slots).
    quotas: ``[L, G * (S + k)]`` int32 tokens of the step each slot takes
      (:func:`eplb_jax.split_tokens` of ``phy2log``).
    source: ``[L, G * k]`` int32, per spare slot (GPU by GPU), the slot of
      the placement in service whose weights it copies; -1 for an empty one.
  """

  phy2log: jax.Array
  quotas: jax.Array
  source: jax.Array


class _Fill(NamedTuple):
  """The greedy's state for one layer."""

  experts: jax.Array  # [G, S + k] expert in each slot, -1 empty
  quota: jax.Array  # [G, S + k] float32 tokens each slot takes
  loads: jax.Array  # [G] float32 sum of quota per GPU
  used: jax.Array  # [G] int32 spare slots filled
  source: jax.Array  # [G, S + k] int32 service slot whose weights each slot holds, -1 empty


def _fill_layer(counts: jax.Array, phy2log: jax.Array, num_gpus: int, spare_slots: int):
  """``(phy2log [G * (S + k)], quota [G * (S + k)], source [G * k])`` of one layer's filling.

  ``quota`` is the greedy's fractional split of the step over the slots.
  """
  num_experts, num_slots = counts.shape[0], phy2log.shape[0]
  per_gpu = num_slots // num_gpus
  held = phy2log >= 0
  expert = jnp.where(held, phy2log, num_experts)  # num_experts: no expert
  replicas = placement_lib.replica_counts(phy2log[None], num_experts)[0]
  share = counts.astype(jnp.float32) / jnp.maximum(replicas, 1)
  quota = jnp.where(held, jnp.append(share, 0.0)[expert], 0.0).reshape(num_gpus, per_gpu)
  spare = (num_gpus, spare_slots)
  start = _Fill(
    experts=jnp.concatenate([phy2log.reshape(num_gpus, per_gpu), jnp.full(spare, -1)], 1),
    quota=jnp.concatenate([quota, jnp.zeros(spare, jnp.float32)], 1),
    loads=quota.sum(1),
    used=jnp.zeros(num_gpus, jnp.int32),
    source=jnp.concatenate(
      [
        jnp.where(held, jnp.arange(num_slots, dtype=jnp.int32), -1).reshape(num_gpus, per_gpu),
        jnp.full(spare, -1, jnp.int32),
      ],
      1,
    ),
  )

  gpus = jnp.arange(num_gpus, dtype=jnp.int32)
  columns = jnp.arange(per_gpu + spare_slots, dtype=jnp.int32)

  def move(_, fill: _Fill) -> _Fill:
    # One-hot masks rather than indexing: elementwise work on [G, S + k], no
    # scatters or gathers per move.
    heavy = gpus == ops.argmax_first(fill.loads)
    heavy_quota = ops.sum_last(jnp.where(heavy[:, None], fill.quota, 0.0).T)
    taken = heavy[:, None] & (columns == ops.argmax_first(heavy_quota))[None, :]
    chosen = jnp.where(taken, fill.experts, 0).sum()
    available = jnp.where(taken, fill.quota, 0.0).sum()
    origin = jnp.where(taken, fill.source, 0).sum()
    open_ = (fill.used < spare_slots) & ~(fill.experts == chosen).any(1)
    light = gpus == ops.argmin_first(jnp.where(open_, fill.loads, jnp.inf))
    heavy_load = jnp.where(heavy, fill.loads, 0.0).sum()
    light_load = jnp.where(light, fill.loads, 0.0).sum()
    amount = jnp.minimum(available, 0.5 * (heavy_load - light_load))
    # A copy that would take less than one token is not worth its weights.
    moves = (open_ & light).any() & (amount >= 1.0)
    amount = jnp.where(moves, amount, 0.0)
    target = per_gpu + jnp.minimum(fill.used, spare_slots - 1)  # [G]
    placed = (light & moves)[:, None] & (columns[None, :] == target[:, None])
    return _Fill(
      experts=jnp.where(placed, chosen, fill.experts),
      quota=fill.quota - jnp.where(taken, amount, 0.0) + jnp.where(placed, amount, 0.0),
      loads=fill.loads + jnp.where(light, amount, 0.0) - jnp.where(heavy, amount, 0.0),
      used=fill.used + (light & moves),
      source=jnp.where(placed, origin, fill.source),
    )

  filled = jax.lax.fori_loop(0, num_gpus * spare_slots, move, start)
  source = filled.source[:, per_gpu:].reshape(-1)
  return filled.experts.reshape(-1), filled.quota.reshape(-1), source


def _plan_rows(
  counts: jax.Array,
  phy2log: jax.Array,
  num_gpus: int,
  spare_slots: int,
  tolerance: float,
  max_steps: int,
) -> SparePlan:
  """Plans of ``B`` rows (``counts [B, E]``, ``phy2log [B, P]``): the greedy filling, then
  the split warm-started from its point."""
  fill = jax.vmap(_fill_layer, in_axes=(0, 0, None, None))
  extended, start, source = fill(counts, phy2log, num_gpus, spare_slots)
  quotas = split_lib._split_rows(counts, extended, num_gpus, tolerance, max_steps, start)
  return SparePlan(extended, quotas, source)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _plan(counts, phy2log, num_gpus, spare_slots, tolerance, max_steps) -> SparePlan:
  # A window's steps are more rows of one batch: [N, L] -> [N * L].
  rows = jnp.maximum(counts, 0).reshape(-1, counts.shape[-1])
  maps = jnp.broadcast_to(phy2log, (*counts.shape[:-1], phy2log.shape[-1])).reshape(
    rows.shape[0], -1
  )
  plan = _plan_rows(rows, maps, num_gpus, spare_slots, tolerance, max_steps)
  return jax.tree.map(lambda x: x.reshape(*counts.shape[:-1], -1), plan)


def plan_spare_slots(
  counts: jax.typing.ArrayLike,
  placement: Placement | jax.typing.ArrayLike,
  num_gpus: int | Topology,
  *,
  spare_slots: int = 1,
  tolerance: float = split_lib.DEFAULT_TOLERANCE,
  max_steps: int = split_lib.DEFAULT_MAX_STEPS,
) -> SparePlan:
  """Fills ``spare_slots`` extra slots per GPU with copies for this step, and splits the step.

  Given the step's counts and the placement in service, chooses which
  expert each GPU's spare slots copy (greedily, from the heaviest GPU to the
  lightest; see :mod:`this module <eplb_jax._src.spares>`) and the step's
  quotas over all slots. The extended placement contains the one in
  service, so its split is never heavier than :func:`eplb_jax.split_tokens`
  of the placement in service, up to the solver's tolerance. A spare slot
  stays empty (-1) when no copy would take a token off the heaviest GPU.

  Pure and jit-friendly: ``num_gpus``, ``spare_slots``, ``tolerance`` and
  ``max_steps`` are static; the greedy is a ``lax.fori_loop`` of ``G * k``
  moves per layer, vmapped over layers, and the split is
  :func:`split_tokens`' solver. Under ``jax.jit``, values are treated as in :func:`split_tokens`.

  Args:
    counts: ``[L, E]`` int tokens routed to each expert in this step, or a
      window ``[N, L, E]`` of steps, each planned on its own.
    placement: the placement in service: a :class:`Placement` or its
      ``phy2log [L, P]`` (-1: an empty slot), e.g. a window's placement or
      one replica per expert.
    num_gpus: the GPUs its slots are numbered over, or its :class:`Topology`.
    spare_slots: ``k``, the spare slots of each GPU (static, positive).
    tolerance, max_steps: the split's solver settings (see
      :func:`eplb_jax.split_tokens`).

  Returns:
    A :class:`SparePlan`: the extended ``phy2log``, the step's ``quotas`` on
    it and each spare slot's ``source`` slot in the placement in service.

  Raises:
    ValueError: as :func:`eplb_jax.split_tokens`, or ``spare_slots`` not a
      positive int.

  Example:
    >>> import numpy as np, eplb_jax
    >>> phy2log = np.array([[0, 1, 2, 3]])  # one replica per expert, 2 GPUs
    >>> plan = eplb_jax.plan_spare_slots(np.array([[90, 10, 10, 10]]), phy2log, 2)
    >>> plan.phy2log.tolist(), plan.quotas.tolist()
    ([[0, 1, -1, 2, 3, 0]], [[50, 10, 0, 10, 10, 40]])
  """
  spare_slots = checks.check_size(spare_slots, "spare_slots")
  tolerance, max_steps = checks.check_solver(tolerance, max_steps)
  counts = checks.check_counts(counts)
  phy2log, num_gpus = split_lib._check_placement(placement, num_gpus, counts)
  if not counts.shape[-2]:
    batch = counts.shape[:-1]
    width = phy2log.shape[1] + num_gpus * spare_slots
    empty = jnp.zeros((*batch, width), jnp.int32)
    return SparePlan(empty - 1, empty, jnp.zeros((*batch, num_gpus * spare_slots), jnp.int32) - 1)
  return _plan(counts, phy2log, num_gpus, spare_slots, tolerance, max_steps)
