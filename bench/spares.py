"""Per-step replication: spare slots filled for each step, against the per-step oracle.

For every shape (``eplb_jax.workloads.SHAPES``), load family, drift and step
size of ``bench/per_step.py`` (its ``Source``: placements from window ``t``,
steps drawn from window ``t + 1``), per-step balancedness (mean GPU pairs /
max GPU pairs, mean over steps and layers) of:

* ``plain+even``: no balancing, one replica per expert in expert order,
  ``E / G`` slots per GPU (no redundant slots);
* ``plain+k1``: that layout with one spare slot per GPU filled per step
  (:func:`eplb_jax.plan_spare_slots`);
* ``window+even``, ``window+split``: the default placement of window ``t``,
  split evenly or by :func:`eplb_jax.split_tokens`;
* ``window+k1``, ``window+k2``: that placement with 1 or 2 spare slots per
  GPU filled per step;
* ``oracle``: the default placement made from each step's own counts, in
  the same ``P`` slots, split by ``split_tokens``: the ceiling of re-placing
  every slot every step (``window+k1`` has ``G`` slots more).

Then the planner's cost on one core: :func:`eplb_jax.plan_spare_slots`
(``k = 1``) and :func:`eplb_jax.split_tokens` of the same DeepSeek-V3 step
(58 layers, 256 experts, 288 slots, 32 GPUs), jitted, median of interleaved
calls, decode- and prefill-sized; and its compile time in a fresh process.

    python bench/spares.py --markdown bench/results/spares.md
    python bench/spares.py --quick  # a minute: 2 shapes, 2 families, drifts 0 and 0.2
"""

from __future__ import annotations

import one_core  # first: XLA flags for one core

# isort: split

import argparse
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))

# isort: split

import jax  # noqa: E402
import numpy as np  # noqa: E402
import per_step  # noqa: E402

import eplb_jax  # noqa: E402
from eplb_jax import workloads  # noqa: E402

METHODS = (
  "plain+even",
  "plain+k1",
  "window+even",
  "window+split",
  "window+k1",
  "window+k2",
  "oracle",
)
COST_SHAPE = "deepseek-v3-prefill"
# The target: the window placement plus one spare slot per GPU, Kimi-K2, drift 0.2.
TARGET = ("kimi-k2", 0.95)


def plain(shape: workloads.Shape) -> np.ndarray:
  """``phy2log [E]``: every expert once, in order, ``E / G`` per GPU."""
  return np.arange(shape.num_experts, dtype=np.int32)


def peaks(quotas: np.ndarray, num_gpus: int) -> np.ndarray:
  return quotas.reshape(*quotas.shape[:-1], num_gpus, -1).sum(-1).max(-1)


def evaluate(shape: workloads.Shape, counts: np.ndarray, window: np.ndarray) -> dict:
  num_gpus = shape.num_gpus
  flat = counts.reshape(-1, shape.num_experts).astype(np.int32)
  mean = flat.sum(1) / num_gpus
  rows = flat.shape[0]
  layouts = {
    "plain": np.tile(plain(shape), (rows, 1)),
    "window": np.tile(window, (counts.shape[0], 1)),
  }
  peak = {}
  for name, phy2log in layouts.items():
    peak[f"{name}+even"] = per_step.even_gpu(flat, phy2log, num_gpus).max(1)
    for k in (1, 2) if name == "window" else (1,):
      plan = eplb_jax.plan_spare_slots(flat, phy2log, num_gpus, spare_slots=k)
      peak[f"{name}+k{k}"] = peaks(np.asarray(plan.quotas), num_gpus)
  peak["window+split"] = peaks(
    np.asarray(eplb_jax.split_tokens(flat, layouts["window"], num_gpus)), num_gpus
  )
  oracle = eplb_jax.rebalance(flat, shape.topology)
  peak["oracle"] = peaks(np.asarray(eplb_jax.split_tokens(flat, oracle, num_gpus)), num_gpus)
  return {method: float(np.mean(mean / peak[method])) for method in METHODS}


def simulate(args) -> list[dict]:
  rows = []
  for s, shape_name in enumerate(args.shapes):
    shape = workloads.SHAPES[shape_name]
    for f, family in enumerate(args.families):
      window = None
      for d, drift in enumerate(args.drifts):
        source = per_step.Source(family, shape.num_layers, shape.num_experts, args.seed, drift)
        if window is None:  # window t does not depend on the drift
          window = per_step.placements(source, shape)["default"]
        for z, size in enumerate(args.sizes):
          rng = np.random.default_rng([args.seed, s, f, z, 1, d])
          counts = source.steps(1, args.steps, size, shape.num_gpus, rng)
          bal = evaluate(shape, counts, window)
          rows.append(dict(shape=shape_name, family=family, drift=drift, size=size, bal=bal))
          print(
            f"{shape_name} {family} drift {drift} {size}: "
            + " ".join(f"{m} {v:.4f}" for m, v in bal.items()),
            flush=True,
          )
  return rows


