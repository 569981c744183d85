"""Command-line interface: ``eplb-jax plan`` turns a load matrix into placement maps.

Loads ``[layers, experts]`` come from a ``.npy``, ``.npz``, ``.json`` or
``.csv`` file, or from a built-in model shape with synthetic skewed loads when
no file is given. The command prints a short quality summary and can write the
three maps (``phy2log``, ``log2phy``, ``logcnt``) to ``.npz`` or ``.json``.

Errors in the input or in the sizes print ``eplb-jax: error: <message>`` to
stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from eplb_jax import metrics
from eplb_jax import workloads
from eplb_jax._src import checks
from eplb_jax._src.api import rebalance_experts
from eplb_jax._src.modes import DEFAULT_MODE
from eplb_jax._src.modes import MODES

DEFAULT_SHAPE = "deepseek-v3-prefill"
INPUT_FORMATS = (".npy", ".npz", ".json", ".csv")
OUTPUT_FORMATS = (".npz", ".json")
SIZE_FLAGS = ("num_replicas", "num_groups", "num_nodes", "num_gpus")


def load_weight(path: pathlib.Path, key: str | None = None) -> np.ndarray:
  """Reads a load matrix ``[layers, experts]`` from ``path``, chosen by its extension.

  ``.npy``: the array; ``.npz``: the array named ``key`` (default: the first);
  ``.json``: a list of lists, or an object holding one under ``key`` (default
  ``"weight"``); ``.csv``: comma-separated rows without a header. Unreadable
  contents raise ``ValueError`` naming the file; a missing file, ``OSError``.
  """
  suffix = path.suffix.lower()
  if suffix not in INPUT_FORMATS:
    raise ValueError(f"INPUT must end in one of {', '.join(INPUT_FORMATS)}, got {path.name!r}")
  try:
    if suffix == ".npy":
      return np.load(path)
    if suffix == ".csv":
      return np.loadtxt(path, delimiter=",", ndmin=2)
    if suffix == ".npz":
      with np.load(path) as arrays:
        return _entry(arrays, key or arrays.files[0])
    data = json.loads(path.read_text())
    return np.asarray(_entry(data, key or "weight") if isinstance(data, dict) else data)
  except (ValueError, IndexError) as error:
    raise ValueError(f"cannot read INPUT {path}: {error}") from None


def _entry(entries: Mapping[str, Any], name: str) -> Any:
  """The entry ``name`` of an .npz archive or a JSON object."""
  if name not in entries:
    raise ValueError(f"no entry {name!r} (has {', '.join(entries)}; pick one with --key)")
  return entries[name]


def save_maps(path: pathlib.Path, maps: dict[str, np.ndarray]) -> None:
  """Writes the named int arrays to ``.npz`` or to ``.json`` (nested lists)."""
  if path.suffix.lower() == ".npz":
    np.savez(path, **maps)
  else:
    path.write_text(json.dumps({name: value.tolist() for name, value in maps.items()}))


def contiguous_loads(weight: np.ndarray, num_gpus: int) -> np.ndarray:
  """GPU loads ``[L, num_gpus]`` of the naive placement: no replicas, expert ``e`` on
  GPU ``e * num_gpus // E`` (contiguous blocks of experts)."""
  num_experts = weight.shape[1]
  gpu = np.arange(num_experts) * num_gpus // num_experts
  return weight @ (gpu[:, None] == np.arange(num_gpus)).astype(weight.dtype)


def _problem(args: argparse.Namespace) -> tuple[workloads.Shape, np.ndarray, str]:
  """The shape, loads ``[L, E]`` and a description of where the loads come from."""
  if args.input is not None and args.shape is not None:
    raise ValueError("give either INPUT or --shape, not both")
  if args.input is None:
    name = args.shape or DEFAULT_SHAPE
    base = workloads.SHAPES[name]
    weight = workloads.skewed_loads(base.num_layers, base.num_experts, seed=0)
    source = f"{name} (built-in example, skewed loads, seed 0)"
    defaults = dict(zip(SIZE_FLAGS, base.sizes, strict=True))
  else:
    path = pathlib.Path(args.input)
    weight = load_weight(path, args.key)
    source = str(path)
    name = path.name
    defaults = {"num_groups": 1, "num_nodes": 1}
    for flag in ("num_replicas", "num_gpus"):
      if getattr(args, flag) is None:
        raise ValueError(f"--{flag.replace('_', '-')} is required with an INPUT file")
  sizes = {
    flag: defaults[flag] if getattr(args, flag) is None else getattr(args, flag)
    for flag in SIZE_FLAGS
  }
  checks.check_weight_values(
    checks.check_weight(weight)
  )  # ValueError for bad shapes, dtypes and values
  shape = workloads.Shape(name, *np.shape(weight), **sizes)
  return shape, np.asarray(weight, np.float64), source


