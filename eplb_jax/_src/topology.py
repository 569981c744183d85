"""The cluster a placement is made for: slots, expert groups, nodes and GPUs.

:class:`Topology` is the static half of a balancing problem (the loads are
the other half). It is hashable, so it is passed whole as one static
argument of the jitted core, and it owns the policy rule: DeepSeek's
hierarchical policy when the expert groups split evenly over the nodes, the
global policy (one group on one node) otherwise. It also names the GPUs that
have failed (elastic expert parallelism): the balancer then solves the
:meth:`Topology.survivors` problem and leaves the failed GPUs' slots empty.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Iterable

import numpy as np

HIERARCHICAL = "hierarchical"
GLOBAL = "global"
# Sizes, and the ids and counts made of them, are int32 in the jitted core.
MAX_SIZE = 2**31 - 1


def check_size(value: object, name: str) -> int:
  """Returns ``value`` as a positive Python int at most :data:`MAX_SIZE`, or raises
  ``ValueError`` naming ``name``."""
  if isinstance(value, bool):
    raise ValueError(f"{name} must be a static Python int, got bool")
  try:
    size = operator.index(value)
  except TypeError:
    raise ValueError(f"{name} must be a static Python int, got {type(value).__name__}") from None
  if size <= 0:
    raise ValueError(f"{name} must be positive, got {size}")
  if size > MAX_SIZE:
    raise ValueError(f"{name} must be at most 2**31 - 1 (an int32 in the core), got {size}")
  return size


@dataclasses.dataclass(frozen=True)
class Topology:
  """Physical expert slots laid out over GPUs, GPUs over nodes, experts in groups.

  Slots are numbered GPU by GPU (``slots_per_gpu`` consecutive slots per GPU)
  and GPUs node by node.

  Failed GPUs keep their numbers and slots, so placements keep their shape:
  a placement on this topology holds -1 (an empty slot) in every slot of a
  failed GPU and puts every replica on the active GPUs. A new set of failed
  GPUs is a new static value, so the jitted core compiles once per failure
  event.

  Attributes:
    num_replicas: ``P``, physical expert slots in total; a multiple of ``num_gpus``.
    num_groups: expert groups (experts ``[i * E / num_groups, (i + 1) * E / num_groups)``
      form group ``i``); on the hierarchical policy a group stays on one node.
    num_nodes: server nodes; ``num_gpus`` must be a multiple of it.
    num_gpus: GPUs in total.
    failed_gpus: ids in ``[0, num_gpus)`` of the GPUs that hold no replica
      (any iterable of ints; stored sorted, without repeats). Default: none.

  Raises:
    ValueError: a size is not a positive int below ``2**31``, ``num_replicas`` is not a
      multiple of ``num_gpus``, ``num_gpus`` not a multiple of ``num_nodes``,
      or ``failed_gpus`` holds an id outside ``[0, num_gpus)`` or every GPU.

  Example:
    >>> import eplb_jax
    >>> topology = eplb_jax.Topology(288, num_groups=8, num_nodes=4, num_gpus=32)
    >>> topology.policy, topology.slots_per_gpu, topology.gpus_per_node
    ('hierarchical', 9, 8)
  """

  num_replicas: int
  num_groups: int
  num_nodes: int
  num_gpus: int
  failed_gpus: tuple[int, ...] = ()

  def __post_init__(self):
    for name in ("num_replicas", "num_groups", "num_nodes", "num_gpus"):
      object.__setattr__(self, name, check_size(getattr(self, name), name))
    object.__setattr__(self, "failed_gpus", self._check_failed(self.failed_gpus))
    if self.num_replicas % self.num_gpus:
      raise ValueError(
        f"num_replicas must be a multiple of num_gpus ({self.num_gpus}), got {self.num_replicas}"
      )
    if self.num_gpus % self.num_nodes:
      raise ValueError(
        f"num_gpus must be a multiple of num_nodes ({self.num_nodes}), got {self.num_gpus}"
      )

  def _check_failed(self, failed: object) -> tuple[int, ...]:
    """``failed`` as a sorted tuple of distinct GPU ids; ``ValueError`` naming ``failed_gpus``."""
    if isinstance(failed, str | bytes) or not isinstance(failed, Iterable):
      raise ValueError(f"failed_gpus must be an iterable of GPU ids, got {failed!r}")
    ids = set()
    for gpu in failed:
      if isinstance(gpu, bool):
        raise ValueError(f"failed_gpus must hold static int GPU ids, got {gpu!r}")
      try:
        ids.add(operator.index(gpu))
      except TypeError:
        raise ValueError(f"failed_gpus must hold static int GPU ids, got {gpu!r}") from None
    ids = tuple(sorted(ids))
    if ids and not 0 <= ids[0] <= ids[-1] < self.num_gpus:
      raise ValueError(f"failed_gpus must hold GPU ids in [0, {self.num_gpus}), got {ids}")
    if len(ids) == self.num_gpus:
      raise ValueError(f"failed_gpus must leave at least one GPU active, got all {self.num_gpus}")
    return ids

  @property
  def active_gpus(self) -> tuple[int, ...]:
    """The ids of the GPUs that are not failed, ascending."""
    failed = set(self.failed_gpus)
    return tuple(g for g in range(self.num_gpus) if g not in failed)

  def active_slots(self) -> np.ndarray:
    """int32 ``[P']``: the slots of the active GPUs, ascending (``P'`` = active GPUs x slots)."""
    per_gpu = self.slots_per_gpu
    gpus = np.asarray(self.active_gpus, np.int32)
    return (gpus[:, None] * per_gpu + np.arange(per_gpu, dtype=np.int32)).reshape(-1)

  def survivors(self) -> Topology:
    """The problem the balancer solves on the active GPUs, renumbered ``0 .. G' - 1``.

    This topology itself when no GPU failed. Otherwise ``G'`` GPUs of
    ``slots_per_gpu`` slots each: on the hierarchical policy, when whole
    nodes failed and the groups still split evenly over the surviving nodes,
    the same groups on those nodes (the hierarchical policy again); in any
    other case the global policy (one group, one node), since nodes with
    fewer GPUs than the others break the hierarchical pipeline's equal packs.
    """
    if not self.failed_gpus:
      return self
    num_gpus = self.num_gpus - len(self.failed_gpus)
    num_replicas = num_gpus * self.slots_per_gpu
    per_node = self.gpus_per_node
    failed_nodes = {g // per_node for g in self.failed_gpus}
    whole_nodes = len(self.failed_gpus) == len(failed_nodes) * per_node
    num_nodes = self.num_nodes - len(failed_nodes)
    if self.policy == HIERARCHICAL and whole_nodes and self.num_groups % num_nodes == 0:
      return Topology(num_replicas, self.num_groups, num_nodes, num_gpus)
    return Topology(num_replicas, 1, 1, num_gpus)

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
      ValueError: ``num_replicas < E``, or the active GPUs' slots ``< E``;
        or, on the hierarchical policy, ``num_groups`` does not divide ``E``
        (or, with ``hierarchical``, is not a multiple of ``num_nodes``).
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
    active_slots = self.survivors().num_replicas
    if active_slots < num_experts:
      raise ValueError(
        f"failed_gpus must leave at least as many slots as logical experts ({num_experts}): "
        f"failed GPUs {self.failed_gpus} leave {active_slots} of {self.num_replicas}"
      )
