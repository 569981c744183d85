"""Migration-aware rebalancing: keep expert replicas on the GPUs that already hold them.

A rebalance that puts an expert on a GPU that did not hold it before costs a
transfer of its weights. :func:`rebalance_with_previous` returns a placement
as balanced as a fresh one (per layer, a heaviest GPU at most ``1 + tolerance``
times the fresh placement's) that moves few replicas, built from two kinds of
candidates per layer:

* *warm*: each node keeps the old replicas that are still wanted (replica
  counts are the fresh placement's), in their old slots; new replicas fill
  the freed slots, heaviest first onto the lightest GPUs; then exchanges
  between the heaviest GPU and the others run until every GPU is under the
  target load, the cheapest first: fewest replicas sent away from their old
  GPU, fewest duplicates (an expert twice on one GPU, whose replicas then
  swing together when the loads drift). Under the target, exchanges that cost
  nothing still lower the heaviest GPU;
* *fresh*: the fresh placement with its GPUs relabelled (nodes among
  themselves, then GPUs within each node) to overlap the old placement most.

On the hierarchical policy the warm placement is tried twice: with the old
placement's groups-to-nodes assignment, and with the fresh one's. With the
fresh one each node takes the warm or the fresh GPU packing (warm when it is
under the target), so that candidate always meets the target; the old
assignment is used when all its nodes meet the target and it moves fewer
replicas. Finally every GPU puts the experts it keeps back in their old slots.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from eplb_jax import _checks
from eplb_jax import _ops
from eplb_jax import metrics
from eplb_jax import placement
from eplb_jax import replication

# Allowed relative excess of the heaviest GPU over a fresh placement's.
DEFAULT_TOLERANCE = 1e-3


def _occurrence_rank(x: jax.Array) -> jax.Array:
  """Rank of each entry of ``x [..., n]`` among the equal entries before it (int32).

  A stable sort, for long rows (see :func:`_copy_rank` for short ones).
  """
  n = x.shape[-1]
  iota = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), x.shape)
  sorted_x, order = jax.lax.sort((x, iota), num_keys=1, is_stable=True)
  starts = jnp.concatenate(
    [jnp.ones_like(sorted_x[..., :1], bool), sorted_x[..., 1:] != sorted_x[..., :-1]], axis=-1
  )
  rank = iota - jax.lax.cummax(jnp.where(starts, iota, 0), axis=x.ndim - 1)
  return jnp.put_along_axis(jnp.zeros_like(iota), order, rank, axis=-1, inplace=False)


def _copy_rank(x: jax.Array) -> jax.Array:
  """Entries equal to each entry of ``x [..., s]`` before it: an ``[s, s]`` count for short rows."""
  s = x.shape[-1]
  earlier = jnp.arange(s)[None, :] < jnp.arange(s)[:, None]
  return ((x[..., :, None] == x[..., None, :]) & earlier).sum(-1, dtype=jnp.int32)


def _kept(old: jax.Array, new: jax.Array) -> jax.Array:
  """Which slots of ``new [..., s]`` hold a replica that ``old [..., s]`` already holds.

  Both are the contents of one GPU (broadcast over leading axes). Contents are
  multisets: the ``k``-th copy of an expert in ``new`` is kept when ``old``
  holds at least ``k`` copies of it.
  """
  return _copy_rank(new) < (new[..., :, None] == old[..., None, :]).sum(-1)


def _migration_cost(old: jax.Array, new: jax.Array, num_gpus: int) -> tuple[jax.Array, jax.Array]:
  num_layers, num_slots = new.shape
  kept = _kept(old.reshape(num_layers, num_gpus, -1), new.reshape(num_layers, num_gpus, -1))
  moved = num_slots - kept.sum((1, 2), dtype=jnp.int32)
  return moved, (old != new).sum(-1, dtype=jnp.int32)


def _check_phy2log(phy2log: jax.typing.ArrayLike, name: str) -> jax.Array:
  if np.ndim(phy2log) != 2:
    raise ValueError(f"{name} must be 2-D [layers, num_replicas], got shape {np.shape(phy2log)}")
  phy2log = jnp.asarray(phy2log)
  if not jnp.issubdtype(phy2log.dtype, jnp.integer):
    raise ValueError(f"{name} must have an integer dtype, got {phy2log.dtype}")
  return phy2log.astype(jnp.int32)


def migration_cost(
  old_phy2log: jax.typing.ArrayLike, new_phy2log: jax.typing.ArrayLike, num_gpus: int
) -> tuple[jax.Array, jax.Array]:
  """Replicas a placement change moves onto GPUs, and slots it rewrites.

  Args:
    old_phy2log: ``[L, P]`` expert of each slot before (``P / num_gpus``
      consecutive slots per GPU).
    new_phy2log: ``[L, P]`` expert of each slot after.
    num_gpus: GPUs in total; must divide ``P``.

  Returns:
    ``(moved, changed_slots)``, int32 ``[L]``: ``moved`` counts the replicas
    that must arrive on a GPU, i.e. per GPU and expert the copies the GPU holds
    after beyond those it held before (a GPU that had expert 3 once and now has
    it twice receives one replica); ``changed_slots`` counts the slots whose
    expert changes.
  """
  old = _check_phy2log(old_phy2log, "old_phy2log")
  new = _check_phy2log(new_phy2log, "new_phy2log")
  if old.shape != new.shape:
    raise ValueError(f"new_phy2log must have the shape of old_phy2log {old.shape}, got {new.shape}")
  num_gpus = _checks.check_size(num_gpus, "num_gpus")
  if new.shape[1] % num_gpus:
    raise ValueError(f"num_gpus must divide the number of slots ({new.shape[1]}), got {num_gpus}")
  return _migration_cost_jit(old, new, num_gpus)


_migration_cost_jit = jax.jit(_migration_cost, static_argnums=2)


def _greedy_assign(score: jax.Array, capacity: int) -> jax.Array:
  """Assigns each row of ``score [n, m]`` a column, at most ``capacity`` rows per column.

  Repeatedly takes the highest-scoring (row, column) pair whose row is free
  and whose column has room. Returns the column of each row, ``[n]`` int32.
  """
  n, m = score.shape
  score = score.astype(jnp.float32)

  def take(_, state):
    column_of, used = state
    free = (column_of < 0)[:, None] & (used < capacity)[None, :]
    best = _ops.argmax_first(jnp.where(free, score, -jnp.inf).reshape(-1))
    row, column = best // m, best % m
    return jnp.where(jnp.arange(n) == row, column, column_of), used + (jnp.arange(m) == column)

  init = (jnp.full(n, -1, jnp.int32), jnp.zeros(m, jnp.int32))
  return jax.lax.fori_loop(0, n, take, init)[0]


def _relabel_gpus(old: jax.Array, new: jax.Array) -> jax.Array:
  """Permutes the GPUs ``new [g, s]`` (one node's contents) to overlap ``old [g, s]`` most."""
  overlap = _kept(old[None, :, :], new[:, None, :]).sum(-1)  # [new gpu, old gpu]
  position = _greedy_assign(overlap, 1)
  return jnp.zeros_like(new).at[position].set(new)


def _align_slots(old: jax.Array, new: jax.Array) -> jax.Array:
  """Reorders the slots of one GPU, ``new [s]``, so that kept replicas sit in their ``old`` slot."""
  new_rank, old_rank = _copy_rank(new), _copy_rank(old)
  match = (new[:, None] == old[None, :]) & (new_rank[:, None] == old_rank[None, :])
  matched, taken = match.any(1), match.any(0)
  # The k-th unmatched replica goes to the k-th slot no kept replica takes.
  spare_rank = jnp.cumsum(~matched) - 1
  free_rank = jnp.cumsum(~taken) - 1
  fill = ~matched[:, None] & ~taken[None, :] & (spare_rank[:, None] == free_rank[None, :])
  position = _ops.argmax_first(match | fill, axis=1)
  return jnp.zeros_like(new).at[position].set(new)


def _exchange(x: jax.Array, at_a: jax.Array, at_b: jax.Array, apply: jax.Array) -> jax.Array:
  """Exchanges the entries of ``x [m, g]`` marked by the one-hot masks ``at_a``, ``at_b``.

  Dense selects and sums, cheaper than a gather and a scatter inside a loop on XLA:CPU.
  """
  x_a, x_b = jnp.where(at_a, x, 0).sum(), jnp.where(at_b, x, 0).sum()
  return jnp.where(at_a & apply, x_b, jnp.where(at_b & apply, x_a, x))


def _settle(
  load: jax.Array, expert: jax.Array, home: jax.Array, target: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Exchanges replicas between GPUs until none is above ``target``, moving few.

  Args:
    load: ``[m, g]`` load of the replica in each slot of each GPU.
    expert: ``[m, g]`` its expert.
    home: ``[m, g]`` the GPU it is already stored on, -1 if none.
    target: scalar load every GPU should end at or below.

  Each step exchanges a replica ``a`` of the heaviest GPU ``h`` with a replica
  ``b`` of another GPU ``p``, among the exchanges that lower ``h``. Its cost
  is the change in replicas away from home plus the change in duplicates (an
  expert twice on a GPU: its replicas then share their load swings, which
  hurts balance on later loads). Over the target it takes the cheapest
  exchange, preferring those that leave both GPUs under ``target`` (then the
  one moving the least load, which keeps the most room on ``p``) and otherwise
  the one leaving the lower load; under the target, the free exchange (cost
  at most 0) leaving the lowest load. Stops when no exchange qualifies, after
  at most ``m * g`` exchanges.

  Returns:
    ``(expert [m, g], load [m, g])`` after the exchanges.
  """
  num_gpus, per_gpu = load.shape
  gpus = jnp.arange(num_gpus)

  def step(state):
    count, load, expert, home, _ = state
    loads = load.sum(1)
    is_heavy = gpus == _ops.argmax_first(loads)
    heavy_load = loads.max()

    def heavy(x):
      return jnp.where(is_heavy[:, None], x, 0).sum(0)

    load_h, expert_h, home_h = heavy(load), heavy(expert), heavy(home)
    delta = load_h[None, None, :] - load[:, :, None]  # [p, b, a]
    score = jnp.maximum(heavy_load - delta, loads[:, None, None] + delta)
    improves = (score < heavy_load * (1 - 1e-6)) & ~is_heavy[:, None, None]
    p, h = gpus[:, None, None], jnp.where(is_heavy, gpus, 0).sum()
    home_a, home_b = home_h[None, None, :], home[:, :, None]
    away = (home_a != p).astype(jnp.int32) - (home_a != h) + (home_b != h) - (home_b != p)
    same = expert[:, :, None] == expert_h[None, None, :]  # [p, b, a]
    twice_h = (expert_h[:, None] == expert_h[None, :]).sum(0) > 1
    twice_p = (expert[:, :, None] == expert[:, None, :]).sum(2) > 1
    cost = (
      away
      + (same.sum(1, keepdims=True) - same > 0)  # a joins a copy of itself on p
      + (same.sum(2, keepdims=True) - same > 0)  # b joins a copy of itself on h
      - twice_h[None, None, :]
      - twice_p[:, :, None]
    )
    # Lexicographic keys, cost (in [-4, 4]) first; the fractions are in [0, 1).
    over = jnp.where(score <= target, cost + 4 + delta / heavy_load, cost + 14 + score / heavy_load)
    under = jnp.where(cost <= 0, score / heavy_load, jnp.inf)
    key = jnp.where(improves, jnp.where(heavy_load > target, over, under), jnp.inf).reshape(-1)
    best = _ops.argmin_first(key)
    made = jnp.isfinite(key.min())
    at_a = is_heavy[:, None] & (jnp.arange(per_gpu) == best % per_gpu)
    at_b = (jnp.arange(load.size) == best // per_gpu).reshape(load.shape)
    return (count + 1, *(_exchange(x, at_a, at_b, made) for x in (load, expert, home)), made)

  def cond(state):
    return state[-1] & (state[0] < load.size)

  _, load, expert, _, _ = jax.lax.while_loop(cond, step, (0, load, expert, home, True))
  return expert, load


def _warm_row(
  load: jax.Array, count: jax.Array, old: jax.Array, target: jax.Array, num_gpus: int
) -> tuple[jax.Array, jax.Array]:
  """Warm-started packing of one node's replicas onto its GPUs.

  Args:
    load: ``[n]`` load of each of the node's experts.
    count: ``[n]`` replicas wanted of each expert; sums to the node's slots ``q``.
    old: ``[q]`` expert previously in each slot of the node, -1 for an expert
      not on this node now.
    target: scalar load to bring every GPU under.
    num_gpus: GPUs of the node.

  Returns:
    ``(content [q], max_load)``: the expert of each slot and the heaviest GPU's load.
  """
  num_slots = old.shape[0]
  per_gpu = num_slots // num_gpus
  replica_load = load / count
  safe_old = jnp.maximum(old, 0)
  kept = (old >= 0) & (_occurrence_rank(old) < count[safe_old])
  need = count - jnp.zeros_like(count).at[safe_old].add(kept)
  new_experts = jnp.repeat(
    jnp.arange(load.shape[0], dtype=jnp.int32), need, total_repeat_length=num_slots
  )
  # The freed slots, on the lightest GPUs first, take the new replicas,
  # heaviest first; the exchanges below even out the rest.
  kept_load = jnp.where(kept, replica_load[safe_old], 0.0)
  gpu_load = kept_load.reshape(num_gpus, per_gpu).sum(1)
  free_slots = _ops.argsort_descending(jnp.where(kept, -jnp.inf, -jnp.repeat(gpu_load, per_gpu)))
  num_new = num_slots - kept.sum()
  heavy_first = _ops.argsort_descending(
    jnp.where(jnp.arange(num_slots) < num_new, replica_load[new_experts], -jnp.inf)
  )
  filled = jnp.zeros_like(old).at[free_slots].set(new_experts[heavy_first])
  content = jnp.where(kept, old, filled)

  home = jnp.where(kept, jnp.arange(num_slots) // per_gpu, -1)
  content, content_load = _settle(
    *(x.reshape(num_gpus, per_gpu) for x in (replica_load[content], content, home)), target
  )
  return content.reshape(-1), content_load.sum(1).max()


def _node_major(group_node: jax.Array, num_logical: int, num_nodes: int) -> jax.Array:
  """``log2mlog [L, E]``: experts numbered node by node, groups of a node in index order."""
  num_layers, num_groups = group_node.shape
  group_size = num_logical // num_groups
  group_rank = _occurrence_rank(group_node)
  start = (group_node * (num_groups // num_nodes) + group_rank) * group_size
  return (start[..., None] + jnp.arange(group_size, dtype=jnp.int32)).reshape(num_layers, -1)


def _warm_candidate(
  weight: jax.Array,
  old: jax.Array,
  group_node: jax.Array,
  target: jax.Array,
  num_slots: int,
  num_nodes: int,
  num_gpus: int,
) -> tuple[jax.Array, jax.Array]:
  """Warm placement for a groups-to-nodes assignment ``group_node [L, num_groups]``.

  Returns ``(phy2log [L, N, P / N], max_load [L, N])`` per node.
  """
  num_layers, num_logical = weight.shape
  experts_per_node = num_logical // num_nodes
  log2mlog = _node_major(group_node, num_logical, num_nodes)
  mlog2log = placement._inverse(log2mlog)
  mlog_load = jnp.take_along_axis(weight, mlog2log, -1).reshape(-1, experts_per_node)
  _, _, count = replication.replicate_rows(mlog_load, num_slots // num_nodes)
  offset = (jnp.arange(num_nodes, dtype=jnp.int32) * experts_per_node)[:, None]
  old_mlog = jnp.take_along_axis(log2mlog, jnp.maximum(old, 0), -1)
  local = old_mlog.reshape(num_layers, num_nodes, -1) - offset
  local = jnp.where((old.reshape(local.shape) >= 0) & (local >= 0), local, -1)
  local = jnp.where(local < experts_per_node, local, -1)
  content, max_load = jax.vmap(functools.partial(_warm_row, num_gpus=num_gpus // num_nodes))(
    mlog_load, count, local.reshape(-1, local.shape[-1]), jnp.repeat(target, num_nodes)
  )
  mlog = content.reshape(num_layers, num_nodes, -1) + offset
  phy2log = jnp.take_along_axis(mlog2log, mlog.reshape(num_layers, -1), -1)
  return phy2log.reshape(mlog.shape), max_load.reshape(num_layers, num_nodes)


def _migrate(
  weight: jax.Array,
  old: jax.Array,
  tolerance: jax.Array,
  num_slots: int,
  num_groups: int,
  num_nodes: int,
  num_gpus: int,
  mode: str,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Unchecked core of :func:`rebalance_with_previous`."""
  if num_groups % num_nodes:
    num_groups, num_nodes = 1, 1
  num_layers, num_logical = weight.shape
  group_size = num_logical // num_groups
  slots_per_node = num_slots // num_nodes
  gpus_per_node = num_gpus // num_nodes
  rows = jnp.arange(num_layers)[:, None]

  fresh, _, fresh_count = placement.hierarchical_rows(
    weight, num_slots, num_groups, num_nodes, num_gpus, mode
  )
  target = metrics.gpu_loads(weight, fresh, fresh_count, num_gpus).max(-1) * (1 + tolerance)

  # overlap[l, g, k]: old slots of node k that hold an expert of group g.
  slot_node = jnp.arange(num_slots, dtype=jnp.int32) // slots_per_node
  old_group = jnp.where(old >= 0, old // group_size, num_groups)
  overlap = jnp.zeros((num_layers, num_groups + 1, num_nodes), jnp.int32)
  overlap = overlap.at[rows, old_group, slot_node].add(1)[:, :num_groups]
  # Each node of the fresh placement goes to the old node it overlaps most.
  fresh_node = jnp.zeros((num_layers, num_logical), jnp.int32).at[rows, fresh].set(slot_node)
  fresh_group_node = fresh_node[:, ::group_size]
  pack_overlap = jax.vmap(lambda g, o: jnp.zeros((num_nodes, num_nodes), jnp.int32).at[g].add(o))(
    fresh_group_node, overlap
  )
  pack_node = jax.vmap(_greedy_assign, (0, None))(pack_overlap, 1)
  group_node = jnp.take_along_axis(pack_node, fresh_group_node, -1)

  old_gpus = old.reshape(num_layers, num_nodes, gpus_per_node, -1)
  fresh_nodes = fresh.reshape(num_layers, num_nodes, slots_per_node)
  fresh_nodes = jnp.zeros_like(fresh_nodes).at[rows, pack_node].set(fresh_nodes)
  relabel = jax.vmap(jax.vmap(_relabel_gpus))
  fresh_nodes = relabel(old_gpus, fresh_nodes.reshape(old_gpus.shape)).reshape(fresh_nodes.shape)

  # The warm candidates (fresh and, with several nodes, old groups-to-nodes
  # assignments) run as one batch of layers, compiled once.
  assignments = [group_node]
  if num_nodes > 1:
    kept_node = jax.vmap(functools.partial(_greedy_assign, capacity=num_groups // num_nodes))
    assignments.append(kept_node(overlap))
  copies = len(assignments)
  warm, warm_max = _warm_candidate(
    jnp.tile(weight, (copies, 1)),
    jnp.tile(old, (copies, 1)),
    jnp.concatenate(assignments),
    jnp.tile(target, copies),
    num_slots,
    num_nodes,
    num_gpus,
  )
  use_warm = warm_max[:num_layers] <= target[:, None]
  phy2log = jnp.where(use_warm[..., None], warm[:num_layers], fresh_nodes)
  phy2log = phy2log.reshape(num_layers, num_slots)
  if num_nodes > 1:
    stay = warm[num_layers:].reshape(num_layers, num_slots)
    better = (warm_max[num_layers:] <= target[:, None]).all(-1) & (
      _migration_cost(old, stay, num_gpus)[0] < _migration_cost(old, phy2log, num_gpus)[0]
    )
    phy2log = jnp.where(better[:, None], stay, phy2log)

  phy2log = jax.vmap(jax.vmap(_align_slots))(
    old.reshape(num_layers, num_gpus, -1), phy2log.reshape(num_layers, num_gpus, -1)
  ).reshape(num_layers, num_slots)
  logcnt = jnp.zeros((num_layers, num_logical), jnp.int32).at[rows, phy2log].add(1)
  phyrank = _occurrence_rank(phy2log)
  return phy2log, placement.logical_to_physical(phy2log, phyrank, num_logical), logcnt


migrate_jit = jax.jit(_migrate, static_argnums=(3, 4, 5, 6, 7))


def check_previous(
  previous_phy2log: jax.typing.ArrayLike,
  tolerance: jax.typing.ArrayLike,
  weight: jax.Array,
  num_replicas: int,
) -> tuple[jax.Array, jax.Array]:
  """Validates ``previous_phy2log [L, P]`` and ``tolerance`` for the loads ``weight [L, E]``.

  Returns them as the core takes them: expert ids outside ``[0, E)`` (only
  possible under ``jax.jit``) become -1, an empty slot, and ``tolerance`` a
  float32 clipped to ``[0, 1]``.
  """
  previous = _check_phy2log(previous_phy2log, "previous_phy2log")
  if previous.shape != (weight.shape[0], num_replicas):
    raise ValueError(
      "previous_phy2log must have shape [layers, num_replicas] = "
      f"{(weight.shape[0], num_replicas)}, got {previous.shape}"
    )
  if not isinstance(previous_phy2log, jax.core.Tracer):
    values = np.asarray(previous_phy2log)
    if values.min() < 0 or values.max() >= weight.shape[1]:
      raise ValueError(
        f"previous_phy2log must hold expert ids in [0, {weight.shape[1]}), "
        f"found [{values.min()}, {values.max()}]"
      )
  if not isinstance(tolerance, jax.core.Tracer) and not 0 <= float(np.asarray(tolerance)) < 1:
    raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
  previous = jnp.where((previous >= 0) & (previous < weight.shape[1]), previous, -1)
  return previous, jnp.clip(jnp.asarray(tolerance, jnp.float32), 0.0, 1.0)


def rebalance_with_previous(
  weight: jax.typing.ArrayLike,
  num_replicas: int,
  num_groups: int,
  num_nodes: int,
  num_gpus: int,
  previous_phy2log: jax.typing.ArrayLike,
  *,
  mode: str = "refined",
  tolerance: jax.typing.ArrayLike = DEFAULT_TOLERANCE,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """:func:`eplb_jax.rebalance_experts`, moving few replicas away from ``previous_phy2log``.

  Guarantee: in every layer the heaviest GPU load is at most ``1 + tolerance``
  times that of the fresh placement ``rebalance_experts(weight, ..., mode=mode)``
  (equivalently, balancedness at least the fresh one's divided by ``1 +
  tolerance``), up to float32 rounding. The placement follows the same policy
  (hierarchical: the experts of a group stay on one node).

  Args:
    weight: ``[L, E]`` load statistics of each logical expert.
    num_replicas: ``P``, physical expert slots; a multiple of ``num_gpus``, ``>= E``.
    num_groups: expert groups.
    num_nodes: server nodes.
    num_gpus: GPUs in total.
    previous_phy2log: ``[L, P]`` int, the placement in service (expert of each
      slot). Any values in ``[0, E)`` are accepted; under ``jax.jit`` others
      count as an empty slot.
    mode: placement mode of the fresh reference, ``"refined"`` or ``"greedy"``.
    tolerance: scalar in ``[0, 1)``, the allowed relative excess of the heaviest
      GPU over the fresh one's; may be traced (then clipped to ``[0, 1]``).

  Returns:
    ``(phy2log [L, P], log2phy [L, E, P - E + 1], logcnt [L, E])``, int32, as
    :func:`eplb_jax.rebalance_experts`.
  """
  weight, num_replicas, num_groups, num_nodes, num_gpus, mode = placement.check_rebalance_args(
    weight, num_replicas, num_groups, num_nodes, num_gpus, mode
  )
  previous, tolerance = check_previous(previous_phy2log, tolerance, weight, num_replicas)
  return migrate_jit(
    weight, previous, tolerance, num_replicas, num_groups, num_nodes, num_gpus, mode
  )
