"""Every accelerator figure in one call: the modes, the per-step split, the ragged collectives.

Meant for a lent GPU (or TPU) session with a few minutes of device time: one
process, one compile per program, then the median of repeated calls. Per
benchmark shape (eplb_jax.workloads.SHAPES):

* each balancing mode (``greedy``, ``refined``, ``gpu_aware``): compile
  seconds (first call minus a later one) and milliseconds per call;
* ``split_tokens`` of one prefill-sized step (4096 tokens per GPU, top-8,
  drawn from the shape's loads) on the default placement: compile and
  milliseconds per call, and the same for a window of 16 such steps;
* ``plan_spare_slots`` of that step with one spare slot per GPU;
* the ragged collective the expert-parallel layer uses where a backend has
  it: whether ``jax.lax.ragged_all_to_all`` compiles and runs on a mesh of
  the local devices (a one-device mesh on a single GPU);
* the MoE layer (4096 tokens per device, top-8, 64 experts, d 512, h 1024) with the
  per-device capacity and the balanced split
  (``eplb_jax.runtime.moe.moe_layer``, ``capacity_per="device"``), its loss
  and gradients with the ragged exchange and with the padded one: compile
  and milliseconds per call of each, and whether their outputs, stats and
  gradients are equal (they must be); then the same with one spare slot per
  device filled every step (``spare_slots=1``: the copies' weights travel by
  the same two exchanges).

Writes a Markdown table (``--markdown``) with the device line. On a machine
without an accelerator it runs on the CPU (``--quick``: two shapes, fewer
repeats), which is how it is kept working.

    python bench/gpu.py --markdown bench/results/gpu.md
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import eplb_jax
from eplb_jax import workloads
from eplb_jax.runtime import moe
from eplb_jax.runtime import params

MODES = ("greedy", "refined", "gpu_aware")
TOKENS_PER_GPU, TOP_K, WINDOW = 4096, 8, 16


def _timed(call: Callable[[], object], repeats: int) -> tuple[float, float]:
  """``(compile seconds, median milliseconds)`` of a jitted call."""
  start = time.perf_counter()
  jax.block_until_ready(call())
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return max(first - min(times), 0.0), 1e3 * statistics.median(times)


def _step_counts(shape: workloads.Shape, loads: np.ndarray, steps: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  probs = loads / loads.sum(-1, keepdims=True)
  pairs = TOKENS_PER_GPU * shape.num_gpus * TOP_K
  return np.stack(
    [np.stack([rng.multinomial(pairs, p) for p in probs]) for _ in range(steps)]
  ).astype(np.int32)


def shape_rows(shape: workloads.Shape, repeats: int) -> list[tuple[str, str, float, float]]:
  loads = workloads.skewed_loads(shape.num_layers, shape.num_experts, seed=0)
  weight = jnp.asarray(loads)
  rows = []
  for mode in MODES:
    rows.append(
      (
        shape.name,
        mode,
        *_timed(lambda m=mode: eplb_jax.rebalance(weight, shape.topology, mode=m), repeats),
      )
    )
  placement = eplb_jax.rebalance(weight, shape.topology)
  step = jnp.asarray(_step_counts(shape, loads, 1, seed=1)[0])
  window = jnp.asarray(_step_counts(shape, loads, WINDOW, seed=2))
  for name, counts in (
    ("split_tokens (one step)", step),
    (f"split_tokens ({WINDOW} steps)", window),
  ):
    rows.append(
      (
        shape.name,
        name,
        *_timed(lambda c=counts: eplb_jax.split_tokens(c, placement, shape.topology), repeats),
      )
    )
  plan = functools.partial(eplb_jax.plan_spare_slots, spare_slots=1)
  rows.append(
    (
      shape.name,
      "plan_spare_slots (one step, 1 spare per GPU)",
      *_timed(lambda: plan(step, placement, shape.topology), repeats),
    )
  )
  return rows


def ragged_collective() -> str:
  """Whether ``lax.ragged_all_to_all`` runs here, on a mesh of every local device."""
  devices = jax.local_devices()
  mesh = jax.make_mesh((len(devices),), ("x",), devices=devices)
  n = len(devices)
  spec = jax.sharding.PartitionSpec("x")

  def exchange(x):
    # Each device sends one row to every device (row i to device i).
    sizes = jnp.ones(n, jnp.int32)
    offsets = jnp.arange(n, dtype=jnp.int32)
    out = jnp.zeros_like(x)
    return jax.lax.ragged_all_to_all(x, out, offsets, sizes, offsets, sizes, axis_name="x")

  rows = jax.device_put(
    jnp.arange(n * n * 4, dtype=jnp.float32).reshape(n * n, 4),
    jax.sharding.NamedSharding(mesh, spec),
  )
  try:
    run = jax.jit(jax.shard_map(exchange, mesh=mesh, in_specs=spec, out_specs=spec))
    jax.block_until_ready(run(rows))
  except Exception as error:  # the backend's own words are the result
    return f"not available: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
  return f"runs on {n} device(s)"


def moe_exchanges(repeats: int, quick: bool, spare_slots: int) -> list[str]:
  """The per-device-capacity layer's step with the ragged and the padded exchange.

  ``quick``: a small layer (XLA:CPU computes ``ragged_dot`` densely, every group over every
  row).
  """
  devices = jax.local_devices()
  n = len(devices)
  mesh = jax.make_mesh((n,), ("expert",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))
  experts, top_k, d, h, tokens = (16, 2, 32, 64, 256) if quick else (64, 8, 512, 1024, 4096)
  tokens *= n
  num_replicas = n * -(-(experts + 16) // n)  # 16 redundant slots, rounded up to the devices
  loads = workloads.skewed_loads(1, experts, seed=0)
  topology = eplb_jax.Topology(num_replicas, 1, 1, n)
  placement = eplb_jax.rebalance(jnp.asarray(loads), topology)
  keys = jax.random.split(jax.random.key(0), 4)
  logical = {
    "w_in": jax.random.normal(keys[0], (experts, d, h)) / np.sqrt(d),
    "w_out": jax.random.normal(keys[1], (experts, h, d)) / np.sqrt(h),
  }
  per_slot = params.apply_placement(logical, placement.phy2log[0], mesh=mesh)
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert"))
  x = jax.device_put(jax.random.normal(keys[2], (tokens, d)), split)
  # The router follows the skewed loads: their log as a logit bias.
  bias = jnp.log(jnp.asarray(loads[0]) / loads[0].sum())
  gates, ids = moe.top_k_routing(jax.random.normal(keys[3], (tokens, experts)) + bias, top_k)
  gates, ids = jax.device_put((gates, ids), split)
  maps = (placement.log2phy[0], placement.logcnt[0])
  lines, results = [], {}
  for ragged in (True, False):

    def loss(x, weights, gates, ids, ragged=ragged):
      y, stats = moe.moe_layer(
        x,
        gates,
        ids,
        weights,
        moe.expert_mlp,
        *maps,
        mesh=mesh,
        capacity_factor=1.25,
        split="balanced",
        capacity_per="device",
        spare_slots=spare_slots,
        ragged_collective=ragged,
      )
      return jnp.sum(y * jnp.cos(y)), (y, stats)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    name = "ragged_all_to_all" if ragged else "padded all_to_all"
    try:
      compile_s, ms = _timed(lambda step=step: step(x, per_slot, gates, ids), repeats)
      results[name] = jax.device_get(step(x, per_slot, gates, ids))
    except Exception as error:  # the backend's own words are the result
      lines.append(
        f"- {name}: not available: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
      )
      continue
    (_, (_, stats)), _ = results[name]
    dropped = int(stats.dropped.sum()) / max(int(stats.routed.sum()), 1)
    lines.append(
      f"- {name}: compile {compile_s:.2f} s, {ms:.3f} ms per loss-and-gradient call "
      f"({tokens} tokens, top-{top_k}, {experts} experts on {num_replicas} slots of {n} "
      f"device(s), capacity factor 1.25 per device, balanced split, {spare_slots} spare slot(s) "
      f"per device; {100 * dropped:.2f}% dropped)"
    )
  if len(results) == 2:
    ragged, padded = results.values()
    pairs = list(zip(jax.tree.leaves(ragged), jax.tree.leaves(padded), strict=True))
    worst = max(float(np.max(np.abs(np.asarray(a, np.float64) - b), initial=0)) for a, b in pairs)
    same = all(np.array_equal(a, b) for a, b in pairs)
    lines.append(
      f"- ragged and padded results (loss, outputs, stats, gradients): "
      f"{'bit for bit equal' if same else 'NOT EQUAL'}, max |difference| {worst:.3g}"
    )
  return lines


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="two shapes, 3 repeats")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--markdown", help="write the table to this file")
  args = parser.parse_args()
  names = ("qwen3-30b-a3b", "deepseek-v3-prefill") if args.quick else tuple(workloads.SHAPES)
  repeats = 3 if args.quick else args.repeats
  device = jax.devices()[0]
  lines = [
    f"Device: {device.device_kind} ({device.platform}), jax {jax.__version__}; "
    f"median of {repeats} calls; compile = first call minus the fastest later one.",
    "",
    "| shape | program | compile s | ms per call |",
    "|---|---|---:|---:|",
  ]
  for name in names:
    for row in shape_rows(workloads.SHAPES[name], repeats):
      lines.append("| {} | {} | {:.2f} | {:.3f} |".format(*row))
      print(lines[-1], flush=True)
  lines += ["", f"`lax.ragged_all_to_all`: {ragged_collective()}"]
  print(lines[-1])
  for spare_slots in (0, 1):
    lines += ["", f"MoE layer, per-device capacity, {spare_slots} spare slot(s) per device:"]
    lines += moe_exchanges(repeats, args.quick, spare_slots)
    print("\n".join(lines[-4:]), flush=True)
  if args.markdown:
    with open(args.markdown, "w") as out:
      out.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
