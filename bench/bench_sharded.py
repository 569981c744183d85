"""Sharded placement and in-step rebalancing, timed on 8 host devices.

Two tables, from one run in one process:

1. ``eplb_jax.rebalance_experts(..., mesh=, layer_axis=)`` with layers split over an
   8-device mesh axis, against the unsharded ``eplb_jax.rebalance_experts``
   (same loads, same machine). Layer counts are rounded down to a multiple of
   8. On CPU the 8 "devices" share the host's cores, so the speed-up is
   bounded by the core count, plus what each device saves by running its
   ``while`` loops only until its own layers converge. The last column counts
   the layers whose three maps are identical in both calls.
2. The training step of ``examples/train_moe.py``: a step, a step whose
   ``lax.cond`` rebalances, and the rebalance alone.

Run: ``python bench/bench_sharded.py`` (about a minute; compile times dominate).
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()

import argparse
import dataclasses
import functools
import pathlib
import sys
import time
from collections.abc import Callable

import jax
import numpy as np

import eplb_jax
from eplb_jax import workloads

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "examples"))
import train_moe  # noqa: E402

NUM_DEVICES = 8


def timed(fn: Callable, *args, repeats: int) -> tuple[float, float]:
  """``(first call s, best of the later calls ms)``, blocking on every call.

  The best time, not the median: it is the least disturbed by other work on
  a shared machine.
  """
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return first, 1e3 * min(times)


def bench_placement(names: list[str], mode: str, repeats: int) -> None:
  mesh = jax.make_mesh((NUM_DEVICES,), ("layers",), axis_types=(jax.sharding.AxisType.Auto,))
  print(f"\n## Placement ({mode}), layers over {NUM_DEVICES} host devices vs one device")
  print(
    "| shape | layers x experts -> slots | unsharded ms | sharded ms | speed-up "
    "| compile s (unsharded / sharded) | identical layers |"
  )
  print("|---|---|---:|---:|---:|---:|---:|")
  for name in names:
    shape = workloads.SHAPES[name]
    layers = shape.num_layers // NUM_DEVICES * NUM_DEVICES
    weight = workloads.skewed_loads(layers, shape.num_experts, seed=0)
    plain = functools.partial(eplb_jax.rebalance_experts, mode=mode)
    sharded = functools.partial(
      eplb_jax.rebalance_experts, mode=mode, mesh=mesh, layer_axis="layers"
    )
    first_u, ms_u = timed(plain, weight, *shape.sizes, repeats=repeats)
    first_s, ms_s = timed(sharded, weight, *shape.sizes, repeats=repeats)
    same = np.ones(layers, bool)
    for a, b in zip(plain(weight, *shape.sizes), sharded(weight, *shape.sizes), strict=True):
      same &= (np.asarray(a) == np.asarray(b)).reshape(layers, -1).all(-1)
    print(
      f"| {name} | {layers} x {shape.num_experts} -> {shape.num_replicas} | {ms_u:.1f} "
      f"| {ms_s:.1f} | {ms_u / ms_s:.2f}x | {first_u:.1f} / {first_s:.1f} "
      f"| {same.sum()}/{layers} |"
    )


def bench_training_step(repeats: int) -> None:
  cfg = train_moe.Config()
  mesh = train_moe.make_mesh(cfg)
  state = train_moe.init_state(cfg, mesh)
  step = train_moe.make_step(cfg, mesh, state)
  for _ in range(cfg.window):  # fill the load window with real router statistics
    state, _ = jax.block_until_ready(step(state))
  quiet = state._replace(step=jax.numpy.asarray(cfg.window, jax.numpy.int32))
  due = state._replace(step=jax.numpy.asarray(cfg.rebalance_every - 1, jax.numpy.int32))
  rebalance = jax.jit(functools.partial(train_moe.rebalance, cfg=cfg, mesh=mesh))
  logical_cfg = dataclasses.replace(cfg, logical=True, rebalance_every=0)
  logical_state = train_moe.init_state(logical_cfg, mesh)
  logical = train_moe.make_step(logical_cfg, mesh, logical_state)
  rows = [
    ("logical model (every expert on every token, same drops)", logical, logical_state),
    ("expert-parallel step, no rebalance", step, quiet),
    ("expert-parallel step with the rebalance (lax.cond taken)", step, due),
    ("rebalance alone (placement + weights + Adam moments)", rebalance, state),
  ]
  print(
    f"\n## Training step of examples/train_moe.py ({cfg.num_layers} layers, "
    f"{cfg.num_experts} experts -> {cfg.num_replicas} slots, {cfg.tokens} tokens, "
    f"{NUM_DEVICES} host devices)"
  )
  print("| program | ms | relative to the step |")
  print("|---|---:|---:|")
  results = [(label, timed(fn, arg, repeats=3 * repeats)[1]) for label, fn, arg in rows]
  base = results[1][1]
  for label, ms in results:
    print(f"| {label} | {ms:.2f} | {ms / base:.2f}x |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--shapes",
    nargs="+",
    default=["deepseek-v3-prefill", "qwen3-30b-a3b", "kimi-k2"],
    choices=sorted(workloads.SHAPES),
  )
  parser.add_argument("--mode", default="refined", choices=["greedy", "refined"])
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  print(f"jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} devices")
  bench_placement(args.shapes, args.mode, args.repeats)
  bench_training_step(args.repeats)


if __name__ == "__main__":
  main()
