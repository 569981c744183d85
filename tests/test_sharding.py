"""Sharded placement: on an 8-device CPU mesh in a subprocess, and argument checks here."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from _sharded_checks import CHECKS
from _sharded_checks import run_checks

import eplb_jax


@pytest.fixture(scope="module")
def results() -> dict[str, str]:
  return run_checks("sharding")


@pytest.mark.heavy
@pytest.mark.parametrize("name", CHECKS["sharding"])
def test_on_eight_devices(results, name):
  assert results.get(name) == "ok", results.get(name, f"check {name} did not run")


@pytest.mark.parametrize(
  "kwargs, num_replicas, message",
  [
    (dict(layer_axis="y"), 4, "layer_axis"),
    (dict(layer_axis=["x"]), 4, "layer_axis"),
    (dict(mesh=None), 4, "mesh must be"),
    (dict(), 3, "num_replicas"),
  ],
)
def test_bad_arguments(kwargs, num_replicas, message):
  kwargs = {"mesh": jax.make_mesh((1,), ("x",)), "layer_axis": "x", **kwargs}
  with pytest.raises(ValueError, match=message):
    eplb_jax.rebalance_experts(np.ones((2, 4), np.float32), num_replicas, 1, 1, 1, **kwargs)
