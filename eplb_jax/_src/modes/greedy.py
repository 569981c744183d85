"""The greedy mode: DeepSeek's placement, reproduced exactly.

Water-filling counts and DeepSeek's greedy packing (:func:`.packing.greedy_slots`)
of the groups onto nodes and of the replicas onto GPUs: :class:`.base.Mode`'s
pipeline with the greedy packer.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from eplb_jax._src import packing
from eplb_jax._src.modes.base import Mode
from eplb_jax._src.problem import PackingProblem


@dataclasses.dataclass(frozen=True)
class Greedy(Mode):
  """DeepSeek's greedy placement, reproduced exactly.

  Items in descending load order (stable), each into the lightest pack that
  is not full (ties to the lower pack).
  """

  name = "greedy"

  def pack_rows(self, problem: PackingProblem, num_packs: int, domains_per_layer: int) -> jax.Array:
    del domains_per_layer  # every row is packed on its own
    return jax.vmap(functools.partial(packing.greedy_slots, num_packs=num_packs))(problem.weight)
