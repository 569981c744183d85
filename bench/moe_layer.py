"""The expert-parallel MoE layer on 8 host devices, with and without rebalancing.

Trains ``examples/train_moe.py``'s model (2 MoE layers, 16 experts on 32
slots, top-2, 2048 tokens per step, a skewed router, capacity factor 1.25)
and reports, per placement: the (token, choice) pairs each device receives
(max / mean per step, against what the placement's balance on its window
predicts), the fraction of pairs over capacity at capacity factors 1.0 and
1.25 (both from the same routing), and the median step time; plus the time
of the steps that rebalance; and, on the same router choices, the per-step
max / mean for every split of each expert's pairs over its replicas (even,
and balanced by the step's quotas) with its drops for either capacity (per
slot and sending device, or per receiving device), without balancing and
with 1 or 2 spare slots per device filled every step, with the expert
weights each device receives for the spares. Runs: rebalancing every 50
steps at two router skews with each split in service (per-slot capacity),
the balanced split with the per-device capacity in service, the same with
one spare slot per device in service, and the same model never rebalanced.

Run: ``python bench/moe_layer.py [--markdown bench/results/moe_layer.md]`` (about a minute
on 2 CPU cores). Host devices share the CPU, so step times say little about an accelerator:
the token figures are the result.
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()

import argparse
import dataclasses
import pathlib
import sys

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "examples"))
import train_moe  # noqa: E402

from eplb_jax.runtime import moe  # noqa: E402

STEPS = 150


def fewer(before: float, after: float) -> str:
  return f"{before / after:.1f}x fewer" if after else "none left"


def describe(name: str, cfg: train_moe.Config, run: dict[str, np.ndarray]) -> list[str]:
  rows = train_moe.periods(run, cfg.rebalance_every)
  lines = [f"### {name}", "", *train_moe.table(rows), ""]
  lines += ["Every split and capacity on the same router choices:", ""]
  lines += [*train_moe.split_table(rows, cfg), ""]
  rebalancing = run["seconds"][~np.isnan(run["before"])] if cfg.rebalance_every else []
  if len(rebalancing):
    lines.append(f"- steps that rebalance: median {1e3 * np.median(rebalancing):.1f} ms")
    changed = run["layers_rebalanced"][~np.isnan(run["layers_rebalanced"])]
    lines.append(
      f"- gate (threshold {cfg.rebalance_threshold}): {len(changed)} rebalances due, "
      f"{int(np.sum(changed == 0))} skipped entirely, {int(changed.sum())} of "
      f"{len(changed) * cfg.num_layers} layer placements changed"
    )
  if len(rows) > 1:
    first, second = rows[0], rows[1]
    lines.append(
      f"- first rebalance: dropped at cf 1.25 {100 * first.dropped[1.25]:.2f}% -> "
      f"{100 * second.dropped[1.25]:.2f}% ({fewer(first.dropped[1.25], second.dropped[1.25])}"
      f"); at cf 1.0 {100 * first.dropped[1.0]:.2f}% -> {100 * second.dropped[1.0]:.2f}%"
    )
    worst = max(p.measured / p.predicted for p in rows[1:])
    lines.append(f"- after it: measured max/mean at most {worst:.3f}x the prediction")
    for split, figures in train_moe.after_first_rebalance(run).items():
      lines.append(
        f"- after it, {split} split: per-step max/mean {figures['max/mean']:.3f}, dropped "
        + "; ".join(
          f"per {per} "
          + ", ".join(
            f"cf {f} {100 * figures[f'dropped cf {f} per {per}']:.2f}%"
            for f in train_moe.REPORTED_FACTORS
          )
          for per in moe.CAPACITY_PER
        )
      )
  lines += [f"- {line}" for line in train_moe.replication_summary(run, cfg)]
  return [*lines, ""]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--markdown", type=pathlib.Path, help="also write the report here")
  parser.add_argument("--steps", type=int, default=STEPS)
  parser.add_argument("--rebalance-every", type=int, default=50)
  args = parser.parse_args()
  base = train_moe.Config(rebalance_every=args.rebalance_every)
  mesh = train_moe.make_mesh(base)
  runs = {}
  for skew in (base.router_skew, 1.0):
    for split in ("even", "balanced"):
      name = f"router skew {skew}, rebalanced every {base.rebalance_every} steps, {split} split"
      runs[name] = dataclasses.replace(base, router_skew=skew, split=split)
  name = f"router skew {base.router_skew}, rebalanced every {base.rebalance_every} steps"
  runs[f"{name}, balanced split, per-device capacity"] = dataclasses.replace(
    base, split="balanced", capacity_per="device"
  )
  runs[f"{name}, balanced split, per-device capacity, 1 spare slot per device"] = (
    dataclasses.replace(base, split="balanced", capacity_per="device", spare_slots=1)
  )
  runs[f"router skew {base.router_skew}, never rebalanced, even split"] = dataclasses.replace(
    base, rebalance_every=0
  )
  lines = [
    "# Expert-parallel MoE layer on 8 host devices",
    "",
    f"`python bench/moe_layer.py --steps {args.steps} --rebalance-every "
    f"{base.rebalance_every}`: jax {jax.__version__}, {jax.device_count()} host devices "
    f"on {os.cpu_count()} CPU cores. Model: {base.num_layers} layers, {base.num_experts} experts "
    f"on {base.num_replicas} slots ({base.num_replicas // base.num_gpus} per device), "
    f"top-{base.top_k}, {base.tokens} tokens per step ({base.tokens // base.num_gpus} per "
    f"device), capacity factor {base.capacity_factor} (per slot and sending device unless "
    "the run says per device), "
    f"window {base.window} steps, mode {base.mode!r}, {args.steps} steps per run.",
    "",
    "Columns: *predicted* is max / mean GPU load of the placement on a window "
    "(`Placement.gpu_loads`; the initial placement scored on the first rebalance's window); "
    "*measured* is max / mean of the pairs each device received per step, averaged over the "
    "steps, *summed* the same over the steps' total; drops are pairs over the capacity in "
    "service, as a fraction of all pairs, for both capacity factors from the same "
    "routing; step ms is the median (the first step, which compiles, excluded; the step "
    "includes its metrics, the other split's routing among them). The split in "
    "service decides the run's routing; each run's second table gives every split's per-step "
    "max / mean and its drops with either capacity on that run's router choices (the other "
    "split from `moe.dispatch_stats`, drops from `moe.kept_pairs`), so they compare on "
    "identical steps. Per slot: each device sends each slot at most "
    "`ceil(cf * tokens_per_device * k / P)` pairs; per device: each device receives at most "
    "`ceil(cf * T * k / G)` pairs in all, the streams into it filled level by level.",
    "",
  ]
  for name, cfg in runs.items():
    run = train_moe.train(cfg, args.steps, mesh)
    lines += describe(name, cfg, run)
    print("\n".join(describe(name, cfg, run)), flush=True)
  if args.markdown:
    args.markdown.write_text("\n".join(lines).rstrip() + "\n")


if __name__ == "__main__":
  main()
