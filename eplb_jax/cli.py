"""Command-line interface: ``eplb-jax plan`` turns expert loads into a placement.

Loads ``[layers, experts]``, or a window ``[steps, layers, experts]`` summed
over its steps (``--decay`` weights recent steps more), come from a file
chosen by its suffix (:func:`load_weight`: eplb_jax's ``.npy``, ``.npz``,
``.json``, ``.csv`` and the SGLang / sglang-jax recorder files), or from a
built-in model shape with synthetic skewed loads when no file is given. With
``--previous`` the placement in service is kept as far as balance allows.
The command prints a short quality summary and can write the placement
(:func:`save_placement`): eplb_jax's three maps (``phy2log``, ``log2phy``,
``logcnt``) as ``.npz`` or ``.json``, or an ``--init-expert-location`` file
for SGLang or sglang-jax.

Errors in the input, the sizes or the output print ``eplb-jax: error:
<message>`` to stderr and exit with status 2; no traceback. Output files are
written atomically: a failed write leaves the previous file as it was, and an
existing file keeps its permissions. ``--output`` may not name the input or
the ``--previous`` file, and ``--allow-pickle`` applies to the input only.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eplb_jax import metrics
from eplb_jax import workloads
from eplb_jax._src import checks
from eplb_jax._src import files
from eplb_jax._src.api import rebalance
from eplb_jax._src.migration import migration_cost
from eplb_jax._src.modes import DEFAULT_MODE
from eplb_jax._src.modes import MODES
from eplb_jax._src.placement import Placement
from eplb_jax.contrib import sglang
from eplb_jax.runtime import stats

DEFAULT_SHAPE = "deepseek-v3-prefill"
INPUT_FORMATS = (".npy", ".npz", ".json", ".csv", ".pt")
KEYED_FORMATS = (".npz", ".json")
SIZE_FLAGS = ("num_replicas", "num_groups", "num_nodes", "num_gpus")
# --format -> the output suffixes it can be written as; the first format listing a suffix is
# that suffix's default.
OUTPUT_FORMATS = {
  "npz": (".npz",),
  "json": (".json",),
  "sglang": (".json", ".pt"),
  "sglang-jax": (".npy", ".json"),
}


def _input_error(what: str, path: pathlib.Path, error: BaseException) -> ValueError:
  """A ``ValueError`` for an unreadable file, naming it once."""
  message = str(error) or type(error).__name__
  if str(path) not in message:
    message = f"cannot read {what} {path}: {message}"
  return ValueError(message)


def _entry(entries: Mapping[str, Any], name: str) -> Any:
  """The entry ``name`` of an .npz archive or a JSON object."""
  if name not in entries:
    raise ValueError(f"no entry {name!r} (has {', '.join(entries) or 'none'}; pick one with --key)")
  return entries[name]


def _read_loads(path: pathlib.Path, suffix: str, key: str | None, allow_pickle: bool) -> Any:
  if suffix == ".pt":
    return sglang.read_recorder_dump(path)
  if suffix == ".npy":
    if files.npy_is_pickled(path):
      return sglang.read_sglang_jax_dump(path, allow_pickle=allow_pickle)
    return np.load(path)
  if suffix == ".npz":
    with np.load(path) as arrays:
      return _entry(arrays, key or (arrays.files or ["weight"])[0])
  if suffix == ".csv":
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # loadtxt warns on an empty file; we raise below
      weight = np.loadtxt(path, delimiter=",", ndmin=2)
    if weight.size == 0:
      raise ValueError("no rows")
    return weight
  data = files.read_json(path)
  if not isinstance(data, dict):
    return data
  if key is None and sglang.LOGICAL_COUNT in data:
    return sglang.logical_count(data[sglang.LOGICAL_COUNT], str(path))
  if key is None and "weight" not in data and sglang.PHYSICAL_TO_LOGICAL_MAP in data:
    raise ValueError("holds a placement (physical_to_logical_map), not loads; see --previous")
  return _entry(data, key or "weight")


def load_weight(
  path: pathlib.Path, key: str | None = None, *, allow_pickle: bool = False
) -> np.ndarray:
  """Reads loads ``[layers, experts]`` or a window ``[steps, layers, experts]`` from ``path``.

  Chosen by the suffix (any case):

  * ``.npy``: the array; or a pickled dict with ``logical_count`` (sglang-jax's
    recorder dump), read only with ``allow_pickle`` since unpickling runs code
    from the file;
  * ``.npz``: the array named ``key`` (default: the first);
  * ``.json``: a list of lists, or an object holding one under ``key``
    (default: ``logical_count``, SGLang's ``--init-expert-location`` loads, else
    ``weight``);
  * ``.csv``: comma-separated rows without a header;
  * ``.pt``: SGLang's expert-distribution recorder dump (``stat`` mode), read with
    ``torch.load(weights_only=True)``; needs torch.

  Returns:
    The array as stored; :func:`_problem` checks its shape and values.

  Raises:
    ValueError: an unknown suffix, ``key`` with a format that has no names, or
      a missing, unreadable or corrupt file (the message names the file).
  """
  suffix = path.suffix.lower()
  if suffix not in INPUT_FORMATS:
    raise ValueError(f"INPUT must end in one of {', '.join(INPUT_FORMATS)}, got {path.name!r}")
  if key is not None and suffix not in KEYED_FORMATS:
    raise ValueError(f"--key applies to {' and '.join(KEYED_FORMATS)} inputs, not {suffix}")
  try:
    data = _read_loads(path, suffix, key, allow_pickle)
    return np.asarray(data)
  except Exception as error:  # corrupt files: NumPy, zipfile, json, pickle, torch raise many types
    raise _input_error("INPUT", path, error) from None


def load_previous(path: pathlib.Path, num_replicas: int) -> np.ndarray:
  """Reads the placement in service ``phy2log [layers, slots]`` for ``--previous``.

  Takes what ``plan --output`` writes: eplb_jax's ``.npz`` / ``.json`` maps
  (``phy2log``; the empty list of a 0-layer plan reads as ``[0,
  num_replicas]``), or an ``--init-expert-location`` file with
  ``physical_to_logical_map`` (``.json``, ``.pt``, a bare array ``.npy``).
  Never unpickles: ``--allow-pickle`` applies to INPUT only, and no file
  that ``plan`` writes is pickled.
  """
  suffix = path.suffix.lower()
  try:
    if suffix == ".npz":
      with np.load(path) as maps:
        return np.asarray(_entry(maps, "phy2log"))
    if suffix == ".json":
      data = files.read_json(path)
      if isinstance(data, dict) and "phy2log" in data:
        phy2log = np.asarray(data["phy2log"])
        if phy2log.shape == (0,):  # JSON keeps no shape for an empty list
          return np.zeros((0, num_replicas), np.int32)
        return phy2log
    if suffix == ".npy" and path.is_file() and files.npy_is_pickled(path):
      raise ValueError(
        "holds a pickled object, and --previous never unpickles (--allow-pickle applies to "
        "INPUT only); give a placement as plan --output writes it"
      )
    return sglang.read_physical_to_logical_map(path)
  except Exception as error:  # as load_weight
    raise _input_error("--previous", path, error) from None


def output_format(output: pathlib.Path, name: str | None) -> str:
  """The ``--format`` of ``output``: ``name``, checked against the suffix, or the suffix's."""
  suffix = output.suffix.lower()
  if name is None:
    for fmt, suffixes in OUTPUT_FORMATS.items():
      if suffix in suffixes:
        return fmt
    known = sorted({s for suffixes in OUTPUT_FORMATS.values() for s in suffixes})
    raise ValueError(f"--output must end in one of {', '.join(known)}, got {output.name!r}")
  if suffix not in OUTPUT_FORMATS[name]:
    raise ValueError(
      f"--output for --format {name} must end in {' or '.join(OUTPUT_FORMATS[name])}, "
      f"got {output.name!r}"
    )
  return name


