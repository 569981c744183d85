"""Load families for quality benchmarks, none of them the one the package was tuned on.

``family(name, num_layers, num_experts, seed)`` returns float32 loads
``[L, E]``; ``drifting(name, num_windows, ...)`` a trace ``[T, L, E]`` of
consecutive windows (place on window ``t``, score on ``t + 1``). Families:

* ``lognormal1.5`` / ``lognormal2``: log-normal loads of that sigma, then 4
  random hot experts per layer multiplied by U(1, 8); tie-free.
* ``zipf1.2``: the expert of rank ``r`` (a random permutation per layer)
  gets ``r ** -1.2``, times a log-normal(0, 0.3) jitter: a power-law head.
* ``pareto1.5``: i.i.d. Pareto (Lomax + 1) loads, alpha 1.5: a few very
  heavy experts, no designated hot set.
* ``counts``: integer token counts with ties and zeros, a multinomial draw of
  ``4 E`` tokens from log-normal(1.5) probabilities with 2 hot experts.

No spare slots (``num_replicas == num_experts``) is a property of the shape,
not of the loads: the benchmark runs the families on such shapes too.
"""

from __future__ import annotations

import numpy as np

FAMILIES = ("lognormal1.5", "lognormal2", "zipf1.2", "pareto1.5", "counts")

# Distinct seed streams per family, so that seed s of two families differ.
_SALT = {name: i * 1_000_003 for i, name in enumerate(FAMILIES)}


def _hot(rng: np.random.Generator, loads: np.ndarray, hot: int, factor: float) -> np.ndarray:
  for layer in loads:
    idx = rng.choice(layer.shape[0], size=min(hot, layer.shape[0]), replace=False)
    layer[idx] *= rng.uniform(1.0, factor, size=idx.shape)
  return loads


def family(name: str, num_layers: int, num_experts: int, seed: int) -> np.ndarray:
  """Loads ``[num_layers, num_experts]`` (float32, >= 0) of family ``name``, seeded."""
  rng = np.random.default_rng([seed, _SALT[name]])
  shape = (num_layers, num_experts)
  if name.startswith("lognormal"):
    loads = 1000.0 * _hot(rng, rng.lognormal(0.0, float(name[len("lognormal") :]), shape), 4, 8.0)
  elif name.startswith("zipf"):
    ranks = np.argsort(rng.random(shape), axis=1) + 1.0
    loads = ranks ** -float(name[len("zipf") :]) * rng.lognormal(0.0, 0.3, shape)
    loads = 1000.0 * num_experts * loads / loads.sum(axis=1, keepdims=True)
  elif name.startswith("pareto"):
    loads = 1000.0 * (rng.pareto(float(name[len("pareto") :]), shape) + 1.0)
  elif name == "counts":
    probs = _hot(rng, rng.lognormal(0.0, 1.5, shape), 2, 8.0)
    probs /= probs.sum(axis=1, keepdims=True)
    loads = np.stack([rng.multinomial(4 * num_experts, p) for p in probs]).astype(np.float64)
  else:
    raise ValueError(f"unknown family {name!r}; one of {FAMILIES}")
  return loads.astype(np.float32)


def drifting(
  name: str,
  num_windows: int,
  num_layers: int,
  num_experts: int,
  seed: int,
  *,
  drift: float = 0.10,
  shift_prob: float = 0.2,
  start: np.ndarray | None = None,
) -> np.ndarray:
  """A trace ``[T, L, E]`` of consecutive windows, from :func:`family` (or ``start``).

  Window ``t + 1`` multiplies window ``t`` by ``exp(N(0, drift))`` per expert;
  then, with probability ``shift_prob`` per layer, the layer's hottest expert
  swaps its load with a random other expert (a hot-expert shift). Integer
  families stay integer (rounded).
  """
  rng = np.random.default_rng([seed, _SALT.get(name, 0), 7])
  if start is None:
    start = family(name, num_layers, num_experts, seed)
  loads = start.astype(np.float64)
  windows = [loads]
  for _ in range(num_windows - 1):
    loads = loads * np.exp(rng.normal(0.0, drift, loads.shape))
    if name == "counts":
      loads = np.round(loads)
    for layer in np.flatnonzero(rng.random(num_layers) < shift_prob):
      hot, other = int(np.argmax(loads[layer])), int(rng.integers(num_experts))
      loads[layer, [hot, other]] = loads[layer, [other, hot]]
    windows.append(loads)
  return np.stack(windows).astype(np.float32)
