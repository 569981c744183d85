"""Replica-aware dispatch: which physical slot serves each routed token.

The router picks logical experts; with a placement, an expert with
``logcnt[e]`` replicas has that many physical slots, and its tokens must be
spread over them for the replication to balance anything.
:func:`physical_slots` does it deterministically and exactly evenly: the
``j``-th assignment to expert ``e``, counting (token, choice) pairs in
row-major order of ``expert_ids``, goes to replica ``j mod logcnt[e]``, so
each replica of ``e`` receives ``floor`` or ``ceil`` of ``n_e / logcnt[e]``
of its ``n_e`` assignments. The rank ``j`` comes from a stable sort of the
ids (``O(N log N)`` for ``N = tokens * k``, ``O(N)`` memory).

:func:`quota_slots` spreads them by a step's quotas instead
(:func:`eplb_jax.split_tokens`: how many of the step's pairs of each expert
each replica takes, for the lightest heaviest GPU): from the same rank, the
``j``-th assignment goes to the replica whose cumulative quota first exceeds
``j``. Devices that each hold part of the step's tokens rank their pairs
among every device's (from every device's counts, or from offsets), so that
together they give every replica exactly its quota.

Since replicas hold identical weights, the choice of replica never changes
the math: a token's output is still its gate-weighted sum over its chosen
logical experts. :func:`logical_experts` maps slots back to their experts
(``phy2log`` lookup), for combining outputs per logical expert.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from eplb_jax._src import checks
from eplb_jax._src import ops


def _assign(log2phy: jax.Array, expert_ids: jax.Array, choose) -> jax.Array:
  """Slots of one layer's (token, choice) pairs, ``choose(rank, expert) -> replica``.

  ``rank`` is each pair's rank among the earlier (row-major) pairs of its
  expert; ``expert`` its id clipped into ``[0, E)``; pairs whose id is out of
  range (``E`` after :func:`checks.narrow_ids`) get -1.
  """
  num_experts = log2phy.shape[0]
  key = expert_ids.reshape(-1)  # int32, num_experts for an id out of range
  expert = jnp.minimum(key, num_experts - 1)
  replica = choose(ops.occurrence_rank(key), expert)
  slots = jnp.where(key < num_experts, log2phy[expert, replica], -1)
  return slots.reshape(expert_ids.shape)


def _listed(log2phy: jax.Array) -> jax.Array:
  """``[E]`` int32: the replicas ``log2phy`` lists for each expert."""
  return (log2phy >= 0).sum(-1, dtype=jnp.int32)


def _slots_one_layer(log2phy: jax.Array, logcnt: jax.Array, expert_ids: jax.Array) -> jax.Array:
  # Only the replicas log2phy lists are used, whatever logcnt says; an expert
  # listing none gets log2phy's -1.
  listed = _listed(log2phy)

  def even(rank, expert):
    return rank % jnp.clip(logcnt[expert], 1, jnp.maximum(listed[expert], 1))

  return _assign(log2phy, expert_ids, even)


def _quota_one_layer(
  log2phy: jax.Array,
  quotas: jax.Array,
  expert_ids: jax.Array,
  shares: jax.Array,
  device: jax.Array,
  *,
  interleaved: bool,
) -> jax.Array:
  """:func:`quota_slots` of one layer; ``shares`` are its ``offsets [E]`` or ``counts [G, E]``."""
  listed = log2phy >= 0
  # A slot outside [0, P) has no quota.
  per_replica = quotas.at[jnp.where(listed, log2phy, 0)].get(mode="fill", fill_value=0)
  cumulative = jnp.cumsum(jnp.where(listed, per_replica, 0), axis=-1, dtype=jnp.int32)  # [E, R]
  count = _listed(log2phy)

  def by_quota(rank, expert):
    if interleaved:
      # Rank i of device d among the pairs of every device, their i-th pairs
      # before their (i + 1)-th, in device order: sum over devices g of
      # min(n_g, i), plus the devices before d that have an i-th pair.
      others = shares[:, expert].T  # [N, G]
      earlier = jnp.arange(shares.shape[0]) < device
      j = jnp.minimum(others, rank[:, None]).sum(-1, dtype=jnp.int32)
      j = j + ((others > rank[:, None]) & earlier).sum(-1, dtype=jnp.int32)
    else:
      j = rank + shares[expert]
    # The first replica whose cumulative quota exceeds j (zero quotas and
    # padding never do); beyond the expert's total quota, j mod its replicas.
    first = (cumulative[expert] <= j[:, None]).sum(-1, dtype=jnp.int32)
    covered = j < cumulative[expert, -1]
    return jnp.where(covered, first, j % jnp.maximum(count[expert], 1))

  return _assign(log2phy, expert_ids, by_quota)


def physical_slots(
  log2phy: jax.typing.ArrayLike, logcnt: jax.typing.ArrayLike, expert_ids: jax.typing.ArrayLike
) -> jax.Array:
  """Chooses a physical slot for each (token, choice), spreading experts over replicas.

  Args:
    log2phy: ``[E, R]`` int slots of each expert, -1 padded (as returned by
      :func:`eplb_jax.rebalance_experts`), or ``[L, E, R]`` for ``L`` layers.
    logcnt: ``[E]`` (or ``[L, E]``) int replicas of each expert; a count
      beyond the slots ``log2phy`` lists for the expert is taken as that
      number (eagerly, it raises ``ValueError``).
    expert_ids: ``[tokens, k]`` (or ``[L, tokens, k]``) logical expert ids
      chosen by the router; any shape with that leading ``L`` works.

  Returns:
    int32 slots, the shape of ``expert_ids``: ``log2phy[e, j mod logcnt[e]]``
    for the ``j``-th (row-major) assignment to ``e``; -1 where the id is not
    in ``[0, E)``.

  Raises:
    ValueError: the arrays are not integer, or their shapes do not match.

  Example:
    >>> import jax.numpy as jnp
    >>> from eplb_jax.runtime import dispatch
    >>> log2phy = jnp.array([[3, 0], [1, -1], [4, -1], [2, 5]])  # slots of 4 experts
    >>> logcnt = jnp.array([2, 1, 1, 2])
    >>> dispatch.physical_slots(log2phy, logcnt, jnp.array([[0, 3], [0, 1], [0, 3]]))
    Array([[3, 2],
           [0, 1],
           [3, 5]], dtype=int32)
  """
  log2phy = jnp.asarray(checks.check_ids(log2phy, "log2phy"))
  if log2phy.ndim not in (2, 3):
    raise ValueError(f"log2phy must be [E, R] or [L, E, R], got shape {log2phy.shape}")
  logcnt = checks.check_ids(logcnt, "logcnt")
  expert_ids = checks.check_ids(expert_ids, "expert_ids")
  if logcnt.shape != log2phy.shape[:-1]:
    raise ValueError(f"logcnt must have shape {log2phy.shape[:-1]}, got {logcnt.shape}")
  if log2phy.ndim == 3 and expert_ids.shape[:1] != log2phy.shape[:1]:
    raise ValueError(
      f"expert_ids must have the {log2phy.shape[0]} layers of log2phy first, got shape "
      f"{expert_ids.shape}"
    )
  num_experts = log2phy.shape[-2]
  if checks.is_concrete(logcnt) and checks.is_concrete(log2phy):
    listed = (np.asarray(log2phy) >= 0).sum(-1)
    if np.any(np.asarray(logcnt) > listed):
      raise ValueError("logcnt must not exceed the slots log2phy lists for each expert")
  logcnt = checks.narrow_ids(logcnt, log2phy.shape[-1] + 1, 0)
  expert_ids = checks.narrow_ids(expert_ids, num_experts, num_experts)
  if log2phy.ndim == 3:
    return jax.vmap(_slots_one_layer)(log2phy.astype(jnp.int32), logcnt, expert_ids)
  return _slots_one_layer(log2phy.astype(jnp.int32), logcnt, expert_ids)


def quota_slots(
  log2phy: jax.typing.ArrayLike,
  quotas: jax.typing.ArrayLike,
  expert_ids: jax.typing.ArrayLike,
  *,
  offsets: jax.typing.ArrayLike | None = None,
  counts: jax.typing.ArrayLike | None = None,
  device: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  """Chooses a physical slot for each (token, choice) so that every replica takes its quota.

  With quotas from :func:`eplb_jax.split_tokens` (how many of the step's
  pairs of each expert each slot takes), the assignment of rank ``j`` to
  expert ``e`` goes to the replica ``log2phy[e, r]`` whose cumulative quota
  (over ``e``'s replicas in ``log2phy`` order) first exceeds ``j``: replica
  ``r`` takes the ranks in ``[Q[r - 1], Q[r])`` for the cumulative quotas
  ``Q``. The rank counts the (token, choice) pairs of ``expert_ids`` in
  row-major order, and when the step's pairs are spread over several
  senders, the pairs of the others as well, in one of two ways:

  * ``offsets[e]``, the assignments to ``e`` ranked before these (e.g. those
    of earlier micro-batches): the ``i``-th one here has rank
    ``offsets[e] + i``, so each sender takes a contiguous share.
  * ``counts [G, E]``, every sender's pairs per expert in this step (one
    all-gather), and ``device``, this sender's row of it: the senders'
    pairs are interleaved, all their ``i``-th pairs of ``e`` (in sender
    order) before their ``(i + 1)``-th, so each sender spreads its pairs of
    ``e`` over the replicas in proportion to their quotas (within one pair
    per replica when the senders' counts are equal), as the even split
    does.

  Either way, with quotas computed from the step's total counts, the
  senders together give every replica exactly its quota.

  Quotas that do not cover the pairs are safe: an assignment of rank ``j``
  at or beyond the expert's total quota (e.g. all quotas zero) goes to
  replica ``j mod n`` for the ``n`` replicas ``log2phy`` lists, the even
  spread of :func:`physical_slots`, which it then equals (with ``logcnt``
  the listed replicas and no other senders). Quotas of slots ``log2phy``
  does not list for ``e`` are never read.

  Args:
    log2phy: ``[E, R]`` int slots of each expert, -1 padded at the end (as
      returned by :func:`eplb_jax.rebalance_experts`), or ``[L, E, R]``.
    quotas: ``[P]`` (or ``[L, P]``) int pairs each slot takes; a slot of
      ``log2phy`` outside ``[0, P)`` takes none.
    expert_ids: ``[tokens, k]`` (or ``[L, tokens, k]``) logical expert ids
      chosen by the router; any shape with that leading ``L`` works.
    offsets: ``[E]`` (or ``[L, E]``) int assignments to each expert ranked
      before these ids (default none).
    counts: ``[G, E]`` (or ``[L, G, E]``) int pairs of each sender per
      expert; ``counts[device]`` must be the counts of ``expert_ids`` for
      the replicas to receive exactly their quotas (otherwise every pair
      still gets a replica of its expert).
    device: int scalar (may be traced, e.g. :func:`jax.lax.axis_index`), this
      sender's row of ``counts``; required with ``counts``.

  Returns:
    int32 slots, the shape of ``expert_ids``; -1 where the id is not in
    ``[0, E)`` or the expert lists no replica. Under ``jax.jit`` a negative
    quota, offset or count counts as 0.

  Raises:
    ValueError: the arrays are not integer or their shapes do not match,
      ``offsets`` given with ``counts``, or ``counts`` without ``device``
      (or the reverse); eagerly, negative quotas, offsets or counts, values
      from ``2**31``, or ``device`` outside ``[0, G)``.
  """
  log2phy = jnp.asarray(checks.check_ids(log2phy, "log2phy"))
  if log2phy.ndim not in (2, 3):
    raise ValueError(f"log2phy must be [E, R] or [L, E, R], got shape {log2phy.shape}")
  layers, num_experts = log2phy.shape[:-2], log2phy.shape[-2]
  quotas = checks.check_ids(quotas, "quotas")
  if quotas.ndim != log2phy.ndim - 1 or quotas.shape[:-1] != layers:
    raise ValueError(
      f"quotas must be {'[L, P]' if layers else '[P]'} for log2phy of shape {log2phy.shape}, "
      f"got shape {quotas.shape}"
    )
  expert_ids = checks.check_ids(expert_ids, "expert_ids")
  if layers and expert_ids.shape[:1] != layers:
    raise ValueError(
      f"expert_ids must have the {layers[0]} layers of log2phy first, got shape {expert_ids.shape}"
    )
  interleaved = counts is not None
  if interleaved and offsets is not None:
    raise ValueError("give offsets (contiguous shares) or counts (interleaved), not both")
  if interleaved != (device is not None):
    raise ValueError("counts and device go together: give both or neither")
  if interleaved:
    shares = checks.check_ids(counts, "counts")
    if (
      shares.ndim != log2phy.ndim
      or shares.shape[:-2] != layers
      or shares.shape[-1:] != (num_experts,)
    ):
      rule = "[L, G, E]" if layers else "[G, E]"
      raise ValueError(f"counts must be {rule} for log2phy {log2phy.shape}, got {shares.shape}")
    device = checks.check_ids(device, "device")
    if np.ndim(device):
      raise ValueError(f"device must be a scalar, got shape {np.shape(device)}")
    if checks.is_concrete(device) and not 0 <= int(device) < shares.shape[-2]:
      raise ValueError(f"device must be in [0, {shares.shape[-2]}), got {int(device)}")
  else:
    shares = np.zeros(log2phy.shape[:-1], np.int32) if offsets is None else offsets
    shares = checks.check_ids(shares, "offsets")
    if shares.shape != log2phy.shape[:-1]:
      raise ValueError(f"offsets must have shape {log2phy.shape[:-1]}, got {shares.shape}")
    device = 0
  for name, value in (("quotas", quotas), ("counts" if interleaved else "offsets", shares)):
    if checks.is_concrete(value) and np.size(value):
      host = np.asarray(value)
      if host.min() < 0 or host.max() >= 2**31:
        raise ValueError(f"{name} must be in [0, 2**31)")
  quotas, shares = (jnp.maximum(jnp.asarray(a).astype(jnp.int32), 0) for a in (quotas, shares))
  device = jnp.asarray(device).astype(jnp.int32)
  expert_ids = checks.narrow_ids(expert_ids, num_experts, num_experts)
  one_layer = functools.partial(_quota_one_layer, interleaved=interleaved)
  if layers:
    one_layer = jax.vmap(one_layer, in_axes=(0, 0, 0, 0, None))
  return one_layer(log2phy.astype(jnp.int32), quotas, expert_ids, shares, device)


def logical_experts(phy2log: jax.typing.ArrayLike, slots: jax.typing.ArrayLike) -> jax.Array:
  """The logical expert behind each slot: ``phy2log[slot]``, -1 where ``slot`` is not a slot.

  Args:
    phy2log: ``[P]`` (or ``[L, P]``) logical expert of each physical slot.
    slots: ``[...]`` (or ``[L, ...]``) int slots, e.g. from :func:`physical_slots`.

  Returns:
    int32 logical expert ids, the shape of ``slots``; -1 where ``slot`` is
    outside ``[0, P)`` (e.g. -1).

  Raises:
    ValueError: the arrays are not integer, or ``slots`` lacks ``phy2log``'s layers.
  """
  phy2log = jnp.asarray(checks.check_ids(phy2log, "phy2log"))
  slots = checks.check_ids(slots, "slots")
  if phy2log.ndim not in (1, 2):
    raise ValueError(f"phy2log must be [P] or [L, P], got shape {phy2log.shape}")
  if phy2log.ndim == 2 and slots.shape[:1] != phy2log.shape[:1]:
    raise ValueError(
      f"slots must have the {phy2log.shape[0]} layers of phy2log first, got shape {slots.shape}"
    )
  num_slots = phy2log.shape[-1]
  slots = checks.narrow_ids(slots, num_slots, num_slots)
  # The padded entry num_slots stands for "not a slot".
  end = [(0, 0)] * (phy2log.ndim - 1) + [(0, 1)]
  padded = jnp.pad(phy2log.astype(jnp.int32), end, constant_values=-1)
  if phy2log.ndim == 2:
    flat = slots.reshape(slots.shape[0], math.prod(slots.shape[1:]))
    return jnp.take_along_axis(padded, flat, axis=-1).reshape(slots.shape)
  return padded[slots]
