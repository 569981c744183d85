"""An expert-parallel mixture-of-experts layer with per-slot capacity, in pure JAX.

Tokens and physical slots are both split over one mesh axis, ``expert_axis``
(``G`` devices, one GPU of the placement each): every device holds ``T / G``
tokens and the ``P / G`` consecutive slots that :func:`eplb_jax.rebalance_experts`
numbers GPU by GPU. :func:`moe_layer` runs, under :func:`jax.shard_map`:

1. **Slots**: each (token, choice) goes to one replica of its expert. With
   ``split="even"``, :func:`eplb_jax.runtime.dispatch.physical_slots` on the
   device's own tokens spreads its pairs of each expert evenly over the
   expert's replicas. With ``split="balanced"``, the devices exchange their
   ``[E]`` counts (one :func:`jax.lax.all_gather`), each computes the step's
   quotas from the global counts (:func:`eplb_jax.split_tokens`' solver:
   the split of each expert's pairs over its replicas with the lightest
   heaviest GPU; every device computes the same bits) and
   :func:`eplb_jax.runtime.dispatch.quota_slots` gives the device its share
   of each replica's quota, the devices' pairs interleaved: every replica
   receives exactly its quota, and each device spreads its pairs of an
   expert over the replicas in proportion to their quotas (a contiguous
   share per device would send a device's pairs of an expert to one or two
   replicas, over the per-slot capacity).
2. **Capacity**: each device sends each slot at most ``C`` pairs, the first
   ones in row-major (token, choice) order; the rest are dropped and
   contribute zero, so a token whose choices are all dropped leaves the
   layer as it came in, through the caller's residual.
3. **Dispatch**: a ``[P, C, d]`` buffer per device, and one
   :func:`jax.lax.all_to_all` over ``expert_axis``: each device receives the
   ``[G, P / G, C, d]`` rows every device sent to its own slots.
4. **Experts**: ``expert_fn`` on each of the device's slots, with that
   slot's parameters, over its ``G * C`` rows.
5. **Return and combine**: the inverse all-to-all, then each token's output
   is the sum of its kept choices' outputs weighted by their gates.

Capacity follows GShard, with the devices as GShard's groups: ``C =
ceil(capacity_factor * tokens_per_device * top_k / P)``, the capacity factor
times a slot's even share of one device's (token, choice) pairs, rounded up
and at most ``tokens_per_device`` (a token sends each slot at most one pair,
so that capacity never drops anything). A slot thus receives at most ``G *
C``, about ``capacity_factor * T * top_k / P`` pairs per step.

Every drop is decided on the sending device from its own tokens' slots (and,
with the balanced split, every device's counts), so :func:`moe_reference`
reproduces them without communication; with the
logical expert parameters it computes what the expert-parallel layer
computes, which is the check that placement, dispatch and capacity leave the
model's math unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from eplb_jax._src import checks
from eplb_jax._src import ops
from eplb_jax._src import sharding
from eplb_jax._src import split as split_lib
from eplb_jax.runtime import dispatch
from eplb_jax.runtime import stats

PyTree = object
ExpertFn = Callable[[PyTree, jax.Array], jax.Array]

# How each expert's (token, choice) pairs are split over its replicas (see the module's step 1).
SPLITS = ("even", "balanced")


class DispatchStats(NamedTuple):
  """What one MoE layer dispatched, per sending device and slot.

  Attributes:
    routed: ``[G, P]`` int32 (``[..., G, P]`` stacked over layers): the
      (token, choice) pairs device ``g`` assigned to slot ``s``.
    dropped: ``[G, P]`` int32: of those, the pairs over capacity.
  """

  routed: jax.Array
  dropped: jax.Array

  def gpu_tokens(self) -> jax.Array:
    """``[..., G]`` int32: the pairs routed to each GPU's slots, before capacity.

    With the balanced split, the GPU loads of the step's quotas.
    """
    num_gpus, num_replicas = self.routed.shape[-2:]
    per_slot = self.routed.sum(-2)
    return per_slot.reshape(*per_slot.shape[:-1], num_gpus, num_replicas // num_gpus).sum(-1)


def top_k_routing(logits: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
  """The router's choices: softmax over experts, the ``top_k`` largest, renormalised.

  Args:
    logits: ``[T, E]`` router logits.
    top_k: ``k``, the experts each token is sent to (static).

  Returns:
    ``(gates [T, k] float, expert_ids [T, k] int32)``: the chosen experts in
    descending probability, and their probabilities scaled to sum to 1.
  """
  top_k = checks.check_size(top_k, "top_k")
  if top_k > logits.shape[-1]:
    raise ValueError(f"top_k must be at most the {logits.shape[-1]} experts of logits, got {top_k}")
  gates, expert_ids = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), top_k)
  return gates / gates.sum(-1, keepdims=True), expert_ids.astype(jnp.int32)


def capacity(
  tokens_per_device: int, top_k: int, num_replicas: int, capacity_factor: float | None
) -> int:
  """Pairs one device may send one slot: ``ceil(capacity_factor * tokens * top_k / P)``.

  At most ``tokens_per_device``; ``capacity_factor=None`` gives that bound,
  which drops nothing.

  Example:
    >>> from eplb_jax.runtime import moe
    >>> moe.capacity(64, 2, 16, 1.25)  # ceil(1.25 * 64 * 2 / 16)
    10
  """
  if capacity_factor is None:
    return tokens_per_device
  if (
    isinstance(capacity_factor, bool)
    or not isinstance(capacity_factor, int | float)
    or not 0 < capacity_factor < math.inf
  ):
    raise ValueError(
      f"capacity_factor must be a finite positive number, or None (no drops), "
      f"got {capacity_factor!r}"
    )
  # A factor of P or more gives every pair room (share >= tokens): clipped there, the share
  # stays finite however large the factor.
  share = min(capacity_factor, num_replicas) * tokens_per_device * top_k / num_replicas
  return min(math.ceil(share), tokens_per_device)


class _Route(NamedTuple):
  """One device's routing: where each (token, choice) goes, and whether it fits."""

  slots: jax.Array  # [t, k] int32, -1 for an id outside the experts
  position: jax.Array  # [t, k] int32, the pair's row in its slot's buffer
  keep: jax.Array  # [t, k] bool: a valid slot and a row under the capacity
  routed: jax.Array  # [P] int32 pairs per slot
  dropped: jax.Array  # [P] int32 pairs over the capacity


