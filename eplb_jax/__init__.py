"""eplb_jax: a jit-compiled expert-parallelism load balancer for JAX.

Pipeline: statistics -> replication -> packing -> placement maps.
"""

from eplb_jax import metrics
from eplb_jax.packing import balanced_packing
from eplb_jax.placement import rebalance_experts
from eplb_jax.placement import rebalance_experts_hierarchical
from eplb_jax.replication import replicate_experts

__version__ = "0.1.0"

__all__ = [
  "balanced_packing",
  "metrics",
  "rebalance_experts",
  "rebalance_experts_hierarchical",
  "replicate_experts",
]
