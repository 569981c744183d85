"""The refined mode: DeepSeek's counts, packed by balanced differencing plus swap refinement.

The packing (groups onto nodes, replicas onto GPUs) starts from the
balanced largest differencing method (:func:`.packing.differencing_slots`);
swap refinement (:mod:`eplb_jax._src.swap`) then lowers its heaviest packs,
never making the heaviest pack heavier. When the rows are the nodes of
layers, only each layer's rows with the heaviest packs are refined.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from eplb_jax._src import ops
from eplb_jax._src import packing
from eplb_jax._src import swap
from eplb_jax._src.modes.base import Mode
from eplb_jax._src.problem import PackingProblem
from eplb_jax._src.topology import check_size


@dataclasses.dataclass(frozen=True)
class Refined(Mode):
  """DeepSeek's replica counts; balanced differencing start plus swap refinement.

  The fast variant of :class:`GpuAware`: the same counts as :class:`Greedy`
  (water-filling), a better packing of them.

  Attributes:
    max_steps: the most steps of a packing's swap refinement (the bound of
      its ``lax.while_loop``; under ``vmap`` the slowest row sets the count).
    packs_per_group: about this many packs per refinement group; each of the
      ``m / packs_per_group`` group heads makes one exchange per step.
    rows_per_layer: on the hierarchical policy, how many node rows of each
      layer are refined: those with the heaviest GPU after differencing (a
      layer's heaviest GPU sets its balance).
    first_round_steps: with ``rows_per_layer`` rows refined per layer, they
      all take this many steps; then only the row holding the layer's
      heaviest GPU takes the rest of ``max_steps``.
  """

  max_steps: int = 16
  packs_per_group: int = 8
  rows_per_layer: int = 2
  first_round_steps: int = 6

  name = "refined"

  def __post_init__(self):
    for field in dataclasses.fields(self):
      object.__setattr__(self, field.name, check_size(getattr(self, field.name), field.name))
    if self.first_round_steps > self.max_steps:
      raise ValueError(
        f"first_round_steps must be at most max_steps ({self.max_steps}), "
        f"got {self.first_round_steps}"
      )

  def pack_rows(self, problem: PackingProblem, num_packs: int, domains_per_layer: int) -> jax.Array:
    """Differencing plus swap refinement (:meth:`refine`)."""
    weight = problem.weight
    difference = jax.vmap(functools.partial(packing.differencing_slots, num_packs=num_packs))
    slots, start_loads = difference(weight)
    if weight.shape[1] <= 2 * num_packs:
      # Two items per pack: differencing pairs the i-th heaviest item with the
      # i-th lightest, which minimises the heaviest pack; nothing to refine.
      return slots
    return self.refine(weight, slots, start_loads.max(axis=1), domains_per_layer)

  def refine(
    self, weight: jax.Array, slots: jax.Array, heaviest: jax.Array, domains_per_layer: int
  ) -> jax.Array:
    """Swap refinement of the packings ``slots [X, m, g]`` of ``weight [X, n]``.

    ``heaviest [X]`` is each row's heaviest pack load. Of each layer's
    ``domains_per_layer`` rows, the ``rows_per_layer`` with the heaviest
    packs take ``first_round_steps`` steps; then the one of them with the
    heaviest pack takes the rest of ``max_steps``: a layer's heaviest pack
    sets its balance.
    """
    rows = swap.heaviest_rows(heaviest, domains_per_layer, self.rows_per_layer)
    if rows is None:
      return swap.refine_rows(weight, slots, self.max_steps, self.packs_per_group)
    slots = swap.refine_rows(weight, slots, self.first_round_steps, self.packs_per_group, rows)
    steps = self.max_steps - self.first_round_steps
    if steps == 0:
      return slots
    # Of each layer's refined rows, the one with the heaviest pack continues.
    per_layer = packing.heaviest_pack(weight[rows], slots[rows]).reshape(-1, self.rows_per_layer)
    again = rows[ops.argmax_first(per_layer) + jnp.arange(0, rows.shape[0], self.rows_per_layer)]
    return swap.refine_rows(weight, slots, steps, self.packs_per_group, again)