def save_placement(path: pathlib.Path, fmt: str, placement: Placement) -> None:
  """Writes ``placement`` to ``path`` in ``fmt`` (see ``OUTPUT_FORMATS``), atomically.

  ``npz`` / ``json``: ``phy2log``, ``log2phy``, ``logcnt``. ``sglang`` /
  ``sglang-jax``: ``{"physical_to_logical_map": phy2log}`` (``.json``; ``.pt``
  for SGLang; a bare array ``.npy`` for sglang-jax), for ``--init-expert-location``.
  """
  maps = {name: np.asarray(value) for name, value in placement._asdict().items()}
  if fmt == "npz":
    files.write_atomic(path, lambda file: np.savez(file, **maps))
  elif fmt == "json":
    text = json.dumps({name: value.tolist() for name, value in maps.items()}).encode()
    files.write_atomic(path, lambda file: file.write(text))
  else:
    sglang.write_physical_to_logical_map(path, maps["phy2log"])


def contiguous_loads(weight: np.ndarray, num_gpus: int) -> np.ndarray:
  """GPU loads ``[L, num_gpus]`` of the naive placement: no replicas, expert ``e`` on
  GPU ``e * num_gpus // E`` (contiguous blocks of experts)."""
  num_experts = weight.shape[1]
  gpu = np.arange(num_experts) * num_gpus // num_experts
  return weight @ (gpu[:, None] == np.arange(num_gpus)).astype(weight.dtype)


