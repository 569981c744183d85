"""The GPU-aware mode's documented properties: valid, never heavier than greedy, few duplicates."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import check_hierarchy
from conftest import check_placement
from conftest import loads

import eplb_jax
from eplb_jax import metrics
from eplb_jax import workloads
from eplb_jax._src.modes import gpu_aware

# (layers, experts, num_replicas, num_groups, num_nodes, num_gpus)
CONFIGS = {
  "hierarchical": (2, 32, 40, 8, 4, 8),
  "three-groups-per-node": (2, 24, 36, 6, 2, 6),
  "global": (3, 24, 32, 1, 2, 8),
  "more-spare-slots-than-experts": (2, 4, 80, 2, 2, 4),
  "hierarchical-no-spare": (2, 24, 24, 4, 2, 4),
  "global-no-spare": (2, 24, 24, 1, 2, 8),
}


def _weight(kind: str, shape: tuple[int, int], seed: int) -> np.ndarray:
  """The shared load kinds, plus heavy tails (Pareto 1.5, log-normal sigma 2)."""
  rng = np.random.default_rng(seed)
  if kind == "pareto":
    return (1000 * (rng.pareto(1.5, shape) + 1)).astype(np.float32)
  if kind == "sigma2":
    return workloads.skewed_loads(*shape, seed=seed, sigma=2.0)
  return np.asarray(loads(kind, shape, seed), np.float32)


def _removable_duplicates(weight, phy2log, logcnt, gpus_per_domain: int, num_gpus: int) -> int:
  """Duplicates that one exchange could separate without raising the domain's heaviest GPU."""
  found = 0
  for w, experts, count in zip(weight, phy2log, logcnt, strict=True):
    per_replica = w.astype(np.float64) / count
    gpus = experts.reshape(num_gpus, -1)
    load = per_replica[gpus].sum(1)
    for first in range(0, num_gpus, gpus_per_domain):
      domain = range(first, first + gpus_per_domain)
      limit = load[list(domain)].max()
      for p in domain:
        values, copies = np.unique(gpus[p], return_counts=True)
        for e in values[copies > 1]:
          for q in domain:
            if q == p or e in gpus[q]:
              continue
            for f in gpus[q]:
              if f in gpus[p]:
                continue
              shift = per_replica[e] - per_replica[f]
              if max(load[p] - shift, load[q] + shift) <= limit * (1 - 1e-6):
                found += 1
  return found


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_valid_never_heavier_than_greedy_and_duplicates_only_where_needed(config):
  num_layers, num_experts, num_replicas, num_groups, num_nodes, num_gpus = config
  sizes = config[2:]
  hierarchical = num_groups % num_nodes == 0
  gpus_per_domain = num_gpus // num_nodes if hierarchical else num_gpus
  for kind in ("skewed", "sigma2", "pareto", "tied", "one-hot", "zero"):
    for seed in range(2):
      weight = _weight(kind, (num_layers, num_experts), seed)
      placement = eplb_jax.rebalance_experts(weight, *sizes)
      greedy = eplb_jax.rebalance_experts(weight, *sizes, mode="greedy")
      try:
        check_placement(*placement, num_experts, num_replicas, num_layers)
        if hierarchical:
          check_hierarchy(placement.phy2log, num_experts, num_replicas, num_groups, num_nodes)
        peak = np.asarray(placement.gpu_loads(weight, num_gpus)).max(1)
        greedy_peak = np.asarray(greedy.gpu_loads(weight, num_gpus)).max(1)
        assert np.all(peak <= greedy_peak * (1 + 1e-6)), (peak, greedy_peak)
        phy2log, logcnt = np.asarray(placement.phy2log), np.asarray(placement.logcnt)
        assert _removable_duplicates(weight, phy2log, logcnt, gpus_per_domain, num_gpus) == 0
      except AssertionError as error:
        raise AssertionError(f"{kind} loads, seed {seed}") from error


def test_counts_for_the_heaviest_gpu_beat_water_filling():
  """On heavily skewed loads the counts, not the packing, limit balance: the default is
  well above greedy and refined (both water-filling), per layer never below greedy."""
  num_layers, num_experts, *sizes = CONFIGS["hierarchical"]
  balance = {}
  for mode in ("greedy", "refined", "gpu_aware"):
    per_seed = []
    for seed in range(4):
      weight = workloads.skewed_loads(num_layers, num_experts, seed=seed, sigma=2.0)
      gpu_loads = eplb_jax.rebalance_experts(weight, *sizes, mode=mode).gpu_loads(weight, sizes[-1])
      per_seed.append(float(metrics.balancedness(gpu_loads)))
    balance[mode] = np.mean(per_seed)
  assert balance["gpu_aware"] > max(balance["greedy"], balance["refined"]) + 0.01, balance


def test_candidates():
  """Candidate j: the first R - j water-filling picks, then +1 for the j heaviest singles."""
  assert gpu_aware.sweep(0) == (0,)
  assert gpu_aware.sweep(8) == (0, 1, 2, 3, 4)
  assert gpu_aware.sweep(64) == (0, 1, 2, 3, 4, 8, 16, 32)
  # 4 spare slots: water-filling gives expert 0 (load 12) four more replicas
  # (12 / 5 = 2.4 is still above the 2 of expert 1).
  weight = jnp.array([12.0, 2.0, 1.5, 1.0, 0.5], jnp.float32)
  got, extra, rank = (np.asarray(x) for x in gpu_aware.candidate_counts(weight, 9, (0, 1, 2)))
  np.testing.assert_array_equal(got, [[5, 1, 1, 1, 1], [4, 2, 1, 1, 1], [3, 2, 2, 1, 1]])
  np.testing.assert_array_equal(extra, [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 2]])
  np.testing.assert_array_equal(rank, [[1, 2, 3, 4], [1, 2, 3, 1], [1, 2, 1, 1]])


def test_bad_knobs_are_named():
  with pytest.raises(ValueError, match="greedy_steps must be a non-negative int"):
    eplb_jax.GpuAware(greedy_steps=-1)
  with pytest.raises(ValueError, match="greedy_steps must be a non-negative int"):
    eplb_jax.GpuAware(greedy_steps=1.5)
  with pytest.raises(ValueError, match="refined must be a Refined instance"):
    eplb_jax.GpuAware(refined="refined")
  assert eplb_jax.GpuAware(refined=eplb_jax.Refined(max_steps=8)) != eplb_jax.GpuAware()
