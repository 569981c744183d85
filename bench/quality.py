"""Placement quality on load families the package was not tuned on, and the default's cost.

For every shape and family (``bench/families.py``) a two-window drifting
trace is drawn; each method places on window 0 and is scored on window 0
and on window 1 (the next window's loads, with drift and hot-expert shifts).
Methods: eplb_jax ``greedy`` (DeepSeek's placement), ``refined``, the
default ``gpu_aware``, and PyTorch seeds 000 and 004 (``torch_reference``).
Reported per (shape, family): balancedness (mean over layers of mean / max
GPU load), max GPU over the policy-aware lower bound (mean over layers), and
next-window balancedness; and per shape whether the default is at least
the best of greedy, seed 000 and seed 004 on every workload. Then, on the
built-in shapes and their skewed loads: one-core time per call of the
default, refined and seed 000 (interleaved, best of rounds), and the
compile time of the default and refined (first call minus second).

    python bench/quality.py --markdown bench/results/quality.md --plot bench/results/quality.png
"""

from __future__ import annotations

import one_core  # first: XLA flags for one core

# isort: split

import argparse
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np

import eplb_jax
from eplb_jax import metrics
from eplb_jax import workloads

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import families  # noqa: E402

# name: (layers, experts, num_replicas, num_groups, num_nodes, num_gpus)
SHAPES = {
  "deepseek-v3-prefill": (58, 256, 288, 8, 4, 32),
  "deepseek-v3-ep64": (58, 256, 320, 8, 8, 64),
  "v3-prefill-global": (58, 256, 288, 1, 4, 32),
  "qwen3-30b-a3b": (48, 128, 160, 1, 2, 16),
  "kimi-k2": (61, 384, 448, 1, 8, 64),
  "ep128-512e": (60, 512, 640, 8, 16, 128),
  "v3-prefill-no-spare": (58, 256, 256, 8, 4, 32),
  "qwen3-no-spare": (48, 128, 128, 1, 2, 16),
}
# The package's own generator at sigma 2 (the example), then the families.
FAMILIES = ("skewed-sigma2", *families.FAMILIES)
JAX_MODES = ("greedy", "refined", "gpu_aware")
TORCH_SEEDS = ("seed000", "seed004")
BASELINES = ("greedy", "seed000", "seed004")
# Balancedness within this of the best baseline counts as a tie (float32 rounding of the loads).
TIE = 1e-7


def policy_of(sizes) -> str:
  return eplb_jax.Topology(*sizes).policy


def trace(family: str, num_layers: int, num_experts: int, seed: int) -> np.ndarray:
  if family == "skewed-sigma2":
    start = workloads.skewed_loads(num_layers, num_experts, seed=seed, sigma=2.0)
    return families.drifting(family, 2, num_layers, num_experts, seed, start=start)
  return families.drifting(family, 2, num_layers, num_experts, seed)


def methods(torch_reference) -> dict:
  def jax_mode(mode):
    return lambda w, sizes: eplb_jax.rebalance_experts(w, *sizes, mode=mode)

  def torch_seed(name):
    import torch

    policy = torch_reference.POLICIES[name]
    return lambda w, sizes: policy(torch.from_numpy(w), *sizes)

  out = {mode: jax_mode(mode) for mode in JAX_MODES}
  if torch_reference is not None:
    out.update({name: torch_seed(name) for name in TORCH_SEEDS})
  return out


def layer_peaks(weight, phy2log, logcnt, num_gpus) -> np.ndarray:
  return np.asarray(metrics.gpu_loads(weight, np.asarray(phy2log), np.asarray(logcnt), num_gpus))


def quality(shapes, fams, seed, torch_reference) -> list[dict]:
  rows = []
  run = methods(torch_reference)
  for shape_name in shapes:
    num_layers, num_experts, *sizes = SHAPES[shape_name]
    num_gpus = sizes[-1]
    for family in fams:
      windows = trace(family, num_layers, num_experts, seed)
      bound = np.asarray(metrics.lower_bound(windows[0], eplb_jax.Topology(*sizes)))
      for name, fn in run.items():
        phy2log, _, logcnt = (np.asarray(x) for x in fn(windows[0], sizes))
        now = layer_peaks(windows[0], phy2log, logcnt, num_gpus)
        nxt = layer_peaks(windows[1], phy2log, logcnt, num_gpus)
        rows.append(
          dict(
            shape=shape_name,
            policy=policy_of(sizes),
            family=family,
            method=name,
            balancedness=float(metrics.balancedness(now)),
            bound_ratio=float(metrics.bound_ratio(now, bound)),
            next=float(metrics.balancedness(nxt)),
            peak=now.max(1),
          )
        )
      print(shape_name, family, flush=True)
  return rows


