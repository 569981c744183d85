"""PyTorch baselines for the benchmark: DeepSeek's EPLB and two vectorised seeds.

Three policies, each a ``rebalance_experts(weight, num_replicas, num_groups,
num_nodes, num_gpus) -> (phy2log, log2phy, logcnt)`` callable in
:data:`POLICIES`:

* ``original``: DeepSeek's loop-based greedy EPLB
  (https://github.com/deepseek-ai/EPLB, the SEARCH side of seed 000).
* ``seed000``: seed 000's REPLACE side: a vectorised greedy packing followed by
  up to 50 pairwise swaps between the heaviest and lightest pack, an
  incremental ``replicate_experts``, and no copy of the loads to the CPU.
* ``seed004``: seed 004: a vectorised greedy packing refined by up to 50
  min-max swaps out of the heaviest pack (``_refine_minmax``), and a
  ``replicate_experts`` that lays replicas out expert by expert.

All three share DeepSeek's hierarchical policy (seed 004 copies it verbatim) and
entry point, parameterised here by the packing and replication functions. The
algorithmic code is kept faithful to the seeds (it is the baseline eplb_jax is
measured against); only style, names and dead code were changed. torch is
imported at the top level: the benchmark imports this module lazily.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

Pair = tuple[torch.Tensor, torch.Tensor]
Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
PackFn = Callable[[torch.Tensor, int], Pair]
ReplicateFn = Callable[[torch.Tensor, int], Triple]


def _identity_packing(weight: torch.Tensor) -> Pair:
  """One item per pack: item ``i`` goes to pack ``i`` with rank 0."""
  pack_index = torch.arange(weight.size(-1), dtype=torch.int64, device=weight.device)
  pack_index = pack_index.expand(weight.shape)
  return pack_index, torch.zeros_like(weight, dtype=torch.int64)


def _scatter_packs(pack_item_ids: torch.Tensor, num_items: int) -> Pair:
  """Turns ``[L, packs, per_pack]`` item ids into ``(pack_index, rank_in_pack)`` ``[L, n]``."""
  num_layers, num_packs, per_pack = pack_item_ids.shape
  device = pack_item_ids.device
  flat_ids = pack_item_ids.reshape(num_layers, -1)
  pack_grid = torch.arange(num_packs, device=device).view(1, -1, 1)
  pack_grid = pack_grid.expand(num_layers, -1, per_pack).reshape(num_layers, -1)
  rank_grid = torch.arange(per_pack, device=device).view(1, 1, -1)
  rank_grid = rank_grid.expand(num_layers, num_packs, -1).reshape(num_layers, -1)
  pack_index = torch.empty(num_layers, num_items, dtype=torch.int64, device=device)
  rank_in_pack = torch.empty(num_layers, num_items, dtype=torch.int64, device=device)
  pack_index.scatter_(1, flat_ids, pack_grid)
  rank_in_pack.scatter_(1, flat_ids, rank_grid)
  return pack_index, rank_in_pack


# --- original: DeepSeek's loop-based greedy ------------------------------------------------------


def balanced_packing_original(weight: torch.Tensor, num_packs: int) -> Pair:
  """Greedy packing of ``[X, n]`` items into ``num_packs`` equal-count packs (DeepSeek)."""
  num_layers, num_groups = weight.shape
  assert num_groups % num_packs == 0
  groups_per_pack = num_groups // num_packs
  if groups_per_pack == 1:
    return _identity_packing(weight)

  indices = weight.float().sort(-1, descending=True).indices.cpu()
  pack_index = torch.full_like(weight, fill_value=-1, dtype=torch.int64, device="cpu")
  rank_in_pack = torch.full_like(pack_index, fill_value=-1)
  for i in range(num_layers):
    pack_weights = [0] * num_packs
    pack_items = [0] * num_packs
    for group in indices[i]:
      pack = min(
        (p for p in range(num_packs) if pack_items[p] < groups_per_pack),
        key=pack_weights.__getitem__,
      )
      assert pack_items[pack] < groups_per_pack
      pack_index[i, group] = pack
      rank_in_pack[i, group] = pack_items[pack]
      pack_weights[pack] += weight[i, group]
      pack_items[pack] += 1
  return pack_index, rank_in_pack


def replicate_experts_original(weight: torch.Tensor, num_phy: int) -> Triple:
  """Adds ``num_phy - num_log`` replicas one at a time to the max ``weight / logcnt`` (DeepSeek)."""
  n, num_log = weight.shape
  assert num_phy >= num_log
  device = weight.device
  phy2log = torch.arange(num_phy, dtype=torch.int64, device=device).repeat(n, 1)
  rank = torch.zeros(n, num_phy, dtype=torch.int64, device=device)
  logcnt = torch.ones(n, num_log, dtype=torch.int64, device=device)
  arangen = torch.arange(n, dtype=torch.int64, device=device)
  for i in range(num_log, num_phy):
    redundant_indices = (weight / logcnt).max(dim=-1).indices
    phy2log[:, i] = redundant_indices
    rank[:, i] = logcnt[arangen, redundant_indices]
    logcnt[arangen, redundant_indices] += 1
  return phy2log, rank, logcnt


# --- seed000: vectorised greedy + heaviest/lightest pairwise swaps -------------------------------


def balanced_packing_seed000(weight: torch.Tensor, num_packs: int) -> Pair:
  """Vectorised greedy packing, then up to 50 swaps between the heaviest and lightest pack."""
  num_layers, num_groups = weight.shape
  device = weight.device
  assert num_groups % num_packs == 0
  groups_per_pack = num_groups // num_packs
  if groups_per_pack == 1:
    return _identity_packing(weight)

  sorted_weight, sorted_indices = weight.float().sort(dim=-1, descending=True)
  pack_weights = torch.zeros(num_layers, num_packs, device=device)
  pack_counts = torch.zeros(num_layers, num_packs, dtype=torch.int64, device=device)
  # [layer, pack, slot] contents and item ids, for the refinement.
  pack_contents = torch.zeros(num_layers, num_packs, groups_per_pack, device=device)
  pack_item_ids = torch.zeros(
    num_layers, num_packs, groups_per_pack, dtype=torch.int64, device=device
  )
  row_idx = torch.arange(num_layers, device=device)

  # Greedy: each item to the lightest non-full pack.
  for i in range(num_groups):
    w = sorted_weight[:, i]
    mask = pack_counts < groups_per_pack
    curr_w = pack_weights.clone()
    curr_w[~mask] = float("inf")
    selected_pack = torch.argmin(curr_w, dim=1)
    selected_slot = pack_counts[row_idx, selected_pack]
    pack_weights[row_idx, selected_pack] += w
    pack_counts[row_idx, selected_pack] += 1
    pack_contents[row_idx, selected_pack, selected_slot] = w
    pack_item_ids[row_idx, selected_pack, selected_slot] = sorted_indices[:, i]

  # Refinement: best single swap between the heaviest and lightest pack, per layer.
  for _ in range(50):
    p_weights = pack_contents.sum(dim=2)
    val_max, idx_max = p_weights.max(dim=1)
    val_min, idx_min = p_weights.min(dim=1)
    diff = val_max - val_min
    active = diff > 1e-4
    if not active.any():
      break

    gather_idx_max = idx_max.view(-1, 1, 1).expand(-1, 1, groups_per_pack)
    gather_idx_min = idx_min.view(-1, 1, 1).expand(-1, 1, groups_per_pack)
    items_max = torch.gather(pack_contents, 1, gather_idx_max).squeeze(1)
    items_min = torch.gather(pack_contents, 1, gather_idx_min).squeeze(1)

    # improvement = old_diff - |old_diff - 2 * delta| for every pair: [L, G, G]. (The seed
    # also builds an `improvement > 1e-5 & active` mask that it never applies.)
    delta = items_max.unsqueeze(2) - items_min.unsqueeze(1)
    target = diff.view(-1, 1, 1)
    improvement = target - (target - 2 * delta).abs()
    best_imp, best_idx = improvement.view(num_layers, -1).max(dim=1)
    do_swap = best_imp > 1e-5
    if not do_swap.any():
      break

    layer_indices = torch.where(do_swap)[0]
    swap_indices = best_idx[layer_indices]
    u_idx = swap_indices // groups_per_pack
    v_idx = swap_indices % groups_per_pack
    p_max_idx = idx_max[layer_indices]
    p_min_idx = idx_min[layer_indices]

    u_val = pack_contents[layer_indices, p_max_idx, u_idx]
    v_val = pack_contents[layer_indices, p_min_idx, v_idx]
    pack_contents[layer_indices, p_max_idx, u_idx] = v_val
    pack_contents[layer_indices, p_min_idx, v_idx] = u_val
    u_id = pack_item_ids[layer_indices, p_max_idx, u_idx]
    v_id = pack_item_ids[layer_indices, p_min_idx, v_idx]
    pack_item_ids[layer_indices, p_max_idx, u_idx] = v_id
    pack_item_ids[layer_indices, p_min_idx, v_idx] = u_id

  return _scatter_packs(pack_item_ids, num_groups)


def replicate_experts_seed000(weight: torch.Tensor, num_phy: int) -> Triple:
  """DeepSeek's replication with the ``weight / logcnt`` scores updated incrementally."""
  n, num_log = weight.shape
  assert num_phy >= num_log
  device = weight.device
  phy2log = torch.arange(num_phy, dtype=torch.int64, device=device).repeat(n, 1)
  rank = torch.zeros(n, num_phy, dtype=torch.int64, device=device)
  logcnt = torch.ones(n, num_log, dtype=torch.int64, device=device)
  arangen = torch.arange(n, dtype=torch.int64, device=device)
  current_scores = weight.float() / logcnt.float()
  for i in range(num_log, num_phy):
    redundant_indices = current_scores.argmax(dim=-1)
    phy2log[:, i] = redundant_indices
    rank[:, i] = logcnt[arangen, redundant_indices]
    logcnt[arangen, redundant_indices] += 1
    new_cnt = logcnt[arangen, redundant_indices].float()
    chosen_weight = weight[arangen, redundant_indices].float()
    current_scores[arangen, redundant_indices] = chosen_weight / new_cnt
  return phy2log, rank, logcnt


