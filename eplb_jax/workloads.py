"""Built-in model shapes and synthetic skewed expert loads.

Used by the CLI's built-in example and by the benchmarks. Loads are
log-normal per layer, with a few hot experts per layer boosted further, which
is the shape router statistics of real MoE models take.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from eplb_jax._src.topology import Topology


@dataclasses.dataclass(frozen=True)
class Shape:
  """A balancing problem: ``num_layers x num_experts`` loads onto ``num_replicas`` slots.

  ``failed_gpus`` names GPUs that hold no replica (see :attr:`Topology.failed_gpus`).
  """

  name: str
  num_layers: int
  num_experts: int
  num_replicas: int
  num_groups: int
  num_nodes: int
  num_gpus: int
  failed_gpus: tuple[int, ...] = ()

  @property
  def sizes(self) -> tuple[int, int, int, int]:
    """``(num_replicas, num_groups, num_nodes, num_gpus)``, in ``rebalance_experts`` order."""
    return self.num_replicas, self.num_groups, self.num_nodes, self.num_gpus

  @property
  def topology(self) -> Topology:
    return Topology(*self.sizes, failed_gpus=self.failed_gpus)

  @property
  def policy(self) -> str:
    """The policy the balancer applies: that of the active GPUs' problem."""
    return self.topology.survivors().policy


SHAPES = {
  s.name: s
  for s in (
    Shape("deepseek-v3-prefill", 58, 256, 288, 8, 4, 32),
    Shape("deepseek-v3-ep64", 58, 256, 320, 8, 8, 64),
    Shape("qwen3-30b-a3b", 48, 128, 160, 1, 2, 16),
    Shape("kimi-k2", 61, 384, 448, 1, 8, 64),
    Shape("ep128-512e", 60, 512, 640, 8, 16, 128),
  )
}


def skewed_loads(
  num_layers: int,
  num_experts: int,
  *,
  seed: int = 0,
  sigma: float = 1.0,
  hot_experts: int = 4,
  hot_factor: float = 8.0,
  tokens_per_expert: float = 1000.0,
) -> np.ndarray:
  """Synthetic router statistics ``[num_layers, num_experts]``, float32.

  Each layer draws log-normal loads (``sigma`` sets the skew), then multiplies
  ``hot_experts`` randomly chosen experts by a factor between 1 and
  ``hot_factor``. Values are token counts around ``tokens_per_expert``, with a
  fractional part so that the loads are tie-free.
  """
  rng = np.random.default_rng(seed)
  loads = rng.lognormal(0.0, sigma, size=(num_layers, num_experts))
  for layer in loads:
    hot = rng.choice(num_experts, size=min(hot_experts, num_experts), replace=False)
    layer[hot] *= rng.uniform(1.0, hot_factor, size=hot.shape)
  return (tokens_per_expert * loads).astype(np.float32)