def compile_seconds(name: str, mode: str) -> float:
  """First call minus second call of a built-in shape, in a fresh process (cold caches)."""
  if __name__ != "__main__":
    raise RuntimeError("compile_seconds runs this file as a script")
  command = [sys.executable, __file__, "--child-compile", name, mode]
  done = subprocess.run(command, capture_output=True, text=True, check=True)
  return float(done.stdout.strip().splitlines()[-1])


def _child_compile(name: str, mode: str) -> None:
  shape = workloads.SHAPES[name]
  weight = workloads.skewed_loads(shape.num_layers, shape.num_experts, seed=0)
  times = []
  for _ in range(2):
    start = time.perf_counter()
    jax.block_until_ready(eplb_jax.rebalance_experts(weight, *shape.sizes, mode=mode))
    times.append(time.perf_counter() - start)
  print(times[0] - times[1])


def timing(shapes, torch_reference, rounds: int, repeats: int) -> list[dict]:
  rows = []
  for name in shapes:
    shape = workloads.SHAPES[name]
    weight = workloads.skewed_loads(shape.num_layers, shape.num_experts, seed=0)
    calls, compile_s = {}, {}
    for mode in ("gpu_aware", "refined"):

      def call(mode=mode, weight=weight, sizes=shape.sizes):
        return jax.block_until_ready(eplb_jax.rebalance_experts(weight, *sizes, mode=mode))

      call()
      compile_s[mode] = compile_seconds(name, mode)
      calls[mode] = call
    if torch_reference is not None:
      import torch

      tensor = torch.from_numpy(weight)
      policy = torch_reference.POLICIES["seed000"]
      calls["seed000"] = lambda p=policy, t=tensor, sizes=shape.sizes: p(t, *sizes)
    best = dict.fromkeys(calls, float("inf"))
    with one_core.pinned():
      for _ in range(rounds):
        for method, call in calls.items():
          for _ in range(repeats):
            start = time.perf_counter()
            call()
            best[method] = min(best[method], 1e3 * (time.perf_counter() - start))
    rows.append(dict(shape=name, ms=best, compile_s=compile_s))
    print(name, best, compile_s, flush=True)
  return rows


def _mean(rows, key, **match) -> float:
  return float(np.mean([r[key] for r in rows if all(r[k] == v for k, v in match.items())]))


