"""SGLang and sglang-jax files: written as an engine writes them, read, planned, read back.

The engine-side writes and reads restate what the engines' code does
(SGLang 0.5.23 ``sglang/srt/eplb/expert_distribution.py`` and
``expert_location.py``; sglang-jax ``sgl_jax/srt/layers/routed_experts_capturer.py``
and ``sgl_jax/srt/eplb/expert_location.py``); neither engine is imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import chex
import numpy as np
import pytest

import eplb_jax
from eplb_jax.contrib import sglang

# (layers, experts, num_replicas, num_groups, num_nodes, num_gpus)
L, E, P, GROUPS, NODES, GPUS = 3, 8, 12, 4, 2, 4
SIZES = (P, GROUPS, NODES, GPUS)


def _counts(steps: int, seed: int = 0) -> np.ndarray:
  """Per-pass token counts [N, L, E], int32 as SGLang's recorder buffers them."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, 500, (steps, L, E)).astype(np.int32)


def _plan(loads: np.ndarray) -> np.ndarray:
  phy2log, _, _ = eplb_jax.rebalance_experts(loads, *SIZES)
  return np.asarray(phy2log)


# ----- what the engines do with a placement file (restated, not imported)


def _sglang_init_by_mapping(model_config, physical_to_logical_map, moe_ep_rank=None):
  """SGLang's ``ExpertLocationMetadata.init_by_mapping``: it takes the file's keys as kwargs."""
  del model_config, moe_ep_rank
  return physical_to_logical_map


def _sglang_reads_placement(path: str) -> np.ndarray:
  """SGLang's ``compute_initial_expert_location_metadata`` for a mapping file."""
  torch = pytest.importorskip("torch")
  if path.endswith(".pt"):
    data = torch.load(path, weights_only=True, map_location="cpu")
  elif path.endswith(".json"):
    data = json.loads(Path(path).read_text())
  else:
    data = json.loads(path)
  assert "physical_to_logical_map" in data
  mapping = _sglang_init_by_mapping(None, **data, moe_ep_rank=0)
  if not isinstance(mapping, torch.Tensor):
    mapping = torch.tensor(mapping)
  assert mapping.dtype == torch.int64
  return mapping.numpy()


def _sglang_jax_reads_placement(path: str) -> np.ndarray:
  """sglang-jax's ``compute_initial_expert_location_metadata`` for a mapping file."""
  if path.endswith(".npy"):
    loaded = np.load(path, allow_pickle=True)
    data = (
      loaded.item()
      if loaded.dtype == object and loaded.ndim == 0
      else {"physical_to_logical_map": loaded}
    )
  elif path.endswith(".json"):
    data = json.loads(Path(path).read_text())
  else:
    data = json.loads(path)
  return np.array(data["physical_to_logical_map"])


def _check_placement(phy2log: np.ndarray, expected: np.ndarray) -> None:
  chex.assert_trees_all_equal(np.asarray(phy2log, np.int64), np.asarray(expected, np.int64))


# ----- round trips


def test_sglang_recorder_dump_round_trip(tmp_path):
  torch = pytest.importorskip("torch")
  counts = _counts(5)
  dump = tmp_path / "expert_distribution_recorder_1700000000.0.pt"
  # _StatAccumulator.dump: rank 0 writes the all-reduced [N, L, E] int32 counts.
  torch.save(
    dict(
      rank=0,
      logical_count=torch.from_numpy(counts),
      average_utilization_rate_over_window=None,
    ),
    dump,
  )
  loads = sglang.read_recorder_dump(dump, num_logical_experts=E)
  assert loads.dtype == np.int64
  _check_placement(loads, counts)
  chex.assert_trees_all_equal(sglang.read_loads(dump), loads)

  phy2log = _plan(loads)
  out = sglang.write_physical_to_logical_map(tmp_path / "placement.pt", phy2log)
  _check_placement(_sglang_reads_placement(str(out)), phy2log)
  assert set(torch.load(out, weights_only=True)) == {"physical_to_logical_map"}
  _check_placement(sglang.read_physical_to_logical_map(out), phy2log)


def test_recorder_dump_with_utilization_rate(tmp_path):
  torch = pytest.importorskip("torch")
  counts = _counts(2, seed=1)
  dump = tmp_path / "dump.pt"
  torch.save(
    dict(rank=0, logical_count=torch.from_numpy(counts), average_utilization_rate_over_window=0.7),
    dump,
  )
  _check_placement(sglang.read_recorder_dump(dump), counts)


