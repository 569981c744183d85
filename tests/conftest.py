"""Shared test helpers: random configurations and the validity check every placement must pass.

Test modules import the plain functions (``from conftest import ...``; pytest
puts this directory on ``sys.path``), or use the ``assert_valid_placement`` fixture.
"""

from __future__ import annotations

import numpy as np
import pytest


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


@pytest.fixture
def assert_valid_placement():
  """The :func:`check_placement` helper, as a fixture."""
  return check_placement