# --- seed004: vectorised greedy + min-max swaps out of the heaviest pack -------------------------


def _refine_minmax(
  weights: torch.Tensor,
  pack_indices: torch.Tensor,
  pack_weights: torch.Tensor,
  max_iters: int = 50,
) -> torch.Tensor:
  """Swaps an item of the heaviest pack with one of another pack while that lowers the max.

  ``weights`` is ``[L, N]``, ``pack_indices`` ``[L, M, G]`` item ids (updated in
  place and returned), ``pack_weights`` ``[L, M]`` pack loads (updated in place).
  """
  num_layers, num_packs, per_pack = pack_indices.shape
  batch_idx = torch.arange(num_layers, device=weights.device)
  for _ in range(max_iters):
    max_load, max_pid = torch.max(pack_weights, dim=1)
    w_max_items = weights.gather(1, pack_indices[batch_idx, max_pid])  # [L, G]
    w_all_items = weights.gather(1, pack_indices.view(num_layers, -1))
    w_all_items = w_all_items.view(num_layers, num_packs, per_pack)
    # deltas[l, p, g_other, g_max] = w(max item) - w(other item): [L, M, G, G].
    deltas = w_max_items.unsqueeze(1).unsqueeze(2) - w_all_items.unsqueeze(3)
    new_max_load = max_load.view(num_layers, 1, 1, 1) - deltas
    new_other_load = pack_weights.view(num_layers, num_packs, 1, 1) + deltas
    metrics = torch.max(new_max_load, new_other_load)
    is_max = torch.arange(num_packs, device=weights.device).unsqueeze(0) == max_pid.unsqueeze(1)
    is_max = is_max.view(num_layers, num_packs, 1, 1).expand(-1, -1, per_pack, per_pack)
    metrics.masked_fill_(is_max, float("inf"))

    best_metric, best_idx = torch.min(metrics.view(num_layers, -1), dim=1)
    improve_mask = best_metric < (max_load - 1e-5)
    if not improve_mask.any():
      break
    active = batch_idx[improve_mask]

    idx_flat = best_idx[improve_mask]
    p_other = idx_flat // (per_pack * per_pack)
    rem = idx_flat % (per_pack * per_pack)
    g_other = rem // per_pack
    g_max = rem % per_pack
    p_max = max_pid[active]

    item_max = pack_indices[active, p_max, g_max]
    item_other = pack_indices[active, p_other, g_other]
    pack_indices[active, p_max, g_max] = item_other
    pack_indices[active, p_other, g_other] = item_max
    d_val = weights[active, item_max] - weights[active, item_other]
    pack_weights[active, p_max] -= d_val
    pack_weights[active, p_other] += d_val
  return pack_indices


