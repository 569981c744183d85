"""Quality metrics of a placement, shared by the tests, the CLI and the benchmarks.

Each replica of expert ``e`` carries ``w_e / logcnt_e`` of the load (tokens
are spread evenly over replicas), and a GPU's load is the sum over its slots.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from eplb_jax._src import placement
from eplb_jax._src import replication


@functools.partial(jax.jit, static_argnames="num_gpus")
def gpu_loads(
  weight: jax.typing.ArrayLike, phy2log: jax.Array, logcnt: jax.Array, num_gpus: int
) -> jax.Array:
  """Load of each GPU ``[L, num_gpus]`` for loads ``weight [L, E]``.

  ``phy2log [L, P]`` and ``logcnt [L, E]`` are the placement maps; slots are
  numbered GPU by GPU. Same as :meth:`eplb_jax.Placement.gpu_loads`.

  Example:
    >>> import jax.numpy as jnp
    >>> from eplb_jax import metrics
    >>> phy2log = jnp.array([[0, 1, 3, 0, 2, 3]])  # 3 slots per GPU on 2 GPUs
    >>> logcnt = jnp.array([[2, 1, 1, 2]])  # expert 0's load is split over its 2 replicas
    >>> metrics.gpu_loads(jnp.array([[4.0, 1.0, 1.0, 2.0]]), phy2log, logcnt, num_gpus=2)
    Array([[4., 4.]], dtype=float32)
  """
  return placement.gpu_loads(weight, phy2log, logcnt, num_gpus)


def layer_balancedness(loads: jax.Array) -> jax.Array:
  """Mean over max load of each row of ``loads [L, G]``; 1 for an all-zero row."""
  peak = loads.max(axis=-1)
  return jnp.where(peak > 0, loads.mean(axis=-1) / jnp.where(peak > 0, peak, 1), 1.0)


def balancedness(loads: jax.Array) -> jax.Array:
  """Mean over layers of mean / max GPU load, for ``loads [L, G]``: 1 is perfect.

  Example:
    >>> import jax.numpy as jnp
    >>> from eplb_jax import metrics
    >>> metrics.balancedness(jnp.array([[3.0, 5.0], [4.0, 4.0]]))  # (0.8 + 1) / 2
    Array(0.9, dtype=float32)
  """
  return layer_balancedness(loads).mean()


# Points of the grid on which the cardinality term is evaluated.
_GRID = 64
# Above this many ways to split the groups over the nodes, the hierarchical
# bound falls back to the global one (still a bound: it relaxes the policy).
_MAX_PARTITIONS = 2000


def _smallest_sum(value: jax.Array, copies: jax.Array, k: int) -> jax.Array:
  """Sum of the ``k`` smallest of the multiset of ``copies[e]`` times ``value[e]`` (last axis)."""
  order = jnp.argsort(value, axis=-1)
  value = jnp.take_along_axis(value, order, axis=-1)
  copies = jnp.take_along_axis(copies, order, axis=-1)
  before = jnp.cumsum(copies, axis=-1) - copies
  return (jnp.clip(k - before, 0, copies) * value).sum(axis=-1)


def _cardinality(weight: jax.Array, heaviest: jax.Array, num_slots: int, per_gpu: int):
  """``v + sigma(v)`` for one domain ``weight [n]`` at heaviest replicas ``heaviest [N] >= v*``.

  With heaviest replica ``v``, expert ``e`` has at least ``m_e = max(1,
  ceil(w_e / v))`` replicas, so at most ``m_e + s`` with ``s = S - sum m``,
  each at least ``w_e / (m_e + s)``; the GPU holding the heaviest replica
  holds ``k - 1`` more, at least ``sigma(v)``: the ``k - 1`` smallest of
  those. ``m`` is rounded down a little (fewer required replicas only
  lower the bound), so float32 rounding cannot make it unsound.
  """
  v = heaviest[:, None]
  need = jnp.maximum(1.0, jnp.ceil(weight / v * (1 - 1e-6)))  # [N, n]
  most = need + jnp.maximum(num_slots - need.sum(axis=1, keepdims=True), 0)
  return heaviest + _smallest_sum(weight / most, most, per_gpu - 1)


def _domain_bound(weight: jax.Array, num_slots: int, num_gpus: int) -> jax.Array:
  """Lower bound on the heaviest GPU of one domain: ``weight [n]`` onto ``num_slots`` slots."""
  per_gpu = num_slots // num_gpus
  _, _, count = replication.replicate_rows(weight[None], num_slots)
  heaviest = (weight / count[0]).max()  # the lightest possible heaviest replica, v*
  bound = jnp.maximum(weight.sum() / num_gpus, heaviest)
  if per_gpu == 1:
    return bound
  # v + sigma(v) is at least v_i + sigma(v_{i + 1}) on [v_i, v_{i + 1}) (sigma
  # does not increase with v), and at least U = v* + sigma(v*) beyond U: the
  # minimum over a geometric grid from v* to U bounds it from below.
  top = _cardinality(weight, heaviest[None], num_slots, per_gpu)[0]
  ratio = top / jnp.where(heaviest > 0, heaviest, 1.0)
  grid = heaviest * ratio ** jnp.linspace(0.0, 1.0, _GRID + 1)
  above = _cardinality(weight, jnp.maximum(grid[1:], 1e-30), num_slots, per_gpu) - grid[1:]
  card = jnp.minimum(top, (grid[:-1] + above).min())
  return jnp.maximum(bound, jnp.where(heaviest > 0, card, 0.0))


def _partitions(items: tuple[int, ...], size: int):
  """All ways to split ``items`` into unordered blocks of ``size``."""
  if not items:
    yield ()
    return
  first, rest = items[0], items[1:]
  for others in itertools.combinations(rest, size - 1):
    remaining = tuple(x for x in rest if x not in others)
    for tail in _partitions(remaining, size):
      yield ((first, *others), *tail)


def _num_partitions(num_groups: int, size: int) -> int:
  total = 1
  for left in range(num_groups, 0, -size):
    total *= math.comb(left - 1, size - 1)
  return total


@functools.partial(jax.jit, static_argnames=("num_replicas", "num_gpus", "num_groups", "num_nodes"))
def lower_bound(
  weight: jax.typing.ArrayLike,
  num_replicas: int,
  num_gpus: int,
  num_groups: int = 1,
  num_nodes: int = 1,
) -> jax.Array:
  """A lower bound ``[L]`` on the heaviest GPU load of any placement under the policy.

  Per packing domain (all experts onto all GPUs; on the hierarchical policy,
  ``num_groups % num_nodes == 0``, a node's groups onto its GPUs), the
  heaviest GPU carries at least:

  * the average, ``sum w / num_gpus``;
  * the heaviest replica, at least water-filling's ``v*``;
  * the heaviest replica ``v`` plus the ``k - 1`` other replicas of its GPU
    (``k`` slots per GPU), which are no lighter than the ``k - 1`` smallest
    replica loads any counts with heaviest replica ``v`` allow; minimised
    over ``v >= v*``.

  On the hierarchical policy, the minimum over the ways to split the groups
  over the nodes of the heaviest node's bound (the global bound where there
  are more than 2000 ways). Sizes are those of :func:`eplb_jax.rebalance_experts`.
  """
  weight = jnp.asarray(weight, jnp.float32)
  num_layers, num_logical = weight.shape
  if num_nodes == 1 or num_groups % num_nodes:
    return jax.vmap(lambda w: _domain_bound(w, num_replicas, num_gpus))(weight)
  per_node = num_groups // num_nodes
  if _num_partitions(num_groups, per_node) > _MAX_PARTITIONS:
    return jax.vmap(lambda w: _domain_bound(w, num_replicas, num_gpus))(weight)
  partitions = list(_partitions(tuple(range(num_groups)), per_node))
  blocks = sorted({block for partition in partitions for block in partition})
  index = {block: i for i, block in enumerate(blocks)}
  partition_blocks = np.array([[index[block] for block in p] for p in partitions])
  group_size = num_logical // num_groups
  experts = np.array([[g * group_size + i for g in b for i in range(group_size)] for b in blocks])
  bound = functools.partial(
    _domain_bound, num_slots=num_replicas // num_nodes, num_gpus=num_gpus // num_nodes
  )
  per_block = jax.vmap(jax.vmap(bound))(weight[:, experts])  # [L, blocks]
  return per_block[:, partition_blocks].max(axis=2).min(axis=1)


def bound_ratio(loads: jax.Array, bound: jax.Array) -> jax.Array:
  """Mean over layers of max GPU load / lower bound (1 is provably optimal)."""
  peak = loads.max(axis=-1)
  return jnp.where(bound > 0, peak / jnp.where(bound > 0, bound, 1), 1.0).mean()