def failed_gpus(text: str | None) -> tuple[int, ...]:
  """The GPU ids of ``--failed-gpus``: comma-separated ints (range checks: :class:`Topology`)."""
  if text is None:
    return ()
  try:
    return tuple(int(gpu) for gpu in text.split(","))
  except ValueError:
    raise ValueError(f"--failed-gpus must be comma-separated GPU ids, got {text!r}") from None


def _problem(args: argparse.Namespace) -> tuple[workloads.Shape, np.ndarray, str]:
  """The shape, loads ``[L, E]`` and a description of where the loads come from."""
  if args.input is not None and args.shape is not None:
    raise ValueError("give either INPUT or --shape, not both")
  if args.decay is not None and not 0.0 < args.decay <= 1.0:
    raise ValueError(f"--decay must be in (0, 1], got {args.decay}")
  if args.input is None:
    name = args.shape or DEFAULT_SHAPE
    base = workloads.SHAPES[name]
    weight = workloads.skewed_loads(base.num_layers, base.num_experts, seed=0)
    source = f"{name} (built-in example, skewed loads, seed 0)"
    defaults = dict(zip(SIZE_FLAGS, base.sizes, strict=True))
  else:
    path = pathlib.Path(args.input)
    weight = load_weight(path, args.key, allow_pickle=args.allow_pickle)
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
  weight = checks.check_weight(weight, window=True)  # ValueError for bad shapes and dtypes
  if weight.ndim == 3:
    source += f" (window of {weight.shape[0]} steps, " + (
      "summed)" if args.decay is None else f"decay {args.decay})"
    )
  elif args.decay is not None:
    raise ValueError(f"--decay needs a window [steps, layers, experts], got shape {weight.shape}")
  shape = workloads.Shape(
    name, *weight.shape[-2:], **sizes, failed_gpus=failed_gpus(args.failed_gpus)
  )
  shape.topology.check_experts(shape.num_experts)
  checks.check_weight_values(weight)  # ValueError for negative, NaN, inf loads
  if weight.ndim == 3 and args.decay is None:
    weight = checks.sum_window(weight)  # as rebalance sums a window: the same loads, bit for bit
  elif weight.ndim == 3:
    # Each layer's steps scaled together, as for the sum, so that the decayed sum stays finite.
    weight = stats.decayed_load(jnp.swapaxes(checks.layer_steps(weight), 0, 1), args.decay)
  return shape, np.asarray(weight, np.float64), source


def _timed_rebalance(weight: np.ndarray, shape: workloads.Shape, mode: str, previous):
  """Runs ``rebalance`` twice: returns the placement and both wall times in ms."""
  times = []
  for _ in range(2):
    start = time.perf_counter()
    placement = jax.block_until_ready(
      rebalance(weight, shape.topology, mode=mode, previous_phy2log=previous)
    )
    times.append(1e3 * (time.perf_counter() - start))
  return placement, times