@pytest.mark.parametrize("steps", [None, 4], ids=["2d", "3d"])
def test_sglang_init_expert_location_json_round_trip(tmp_path, steps):
  counts = _counts(steps or 1, seed=2)
  logical_count = counts[0] if steps is None else counts
  source = tmp_path / "init.json"
  source.write_text(json.dumps({"logical_count": logical_count.tolist()}))
  loads = sglang.read_logical_count_json(source, num_logical_experts=E)
  _check_placement(loads, logical_count)
  # The same text inline, as --init-expert-location '<json>'.
  chex.assert_trees_all_equal(sglang.read_loads(source.read_text()), loads)

  phy2log = _plan(loads)
  out = sglang.write_physical_to_logical_map(tmp_path / "placement.json", phy2log)
  _check_placement(_sglang_reads_placement(str(out)), phy2log)
  _check_placement(_sglang_jax_reads_placement(str(out)), phy2log)
  inline = sglang.physical_to_logical_map_json(phy2log)
  _check_placement(_sglang_reads_placement(inline), phy2log)
  _check_placement(sglang.read_physical_to_logical_map(inline), phy2log)


def test_float_logical_count_stays_float(tmp_path):
  source = json.dumps({"logical_count": [[0.5] * E] * L})
  loads = sglang.read_logical_count_json(source)
  assert loads.dtype == np.float64 and loads.shape == (L, E)


def test_sglang_jax_dump_round_trip(tmp_path):
  counts = _counts(1, seed=3)[0].astype(np.int64)
  # _ExpertDistributionRecorder.dump: np.save of a dict, "<output_file>_<timestamp>.npy".
  dump = tmp_path / "expert_dist_20260101_1200.npy"
  np.save(dump, {"logical_count": counts, "timestamp": "20260101_1200"})
  with pytest.raises(ValueError, match="allow_pickle=True"):
    sglang.read_sglang_jax_dump(dump)
  loads = sglang.read_sglang_jax_dump(dump, allow_pickle=True, num_logical_experts=E)
  _check_placement(loads, counts)
  chex.assert_trees_all_equal(sglang.read_loads(dump, allow_pickle=True), loads)

  phy2log = _plan(loads)
  out = sglang.write_physical_to_logical_map(tmp_path / "placement.npy", phy2log)
  _check_placement(_sglang_jax_reads_placement(str(out)), phy2log)
  # A bare array: no pickle needed to read it back.
  _check_placement(sglang.read_physical_to_logical_map(out), phy2log)


def test_sglang_jax_dump_of_physical_counts(tmp_path):
  # Without expert-location metadata sglang-jax dumps counts per physical slot [L, P].
  dump = tmp_path / "physical.npy"
  np.save(dump, {"logical_count": np.ones((L, P), np.int64), "timestamp": "x"})
  with pytest.raises(ValueError, match=f"expected {E} logical experts, got {P}"):
    sglang.read_sglang_jax_dump(dump, allow_pickle=True, num_logical_experts=E)


def test_pickled_placement_needs_the_flag(tmp_path):
  path = tmp_path / "placement.npy"
  np.save(path, {"physical_to_logical_map": np.zeros((L, P), np.int64)})
  with pytest.raises(ValueError, match="allow_pickle=True"):
    sglang.read_physical_to_logical_map(path)
  assert sglang.read_physical_to_logical_map(path, allow_pickle=True).shape == (L, P)


# ----- refusals, each naming the file and the rule


def _assert_converted(excinfo) -> None:
  """The error is ours, with the library's traceback dropped."""
  assert excinfo.value.__cause__ is None
  assert excinfo.value.__suppress_context__ or excinfo.value.__context__ is None


def test_corrupt_pt(tmp_path):
  pytest.importorskip("torch")
  path = tmp_path / "corrupt.pt"
  path.write_bytes(b"PK\x03\x04 this is not a zip archive")
  with pytest.raises(ValueError, match=r"corrupt\.pt: not a torch\.save file") as excinfo:
    sglang.read_recorder_dump(path)
  _assert_converted(excinfo)


