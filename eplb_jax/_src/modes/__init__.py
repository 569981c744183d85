"""Placement modes: how replica counts are chosen and replicas packed, as hashable config values.

One module per mode, each a frozen dataclass implementing :class:`.base.Mode`:
:mod:`.greedy` (DeepSeek's placement), :mod:`.refined` (a better packing of
DeepSeek's counts) and :mod:`.gpu_aware` (the default). A mode is passed as
a static argument through the jitted core, so its fields are plain Python
values and two equal modes share one compiled program. ``mode="gpu_aware"``,
``mode="refined"`` and ``mode="greedy"`` name the defaults of
:class:`GpuAware`, :class:`Refined` and :class:`Greedy`; an instance sets the
knobs.
"""

from __future__ import annotations

from eplb_jax._src.modes.base import Mode
from eplb_jax._src.modes.gpu_aware import GpuAware
from eplb_jax._src.modes.greedy import Greedy
from eplb_jax._src.modes.refined import Refined

MODES = {mode.name: mode for mode in (GpuAware(), Refined(), Greedy())}
DEFAULT_MODE = "gpu_aware"

__all__ = ["DEFAULT_MODE", "MODES", "GpuAware", "Greedy", "Mode", "Refined", "check_mode"]


def check_mode(mode: object) -> Mode:
  """Returns the mode named or given by ``mode``, or raises ``ValueError``."""
  if isinstance(mode, Mode):
    return mode
  if isinstance(mode, str) and mode in MODES:
    return MODES[mode]
  *others, last = (type(default).__name__ for default in MODES.values())
  raise ValueError(
    f"mode must be one of {tuple(MODES)} or a {', '.join(others)} or {last} instance, got {mode!r}"
  )
