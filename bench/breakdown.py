"""Where the time of one placement goes, stage by stage, on one CPU core.

Times each stage of the pipeline on its own, with the inputs the placement
gives it, next to the whole call (jitted; pinned to one core; the stages
take turns in rounds, best of the repeats):

    python bench/breakdown.py                       # all built-in shapes
    python bench/breakdown.py --shapes kimi-k2 --markdown bench/results/breakdown.md

The stages overlap with nothing, but XLA fuses across them inside the whole
call, so they need not add up to it exactly. "Refined packing" is the
placement's packing step; the "refinement alone" stages run on the rows it
refines (on the hierarchical path, two nodes per layer), every row with the
full step budget (the placement gives one of each layer's two nodes only its
first 6 steps) or with no budget, to show what the budget saves.
"""

from __future__ import annotations

import one_core  # first: XLA flags for one core

# isort: split

import argparse
import functools
import pathlib
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from eplb_jax import Greedy
from eplb_jax import Refined
from eplb_jax import workloads
from eplb_jax._src import ops
from eplb_jax._src import packing
from eplb_jax._src import placement
from eplb_jax._src import replication
from eplb_jax._src import swap
from eplb_jax._src.problem import PackingProblem

REFINED = Refined()


def _best_ms(stages: dict[str, tuple[Callable, tuple]], repeats: int, rounds: int) -> dict:
  """Best wall time of each stage in ms, the stages taking turns in ``rounds``."""
  calls = {}
  for name, (fn, args) in stages.items():
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    calls[name] = functools.partial(fn, *args)
  best = dict.fromkeys(calls, float("inf"))
  with one_core.pinned():
    for _ in range(rounds):
      for name, call in calls.items():
        for _ in range(max(1, repeats // rounds)):
          start = time.perf_counter()
          jax.block_until_ready(call())
          best[name] = min(best[name], 1e3 * (time.perf_counter() - start))
  return best


def _stages(shape: workloads.Shape) -> tuple[str, dict[str, tuple[Callable, tuple]]]:
  """The packing problem, and each stage of the placement as ``(function, inputs)``."""
  topology = shape.topology
  num_nodes = topology.packing_domains().num_nodes
  weight = jnp.asarray(workloads.skewed_loads(shape.num_layers, shape.num_experts), jnp.float32)
  # Replication and packing run per (layer, node); contiguous node slices
  # stand in for the groups-to-nodes split, which does not change the cost.
  node_load = weight.reshape(-1, shape.num_experts // num_nodes)
  node_slots = shape.num_replicas // num_nodes
  phy2log, _, logcnt = replication.replicate_rows(node_load, node_slots)
  items = jnp.take_along_axis(node_load / logcnt, phy2log, axis=-1)
  packs = shape.num_gpus // num_nodes
  differencing = jax.vmap(functools.partial(packing.differencing_slots, num_packs=packs))
  start, loads = jax.jit(differencing)(items)
  chosen = swap.heaviest_rows(loads.max(axis=1), num_nodes, REFINED.rows_per_layer)
  if chosen is None:
    chosen = jnp.arange(items.shape[0])
  refined_items, refined_start = items[chosen], start[chosen]

  def pack(mode):
    return lambda x, e: packing.pack_slots(PackingProblem(x, e), packs, mode, num_nodes)

  def refine(max_steps):
    return jax.vmap(
      functools.partial(
        swap.refine_slots, max_steps=max_steps, packs_per_group=REFINED.packs_per_group
      )
    )

  problem = f"{items.shape[0]} x {items.shape[1]} -> {packs} ({chosen.shape[0]} rows refined)"
  return problem, {
    "whole call, greedy": (lambda w: placement.place(w, topology, Greedy()), (weight,)),
    "whole call, refined": (lambda w: placement.place(w, topology, REFINED), (weight,)),
    "replication": (lambda w: replication.replicate_rows(w, node_slots), (node_load,)),
    "sort of the replicas, exact (greedy)": (ops.argsort_descending, (items,)),
    "sort of the replicas, coarse (refined)": (
      functools.partial(ops.argsort_descending, exact=False),
      (items,),
    ),
    "greedy packing (sort included)": (pack(Greedy()), (items, phy2log)),
    "differencing start (sort included)": (differencing, (items,)),
    "refined packing (differencing + refinement)": (pack(REFINED), (items, phy2log)),
    f"refinement alone, {REFINED.max_steps} steps per row": (
      refine(REFINED.max_steps),
      (refined_items, refined_start),
    ),
    "refinement alone, converged": (refine(1 << 20), (refined_items, refined_start)),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", nargs="*", default=list(workloads.SHAPES))
  parser.add_argument("--repeats", type=int, default=40)
  parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of them")
  parser.add_argument("--markdown", type=pathlib.Path, help="also write the table here")
  args = parser.parse_args()

  lines = [
    f"jax {jax.__version__} on {jax.default_backend()}, one core; best of {args.repeats}"
    f" calls in {args.rounds} interleaved rounds",
    "",
    "| shape | rows x items -> packs | stage | ms |",
    "|---|---|---|---:|",
  ]
  for name in args.shapes:
    problem, stages = _stages(workloads.SHAPES[name])
    for stage, ms in _best_ms(stages, args.repeats, args.rounds).items():
      lines.append(f"| {name} | {problem} | {stage} | {ms:.2f} |")
      print(lines[-1], flush=True)
  text = "\n".join(lines) + "\n"
  print()
  print(text)
  if args.markdown:
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(text)


if __name__ == "__main__":
  main()
