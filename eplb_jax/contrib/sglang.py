"""Files of SGLang and sglang-jax: load statistics in, placements out.

Checked against SGLang 0.5.23 (``python/sglang/srt/eplb/``) and sglang-jax
(``python/sgl_jax/srt/eplb/``, ``python/sgl_jax/srt/layers/routed_experts_capturer.py``).

Loads (each reader returns the counts as the file holds them, ``[L, E]`` or a
window ``[N, L, E]`` of ``N`` forward passes, as NumPy int64 for counts and
float64 otherwise; :func:`eplb_jax.rebalance_experts` sums a window over
``N``, as SGLang's ``deepseek`` algorithms do):

* :func:`read_recorder_dump`: SGLang's expert-distribution recorder dump in
  ``stat`` / ``stat_approx`` mode, a ``torch.save`` of ``{"rank": int,
  "logical_count": int32 [N, L, E], "average_utilization_rate_over_window":
  float | None}`` (``N`` recorded forward passes). SGLang also takes this
  file as ``--init-expert-location``.
* :func:`read_logical_count_json`: an ``--init-expert-location`` JSON file or
  inline JSON text ``{"logical_count": [L, E] or [N, L, E]}``.
* :func:`read_sglang_jax_dump`: sglang-jax's recorder dump, ``np.save`` of
  ``{"logical_count": int64 [L, E], "timestamp": str}`` (a pickled object
  array, so it needs ``allow_pickle=True``).
* :func:`read_loads`: any of the above, by suffix.

Placements:

* :func:`write_physical_to_logical_map`: ``{"physical_to_logical_map": [L, P]}``
  as ``.json`` (SGLang and sglang-jax), ``.pt`` (SGLang, needs torch) or a
  bare ``.npy`` array (sglang-jax), for ``--init-expert-location``.
* :func:`read_physical_to_logical_map`: the same files back, e.g. the
  placement in service for ``eplb_jax.rebalance_experts(...,
  previous_phy2log=...)``.
* :func:`expert_location_metadata`: the constructor arguments of sglang-jax's
  ``ExpertLocationMetadata`` for a placement, with
  ``logical_to_rank_dispatch_physical_map`` computed as SGLang does
  (:func:`sglang_dispatch_map`) or as sglang-jax does.

Every reader raises ``ValueError`` naming the file and the rule broken; errors
raised inside torch, NumPy or the JSON parser on corrupt files are converted.
torch is imported only to read or write ``.pt`` files.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import eplb_jax
from eplb_jax._src import files

PathLike = str | os.PathLike
LOGICAL_COUNT = "logical_count"
PHYSICAL_TO_LOGICAL_MAP = "physical_to_logical_map"
DISPATCH_MODES = ("sglang", "first", "eplb_jax")


# ------------------------------------------------------------------ helpers


def _numeric_array(value: Any, where: str, key: str) -> np.ndarray:
  """``value`` (nested lists, NumPy array or torch tensor) as a real-valued NumPy array."""
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu()
    if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
      value = value.float()
    value = value.numpy()
  try:
    array = np.asarray(value)
  except (ValueError, TypeError) as error:
    raise ValueError(f"{where}: {key} must be a rectangular numeric array ({error})") from None
  if array.dtype == np.bool_ or not (
    np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
  ):
    raise ValueError(
      f"{where}: {key} must be a rectangular array of numbers, got dtype {array.dtype}"
    )
  return array


def logical_count(value: Any, where: str, key: str = LOGICAL_COUNT) -> np.ndarray:
  """Validates a ``logical_count``, ``[L, E]`` or ``[N, L, E]``: int64 for integer counts,
  float64 otherwise. ``ValueError`` messages start with ``where``."""
  count = _numeric_array(value, where, key)
  if count.ndim not in (2, 3):
    raise ValueError(
      f"{where}: {key} must be 2-D [layers, experts] or 3-D [steps, layers, experts], "
      f"got shape {count.shape}"
    )
  if 0 in count.shape[-2:]:
    raise ValueError(f"{where}: {key} must have at least one layer and expert, got {count.shape}")
  if np.issubdtype(count.dtype, np.floating) and not np.all(np.isfinite(count)):
    raise ValueError(f"{where}: {key} must be finite, found NaN or inf")
  if np.any(count < 0):
    raise ValueError(f"{where}: {key} must be non-negative, found {count.min()}")
  return count.astype(np.int64 if np.issubdtype(count.dtype, np.integer) else np.float64)


def _check_experts(loads: np.ndarray, where: str, num_logical_experts: int | None) -> np.ndarray:
  if num_logical_experts is not None and loads.shape[-1] != num_logical_experts:
    raise ValueError(
      f"{where}: expected {num_logical_experts} logical experts, got {loads.shape[-1]} "
      "(a count per physical slot, not per logical expert?)"
    )
  return loads


# ------------------------------------------------------------------ loads


def read_recorder_dump(path: PathLike, *, num_logical_experts: int | None = None) -> np.ndarray:
  """Counts of an SGLang expert-distribution recorder dump (``stat`` mode), one row per pass.

  SGLang writes it on ``/dump_expert_distribution_record`` as
  ``$SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR/expert_distribution_recorder_<time>.pt``
  (rank 0 only; the counts are already all-reduced over ranks). The
  ``per_pass`` / ``per_token`` modes write per-pass records instead, which
  this reader refuses.

  Args:
    path: the ``.pt`` file.
    num_logical_experts: optional ``E`` to check the file against.

  Returns:
    ``logical_count``, ``[N, L, E]`` (or ``[L, E]``), int64 (float64 for
    float counts).

  Raises:
    ValueError: unreadable file, no ``logical_count``, wrong shape, negative
      or non-finite counts.
    ImportError: torch is not installed.
  """
  path = Path(path)
  data = files.read_torch(path)
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a dict with {LOGICAL_COUNT!r}, got {type(data).__name__}")
  if LOGICAL_COUNT not in data:
    if "records" in data:
      raise ValueError(
        f"{path}: a per_pass/per_token recorder dump (keys {sorted(data)}); "
        f"record with --expert-distribution-recorder-mode stat for {LOGICAL_COUNT!r}"
      )
    raise ValueError(f"{path}: no {LOGICAL_COUNT!r} key (keys {sorted(map(str, data))})")
  loads = logical_count(data[LOGICAL_COUNT], str(path))
  return _check_experts(loads, str(path), num_logical_experts)


def read_logical_count_json(
  source: PathLike, *, num_logical_experts: int | None = None
) -> np.ndarray:
  """Loads of an ``--init-expert-location`` JSON holding ``logical_count``.

  Args:
    source: a ``.json`` file, or the JSON text itself (as SGLang takes it
      inline), ``{"logical_count": [L, E] or [N, L, E]}``.
    num_logical_experts: optional ``E`` to check against.

  Returns:
    ``[L, E]`` or ``[N, L, E]``, int64 for integer counts, float64 otherwise.

  Raises:
    ValueError: unreadable or invalid JSON, no ``logical_count`` (a
      ``physical_to_logical_map`` file is a placement: see
      :func:`read_physical_to_logical_map`), wrong shape or values.
  """
  data, where = files.read_json(source), files.source_name(source)
  if not isinstance(data, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
  if LOGICAL_COUNT not in data:
    hint = (
      "; it holds a placement, read it with read_physical_to_logical_map"
      if PHYSICAL_TO_LOGICAL_MAP in data
      else ""
    )
    raise ValueError(f"{where}: no {LOGICAL_COUNT!r} key (keys {sorted(data)}){hint}")
  loads = logical_count(data[LOGICAL_COUNT], where)
  return _check_experts(loads, where, num_logical_experts)


def read_sglang_jax_dump(
  path: PathLike, *, allow_pickle: bool = False, num_logical_experts: int | None = None
) -> np.ndarray:
  """Loads of a sglang-jax expert-distribution recorder dump.

  sglang-jax (``--enable-expert-distribution-recorder``) writes
  ``<--expert-distribution-recorder-output-file>_<YYYYmmdd_HHMM>.npy`` with
  ``np.save({"logical_count": [L, E] int64, "timestamp": str})``: a pickled
  dict. When sglang-jax had no expert-location metadata the array holds the
  counts per physical slot ``[L, P]`` instead; pass ``num_logical_experts``
  to catch that.

  Args:
    path: the ``.npy`` file.
    allow_pickle: must be True to read the pickled dict (unpickling runs code
      from the file: only for files you trust).
    num_logical_experts: optional ``E`` to check against.

  Returns:
    ``[L, E]`` int64 (float64 for float counts); a 1-D count is one layer.

  Raises:
    ValueError: pickled file without ``allow_pickle=True``, unreadable file,
      a bare array (sglang-jax reads that as a placement), no
      ``logical_count``, wrong shape or values.
  """
  path = Path(path)
  data = files.read_npy(path, allow_pickle, f"a dict with {LOGICAL_COUNT!r}")
  if isinstance(data, np.ndarray):
    raise ValueError(
      f"{path}: a bare array of shape {data.shape}, which sglang-jax reads as a "
      f"{PHYSICAL_TO_LOGICAL_MAP}, not a dict with {LOGICAL_COUNT!r}"
    )
  if not isinstance(data, dict) or LOGICAL_COUNT not in data:
    keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
    raise ValueError(f"{path}: expected a dict with {LOGICAL_COUNT!r}, got {keys}")
  count = _numeric_array(data[LOGICAL_COUNT], str(path), LOGICAL_COUNT)
  if count.ndim == 1:  # sglang-jax's init_by_eplb reads a 1-D count as one layer
    count = count[None, :]
  loads = logical_count(count, str(path))
  return _check_experts(loads, str(path), num_logical_experts)


def read_loads(
  source: PathLike, *, allow_pickle: bool = False, num_logical_experts: int | None = None
) -> np.ndarray:
  """Loads ``[L, E]`` or ``[N, L, E]`` from any engine file, chosen by suffix.

  ``.pt``: :func:`read_recorder_dump`; ``.npy``: :func:`read_sglang_jax_dump`;
  ``.json`` or inline JSON text: :func:`read_logical_count_json`.

  Raises:
    ValueError: as the chosen reader, or for an unknown suffix.
  """
  suffix = files.source_suffix(source)
  if suffix == ".pt":
    return read_recorder_dump(source, num_logical_experts=num_logical_experts)
  if suffix == ".npy":
    return read_sglang_jax_dump(
      source, allow_pickle=allow_pickle, num_logical_experts=num_logical_experts
    )
  if suffix == ".json" or not suffix:
    return read_logical_count_json(source, num_logical_experts=num_logical_experts)
  raise ValueError(
    f"{files.source_name(source)}: unknown load file type {suffix!r} (.pt, .npy or .json)"
  )


# ------------------------------------------------------------------ placements


def _check_phy2log(value: Any, where: str, num_logical_experts: int | None = None) -> np.ndarray:
  """A complete placement ``[L, P]``: non-negative integer expert ids (and below E when given)."""
  phy2log = _numeric_array(value, where, PHYSICAL_TO_LOGICAL_MAP)
  if phy2log.ndim != 2 or 0 in phy2log.shape:
    raise ValueError(
      f"{where}: {PHYSICAL_TO_LOGICAL_MAP} must be 2-D [layers, slots], got shape {phy2log.shape}"
    )
  if not np.issubdtype(phy2log.dtype, np.integer):
    if not (np.all(np.isfinite(phy2log)) and np.all(phy2log == np.round(phy2log))):
      raise ValueError(f"{where}: {PHYSICAL_TO_LOGICAL_MAP} must hold integer expert ids")
  phy2log = phy2log.astype(np.int64)
  if phy2log.min() < 0:
    raise ValueError(
      f"{where}: {PHYSICAL_TO_LOGICAL_MAP} must hold expert ids >= 0 (SGLang has no empty "
      f"slot), found {phy2log.min()}"
    )
  if num_logical_experts is not None and phy2log.max() >= num_logical_experts:
    raise ValueError(
      f"{where}: {PHYSICAL_TO_LOGICAL_MAP} must hold expert ids below {num_logical_experts}, "
      f"found {phy2log.max()}"
    )
  return phy2log


def write_physical_to_logical_map(path: PathLike, phy2log: Any) -> Path:
  """Writes a placement as an ``--init-expert-location`` file.

  The file holds ``{"physical_to_logical_map": [L, P]}`` and nothing else:
  SGLang passes the file's keys to ``ExpertLocationMetadata.init_by_mapping``
  as keyword arguments, so another key would fail there.

  Args:
    path: ``.json`` (SGLang and sglang-jax), ``.pt`` (SGLang; needs torch;
      an int64 tensor) or ``.npy`` (sglang-jax; a bare int64 array, which it
      reads as the map). SGLang does not read ``.npy``, sglang-jax not ``.pt``.
    phy2log: ``[L, P]`` expert of each physical slot (NumPy, JAX or torch).

  Returns:
    The path written. The write is atomic: on failure the file at ``path``
    is left as it was.

  Raises:
    ValueError: a map that is not 2-D, not integral or holds negative ids, or
      an unknown suffix.
    ImportError: ``.pt`` without torch.
  """
  path = Path(path)
  phy2log = _check_phy2log(phy2log, f"{path} (writing)")
  suffix = path.suffix.lower()
  if suffix == ".json":
    text = json.dumps({PHYSICAL_TO_LOGICAL_MAP: phy2log.tolist()}).encode()
    return files.write_atomic(path, lambda file: file.write(text))
  if suffix == ".pt":
    try:
      import torch
    except ImportError:
      raise ImportError(f"{path}: writing .pt files needs torch (pip install torch)") from None
    data = {PHYSICAL_TO_LOGICAL_MAP: torch.from_numpy(phy2log)}
    return files.write_atomic(path, lambda file: torch.save(data, file))
  if suffix == ".npy":
    return files.write_atomic(path, lambda file: np.save(file, phy2log, allow_pickle=False))
  raise ValueError(f"{path}: unknown placement file type {path.suffix!r} (.json, .pt or .npy)")


def physical_to_logical_map_json(phy2log: Any) -> str:
  """The inline JSON text for ``--init-expert-location '<text>'`` (SGLang and sglang-jax)."""
  phy2log = _check_phy2log(phy2log, "phy2log")
  return json.dumps({PHYSICAL_TO_LOGICAL_MAP: phy2log.tolist()}, separators=(",", ":"))


def read_physical_to_logical_map(
  source: PathLike, *, allow_pickle: bool = False, num_logical_experts: int | None = None
) -> np.ndarray:
  """Reads a placement ``[L, P]`` from an ``--init-expert-location`` file, as the engines do.

  Args:
    source: ``.json`` file or inline JSON text, ``.pt`` file (torch dict) or
      ``.npy`` file (a bare array, or with ``allow_pickle=True`` a pickled
      dict), holding ``physical_to_logical_map``.
    allow_pickle: allow a pickled ``.npy`` dict (runs code from the file).
    num_logical_experts: optional ``E`` to check the ids against.

  Returns:
    ``[L, P]`` int64.

  Raises:
    ValueError: unreadable file, no ``physical_to_logical_map``, or a map
      that is not a complete placement.
  """
  where, suffix = files.source_name(source), files.source_suffix(source)
  if suffix == ".pt":
    data = files.read_torch(Path(source))
  elif suffix == ".npy":
    data = files.read_npy(Path(source), allow_pickle, f"a dict with {PHYSICAL_TO_LOGICAL_MAP!r}")
    if isinstance(data, np.ndarray):
      data = {PHYSICAL_TO_LOGICAL_MAP: data}
  elif suffix in (".json", ""):
    data = files.read_json(source)
  else:
    raise ValueError(f"{where}: unknown placement file type {suffix!r} (.json, .pt or .npy)")
  if not isinstance(data, dict) or PHYSICAL_TO_LOGICAL_MAP not in data:
    keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
    raise ValueError(f"{where}: expected {PHYSICAL_TO_LOGICAL_MAP!r}, got {keys}")
  return _check_phy2log(data[PHYSICAL_TO_LOGICAL_MAP], where, num_logical_experts)


# ------------------------------------------------------------------ ExpertLocationMetadata


def _replica_slots(phy2log: np.ndarray, num_logical_experts: int) -> list[list[list[int]]]:
  """Per layer and expert, its slots in ascending order (how both engines list them)."""
  slots: list[list[list[int]]] = [[[] for _ in range(num_logical_experts)] for _ in phy2log]
  for layer, row in enumerate(phy2log.tolist()):
    for slot, expert in enumerate(row):
      slots[layer][expert].append(slot)
  return slots


def _nearest_replica(
  candidates: Sequence[int], rank: int, slots_per_gpu: int, gpus_per_node: int | None
) -> int:
  """SGLang's preference for one rank: the only replica, else one on its GPU, else on its node.

  Returns -1 when none qualifies. A same-node replica counts only when some
  replica is elsewhere (otherwise it would not narrow the choice).
  """
  if len(candidates) == 1:
    return candidates[0]
  for slot in candidates:
    if slot // slots_per_gpu == rank:
      return slot
  if gpus_per_node is not None:
    node = rank // gpus_per_node
    same_node = [slot for slot in candidates if slot // (slots_per_gpu * gpus_per_node) == node]
    if 0 < len(same_node) < len(candidates):
      return same_node[0]
  return -1


def _dispatch_rows(
  slots: list[list[list[int]]],
  ep_size: int,
  slots_per_gpu: int,
  gpus_per_node: int | None,
  seed: int,
) -> np.ndarray:
  """SGLang's dispatch choice for every rank, ``[ep_size, L, E]``, from the candidate lists.

  Ranks without a nearby replica share the replicas evenly: each replica gets
  ``k // n`` of the ``k`` ranks, ``k % n`` replicas drawn at random get one
  more, in a shuffled order. One ``random.Random(seed)`` serves all layers
  and experts in order, with SGLang's calls (``sample`` then ``shuffle``), so
  the draws are SGLang's.
  """
  rng = random.Random(seed)
  num_layers, num_experts = len(slots), len(slots[0])
  result = np.full((ep_size, num_layers, num_experts), -1, np.int64)
  for layer in range(num_layers):
    for expert in range(num_experts):
      candidates = slots[layer][expert]
      unserved = []
      for rank in range(ep_size):
        choice = _nearest_replica(candidates, rank, slots_per_gpu, gpus_per_node)
        result[rank, layer, expert] = choice
        if choice < 0:
          unserved.append(rank)
      if unserved:
        rounds, extra = divmod(len(unserved), len(candidates))
        shares = list(candidates) * rounds + rng.sample(candidates, k=extra)
        rng.shuffle(shares)
        result[unserved, layer, expert] = shares
  return result


def _check_ep(phy2log: np.ndarray, ep_size: int, num_nodes: int) -> tuple[int, int]:
  for value, name in ((ep_size, "ep_size"), (num_nodes, "num_nodes")):
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  if phy2log.shape[1] % ep_size:
    raise ValueError(f"ep_size must divide the number of slots {phy2log.shape[1]}, got {ep_size}")
  if ep_size % num_nodes:
    raise ValueError(f"num_nodes must divide ep_size {ep_size}, got {num_nodes}")
  return phy2log.shape[1] // ep_size, ep_size // num_nodes


def _check_rank(ep_rank: int, ep_size: int) -> None:
  if isinstance(ep_rank, bool) or not isinstance(ep_rank, int | np.integer):
    raise ValueError(f"ep_rank must be an int, got {ep_rank!r}")
  if not 0 <= ep_rank < ep_size:
    raise ValueError(f"ep_rank must be in [0, {ep_size}), got {ep_rank}")


def sglang_dispatch_map(
  phy2log: Any,
  num_logical_experts: int,
  ep_size: int,
  ep_rank: int,
  *,
  num_nodes: int = 1,
  prefer_same_node: bool = True,
  collapse: bool = True,
  seed: int = 42,
) -> np.ndarray:
  """SGLang's ``logical_to_rank_dispatch_physical_map`` ``[L, E]`` of one EP rank.

  The replica each rank sends an expert's tokens to under
  ``--ep-dispatch-algorithm static``: the expert's only replica; else the
  first (lowest) replica on the rank's GPU; else, when the expert also has
  replicas on other nodes, the first on the rank's node; else a replica
  shared out evenly among the ranks left, drawn with ``random.Random(seed)``
  as SGLang draws (seed 42).

  Args:
    phy2log: ``[L, P]`` placement (GPU ``g`` holds slots ``g * P / ep_size``
      onwards).
    num_logical_experts: ``E``.
    ep_size: EP ranks (GPUs).
    ep_rank: the rank whose row to return.
    num_nodes: SGLang's ``nnodes``; ``ep_size / num_nodes`` GPUs per node.
    prefer_same_node: SGLang's same-node step, on unless the server runs
      elastic EP scale-up (``ep_join_mode == "scale"`` or an expanded world).
    collapse: reproduce SGLang's ``init_by_mapping`` (a placement loaded from
      ``--init-expert-location`` or broadcast after a rebalance, with an a2a
      backend, which ``static`` dispatch needs): it first narrows each
      expert's replica list to the rank's nearest replica, which changes the
      random draws of the other experts. Each rank then draws in its own
      computation, so the ranks left without a nearby replica are spread over
      the replicas only roughly evenly. False gives the map of
      ``init_by_eplb`` (SGLang's own balancer) computed from a placement with
      the same replica order, where one computation spreads them evenly.

  Returns:
    ``[L, E]`` int64 physical slot ids.
  """
  phy2log = _check_phy2log(phy2log, "phy2log", num_logical_experts)
  slots_per_gpu, gpus_per_node = _check_ep(phy2log, ep_size, num_nodes)
  _check_rank(ep_rank, ep_size)
  slots = _replica_slots(phy2log, num_logical_experts)
  if any(not replicas for layer in slots for replicas in layer):
    raise ValueError("phy2log must hold every logical expert in every layer")
  per_node = gpus_per_node if prefer_same_node else None
  if collapse:
    for layer in slots:
      for expert, candidates in enumerate(layer):
        nearest = _nearest_replica(candidates, ep_rank, slots_per_gpu, per_node)
        if nearest >= 0:
          layer[expert] = [nearest]
  return _dispatch_rows(slots, ep_size, slots_per_gpu, per_node, seed)[ep_rank]


def expert_location_metadata(
  phy2log: Any,
  num_logical_experts: int,
  *,
  ep_size: int,
  ep_rank: int = 0,
  num_nodes: int = 1,
  dispatch: str = "sglang",
  ep_dispatch_algorithm: str = "static",
  as_jax: bool = False,
) -> dict[str, Any]:
  """Constructor arguments of sglang-jax's ``ExpertLocationMetadata`` for a placement.

  ``ExpertLocationMetadata(**fields)`` (``sgl_jax/srt/eplb/expert_location.py``)
  then equals what sglang-jax builds from the same ``physical_to_logical_map``
  file, except for the dispatch map when ``dispatch="sglang"``.

  Args:
    phy2log: ``[L, P]`` placement, e.g. ``eplb_jax.rebalance_experts(...)[0]``.
    num_logical_experts: ``E``.
    ep_size: EP ranks; must divide ``P``.
    ep_rank: the rank whose dispatch map to build (``"sglang"``, ``"eplb_jax"``).
    num_nodes: nodes, for SGLang's same-node preference.
    dispatch: ``"sglang"``: SGLang's per-rank choice (:func:`sglang_dispatch_map`,
      as SGLang computes it for a loaded placement); ``"first"``: sglang-jax's,
      every rank sends an expert's tokens to its lowest slot; ``"eplb_jax"``:
      :func:`eplb_jax.expert_location`'s (own GPU, then own node, then an even
      spread; deterministic, no random draws).
    ep_dispatch_algorithm: the aux field, ``"static"``, ``"dynamic"`` or ``"fake"``.
    as_jax: return ``jax.Array`` (int32, as sglang-jax's ``device_put`` of its
      int64 maps gives without x64) instead of NumPy int32.

  Returns:
    ``{"ep_dispatch_algorithm", "logical_to_rank_dispatch_physical_map" [L, E],
    "logical_to_all_physical_map" [L, E, X] (slots ascending, -1 padded, X the
    largest replica count, as sglang-jax pads; SGLang pads to P),
    "logical_to_all_physical_map_num_valid" [L, E],
    "physical_to_logical_map" [L, P], "num_physical_experts": P}``.
  """
  if dispatch not in DISPATCH_MODES:
    raise ValueError(f"dispatch must be one of {DISPATCH_MODES}, got {dispatch!r}")
  if ep_dispatch_algorithm not in ("static", "dynamic", "fake"):
    raise ValueError(
      f"ep_dispatch_algorithm must be 'static', 'dynamic' or 'fake', got {ep_dispatch_algorithm!r}"
    )
  phy2log = _check_phy2log(phy2log, "phy2log", num_logical_experts)
  _check_ep(phy2log, ep_size, num_nodes)
  _check_rank(ep_rank, ep_size)
  slots = _replica_slots(phy2log, num_logical_experts)
  count = np.array([[len(replicas) for replicas in layer] for layer in slots], np.int64)
  if np.any(count == 0):
    raise ValueError("phy2log must hold every logical expert in every layer")
  width = int(count.max())
  all_physical = np.full((*count.shape, width), -1, np.int64)
  for layer, per_expert in enumerate(slots):
    for expert, replicas in enumerate(per_expert):
      all_physical[layer, expert, : len(replicas)] = replicas
  if dispatch == "first":
    rank_dispatch = all_physical[:, :, 0]
  elif dispatch == "eplb_jax":
    # expert_location needs each expert's slots, in any order and width: all_physical.
    topology = eplb_jax.Topology(phy2log.shape[1], 1, num_nodes, ep_size)
    location = eplb_jax.expert_location(eplb_jax.Placement(phy2log, all_physical, count), topology)
    rank_dispatch = np.asarray(location.logical_to_rank_dispatch_physical_map[:, ep_rank])
  else:
    rank_dispatch = sglang_dispatch_map(
      phy2log, num_logical_experts, ep_size, ep_rank, num_nodes=num_nodes
    )
  arrays = {
    "logical_to_rank_dispatch_physical_map": rank_dispatch,
    "logical_to_all_physical_map": all_physical,
    "logical_to_all_physical_map_num_valid": count,
    "physical_to_logical_map": phy2log,
  }
  if as_jax:
    import jax.numpy as jnp

    arrays = {key: jnp.asarray(value, jnp.int32) for key, value in arrays.items()}
  else:
    arrays = {key: value.astype(np.int32) for key, value in arrays.items()}
  return {
    "ep_dispatch_algorithm": ep_dispatch_algorithm,
    **arrays,
    "num_physical_experts": phy2log.shape[1],
  }
