"""Expert-parallel MoE training with in-step expert rebalancing, in pure JAX and optax.

A small mixture-of-experts model (top-k router, ReLU expert MLPs, residual
layers) learns a synthetic regression task on a 1-D ``expert`` device mesh
(8 host devices on CPU), data and expert parallel: every device holds
``T / 8`` tokens and ``P / 8`` expert slots. Its router is deliberately
skewed, so a few experts get most tokens. Every step, inside one jitted
function:

1. each MoE layer (:func:`eplb_jax.runtime.moe.moe_layer`) sends every
   (token, choice) to one replica of its expert with an all-to-all, drops
   the pairs over capacity, runs each device's own slots and sends the
   outputs back; ``--split`` chooses how an expert's pairs spread over its
   replicas: evenly, or ``balanced`` by the step's own counts (the devices
   all-gather their counts and split each expert's pairs for the lightest
   heaviest GPU, :func:`eplb_jax.split_tokens`); ``--capacity-per`` what the
   capacity bounds: each slot's pairs from each device, or each device's
   pairs in all (its experts then run on ragged groups,
   :func:`eplb_jax.runtime.moe.expert_mlp`); ``--spare-slots k`` (with the
   balanced split) fills ``k`` more slots per device every step with copies
   of the step's heaviest experts (:func:`eplb_jax.plan_spare_slots`), their
   weights fetched from the devices that hold them;
2. the router's top-k ids are counted (:mod:`eplb_jax.runtime.stats`) into a
   sliding window of per-expert loads;
3. replica gradients are summed per logical expert
   (:func:`eplb_jax.runtime.params.sum_replicas`) and Adam (optax) updates
   every slot, so replicas stay equal;
4. every ``--rebalance-every`` steps a ``lax.cond`` on the step counter
   recomputes the placement from the window (:func:`eplb_jax.rebalance_experts`),
   and from then on every step moves the expert weights and their Adam
   moments of ``--layers-per-step`` more layers to the new slots
   (:func:`eplb_jax.runtime.params.transition_step`), each layer routed by
   the placement its weights are laid out by.

The script reports, per placement, the (token, choice) pairs each device
receives (max / mean, against what the placement's balance on its window
predicts), the fraction of pairs over capacity at capacity factors 1.0 and
1.25 (both counted from the same routing) and the step time; and the same
per-step max / mean for both splits, with their drops for both capacities,
and for no balancing (the initial placement, even split) and spare slots
``k = 1, 2`` (with the weight bytes each device receives for them), all
on the same router choices (the split not in service from
:func:`eplb_jax.runtime.moe.dispatch_stats`, the drops from
:func:`eplb_jax.runtime.moe.kept_pairs`).
It also trains the logical model (logical expert weights, each expert
applied to every token, with the same placements deciding the same drops:
:func:`eplb_jax.runtime.moe.moe_reference`) and asserts both runs agree
(:func:`check_same_model`): the two differ only in the order of float
operations, so their losses agree to rounding (``--rtol``) and their drops
exactly for as long as their routers choose alike, which must hold for at
least the first ``--tight-steps``; once rounding tips a near-tie of the
router, the trajectories part, and the losses are held to ``--loose-rtol``.

Run: ``python examples/train_moe.py --steps 200 --rebalance-every 50 [--split balanced]
[--capacity-per device] [--spare-slots 1] [--layers-per-step 1]``.
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()

import argparse
import dataclasses
import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import eplb_jax
from eplb_jax import Placement
from eplb_jax.runtime import moe
from eplb_jax.runtime import params as expert_params
from eplb_jax.runtime import stats

EXPERT_AXIS = "expert"
# Capacity factors whose drops every step reports, from that step's routing.
REPORTED_FACTORS = (1.0, 1.25)
# Spare slots per device every step reports the balance of, from that step's routing.
REPORTED_SPARES = (1, 2)


@dataclasses.dataclass(frozen=True)
class Config:
  """Model, placement and training sizes (static: hashable, Python numbers)."""

  d_model: int = 32
  d_hidden: int = 64
  num_layers: int = 2
  num_experts: int = 16
  num_replicas: int = 32
  top_k: int = 2
  tokens: int = 2048
  num_groups: int = 1
  num_nodes: int = 1
  num_gpus: int = 8
  window: int = 20
  rebalance_every: int = 50
  # A layer keeps its placement unless the new one's heaviest GPU on the
  # window is lighter by more than this fraction (eplb_jax.gate_placement).
  rebalance_threshold: float = 0.02
  capacity_factor: float | None = 1.25
  # How each expert's pairs are split over its replicas (moe.SPLITS): "even", or
  # "balanced" by each step's quotas of the lightest heaviest GPU.
  split: str = "even"
  # What the capacity bounds (moe.CAPACITY_PER): each (device, slot) stream, or each device.
  capacity_per: str = "slot"
  # Slots per device filled every step with copies for that step (needs the balanced split).
  spare_slots: int = 0
  # Layers whose weights move to a new placement per step (all of them: at once).
  layers_per_step: int = 1
  router_skew: float = 0.75
  # DeepSeek's placement: its replication minimises the largest replica load,
  # and with a per-slot capacity the heaviest slot decides the drops.
  mode: str = "greedy"
  learning_rate: float = 1e-3
  seed: int = 0
  # The logical model: expert weights [L, E, ...], no all-to-all, same drops.
  logical: bool = False


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar
  params: dict  # router [L, d, E], head [d, d], experts {w_in [L, X, d, h], w_out [L, X, h, d]}
  opt_state: optax.OptState
  # The placement each layer is served by (transition.service) and the one it moves to.
  transition: expert_params.Transition
  window: stats.WindowState  # counts [W, L, E]


def make_mesh(cfg: Config) -> Mesh:
  if jax.device_count() < cfg.num_gpus:
    raise ValueError(
      f"num_gpus ({cfg.num_gpus}) exceeds the available devices ({jax.device_count()})"
    )
  return jax.make_mesh(
    (cfg.num_gpus,),
    (EXPERT_AXIS,),
    axis_types=(jax.sharding.AxisType.Auto,),
    devices=jax.devices()[: cfg.num_gpus],
  )


def optimizer(cfg: Config) -> optax.GradientTransformation:
  return optax.adam(cfg.learning_rate)


def router_skew(cfg: Config) -> jax.Array:
  """Fixed ``[L, E]`` router logit bias that makes a few experts hot."""
  key = jax.random.fold_in(jax.random.key(cfg.seed), 1)
  return cfg.router_skew * jax.random.normal(key, (cfg.num_layers, cfg.num_experts))


def batch(cfg: Config, step: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Synthetic ``(x [T, d], y [T, d])`` for ``step``: ``y = sin(x @ A)`` for a fixed ``A``."""
  teacher = jax.random.normal(jax.random.key(cfg.seed + 1), (cfg.d_model, cfg.d_model))
  x = jax.random.normal(
    jax.random.fold_in(jax.random.key(cfg.seed + 2), step), (cfg.tokens, cfg.d_model)
  )
  return x, jnp.sin(x @ teacher / np.sqrt(cfg.d_model))


