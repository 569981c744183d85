"""Shared test helpers: random configurations and the validity check every placement must pass.

Test modules import the plain functions (``from conftest import ...``; pytest
puts this directory on ``sys.path``), or use the ``assert_valid_placement`` fixture.
Every test process sees 8 CPU devices, so the multi-device tests (in the heavy tier)
are ordinary tests; computations without a mesh run on the first device alone.
"""

from __future__ import annotations

import os

# The suite compiles many small programs and runs each briefly: skip LLVM's
# optimisation passes (XLA keeps IEEE semantics at every level, so results
# are the same bits). Set before any test touches a backend; subprocesses
# inherit it.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()

import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# The test files run in separate worker processes (pytest-xdist) that compile
# many of the same programs: share them through JAX's persistent compilation
# cache, one directory per test run (keyed by the program and the flags).
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))
_CACHE = os.path.join(tempfile.gettempdir(), f"eplb-jax-tests-{_RUN}")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# Before any backend starts: the CPU backend then has NUM_DEVICES devices.
NUM_DEVICES = 8
jax.config.update("jax_num_cpu_devices", NUM_DEVICES)

from eplb_jax import workloads  # noqa: E402


def pytest_sessionfinish(session):
  if "PYTEST_XDIST_WORKER" not in os.environ:  # the main process, after every worker
    shutil.rmtree(_CACHE, ignore_errors=True)


def check_placement(
  phy2log, log2phy, logcnt, num_experts: int, num_replicas: int, num_layers: int
) -> None:
  """Asserts that ``(phy2log, log2phy, logcnt)`` is a valid placement.

  Checks dtypes (int32) and shapes, that ``phy2log [L, P]`` names experts in
  ``[0, E)`` and holds each expert ``logcnt [L, E]`` times (``logcnt >= 1``,
  summing to ``P``), and that ``log2phy [L, E, P - E + 1]`` lists, for each
  expert, exactly its slots in ranks ``0 .. logcnt - 1`` and -1 beyond.
  """
  max_count = num_replicas - num_experts + 1
  for array, shape in (
    (phy2log, (num_layers, num_replicas)),
    (log2phy, (num_layers, num_experts, max_count)),
    (logcnt, (num_layers, num_experts)),
  ):
    assert array.dtype == np.int32, array.dtype
    assert array.shape == shape, (array.shape, shape)
  phy2log, log2phy, logcnt = (np.asarray(a) for a in (phy2log, log2phy, logcnt))
  assert np.all((phy2log >= 0) & (phy2log < num_experts))
  assert np.all(logcnt >= 1)
  np.testing.assert_array_equal(logcnt.sum(-1), num_replicas)
  for layer in range(num_layers):
    np.testing.assert_array_equal(np.bincount(phy2log[layer], minlength=num_experts), logcnt[layer])
    ranks = np.arange(max_count)
    used = ranks[None, :] < logcnt[layer][:, None]
    # Ranks below logcnt hold slots of that expert, ranks beyond are -1.
    np.testing.assert_array_equal(log2phy[layer][~used], -1)
    slots = log2phy[layer][used]
    experts = np.repeat(np.arange(num_experts), logcnt[layer])
    np.testing.assert_array_equal(phy2log[layer][slots], experts)
    # Every slot appears exactly once.
    np.testing.assert_array_equal(np.sort(slots), np.arange(num_replicas))


def check_hierarchy(phy2log, num_experts, num_replicas, num_groups, num_nodes) -> None:
  """Each group's experts, and all their replicas, live on one node; nodes get equal groups."""
  phy2log = np.asarray(phy2log)
  num_layers, _ = phy2log.shape
  node_of_slot = np.arange(num_replicas) // (num_replicas // num_nodes)
  for layer in range(num_layers):
    experts = phy2log[layer]
    node_of_expert = np.full(num_experts, -1)
    node_of_expert[experts] = node_of_slot
    # All replicas of an expert sit on the node that the scatter kept.
    np.testing.assert_array_equal(node_of_expert[experts], node_of_slot)
    by_group = node_of_expert.reshape(num_groups, -1)
    assert np.all(by_group == by_group[:, :1]), f"layer {layer}: groups split over nodes"
    np.testing.assert_array_equal(
      np.bincount(by_group[:, 0], minlength=num_nodes), num_groups // num_nodes
    )