def cost(args) -> dict:
  """One-core median ms of plan_spare_slots (k = 1) and split_tokens of one DeepSeek-V3 step."""
  shape = workloads.SHAPES[COST_SHAPE]
  source = per_step.Source("lognormal2", shape.num_layers, shape.num_experts, args.seed, 0.2)
  phy2log = jax.device_put(per_step.placements(source, shape)["default"])
  rng = np.random.default_rng([args.seed, 99])
  num_gpus = shape.num_gpus
  split_jit = jax.jit(eplb_jax.split_tokens, static_argnums=2)
  plan_jit = jax.jit(eplb_jax.plan_spare_slots, static_argnums=2)
  calls = {}
  for size in per_step.SIZES:
    counts = jax.device_put(source.steps(1, 1, size, num_gpus, rng)[0].astype(np.int32))
    calls[(size, "split")] = lambda c=counts: split_jit(c, phy2log, num_gpus)
    calls[(size, "plan")] = lambda c=counts: plan_jit(c, phy2log, num_gpus)
  times = one_core.interleaved_ms(calls, args.rounds, args.repeats)
  out = {key: float(np.median(t)) for key, t in times.items()}
  out["compile_s"] = min(per_step.compile_seconds("plan_spare_slots") for _ in range(args.compiles))
  print(out, flush=True)
  return out


def _mean(rows, method, **match) -> float:
  return float(
    np.mean([r["bal"][method] for r in rows if all(r[k] == v for k, v in match.items())])
  )


def markdown(rows: list[dict], spent: dict, args) -> str:
  shapes = list(dict.fromkeys(r["shape"] for r in rows))
  lines = []
  for drift in args.drifts:
    lines += [
      f"## Per-step balancedness at drift {drift} (mean over families, steps and layers)",
      "",
    ]
    lines.append("| shape | step | " + " | ".join(METHODS) + " |")
    lines.append("|---|---|" + "---:|" * len(METHODS))
    for shape in shapes:
      for size in args.sizes:
        values = [_mean(rows, m, shape=shape, size=size, drift=drift) for m in METHODS]
        lines.append(f"| {shape} | {size} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
    lines.append("")
  worst = min(
    (
      r["bal"]["window+k1"] - r["bal"]["window+split"],
      r["shape"],
      r["family"],
      r["drift"],
      r["size"],
    )
    for r in rows
  )
  lines += [
    "## Targets",
    "",
    f"- window + k1 never below window + split: worst difference {worst[0]:+.4f} "
    f"({', '.join(map(str, worst[1:]))}) per (shape, family, drift, step) case.",
  ]
  shape, goal = TARGET
  if shape in shapes and max(args.drifts) == 0.2:
    reached = [_mean(rows, "window+k1", shape=shape, drift=0.2, size=size) for size in args.sizes]
    lines.append(
      f"- {shape} at drift 0.2, window + k1: "
      + ", ".join(f"{size} {v:.4f}" for size, v in zip(args.sizes, reached, strict=True))
      + f" (target {goal}): {'pass' if min(reached) >= goal else 'FAIL'}."
    )
  if spent:
    lines.append(
      "- cost, one core, DeepSeek-V3 step, k = 1: "
      + "; ".join(
        f"{size}: plan {spent[(size, 'plan')]:.2f} ms, split {spent[(size, 'split')]:.2f} ms "
        f"({spent[(size, 'plan')] / spent[(size, 'split')]:.2f}x, target 2x)"
        for size in args.sizes
      )
      + f"; plan_spare_slots compiles in {spent['compile_s']:.1f} s."
    )
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--shapes", nargs="+", choices=per_step.SHAPES, default=list(per_step.SHAPES))
  parser.add_argument(
    "--families", nargs="+", choices=per_step.FAMILIES, default=list(per_step.FAMILIES)
  )
  parser.add_argument("--drifts", nargs="+", type=float, default=list(per_step.DRIFTS))
  parser.add_argument(
    "--sizes", nargs="+", choices=list(per_step.SIZES), default=list(per_step.SIZES)
  )
  parser.add_argument("--steps", type=int, default=4, help="steps of window t + 1 per case")
  parser.add_argument("--seed", type=int, default=1)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--compiles", type=int, default=3)
  parser.add_argument("--skip-cost", action="store_true")
  parser.add_argument("--markdown", type=pathlib.Path)
  args = parser.parse_args()
  if args.quick:
    args.shapes, args.families = ["qwen3-30b-a3b", "kimi-k2"], ["lognormal2", "topics"]
    args.drifts, args.steps, args.rounds, args.repeats, args.compiles = [0.0, 0.2], 1, 3, 5, 1
  start, load = time.perf_counter(), os.getloadavg()[0]
  rows = simulate(args)
  spent = {} if args.skip_cost else cost(args)
  header = (
    f"jax {jax.__version__} on {jax.devices()[0].device_kind}, numpy {np.__version__}; eplb_jax "
    f"{per_step.revision()}; seed {args.seed}, {args.steps} steps per case; XLA on one thread, "
    f"timings on one core; this run {time.perf_counter() - start:.0f} s, 1-minute load average "
    f"{load:.1f} at its start, {os.getloadavg()[0]:.1f} at its end"
  )
  table = markdown(rows, spent, args)
  one_core.report(header, table, args.markdown)


if __name__ == "__main__":
  main()
