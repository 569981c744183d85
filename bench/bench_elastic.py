"""Benchmark: gated rebalancing on drifting loads, and a failed GPU, on DeepSeek-V3 prefill.

*Gating*: loads drift window to window (:func:`bench_migration.drifting_loads`,
10% drift); at each window ``eplb_jax.gated_rebalance`` rebalances, from the
placement in service, only the layers whose heaviest GPU is more than
``threshold`` above the new placement's. Reported per threshold: the share of
layer rebalances skipped, the replicas moved over the run, and the mean
balancedness on the window each placement was made for and on the next one
(threshold 0 is the ungated migration-aware policy up to exact ties).

*Failed GPU*: the healthy placement of the first window is in service when
GPU 3 fails; reported for the fresh placement on the 31 survivors and for the
migration-aware one from the healthy placement: replicas moved onto GPUs (the
experts whose replicas were all on the failed GPU must move in any case: the
forced moves) and the balancedness over the active GPUs; with tolerances of
1%, 10% and 99% (the last: as few moves as the placement in service allows).

Usage: ``python bench/bench_elastic.py [--steps 20]``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")

import numpy as np  # noqa: E402
from bench_migration import drifting_loads  # noqa: E402

import eplb_jax  # noqa: E402
from eplb_jax import metrics  # noqa: E402
from eplb_jax import workloads  # noqa: E402

SHAPE = workloads.SHAPES["deepseek-v3-prefill"]
THRESHOLDS = (0.0, 0.01, 0.02, 0.05)


def _balancedness(placement, weight, topology) -> float:
  loads = placement.gpu_loads(weight, topology.num_gpus)[:, np.asarray(topology.active_gpus)]
  return float(metrics.balancedness(loads))


def gating(steps: int) -> None:
  topology = SHAPE.topology
  loads = drifting_loads(SHAPE, steps + 1, 0.10, 0.05, seed=0)
  print("| threshold | layer rebalances skipped | replicas moved | balancedness | next window |")
  print("|---:|---:|---:|---:|---:|")
  for threshold in THRESHOLDS:
    current = eplb_jax.rebalance(loads[0], topology).phy2log
    skipped, moved, now, following = 0, 0, [], []
    for t in range(1, steps):
      gated = eplb_jax.gated_rebalance(loads[t], topology, current, threshold)
      skipped += int(np.sum(~np.asarray(gated.rebalanced)))
      moved += int(
        eplb_jax.migration_cost(current, gated.placement.phy2log, SHAPE.num_gpus)[0].sum()
      )
      now.append(_balancedness(gated.placement, loads[t], topology))
      following.append(_balancedness(gated.placement, loads[t + 1], topology))
      current = gated.placement.phy2log
    total = (steps - 1) * SHAPE.num_layers
    print(
      f"| {threshold:g} | {skipped / total:.1%} | {moved} | {np.mean(now):.4f} | "
      f"{np.mean(following):.4f} |"
    )


def unserved(phy2log, topology) -> np.ndarray:
  """``[L]``: experts whose replicas were all on the failed GPUs (each must move)."""
  phy2log = np.asarray(phy2log)
  gpu = np.arange(phy2log.shape[1]) // topology.slots_per_gpu
  dead = np.isin(gpu, topology.failed_gpus)
  return np.array([len(set(layer[dead]) - set(layer[~dead])) for layer in phy2log])


def failed_gpu() -> None:
  weight = workloads.skewed_loads(SHAPE.num_layers, SHAPE.num_experts, seed=0)
  healthy = eplb_jax.rebalance(weight, SHAPE.topology)
  print(f"healthy placement: balancedness {_balancedness(healthy, weight, SHAPE.topology):.4f}")
  print("| failed GPUs | policy | forced moves | placement | replicas moved | balancedness |")
  print("|---|---|---:|---|---:|---:|")
  runs = [("fresh", None, None), ("migration-aware", healthy.phy2log, None)]
  runs += [(f"migration-aware, tolerance {t:g}", healthy.phy2log, t) for t in (0.01, 0.1, 0.99)]
  for failed in ((3,), (3, 17)):
    topology = eplb_jax.Topology(*SHAPE.sizes, failed_gpus=failed)
    forced = int(unserved(healthy.phy2log, topology).sum())
    for name, previous, tolerance in runs:
      kwargs = {} if tolerance is None else {"tolerance": tolerance}
      placement = eplb_jax.rebalance(weight, topology, previous_phy2log=previous, **kwargs)
      moved = eplb_jax.migration_cost(healthy.phy2log, placement.phy2log, SHAPE.num_gpus)[0]
      print(
        f"| {', '.join(map(str, failed))} | {topology.survivors().policy} | {forced} | {name} | "
        f"{int(moved.sum())} | {_balancedness(placement, weight, topology):.4f} |"
      )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args()
  print(f"DeepSeek-V3 prefill ({SHAPE.num_layers} layers), {args.steps} windows, 10% drift")
  gating(args.steps)
  failed_gpu()


if __name__ == "__main__":
  main()
