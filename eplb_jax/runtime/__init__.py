"""Pieces a training or serving step uses around the balancer, each pure and jit-friendly.

* :mod:`.stats`: router top-k ids to per-expert counts, and load windows;
* :mod:`.dispatch`: which physical slot serves each routed token;
* :mod:`.params`: expert parameters laid out by a placement.
"""

from eplb_jax.runtime import dispatch
from eplb_jax.runtime import params
from eplb_jax.runtime import stats

__all__ = ["dispatch", "params", "stats"]
