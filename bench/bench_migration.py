"""Benchmark: migration-aware vs fresh rebalancing on a drifting workload.

Loads evolve window to window: every expert's load is multiplied by a
log-normal factor (``drift`` is its sigma, 5-20%), and now and then a layer's
hottest expert hands its load to another expert (a hot-expert shift). At each
window ``t`` both policies rebalance on the loads of ``t``:

* *fresh*: ``eplb_jax.rebalance_experts`` from scratch;
* *migration-aware*: ``eplb_jax.rebalance_with_previous`` from the
  placement it returned at ``t - 1``.

Reported per model shape and drift: the replicas moved onto GPUs over the run
(``migration_cost``), the mean balancedness (mean / max GPU load, averaged over
layers and windows) on the window the placement was computed from, and on the
next window's loads (the protocol of published EPLB evaluators: rebalance on
``t``, serve ``t + 1``), and, for context, that of never rebalancing.

Usage: ``python bench/bench_migration.py [--steps 20] [--plot bench/out/migration.png]``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")

import numpy as np  # noqa: E402

import eplb_jax  # noqa: E402
from eplb_jax import metrics  # noqa: E402
from eplb_jax import workloads  # noqa: E402

SHAPES = ("deepseek-v3-prefill", "qwen3-30b-a3b", "kimi-k2")
DRIFTS = (0.05, 0.10, 0.20)


def drifting_loads(
  shape: workloads.Shape, num_windows: int, drift: float, shift_prob: float, seed: int
) -> np.ndarray:
  """Loads ``[T, L, E]`` of ``num_windows`` consecutive windows.

  Each window multiplies the previous one by ``exp(N(0, drift))`` per expert;
  with probability ``shift_prob`` per layer, the layer's hottest expert then
  swaps its load with a random other expert.
  """
  rng = np.random.default_rng(seed)
  loads = workloads.skewed_loads(shape.num_layers, shape.num_experts, seed=seed)
  windows = [loads]
  for _ in range(num_windows - 1):
    loads = loads * np.exp(rng.normal(0.0, drift, loads.shape))
    for layer in np.flatnonzero(rng.random(shape.num_layers) < shift_prob):
      hot, other = int(np.argmax(loads[layer])), int(rng.integers(shape.num_experts))
      loads[layer, [hot, other]] = loads[layer, [other, hot]]
    windows.append(loads.astype(np.float32))
  return np.stack(windows)


def _balancedness(weight, phy2log, logcnt, num_gpus) -> np.ndarray:
  return np.asarray(
    metrics.layer_balancedness(metrics.gpu_loads(weight, phy2log, logcnt, num_gpus))
  )


def run(
  shape: workloads.Shape, drift: float, steps: int, shift_prob: float, seed: int, tolerance: float
) -> dict:
  """Runs ``steps`` rebalances with both policies; returns per-step series."""
  sizes, num_gpus = shape.sizes, shape.num_gpus
  loads = drifting_loads(shape, steps + 2, drift, shift_prob, seed)
  start = eplb_jax.rebalance_experts(loads[0], *sizes)
  placements = {"fresh": start, "migration": start}
  series = {
    key: []
    for key in (
      "moved_fresh",
      "moved_migration",
      "changed_fresh",
      "changed_migration",
      "bal_fresh",
      "bal_migration",
      "next_fresh",
      "next_migration",
      "next_static",
      "peak_ratio",
      "seconds_fresh",
      "seconds_migration",
    )
  }
  for t in range(1, steps + 1):
    weight, upcoming = loads[t], loads[t + 1]
    tic = time.perf_counter()
    fresh = eplb_jax.rebalance_experts(weight, *sizes)
    fresh[0].block_until_ready()
    series["seconds_fresh"].append(time.perf_counter() - tic)
    tic = time.perf_counter()
    aware = eplb_jax.rebalance_with_previous(
      weight, *sizes, placements["migration"][0], tolerance=tolerance
    )
    aware[0].block_until_ready()
    series["seconds_migration"].append(time.perf_counter() - tic)
    for name, new in (("fresh", fresh), ("migration", aware)):
      moved, changed = eplb_jax.migration_cost(placements[name][0], new[0], num_gpus)
      series[f"moved_{name}"].append(int(moved.sum()))
      series[f"changed_{name}"].append(int(changed.sum()))
      series[f"bal_{name}"].append(_balancedness(weight, new[0], new[2], num_gpus).mean())
      series[f"next_{name}"].append(_balancedness(upcoming, new[0], new[2], num_gpus).mean())
      placements[name] = new
    series["next_static"].append(_balancedness(upcoming, start[0], start[2], num_gpus).mean())
    peak = [
      np.asarray(metrics.gpu_loads(weight, p[0], p[2], num_gpus)).max(-1) for p in (aware, fresh)
    ]
    series["peak_ratio"].append(float((peak[0] / peak[1]).max()))
  return {key: np.array(value) for key, value in series.items()}


def _plot(results: dict, path: pathlib.Path) -> None:
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed: no plot")
    return
  shapes = sorted({shape for shape, _ in results}, key=SHAPES.index)
  fig, axes = plt.subplots(2, len(shapes), figsize=(5 * len(shapes), 7), squeeze=False)
  for column, shape in enumerate(shapes):
    top, bottom = axes[0, column], axes[1, column]
    runs = [(drift, series) for (name, drift), series in results.items() if name == shape]
    for color, (drift, series) in enumerate(runs):
      steps = np.arange(1, len(series["moved_fresh"]) + 1)
      for policy, style in (("fresh", "--"), ("migration", "-")):
        label = f"{policy}, drift {drift:.0%}"
        moved = np.cumsum(series[f"moved_{policy}"])
        top.plot(steps, moved, style, color=f"C{color}", label=label)
        bottom.plot(steps, series[f"next_{policy}"], style, color=f"C{color}", label=label)
    top.set(title=shape, xlabel="rebalance", ylabel="cumulative replicas moved")
    bottom.set(xlabel="rebalance", ylabel="balancedness on the next window")
    top.legend(fontsize=7)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  print(f"plot written to {path}")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=20, help="rebalances per run")
  parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
  parser.add_argument("--drifts", nargs="+", type=float, default=list(DRIFTS))
  parser.add_argument("--shift-prob", type=float, default=0.05, help="hot-expert shifts per layer")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--tolerance", type=float, default=1e-3, help="allowed peak excess")
  default_plot = pathlib.Path(__file__).parent / "out" / "migration.png"
  parser.add_argument("--plot", type=pathlib.Path, default=default_plot)
  args = parser.parse_args(argv)

  header = (
    f"{'shape':<20} {'drift':>5} {'moved fresh':>11} {'moved mig':>9} {'ratio':>6} "
    f"{'bal fresh':>9} {'bal mig':>8} {'next fresh':>10} {'next mig':>8} {'next static':>11} "
    f"{'peak mig/fresh':>14} {'ms fresh':>8} {'ms mig':>7}"
  )
  print(f"{args.steps} rebalances per run; moved = replicas arriving on a GPU, summed over the run")
  print(header)
  results = {}
  tic = time.perf_counter()
  for name in args.shapes:
    for drift in args.drifts:
      series = run(
        workloads.SHAPES[name], drift, args.steps, args.shift_prob, args.seed, args.tolerance
      )
      results[name, drift] = series
      moved_fresh, moved_mig = series["moved_fresh"].sum(), series["moved_migration"].sum()
      # The first timed call of a shape includes compilation: report the median.
      print(
        f"{name:<20} {drift:>5.0%} {moved_fresh:>11} {moved_mig:>9} "
        f"{moved_mig / moved_fresh:>6.3f} {series['bal_fresh'].mean():>9.5f} "
        f"{series['bal_migration'].mean():>8.5f} {series['next_fresh'].mean():>10.5f} "
        f"{series['next_migration'].mean():>8.5f} {series['next_static'].mean():>11.5f} "
        f"{series['peak_ratio'].max():>14.5f} "
        f"{1e3 * np.median(series['seconds_fresh']):>8.1f} "
        f"{1e3 * np.median(series['seconds_migration']):>7.1f}"
      )
  print(f"total {time.perf_counter() - tic:.0f}s")
  _plot(results, args.plot)


if __name__ == "__main__":
  main()
