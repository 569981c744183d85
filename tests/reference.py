"""Pure-NumPy oracle of DeepSeek's original greedy EPLB.

Written from the semantics of DeepSeek's loop-based PyTorch code
(https://github.com/deepseek-ai/EPLB, ``eplb.py``): ``balanced_packing``,
``replicate_experts``, ``rebalance_experts_hierarchical`` and
``rebalance_experts``. It is meant to be obviously correct, not fast, and pins
down the tie rules and float32 arithmetic that eplb_jax must reproduce:

* every load is float32 and every division is float32 / float32;
* items are visited in a *stable* descending order (ties: lower index first);
* the lightest non-full pack wins (ties: lowest pack index), and pack loads are
  accumulated in float32 in visiting order;
* the heaviest per-replica load wins a redundant slot (ties: lowest expert).

PyTorch's CPU ``sort(descending=True)`` is not stable for rows of 16 items or
more, so on tied loads (e.g. the equal per-replica loads of one expert) the
original may order replicas differently: ``phy2log`` and ``logcnt`` still agree,
``log2phy`` then holds the same slots per expert in another rank order.
"""

from __future__ import annotations

import numpy as np


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
  """Greedily packs ``n`` items into ``num_packs`` packs of ``n // num_packs`` items each.

  Args:
    weight: ``[X, n]`` item loads (cast to float32); ``n`` divisible by ``num_packs``.
    num_packs: number of packs.

  Returns:
    pack_index: ``[X, n]`` int64, the pack of each item.
    rank_in_pack: ``[X, n]`` int64, the item's position within its pack (visiting order).

  With one item per pack the identity is returned without sorting. Otherwise
  items are visited by descending load (stable: ``argsort(-w, kind="stable")``;
  ``-0.0 == 0.0`` so zero loads keep index order too) and each goes to the
  non-full pack with the smallest float32 load, the lowest pack index on ties.
  """
  weight = np.asarray(weight, dtype=np.float32)
  num_rows, num_items = weight.shape
  assert num_items % num_packs == 0
  items_per_pack = num_items // num_packs
  if items_per_pack == 1:
    pack_index = np.broadcast_to(np.arange(num_items, dtype=np.int64), weight.shape).copy()
    return pack_index, np.zeros(weight.shape, dtype=np.int64)

  pack_index = np.full(weight.shape, -1, dtype=np.int64)
  rank_in_pack = np.full(weight.shape, -1, dtype=np.int64)
  for row in range(num_rows):
    loads = np.zeros(num_packs, dtype=np.float32)
    counts = [0] * num_packs
    for item in np.argsort(-weight[row], kind="stable"):
      # min() returns the first minimum, i.e. the lowest pack index on ties.
      pack = min((p for p in range(num_packs) if counts[p] < items_per_pack), key=loads.__getitem__)
      pack_index[row, item] = pack
      rank_in_pack[row, item] = counts[pack]
      loads[pack] += weight[row, item]  # float32 += float32
      counts[pack] += 1
  return pack_index, rank_in_pack


