"""Pieces a training or serving step uses around the balancer, each pure and jit-friendly.

* :mod:`.stats`: router top-k ids to per-expert counts, and load windows;
* :mod:`.dispatch`: which physical slot serves each routed token;
* :mod:`.params`: expert parameters (and their optimizer state) laid out by a placement;
* :mod:`.moe`: an expert-parallel MoE layer with per-slot capacity, and its logical reference.
"""

from eplb_jax.runtime import dispatch
from eplb_jax.runtime import moe
from eplb_jax.runtime import params
from eplb_jax.runtime import stats

__all__ = ["dispatch", "moe", "params", "stats"]
