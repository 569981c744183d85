"""eplb_jax: a jit-compiled expert-parallelism load balancer for JAX.

Pipeline: statistics -> replication -> packing -> placement maps
-> (sharding, migration). ``rebalance_experts`` is the entry point.
"""

from eplb_jax import dispatch
from eplb_jax import metrics
from eplb_jax import stats
from eplb_jax import weights
from eplb_jax.api import rebalance_experts
from eplb_jax.migration import migration_cost
from eplb_jax.migration import rebalance_with_previous
from eplb_jax.packing import balanced_packing
from eplb_jax.placement import rebalance_experts_hierarchical
from eplb_jax.replication import replicate_experts

__version__ = "0.1.0"

__all__ = [
  "balanced_packing",
  "dispatch",
  "metrics",
  "migration_cost",
  "rebalance_experts",
  "rebalance_experts_hierarchical",
  "rebalance_with_previous",
  "replicate_experts",
  "stats",
  "weights",
]
