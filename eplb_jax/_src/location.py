"""What a token dispatcher needs per layer, as device arrays: :class:`ExpertLocation`.

The fields and their names are those of sglang-jax's ``ExpertLocationMetadata``
(``python/sgl_jax/srt/eplb/expert_location.py``), except that the dispatch map
holds every GPU's row instead of one rank's.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from eplb_jax._src import checks
from eplb_jax._src.placement import Placement


class ExpertLocation(NamedTuple):
  """Every expert's replicas and the replica each GPU sends its tokens to, per layer.

  ``X = P - E + 1`` (the width of ``Placement.log2phy``); ``G`` GPUs hold
  ``P / G`` consecutive slots each. All fields are int32.

  Attributes:
    physical_to_logical_map: ``[L, P]``, the expert in each slot (``phy2log``).
    logical_to_all_physical_map: ``[L, E, X]``, each expert's slots in
      ascending order, -1 padded.
    logical_to_all_physical_map_num_valid: ``[L, E]``, each expert's number of
      replicas (``logcnt``).
    logical_to_rank_dispatch_physical_map: ``[L, G, E]``, for each GPU the slot
      it sends each expert's tokens to: the expert's lowest slot on that GPU;
      else, among the replicas on the GPU's node, one spread evenly over the
      node's GPUs that hold none; else one spread evenly over all such GPUs.
      Row ``[:, g]`` is GPU ``g``'s ``[L, E]`` map (sglang-jax's field).
  """

  physical_to_logical_map: jax.Array
  logical_to_all_physical_map: jax.Array
  logical_to_all_physical_map_num_valid: jax.Array
  logical_to_rank_dispatch_physical_map: jax.Array


def expert_location(placement: Placement, num_gpus: int, num_nodes: int = 1) -> ExpertLocation:
  """The :class:`ExpertLocation` of a placement on ``num_gpus`` GPUs over ``num_nodes`` nodes.

  Pure and jit-friendly: the sizes are static, the maps may be traced (or
  sharded over layers), and the result is deterministic. Spreading: the GPUs
  that share a set of candidate replicas take them in turn, GPU by GPU,
  starting at replica ``e mod n`` for expert ``e`` with ``n`` candidates, so
  each replica serves ``k // n`` or ``k // n + 1`` of the ``k`` GPUs. An
  expert without a replica (never the case in a balancer's placement) gets -1.

  Args:
    placement: a :class:`Placement`, e.g. from :func:`eplb_jax.rebalance_experts`.
    num_gpus: GPUs in total; must divide ``P``.
    num_nodes: nodes; must divide ``num_gpus``.

  Returns:
    The :class:`ExpertLocation`.

  Example:
    >>> import numpy as np
    >>> import eplb_jax
    >>> topology = eplb_jax.Topology(6, num_groups=1, num_nodes=1, num_gpus=2)
    >>> placement = eplb_jax.rebalance(np.array([[4.0, 1.0, 1.0, 2.0]]), topology)
    >>> location = eplb_jax.expert_location(placement, num_gpus=2)
    >>> location.logical_to_rank_dispatch_physical_map  # [L, GPU, expert]: the slot to send to
    Array([[[0, 1, 4, 2],
            [3, 1, 4, 5]]], dtype=int32)
  """
  num_gpus = checks.check_size(num_gpus, "num_gpus")
  num_nodes = checks.check_size(num_nodes, "num_nodes")
  phy2log, log2phy, logcnt = placement
  if jnp.ndim(phy2log) != 2 or jnp.ndim(log2phy) != 3 or jnp.ndim(logcnt) != 2:
    raise ValueError(
      "placement must hold phy2log [L, P], log2phy [L, E, X] and logcnt [L, E], got shapes "
      f"{jnp.shape(phy2log)}, {jnp.shape(log2phy)}, {jnp.shape(logcnt)}"
    )
  num_slots = jnp.shape(phy2log)[1]
  if num_slots % num_gpus:
    raise ValueError(f"num_gpus must divide the number of slots ({num_slots}), got {num_gpus}")
  if num_gpus % num_nodes:
    raise ValueError(f"num_nodes must divide num_gpus ({num_gpus}), got {num_nodes}")
  return _expert_location(
    jnp.asarray(phy2log), jnp.asarray(log2phy), jnp.asarray(logcnt), num_gpus, num_nodes
  )


@functools.partial(jax.jit, static_argnums=(3, 4))
def _expert_location(
  phy2log: jax.Array, log2phy: jax.Array, logcnt: jax.Array, num_gpus: int, num_nodes: int
) -> ExpertLocation:
  num_slots = phy2log.shape[1]
  num_experts = logcnt.shape[1]
  # Each expert's slots ascending, -1 padding last.
  slots = jnp.sort(jnp.where(log2phy < 0, num_slots, log2phy), axis=-1)
  slots = jnp.where(slots < num_slots, slots, -1).astype(jnp.int32)

  # [L, E, G, X]: which of an expert's replicas each GPU may pick, nearest tier first.
  valid = (slots >= 0)[:, :, None, :]
  slot_gpu = (slots // (num_slots // num_gpus))[:, :, None, :]
  gpus_per_node = num_gpus // num_nodes
  gpu = jnp.arange(num_gpus, dtype=jnp.int32)[None, None, :, None]
  on_gpu = valid & (slot_gpu == gpu)
  on_node = valid & (slot_gpu // gpus_per_node == gpu // gpus_per_node)
  has_gpu, has_node = on_gpu.any(-1), on_node.any(-1)
  candidates = jnp.where(has_gpu[..., None], on_gpu, jnp.where(has_node[..., None], on_node, valid))
  count = candidates.sum(-1, dtype=jnp.int32)

  # A GPU's turn among the GPUs sharing its candidates: its node's GPUs without a
  # local replica, or all GPUs without a replica on their node.
  node_tier = ~has_gpu & has_node
  shape = node_tier.shape
  node_turn = node_tier.reshape(*shape[:2], num_nodes, gpus_per_node).cumsum(-1).reshape(shape)
  global_turn = (~has_node).cumsum(-1)
  turn = jnp.where(has_node, node_turn, global_turn) - 1
  expert = jnp.arange(num_experts, dtype=jnp.int32)[None, :, None]
  pick = jnp.where(has_gpu, 0, (turn + expert) % jnp.maximum(count, 1))
  position = jnp.argmax(candidates.cumsum(-1) == (pick + 1)[..., None], axis=-1)
  dispatch = jnp.take_along_axis(slots, position, axis=-1)
  dispatch = jnp.where(count > 0, dispatch, -1).swapaxes(1, 2)
  return ExpertLocation(phy2log, slots, logcnt, dispatch.astype(jnp.int32))
