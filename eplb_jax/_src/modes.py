"""Placement modes: how replica counts are chosen and replicas packed, as hashable config values.

A mode is passed as a static argument through the jitted core, so its fields
are plain Python values and two equal modes share one compiled program.
``mode="gpu_aware"`` (the default), ``mode="refined"`` and ``mode="greedy"``
name the defaults of :class:`GpuAware`, :class:`Refined` and :class:`Greedy`;
an instance sets the knobs.
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


@dataclasses.dataclass(frozen=True)
class GpuAware:
  """Replica counts chosen for the heaviest GPU, not the heaviest replica (the default).

  A step takes as long as its most loaded GPU. Water-filling (DeepSeek's
  counts) minimises the largest *replica*; on skewed loads that can leave a
  hot expert with a count that does not tile the GPUs (5 + 5 replicas on 8
  GPUs puts two replicas on two GPUs, where 4 + 4 would not). So each packing
  domain (a node of a layer on the hierarchical policy, a layer on the
  global one), with ``R`` spare slots, tries a few counts and keeps the one
  whose packing has the lightest heaviest GPU:

  1. candidate ``j``, for ``j`` in ``{0, 1, 2, 3}`` and the powers of two up
     to ``ceil(R / 2)``: the first ``R - j`` replicas of the water-filling,
     then one more replica for each of the ``j`` heaviest experts that still
     have one (``j = 0`` is DeepSeek's counts; more candidates gain little:
     the best ``j`` is small where ``R`` is);
  2. every candidate is packed by balanced differencing, the one with the
     lightest heaviest GPU kept (ties to the smaller ``j``) and refined by
     swaps as :class:`Refined` does (``refined``), here until a full
     rotation of exchanges finds none (the refinement's own stopping rule),
     with a cap of 64 steps rather than 16 as a bound on the cost;
  3. DeepSeek's greedy packing of DeepSeek's counts is also a candidate,
     refined by up to ``greedy_steps`` single-head swaps (the heaviest
     GPU's best exchange with any other; on the hierarchical policy in the
     two nodes of each layer with the heaviest GPUs), which is the min-max
     refinement of the greedy that published balancers add to DeepSeek's;
     the lighter of (2) and (3) is kept (ties to (2));
  4. on the hierarchical policy with more than two groups per node, the
     expert groups are packed onto nodes three ways (greedy, refined, and
     greedy refined by single-head swaps), each runs 1-3, and each layer
     keeps the one with the lightest heaviest GPU (ties to greedy's);
  5. two replicas of one expert share a GPU only when no exchange of one of
     them with a replica of another expert, on a GPU of the domain that
     holds neither, keeps both GPUs at or under the domain's heaviest.

  Properties, by construction: every layer's heaviest GPU is at most that
  of :class:`Greedy` (DeepSeek's placement is among the candidates and no
  step raises a heaviest GPU), with or without spare slots; and (5) holds.

  Attributes:
    refined: the differencing and swap refinement of the kept candidate
      (and of the refined group packing); its ``max_steps`` defaults to 64.
    greedy_steps: the most single-head swap steps for greedy's packing (3)
      and for greedy's groups-to-nodes packing (4).
  """

  refined: Refined = Refined(max_steps=64)
  greedy_steps: int = 50

  name = "gpu_aware"

  def __post_init__(self):
    if not isinstance(self.refined, Refined):
      raise ValueError(f"refined must be a Refined instance, got {self.refined!r}")
    steps = self.greedy_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
      raise ValueError(f"greedy_steps must be a non-negative int, got {steps!r}")


Mode = Greedy | Refined | GpuAware
MODES = {"gpu_aware": GpuAware(), "refined": Refined(), "greedy": Greedy()}
DEFAULT_MODE = "gpu_aware"


def check_mode(mode: object) -> Mode:
  """Returns the mode named or given by ``mode``, or raises ``ValueError``."""
  if isinstance(mode, Greedy | Refined | GpuAware):
    return mode
  if isinstance(mode, str) and mode in MODES:
    return MODES[mode]
  raise ValueError(
    f"mode must be one of {tuple(MODES)} or a GpuAware, Refined or Greedy instance, got {mode!r}"
  )