def uniform_placement(cfg: Config) -> Placement:
  """``P / E`` replicas of every expert, slot ``s`` holding expert ``s mod E``."""
  L, E, R = cfg.num_layers, cfg.num_experts, cfg.num_replicas // cfg.num_experts
  if R * E != cfg.num_replicas:
    raise ValueError(f"num_replicas ({cfg.num_replicas}) must be a multiple of num_experts ({E})")
  phy2log = jnp.broadcast_to(jnp.arange(cfg.num_replicas, dtype=jnp.int32) % E, (L, R * E))
  log2phy = jnp.arange(E, dtype=jnp.int32)[:, None] + E * jnp.arange(R, dtype=jnp.int32)
  width = cfg.num_replicas - E + 1
  log2phy = jnp.pad(log2phy, [(0, 0), (0, width - R)], constant_values=-1)
  logcnt = jnp.full((L, E), R, jnp.int32)
  return Placement(phy2log, jnp.broadcast_to(log2phy, (L, E, width)), logcnt)


def init_state(cfg: Config, mesh: Mesh) -> TrainState:
  """Initial state; the logical experts are laid out by a uniform-load placement."""
  keys = jax.random.split(jax.random.key(cfg.seed), 4)
  L, E, d, h = cfg.num_layers, cfg.num_experts, cfg.d_model, cfg.d_hidden
  logical = {
    "w_in": jax.random.normal(keys[0], (L, E, d, h)) / np.sqrt(d),
    "w_out": jax.random.normal(keys[1], (L, E, h, d)) / np.sqrt(h),
  }
  placement = uniform_placement(cfg)
  replicated = NamedSharding(mesh, P())
  params = {
    "router": jax.device_put(jax.random.normal(keys[2], (L, d, E)) / np.sqrt(d), replicated),
    "head": jax.device_put(jax.random.normal(keys[3], (d, d)) / np.sqrt(d), replicated),
    "experts": (
      jax.device_put(logical, replicated)
      if cfg.logical
      else expert_params.apply_placement(logical, placement.phy2log, mesh=mesh)
    ),
  }
  window = stats.window_init(cfg.window, (L, E))
  opt_state = optimizer(cfg).init(params)
  transition = expert_params.transition_start(placement, placement)
  transition = transition._replace(next_layer=jnp.int32(L))  # nothing to move
  state = TrainState(jnp.zeros((), jnp.int32), params, opt_state, transition, window)
  # Every leaf on the mesh (replicated unless already laid out there), so that
  # the step can keep each leaf where it is.
  on_mesh = set(mesh.devices.flat)
  return jax.tree.map(
    lambda a: a if a.sharding.device_set == on_mesh else jax.device_put(a, replicated), state
  )