def balanced_packing_seed004(weight: torch.Tensor, num_packs: int) -> Pair:
  """Vectorised greedy packing refined by :func:`_refine_minmax`."""
  num_layers, num_groups = weight.shape
  device = weight.device
  if num_packs == num_groups:
    return _identity_packing(weight)
  groups_per_pack = num_groups // num_packs

  sorted_vals, sorted_indices = weight.sort(dim=1, descending=True)
  pack_weights = torch.zeros(num_layers, num_packs, device=device, dtype=weight.dtype)
  pack_counts = torch.zeros(num_layers, num_packs, device=device, dtype=torch.int64)
  pack_assignment = torch.zeros(
    num_layers, num_packs, groups_per_pack, dtype=torch.int64, device=device
  )
  batch_idx = torch.arange(num_layers, device=device)
  for i in range(num_groups):
    is_full = pack_counts >= groups_per_pack
    temp_weights = torch.where(is_full, torch.tensor(float("inf"), device=device), pack_weights)
    best_pack = torch.argmin(temp_weights, dim=1)
    slots = pack_counts[batch_idx, best_pack]
    pack_assignment[batch_idx, best_pack, slots] = sorted_indices[:, i]
    pack_weights[batch_idx, best_pack] += sorted_vals[:, i]
    pack_counts[batch_idx, best_pack] += 1

  pack_assignment = _refine_minmax(weight, pack_assignment, pack_weights, max_iters=50)
  return _scatter_packs(pack_assignment, num_groups)