def _summary(weight, shape, placement, times, previous) -> None:
  # Balance over the active GPUs, against the bound of their problem. Every figure is a ratio of
  # one layer's loads: each layer is scaled by the power of two (exact) that keeps its sum within
  # float32, in which the bound is computed, and GPU loads are summed in float64, so that finite
  # loads give finite figures.
  active = shape.topology.survivors()
  weight = checks.sanitize_weight(jnp.asarray(weight, jnp.float32))
  before = metrics.layer_balancedness(
    contiguous_loads(np.asarray(weight, np.float64), active.num_gpus)
  )
  replica = np.asarray(placement.replica_loads(weight), np.float64)
  loads = replica.reshape(shape.num_layers, shape.num_gpus, -1).sum(-1)
  loads = loads[:, np.asarray(shape.topology.active_gpus)]
  after = metrics.layer_balancedness(loads)
  bound = metrics.lower_bound(weight, shape.topology)
  bound = np.asarray(bound, np.float64)
  peak = loads.max(axis=-1)
  ratio = np.where(bound > 0, peak / np.where(bound > 0, bound, 1), 1.0)  # all-zero layers: 1
  worst = int(np.argmin(after))
  print(
    f"  balancedness  {float(np.mean(before)):.4f} before (contiguous, no replicas) -> "
    f"{float(after.mean()):.4f} after"
  )
  print(f"  worst layer   {worst}: balancedness {after[worst]:.4f}")
  print(f"  max / bound   {ratio.mean():.4f} mean, {ratio.max():.4f} worst (1 = provably optimal)")
  if previous is not None:
    moved, changed = migration_cost(previous, placement.phy2log, shape.num_gpus)
    print(
      f"  migration     {int(np.sum(moved))} replicas moved onto GPUs, "
      f"{int(np.sum(changed))} slots changed (from --previous)"
    )
  first_ms, compiled_ms = times
  print(
    f"  time          {first_ms:.1f} ms first call (trace, compile or load from the cache), "
    f"{compiled_ms:.2f} ms compiled"
  )


def default_cache_dir() -> pathlib.Path:
  """``$XDG_CACHE_HOME/eplb_jax``, or ``~/.cache/eplb_jax``."""
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "eplb_jax"


def _compile_cache(args: argparse.Namespace) -> None:
  """Keeps compiled programs between runs (JAX's persistent compilation cache).

  Each run is a fresh process, so without it every run pays the compilation
  (seconds) again. ``--cache-dir`` names the directory; without it a cache
  directory the user gave JAX (``JAX_COMPILATION_CACHE_DIR``) is kept, else
  :func:`default_cache_dir` is used, and if that cannot be created the run
  goes on without a cache. ``--no-cache`` turns the cache off.
  """
  if args.no_cache:
    jax.config.update("jax_enable_compilation_cache", False)
    return
  if args.cache_dir is None and jax.config.jax_compilation_cache_dir:
    return
  path = pathlib.Path(args.cache_dir or default_cache_dir()).expanduser()
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    if args.cache_dir is not None:
      raise ValueError(f"--cache-dir {path}: cannot create it ({error.strerror})") from None
    print(f"eplb-jax: warning: no compile cache, cannot create {path}", file=sys.stderr)
    return
  jax.config.update("jax_compilation_cache_dir", str(path))


def _same_file(path: pathlib.Path, other: str | None) -> bool:
  """Whether ``path`` and ``other`` name one existing file (through links and ``..`` too)."""
  try:
    return other is not None and os.path.samefile(path, other)
  except OSError:  # either is missing or unreadable: not one existing file
    return False


