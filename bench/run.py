"""Benchmark eplb_jax against the PyTorch DeepSeek balancer and the two seeds.

Runs every method on the built-in shapes (eplb_jax.workloads.SHAPES) with the
same skewed loads, in one process, timed on one CPU core (bench/one_core.py),
and prints a Markdown table: balancedness (mean / max GPU load, mean over
layers), max load over the lower bound, best-of-repeats milliseconds per call,
speed-up over the vectorised seed 000 and over DeepSeek's loop-based original,
and JAX compile time (the first call, on all cores).

    python bench/run.py                    # everything (torch optional)
    python bench/run.py --shapes kimi-k2 --no-torch

torch (the `bench` extra) is optional: without it only the JAX rows run.
"""

from __future__ import annotations

import one_core  # first: XLA flags for one core

# isort: split

import argparse
import pathlib
import sys
import time
from collections.abc import Callable

import jax
import numpy as np

import eplb_jax
from eplb_jax import metrics
from eplb_jax import workloads

Maps = tuple[np.ndarray, np.ndarray, np.ndarray]
Call = Callable[[], Maps]


def _jax_method(mode: str, shape: workloads.Shape):
  """Prepares ``rebalance_experts`` on given loads: ``(call, compile seconds)``."""

  def prepare(weight: np.ndarray) -> tuple[Call, float]:
    def call():
      return jax.block_until_ready(eplb_jax.rebalance_experts(weight, *shape.sizes, mode=mode))

    start = time.perf_counter()
    call()
    return call, time.perf_counter() - start

  return prepare


def _torch_method(policy: Callable, shape: workloads.Shape):
  import torch

  def prepare(weight: np.ndarray) -> tuple[Call, None]:
    tensor = torch.from_numpy(weight)
    return (lambda: policy(tensor, *shape.sizes)), None

  return prepare


def _methods(shape: workloads.Shape, args) -> dict[str, Callable]:
  methods = {
    "eplb_jax greedy": _jax_method("greedy", shape),
    "eplb_jax refined": _jax_method("refined", shape),
    "eplb_jax gpu_aware": _jax_method("gpu_aware", shape),
  }
  if args.no_torch:
    return methods
  try:
    import torch

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import torch_reference
  except ImportError:
    print("torch not installed: JAX rows only (pip install '.[bench]')", file=sys.stderr)
    return methods
  torch.set_num_threads(1)
  for name in ("seed000", "seed004", "original"):
    methods[f"torch {name}"] = _torch_method(torch_reference.POLICIES[name], shape)
  return methods


def _best_times(calls: dict[str, Call], repeats: dict[str, int], rounds: int):
  """Each call's result and best wall time in ms on one core.

  The calls take turns, ``repeats[name]`` calls each per round, so every
  method gets the same share of a shared machine's quiet and busy spells;
  the best time, not the median, is the least disturbed by other work.
  """
  results, best = {}, dict.fromkeys(calls, float("inf"))
  with one_core.pinned():
    for _ in range(rounds):
      for name, call in calls.items():
        for _ in range(repeats[name]):
          start = time.perf_counter()
          results[name] = call()
          best[name] = min(best[name], 1e3 * (time.perf_counter() - start))
  return results, best


def run_shape(shape: workloads.Shape, args) -> list[dict]:
  weight = workloads.skewed_loads(shape.num_layers, shape.num_experts, seed=args.seed)
  bound = metrics.lower_bound(weight, shape.topology)
  prepared = {name: prepare(weight) for name, prepare in _methods(shape, args).items()}
  per_round = max(1, args.repeats // args.rounds)
  repeats = {name: 1 if name == "torch original" else per_round for name in prepared}
  calls = {name: call for name, (call, _) in prepared.items()}
  results, times = _best_times(calls, repeats, args.rounds)
  rows = []
  for name, (_, compile_s) in prepared.items():
    phy2log, _, logcnt = (np.asarray(x) for x in results[name])
    loads = metrics.gpu_loads(weight, phy2log, logcnt, shape.num_gpus)
    rows.append(
      dict(
        shape=shape.name,
        method=name,
        balancedness=float(metrics.balancedness(loads)),
        bound_ratio=float(metrics.bound_ratio(loads, bound)),
        ms=times[name],
        compile_s=compile_s,
      )
    )
  for row in rows:
    for base in ("seed000", "original"):
      base_ms = times.get(f"torch {base}")
      row[f"x_{base}"] = base_ms / row["ms"] if base_ms else None
  return rows


def markdown(rows: list[dict]) -> str:
  def fmt(value, spec):
    return "-" if value is None else format(value, spec)

  lines = [
    "| shape | method | balancedness | max / bound | ms | x seed000 | x original | compile s |",
    "|---|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    lines.append(
      f"| {r['shape']} | {r['method']} | {r['balancedness']:.4f} | {r['bound_ratio']:.4f} "
      f"| {r['ms']:.2f} | {fmt(r['x_seed000'], '.1f')} | {fmt(r['x_original'], '.0f')} "
      f"| {fmt(r['compile_s'], '.2f')} |"
    )
  return "\n".join(lines)


def plot(rows: list[dict], path: pathlib.Path) -> None:
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib not installed: no plot", file=sys.stderr)
    return
  shapes = list(dict.fromkeys(r["shape"] for r in rows))
  methods = list(dict.fromkeys(r["method"] for r in rows))
  fig, (ax_bal, ax_ms) = plt.subplots(1, 2, figsize=(14, 5))
  width = 0.8 / len(methods)
  for i, method in enumerate(methods):
    by_shape = {r["shape"]: r for r in rows if r["method"] == method}
    xs = [j + i * width for j, s in enumerate(shapes) if s in by_shape]
    ax_bal.bar(xs, [by_shape[s]["balancedness"] for s in shapes if s in by_shape], width)
    ax_ms.bar(xs, [by_shape[s]["ms"] for s in shapes if s in by_shape], width, label=method)
  for ax, title in ((ax_bal, "balancedness (higher is better)"), (ax_ms, "ms per call (log)")):
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, rotation=20)
    ax.set_title(title)
  ax_bal.set_ylim(min(r["balancedness"] for r in rows) - 0.02, 1.0)
  ax_ms.set_yscale("log")
  ax_ms.legend(fontsize=8)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  print(f"plot: {path}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", nargs="*", default=list(workloads.SHAPES))
  parser.add_argument("--repeats", type=int, default=40, help="timed calls per method")
  parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of them")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-torch", action="store_true", help="JAX rows only")
  parser.add_argument("--plot", type=pathlib.Path, default=pathlib.Path("bench/out/bench.png"))
  parser.add_argument("--markdown", type=pathlib.Path, help="also write the table here")
  args = parser.parse_args()
  rows = []
  for name in args.shapes:
    rows += run_shape(workloads.SHAPES[name], args)
  table = markdown(rows)
  header = (
    f"jax {jax.__version__} on {jax.devices()[0].device_kind}, one core, seed {args.seed}; "
    f"best of {args.repeats} calls in {args.rounds} interleaved rounds (original: one a round)"
  )
  one_core.report(header, table, args.markdown)
  plot(rows, args.plot)


if __name__ == "__main__":
  main()
