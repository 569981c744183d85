"""Expert-parallel MoE training with in-step expert rebalancing, in pure JAX.

A tiny mixture-of-experts model (top-k router, ReLU expert MLPs, residual
layers) learns a synthetic regression task on a 1-D ``expert`` device mesh
(8 host devices on CPU). Its router is deliberately skewed, so a few experts
get most tokens. Every step, inside one jitted function:

1. the router's top-k ids are counted (:mod:`eplb_jax.runtime.stats`) into a sliding
   window of per-expert loads;
2. each (token, choice) is dispatched to one replica of its expert
   (:func:`eplb_jax.runtime.dispatch.physical_slots`), spreading an expert's tokens
   evenly over its replicas, and each slot's output is combined with the
   token's gate weight;
3. replica gradients are summed per logical expert, so replicas stay equal;
4. every ``--rebalance-every`` steps a ``lax.cond`` on the step counter
   recomputes the placement from the window (:func:`eplb_jax.rebalance_experts`)
   and moves the expert weights to their new slots (:mod:`eplb_jax.runtime.params`).

The slot axis ``P`` of the expert weights is sharded over the mesh, ``P / 8``
slots per device, so a device's token load is the number of (token, choice)
pairs dispatched to its slots. To keep the math easy to check, each device
applies its slots to every token and masks by the combine weights (a real
framework would send each device only its tokens, with an all-to-all): the
output is then exactly the logical model's, whatever the placement. The
script checks that: it also trains the plain logical model (one slot per
expert, never rebalanced) and asserts both runs have the same losses.

Run: ``python examples/train_moe.py --steps 300 --rebalance-every 50``.
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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import eplb_jax
from eplb_jax import Placement
from eplb_jax.runtime import dispatch
from eplb_jax.runtime import params as expert_params
from eplb_jax.runtime import stats

EXPERT_AXIS = "expert"


@dataclasses.dataclass(frozen=True)
class Config:
  """Model, placement and training sizes (static: hashable, Python numbers)."""

  d_model: int = 32
  d_hidden: int = 64
  num_layers: int = 2
  num_experts: int = 16
  num_slots: int = 24
  top_k: int = 2
  tokens: int = 256
  num_groups: int = 1
  num_nodes: int = 1
  num_devices: int = 8
  window: int = 20
  rebalance_every: int = 50
  router_skew: float = 2.0
  learning_rate: float = 0.05
  seed: int = 0

  def logical(self) -> Config:
    """The same model without replicas or rebalancing: one slot per expert."""
    return dataclasses.replace(self, num_slots=self.num_experts, rebalance_every=0)


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar
  params: dict  # router [L, d, E], head [d, d], experts {w_in [L, P, d, h], w_out [L, P, h, d]}
  placement: Placement
  window: stats.WindowState  # counts [W, L, E]


def make_mesh(cfg: Config) -> Mesh:
  if jax.device_count() < cfg.num_devices:
    raise ValueError(
      f"num_devices ({cfg.num_devices}) exceeds the available devices ({jax.device_count()})"
    )
  return jax.make_mesh(
    (cfg.num_devices,),
    (EXPERT_AXIS,),
    axis_types=(jax.sharding.AxisType.Auto,),
    devices=jax.devices()[: cfg.num_devices],
  )


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


def identity_placement(cfg: Config) -> Placement:
  experts = jnp.arange(cfg.num_experts, dtype=jnp.int32)
  phy2log = jnp.broadcast_to(experts, (cfg.num_layers, cfg.num_experts))
  return Placement(phy2log, phy2log[..., None], jnp.ones_like(phy2log))


def init_state(cfg: Config, mesh: Mesh) -> TrainState:
  """Initial state; the logical experts are laid out by a uniform-load placement."""
  keys = jax.random.split(jax.random.key(cfg.seed), 4)
  L, E, d, h = cfg.num_layers, cfg.num_experts, cfg.d_model, cfg.d_hidden
  logical = {
    "w_in": jax.random.normal(keys[0], (L, E, d, h)) / np.sqrt(d),
    "w_out": jax.random.normal(keys[1], (L, E, h, d)) / np.sqrt(h),
  }
  if cfg.num_slots == cfg.num_experts:
    placement = identity_placement(cfg)
  else:
    placement = eplb_jax.rebalance_experts(
      jnp.ones((L, E)), cfg.num_slots, cfg.num_groups, cfg.num_nodes, cfg.num_devices
    )
  replicated = NamedSharding(mesh, P())
  params = {
    "router": jax.device_put(jax.random.normal(keys[2], (L, d, E)) / np.sqrt(d), replicated),
    "head": jax.device_put(jax.random.normal(keys[3], (d, d)) / np.sqrt(d), replicated),
    "experts": expert_params.apply_placement(logical, placement.phy2log, mesh=mesh),
  }
  window = stats.window_init(cfg.window, (L, E))
  return TrainState(jnp.zeros((), jnp.int32), params, placement, window)


def loss_fn(
  params: dict, placement: Placement, x: jax.Array, y: jax.Array, cfg: Config
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """MSE loss; aux: router ids ``[L, T, k]`` and dispatched slots ``[L, T, k]``."""
  skew = router_skew(cfg)
  rows = jnp.arange(cfg.tokens)[:, None]
  h, all_ids, all_slots = x, [], []
  for layer in range(cfg.num_layers):
    probs = jax.nn.softmax(h @ params["router"][layer] + skew[layer])
    gate, ids = jax.lax.top_k(probs, cfg.top_k)
    gate = gate / gate.sum(-1, keepdims=True)
    slots = dispatch.physical_slots(
      placement.log2phy[layer], placement.logcnt[layer], ids
    )  # [T, k]
    combine = jnp.zeros((cfg.tokens, cfg.num_slots)).at[rows, slots].add(gate)  # [T, P]
    w_in = params["experts"]["w_in"][layer]
    w_out = params["experts"]["w_out"][layer]
    hidden = jax.nn.relu(jnp.einsum("td,sdh->sth", h, w_in))  # [P, T, h], sharded over P
    out = jnp.einsum("sth,shd->std", hidden, w_out)
    h = h + jnp.einsum("ts,std->td", combine, out)
    all_ids.append(ids)
    all_slots.append(slots)
  loss = jnp.mean((h @ params["head"] - y) ** 2)
  return loss, (jnp.stack(all_ids), jnp.stack(all_slots))


def device_imbalance(loads: jax.Array) -> jax.Array:
  """Mean over layers of max / mean device load, for ``loads [L, devices]``."""
  return jnp.mean(loads.max(-1) / jnp.maximum(loads.mean(-1), 1e-9))


def sync_replicas(grads: dict, phy2log: jax.Array, num_experts: int, mesh: Mesh) -> dict:
  """Gives every replica the summed gradient of its logical expert (``[L, P, ...]`` leaves)."""

  def per_expert(g: jax.Array) -> jax.Array:
    return jax.vmap(lambda x, i: jax.ops.segment_sum(x, i, num_experts))(g, phy2log)

  return expert_params.apply_placement(jax.tree.map(per_expert, grads), phy2log, mesh=mesh)


def rebalance(
  state: TrainState, cfg: Config, mesh: Mesh
) -> tuple[TrainState, tuple[jax.Array, jax.Array]]:
  """New placement from the window; returns the state and device imbalance before/after.

  A layer keeps its placement unless the new one lowers its heaviest device
  load on the window (the balancer does not see the current placement).
  """
  load = stats.window_load(state.window)
  old = state.placement
  new = eplb_jax.rebalance_experts(
    load, cfg.num_slots, cfg.num_groups, cfg.num_nodes, cfg.num_devices
  )
  before = old.gpu_loads(load, cfg.num_devices)
  after = new.gpu_loads(load, cfg.num_devices)
  better = after.max(-1) < before.max(-1)  # [L]
  new = jax.tree.map(
    lambda n, o: jnp.where(better.reshape(-1, *[1] * (n.ndim - 1)), n, o), new, old
  )
  after = jnp.where(better[:, None], after, before)
  experts = expert_params.relayout(state.params["experts"], old.log2phy, new.phy2log, mesh=mesh)
  params = {**state.params, "experts": experts}
  state = state._replace(params=params, placement=new)
  return state, (device_imbalance(before), device_imbalance(after))


def train_step(state: TrainState, cfg: Config, mesh: Mesh) -> tuple[TrainState, dict]:
  """One SGD step, then (every ``rebalance_every`` steps) a rebalance, all in one program."""
  x, y = batch(cfg, state.step)
  (loss, (ids, slots)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    state.params, state.placement, x, y, cfg
  )
  grads["experts"] = sync_replicas(grads["experts"], state.placement.phy2log, cfg.num_experts, mesh)
  params = jax.tree.map(lambda p, g: p - cfg.learning_rate * g, state.params, grads)
  slot_load = stats.expert_counts(slots, cfg.num_slots).reshape(cfg.num_layers, cfg.num_devices, -1)
  window = stats.window_update(state.window, stats.expert_counts(ids, cfg.num_experts))
  state = TrainState(state.step + 1, params, state.placement, window)
  out = {"loss": loss, "imbalance": device_imbalance(slot_load.sum(-1).astype(jnp.float32))}
  if cfg.rebalance_every:
    due = state.step % cfg.rebalance_every == 0
    nan = jnp.full((), jnp.nan)
    state, (out["before"], out["after"]) = jax.lax.cond(
      due,
      functools.partial(rebalance, cfg=cfg, mesh=mesh),
      lambda s: (s, (nan, nan)),
      state,
    )
  return state, out


def make_step(cfg: Config, mesh: Mesh):
  """The jitted ``state -> (state, metrics)`` step for ``cfg`` on ``mesh``."""
  return jax.jit(functools.partial(train_step, cfg=cfg, mesh=mesh))


def train(cfg: Config, steps: int, mesh: Mesh) -> dict[str, np.ndarray]:
  """Trains for ``steps`` steps; returns the per-step metrics as ``[steps]`` arrays."""
  step_fn = make_step(cfg, mesh)
  state = init_state(cfg, mesh)
  history = []
  for _ in range(steps):
    state, out = step_fn(state)
    # Waiting for each step keeps consecutive steps from overlapping: on a few
    # CPU cores, XLA:CPU's in-process collectives can deadlock when they do.
    history.append(jax.device_get(out))
  return {k: np.asarray([h[k] for h in history]) for k in history[0]}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--rebalance-every", type=int, default=50)
  parser.add_argument("--window", type=int, default=20, help="steps of load statistics")
  parser.add_argument("--router-skew", type=float, default=2.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--rtol", type=float, default=1e-5, help="loss match tolerance")
  args = parser.parse_args(argv)
  if args.rebalance_every <= 0:
    parser.error("--rebalance-every must be positive")

  cfg = Config(
    window=args.window,
    rebalance_every=args.rebalance_every,
    router_skew=args.router_skew,
    seed=args.seed,
  )
  mesh = make_mesh(cfg)
  print(
    f"{cfg.num_layers} MoE layers, {cfg.num_experts} experts -> {cfg.num_slots} slots "
    f"on {cfg.num_devices} devices, top-{cfg.top_k}, {cfg.tokens} tokens/step"
  )
  run = train(cfg, args.steps, mesh)
  for step in np.flatnonzero(~np.isnan(run["before"])):
    print(
      f"step {step + 1:4d}: rebalance; device load max/mean over the last {cfg.window} steps "
      f"{run['before'][step]:.3f} -> {run['after'][step]:.3f}"
    )
  first = cfg.rebalance_every
  if args.steps > first:
    print(
      f"measured per-step device load max/mean: {run['imbalance'][:first].mean():.3f} "
      f"before the first rebalance, {run['imbalance'][first:].mean():.3f} after"
    )

  baseline = train(cfg.logical(), args.steps, mesh)
  error = np.max(np.abs(run["loss"] - baseline["loss"]) / np.abs(baseline["loss"]))
  print(
    f"loss {run['loss'][0]:.4f} -> {run['loss'][-1]:.4f}; max relative difference to the "
    f"logical model without rebalancing: {error:.2e}"
  )
  np.testing.assert_allclose(run["loss"], baseline["loss"], rtol=args.rtol)
  print("OK: rebalancing left the losses unchanged")


if __name__ == "__main__":
  main()