def markdown(rows: list[dict], timed: list[dict], methods_run: list[str]) -> str:
  lines = []
  if rows:
    lines += ["## Quality (window 0 placement; next = the same placement on window 1's loads)", ""]
    lines.append(
      "| shape | policy | family | "
      + " | ".join(f"{m} bal / max:bound / next" for m in methods_run)
      + " |"
    )
    lines.append("|---|---|---|" + "---|" * len(methods_run))
    keys = list(dict.fromkeys((r["shape"], r["family"]) for r in rows))
    for shape, family in keys:
      cells = []
      best = max(
        _mean(rows, "balancedness", shape=shape, family=family, method=m)
        for m in methods_run
        if m != "gpu_aware"
      )
      for m in methods_run:
        bal = _mean(rows, "balancedness", shape=shape, family=family, method=m)
        ratio = _mean(rows, "bound_ratio", shape=shape, family=family, method=m)
        nxt = _mean(rows, "next", shape=shape, family=family, method=m)
        mark = "**" if m == "gpu_aware" and bal >= best - TIE else ""
        cells.append(f"{mark}{bal:.4f}{mark} / {ratio:.4f} / {nxt:.4f}")
      pol = next(r["policy"] for r in rows if r["shape"] == shape)
      lines.append(f"| {shape} | {pol} | {family} | " + " | ".join(cells) + " |")

    lines += ["", "## Default vs the best baseline (greedy, seed 000, seed 004), per workload", ""]
    lines.append(
      "| shape | workloads >= best baseline | layers heavier than greedy | "
      "gap closed (best baseline's max:bound -> 1, mean over families) |"
    )
    lines.append("|---|---:|---:|---:|")
    baselines = [m for m in BASELINES if m in methods_run]
    for shape in dict.fromkeys(r["shape"] for r in rows):
      fams = list(dict.fromkeys(r["family"] for r in rows if r["shape"] == shape))
      wins, heavier, layers, base_ratio, ratio = 0, 0, 0, [], []
      for family in fams:
        by = {r["method"]: r for r in rows if r["shape"] == shape and r["family"] == family}
        base = max(by[m]["balancedness"] for m in baselines)
        default = by["gpu_aware"]
        wins += default["balancedness"] >= base - TIE
        heavier += int((default["peak"] > by["greedy"]["peak"] * (1 + 1e-6)).sum())
        layers += default["peak"].size
        base_ratio.append(min(by[m]["bound_ratio"] for m in baselines))
        ratio.append(default["bound_ratio"])
      gap = np.mean(base_ratio) - 1
      gap = f"{100 * (np.mean(base_ratio) - np.mean(ratio)) / gap:.0f}%" if gap > 1e-4 else "-"
      lines.append(f"| {shape} | {wins} / {len(fams)} | {heavier} / {layers} | {gap} |")
  if timed:
    lines += ["", "## Cost (built-in shapes, skewed loads; one core, best of rounds)", ""]
    lines.append(
      "| shape | gpu_aware ms | refined ms | seed000 ms | gpu_aware x seed000 | "
      "gpu_aware / refined | compile s gpu_aware | compile s refined |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for t in timed:
      ms, cs = t["ms"], t["compile_s"]
      seed = ms.get("seed000")
      speedup = f"{seed / ms['gpu_aware']:.1f}" if seed else "-"
      seed_ms = f"{seed:.2f}" if seed else "-"
      lines.append(
        f"| {t['shape']} | {ms['gpu_aware']:.2f} | {ms['refined']:.2f} | {seed_ms} | "
        f"{speedup} | {ms['gpu_aware'] / ms['refined']:.1f} | {cs['gpu_aware']:.2f} | "
        f"{cs['refined']:.2f} |"
      )
  return "\n".join(lines)


def plot(rows: list[dict], methods_run: list[str], path: pathlib.Path) -> None:
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib not installed: no plot", file=sys.stderr)
    return
  shapes = list(dict.fromkeys(r["shape"] for r in rows))
  fig, axes = plt.subplots(1, 2, figsize=(15, 5))
  width = 0.8 / len(methods_run)
  for ax, key, title in (
    (axes[0], "bound_ratio", "max GPU / lower bound (lower is better), mean over families"),
    (axes[1], "next", "next-window balancedness (higher is better), mean over families"),
  ):
    for i, m in enumerate(methods_run):
      values = [_mean(rows, key, shape=s, method=m) for s in shapes]
      ax.bar([j + i * width for j in range(len(shapes))], values, width, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, rotation=25)
    ax.set_title(title, fontsize=10)
  low = min(_mean(rows, "next", shape=s, method=m) for s in shapes for m in methods_run)
  axes[1].set_ylim(max(0.0, low - 0.05), 1.0)
  axes[0].set_ylim(1.0, None)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  print(f"plot: {path}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
  parser.add_argument("--families", nargs="*", default=list(FAMILIES))
  parser.add_argument("--seed", type=int, default=1)
  parser.add_argument("--timing-shapes", nargs="*", default=list(workloads.SHAPES))
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=8)
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--skip-quality", action="store_true", help="cost section only")
  parser.add_argument("--child-compile", nargs=2, help=argparse.SUPPRESS)
  parser.add_argument("--markdown", type=pathlib.Path)
  parser.add_argument("--plot", type=pathlib.Path, default=pathlib.Path("bench/out/quality.png"))
  args = parser.parse_args()
  if args.child_compile:
    _child_compile(*args.child_compile)
    return
  torch_reference = None
  if not args.no_torch:
    try:
      import torch
      import torch_reference

      torch.set_num_threads(1)
    except ImportError:
      print("torch not installed: JAX rows only", file=sys.stderr)
  methods_run = list(methods(torch_reference))
  rows = []
  if not args.skip_quality:
    rows = quality(args.shapes, args.families, args.seed, torch_reference)
  timed = timing(args.timing_shapes, torch_reference, args.rounds, args.repeats)
  header = (
    f"jax {jax.__version__} on {jax.devices()[0].device_kind}; families seed {args.seed}; "
    "timings on one core"
  )
  table = markdown(rows, timed, methods_run)
  one_core.report(header, table, args.markdown)
  if rows:
    plot(rows, methods_run, args.plot)


if __name__ == "__main__":
  main()
