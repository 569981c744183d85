"""A small MoE problem the layer tests share: one layer of 8 experts on 16 slots, top-2.

``from moe_problem import ...`` (the root conftest's directory is on ``sys.path``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import eplb_jax
from eplb_jax.runtime import moe

MOE_EXPERTS, MOE_SLOTS, MOE_TOKENS, MOE_DIMS, MOE_TOP_K = 8, 16, 128, (8, 16), 2


# The ready ReLU MLP: one slot's rows, or (with group_sizes) a device's slots on ragged groups.
moe_mlp = moe.expert_mlp


def moe_placement(load, seed=0):
  """One layer's placement of ``MOE_SLOTS`` slots: replicas for the heaviest ``load / count``,
  then the slots shuffled, so replicas of an expert sit on different devices."""
  logcnt = np.ones(MOE_EXPERTS, np.int32)
  for _ in range(MOE_SLOTS - MOE_EXPERTS):
    logcnt[np.argmax(load / logcnt)] += 1
  phy2log = np.random.default_rng(seed).permutation(np.repeat(np.arange(MOE_EXPERTS), logcnt))
  log2phy = np.full((MOE_EXPERTS, MOE_SLOTS - MOE_EXPERTS + 1), -1, np.int32)
  for expert in range(MOE_EXPERTS):
    slots = np.flatnonzero(phy2log == expert)
    log2phy[expert, : len(slots)] = slots
  return eplb_jax.Placement(*map(jnp.asarray, (phy2log.astype(np.int32), log2phy, logcnt)))


def moe_problem(seed=0):
  """Logical weights, tokens, skewed routing and a placement for its loads."""
  d, h = MOE_DIMS
  keys = jax.random.split(jax.random.key(seed), 5)
  logical = {
    "w_in": jax.random.normal(keys[0], (MOE_EXPERTS, d, h)) / np.sqrt(d),
    "w_out": jax.random.normal(keys[1], (MOE_EXPERTS, h, d)) / np.sqrt(h),
  }
  x = jax.random.normal(keys[2], (MOE_TOKENS, d))
  skew = 1.5 * jax.random.normal(keys[3], (MOE_EXPERTS,))
  logits = jax.random.normal(keys[4], (MOE_TOKENS, MOE_EXPERTS)) + skew
  gates, ids = moe.top_k_routing(logits, MOE_TOP_K)
  load = np.bincount(np.asarray(ids).ravel(), minlength=MOE_EXPERTS)
  return logical, x, gates, ids, moe_placement(load, seed)