def random_configs(count: int, seed: int) -> list[tuple[int, ...]]:
  """``count`` valid ``(layers, experts, num_replicas, num_groups, num_nodes, num_gpus)``.

  About two thirds take the hierarchical policy (``num_groups % num_nodes == 0``).
  """
  rng = np.random.default_rng(seed)
  configs = []
  for _ in range(count):
    if rng.random() < 2 / 3:
      num_nodes = int(rng.choice([1, 2, 4]))
      num_groups = num_nodes * int(rng.integers(1, 4))
      num_experts = num_groups * int(rng.integers(1, 5))
    else:
      # Global policy: the groups do not split evenly over the nodes, and
      # need not divide the experts.
      num_nodes = int(rng.choice([2, 4]))
      num_groups = num_nodes * int(rng.integers(0, 3)) + int(rng.integers(1, num_nodes))
      num_experts = int(rng.integers(2, 25))
    num_gpus = num_nodes * int(rng.integers(1, 4))
    min_replicas = -(-num_experts // num_gpus) * num_gpus
    num_replicas = min_replicas + num_gpus * int(rng.integers(0, 3))
    num_layers = int(rng.integers(1, 6))
    configs.append((num_layers, num_experts, num_replicas, num_groups, num_nodes, num_gpus))
  return configs


def config_id(config: tuple[int, ...]) -> str:
  """Test id of a ``(layers, experts, num_replicas, num_groups, num_nodes, num_gpus)`` config."""
  return "L{}-E{}-P{}-g{}-n{}-G{}".format(*config)


# The configurations the placement tests share, ``(layers, experts, num_replicas,
# num_groups, num_nodes, num_gpus)``. Every test uses a configuration with its
# number of layers, so each (configuration, mode) compiles once per session.
CONFIGS = {
  "readme": (2, 12, 16, 4, 2, 8),
  "no-redundancy": (2, 8, 8, 4, 2, 4),
  "one-slot-per-gpu": (1, 8, 12, 4, 2, 12),
  "one-group-per-node": (4, 8, 12, 2, 2, 4),
  "one-node": (3, 16, 20, 4, 1, 4),
  "one-gpu-per-node": (2, 16, 24, 4, 4, 4),
  "one-expert-per-group": (2, 6, 10, 6, 2, 2),
  "deepseek-like": (2, 32, 40, 8, 4, 8),
  "hierarchical": (3, 32, 40, 4, 2, 8),
  "one-gpu": (3, 7, 9, 1, 1, 1),
  "global": (2, 12, 16, 3, 2, 4),
  "global-one-group": (3, 24, 32, 1, 2, 8),
  "global-groups-not-dividing": (2, 10, 12, 3, 2, 4),
  "global-many-replicas": (4, 5, 20, 1, 2, 4),
  **{f"random-{config_id(c)}": c for c in random_configs(4, seed=7)},
}


def loads(kind: str, shape: tuple[int, int], seed: int) -> np.ndarray:
  """Loads ``[layers, experts]`` of one kind.

  ``float``: tie-free float32; ``tied``: small integers full of ties;
  ``skewed``: log-normal with hot experts; ``one-hot``: one loaded expert per
  layer; ``zero``: all zero.
  """
  rng = np.random.default_rng(seed)
  if kind == "float":
    return (rng.uniform(size=shape) * 1000 + rng.uniform(size=shape) * 1e-3).astype(np.float32)
  if kind == "tied":
    return rng.integers(0, 6, size=shape).astype(np.int32)
  if kind == "skewed":
    return workloads.skewed_loads(*shape, seed=seed, sigma=1.5)
  if kind == "one-hot":
    return np.eye(*shape, dtype=np.float32) * 100.0
  if kind == "zero":
    return np.zeros(shape, np.float32)
  raise ValueError(kind)


@pytest.fixture
def assert_valid_placement():
  """The :func:`check_placement` helper, as a fixture."""
  return check_placement


# The collective operations a compiled program's text may name.
COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")


def collectives(compiled) -> list[str]:
  """The collective operations that the compiled program ``compiled`` runs."""
  text = compiled.as_text()
  return [name for name in COLLECTIVES if name in text]


def auto_mesh(shape: tuple[int, ...], names: tuple[str, ...]) -> jax.sharding.Mesh:
  """A mesh over the first ``prod(shape)`` devices, its axes of type Auto."""
  return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def explicit_mesh(shape: tuple[int, ...], names: tuple[str, ...]) -> jax.sharding.Mesh:
  """A mesh over the first ``prod(shape)`` devices, its axes of type Explicit."""
  return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Explicit,) * len(shape))