def replicate_experts_seed004(weight: torch.Tensor, num_phy: int) -> Triple:
  """DeepSeek's replica counts, with slots laid out expert by expert (not identity first)."""
  n, num_log = weight.shape
  device = weight.device
  logcnt = torch.ones((n, num_log), dtype=torch.int64, device=device)
  phy2log = torch.empty((n, num_phy), dtype=torch.int64, device=device)
  rank = torch.empty((n, num_phy), dtype=torch.int64, device=device)
  rows = torch.arange(n, device=device)
  for _ in range(num_log, num_phy):
    best_expert = torch.argmax(weight / logcnt, dim=1)
    logcnt[rows, best_expert] += 1
  for i in range(n):
    c = logcnt[i]
    phy2log[i] = torch.repeat_interleave(torch.arange(num_log, device=device), c)
    curr = 0
    for idx in range(num_log):
      cnt = c[idx].item()
      rank[i, curr : curr + cnt] = torch.arange(cnt, device=device)
      curr += cnt
  return phy2log, rank, logcnt


# --- shared hierarchical policy and entry point --------------------------------------------------


def _inverse(perm: torch.Tensor) -> torch.Tensor:
  """Row-wise inverse of a ``[X, n]`` permutation."""
  inv = torch.empty_like(perm)
  arange = torch.arange(perm.size(1), dtype=torch.int64, device=perm.device)
  inv.scatter_(1, perm, arange.expand(perm.shape))
  return inv