def _check_split(split: object) -> str:
  if not isinstance(split, str) or split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  return split


def _phy2log(log2phy: jax.Array, num_replicas: int) -> jax.Array:
  """``[P]`` int32 expert of each slot (-1 for a slot ``log2phy`` does not list)."""
  experts = jnp.broadcast_to(jnp.arange(log2phy.shape[0], dtype=jnp.int32)[:, None], log2phy.shape)
  slots = jnp.where(log2phy >= 0, log2phy, num_replicas)  # num_replicas: not a slot
  return jnp.full(num_replicas, -1, jnp.int32).at[slots].set(experts, mode="drop")


def _quotas(counts: jax.Array, log2phy: jax.Array, num_replicas: int, num_gpus: int) -> jax.Array:
  """``[P]`` int32 quotas of the step's global ``counts [E]`` (the balanced split)."""
  return split_lib._split_layer(
    counts,
    _phy2log(log2phy, num_replicas),
    num_gpus,
    split_lib.DEFAULT_TOLERANCE,
    split_lib.DEFAULT_MAX_STEPS,
  )


def _route(slots: jax.Array, num_replicas: int, capacity: int) -> _Route:
  """Capacity for one device's ``[t, k]`` slots (-1: none), from its own pairs only."""
  key = jnp.where(slots >= 0, slots, num_replicas).reshape(-1)  # num_replicas: no slot
  position = ops.occurrence_rank(key).reshape(slots.shape)
  routed = jnp.zeros(num_replicas, jnp.int32).at[key].add(1, mode="drop")
  keep = (slots >= 0) & (position < capacity)
  return _Route(slots, position, keep, routed, jnp.maximum(routed - capacity, 0))