def replicate_experts(
  weight: np.ndarray, num_phy: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Replicates ``num_log`` experts into ``num_phy`` slots, minimising the max replica load.

  Args:
    weight: ``[X, num_log]`` expert loads (cast to float32).
    num_phy: number of physical slots, ``>= num_log``.

  Returns:
    phy2log: ``[X, num_phy]`` int64, the expert of each slot (the first ``num_log`` are identity).
    rank: ``[X, num_phy]`` int64, the replica rank of each slot.
    logcnt: ``[X, num_log]`` int64, replicas per expert.

  Each redundant slot goes to ``argmax(weight / logcnt)`` (float32 division,
  lowest expert index on ties); its rank is the expert's count before the increment.
  """
  weight = np.asarray(weight, dtype=np.float32)
  num_rows, num_log = weight.shape
  assert num_phy >= num_log
  rows = np.arange(num_rows)
  phy2log = np.zeros((num_rows, num_phy), dtype=np.int64)
  phy2log[:, :num_log] = np.arange(num_log)
  rank = np.zeros((num_rows, num_phy), dtype=np.int64)
  logcnt = np.ones((num_rows, num_log), dtype=np.int64)
  for slot in range(num_log, num_phy):
    best = np.argmax(weight / logcnt.astype(np.float32), axis=-1)
    phy2log[:, slot] = best
    rank[:, slot] = logcnt[rows, best]
    logcnt[rows, best] += 1
  return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
  """Row-wise inverse of a ``[X, n]`` permutation."""
  inv = np.empty_like(perm)
  np.put_along_axis(inv, perm, np.arange(perm.shape[1], dtype=perm.dtype)[None, :], axis=1)
  return inv


def rebalance_experts_hierarchical(
  weight: np.ndarray,
  num_physical_experts: int,
  num_groups: int,
  num_nodes: int,
  num_gpus: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """DeepSeek's hierarchical policy: groups -> nodes, replicas within nodes, replicas -> GPUs.

  Args:
    weight: ``[layers, num_logical]`` expert loads (cast to float32).
    num_physical_experts: physical slots in total, divisible by ``num_gpus``.
    num_groups: expert groups (``num_logical`` divisible by it), divisible by ``num_nodes``.
    num_nodes: server nodes; ``num_gpus`` divisible by it.
    num_gpus: GPUs in total.

  Returns:
    phy2log: ``[layers, num_physical_experts]`` int64, the expert of each slot.
    phyrank: ``[layers, num_physical_experts]`` int64, the replica rank of each slot.
    logcnt: ``[layers, num_logical]`` int64, replicas per expert.
  """
  weight = np.asarray(weight, dtype=np.float32)
  num_layers, num_logical = weight.shape
  assert num_logical % num_groups == 0
  group_size = num_logical // num_groups
  assert num_groups % num_nodes == 0
  groups_per_node = num_groups // num_nodes
  assert num_gpus % num_nodes == 0
  assert num_physical_experts % num_gpus == 0
  phy_per_gpu = num_physical_experts // num_gpus
  take = lambda a, idx: np.take_along_axis(a, idx, axis=-1)  # noqa: E731

  # Step 1: pack groups onto nodes; mlog = node-major "meta-logical" expert order.
  group_load = weight.reshape(num_layers, num_groups, group_size).sum(-1, dtype=np.float32)
  group_pack, group_rank = balanced_packing(group_load, num_nodes)
  log2mlog = (
    ((group_pack * groups_per_node + group_rank) * group_size)[..., None] + np.arange(group_size)
  ).reshape(num_layers, num_logical)
  mlog2log = _inverse(log2mlog)

  # Step 2: replicate experts within each node.
  mlog_load = take(weight, mlog2log).reshape(-1, num_logical // num_nodes)
  phy2mlog, phyrank, mlogcnt = replicate_experts(mlog_load, num_physical_experts // num_nodes)

  # Step 3: pack the replicas of each node onto its GPUs.
  phy_load = take(mlog_load / mlogcnt.astype(np.float32), phy2mlog)
  pack_index, rank_in_pack = balanced_packing(phy_load, num_gpus // num_nodes)
  pphy2phy = _inverse(pack_index * phy_per_gpu + rank_in_pack)

  pphy2mlog = take(phy2mlog, pphy2phy).reshape(num_layers, num_nodes, -1)
  node_offset = np.arange(0, num_logical, num_logical // num_nodes)
  pphy2mlog = (pphy2mlog + node_offset[:, None]).reshape(num_layers, -1)
  pphy2log = take(mlog2log, pphy2mlog)
  pphyrank = take(phyrank, pphy2phy).reshape(num_layers, -1)
  logcnt = take(mlogcnt.reshape(num_layers, -1), log2mlog)
  return pphy2log, pphyrank, logcnt


def rebalance_experts(
  weight: np.ndarray,
  num_replicas: int,
  num_groups: int,
  num_nodes: int,
  num_gpus: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """DeepSeek's entry point: hierarchical if ``num_groups % num_nodes == 0``, else global.

  Args:
    weight: ``[layers, num_logical]`` expert loads (cast to float32).
    num_replicas: physical slots in total, divisible by ``num_gpus``.
    num_groups, num_nodes, num_gpus: see :func:`rebalance_experts_hierarchical`;
      the global policy is the hierarchical one with ``(1, 1, num_gpus)``.

  Returns:
    phy2log: ``[layers, num_replicas]`` int64, the expert of each slot.
    log2phy: ``[layers, num_logical, num_replicas - num_logical + 1]`` int64, the slots
      of each expert by replica rank, padded with -1.
    logcnt: ``[layers, num_logical]`` int64, replicas per expert.
  """
  weight = np.asarray(weight, dtype=np.float32)
  num_layers, num_logical = weight.shape
  if num_groups % num_nodes == 0:
    phy2log, phyrank, logcnt = rebalance_experts_hierarchical(
      weight, num_replicas, num_groups, num_nodes, num_gpus
    )
  else:
    phy2log, phyrank, logcnt = rebalance_experts_hierarchical(weight, num_replicas, 1, 1, num_gpus)
  log2phy = np.full((num_layers, num_logical, num_replicas - num_logical + 1), -1, dtype=np.int64)
  log2phy[np.arange(num_layers)[:, None], phy2log, phyrank] = np.arange(num_replicas)
  return phy2log, log2phy, logcnt
