"""The cluster a placement is made for: slots, expert groups, nodes and GPUs.

:class:`Topology` is the static half of a balancing problem (the loads are
the other half). It is hashable, so it is passed whole as one static
argument of the jitted core, and it owns the policy rule: DeepSeek's
hierarchical policy when the expert groups split evenly over the nodes, the
global policy (one group on one node) otherwise.
"""

from __future__ import annotations

import dataclasses
import operator

HIERARCHICAL = "hierarchical"
GLOBAL = "global"


def check_size(value: object, name: str) -> int:
  """Returns ``value`` as a positive Python int, or raises ``ValueError`` naming ``name``."""
  if isinstance(value, bool):
    raise ValueError(f"{name} must be a static Python int, got bool")
  try:
    size = operator.index(value)
  except TypeError:
    raise ValueError(f"{name} must be a static Python int, got {type(value).__name__}") from None
  if size <= 0:
    raise ValueError(f"{name} must be positive, got {size}")
  return size


@dataclasses.dataclass(frozen=True)
class Topology:
  """Physical expert slots laid out over GPUs, GPUs over nodes, experts in groups.

  Slots are numbered GPU by GPU (``slots_per_gpu`` consecutive slots per GPU)
  and GPUs node by node.

  Attributes:
    num_replicas: ``P``, physical expert slots in total; a multiple of ``num_gpus``.
    num_groups: expert groups (experts ``[i * E / num_groups, (i + 1) * E / num_groups)``
      form group ``i``); on the hierarchical policy a group stays on one node.
    num_nodes: server nodes; ``num_gpus`` must be a multiple of it.
    num_gpus: GPUs in total.

  Raises:
    ValueError: a size is not a positive int, ``num_replicas`` is not a
      multiple of ``num_gpus``, or ``num_gpus`` not a multiple of ``num_nodes``.
  """

  num_replicas: int
  num_groups: int
  num_nodes: int
  num_gpus: int

  def __post_init__(self):
    for field in dataclasses.fields(self):
      object.__setattr__(self, field.name, check_size(getattr(self, field.name), field.name))
    if self.num_replicas % self.num_gpus:
      raise ValueError(
        f"num_replicas must be a multiple of num_gpus ({self.num_gpus}), got {self.num_replicas}"
      )
    if self.num_gpus % self.num_nodes:
      raise ValueError(
        f"num_gpus must be a multiple of num_nodes ({self.num_nodes}), got {self.num_gpus}"
      )

  @property
  def policy(self) -> str:
    """``"hierarchical"`` when ``num_groups % num_nodes == 0``, else ``"global"``.

    One group on one node is ``"global"``: both policies are then the same pipeline.
    """
    if self.num_groups % self.num_nodes or self.num_groups == self.num_nodes == 1:
      return GLOBAL
    return HIERARCHICAL

  def packing_domains(self) -> Topology:
    """The topology the pipeline runs on: itself, or one group on one node for the global policy.

    The global policy is the hierarchical pipeline with a single group and a
    single node: replicas are made over all experts and packed onto all GPUs.
    """
    if self.policy == HIERARCHICAL:
      return self
    return dataclasses.replace(self, num_groups=1, num_nodes=1)

  @property
  def slots_per_gpu(self) -> int:
    return self.num_replicas // self.num_gpus

  @property
  def gpus_per_node(self) -> int:
    return self.num_gpus // self.num_nodes

  @property
  def slots_per_node(self) -> int:
    return self.num_replicas // self.num_nodes

  def max_replicas(self, num_experts: int) -> int:
    """The most replicas one expert can get: ``P - E + 1`` (the width of ``log2phy``)."""
    return self.num_replicas - num_experts + 1

  def check_experts(self, num_experts: int, *, hierarchical: bool = False) -> None:
    """Checks that ``num_experts`` logical experts fit this topology.

    Args:
      num_experts: ``E``, the number of logical experts.
      hierarchical: require the hierarchical policy's rules even where this
        topology would take the global policy.

    Raises:
      ValueError: ``num_replicas < E``; or, on the hierarchical policy,
        ``num_groups`` does not divide ``E`` (or, with ``hierarchical``, is not
        a multiple of ``num_nodes``).
    """
    if num_experts <= 0:
      raise ValueError(f"weight must have at least one expert, got {num_experts}")
    if self.num_replicas < num_experts:
      raise ValueError(
        f"num_replicas must be >= the number of logical experts ({num_experts}), "
        f"got {self.num_replicas}"
      )
    if hierarchical and self.num_groups % self.num_nodes:
      raise ValueError(
        f"num_groups must be a multiple of num_nodes ({self.num_nodes}) on the "
        f"hierarchical path, got {self.num_groups}"
      )
    if self.policy == HIERARCHICAL and num_experts % self.num_groups:
      raise ValueError(
        f"num_groups must divide the number of logical experts ({num_experts}) "
        f"on the hierarchical path, got {self.num_groups}"
      )