def _group_routes(
  expert_ids: jax.Array,
  log2phy: jax.Array,
  logcnt: jax.Array,
  num_gpus: int,
  capacity: int,
  split: str,
) -> _Route:
  """``[G, ...]`` routes of ``expert_ids [T, k]`` cut into ``G`` groups, each as its device
  routes it in :func:`moe_layer` (with the balanced split, from every group's counts)."""
  num_experts, width = log2phy.shape
  num_replicas = width + num_experts - 1
  tokens, top_k = expert_ids.shape
  grouped = expert_ids.reshape(num_gpus, tokens // num_gpus, top_k)
  if split == "even":
    slots = jax.vmap(lambda ids: dispatch.physical_slots(log2phy, logcnt, ids))(grouped)
  else:
    counts = stats.expert_counts(grouped, num_experts)  # [G, E], as the devices gather them
    quotas = _quotas(counts.sum(0), log2phy, num_replicas, num_gpus)
    slots = jax.vmap(
      lambda ids, device: dispatch.quota_slots(log2phy, quotas, ids, counts=counts, device=device)
    )(grouped, jnp.arange(num_gpus))
  return jax.vmap(lambda s: _route(s, num_replicas, capacity))(slots)


def _combine(gates: jax.Array, keep: jax.Array, outputs: jax.Array) -> jax.Array:
  """``[t, d]``: the sum of ``gate * output`` over the kept choices, for ``outputs [t, k, d]``."""
  weight = jnp.where(keep, gates, 0).astype(outputs.dtype)
  return jnp.einsum("tk,tkd->td", weight, outputs)


def _check_routing(x: jax.Array, gates: jax.Array, expert_ids: jax.Array, num_gpus: int) -> None:
  if x.ndim != 2:
    raise ValueError(f"x must be [T, d], got shape {x.shape}")
  if gates.ndim != 2 or gates.shape[0] != x.shape[0]:
    raise ValueError(f"gates must be [T, k] with the {x.shape[0]} tokens of x, got {gates.shape}")
  if expert_ids.shape != gates.shape:
    raise ValueError(
      f"expert_ids must have the shape of gates {gates.shape}, got {expert_ids.shape}"
    )
  if not jnp.issubdtype(expert_ids.dtype, jnp.integer):
    raise ValueError(f"expert_ids must have an integer dtype, got {expert_ids.dtype}")
  if x.shape[0] % num_gpus:
    raise ValueError(
      f"the number of tokens ({x.shape[0]}) must be divisible by the number of devices ({num_gpus})"
    )


def _check_log2phy(log2phy: jax.Array) -> tuple[int, int]:
  """``(E, P)`` of one layer's ``log2phy [E, P - E + 1]``."""
  if jnp.ndim(log2phy) != 2 or not jnp.shape(log2phy)[0]:
    raise ValueError(
      f"log2phy must be [E, P - E + 1] (one layer of a placement), got shape {jnp.shape(log2phy)}"
    )
  num_experts, width = jnp.shape(log2phy)
  return num_experts, width + num_experts - 1


def _check_params(expert_params: PyTree, size: int, what: str) -> int:
  """Checks that the leaves of ``expert_params`` are stacked on a leading axis of ``size``
  (``what`` says where ``size`` comes from); returns it."""
  leaves = jax.tree.leaves(expert_params)
  sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
  if sizes != {size}:
    raise ValueError(
      f"expert_params leaves must be [{size}, ...] ({what}), got leading sizes "
      f"{sorted(map(str, sizes))}"
    )
  return size


def moe_layer(
  x: jax.Array,
  gates: jax.Array,
  expert_ids: jax.Array,
  expert_params: PyTree,
  expert_fn: ExpertFn,
  log2phy: jax.Array,
  logcnt: jax.Array,
  *,
  mesh: Mesh,
  expert_axis: str = "expert",
  capacity_factor: float | None = 1.25,
  split: str = "even",
) -> tuple[jax.Array, DispatchStats]:
  """Expert-parallel MoE: all-to-all dispatch to the devices holding each token's slots.

  Args:
    x: ``[T, d]`` tokens, split over ``expert_axis`` (``T / G`` per device).
    gates: ``[T, k]`` combine weights of the router's choices.
    expert_ids: ``[T, k]`` int logical experts of the router's choices (ids
      outside ``[0, E)`` are not dispatched).
    expert_params: pytree of per-slot leaves ``[P, ...]`` laid out by the
      placement (:func:`eplb_jax.runtime.params.apply_placement`), split over
      ``expert_axis``.
    expert_fn: ``expert_fn(params, rows) -> outputs``: one expert on ``[n, d]``
      rows, ``params`` one slot's leaves; it must treat rows independently
      (rows of unused buffer entries are zeros, and their outputs are unused).
    log2phy: ``[E, R]`` int slots of each expert (one layer of a placement).
    logcnt: ``[E]`` int replicas of each expert.
    mesh: the device mesh; ``expert_axis`` is one of its axes.
    expert_axis: the mesh axis over which tokens and slots are split; ``P``
      and ``T`` must be divisible by its size ``G``.
    capacity_factor: the per-slot capacity (see :func:`capacity`; static);
      None drops nothing.
    split: how each expert's pairs are split over its replicas (static):
      ``"even"`` (each device spreads its own pairs evenly) or
      ``"balanced"`` (by the step's quotas of the lightest heaviest GPU,
      from every device's counts); any other value raises ``ValueError``.

  Returns:
    ``(y [T, d_out], stats)``: the gate-weighted sum of each token's kept
    choices (zero for dropped ones; add the residual yourself), split like
    ``x``, and the :class:`DispatchStats` of the layer.

  Raises:
    ValueError: shapes or dtypes that do not fit (``expert_params`` leaves
      must have the placement's ``P = R + E - 1`` slots), a bad mesh axis, or
      a ``capacity_factor`` that is not finite and positive.
  """
  # Parameters of another slot count would be routed by the wrong slot numbers.
  _, num_replicas = _check_log2phy(log2phy)
  _check_params(expert_params, num_replicas, "the placement's slots, log2phy.shape[-1] + E - 1")
  sharding.check_mesh_axis(mesh, expert_axis, num_replicas, name="expert_axis", what="slots")
  num_gpus = mesh.shape[expert_axis]
  _check_routing(x, gates, expert_ids, num_gpus)
  balanced = _check_split(split) == "balanced"
  slots_per_gpu = num_replicas // num_gpus
  cap = capacity(x.shape[0] // num_gpus, gates.shape[1], num_replicas, capacity_factor)
  cap = max(cap, 1)  # zero tokens: one buffer row of zeros keeps the exchange's shapes non-empty

  def local(x, gates, expert_ids, expert_params, log2phy, logcnt):
    if not balanced:
      slots = dispatch.physical_slots(log2phy, logcnt, expert_ids)
    else:
      # Every device's [E] counts, the same on every device (invariant over the
      # axis, as the split's loop carry needs).
      local_counts = stats.expert_counts(expert_ids, log2phy.shape[0])
      counts = jax.lax.all_gather(local_counts, expert_axis, to="invarying")
      quotas = _quotas(counts.sum(0), log2phy, num_replicas, num_gpus)
      device = jax.lax.axis_index(expert_axis)
      slots = dispatch.quota_slots(log2phy, quotas, expert_ids, counts=counts, device=device)
    route = _route(slots, num_replicas, cap)
    tokens, top_k = expert_ids.shape
    target = jnp.where(route.keep, route.slots, num_replicas)  # out of bounds: not sent
    rows = jnp.broadcast_to(x[:, None, :], (tokens, top_k, x.shape[-1]))
    send = jnp.zeros((num_replicas, cap, x.shape[-1]), x.dtype)
    send = send.at[target, route.position].add(rows, mode="drop")
    # [sending device, own slot, C, d] after the exchange.
    received = jax.lax.all_to_all(send.reshape(num_gpus, slots_per_gpu, cap, -1), expert_axis, 0, 0)
    per_slot = received.transpose(1, 0, 2, 3).reshape(slots_per_gpu, num_gpus * cap, -1)
    out = jax.vmap(expert_fn)(expert_params, per_slot)
    out = out.reshape(slots_per_gpu, num_gpus, cap, -1).transpose(1, 0, 2, 3)
    back = jax.lax.all_to_all(out, expert_axis, 0, 0).reshape(num_replicas, cap, -1)
    outputs = back.at[target, route.position].get(mode="fill", fill_value=0)  # [t, k, d_out]
    y = _combine(gates, route.keep, outputs)
    return y, DispatchStats(route.routed[None], route.dropped[None])

  split, whole = P(expert_axis), P()
  return jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(split, split, split, split, whole, whole),
    out_specs=(split, DispatchStats(split, split)),
  )(x, gates, expert_ids, expert_params, log2phy, logcnt)


def moe_reference(
  x: jax.Array,
  gates: jax.Array,
  expert_ids: jax.Array,
  expert_params: PyTree,
  expert_fn: ExpertFn,
  log2phy: jax.Array,
  logcnt: jax.Array,
  *,
  num_gpus: int,
  capacity_factor: float | None = 1.25,
  split: str = "even",
) -> tuple[jax.Array, DispatchStats]:
  """The logical model of :func:`moe_layer`: the same routing and drops, no communication.

  Takes the logical expert parameters (leaves ``[E, ...]``) and applies each
  expert to every token, then keeps the (token, choice) pairs that
  :func:`moe_layer` keeps: the tokens are cut into ``num_gpus`` consecutive
  groups, as the mesh splits them, and each group's slots and capacity are
  computed as its device computes them (with the balanced split, from the
  groups' counts as the devices exchange them). With ``capacity_factor=None``
  it is the plain logical MoE (the placement then only shapes the stats).

  Args:
    x, gates, expert_ids, expert_fn, logcnt, capacity_factor, split: as in
      :func:`moe_layer`.
    expert_params: pytree of logical leaves ``[E, ...]``.
    log2phy: ``[E, P - E + 1]`` as :func:`eplb_jax.rebalance_experts`
      returns it; its width gives the number of slots ``P``.
    num_gpus: ``G``, the devices of :func:`moe_layer`'s ``expert_axis``
      (static); ``P`` must be divisible by it.

  Returns:
    ``(y [T, d_out], stats)`` as :func:`moe_layer` returns them.

  Raises:
    ValueError: as :func:`moe_layer`.
  """
  num_gpus = checks.check_size(num_gpus, "num_gpus")
  num_experts, num_replicas = _check_log2phy(log2phy)
  _check_params(expert_params, num_experts, "the logical experts of log2phy")
  _check_routing(x, gates, expert_ids, num_gpus)
  if num_replicas % num_gpus:
    raise ValueError(
      f"the number of slots ({num_replicas}) must be divisible by num_gpus ({num_gpus})"
    )
  split = _check_split(split)
  tokens, top_k = expert_ids.shape
  cap = capacity(tokens // num_gpus, top_k, num_replicas, capacity_factor)
  route = _group_routes(expert_ids, log2phy, logcnt, num_gpus, cap, split)
  every = jax.vmap(expert_fn, in_axes=(0, None))(expert_params, x)  # [E, T, d_out]
  valid = (expert_ids >= 0) & (expert_ids < num_experts)
  expert = jnp.where(valid, expert_ids, 0)
  outputs = every[expert, jnp.arange(tokens)[:, None]]  # [T, k, d_out]
  keep = route.keep.reshape(tokens, top_k)
  return _combine(gates, keep, outputs), DispatchStats(route.routed, route.dropped)


def dispatch_stats(
  expert_ids: jax.Array,
  log2phy: jax.Array,
  logcnt: jax.Array,
  *,
  num_gpus: int,
  capacity_factor: float | None = 1.25,
  split: str = "even",
) -> DispatchStats:
  """What :func:`moe_layer` dispatches for the router's ``expert_ids``, without the experts.

  The stats :func:`moe_layer` (and :func:`moe_reference`) return for these
  router choices, from the routing alone: e.g. to compare the splits, or
  capacity factors, on the same step.

  Args:
    expert_ids: ``[T, k]`` int logical experts of the router's choices.
    log2phy, logcnt, num_gpus, capacity_factor, split: as in :func:`moe_reference`.

  Returns:
    The :class:`DispatchStats` of the layer, ``[G, P]`` each.

  Raises:
    ValueError: shapes or dtypes that do not fit, a bad size, capacity factor or split.
  """
  num_gpus = checks.check_size(num_gpus, "num_gpus")
  if jnp.ndim(log2phy) != 2:
    raise ValueError(f"log2phy must be [E, P - E + 1], got shape {jnp.shape(log2phy)}")
  num_experts, width = jnp.shape(log2phy)
  num_replicas = width + num_experts - 1
  if jnp.ndim(expert_ids) != 2 or not jnp.issubdtype(jnp.result_type(expert_ids), jnp.integer):
    raise ValueError(f"expert_ids must be an integer [T, k] array, got {jnp.shape(expert_ids)}")
  tokens, top_k = jnp.shape(expert_ids)
  for what, size in (("tokens", tokens), ("slots", num_replicas)):
    if size % num_gpus:
      raise ValueError(f"the number of {what} ({size}) must be divisible by num_gpus ({num_gpus})")
  cap = capacity(tokens // num_gpus, top_k, num_replicas, capacity_factor)
  route = _group_routes(expert_ids, log2phy, logcnt, num_gpus, cap, _check_split(split))
  return DispatchStats(route.routed, route.dropped)
