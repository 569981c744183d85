"""Migration cost: which replicas a placement change must send to a GPU.

Contents of a GPU are multisets: the ``k``-th copy of an expert on a GPU
after the change is *kept* when the GPU held at least ``k`` copies of it
before; every other replica must arrive over the network.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from eplb_jax._src import ops


def kept(old: jax.Array, new: jax.Array) -> jax.Array:
  """Which slots of ``new [..., s]`` hold a replica that ``old [..., s]`` already holds.

  Both are the contents of one GPU (broadcast over leading axes).
  """
  return ops.occurrence_rank(new) < (new[..., :, None] == old[..., None, :]).sum(-1)


def migration_cost(old: jax.Array, new: jax.Array, num_gpus: int) -> tuple[jax.Array, jax.Array]:
  """``(moved [L], changed_slots [L])`` of the change from ``old [L, P]`` to ``new [L, P]``.

  ``moved`` counts the replicas that arrive on a GPU that did not hold them
  (an empty slot, -1, receives nothing); ``changed_slots`` the slots whose
  expert changes.
  """
  num_layers, num_slots = new.shape
  on_gpu = (num_layers, num_gpus, num_slots // num_gpus)
  arrives = (new.reshape(on_gpu) >= 0) & ~kept(old.reshape(on_gpu), new.reshape(on_gpu))
  return arrives.sum((1, 2), dtype=jnp.int32), (old != new).sum(-1, dtype=jnp.int32)
