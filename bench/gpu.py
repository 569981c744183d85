"""Every accelerator figure in one call: the modes, the per-step split, the ragged collectives.

Meant for a lent GPU (or TPU) session with a few minutes of device time: one
process, one compile per program, then the median of repeated calls. Per
benchmark shape (eplb_jax.workloads.SHAPES):

* each balancing mode (``greedy``, ``refined``, ``gpu_aware``): compile
  seconds (first call minus a later one) and milliseconds per call;
* ``split_tokens`` of one prefill-sized step (4096 tokens per GPU, top-8,
  drawn from the shape's loads) on the default placement: compile and
  milliseconds per call, and the same for a window of 16 such steps;
* the ragged collective the expert-parallel layer would use where a backend
  has it: whether ``jax.lax.ragged_all_to_all`` compiles and runs on a mesh
  of the local devices (a one-device mesh on a single GPU).

Writes a Markdown table (``--markdown``) with the device line. On a machine
without an accelerator it runs on the CPU (``--quick``: two shapes, fewer
repeats), which is how it is kept working.

    python bench/gpu.py --markdown bench/results/gpu.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import eplb_jax
from eplb_jax import workloads

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
  if args.markdown:
    with open(args.markdown, "w") as out:
      out.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