def _hierarchical(
  weight: torch.Tensor,
  num_physical_experts: int,
  num_groups: int,
  num_nodes: int,
  num_gpus: int,
  balanced_packing: PackFn,
  replicate_experts: ReplicateFn,
) -> Triple:
  """DeepSeek's ``rebalance_experts_hierarchical`` with pluggable packing and replication.

  ``weight`` is ``[layers, num_logical]``; returns ``phy2log`` and ``phyrank``
  ``[layers, num_physical_experts]`` and ``logcnt`` ``[layers, num_logical]``.
  """
  num_layers, num_logical_experts = weight.shape
  assert num_logical_experts % num_groups == 0
  group_size = num_logical_experts // num_groups
  assert num_groups % num_nodes == 0
  groups_per_node = num_groups // num_nodes
  assert num_gpus % num_nodes == 0
  assert num_physical_experts % num_gpus == 0
  phy_experts_per_gpu = num_physical_experts // num_gpus

  # Step 1: pack groups to nodes.
  tokens_per_group = weight.unflatten(-1, (num_groups, group_size)).sum(-1)
  group_pack_index, group_rank_in_pack = balanced_packing(tokens_per_group, num_nodes)
  log2mlog = (
    ((group_pack_index * groups_per_node + group_rank_in_pack) * group_size).unsqueeze(-1)
    + torch.arange(group_size, dtype=torch.int64, device=group_pack_index.device)
  ).flatten(-2)
  mlog2log = _inverse(log2mlog)

  # Step 2: construct redundant experts within nodes.
  tokens_per_mlog = weight.gather(-1, mlog2log).view(-1, num_logical_experts // num_nodes)
  phy2mlog, phyrank, mlogcnt = replicate_experts(tokens_per_mlog, num_physical_experts // num_nodes)

  # Step 3: pack physical experts to GPUs.
  tokens_per_phy = (tokens_per_mlog / mlogcnt).gather(-1, phy2mlog)
  pack_index, rank_in_pack = balanced_packing(tokens_per_phy, num_gpus // num_nodes)
  phy2pphy = pack_index * phy_experts_per_gpu + rank_in_pack
  pphy2phy = _inverse(phy2pphy)

  pphy2mlog = phy2mlog.gather(-1, pphy2phy)
  node_offset = torch.arange(
    0, num_logical_experts, num_logical_experts // num_nodes, device=group_pack_index.device
  )
  pphy2mlog = (pphy2mlog.view(num_layers, num_nodes, -1) + node_offset.view(1, -1, 1)).flatten(-2)
  pphy2log = mlog2log.gather(-1, pphy2mlog)
  pphyrank = phyrank.gather(-1, pphy2phy).view(num_layers, -1)
  logcnt = mlogcnt.view(num_layers, -1).gather(-1, log2mlog)
  return pphy2log, pphyrank, logcnt


def _rebalance(
  weight: torch.Tensor,
  num_replicas: int,
  num_groups: int,
  num_nodes: int,
  num_gpus: int,
  *,
  balanced_packing: PackFn,
  replicate_experts: ReplicateFn,
  to_cpu: bool,
) -> Triple:
  """DeepSeek's ``rebalance_experts`` entry point with pluggable packing and replication.

  ``weight`` is ``[layers, num_logical]``. Returns ``phy2log`` ``[layers,
  num_replicas]``, ``log2phy`` ``[layers, num_logical, num_replicas - num_logical
  + 1]`` (-1 padded) and ``logcnt`` ``[layers, num_logical]``, all int64. The
  hierarchical policy is used when ``num_groups % num_nodes == 0``, else the
  global one (``1, 1, num_gpus``).
  """
  num_layers, num_logical_experts = weight.shape
  weight = weight.float().cpu() if to_cpu else weight.float()
  fns = dict(balanced_packing=balanced_packing, replicate_experts=replicate_experts)
  if num_groups % num_nodes == 0:
    phy2log, phyrank, logcnt = _hierarchical(
      weight, num_replicas, num_groups, num_nodes, num_gpus, **fns
    )
  else:
    phy2log, phyrank, logcnt = _hierarchical(weight, num_replicas, 1, 1, num_gpus, **fns)
  maxlogcnt = num_replicas - num_logical_experts + 1
  log2phy = torch.full(
    (num_layers, num_logical_experts, maxlogcnt), -1, dtype=torch.int64, device=logcnt.device
  )
  log2phy.view(num_layers, -1).scatter_(
    -1,
    phy2log * maxlogcnt + phyrank,
    torch.arange(num_replicas, dtype=torch.int64, device=log2phy.device).expand(num_layers, -1),
  )
  return phy2log, log2phy, logcnt


RebalanceFn = Callable[[torch.Tensor, int, int, int, int], Triple]

POLICIES: dict[str, RebalanceFn] = {
  "original": functools.partial(
    _rebalance,
    balanced_packing=balanced_packing_original,
    replicate_experts=replicate_experts_original,
    to_cpu=True,
  ),
  "seed000": functools.partial(
    _rebalance,
    balanced_packing=balanced_packing_seed000,
    replicate_experts=replicate_experts_seed000,
    to_cpu=False,
  ),
  "seed004": functools.partial(
    _rebalance,
    balanced_packing=balanced_packing_seed004,
    replicate_experts=replicate_experts_seed004,
    to_cpu=True,
  ),
}
