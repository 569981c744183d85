"""Quality metrics of a placement, shared by the tests, the CLI and the benchmarks.

Each replica of expert ``e`` carries ``w_e / logcnt_e`` of the load (tokens
are spread evenly over replicas), and a GPU's load is the sum over its slots.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from eplb_jax._src import placement
from eplb_jax._src import replication


@functools.partial(jax.jit, static_argnames="num_gpus")
def gpu_loads(
  weight: jax.typing.ArrayLike, phy2log: jax.Array, logcnt: jax.Array, num_gpus: int
) -> jax.Array:
  """Load of each GPU ``[L, num_gpus]`` for loads ``weight [L, E]``.

  ``phy2log [L, P]`` and ``logcnt [L, E]`` are the placement maps; slots are
  numbered GPU by GPU. Same as :meth:`eplb_jax.Placement.gpu_loads`.
  """
  return placement.gpu_loads(weight, phy2log, logcnt, num_gpus)


def layer_balancedness(loads: jax.Array) -> jax.Array:
  """Mean over max load of each row of ``loads [L, G]``; 1 for an all-zero row."""
  peak = loads.max(axis=-1)
  return jnp.where(peak > 0, loads.mean(axis=-1) / jnp.where(peak > 0, peak, 1), 1.0)


def balancedness(loads: jax.Array) -> jax.Array:
  """Mean over layers of mean / max GPU load, for ``loads [L, G]``: 1 is perfect."""
  return layer_balancedness(loads).mean()


@functools.partial(jax.jit, static_argnames=("num_replicas", "num_gpus"))
def lower_bound(weight: jax.typing.ArrayLike, num_replicas: int, num_gpus: int) -> jax.Array:
  """A lower bound ``[L]`` on the max GPU load of any placement.

  The heaviest GPU carries at least the average ``total / num_gpus``, and at
  least the heaviest replica; greedy replication attains the smallest possible
  heaviest replica, ``max_e w_e / logcnt_e``.
  """
  weight = jnp.asarray(weight, jnp.float32)
  _, _, logcnt = replication.replicate_rows(weight, num_replicas)
  largest_replica = (weight / logcnt).max(axis=-1)
  return jnp.maximum(weight.sum(axis=-1) / num_gpus, largest_replica)


def bound_ratio(loads: jax.Array, bound: jax.Array) -> jax.Array:
  """Mean over layers of max GPU load / lower bound (1 is provably optimal)."""
  peak = loads.max(axis=-1)
  return jnp.where(bound > 0, peak / jnp.where(bound > 0, bound, 1), 1.0).mean()