def _timed_rebalance(weight: np.ndarray, shape: workloads.Shape, mode: str):
  """Runs ``rebalance_experts`` twice: returns the maps and both wall times in ms."""
  times = []
  for _ in range(2):
    start = time.perf_counter()
    maps = jax.block_until_ready(rebalance_experts(weight, *shape.sizes, mode=mode))
    times.append(1e3 * (time.perf_counter() - start))
  return maps, times


def plan(args: argparse.Namespace) -> int:
  """The ``plan`` subcommand: balance, summarise, optionally write the maps."""
  output = pathlib.Path(args.output) if args.output else None
  if output is not None and output.suffix.lower() not in OUTPUT_FORMATS:
    raise ValueError(f"--output must end in {' or '.join(OUTPUT_FORMATS)}, got {output.name!r}")
  shape, weight, source = _problem(args)
  (phy2log, log2phy, logcnt), (first_ms, compiled_ms) = _timed_rebalance(weight, shape, args.mode)

  before = metrics.layer_balancedness(contiguous_loads(weight, shape.num_gpus))
  loads = metrics.gpu_loads(weight, phy2log, logcnt, shape.num_gpus)
  after = np.asarray(metrics.layer_balancedness(loads))
  bound = metrics.lower_bound(weight, shape.num_replicas, shape.num_gpus)
  ratio = np.asarray(loads.max(axis=-1) / bound)
  ratio = np.where(np.isfinite(ratio), ratio, 1.0)  # all-zero layers: 0 / 0
  worst = int(np.argmin(after))

  print(f"eplb-jax plan: {source}")
  print(
    f"  problem       {shape.num_layers} layers x {shape.num_experts} experts -> "
    f"{shape.num_replicas} slots; groups {shape.num_groups}, nodes {shape.num_nodes}, "
    f"GPUs {shape.num_gpus}"
  )
  print(f"  policy        {shape.policy}, mode {args.mode}")
  print(
    f"  balancedness  {float(np.mean(before)):.4f} before (contiguous, no replicas) -> "
    f"{float(after.mean()):.4f} after"
  )
  print(f"  worst layer   {worst}: balancedness {after[worst]:.4f}")
  print(f"  max / bound   {ratio.mean():.4f} mean, {ratio.max():.4f} worst (1 = provably optimal)")
  print(
    f"  time          {first_ms:.1f} ms first call (with compile), {compiled_ms:.2f} ms compiled"
  )
  if output is not None:
    maps = {"phy2log": phy2log, "log2phy": log2phy, "logcnt": logcnt}
    save_maps(output, {name: np.asarray(value) for name, value in maps.items()})
    print(f"  wrote         {output}")
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="eplb-jax", description="Expert-parallelism load balancer (EPLB) for JAX."
  )
  commands = parser.add_subparsers(dest="command", required=True)
  sub = commands.add_parser(
    "plan",
    help="place experts on GPUs for a load matrix [layers, experts]",
    description=(
      "Place replicated experts on GPUs. Without INPUT, runs on a built-in model shape "
      f"(default {DEFAULT_SHAPE}) with synthetic skewed loads and that shape's sizes; "
      "size flags override them. With INPUT, --num-replicas and --num-gpus are required "
      "and --num-groups/--num-nodes default to 1 (the global policy)."
    ),
  )
  sub.add_argument(
    "input",
    nargs="?",
    metavar="INPUT",
    help=f"loads [layers, experts]: {', '.join(INPUT_FORMATS)} (CSV without header)",
  )
  sub.add_argument("--key", help="array name in an .npz (default: first) or key in a .json object")
  sub.add_argument("--shape", choices=sorted(workloads.SHAPES), help="built-in example shape")
  sub.add_argument("--num-replicas", type=int, help="physical expert slots in total")
  sub.add_argument("--num-groups", type=int, help="expert groups (hierarchical policy)")
  sub.add_argument("--num-nodes", type=int, help="server nodes")
  sub.add_argument("--num-gpus", type=int, help="GPUs in total")
  sub.add_argument(
    "--mode", choices=tuple(MODES), default=DEFAULT_MODE, help=f"default: {DEFAULT_MODE}"
  )
  sub.add_argument("--output", metavar="PATH", help="write the maps to PATH (.npz or .json)")
  sub.set_defaults(run=plan)
  return parser


def main(argv: list[str] | None = None) -> int:
  """Entry point of ``eplb-jax`` and ``python -m eplb_jax``; returns the exit status."""
  try:
    args = build_parser().parse_args(argv)
  except SystemExit as exit_:  # argparse: 0 after --help, 2 after a usage error
    return int(exit_.code or 0)
  try:
    return args.run(args)
  except (ValueError, OSError) as error:
    print(f"eplb-jax: error: {error}", file=sys.stderr)
    return 2
