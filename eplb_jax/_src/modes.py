"""Placement modes: how replicas are packed, as small hashable config values.

A mode is passed as a static argument through the jitted core, so its fields
are plain Python values and two equal modes share one compiled program.
``mode="greedy"`` and ``mode="refined"`` name the defaults of :class:`Greedy`
and :class:`Refined`; an instance sets the knobs.
"""

from __future__ import annotations

import dataclasses

from eplb_jax._src.topology import check_size


@dataclasses.dataclass(frozen=True)
class Greedy:
  """DeepSeek's greedy placement, reproduced exactly.

  Items in descending load order (stable), each into the lightest pack that
  is not full (ties to the lower pack).
  """

  name = "greedy"


@dataclasses.dataclass(frozen=True)
class Refined:
  """Balanced differencing start plus swap refinement (the default).

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


Mode = Greedy | Refined
MODES = {"greedy": Greedy(), "refined": Refined()}


def check_mode(mode: object) -> Mode:
  """Returns the mode named or given by ``mode``, or raises ``ValueError``."""
  if isinstance(mode, Greedy | Refined):
    return mode
  if isinstance(mode, str) and mode in MODES:
    return MODES[mode]
  raise ValueError(
    f"mode must be one of {tuple(MODES)} or a Greedy or Refined instance, got {mode!r}"
  )
