"""Compile time of ``rebalance_experts`` against the number of experts.

Each configuration runs in its own process (a fresh compilation cache) and
reports the first call's wall time minus the second's (tracing plus XLA
compilation), and the second call's time. Configurations, for each ``E``:

* ``hierarchical``: 8 layers, ``E`` experts onto ``9 E / 8`` slots,
  ``E / 64`` groups and nodes, ``E / 8`` GPUs (DeepSeek-V3 prefill at 256);
* ``global``: 1 layer onto ``9 E / 8`` slots, 1 group and node, ``E / 8`` GPUs;
* ``two-gpus``: 1 layer onto ``9 E / 8`` slots on 2 GPUs (long packs).

    python bench/compile_time.py --markdown bench/results/compile_time.md
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

EXPERTS = (256, 1024, 4096, 8192)
LAYOUTS = ("hierarchical", "global", "two-gpus")
# The placement modes, then the migration-aware call in the default mode.
MODES = ("greedy", "refined", "gpu_aware", "migration")


def sizes(layout: str, num_experts: int) -> tuple[int, int, int, int, int]:
  """``(num_layers, num_replicas, num_groups, num_nodes, num_gpus)`` of a layout."""
  num_replicas = num_experts * 9 // 8
  if layout == "hierarchical":
    return 8, num_replicas, num_experts // 64, num_experts // 64, num_experts // 8
  if layout == "global":
    return 1, num_replicas, 1, 1, num_experts // 8
  return 1, num_replicas, 1, 1, 2


def measure(layout: str, num_experts: int, mode: str) -> dict:
  """Runs in the child process: times two calls of one configuration."""
  import time

  import jax
  import numpy as np

  import eplb_jax
  from eplb_jax import workloads

  num_layers, *topology = sizes(layout, num_experts)
  weight = workloads.skewed_loads(num_layers, num_experts, seed=0)
  kwargs = {}
  if mode == "migration":
    kwargs["previous_phy2log"] = np.asarray(eplb_jax.rebalance_experts(weight, *topology)[0])
    weight = workloads.skewed_loads(num_layers, num_experts, seed=1)
  else:
    kwargs["mode"] = mode
  times = []
  for _ in range(2):
    start = time.perf_counter()
    jax.block_until_ready(eplb_jax.rebalance_experts(weight, *topology, **kwargs))
    times.append(time.perf_counter() - start)
  return {"compile_s": times[0] - times[1], "call_ms": 1e3 * times[1]}


def run(layout: str, num_experts: int, mode: str, timeout: float) -> dict:
  """Measures one configuration in a child process, or reports its time-out."""
  command = [sys.executable, __file__, "--child", layout, str(num_experts), mode]
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True)
  except subprocess.TimeoutExpired:
    return {"compile_s": None, "call_ms": None}
  except subprocess.CalledProcessError as error:
    raise RuntimeError(error.stderr) from None
  return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict], timeout: float) -> str:
  def cell(value, fmt):
    return f"> {timeout:.0f}" if value is None else format(value, fmt)

  lines = [
    "| layout | experts | mode | compile s | call ms |",
    "|---|---:|---|---:|---:|",
  ]
  for row in rows:
    lines.append(
      f"| {row['layout']} | {row['experts']} | {row['mode']} | "
      f"{cell(row['compile_s'], '.2f')} | {cell(row['call_ms'], '.1f')} |"
    )
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--child", nargs=3, metavar=("LAYOUT", "EXPERTS", "MODE"), help=argparse.SUPPRESS
  )
  parser.add_argument("--experts", type=int, nargs="+", default=EXPERTS)
  parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=LAYOUTS)
  parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
  parser.add_argument("--timeout", type=float, default=180.0, help="seconds per configuration")
  parser.add_argument("--markdown", type=pathlib.Path, help="also write the table here")
  args = parser.parse_args()
  if args.child:
    layout, num_experts, mode = args.child
    print(json.dumps(measure(layout, int(num_experts), mode)))
    return
  rows = []
  for layout in args.layouts:
    for num_experts in args.experts:
      for mode in args.modes:
        row = {"layout": layout, "experts": num_experts, "mode": mode}
        row.update(run(layout, num_experts, mode, args.timeout))
        print(row, flush=True)
        rows.append(row)
  table = markdown(rows, args.timeout)
  print(table)
  if args.markdown:
    args.markdown.write_text(table + "\n")


if __name__ == "__main__":
  main()
