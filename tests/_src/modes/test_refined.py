"""The refined packing's two stages: the differencing start and swap refinement."""

from __future__ import annotations

import functools

import chex
import jax
import numpy as np
import pytest

from eplb_jax import Refined
from eplb_jax._src import packing
from eplb_jax._src import swap
from eplb_jax._src.problem import PackingProblem

MODE = Refined()


def _pack_slots(weight, num_packs, rows_per_layer=1):
  """``packing.pack_slots`` in refined mode on distinct items, jitted."""
  pack = jax.jit(
    lambda w: packing.pack_slots(PackingProblem.distinct(w), num_packs, MODE, rows_per_layer)
  )
  return np.asarray(pack(weight))


def _differencing_reference(weight: np.ndarray, num_packs: int) -> np.ndarray:
  """NumPy balanced largest differencing: the sorted pack loads of one row ``[n]``."""
  order = np.argsort(-weight, kind="stable")
  partials = [weight[chunk].astype(np.float64) for chunk in order.reshape(-1, num_packs)]
  while len(partials) > 1:
    partials.sort(key=lambda loads: loads.max() - loads.min(), reverse=True)
    a, b = partials.pop(0), partials.pop(0)
    partials.append(np.sort(a) + np.sort(b)[::-1])
  return np.sort(partials[0])


def _pack_loads(weight: np.ndarray, slots: np.ndarray) -> np.ndarray:
  return weight[slots].sum(-1)


