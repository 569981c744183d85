"""eplb_jax: a jit-compiled expert-parallelism load balancer for JAX.

Pipeline: statistics -> replication -> packing -> placement maps
-> (sharding, migration). :func:`rebalance_experts` (DeepSeek's signature)
and :func:`rebalance` (on a :class:`Topology`) are the entry points; they
return a :class:`Placement`; :func:`expert_location` turns it into the
per-GPU dispatch maps a serving engine needs. :mod:`eplb_jax.runtime` holds the pieces a
training step uses around them, :mod:`eplb_jax.metrics` the quality
measures, and :mod:`eplb_jax.contrib` adapters with optional dependencies.
"""

from eplb_jax import metrics
from eplb_jax import runtime
from eplb_jax._src.api import rebalance
from eplb_jax._src.api import rebalance_with_previous
from eplb_jax._src.deepseek import balanced_packing
from eplb_jax._src.deepseek import rebalance_experts
from eplb_jax._src.deepseek import rebalance_experts_hierarchical
from eplb_jax._src.deepseek import replicate_experts
from eplb_jax._src.gate import GatedPlacement
from eplb_jax._src.gate import gate_placement
from eplb_jax._src.gate import gated_rebalance
from eplb_jax._src.location import ExpertLocation
from eplb_jax._src.location import expert_location
from eplb_jax._src.migration import migration_cost
from eplb_jax._src.modes import GpuAware
from eplb_jax._src.modes import Greedy
from eplb_jax._src.modes import Refined
from eplb_jax._src.placement import Placement
from eplb_jax._src.spares import SparePlan
from eplb_jax._src.spares import plan_spare_slots
from eplb_jax._src.split import split_probabilities
from eplb_jax._src.split import split_tokens
from eplb_jax._src.steps import rebalance_for_steps
from eplb_jax._src.topology import Topology

__version__ = "0.2.0"

__all__ = [
  "ExpertLocation",
  "GatedPlacement",
  "GpuAware",
  "Greedy",
  "Placement",
  "Refined",
  "SparePlan",
  "Topology",
  "balanced_packing",
  "expert_location",
  "gate_placement",
  "gated_rebalance",
  "metrics",
  "migration_cost",
  "plan_spare_slots",
  "rebalance",
  "rebalance_experts",
  "rebalance_experts_hierarchical",
  "rebalance_for_steps",
  "rebalance_with_previous",
  "replicate_experts",
  "runtime",
  "split_probabilities",
  "split_tokens",
]
