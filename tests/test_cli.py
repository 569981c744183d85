"""Tests of the ``eplb-jax`` command line (run in-process through ``cli.main``)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import chex
import numpy as np
import pytest

import eplb_jax
from eplb_jax import cli

# DeepSeek's README example: 2 layers x 12 experts onto 16 slots, 4 groups, 2 nodes, 8 GPUs.
WEIGHT = np.array(
  [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
  ]
)
SIZES = ["--num-replicas", "16", "--num-groups", "4", "--num-nodes", "2", "--num-gpus", "8"]


def _write(path, fmt):
  """Writes ``WEIGHT`` to ``path`` in the given input format; returns extra CLI args."""
  if fmt == "npy":
    np.save(path, WEIGHT)
  elif fmt == "npz":
    np.savez(path, weight=WEIGHT)
  elif fmt == "npz-key":
    np.savez(path, other=np.zeros(3), loads=WEIGHT)
    return ["--key", "loads"]
  elif fmt == "json":
    path.write_text(json.dumps(WEIGHT.tolist()))
  elif fmt == "json-object":
    path.write_text(json.dumps({"weight": WEIGHT.tolist(), "note": "x"}))
  elif fmt == "csv":
    path.write_text("\n".join(",".join(str(v) for v in row) for row in WEIGHT) + "\n")
  return []


def _read_maps(path):
  if path.suffix == ".npz":
    with np.load(path) as maps:
      return {name: maps[name] for name in maps.files}
  return {name: np.array(value) for name, value in json.loads(path.read_text()).items()}


@pytest.mark.parametrize(
  ("fmt", "output"),
  [
    ("npy", "npz"),
    ("npz", "json"),
    ("npz-key", "npz"),
    ("json", "json"),
    ("json-object", "npz"),
    ("csv", "json"),
  ],
)
@pytest.mark.parametrize("mode", ["greedy", "refined"])
def test_plan_writes_the_maps_of_rebalance_experts(tmp_path, capsys, fmt, output, mode):
  source = tmp_path / f"loads.{fmt.split('-')[0]}"
  extra = _write(source, fmt)
  target = tmp_path / f"maps.{output}"

  status = cli.main(["plan", str(source), *SIZES, "--mode", mode, "--output", str(target), *extra])

  assert status == 0
  phy2log, log2phy, logcnt = eplb_jax.rebalance_experts(WEIGHT, 16, 4, 2, 8, mode=mode)
  expected = {"phy2log": phy2log, "log2phy": log2phy, "logcnt": logcnt}
  chex.assert_trees_all_equal(_read_maps(target), {k: np.asarray(v) for k, v in expected.items()})
  out = capsys.readouterr().out
  assert f"policy        hierarchical, mode {mode}" in out
  assert f"wrote         {target}" in out


def test_plan_summary_reports_the_worst_layer(tmp_path, capsys):
  source = tmp_path / "loads.npy"
  np.save(source, WEIGHT)
  assert cli.main(["plan", str(source), *SIZES]) == 0
  maps = eplb_jax.rebalance_experts(WEIGHT, 16, 4, 2, 8)
  per_layer = eplb_jax.metrics.layer_balancedness(
    eplb_jax.metrics.gpu_loads(WEIGHT, maps[0], maps[2], 8)
  )
  worst = int(np.argmin(per_layer))
  out = capsys.readouterr().out
  assert f"worst layer   {worst}: balancedness {float(per_layer[worst]):.4f}" in out


def test_plan_global_policy_defaults_to_one_group_and_node(tmp_path, capsys):
  source = tmp_path / "loads.npy"
  np.save(source, WEIGHT)
  assert cli.main(["plan", str(source), "--num-replicas", "16", "--num-gpus", "4"]) == 0
  out = capsys.readouterr().out
  assert "groups 1, nodes 1, GPUs 4" in out


def test_plan_builtin_example(capsys):
  assert cli.main(["plan"]) == 0
  out = capsys.readouterr().out
  assert f"eplb-jax plan: {cli.DEFAULT_SHAPE}" in out
  assert "policy        hierarchical, mode gpu_aware" in out
  before, after = map(
    float, re.search(r"balancedness  (\S+) before .* -> (\S+) after", out).groups()
  )
  assert 0 < before < after <= 1


def test_contiguous_loads():
  weight = np.array([[1.0, 2.0, 3.0, 4.0, 5.0]])
  # Experts e -> GPU e * 2 // 5: [0, 0, 0, 1, 1].
  np.testing.assert_array_equal(cli.contiguous_loads(weight, 2), [[6.0, 9.0]])


@pytest.mark.parametrize(
  ("args", "named"),
  [
    (["loads.txt", *SIZES], "INPUT"),
    (["loads.npy", "--num-replicas", "8", "--num-gpus", "8"], "num_replicas"),
    (["loads.npy", "--num-replicas", "16"], "--num-gpus"),
    (["loads.npy", *SIZES, "--output", "maps.csv"], "--output"),
    (["loads.npz", *SIZES, "--key", "missing"], "--key"),
    (["loads.npy", "--shape", "kimi-k2"], "--shape"),
    (["nan.npy", *SIZES], "weight"),
    (["absent.npy", *SIZES], "absent.npy"),
    (["loads.npy", *SIZES, "--mode", "fast"], "--mode"),
  ],
)
def test_plan_bad_input_exits_2_naming_the_argument(tmp_path, monkeypatch, capsys, args, named):
  monkeypatch.chdir(tmp_path)
  np.save("loads.npy", WEIGHT)
  np.savez("loads.npz", weight=WEIGHT)
  np.save("nan.npy", np.where(WEIGHT == 4, np.nan, WEIGHT))
  (tmp_path / "loads.txt").write_text("1,2\n")

  assert cli.main(["plan", *args]) == 2
  captured = capsys.readouterr()
  assert named in captured.err
  assert "Traceback" not in captured.err
  assert not (tmp_path / "maps.csv").exists()


def test_python_m_entry_point():
  result = subprocess.run(
    [sys.executable, "-m", "eplb_jax", "plan", "--help"], capture_output=True, text=True
  )
  assert result.returncode == 0, result.stderr
  assert "--num-replicas" in result.stdout
