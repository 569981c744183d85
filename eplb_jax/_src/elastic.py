"""Failed GPUs (elastic expert parallelism): solve on the survivors, keep the full slot layout.

A topology with failed GPUs (:attr:`Topology.failed_gpus`) is balanced as
its :meth:`Topology.survivors` problem, whose slots are the active GPUs'
slots in order; the result is scattered back into the full layout ``[L, P]``,
every slot of a failed GPU left empty (-1) and listed in no ``log2phy`` row.
Output shapes therefore never depend on the failures, and slot ``s`` stays on
GPU ``s // slots_per_gpu``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from eplb_jax._src.placement import Placement
from eplb_jax._src.topology import Topology


def clear_failed(phy2log: jax.Array, topology: Topology) -> jax.Array:
  """``phy2log [L, P]`` with every slot of a failed GPU emptied (-1): they serve nothing."""
  if not topology.failed_gpus:
    return phy2log
  active = np.zeros(topology.num_replicas, bool)
  active[topology.active_slots()] = True
  return jnp.where(active, phy2log, -1)


def to_survivors(phy2log: jax.Array, topology: Topology) -> jax.Array:
  """``[L, P']``: the active GPUs' slots of ``phy2log [L, P]``, the survivors' slot numbering."""
  if not topology.failed_gpus:
    return phy2log
  return phy2log[:, topology.active_slots()]


def to_full(survivors: Placement, topology: Topology) -> Placement:
  """The placement on ``topology.survivors()`` laid out on all of ``topology``'s slots.

  Failed GPUs' slots hold -1; ``log2phy`` lists the same replicas under their
  full slot numbers and is padded with -1 to the full width ``P - E + 1``;
  ``logcnt`` is unchanged.
  """
  if not topology.failed_gpus:
    return survivors
  slots = jnp.asarray(topology.active_slots())
  num_layers = survivors.phy2log.shape[0]
  phy2log = jnp.full((num_layers, topology.num_replicas), -1, jnp.int32)
  phy2log = phy2log.at[:, slots].set(survivors.phy2log)
  log2phy = jnp.where(survivors.log2phy >= 0, slots[jnp.maximum(survivors.log2phy, 0)], -1)
  padding = topology.num_replicas - slots.shape[0]
  log2phy = jnp.pad(log2phy, ((0, 0), (0, 0), (0, padding)), constant_values=-1)
  return Placement(phy2log, log2phy, survivors.logcnt)