def test_pt_with_arbitrary_objects_is_refused(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "objects.pt"
  torch.save({"logical_count": torch.zeros(L, E), "extra": Path("x")}, path)
  with pytest.raises(ValueError, match="weights_only=True"):
    sglang.read_recorder_dump(path)


def test_per_pass_dump_is_refused(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "per_pass.pt"
  torch.save({"records": [], "last_physical_to_logical_map": torch.zeros(L, P)}, path)
  with pytest.raises(ValueError, match="stat"):
    sglang.read_recorder_dump(path)


def test_pt_without_logical_count(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "other.pt"
  torch.save({"weights": torch.zeros(2)}, path)
  with pytest.raises(ValueError, match="other.pt: no 'logical_count'"):
    sglang.read_recorder_dump(path)
  torch.save(torch.zeros(2), path)
  with pytest.raises(ValueError, match="expected a dict"):
    sglang.read_recorder_dump(path)


def test_missing_files(tmp_path):
  for reader in (sglang.read_recorder_dump, sglang.read_logical_count_json):
    suffix = ".pt" if reader is sglang.read_recorder_dump else ".json"
    with pytest.raises(ValueError, match="no such file"):
      reader(tmp_path / f"absent{suffix}")
  with pytest.raises(ValueError, match="no such file"):
    sglang.read_sglang_jax_dump(tmp_path / "absent.npy", allow_pickle=True)


@pytest.mark.parametrize(
  "text, message",
  [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"weights": [[1]]}', "no 'logical_count'"),
    ('{"physical_to_logical_map": [[0, 1]]}', "read_physical_to_logical_map"),
    ('{"logical_count": [[1, 2], [3]]}', "rectangular"),
    ('{"logical_count": [["a", "b"]]}', "array of numbers"),
    ('{"logical_count": [1, 2, 3]}', "2-D .* or 3-D"),
    ('{"logical_count": [[1, -2]]}', "non-negative"),
    ('{"logical_count": [[1, NaN]]}', "finite"),
    ('{"logical_count": [[true, false]]}', "array of numbers"),
    ('{"logical_count": [[]]}', "at least one"),
  ],
)
def test_bad_json(tmp_path, text, message):
  path = tmp_path / "bad.json"
  path.write_text(text)
  with pytest.raises(ValueError, match=rf"bad\.json: .*{message}") as excinfo:
    sglang.read_logical_count_json(path)
  _assert_converted(excinfo)
  with pytest.raises(ValueError, match=message):
    sglang.read_loads(text)


def test_undecodable_json(tmp_path):
  path = tmp_path / "binary.json"
  path.write_bytes(b"\xff\xfe\x00")
  with pytest.raises(ValueError, match="binary.json"):
    sglang.read_logical_count_json(path)


def test_corrupt_npy(tmp_path):
  path = tmp_path / "corrupt.npy"
  path.write_bytes(b"\x93NUMPY garbage")
  with pytest.raises(ValueError, match=r"corrupt\.npy: not a NumPy \.npy file") as excinfo:
    sglang.read_sglang_jax_dump(path, allow_pickle=True)
  _assert_converted(excinfo)
  empty = tmp_path / "empty.npy"
  empty.write_bytes(b"")
  with pytest.raises(ValueError, match=r"empty\.npy: not a NumPy \.npy file"):
    sglang.read_physical_to_logical_map(empty)
  # A valid header followed by too little data.
  good = tmp_path / "good.npy"
  np.save(good, np.zeros((L, P), np.int64))
  truncated = tmp_path / "truncated.npy"
  truncated.write_bytes(good.read_bytes()[:-10])
  with pytest.raises(ValueError, match="truncated.npy: cannot load") as excinfo:
    sglang.read_physical_to_logical_map(truncated)
  _assert_converted(excinfo)


def test_bare_npy_is_not_loads(tmp_path):
  path = tmp_path / "bare.npy"
  np.save(path, np.ones((L, E), np.int64))
  with pytest.raises(ValueError, match="physical_to_logical_map"):
    sglang.read_sglang_jax_dump(path)


def test_unknown_suffix(tmp_path):
  with pytest.raises(ValueError, match="unknown load file type '.csv'"):
    sglang.read_loads(tmp_path / "loads.csv")
  with pytest.raises(ValueError, match="unknown placement file type '.txt'"):
    sglang.write_physical_to_logical_map(tmp_path / "p.txt", np.zeros((L, P), np.int64))


@pytest.mark.parametrize(
  "phy2log, message",
  [
    (np.zeros(P, np.int64), "2-D"),
    (np.full((L, P), -1), ">= 0"),
    (np.full((L, P), 0.5), "integer expert ids"),
  ],
  ids=["1d", "empty-slot", "fractional"],
)
def test_bad_placement_is_not_written(tmp_path, phy2log, message):
  with pytest.raises(ValueError, match=message):
    sglang.write_physical_to_logical_map(tmp_path / "p.json", phy2log)
  assert not (tmp_path / "p.json").exists()


def test_placement_ids_checked_against_experts(tmp_path):
  path = sglang.write_physical_to_logical_map(tmp_path / "p.json", np.full((L, P), E))
  with pytest.raises(ValueError, match=f"below {E}"):
    sglang.read_physical_to_logical_map(path, num_logical_experts=E)


def test_no_torch_needed_for_json_and_npy(tmp_path, monkeypatch):
  # torch blocked: the JSON/.npy paths work; .pt says what is missing.
  monkeypatch.setitem(sys.modules, "torch", None)
  source = tmp_path / "init.json"
  source.write_text(json.dumps({"logical_count": np.ones((L, E), int).tolist()}))
  phy2log = _plan(sglang.read_logical_count_json(source))
  out = sglang.write_physical_to_logical_map(tmp_path / "p.npy", phy2log)
  _check_placement(sglang.read_physical_to_logical_map(out), phy2log)
  dump = tmp_path / "x.pt"
  dump.write_bytes(b"\x80\x02}q\x00.")
  with pytest.raises(ImportError, match="needs torch"):
    sglang.read_recorder_dump(dump)


def test_importing_never_imports_torch():
  script = """
import sys
import eplb_jax, eplb_jax.cli
from eplb_jax.contrib import sglang, vllm
assert "torch" not in sys.modules and "vllm" not in sys.modules, sorted(sys.modules)
"""
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