def plan(args: argparse.Namespace) -> int:
  """The ``plan`` subcommand: balance, summarise, optionally write the placement."""
  _compile_cache(args)  # before anything compiles: JAX sets its cache up on first use
  output = pathlib.Path(args.output) if args.output else None
  if output is None and args.format is not None:
    raise ValueError("--format needs --output")
  fmt = None if output is None else output_format(output, args.format)
  for flag, read in (("the INPUT file", args.input), ("the --previous file", args.previous)):
    if output is not None and _same_file(output, read):
      raise ValueError(f"--output {output} is {flag}: writing it would replace what it holds")
  shape, weight, source = _problem(args)
  if shape.failed_gpus and fmt in ("sglang", "sglang-jax"):
    raise ValueError(
      f"--format {fmt} cannot hold the empty slots (-1) of --failed-gpus (the engines' "
      "files have no empty slot); write npz or json"
    )
  previous = None
  if args.previous is not None:
    previous = load_previous(pathlib.Path(args.previous), shape.num_replicas)

  print(f"eplb-jax plan: {source}")
  print(
    f"  problem       {shape.num_layers} layers x {shape.num_experts} experts -> "
    f"{shape.num_replicas} slots; groups {shape.num_groups}, nodes {shape.num_nodes}, "
    f"GPUs {shape.num_gpus}"
    + (f", failed {', '.join(map(str, shape.topology.failed_gpus))}" if shape.failed_gpus else "")
  )
  print(f"  policy        {shape.policy}, mode {args.mode}")
  placement, times = _timed_rebalance(weight, shape, args.mode, previous)
  if shape.num_layers == 0:
    print("  balancedness  no layers to balance")
  else:
    _summary(weight, shape, placement, times, previous)
  if output is not None:
    save_placement(output, fmt, placement)
    print(f"  wrote         {output} ({fmt})")
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="eplb-jax", description="Expert-parallelism load balancer (EPLB) for JAX."
  )
  commands = parser.add_subparsers(dest="command", required=True)
  sub = commands.add_parser(
    "plan",
    help="place experts on GPUs for loads [layers, experts]",
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
    help=(
      "loads [layers, experts] or a window [steps, layers, experts]: .npy, .npz, .json, "
      ".csv (no header), or an SGLang recorder dump .pt / sglang-jax recorder dump .npy"
    ),
  )
  sub.add_argument("--key", help="array name in an .npz (default: first) or key in a .json object")
  sub.add_argument(
    "--allow-pickle",
    action="store_true",
    help="read a pickled .npy dict (sglang-jax's dump) as INPUT; unpickling runs code: trusted "
    "files only. Applies to INPUT only: --previous never unpickles",
  )
  sub.add_argument(
    "--decay",
    type=float,
    help="weight a window's steps by DECAY**age (newest last) instead of summing them",
  )
  sub.add_argument("--shape", choices=sorted(workloads.SHAPES), help="built-in example shape")
  sub.add_argument("--num-replicas", type=int, help="physical expert slots in total")
  sub.add_argument("--num-groups", type=int, help="expert groups (hierarchical policy)")
  sub.add_argument("--num-nodes", type=int, help="server nodes")
  sub.add_argument("--num-gpus", type=int, help="GPUs in total")
  sub.add_argument(
    "--failed-gpus",
    metavar="IDS",
    help="comma-separated ids of failed GPUs (e.g. 3,7): replicas go only to the others, the "
    "failed GPUs' slots hold -1 (npz/json output only); balance is reported over the others",
  )
  sub.add_argument(
    "--mode", choices=tuple(MODES), default=DEFAULT_MODE, help=f"default: {DEFAULT_MODE}"
  )
  sub.add_argument(
    "--previous",
    metavar="PLACEMENT",
    help="placement in service (a plan --output file or an --init-expert-location file, never "
    "a pickled one): keep replicas where they are as far as balance allows",
  )
  sub.add_argument(
    "--output", metavar="PATH", help="write the placement to PATH (not INPUT or --previous)"
  )
  sub.add_argument(
    "--format",
    choices=tuple(OUTPUT_FORMATS),
    help="npz/json: the three maps; sglang (.json, .pt) / sglang-jax (.npy, .json): "
    "an --init-expert-location file. Default from PATH's suffix: .npz npz, .json json, "
    ".pt sglang, .npy sglang-jax",
  )
  cache = sub.add_mutually_exclusive_group()
  cache.add_argument(
    "--cache-dir",
    metavar="DIR",
    help="keep compiled programs in DIR between runs (default: JAX_COMPILATION_CACHE_DIR if "
    "set, else $XDG_CACHE_HOME/eplb_jax or ~/.cache/eplb_jax); a later run with the same "
    "sizes and mode skips the compilation",
  )
  cache.add_argument("--no-cache", action="store_true", help="compile without the cache")
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
  except (ValueError, OSError, ImportError) as error:
    print(f"eplb-jax: error: {error}", file=sys.stderr)
    return 2
