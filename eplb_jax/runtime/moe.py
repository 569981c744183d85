"""An expert-parallel mixture-of-experts layer with capacity, in pure JAX.

Tokens and physical slots are both split over one mesh axis, ``expert_axis``
(``G`` devices, one GPU of the placement each): every device holds ``T / G``
tokens and the ``S = P / G`` consecutive slots that
:func:`eplb_jax.rebalance_experts` numbers GPU by GPU. :func:`moe_layer` runs,
under :func:`jax.shard_map`:

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
   replicas, over the per-slot capacity). With ``spare_slots=k``, the
   split is over the placement extended by ``k`` spare slots per device,
   filled for this step (:func:`eplb_jax.plan_spare_slots`, the same on
   every device), and the copies' weights are fetched from their source
   slots (:func:`jax.lax.ragged_all_to_all`, or its padded equivalent).
2. **Capacity** (:func:`kept_pairs`): each (sending device, slot) *stream*
   keeps its first pairs in row-major (token, choice) order, up to a count
   set by ``capacity_per``; the rest are dropped and contribute zero, so a
   token whose choices are all dropped leaves the layer as it came in,
   through the caller's residual.

   * ``"slot"`` (GShard's, with the devices as its groups): every stream
     keeps at most ``C = ceil(capacity_factor * tokens_per_device * top_k /
     P)`` pairs (:func:`capacity`), the capacity factor times a slot's even
     share of one device's pairs, rounded up and at most
     ``tokens_per_device``. A slot thus receives at most ``G * C``, about
     ``capacity_factor * T * top_k / P`` pairs per step.
   * ``"device"``: every receiving device keeps at most ``C = ceil(
     capacity_factor * T * top_k / G)`` pairs in all (:func:`device_capacity`),
     its even share, however its slots share them. The streams into a
     device are filled level by level (max-min fair): each keeps
     ``min(n, L)`` of its ``n`` pairs for the largest level ``L`` at which
     the device's total fits ``C``, and the room left (less than one pair
     per longer stream) goes one pair each to the longer streams in (slot,
     sender) order. A device's kept total is ``min(its pairs, C)``, so
     drops are what the GPU loads exceed ``C`` by, which the balanced split
     minimises. The devices all-gather their ``[P]`` pairs per slot to
     decide it (one more small :func:`jax.lax.all_gather`).

3. **Dispatch and experts**. Per slot: a ``[P, C, d]`` buffer per device and
   one :func:`jax.lax.all_to_all`; each device receives ``[G, S, C, d]``
   rows and applies ``expert_fn(params, rows)`` to each of its slots over
   its ``G * C`` rows. Per device: each device receives its kept rows packed
   contiguously by slot (in (slot, sender, position) order) into a ``[C,
   d]`` buffer and applies ``expert_fn(params, rows, group_sizes)`` once,
   with the stacked parameters of its ``S`` slots and the rows per slot
   (ragged groups: :func:`expert_mlp` uses :func:`jax.lax.ragged_dot`). The
   rows travel with :func:`jax.lax.ragged_all_to_all` where the mesh's
   backend has it (GPU, TPU): a device receives only its kept rows. XLA:CPU
   does not implement it; there a padded :func:`jax.lax.all_to_all` of at
   most ``min(tokens_per_device * top_k, C)`` rows per pair of devices does
   the same exchange, with identical results.
4. **Return and combine**: the inverse exchange, then each token's output
   is the sum of its kept choices' outputs weighted by their gates.

Every drop is decided from the devices' pairs per expert or per slot (no
token data), so :func:`moe_reference` reproduces them without
communication; with the logical expert parameters it computes what the
expert-parallel layer computes, which is the check that placement, dispatch
and capacity leave the model's math unchanged.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from eplb_jax._src import checks
from eplb_jax._src import ops
from eplb_jax._src import placement as placement_lib
from eplb_jax._src import sharding
from eplb_jax._src import spares as spares_lib
from eplb_jax._src import split as split_lib
from eplb_jax.runtime import dispatch
from eplb_jax.runtime import stats

PyTree = object
# Per slot: expert_fn(params of one slot, rows [n, d]) -> [n, d_out]. Per device:
# expert_fn(params stacked [S, ...], rows [n, d], group_sizes [S]) -> [n, d_out].
ExpertFn = Callable[..., jax.Array]

# How each expert's (token, choice) pairs are split over its replicas (see the module's step 1).
SPLITS = ("even", "balanced")
# What the capacity bounds: each (sending device, slot) stream, or each receiving device (step 2).
CAPACITY_PER = ("slot", "device")
# Platforms whose XLA backend implements ``ragged-all-to-all`` (XLA:CPU does not).
RAGGED_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")


class DispatchStats(NamedTuple):
  """What one MoE layer dispatched, per sending device and slot.

  Attributes:
    routed: ``[G, P]`` int32 (``[..., G, P]`` stacked over layers): the
      (token, choice) pairs device ``g`` assigned to slot ``s``.
    dropped: ``[G, P]`` int32: of those, the pairs over capacity (per slot
      or per receiving device, as the layer's ``capacity_per``).
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


def expert_mlp(params: PyTree, rows: jax.Array, group_sizes: jax.Array | None = None) -> jax.Array:
  """A ReLU MLP expert, ``relu(rows @ w_in) @ w_out``, for either capacity's ``expert_fn``.

  Args:
    params: ``{"w_in": [d, h], "w_out": [h, d_out]}`` of one slot (per-slot
      capacity), or the same stacked ``[S, d, h]``, ``[S, h, d_out]`` over
      ``S`` slots (with ``group_sizes``).
    rows: ``[n, d]`` rows.
    group_sizes: ``[S]`` int rows of each slot, the slots' rows contiguous in
      slot order (:func:`jax.lax.ragged_dot`); rows beyond their sum give
      zeros. None: one expert on every row.

  Returns:
    ``[n, d_out]`` outputs.
  """
  if group_sizes is None:
    return jax.nn.relu(rows @ params["w_in"]) @ params["w_out"]
  hidden = jax.nn.relu(jax.lax.ragged_dot(rows, params["w_in"], group_sizes))
  return jax.lax.ragged_dot(hidden, params["w_out"], group_sizes)


def _check_factor(capacity_factor: object) -> None:
  if (
    isinstance(capacity_factor, bool)
    or not isinstance(capacity_factor, int | float)
    or not 0 < capacity_factor < math.inf
  ):
    raise ValueError(
      f"capacity_factor must be a finite positive number, or None (no drops), "
      f"got {capacity_factor!r}"
    )


def capacity(
  tokens_per_device: int, top_k: int, num_replicas: int, capacity_factor: float | None
) -> int:
  """Pairs one device may send one slot: ``ceil(capacity_factor * tokens * top_k / P)``.

  The per-slot capacity (``capacity_per="slot"``). At most
  ``tokens_per_device``; ``capacity_factor=None`` gives that bound, which
  drops nothing.

  Raises:
    ValueError: a ``capacity_factor`` that is not finite and positive.

  Example:
    >>> from eplb_jax.runtime import moe
    >>> moe.capacity(64, 2, 16, 1.25)  # ceil(1.25 * 64 * 2 / 16)
    10
  """
  if capacity_factor is None:
    return tokens_per_device
  _check_factor(capacity_factor)
  # A factor of P or more gives every pair room (share >= tokens): clipped there, the share
  # stays finite however large the factor.
  share = min(capacity_factor, num_replicas) * tokens_per_device * top_k / num_replicas
  return min(math.ceil(share), tokens_per_device)


def device_capacity(
  tokens_per_device: int, top_k: int, num_gpus: int, capacity_factor: float | None
) -> int:
  """Pairs one device may receive in all: ``ceil(capacity_factor * T * top_k / G)``.

  The per-device capacity (``capacity_per="device"``): the capacity factor
  times a device's even share of the step's ``T * top_k`` pairs, ``T =
  num_gpus * tokens_per_device``. At most ``T * top_k``, every pair of the
  step; ``capacity_factor=None`` gives that bound, which drops nothing.

  Raises:
    ValueError: a ``capacity_factor`` that is not finite and positive.
  """
  pairs = num_gpus * tokens_per_device * top_k
  if capacity_factor is None:
    return pairs
  _check_factor(capacity_factor)
  # From a factor of G on every pair has room; clipped there, the share stays finite.
  return min(math.ceil(min(capacity_factor, num_gpus) * tokens_per_device * top_k), pairs)


def kept_pairs(routed: jax.Array, capacity: int, capacity_per: str = "slot") -> jax.Array:
  """The pairs each (sending device, slot) stream keeps under a capacity (the layer's step 2).

  Per slot: ``min(routed, capacity)``. Per device: the streams into each
  receiving device (its ``P / G`` consecutive slots) filled level by level,
  ``min(n, L)`` each for the largest ``L`` with ``sum(min(n, L)) <=
  capacity``, then one pair more for each longer stream in (slot, sender)
  order while the room lasts; each device keeps ``min(its pairs, capacity)``.

  Args:
    routed: ``[..., G, P]`` int pairs each device sends each slot
      (:attr:`DispatchStats.routed`).
    capacity: the static capacity per stream (:func:`capacity`) or per
      receiving device (:func:`device_capacity`).
    capacity_per: ``"slot"`` or ``"device"`` (:data:`CAPACITY_PER`).

  Returns:
    ``[..., G, P]`` int32 pairs kept: the first ones of each stream in its
    sender's row-major (token, choice) order; ``routed - kept`` are dropped.

  Raises:
    ValueError: a bad ``capacity_per``, a negative ``capacity``, or ``P`` not
      divisible by ``G``.
  """
  capacity_per = _check_capacity_per(capacity_per)
  if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
    raise ValueError(f"capacity must be a non-negative int, got {capacity!r}")
  routed = jnp.asarray(routed).astype(jnp.int32)
  if capacity_per == "slot":
    return jnp.minimum(routed, capacity)
  *lead, num_gpus, num_replicas = routed.shape
  if num_replicas % num_gpus:
    raise ValueError(
      f"routed must be [..., G, P] with P ({num_replicas}) divisible by G ({num_gpus})"
    )
  slots_per_gpu = num_replicas // num_gpus
  # [..., receiver, slot, sender]: each receiving device's streams in (slot, sender) order.
  streams = jnp.moveaxis(routed.reshape(*lead, num_gpus, num_gpus, slots_per_gpu), -3, -1)
  streams = streams.reshape(*lead, num_gpus, num_replicas)
  # The largest level that fits, bit by bit: the total at a level grows with it, and the
  # level never needs to exceed the capacity (the top bit's range covers it).
  level = jnp.zeros((*lead, num_gpus), jnp.int32)
  for bit in reversed(range(capacity.bit_length())):
    trial = level | (1 << bit)
    fits = jnp.minimum(streams, trial[..., None]).sum(-1) <= capacity
    level = jnp.where(fits, trial, level)
  base = jnp.minimum(streams, level[..., None])
  room = capacity - base.sum(-1, keepdims=True)
  longer = streams > level[..., None]
  earlier = jnp.cumsum(longer, axis=-1, dtype=jnp.int32) - longer
  kept = base + (longer & (earlier < room))
  kept = kept.reshape(*lead, num_gpus, slots_per_gpu, num_gpus)
  return jnp.moveaxis(kept, -1, -3).reshape(routed.shape)


def _check_split(split: object) -> str:
  if not isinstance(split, str) or split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  return split


def _check_capacity_per(capacity_per: object) -> str:
  if not isinstance(capacity_per, str) or capacity_per not in CAPACITY_PER:
    raise ValueError(f"capacity_per must be one of {CAPACITY_PER}, got {capacity_per!r}")
  return capacity_per


def _capacity(
  capacity_per: str,
  tokens_per_device: int,
  top_k: int,
  num_replicas: int,
  num_gpus: int,
  capacity_factor: float | None,
) -> int:
  """The static capacity of ``capacity_per`` (checked): per stream or per receiving device."""
  if _check_capacity_per(capacity_per) == "slot":
    return capacity(tokens_per_device, top_k, num_replicas, capacity_factor)
  return device_capacity(tokens_per_device, top_k, num_gpus, capacity_factor)


def _phy2log(log2phy: jax.Array, num_replicas: int) -> jax.Array:
  """``[P]`` int32 expert of each slot (-1 for a slot ``log2phy`` does not list)."""
  experts = jnp.broadcast_to(jnp.arange(log2phy.shape[0], dtype=jnp.int32)[:, None], log2phy.shape)
  slots = jnp.where(log2phy >= 0, log2phy, num_replicas)  # num_replicas: not a slot
  return jnp.full(num_replicas, -1, jnp.int32).at[slots].set(experts, mode="drop")


class _Step(NamedTuple):
  """The placement a balanced step routes by: the one in service, or it with spare copies."""

  log2phy: jax.Array  # [E, R'] slots of each expert
  quotas: jax.Array  # [P'] int32 the step's quota of each slot
  source: jax.Array | None  # [G * k] service slot each spare copies (-1: empty); None: no spares


def _plan_step(counts: jax.Array, log2phy: jax.Array, num_gpus: int, spare_slots: int) -> _Step:
  """The balanced split of the step's global ``counts [E]``, over the placement in service
  or (``spare_slots > 0``) over it with the spare slots filled for this step."""
  num_experts, width = log2phy.shape
  phy2log = _phy2log(log2phy, width + num_experts - 1)
  tolerance, max_steps = split_lib.DEFAULT_TOLERANCE, split_lib.DEFAULT_MAX_STEPS
  if not spare_slots:
    quotas = split_lib._split_rows(counts[None], phy2log[None], num_gpus, tolerance, max_steps)
    return _Step(log2phy, quotas[0], None)
  plan = spares_lib._plan_rows(
    counts[None], phy2log[None], num_gpus, spare_slots, tolerance, max_steps
  )
  extended = placement_lib.from_phy2log(plan.phy2log, num_experts)
  return _Step(extended.log2phy[0], plan.quotas[0], plan.source[0])


class _Fetch(NamedTuple):
  """Who sends which slot to whom, as :func:`_exchange`'s slices ``(g, j)`` of one device.

  As a sender, slice ``(g, j)`` is its copy for spare slot ``j`` of device
  ``g``; as a receiver, the copy of its spare slot ``j`` from device ``g``.
  """

  local: jax.Array  # [G * k] the source slot's index on its device
  sends: jax.Array  # [G * k] 1 where this device is the source of (g, j)
  receives: jax.Array  # [G * k] 1 where device g is the source of this device's spare j
  spare: jax.Array  # [G * k] j: the spare slot's row in a receiver's [k] buffer
  row: jax.Array  # [G * k] this device's row (itself, j) in a source's [G * k] buffer


class _Collective(NamedTuple):
  """Static settings of :func:`_exchange` (hashable)."""

  axis_name: str
  num_devices: int
  block: int  # rows one device sends any one device, at most
  ragged: bool

  def __call__(self, *args) -> jax.Array:
    return _exchange(*args, **self._asdict())


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fetch(exchange: _Collective, leaf: jax.Array, fetch: _Fetch) -> jax.Array:
  out = jnp.zeros((exchange.block, *leaf.shape[1:]), leaf.dtype)  # the k spare slots
  return exchange(leaf, out, fetch.local, fetch.sends, fetch.spare, fetch.receives)


def _fetch_forward(exchange, leaf, fetch):
  return _fetch(exchange, leaf, fetch), (fetch, leaf.shape[0])


def _fetch_backward(exchange, residuals, cotangent):
  # Each copy's cotangent back to its source, row (g, j) of a [G * k] buffer there, then
  # summed per slot: copies of one slot add up (ragged_all_to_all's transpose keeps one).
  fetch, num_slots = residuals
  rows = jnp.zeros((fetch.spare.shape[0], *cotangent.shape[1:]), cotangent.dtype)
  back = exchange(cotangent, rows, fetch.spare, fetch.receives, fetch.row, fetch.sends)
  slot = jnp.where(fetch.sends > 0, fetch.local, num_slots)  # num_slots: not from here
  return jax.ops.segment_sum(back, slot, num_slots + 1)[:num_slots], None


_fetch.defvjp(_fetch_forward, _fetch_backward)


def _fetch_spares(expert_params, source, *, axis, num_gpus, spare_slots, ragged) -> PyTree:
  """This device's ``k`` spare slots' parameters ``[k, ...]``, copied from their ``source``.

  Each copy travels from the device holding its source slot to the device of
  its spare slot, one slot's slice per copy, by :func:`jax.lax.ragged_all_to_all`
  (a device receives at most its ``k`` copies) or its padded equivalent. Several
  copies may read one slot, so the backward pass sends each copy's cotangent
  back to its source device and sums them per slot.
  """
  slots_per_gpu = jax.tree.leaves(expert_params)[0].shape[0]
  device = jax.lax.axis_index(axis)
  filled = source >= 0
  home = jnp.where(filled, source // slots_per_gpu, -1).reshape(num_gpus, spare_slots)
  mine = jax.lax.dynamic_index_in_dim(home, device, 0, keepdims=False)  # [k]
  spare = jnp.tile(jnp.arange(spare_slots, dtype=jnp.int32), num_gpus)
  fetch = _Fetch(
    local=jnp.where(filled, source % slots_per_gpu, 0),
    sends=(home == device).astype(jnp.int32).reshape(-1),
    receives=(mine[None, :] == jnp.arange(num_gpus)[:, None]).astype(jnp.int32).reshape(-1),
    spare=spare,
    row=device * spare_slots + spare,
  )
  exchange = _Collective(axis, num_gpus, spare_slots, ragged)
  return jax.tree.map(lambda leaf: _fetch(exchange, leaf, fetch), expert_params)


class _Route(NamedTuple):
  """One device's routing: where each (token, choice) goes, its row there, pairs per slot."""

  slots: jax.Array  # [t, k] int32, -1 for an id outside the experts
  position: jax.Array  # [t, k] int32, the pair's rank among this device's pairs of its slot
  routed: jax.Array  # [P] int32 pairs per slot


def _route(slots: jax.Array, num_replicas: int) -> _Route:
  """One device's ``[t, k]`` slots (-1: none) with their positions and counts."""
  key = jnp.where(slots >= 0, slots, num_replicas).reshape(-1)  # num_replicas: no slot
  position = ops.occurrence_rank(key).reshape(slots.shape)
  routed = jnp.zeros(num_replicas, jnp.int32).at[key].add(1, mode="drop")
  return _Route(slots, position, routed)


def _keep(route: _Route, kept: jax.Array) -> jax.Array:
  """``[t, k]`` bool: the pairs of ``route`` among the first ``kept [P]`` of their slot."""
  limit = kept.at[route.slots].get(mode="fill", fill_value=0)  # -1: no slot, keeps nothing
  return (route.slots >= 0) & (route.position < limit)


def _group_routes(
  expert_ids: jax.Array,
  log2phy: jax.Array,
  logcnt: jax.Array,
  num_gpus: int,
  split: str,
  spare_slots: int,
) -> _Route:
  """``[G, ...]`` routes of ``expert_ids [T, k]`` cut into ``G`` groups, each as its device
  routes it in :func:`moe_layer` (with the balanced split, from every group's counts)."""
  num_experts, width = log2phy.shape
  num_replicas = width + num_experts - 1 + num_gpus * spare_slots
  tokens, top_k = expert_ids.shape
  grouped = expert_ids.reshape(num_gpus, tokens // num_gpus, top_k)
  if split == "even":
    slots = jax.vmap(lambda ids: dispatch.physical_slots(log2phy, logcnt, ids))(grouped)
  else:
    counts = stats.expert_counts(grouped, num_experts)  # [G, E], as the devices gather them
    step = _plan_step(counts.sum(0), log2phy, num_gpus, spare_slots)
    slots = jax.vmap(
      lambda ids, device: dispatch.quota_slots(
        step.log2phy, step.quotas, ids, counts=counts, device=device
      )
    )(grouped, jnp.arange(num_gpus))
  return jax.vmap(lambda s: _route(s, num_replicas))(slots)


def _exclusive_cumsum(x: jax.Array, axis: int = -1) -> jax.Array:
  return jnp.cumsum(x, axis=axis, dtype=jnp.int32) - x


def _padded_ragged_all_to_all(
  operand: jax.Array,
  output: jax.Array,
  input_offsets: jax.Array,
  send_sizes: jax.Array,
  output_offsets: jax.Array,
  recv_sizes: jax.Array,
  *,
  axis_name: str,
  num_devices: int,
  block: int,
) -> jax.Array:
  """:func:`jax.lax.ragged_all_to_all`'s result with one padded :func:`jax.lax.all_to_all`.

  For backends without the ragged collective. Each device packs its chunks
  for each destination contiguously into a ``block``-row buffer (static:
  at least the rows it sends any one device), one ``all_to_all`` moves the
  ``[G, block, ...]`` buffers (and a second the ``output_offsets``), and each
  receiver writes every chunk at its offset into ``output``.
  """
  chunks = input_offsets.shape[0] // num_devices
  rows = jnp.arange(block, dtype=jnp.int32)

  def unpack(sizes):
    """Per destination (or source) and packed row: its chunk and its row within the chunk."""
    sizes = sizes.reshape(num_devices, chunks)
    starts = _exclusive_cumsum(sizes)
    chunk = (starts[:, None, :] <= rows[None, :, None]).sum(-1, dtype=jnp.int32) - 1
    within = rows[None, :] - jnp.take_along_axis(starts, chunk, axis=-1)
    return chunk, within, rows[None, :] < sizes.sum(-1, keepdims=True)

  chunk, within, valid = unpack(send_sizes)
  source = jnp.take_along_axis(input_offsets.reshape(num_devices, chunks), chunk, -1) + within
  source = jnp.where(valid, source, operand.shape[0])  # out of bounds: a zero row
  send = operand.at[source].get(mode="fill", fill_value=0)  # [G, block, ...]
  received = jax.lax.all_to_all(send, axis_name, 0, 0)
  offsets = jax.lax.all_to_all(output_offsets.reshape(num_devices, chunks), axis_name, 0, 0)
  chunk, within, valid = unpack(recv_sizes)
  target = jnp.take_along_axis(offsets, chunk, -1) + within
  target = jnp.where(valid, target, output.shape[0])  # out of bounds: not written
  return output.at[target].set(received, mode="drop")


def _exchange(*args, ragged: bool, **kwargs) -> jax.Array:
  """:func:`jax.lax.ragged_all_to_all`, or its padded equivalent where ``ragged`` is False."""
  if ragged:
    kwargs.pop("num_devices"), kwargs.pop("block")
    return jax.lax.ragged_all_to_all(*args, **kwargs)
  return _padded_ragged_all_to_all(*args, **kwargs)


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


def _ragged_collective(
  mesh: Mesh, ragged_collective: object, capacity_per: str, spare_slots: int
) -> bool:
  """Whether the per-device exchange and the spares' fetch use :func:`jax.lax.ragged_all_to_all`."""
  if ragged_collective is None:
    return mesh.devices.flat[0].platform in RAGGED_PLATFORMS
  if not isinstance(ragged_collective, bool):
    raise ValueError(f"ragged_collective must be True, False or None, got {ragged_collective!r}")
  if capacity_per != "device" and not spare_slots:
    raise ValueError(
      "ragged_collective applies to capacity_per='device' or spare_slots > 0 only; leave it None"
    )
  return ragged_collective


def _check_spares(spare_slots: object, split: str) -> int:
  """Static check: spare slots need the balanced split (their copies follow its counts)."""
  if isinstance(spare_slots, bool) or not isinstance(spare_slots, int) or spare_slots < 0:
    raise ValueError(f"spare_slots must be a non-negative int, got {spare_slots!r}")
  if spare_slots and split != "balanced":
    raise ValueError(f"spare_slots > 0 needs split='balanced', got split={split!r}")
  return spare_slots


def _slot_experts(x, route, keep, expert_params, expert_fn, *, axis, num_gpus, cap):
  """``[t, k, d_out]`` outputs of the kept pairs, through ``[P, cap, d]`` slot buffers."""
  num_replicas = route.routed.shape[0]
  slots_per_gpu = num_replicas // num_gpus
  tokens, top_k = route.slots.shape
  target = jnp.where(keep, route.slots, num_replicas)  # out of bounds: not sent
  rows = jnp.broadcast_to(x[:, None, :], (tokens, top_k, x.shape[-1]))
  send = jnp.zeros((num_replicas, cap, x.shape[-1]), x.dtype)
  send = send.at[target, route.position].add(rows, mode="drop")
  # [sending device, own slot, C, d] after the exchange.
  received = jax.lax.all_to_all(send.reshape(num_gpus, slots_per_gpu, cap, -1), axis, 0, 0)
  per_slot = received.transpose(1, 0, 2, 3).reshape(slots_per_gpu, num_gpus * cap, -1)
  out = jax.vmap(expert_fn)(expert_params, per_slot)
  out = out.reshape(slots_per_gpu, num_gpus, cap, -1).transpose(1, 0, 2, 3)
  back = jax.lax.all_to_all(out, axis, 0, 0).reshape(num_replicas, cap, -1)
  return back.at[target, route.position].get(mode="fill", fill_value=0)


def _device_experts(x, route, keep, kept, expert_params, expert_fn, *, axis, num_gpus, cap, ragged):
  """``[t, k, d_out]`` outputs of the kept pairs, packed by slot into ``[cap, d]`` per device.

  ``kept [G, P]`` is every sender's kept pairs per slot. Sender ``s``'s kept
  pairs of slot ``p`` sit, in position order, at ``send_at[s, p]`` of its
  ``[t * k]`` rows (ordered by slot, hence by receiving device), and land at
  ``recv_at[s, p]`` of the receiver's buffer, ordered by (slot, sender).
  """
  num_replicas = kept.shape[1]
  slots_per_gpu = num_replicas // num_gpus
  tokens, top_k = route.slots.shape
  device = jax.lax.axis_index(axis)

  def mine(a):  # this device's row, as sender
    return jax.lax.dynamic_index_in_dim(a, device, 0, keepdims=False)

  def own_slots(a):  # this device's slots' columns, as receiver
    return jax.lax.dynamic_slice_in_dim(a, device * slots_per_gpu, slots_per_gpu, axis=1)

  send_at = _exclusive_cumsum(kept)  # [G, P]
  # Offsets within each receiver in [receiver, slot, sender] order, back to [sender, P].
  by_receiver = jnp.moveaxis(kept.reshape(num_gpus, num_gpus, slots_per_gpu), 0, -1)
  recv_at = _exclusive_cumsum(by_receiver.reshape(num_gpus, num_replicas))
  recv_at = jnp.moveaxis(recv_at.reshape(num_gpus, slots_per_gpu, num_gpus), -1, 0)
  recv_at = recv_at.reshape(num_gpus, num_replicas)
  pairs = tokens * top_k
  row = mine(send_at).at[route.slots].get(mode="fill", fill_value=0) + route.position
  row = jnp.where(keep, row, pairs).reshape(-1)  # out of bounds: not sent
  rows = jnp.broadcast_to(x[:, None, :], (tokens, top_k, x.shape[-1])).reshape(pairs, -1)
  operand = jnp.zeros((pairs, x.shape[-1]), x.dtype).at[row].set(rows, mode="drop")
  # A device sends any one device at most its own pairs, and receives at most cap rows.
  exchange = functools.partial(
    _exchange, axis_name=axis, num_devices=num_gpus, block=min(pairs, cap), ragged=ragged
  )
  # Chunk g * S + q of a sender goes to slot q of device g; chunk s * S + q of a receiver
  # comes from (and goes back to) sender s.
  own = own_slots(kept).reshape(-1)
  buffer = jnp.zeros((cap, x.shape[-1]), x.dtype)
  received = exchange(operand, buffer, mine(send_at), mine(kept), mine(recv_at), own)
  out = expert_fn(expert_params, received, own_slots(kept).sum(0))  # [cap, d_out]
  back = jnp.zeros((pairs, out.shape[-1]), out.dtype)
  back = exchange(
    out, back, own_slots(recv_at).reshape(-1), own, own_slots(send_at).reshape(-1), mine(kept)
  )
  return back.at[row].get(mode="fill", fill_value=0).reshape(tokens, top_k, -1)


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
  capacity_per: str = "slot",
  spare_slots: int = 0,
  ragged_collective: bool | None = None,
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
    expert_fn: the experts; it must treat rows independently (unused buffer
      rows are zeros, and their outputs are unused). With
      ``capacity_per="slot"``, ``expert_fn(params, rows) -> outputs``: one
      expert on ``[n, d]`` rows, ``params`` one slot's leaves. With
      ``capacity_per="device"``, ``expert_fn(params, rows, group_sizes) ->
      outputs``: ``params`` the device's ``S`` slots' leaves ``[S, ...]``,
      ``rows [n, d]`` grouped contiguously by slot, ``group_sizes [S]`` int32
      rows per slot (:func:`expert_mlp` takes either form).
    log2phy: ``[E, R]`` int slots of each expert (one layer of a placement).
    logcnt: ``[E]`` int replicas of each expert.
    mesh: the device mesh; ``expert_axis`` is one of its axes.
    expert_axis: the mesh axis over which tokens and slots are split; ``P``
      and ``T`` must be divisible by its size ``G``.
    capacity_factor: the capacity factor (see :func:`capacity` and
      :func:`device_capacity`; static); None drops nothing.
    split: how each expert's pairs are split over its replicas (static):
      ``"even"`` (each device spreads its own pairs evenly) or
      ``"balanced"`` (by the step's quotas of the lightest heaviest GPU,
      from every device's counts).
    capacity_per: what the capacity bounds (static): ``"slot"`` (the pairs
      each device sends each slot, GShard's) or ``"device"`` (the pairs each
      device receives in all, the expert compute on ragged groups).
    spare_slots: ``k`` more slots per device, filled every step with copies
      for this step's counts (static; needs ``split="balanced"``; 0: none):
      every device computes the same :func:`eplb_jax.plan_spare_slots` from
      the gathered counts, and each copy's weights come from a slot that
      holds its expert (one slice per copy; a device receives at most ``k``
      experts' weights with the ragged collective). The copies' gradients
      are summed into their source slots.
    ragged_collective: with ``capacity_per="device"`` or spare slots,
      whether the rows and the copies travel by
      :func:`jax.lax.ragged_all_to_all` (True) or a padded
      :func:`jax.lax.all_to_all` (False), with identical results; None (the
      default): the ragged one where the mesh's platform has it
      (:data:`RAGGED_PLATFORMS`).

  Returns:
    ``(y [T, d_out], stats)``: the gate-weighted sum of each token's kept
    choices (zero for dropped ones; add the residual yourself), split like
    ``x``, and the :class:`DispatchStats` of the layer (over the ``P + G *
    k`` slots the step routes to: each device's ``S`` slots, then its ``k``
    spare ones).

  Raises:
    ValueError: shapes or dtypes that do not fit (``expert_params`` leaves
      must have the placement's ``P = R + E - 1`` slots), a bad mesh axis, a
      ``capacity_factor`` that is not finite and positive, a ``split`` or
      ``capacity_per`` not listed, ``spare_slots`` not a non-negative int or
      given with the even split, or ``ragged_collective`` given with neither
      the per-device capacity nor spare slots.
  """
  # Parameters of another slot count would be routed by the wrong slot numbers.
  _, num_replicas = _check_log2phy(log2phy)
  _check_params(expert_params, num_replicas, "the placement's slots, log2phy.shape[-1] + E - 1")
  sharding.check_mesh_axis(mesh, expert_axis, num_replicas, name="expert_axis", what="slots")
  num_gpus = mesh.shape[expert_axis]
  _check_routing(x, gates, expert_ids, num_gpus)
  balanced = _check_split(split) == "balanced"
  per_device = _check_capacity_per(capacity_per) == "device"
  spare_slots = _check_spares(spare_slots, split)
  ragged = _ragged_collective(mesh, ragged_collective, capacity_per, spare_slots)
  tokens_per_device, top_k = x.shape[0] // num_gpus, gates.shape[1]
  routed_slots = num_replicas + num_gpus * spare_slots  # the slots the step routes to
  cap = _capacity(capacity_per, tokens_per_device, top_k, routed_slots, num_gpus, capacity_factor)
  cap = max(cap, 1)  # zero tokens: one buffer row of zeros keeps the exchange's shapes non-empty

  def local(x, gates, expert_ids, expert_params, log2phy, logcnt):
    if not balanced:
      slots = dispatch.physical_slots(log2phy, logcnt, expert_ids)
    else:
      # Every device's [E] counts, the same on every device (invariant over the
      # axis, as the split's loop carry needs).
      local_counts = stats.expert_counts(expert_ids, log2phy.shape[0])
      counts = jax.lax.all_gather(local_counts, expert_axis, to="invarying")
      step = _plan_step(counts.sum(0), log2phy, num_gpus, spare_slots)
      device = jax.lax.axis_index(expert_axis)
      slots = dispatch.quota_slots(
        step.log2phy, step.quotas, expert_ids, counts=counts, device=device
      )
      if spare_slots:
        fetched = _fetch_spares(
          expert_params,
          step.source,
          axis=expert_axis,
          num_gpus=num_gpus,
          spare_slots=spare_slots,
          ragged=ragged,
        )
        expert_params = jax.tree.map(
          lambda own, copy: jnp.concatenate([own, copy]), expert_params, fetched
        )
    route = _route(slots, routed_slots)
    if per_device:
      # Every sender's pairs per slot decide every receiver's drops.
      every_kept = kept_pairs(
        jax.lax.all_gather(route.routed, expert_axis, to="invarying"), cap, "device"
      )
      kept = jax.lax.dynamic_index_in_dim(every_kept, jax.lax.axis_index(expert_axis), 0, False)
      keep = _keep(route, kept)
      outputs = _device_experts(
        x,
        route,
        keep,
        every_kept,
        expert_params,
        expert_fn,
        axis=expert_axis,
        num_gpus=num_gpus,
        cap=cap,
        ragged=ragged,
      )
    else:
      kept = kept_pairs(route.routed, cap)
      keep = _keep(route, kept)
      outputs = _slot_experts(
        x, route, keep, expert_params, expert_fn, axis=expert_axis, num_gpus=num_gpus, cap=cap
      )
    y = _combine(gates, keep, outputs)
    return y, DispatchStats(route.routed[None], (route.routed - kept)[None])

  split_spec, whole = P(expert_axis), P()
  return jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(split_spec, split_spec, split_spec, split_spec, whole, whole),
    out_specs=(split_spec, DispatchStats(split_spec, split_spec)),
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
  capacity_per: str = "slot",
  spare_slots: int = 0,
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
    x, gates, expert_ids, logcnt, capacity_factor, split: as in :func:`moe_layer`.
    capacity_per, spare_slots: as in :func:`moe_layer`.
    expert_params: pytree of logical leaves ``[E, ...]``.
    expert_fn: as in :func:`moe_layer` for ``capacity_per``; with
      ``"device"`` it is called for each expert in turn on every token, as
      one group (``params`` leaves ``[1, ...]``, ``group_sizes`` ``[T]``).
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
  spare_slots = _check_spares(spare_slots, split)
  tokens, top_k = expert_ids.shape
  routed_slots = num_replicas + num_gpus * spare_slots
  cap = _capacity(capacity_per, tokens // num_gpus, top_k, routed_slots, num_gpus, capacity_factor)
  route = _group_routes(expert_ids, log2phy, logcnt, num_gpus, split, spare_slots)
  kept = kept_pairs(route.routed, cap, capacity_per)
  keep = jax.vmap(_keep)(route, kept).reshape(tokens, top_k)
  if capacity_per == "slot":
    every = jax.vmap(expert_fn, in_axes=(0, None))(expert_params, x)  # [E, T, d_out]
  else:
    # One expert at a time, as a single group: a backend that computes ragged_dot densely
    # (XLA:CPU: every group over every row) then costs what the dense product does.
    every = jax.lax.map(
      lambda params: expert_fn(
        jax.tree.map(lambda leaf: leaf[None], params), x, jnp.full(1, tokens, jnp.int32)
      ),
      expert_params,
    )  # [E, T, d_out]
  valid = (expert_ids >= 0) & (expert_ids < num_experts)
  expert = jnp.where(valid, expert_ids, 0)
  outputs = every[expert, jnp.arange(tokens)[:, None]]  # [T, k, d_out]
  return _combine(gates, keep, outputs), DispatchStats(route.routed, route.routed - kept)


def dispatch_stats(
  expert_ids: jax.Array,
  log2phy: jax.Array,
  logcnt: jax.Array,
  *,
  num_gpus: int,
  capacity_factor: float | None = 1.25,
  split: str = "even",
  capacity_per: str = "slot",
  spare_slots: int = 0,
) -> DispatchStats:
  """What :func:`moe_layer` dispatches for the router's ``expert_ids``, without the experts.

  The stats :func:`moe_layer` (and :func:`moe_reference`) return for these
  router choices, from the routing alone: e.g. to compare the splits,
  capacities or capacity factors on the same step.

  Args:
    expert_ids: ``[T, k]`` int logical experts of the router's choices.
    log2phy, logcnt, num_gpus, capacity_factor, split: as in :func:`moe_reference`.
    capacity_per, spare_slots: as in :func:`moe_reference`.

  Returns:
    The :class:`DispatchStats` of the layer, ``[G, P + G * spare_slots]`` each.

  Raises:
    ValueError: shapes or dtypes that do not fit, a bad size, capacity
      factor, split or ``capacity_per``.
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
  spare_slots = _check_spares(spare_slots, _check_split(split))
  routed_slots = num_replicas + num_gpus * spare_slots
  cap = _capacity(capacity_per, tokens // num_gpus, top_k, routed_slots, num_gpus, capacity_factor)
  route = _group_routes(expert_ids, log2phy, logcnt, num_gpus, split, spare_slots)
  return DispatchStats(route.routed, route.routed - kept_pairs(route.routed, cap, capacity_per))
