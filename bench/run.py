"""Benchmark eplb_jax against the PyTorch DeepSeek balancer and the two seeds.

Runs every method on the built-in shapes (eplb_jax.workloads.SHAPES) with the
same skewed loads, in one process on one CPU core, and prints a Markdown table:
balancedness (mean / max GPU load, mean over layers), max load over the lower
bound, best-of-repeats milliseconds per call, speed-up over the vectorised seed
000 and over DeepSeek's loop-based original, and JAX compile time.

    python bench/run.py                    # everything (torch optional)
    python bench/run.py --shapes kimi-k2 --no-torch

torch (the `bench` extra) is optional: without it only the JAX rows run.
"""

from __future__ import annotations

import os

# One core for JAX too: the comparison is per core. Must precede the jax import.
os.environ.setdefault(
  "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

import argparse  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import eplb_jax  # noqa: E402
from eplb_jax import metrics  # noqa: E402
from eplb_jax import workloads  # noqa: E402

Maps = tuple[np.ndarray, np.ndarray, np.ndarray]


def _time(fn: Callable[[], Maps], repeats: int) -> tuple[Maps, float]:
  """Returns the result and the best wall time in ms of ``repeats`` calls.

  The best time, not the median: on a shared machine it is the least
  disturbed by other work, for every method alike.
  """
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    times.append(1e3 * (time.perf_counter() - start))
  return out, min(times)


def _jax_method(mode: str, shape: workloads.Shape, repeats: int):
  def run(weight):
    call = lambda: jax.block_until_ready(  # noqa: E731
      eplb_jax.rebalance_experts(weight, *shape.sizes, mode=mode)
    )
    start = time.perf_counter()
    call()
    compile_s = time.perf_counter() - start
    out, ms = _time(call, repeats)
    return [np.asarray(x) for x in out], ms, compile_s

  return run


def _torch_method(policy: Callable, shape: workloads.Shape, repeats: int):
  import torch

  def run(weight):
    tensor = torch.from_numpy(weight)
    out, ms = _time(lambda: policy(tensor, *shape.sizes), repeats)
    return [x.numpy() for x in out], ms, None

  return run


def _methods(shape: workloads.Shape, args) -> dict[str, Callable]:
  methods = {
    "eplb_jax greedy": _jax_method("greedy", shape, args.repeats),
    "eplb_jax refined": _jax_method("refined", shape, args.repeats),
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
    repeats = 1 if name == "original" else args.repeats
    methods[f"torch {name}"] = _torch_method(torch_reference.POLICIES[name], shape, repeats)
  return methods


def run_shape(shape: workloads.Shape, args) -> list[dict]:
  weight = workloads.skewed_loads(shape.num_layers, shape.num_experts, seed=args.seed)
  bound = metrics.lower_bound(weight, shape.num_replicas, shape.num_gpus)
  rows = []
  for name, method in _methods(shape, args).items():
    (phy2log, _, logcnt), ms, compile_s = method(weight)
    loads = metrics.gpu_loads(weight, phy2log, logcnt, shape.num_gpus)
    rows.append(
      dict(
        shape=shape.name,
        method=name,
        balancedness=float(metrics.balancedness(loads)),
        bound_ratio=float(metrics.bound_ratio(loads, bound)),
        ms=ms,
        compile_s=compile_s,
      )
    )
  times = {row["method"]: row["ms"] for row in rows}
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
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-torch", action="store_true", help="JAX rows only")
  parser.add_argument("--plot", type=pathlib.Path, default=pathlib.Path("bench/out/bench.png"))
  parser.add_argument("--markdown", type=pathlib.Path, help="also write the table here")
  args = parser.parse_args()
  rows = []
  for name in args.shapes:
    rows += run_shape(workloads.SHAPES[name], args)
  table = markdown(rows)
  header = f"jax {jax.__version__} on {jax.devices()[0].device_kind}, one core, seed {args.seed}"
  print(header, table, sep="\n\n")
  if args.markdown:
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(f"{header}\n\n{table}\n")
  plot(rows, args.plot)


if __name__ == "__main__":
  main()