def loss_fn(
  params: dict, placement: Placement, x: jax.Array, y: jax.Array, cfg: Config, mesh: Mesh
) -> tuple[jax.Array, tuple[jax.Array, moe.DispatchStats]]:
  """MSE loss; aux: router ids ``[L, T, k]`` and the layers' stacked dispatch stats."""
  skew = router_skew(cfg)
  # Data parallel: every device holds T / G tokens (and computes only those).
  x, y = (jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P(EXPERT_AXIS))) for a in (x, y))
  h, all_ids, all_stats = x, [], []
  for layer in range(cfg.num_layers):
    gates, ids = moe.top_k_routing(h @ params["router"][layer] + skew[layer], cfg.top_k)
    experts = jax.tree.map(lambda w, layer=layer: w[layer], params["experts"])
    maps = placement.log2phy[layer], placement.logcnt[layer]
    routing = (h, gates, ids, experts, moe.expert_mlp, *maps)
    options = {
      "capacity_factor": cfg.capacity_factor,
      "split": cfg.split,
      "capacity_per": cfg.capacity_per,
      "spare_slots": cfg.spare_slots,
    }
    if cfg.logical:
      out, layer_stats = moe.moe_reference(*routing, num_gpus=cfg.num_gpus, **options)
    else:
      out, layer_stats = moe.moe_layer(*routing, mesh=mesh, expert_axis=EXPERT_AXIS, **options)
    h = h + out
    all_ids.append(ids)
    all_stats.append(layer_stats)
  loss = jnp.mean((h @ params["head"] - y) ** 2)
  return loss, (jnp.stack(all_ids), jax.tree.map(lambda *s: jnp.stack(s), *all_stats))


def imbalance(loads: jax.Array) -> jax.Array:
  """Mean over layers of max / mean load, for ``loads [L, G]``."""
  loads = loads.astype(jnp.float32)
  return jnp.mean(loads.max(-1) / jnp.maximum(loads.mean(-1), 1e-9))


