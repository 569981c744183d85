"""Pieces a training or serving step uses around the balancer, each pure and jit-friendly.

* :mod:`.stats`: router top-k ids to per-expert counts, and load windows;
* :mod:`.dispatch`: which physical slot serves each routed token;
* :mod:`.params`: expert parameters (and their optimizer state) laid out by a placement, and
  moved to a new one a few layers per step;
* :mod:`.moe`: an expert-parallel MoE layer (per-slot or per-device capacity, even or balanced
  split, spare slots filled every step) and its logical reference.
"""

from eplb_jax.runtime import dispatch
from eplb_jax.runtime import moe
from eplb_jax.runtime import params
from eplb_jax.runtime import stats

__all__ = ["dispatch", "moe", "params", "stats"]