def _random_rows(rows: int, n: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.lognormal(0.0, 1.5, size=(rows, n)).astype(np.float32)


@pytest.mark.parametrize("n, num_packs", [(8, 4), (12, 3), (72, 8), (64, 64 // 2), (30, 5)])
def test_differencing_matches_reference(n, num_packs):
  weight = _random_rows(6, n, seed=n)
  slots, loads = jax.vmap(lambda w: packing.differencing_slots(w, num_packs))(weight)
  slots = np.asarray(slots)
  assert slots.shape == (6, num_packs, n // num_packs)
  for row in range(6):
    np.testing.assert_array_equal(np.sort(slots[row].ravel()), np.arange(n))
    np.testing.assert_allclose(
      np.sort(_pack_loads(weight[row], slots[row])),
      _differencing_reference(weight[row], num_packs),
      rtol=1e-5,
    )
    np.testing.assert_allclose(loads[row], _pack_loads(weight[row], slots[row]), rtol=1e-5)


def _best_pairing_max(weight: np.ndarray) -> float:
  """The lowest possible heaviest pack over all ways to pair up ``weight [2m]``."""
  if weight.size == 0:
    return 0.0
  first, rest = weight[0], weight[1:]
  return min(max(first + rest[i], _best_pairing_max(np.delete(rest, i))) for i in range(rest.size))


def test_two_items_per_pack_are_paired_optimally():
  """With two items per pack the refined packing reaches the best pairing's heaviest pack."""
  weight = _random_rows(10, 10, seed=11)
  slots = _pack_slots(weight, 5)
  for row in range(10):
    np.testing.assert_array_equal(np.sort(slots[row].ravel()), np.arange(10))
    np.testing.assert_allclose(
      _pack_loads(weight[row], slots[row]).max(), _best_pairing_max(weight[row]), rtol=1e-6
    )


def _refine(weight: np.ndarray, slots: np.ndarray, max_steps: int = MODE.max_steps) -> np.ndarray:
  refine = functools.partial(
    swap.refine_slots, max_steps=max_steps, packs_per_group=MODE.packs_per_group
  )
  return np.asarray(jax.jit(jax.vmap(refine))(weight, slots))


@pytest.mark.parametrize("num_packs, per_pack", [(2, 3), (8, 9), (16, 5), (64, 7)])
def test_refinement_never_raises_the_heaviest_pack(num_packs, per_pack):
  """From any start (random here), the same items, and a heaviest pack no heavier."""
  n = num_packs * per_pack
  weight = _random_rows(8, n, seed=num_packs)
  rng = np.random.default_rng(0)
  start = np.stack([rng.permutation(n).reshape(num_packs, per_pack) for _ in range(8)])
  refined = _refine(weight, start.astype(np.int32))
  for row in range(8):
    np.testing.assert_array_equal(np.sort(refined[row].ravel()), np.arange(n))
    before = _pack_loads(weight[row], start[row]).max()
    after = _pack_loads(weight[row], refined[row]).max()
    assert after <= before * (1 + 1e-6), (row, before, after)
  # A random start is far from balanced: the refinement must have lowered it.
  lowered = [
    _pack_loads(w, r).max() < _pack_loads(w, s).max()
    for w, r, s in zip(weight, refined, start, strict=True)
  ]
  assert np.mean(lowered) > 0.9


def test_refinement_on_a_small_row():
  """Loads 9, 1, 5, 5: {9, 1} / {5, 5} is optimal and stays; {9, 5} / {1, 5} becomes 10 / 10."""
  weight = np.array([[9.0, 1.0, 5.0, 5.0]], np.float32)
  start = np.array([[[0, 1], [2, 3]]], np.int32)
  chex.assert_trees_all_equal(_refine(weight, start), start)
  start = np.array([[[0, 2], [1, 3]]], np.int32)
  loads = _pack_loads(weight[0], _refine(weight, start)[0])
  np.testing.assert_array_equal(np.sort(loads), [10.0, 10.0])


def _items_moved(start: np.ndarray, refined: np.ndarray) -> int:
  """Items outside the start pack that shares most items with their refined pack."""
  start_pack = np.empty(start.size, int)
  start_pack[start.ravel()] = np.repeat(np.arange(start.shape[0]), start.shape[1])
  return sum(
    len(pack) - np.bincount(start_pack[pack], minlength=start.shape[0]).max() for pack in refined
  )


def test_refinement_stops_within_its_budget():
  """Each step makes at most one exchange (two moved items) per group head."""
  num_packs, per_pack = 64, 16
  weight = _random_rows(1, num_packs * per_pack, seed=1)
  start = np.random.default_rng(1).permutation(num_packs * per_pack).astype(np.int32)
  start = start.reshape(1, num_packs, per_pack)
  heads = swap.refinement_groups(num_packs, MODE.packs_per_group)
  assert _items_moved(start[0], _refine(weight, start)[0]) > 2 * heads
  assert 0 < _items_moved(start[0], _refine(weight, start, max_steps=1)[0]) <= 2 * heads


def test_node_rows_are_refined_in_two_rounds():
  """Of a layer's node rows, the two with the heaviest differencing pack are refined
  for the first round's steps; then the one of them with the heaviest pack
  takes the rest of the budget. The other rows keep the differencing start."""
  layers, nodes, n, num_packs = 8, 4, 72, 8
  weight = _random_rows(layers * nodes, n, seed=5)
  got = _pack_slots(weight, num_packs, nodes)

  start = np.asarray(jax.vmap(lambda w: packing.differencing_slots(w, num_packs))(weight)[0])
  heaviest = np.stack([_pack_loads(w, s).max() for w, s in zip(weight, start, strict=True)])
  top = np.argsort(-heaviest.reshape(layers, nodes), axis=1, kind="stable")[:, :2]
  chosen = (top + nodes * np.arange(layers)[:, None]).ravel()
  others = np.setdiff1d(np.arange(layers * nodes), chosen)
  chex.assert_trees_all_equal(got[others], start[others])

  steps = MODE.first_round_steps
  first = _refine(weight[chosen], start[chosen], max_steps=steps)
  second = _refine(weight[chosen], first, max_steps=MODE.max_steps - steps)
  loads = np.stack([_pack_loads(w, s).max() for w, s in zip(weight[chosen], first, strict=True)])
  again = np.argmax(loads.reshape(layers, 2), axis=1) + 2 * np.arange(layers)
  expected = first.copy()
  expected[again] = second[again]
  assert not np.array_equal(expected[again], first[again])  # the second round did something
  chex.assert_trees_all_equal(got[chosen], expected)