def capacities(cfg: Config) -> dict[tuple[str, float], int]:
  """``(capacity_per, factor) -> capacity`` for every capacity and reported factor."""
  shape = (cfg.tokens // cfg.num_gpus, cfg.top_k)
  return {
    **{("slot", f): moe.capacity(*shape, cfg.num_replicas, f) for f in REPORTED_FACTORS},
    **{("device", f): moe.device_capacity(*shape, cfg.num_gpus, f) for f in REPORTED_FACTORS},
  }


def drop_fraction(routed: jax.Array, capacity: int, capacity_per: str) -> jax.Array:
  """The fraction of the pairs in ``routed [L, G, P]`` over ``capacity`` (per slot or device)."""
  dropped = routed - moe.kept_pairs(routed, capacity, capacity_per)
  return dropped.sum() / jnp.maximum(routed.sum(), 1)


def next_placement(
  window: stats.WindowState, old: Placement, cfg: Config
) -> tuple[Placement, tuple[jax.Array, jax.Array, jax.Array]]:
  """New placement from the window, gated; the imbalance it predicts and the layers it changes.

  :func:`eplb_jax.gate_placement` keeps a layer's placement unless the new
  one's heaviest GPU on the window is lighter by more than
  ``cfg.rebalance_threshold``. Returns the placement and ``(before, after,
  rebalanced)``: ``max / mean`` of :meth:`Placement.gpu_loads` on the window
  for the old placement and the gated one, and how many layers changed.
  """
  load = stats.window_load(window)
  topology = eplb_jax.Topology(cfg.num_replicas, cfg.num_groups, cfg.num_nodes, cfg.num_gpus)
  new = eplb_jax.rebalance(load, topology, mode=cfg.mode)
  gated = eplb_jax.gate_placement(load, topology, old.phy2log, new, cfg.rebalance_threshold)
  # Per layer the new placement or the old one as it is (the gate's own kept
  # layers have maps rebuilt from phy2log, replicas ranked in slot order).
  new = jax.tree.map(
    lambda n, o: jnp.where(gated.rebalanced.reshape(-1, *[1] * (n.ndim - 1)), n, o), new, old
  )
  before = imbalance(old.gpu_loads(load, cfg.num_gpus))
  after = imbalance(new.gpu_loads(load, cfg.num_gpus))
  return new, (before, after, gated.rebalanced.sum().astype(jnp.float32))


def rebalance(
  state: TrainState, cfg: Config
) -> tuple[TrainState, tuple[jax.Array, jax.Array, jax.Array]]:
  """Re-plans from the window and starts moving to the new placement (:func:`move_layers`).

  When the gate keeps every layer's placement, nothing moves.
  """
  old = state.transition.service
  new, predicted = next_placement(state.window, old, cfg)
  transition = expert_params.transition_start(old, new)
  unchanged = jnp.where(predicted[2] > 0, 0, cfg.num_layers).astype(jnp.int32)
  return state._replace(transition=transition._replace(next_layer=unchanged)), predicted


def move_layers(state: TrainState, cfg: Config, mesh: Mesh) -> TrainState:
  """Moves the weights and Adam moments of ``cfg.layers_per_step`` more layers to the
  placement being moved to (none once every layer has; a ``lax.cond``)."""
  experts = {} if cfg.logical else state.params["experts"]

  def move(transition, experts, opt_state):
    return expert_params.transition_step(
      transition, experts, opt_state, layers_per_step=cfg.layers_per_step, mesh=mesh
    )

  moving = state.transition.next_layer < cfg.num_layers
  transition, experts, opt_state = jax.lax.cond(
    moving, move, lambda *a: a, state.transition, experts, state.opt_state
  )
  params = state.params if cfg.logical else {**state.params, "experts": experts}
  return state._replace(transition=transition, params=params, opt_state=opt_state)


def step_metrics(
  loss: jax.Array,
  dispatched: moe.DispatchStats,
  cfg: Config,
  ids: jax.Array,
  placement: Placement,
) -> dict:
  """Loss, the router's counts, pairs per GPU and their max / mean, and the fractions dropped.

  ``imbalance`` and ``dropped@{factor}`` are the split and capacity in
  service's; ``imbalance[split]`` and ``dropped@{factor}[split/capacity_per]``
  give every split of :data:`moe.SPLITS` and capacity of
  :data:`moe.CAPACITY_PER` on the same router choices ``ids [L, T, k]``
  (the other split's from :func:`moe.dispatch_stats`, the routing alone),
  so they compare on identical steps.
  """
  out = {
    "loss": loss,
    "counts": stats.expert_counts(ids, cfg.num_experts),
    "imbalance": imbalance(dispatched.gpu_tokens()),
    "gpu_tokens": dispatched.gpu_tokens(),
    "dropped": dispatched.dropped.sum() / jnp.maximum(dispatched.routed.sum(), 1),
  }
  capacity = capacities(cfg)
  for factor in REPORTED_FACTORS:
    in_service = capacity[cfg.capacity_per, factor]
    out[f"dropped@{factor}"] = drop_fraction(dispatched.routed, in_service, cfg.capacity_per)
  for split in moe.SPLITS:
    routed = dispatched
    if split != cfg.split or cfg.spare_slots:  # the layer's own stats route to spare slots too
      routing = functools.partial(
        moe.dispatch_stats, num_gpus=cfg.num_gpus, capacity_factor=None, split=split
      )
      routed = jax.vmap(routing)(ids, placement.log2phy, placement.logcnt)
    out[f"imbalance[{split}]"] = imbalance(routed.gpu_tokens())
    for (per, factor), cap in capacity.items():
      out[f"dropped@{factor}[{split}/{per}]"] = drop_fraction(routed.routed, cap, per)
  # No balancing: the initial placement, evenly split.
  uniform = uniform_placement(cfg)
  routing = functools.partial(moe.dispatch_stats, num_gpus=cfg.num_gpus, capacity_factor=None)
  routed = jax.vmap(routing)(ids, uniform.log2phy, uniform.logcnt)
  out["imbalance[none]"] = imbalance(routed.gpu_tokens())
  for spares in REPORTED_SPARES:
    with_spares = functools.partial(routing, split="balanced", spare_slots=spares)
    routed = jax.vmap(with_spares)(ids, placement.log2phy, placement.logcnt)
    out[f"imbalance[k={spares}]"] = imbalance(routed.gpu_tokens())
    # Spare slots that serve pairs: the copies each device fetched (max over devices).
    per_slot = routed.routed.sum(-2).reshape(cfg.num_layers, cfg.num_gpus, -1)
    fetched = (per_slot[..., -spares:] > 0).sum(-1)
    out[f"fetched[k={spares}]"] = fetched.max(-1).mean(dtype=jnp.float32)
  return out


def train_step(state: TrainState, cfg: Config, mesh: Mesh) -> tuple[TrainState, dict]:
  """One Adam step, then (every ``rebalance_every`` steps) a rebalance, all in one program."""
  x, y = batch(cfg, state.step)
  service = state.transition.service
  (loss, (ids, dispatched)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    state.params, service, x, y, cfg, mesh
  )
  if not cfg.logical:
    grads["experts"] = expert_params.sum_replicas(
      grads["experts"], service.phy2log, cfg.num_experts, mesh=mesh
    )
  updates, opt_state = optimizer(cfg).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  window = stats.window_update(state.window, stats.expert_counts(ids, cfg.num_experts))
  state = TrainState(state.step + 1, params, opt_state, state.transition, window)
  out = step_metrics(loss, dispatched, cfg, ids, service)
  if cfg.rebalance_every:
    due = state.step % cfg.rebalance_every == 0
    nan = jnp.full((), jnp.nan)
    state, (out["before"], out["after"], out["layers_rebalanced"]) = jax.lax.cond(
      due,
      functools.partial(rebalance, cfg=cfg),
      lambda s: (s, (nan, nan, nan)),
      state,
    )
  # The first layers of a new placement move in the step that made it.
  return move_layers(state, cfg, mesh), out


def make_step(cfg: Config, mesh: Mesh, state: TrainState):
  """The jitted ``state -> (state, metrics)`` step, keeping ``state``'s shardings."""
  shardings = jax.tree.map(lambda a: a.sharding, state)
  return jax.jit(
    functools.partial(train_step, cfg=cfg, mesh=mesh),
    out_shardings=(shardings, NamedSharding(mesh, P())),
  )


def run_steps(step_fn, state, steps: int) -> dict[str, np.ndarray]:
  """Calls ``state, metrics = step_fn(state)`` ``steps`` times; returns ``[steps, ...]`` metrics.

  ``seconds`` is each step's wall time (the first one includes compilation).
  """
  history = []
  for _ in range(steps):
    start = time.perf_counter()
    state, out = step_fn(state)
    # Waiting for each step keeps consecutive steps from overlapping: on a few
    # CPU cores, XLA:CPU's in-process collectives can deadlock when they do.
    out = jax.device_get(out)
    out["seconds"] = time.perf_counter() - start
    history.append(out)
  return {k: np.asarray([h[k] for h in history]) for k in history[0]}


def train(cfg: Config, steps: int, mesh: Mesh) -> dict[str, np.ndarray]:
  """Trains for ``steps`` steps; returns the per-step metrics (:func:`run_steps`)."""
  state = init_state(cfg, mesh)
  return run_steps(make_step(cfg, mesh, state), state, steps)


class Period(NamedTuple):
  """Figures for the steps served by one placement."""

  first: int  # first step served (1-based)
  last: int
  predicted: float  # max / mean GPU load of the placement on a window, nan if not scored
  measured: float  # max / mean pairs per GPU, mean over the steps
  summed: float  # max / mean pairs per GPU summed over the steps
  dropped: dict[float, float]  # capacity factor -> fraction of pairs dropped
  seconds: float  # median step time
  # On the same router choices: per split of moe.SPLITS, max / mean pairs per
  # GPU (mean over the steps); per (split, capacity_per), factor -> fraction dropped.
  split_measured: dict[str, float]
  split_dropped: dict[tuple[str, str], dict[float, float]]


def periods(run: dict[str, np.ndarray], rebalance_every: int) -> list[Period]:
  """Splits a run at its rebalances; ``predicted`` scores each placement on a window.

  The initial placement is scored by the first rebalance (its ``before``),
  every later one when it was made (its ``after``).
  """
  steps = len(run["loss"])
  rebalanced = np.flatnonzero(~np.isnan(run["before"])) if rebalance_every else np.array([], int)
  bounds = [0, *(rebalanced + 1), steps]
  result = []
  for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
    if start == stop:
      continue
    if i == 0:
      predicted = run["before"][rebalanced[0]] if len(rebalanced) else np.nan
    else:
      predicted = run["after"][rebalanced[i - 1]]
    summed = run["gpu_tokens"][start:stop].sum(0)
    timed = run["seconds"][max(start, 1) : stop]  # the first step compiles
    result.append(
      Period(
        first=start + 1,
        last=stop,
        predicted=float(predicted),
        measured=float(run["imbalance"][start:stop].mean()),
        summed=float(np.mean(summed.max(-1) / summed.mean(-1))),
        dropped={f: float(run[f"dropped@{f}"][start:stop].mean()) for f in REPORTED_FACTORS},
        seconds=float(np.median(timed)) if len(timed) else np.nan,
        split_measured={s: float(run[f"imbalance[{s}]"][start:stop].mean()) for s in moe.SPLITS},
        split_dropped={
          (s, c): {
            f: float(run[f"dropped@{f}[{s}/{c}]"][start:stop].mean()) for f in REPORTED_FACTORS
          }
          for s in moe.SPLITS
          for c in moe.CAPACITY_PER
        },
      )
    )
  return result


def table(rows: list[Period]) -> list[str]:
  """Markdown table of :func:`periods`."""
  lines = [
    "| steps | predicted max/mean | measured max/mean | summed max/mean | "
    + " | ".join(f"dropped cf {f}" for f in REPORTED_FACTORS)
    + " | step ms |",
    "|---|---:|---:|---:|" + "---:|" * len(REPORTED_FACTORS) + "---:|",
  ]
  for p in rows:
    drops = " | ".join(f"{100 * p.dropped[f]:.2f}%" for f in REPORTED_FACTORS)
    lines.append(
      f"| {p.first}-{p.last} | {p.predicted:.3f} | {p.measured:.3f} | {p.summed:.3f} | {drops} "
      f"| {1e3 * p.seconds:.1f} |"
    )
  return lines


def split_table(rows: list[Period], cfg: Config) -> list[str]:
  """Markdown table of every split and capacity on the same router choices, per period of
  :func:`periods`."""
  lines = [
    "| steps | split | max/mean per step | capacity per | "
    + " | ".join(f"dropped cf {f}" for f in REPORTED_FACTORS)
    + " |",
    "|---|---|---:|---|" + "---:|" * len(REPORTED_FACTORS),
  ]
  for p in rows:
    for split in moe.SPLITS:
      for per in moe.CAPACITY_PER:
        drops = " | ".join(f"{100 * p.split_dropped[split, per][f]:.2f}%" for f in REPORTED_FACTORS)
        name = f"{per} (in service)" if (split, per) == (cfg.split, cfg.capacity_per) else per
        lines.append(
          f"| {p.first}-{p.last} | {split} | {p.split_measured[split]:.3f} | {name} | {drops} |"
        )
  return lines


def after_first_rebalance(run: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
  """Per split: mean per-step max / mean pairs per GPU and drops per capacity, over the steps
  after the first rebalance (all steps without one)."""
  rebalanced = np.flatnonzero(~np.isnan(run["before"])) if "before" in run else []
  start = rebalanced[0] + 1 if len(rebalanced) else 0
  return {
    split: {
      "max/mean": float(run[f"imbalance[{split}]"][start:].mean()),
      **{
        f"dropped cf {f} per {per}": float(run[f"dropped@{f}[{split}/{per}]"][start:].mean())
        for per in moe.CAPACITY_PER
        for f in REPORTED_FACTORS
      },
    }
    for split in moe.SPLITS
  }


def replication_summary(run: dict[str, np.ndarray], cfg: Config) -> list[str]:
  """Per-step max / mean pairs per GPU without balancing, with the window placement and each
  split, and with spare slots; and the expert weights each device receives for the spares."""
  rebalanced = np.flatnonzero(~np.isnan(run["before"])) if "before" in run else []
  start = rebalanced[0] + 1 if len(rebalanced) else 0
  rows = {
    "no balancing (initial placement, even split)": "none",
    "window placement, even split": "even",
    "window placement, balanced split": "balanced",
    **{f"+ {k} spare slot(s) per device": f"k={k}" for k in REPORTED_SPARES},
  }
  lines = [
    f"per-step max / mean pairs per device after step {start}: "
    + "; ".join(
      f"{name} {run[f'imbalance[{key}]'][start:].mean():.3f}" for name, key in rows.items()
    )
  ]
  # One expert's weights (w_in and w_out, float32); every MoE layer fetches its own.
  expert_mb = 2 * cfg.d_model * cfg.d_hidden * 4 * cfg.num_layers / 1e6
  slots_per_gpu = cfg.num_replicas // cfg.num_gpus
  for k in REPORTED_SPARES:
    fetched = run[f"fetched[k={k}]"][start:].mean()
    lines.append(
      f"k={k}: weights received per device per step (all layers): ragged_all_to_all "
      f"{fetched * expert_mb:.3f} MB ({fetched:.2f} experts per layer, at most {k}), padded "
      f"all_to_all {cfg.num_gpus * k * expert_mb:.3f} MB, all-gather of every slot "
      f"{(cfg.num_replicas - slots_per_gpu) * expert_mb:.3f} MB"
    )
  return lines


def check_same_model(
  run: dict[str, np.ndarray],
  other: dict[str, np.ndarray],
  *,
  tight_steps: int,
  rtol: float,
  loose_rtol: float,
) -> str:
  """Asserts that two runs of the same model (e.g. expert parallel and logical) agree.

  The runs differ only in the order of float operations, so they agree to
  rounding while their routers make the same choices; a top-k choice or a
  capacity cut is a discrete decision, though, and once rounding tips one
  near-tie the runs take different routes, after which their trajectories
  drift apart (chaotically, as training does from any perturbation). So:

  * up to the first step whose router counts differ (at least the first
    ``tight_steps``, where rounding has had no time to accumulate): losses
    within ``rtol``, and the same pairs per GPU and the same drops;
  * after it: losses within ``loose_rtol``. Parted runs are two training
    trajectories of the same model; on this task their losses settle within
    about 1e-2 of each other, under the loss's own step-to-step variation
    (1-1.5% late in training), hence the default ``2e-2``. A model that
    computes something else fails the first part from the first steps.

  Returns a one-line summary; raises ``AssertionError`` when a check fails.
  """
  steps = len(run["loss"])
  differs = np.any(run["counts"] != other["counts"], axis=(1, 2))
  same = int(np.argmax(differs)) if differs.any() else steps
  if same < min(tight_steps, steps):
    raise AssertionError(
      f"the runs route differently from step {same + 1}, within the first {tight_steps} steps"
    )
  head = slice(0, same)
  np.testing.assert_allclose(run["loss"][head], other["loss"][head], rtol=rtol)
  for key in ("gpu_tokens", "dropped", *(f"dropped@{f}" for f in REPORTED_FACTORS)):
    np.testing.assert_array_equal(run[key][head], other[key][head], err_msg=key)
  np.testing.assert_allclose(run["loss"][same:], other["loss"][same:], rtol=loose_rtol)

  def error(part):
    return np.max(np.abs(run["loss"][part] - other["loss"][part]) / np.abs(other["loss"][part]))

  summary = (
    f"same routing for {same} of {steps} steps, max relative loss difference {error(head):.2e}"
  )
  if same < steps:
    summary += f"; after: {error(slice(same, steps)):.2e}"
  return summary


def add_arguments(parser: argparse.ArgumentParser, steps: int) -> None:
  """The command-line options both examples take (``train_moe_nnx.py`` trains this model)."""
  parser.add_argument("--steps", type=int, default=steps)
  parser.add_argument("--rebalance-every", type=int, default=50)
  parser.add_argument("--split", choices=moe.SPLITS, default="even", help="the split in service")
  parser.add_argument(
    "--capacity-per", choices=moe.CAPACITY_PER, default="slot", help="what the capacity bounds"
  )
  parser.add_argument(
    "--spare-slots", type=int, default=0, help="per device, filled every step (balanced split)"
  )
  parser.add_argument(
    "--layers-per-step", type=int, default=1, help="layers moved to a new placement per step"
  )
  parser.add_argument(
    "--rtol", type=float, default=1e-5, help="loss match tolerance while both runs route alike"
  )
  parser.add_argument(
    "--loose-rtol", type=float, default=2e-2, help="loss match tolerance after their routes part"
  )
  parser.add_argument(
    "--tight-steps", type=int, default=20, help="steps over which both runs must route alike"
  )


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
  """``parser``'s arguments, with the rules :func:`add_arguments`' options must follow."""
  args = parser.parse_args(argv)
  if args.rebalance_every <= 0:
    parser.error("--rebalance-every must be positive")
  if args.layers_per_step <= 0:
    parser.error("--layers-per-step must be positive")
  if args.spare_slots and args.split != "balanced":
    parser.error("--spare-slots needs --split balanced")
  return args


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_arguments(parser, steps=200)
  parser.add_argument("--window", type=int, default=20, help="steps of load statistics")
  parser.add_argument("--router-skew", type=float, default=0.75)
  parser.add_argument("--capacity-factor", type=float, default=1.25)
  parser.add_argument(
    "--rebalance-threshold", type=float, default=0.02, help="gate: relative gain a layer needs"
  )
  parser.add_argument("--seed", type=int, default=0)
  args = parse_arguments(parser, argv)

  cfg = Config(
    window=args.window,
    rebalance_every=args.rebalance_every,
    router_skew=args.router_skew,
    capacity_factor=args.capacity_factor,
    rebalance_threshold=args.rebalance_threshold,
    split=args.split,
    capacity_per=args.capacity_per,
    spare_slots=args.spare_slots,
    layers_per_step=args.layers_per_step,
    seed=args.seed,
  )
  mesh = make_mesh(cfg)
  print(
    f"{cfg.num_layers} MoE layers, {cfg.num_experts} experts -> {cfg.num_replicas} slots "
    f"on {cfg.num_gpus} devices, top-{cfg.top_k}, {cfg.tokens} tokens/step, "
    f"capacity factor {cfg.capacity_factor} per {cfg.capacity_per}, {cfg.split} split, "
    f"{cfg.spare_slots} spare slots per device, {cfg.layers_per_step} layer(s) moved per step"
  )
  run = train(cfg, args.steps, mesh)
  rows = periods(run, cfg.rebalance_every)
  print("\n".join(table(rows)))
  print("\nEvery split and capacity on the same router choices:")
  print("\n".join(split_table(rows, cfg)))
  for split, figures in after_first_rebalance(run).items():
    print(
      f"after the first rebalance, {split} split: "
      + ", ".join(
        f"{name} {value:.3f}" if name == "max/mean" else f"{name} {100 * value:.2f}%"
        for name, value in figures.items()
      )
    )
  print("\n".join(replication_summary(run, cfg)))
  changed = run["layers_rebalanced"][~np.isnan(run["layers_rebalanced"])]
  print(
    f"gated rebalancing (threshold {cfg.rebalance_threshold}): {len(changed)} rebalances due, "
    f"{int(np.sum(changed == 0))} skipped entirely; {int(changed.sum())} of "
    f"{len(changed) * cfg.num_layers} layer placements changed"
  )

  logical = train(dataclasses.replace(cfg, logical=True), args.steps, mesh)
  summary = check_same_model(
    run, logical, tight_steps=args.tight_steps, rtol=args.rtol, loose_rtol=args.loose_rtol
  )
  print(f"loss {run['loss'][0]:.4f} -> {run['loss'][-1]:.4f}; against the logical model: {summary}")
  print("OK: the expert-parallel model matches the logical model")


if __name__ == "__main__":
  main()
