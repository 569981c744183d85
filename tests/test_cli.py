"""Tests of the ``eplb-jax`` command line (run in-process through ``cli.main``)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile

import chex
import hypothesis
import hypothesis.extra.numpy
import numpy as np
import pytest
from hypothesis import strategies as st

import eplb_jax
from eplb_jax import cli
from eplb_jax._src import files

# DeepSeek's README example: 2 layers x 12 experts onto 16 slots, 4 groups, 2 nodes, 8 GPUs.
WEIGHT = np.array(
  [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
  ]
)
SIZES = ["--num-replicas", "16", "--num-groups", "4", "--num-nodes", "2", "--num-gpus", "8"]
SIZE_ARGS = (16, 4, 2, 8)


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
  # One group on one node: the help's "global policy" (Topology.policy).
  assert "policy        global, mode gpu_aware" in out


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
    (["loads.npy", *SIZES[:-1], str(2**32)], "num_gpus must be at most 2**31 - 1"),
    (["loads.npy", *SIZES, "--output", "maps.csv"], "--output"),
    (["loads.npz", *SIZES, "--key", "missing"], "--key"),
    (["loads.npy", *SIZES, "--key", "weight"], "--key applies to .npz and .json"),
    (["loads.csv", *SIZES, "--key", "weight"], "--key applies to .npz and .json"),
    (["loads.npy", *SIZES, "--format", "sglang", "--output", "maps.npz"], "--format sglang"),
    (["loads.npy", *SIZES, "--format", "npz"], "--format needs --output"),
    (["loads.npy", *SIZES, "--decay", "0.5"], "--decay needs a window"),
    (["loads.npy", "--shape", "kimi-k2"], "--shape"),
    (["nan.npy", *SIZES], "weight"),
    (["absent.npy", *SIZES], "absent.npy"),
    (["loads.npy", *SIZES, "--mode", "fast"], "--mode"),
    (["loads.npy", *SIZES, "--failed-gpus", "3,x"], "--failed-gpus must be comma-separated"),
    (["loads.npy", *SIZES, "--failed-gpus", "8"], "failed_gpus must hold GPU ids in [0, 8)"),
    (["loads.npy", *SIZES, "--failed-gpus", "0,1,2"], "failed_gpus must leave at least"),
    (
      ["loads.npy", *SIZES, "--failed-gpus", "3", "--output", "maps.json", "--format", "sglang"],
      "--format sglang cannot hold the empty slots",
    ),
  ],
)
def test_plan_bad_input_exits_2_naming_the_argument(tmp_path, monkeypatch, capsys, args, named):
  monkeypatch.chdir(tmp_path)
  np.save("loads.npy", WEIGHT)
  np.savez("loads.npz", weight=WEIGHT)
  np.save("nan.npy", np.where(WEIGHT == 4, np.nan, WEIGHT))
  (tmp_path / "loads.txt").write_text("1,2\n")
  (tmp_path / "loads.csv").write_text("1,2\n")

  assert cli.main(["plan", *args]) == 2
  captured = capsys.readouterr()
  assert named in captured.err
  assert "Traceback" not in captured.err
  assert not (tmp_path / "maps.csv").exists()


def test_plan_failed_gpus(tmp_path, capsys):
  target = tmp_path / "maps.npz"
  args = ["--failed-gpus", "3", "--mode", "greedy", "--output", str(target)]
  np.save(tmp_path / "loads.npy", WEIGHT)

  assert cli.main(["plan", str(tmp_path / "loads.npy"), *SIZES, *args]) == 0

  out = capsys.readouterr().out
  assert "GPUs 8, failed 3" in out
  assert "policy        global, mode greedy" in out  # 7 GPUs: the global policy
  expected = eplb_jax.rebalance_experts(WEIGHT, *SIZE_ARGS, mode="greedy", failed_gpus=(3,))
  maps = _read_maps(target)
  chex.assert_trees_all_equal(maps, {k: np.asarray(v) for k, v in expected._asdict().items()})
  np.testing.assert_array_equal(maps["phy2log"][:, 6:8], -1)


@pytest.mark.heavy
def test_plan_keeps_compiled_programs_between_runs(tmp_path):
  # Each run is a fresh process: the default cache directory gets the
  # balancer's program, and --no-cache keeps even JAX's own cache unused.
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
  command = [sys.executable, "-m", "eplb_jax", "plan"]
  result = subprocess.run(command, capture_output=True, text=True, env=env)
  assert result.returncode == 0, result.stderr
  assert any(p.name.startswith("jit__place") for p in (tmp_path / "xdg" / "eplb_jax").iterdir())

  env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax")
  result = subprocess.run([*command, "--no-cache"], capture_output=True, text=True, env=env)
  assert result.returncode == 0, result.stderr
  assert not (tmp_path / "jax").exists() or not any((tmp_path / "jax").iterdir())


def test_plan_cache_dir_errors(tmp_path, capsys):
  blocker = tmp_path / "file"
  blocker.write_text("")
  assert cli.main(["plan", "--cache-dir", str(blocker / "cache")]) == 2
  assert f"--cache-dir {blocker / 'cache'}: cannot create it" in capsys.readouterr().err
  assert cli.main(["plan", "--cache-dir", str(tmp_path), "--no-cache"]) == 2
  assert "not allowed with argument" in capsys.readouterr().err


def test_python_m_entry_point():
  result = subprocess.run(
    [sys.executable, "-m", "eplb_jax", "plan", "--help"], capture_output=True, text=True
  )
  assert result.returncode == 0, result.stderr
  assert "--num-replicas" in result.stdout


# ------------------------------------------------------------------ robustness


def _corrupt(path):
  """Writes a corrupt or degenerate input to ``path`` (its name says which)."""
  name = path.name
  if name == "empty.npy":
    path.write_bytes(b"")
  elif name == "truncated.npz":
    np.savez(path, weight=WEIGHT)
    path.write_bytes(path.read_bytes()[:100])
  elif name == "garbage.npz":
    path.write_bytes(b"PK\x03\x04" + bytes(range(200)))
  elif name == "empty.csv":
    path.write_text("")
  elif name == "deep.json":
    path.write_text("[" * 100_000 + "]" * 100_000)
  elif name == "no-experts.npy":
    np.save(path, np.zeros((3, 0)))
  elif name == "strings.json":
    path.write_text('[["a", "b"]]')
  elif name == "pickled.npy":
    np.save(path, {"logical_count": WEIGHT, "timestamp": "x"}, allow_pickle=True)
  elif name == "garbage.pt":
    path.write_bytes(bytes(range(256)))
  elif name == "4d.npy":
    np.save(path, np.ones((1, 1, 2, 12)))


@pytest.mark.parametrize(
  ("name", "message"),
  [
    ("empty.npy", "not a NumPy .npy file"),
    ("truncated.npz", "truncated.npz"),
    ("garbage.npz", "garbage.npz"),
    ("empty.csv", "no rows"),
    ("deep.json", "nested too deeply"),
    ("no-experts.npy", "at least one expert"),
    ("strings.json", "integer or float dtype"),
    ("pickled.npy", "--allow-pickle"),
    ("garbage.pt", "garbage.pt"),
    ("4d.npy", "3-D [steps, layers, experts]"),
  ],
)
def test_plan_bad_files_exit_2_without_traceback(tmp_path, capsys, name, message):
  source = tmp_path / name
  _corrupt(source)
  assert cli.main(["plan", str(source), *SIZES]) == 2
  err = capsys.readouterr().err
  assert err.startswith("eplb-jax: error: ") and message in err, err
  assert "Traceback" not in err


def test_plan_zero_layers_writes_empty_maps(tmp_path, capsys):
  source, target = tmp_path / "loads.npy", tmp_path / "maps.npz"
  np.save(source, np.zeros((0, 12)))
  assert cli.main(["plan", str(source), *SIZES, "--output", str(target)]) == 0
  maps = _read_maps(target)
  assert {name: value.shape for name, value in maps.items()} == {
    "phy2log": (0, 16),
    "log2phy": (0, 12, 5),
    "logcnt": (0, 12),
  }
  assert "0 layers x 12 experts" in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".NPZ", ".Json"])
def test_plan_output_path_is_written_as_printed(tmp_path, capsys, suffix):
  source, target = tmp_path / "loads.npy", tmp_path / f"maps{suffix}"
  np.save(source, WEIGHT)
  assert cli.main(["plan", str(source), *SIZES, "--output", str(target)]) == 0
  assert f"wrote         {target} " in capsys.readouterr().out
  assert [path.name for path in tmp_path.iterdir() if path.name.startswith("maps")] == [target.name]
  reader = _read_maps if suffix == ".Json" else None
  maps = reader(target) if reader else dict(np.load(target))
  assert maps["phy2log"].shape == (2, 16)


@contextlib.contextmanager
def _file_size_limit(limit: int):
  """Makes writes beyond ``limit`` bytes of any file fail with EFBIG, as a full disk would.

  Process-wide: keep the block short, with stdout and stderr captured in memory
  (capsys), so that nothing but the code under test writes files inside it.
  """
  resource = pytest.importorskip("resource")
  import signal

  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize("output", ["maps.json", "maps.npz", "placement.npy"])
def test_plan_failed_write_keeps_the_previous_file(tmp_path, capsys, output):
  source, target = tmp_path / "loads.npy", tmp_path / output
  np.save(source, WEIGHT)
  target.write_bytes(b"previous")
  cli.main(["plan", str(source), *SIZES])  # compile outside the size limit
  with _file_size_limit(64):
    status = cli.main(["plan", str(source), *SIZES, "--output", str(target)])
  assert status == 2
  assert "eplb-jax: error: " in capsys.readouterr().err
  assert target.read_bytes() == b"previous"
  assert sorted(path.name for path in tmp_path.iterdir()) == ["loads.npy", output]


@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink", "hardlink"])
@pytest.mark.parametrize("read", ["input", "previous"])
def test_plan_refuses_to_write_over_what_it_reads(tmp_path, capsys, read, spelling):
  source, previous = tmp_path / "loads.json", tmp_path / "old.json"
  source.write_text(json.dumps(WEIGHT.tolist()))
  assert cli.main(["plan", str(source), *SIZES, "--output", str(previous)]) == 0
  before = {path: path.read_bytes() for path in (source, previous)}
  target = source if read == "input" else previous
  if spelling == "dotdot":
    (tmp_path / "sub").mkdir()
    target = tmp_path / "sub" / ".." / target.name
  elif spelling == "symlink":
    (tmp_path / "link.json").symlink_to(target)
    target = tmp_path / "link.json"
  elif spelling == "hardlink":
    (tmp_path / "link.json").hardlink_to(target)
    target = tmp_path / "link.json"
  args = ["plan", str(source), *SIZES, "--previous", str(previous), "--output", str(target)]
  capsys.readouterr()
  assert cli.main(args) == 2
  flag = "INPUT" if read == "input" else "--previous"
  assert f"eplb-jax: error: --output {target} is the {flag} file" in capsys.readouterr().err
  assert {path: path.read_bytes() for path in (source, previous)} == before


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o755])
def test_plan_output_keeps_the_permission_bits(tmp_path, capsys, mode):
  source, target = tmp_path / "loads.npy", tmp_path / "maps.json"
  np.save(source, WEIGHT)
  target.write_bytes(b"previous")
  target.chmod(mode)
  assert cli.main(["plan", str(source), *SIZES, "--output", str(target)]) == 0
  assert stat.S_IMODE(target.stat().st_mode) == mode
  assert _read_maps(target)["phy2log"].shape == (2, 16)


@contextlib.contextmanager
def _unprivileged(path: str):
  """Runs the block as the owner of ``path``: as user nobody when the tests run as root (who
  may write any file, with ``open`` as with ``write_atomic``)."""
  if os.geteuid() != 0:
    yield
    return
  try:
    nobody = pytest.importorskip("pwd").getpwnam("nobody").pw_uid
  except KeyError:
    pytest.skip("no user nobody to run as")
  os.chown(path, nobody, -1)
  os.seteuid(nobody)
  try:
    yield
  finally:
    os.seteuid(0)


def test_atomic_write_refuses_a_read_only_file_as_open_does():
  directory = tempfile.mkdtemp()  # under /tmp: reachable by any user
  try:
    os.chmod(directory, 0o777)  # the rename itself would be allowed
    path = os.path.join(directory, "maps.json")
    with open(path, "w") as file:
      file.write("previous")
    outcomes = []
    with _unprivileged(path):
      os.chmod(path, 0o444)
      for write in (lambda: open(path, "ab").close(), lambda: files.write_atomic(path, bytes)):
        try:
          write()
          outcomes.append("written")
        except PermissionError:
          outcomes.append("refused")
    assert outcomes == ["refused", "refused"]
    with open(path) as file:
      assert file.read() == "previous"
    assert os.listdir(directory) == ["maps.json"]
  finally:
    shutil.rmtree(directory, ignore_errors=True)


def test_plan_zero_layer_json_reads_back_as_previous(tmp_path, capsys):
  source, first, second = tmp_path / "loads.npy", tmp_path / "old.json", tmp_path / "new.npz"
  np.save(source, np.zeros((0, 12)))
  assert cli.main(["plan", str(source), *SIZES, "--output", str(first)]) == 0
  args = ["plan", str(source), *SIZES, "--previous", str(first), "--output", str(second)]
  assert cli.main(args) == 0
  assert _read_maps(second)["phy2log"].shape == (0, 16)
  # With layers, the empty placement is the wrong shape: a clear error.
  np.save(source, WEIGHT)
  assert cli.main(["plan", str(source), *SIZES, "--previous", str(first)]) == 2
  assert "previous_phy2log must have shape" in capsys.readouterr().err


def test_allow_pickle_applies_to_the_input_only(tmp_path, capsys):
  source, previous = tmp_path / "loads.npy", tmp_path / "old.npy"
  np.save(source, WEIGHT)
  phy2log = np.asarray(eplb_jax.rebalance_experts(WEIGHT, *SIZE_ARGS).phy2log)
  np.save(previous, {"physical_to_logical_map": phy2log}, allow_pickle=True)
  args = ["plan", str(source), *SIZES, "--allow-pickle", "--previous", str(previous)]
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert err.startswith("eplb-jax: error: cannot read --previous ") and "never unpickles" in err
  np.save(previous, phy2log)  # the bare array plan --output writes: read
  np.testing.assert_array_equal(cli.load_previous(previous, 16), phy2log)


# ------------------------------------------------------------------ engine files


def test_plan_reads_engine_files_and_writes_engine_placements(tmp_path, capsys):
  window = np.stack([WEIGHT, WEIGHT[::-1], 2 * WEIGHT])  # [N, L, E]
  summed = eplb_jax.rebalance_experts(window.sum(0), 16, 4, 2, 8)
  # SGLang's --init-expert-location JSON with a logical_count window.
  source = tmp_path / "init.json"
  source.write_text(json.dumps({"logical_count": window.tolist()}))
  target = tmp_path / "placement.json"
  args = ["plan", str(source), *SIZES, "--format", "sglang", "--output", str(target)]
  assert cli.main(args) == 0
  assert json.loads(target.read_text()) == {"physical_to_logical_map": summed.phy2log.tolist()}
  assert "window of 3 steps, summed" in capsys.readouterr().out
  # sglang-jax's pickled dump, with --allow-pickle; the placement as a bare .npy.
  dump = tmp_path / "dump.npy"
  np.save(dump, {"logical_count": WEIGHT, "timestamp": "x"}, allow_pickle=True)
  placement = tmp_path / "placement.npy"
  args = ["plan", str(dump), *SIZES, "--allow-pickle", "--output", str(placement)]
  assert cli.main(args) == 0
  np.testing.assert_array_equal(
    np.load(placement), eplb_jax.rebalance_experts(WEIGHT, *SIZE_ARGS)[0]
  )
  assert "(sglang-jax)" in capsys.readouterr().out


def test_plan_decay_weights_recent_steps(tmp_path):
  window = np.stack([WEIGHT[::-1], WEIGHT])  # oldest first
  source, target = tmp_path / "window.npy", tmp_path / "maps.npz"
  np.save(source, window)
  assert cli.main(["plan", str(source), *SIZES, "--decay", "0.5", "--output", str(target)]) == 0
  expected = eplb_jax.rebalance_experts(0.5 * window[0] + window[1], *SIZE_ARGS)
  np.testing.assert_array_equal(_read_maps(target)["phy2log"], expected.phy2log)


def _summary_lines(out):
  return [
    line for line in out.splitlines() if line.startswith(("  balancedness", "  worst", "  max"))
  ]


@pytest.mark.parametrize("scale", [2.0**990, 2.0**120], ids=["float64", "float32"])
def test_plan_summary_of_huge_finite_loads(tmp_path, capsys, scale):
  # Loads scaled by a power of two: the same placement and the same figures, finite.
  dtype = np.float64 if scale > 2.0**127 else np.float32
  source = tmp_path / "loads.npy"
  np.save(source, WEIGHT.astype(np.float64))
  assert cli.main(["plan", str(source), *SIZES]) == 0
  expected = _summary_lines(capsys.readouterr().out)
  np.save(source, (WEIGHT * scale).astype(dtype))
  assert cli.main(["plan", str(source), *SIZES]) == 0
  assert _summary_lines(capsys.readouterr().out) == expected
  assert len(expected) == 3 and not re.search("inf|nan", " ".join(expected))


@pytest.mark.parametrize("decay", [None, 0.9])
def test_plan_window_of_huge_finite_loads(tmp_path, capsys, decay):
  # A window is summed as the API sums it, each layer's steps scaled together: a window of
  # finite loads near float64's limit (float32 sums of its steps would overflow) is balanced as
  # the same window at a normal scale (an exact power of two apart), and as the API balances it.
  window = np.stack([WEIGHT, WEIGHT[::-1]] * 4).astype(np.float64)
  maps = []
  for scale in (1.0, 2.0**1000):
    source, target = tmp_path / "window.npy", tmp_path / f"maps-{len(maps)}.npz"
    np.save(source, window * scale)
    args = ["plan", str(source), *SIZES, "--output", str(target)]
    assert cli.main(args + ([] if decay is None else ["--decay", str(decay)])) == 0
    assert len(_summary_lines(capsys.readouterr().out)) == 3
    maps.append(_read_maps(target))
  chex.assert_trees_all_equal(*maps)
  if decay is None:
    expected = eplb_jax.rebalance_experts(window * 2.0**1000, *SIZE_ARGS)
    np.testing.assert_array_equal(maps[1]["phy2log"], expected.phy2log)


def test_plan_sums_a_window_as_the_api_does(tmp_path):
  window = np.random.default_rng(0).uniform(size=(5, 2, 12)) * 1e3
  source, target = tmp_path / "window.npy", tmp_path / "maps.npz"
  np.save(source, window)
  assert cli.main(["plan", str(source), *SIZES, "--output", str(target)]) == 0
  expected = eplb_jax.rebalance_experts(window, *SIZE_ARGS)
  chex.assert_trees_all_equal(
    _read_maps(target), {k: np.asarray(v) for k, v in expected._asdict().items()}
  )


def test_plan_previous_is_migration_aware(tmp_path, capsys):
  source, first, second = tmp_path / "loads.npy", tmp_path / "old.npz", tmp_path / "new.json"
  np.save(source, WEIGHT)
  assert cli.main(["plan", str(source), *SIZES, "--output", str(first)]) == 0
  drifted = tmp_path / "drifted.npy"
  np.save(drifted, WEIGHT + np.arange(12))
  args = ["plan", str(drifted), *SIZES, "--previous", str(first), "--output", str(second)]
  assert cli.main(args) == 0
  previous = _read_maps(first)["phy2log"]
  expected = eplb_jax.rebalance_experts(
    WEIGHT + np.arange(12), *SIZE_ARGS, previous_phy2log=previous
  )
  np.testing.assert_array_equal(_read_maps(second)["phy2log"], expected.phy2log)
  moved, _ = eplb_jax.migration_cost(previous, expected.phy2log, 8)
  assert f"migration     {int(np.sum(moved))} replicas moved" in capsys.readouterr().out


# ------------------------------------------------------------------ loaders, property-based

SUFFIXES = [".npy", ".npz", ".json", ".csv", ".pt"]
# Each example overwrites the same file, so one tmp_path serves them all.
REUSED_TMP_PATH = [hypothesis.HealthCheck.function_scoped_fixture]


@hypothesis.settings(max_examples=60, deadline=None, suppress_health_check=REUSED_TMP_PATH)
@hypothesis.given(suffix=st.sampled_from(SUFFIXES), content=st.binary(max_size=300))
def test_load_weight_on_any_bytes_returns_an_array_or_a_clear_error(tmp_path, suffix, content):
  path = tmp_path / f"input{suffix}"
  path.write_bytes(content)
  try:
    weight = cli.load_weight(path)
  except ValueError as error:
    assert str(error)
  else:
    assert isinstance(weight, np.ndarray)


@hypothesis.settings(max_examples=40, deadline=None, suppress_health_check=REUSED_TMP_PATH)
@hypothesis.given(
  suffix=st.sampled_from([".npy", ".npz", ".json", ".csv"]),
  weight=hypothesis.extra.numpy.arrays(
    st.sampled_from([np.int32, np.int64, np.float32, np.float64]),
    st.tuples(st.integers(1, 4), st.integers(1, 6)),
    elements=st.integers(0, 10**6),
  ),
)
def test_load_weight_round_trips_every_format(tmp_path, suffix, weight):
  path = tmp_path / f"input{suffix}"
  if suffix == ".npy":
    np.save(path, weight)
  elif suffix == ".npz":
    np.savez(path, weight=weight)
  elif suffix == ".json":
    path.write_text(json.dumps(weight.tolist()))
  else:
    np.savetxt(path, weight, delimiter=",")
  np.testing.assert_array_equal(cli.load_weight(path), weight)


@hypothesis.settings(max_examples=30, deadline=None, suppress_health_check=REUSED_TMP_PATH)
@hypothesis.given(
  weight=hypothesis.extra.numpy.arrays(
    np.float64,
    st.sampled_from([(0, 12), (2, 12), (2, 0), (1, 2, 12), (12,)]),
    elements=st.sampled_from([0.0, 1.0, 7.5, -1.0, np.nan, np.inf, 1e300]),
  ),
)
def test_plan_on_any_loads_exits_0_or_2(tmp_path, weight):
  source = tmp_path / "loads.npy"
  np.save(source, weight)
  with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
    status = cli.main(["plan", str(source), *SIZES])
  assert status in (0, 2)
  assert ("eplb-jax: error: " in err.getvalue()) == (status == 2)
