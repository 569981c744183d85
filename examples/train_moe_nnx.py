"""The expert-parallel MoE of ``train_moe.py`` as a Flax NNX model, rebalanced inside the step.

The model is an :class:`flax.nnx.Module`: router, head and the per-slot
expert weights are ``nnx.Param``; the placement, the load window and the step
counter are non-trainable variables. Its MoE layers call
:func:`eplb_jax.runtime.moe.moe_layer`, and one ``nnx.jit`` step trains it with
an ``nnx.Optimizer`` (optax Adam), records the router's loads, and every
``rebalance_every`` steps (an ``nnx.cond``) re-plans the placement, then moves
the expert ``Param``s and their Adam moments to their new slots a few layers
per step (:func:`eplb_jax.runtime.params.transition_step`). It starts
from the weights of ``train_moe.py`` and runs the same computation, so its
losses are the pure-JAX example's; the script checks that (as
:func:`train_moe.check_same_model` does). ``--split balanced`` splits each
expert's pairs by the step's quotas, ``--capacity-per device`` bounds each
device's pairs and ``--spare-slots`` fills spare slots every step, as in
``train_moe.py``.

Needs ``pip install "eplb-jax[examples]"`` (flax and optax). Run:
``python examples/train_moe_nnx.py --steps 100 --rebalance-every 50``.
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import train_moe as base
from flax import nnx
from jax.sharding import Mesh

from eplb_jax.runtime import moe
from eplb_jax.runtime import params as expert_params
from eplb_jax.runtime import stats


class Layout(nnx.Variable):
  """The placements: each layer's in service and the one it moves to (not trained)."""


class Counter(nnx.Variable):
  """Load statistics and the step count (not trained)."""


class Experts(nnx.Module):
  """Per-slot expert weights of all layers: ``w_in [L, P, d, h]``, ``w_out [L, P, h, d]``."""

  def __init__(self, w_in: jax.Array, w_out: jax.Array):
    self.w_in = nnx.Param(w_in)
    self.w_out = nnx.Param(w_out)


class MoeModel(nnx.Module):
  """Residual MoE layers and a linear head, expert parallel on ``mesh``."""

  def __init__(self, cfg: base.Config, mesh: Mesh):
    init = base.init_state(cfg, mesh)
    self.cfg = cfg
    self.mesh = mesh
    self.router = nnx.Param(init.params["router"])
    self.head = nnx.Param(init.params["head"])
    self.experts = Experts(**init.params["experts"])
    self.transition = Layout(init.transition)
    self.window = Counter(init.window)
    self.step = Counter(init.step)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, moe.DispatchStats]:
    """``(outputs [T, d], router ids [L, T, k], stacked dispatch stats)``."""
    cfg, placement = self.cfg, self.transition.get_value().service
    skew = base.router_skew(cfg)
    h, all_ids, all_stats = x, [], []
    for layer in range(cfg.num_layers):
      gates, ids = moe.top_k_routing(h @ self.router[layer] + skew[layer], cfg.top_k)
      experts = {"w_in": self.experts.w_in[layer], "w_out": self.experts.w_out[layer]}
      out, layer_stats = moe.moe_layer(
        h,
        gates,
        ids,
        experts,
        moe.expert_mlp,
        placement.log2phy[layer],
        placement.logcnt[layer],
        mesh=self.mesh,
        expert_axis=base.EXPERT_AXIS,
        capacity_factor=cfg.capacity_factor,
        split=cfg.split,
        capacity_per=cfg.capacity_per,
        spare_slots=cfg.spare_slots,
      )
      h = h + out
      all_ids.append(ids)
      all_stats.append(layer_stats)
    return h @ self.head, jnp.stack(all_ids), jax.tree.map(lambda *s: jnp.stack(s), *all_stats)


def rebalance(model: MoeModel, optimizer: nnx.Optimizer) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Re-plans from the window and starts moving to the new placement (:func:`move_layers`)."""
  cfg, old = model.cfg, model.transition.get_value().service
  new, predicted = base.next_placement(model.window.get_value(), old, cfg)
  transition = expert_params.transition_start(old, new)
  unchanged = jnp.where(predicted[2] > 0, 0, cfg.num_layers).astype(jnp.int32)
  model.transition.set_value(transition._replace(next_layer=unchanged))
  return predicted


def move_layers(model: MoeModel, optimizer: nnx.Optimizer) -> None:
  """Moves the expert ``Param``s and their optimizer state of the next layers."""
  weights, opt_state = nnx.state(model.experts), nnx.state(optimizer)
  # Optimizer state as plain nested dicts: its moments then have the
  # structure of the plain expert weights, which transition_step looks for.
  transition, moved, moved_state = expert_params.transition_step(
    model.transition.get_value(),
    nnx.to_pure_dict(weights),
    nnx.to_pure_dict(opt_state),
    layers_per_step=model.cfg.layers_per_step,
    mesh=model.mesh,
  )
  nnx.replace_by_pure_dict(opt_state, moved_state)
  nnx.update(optimizer, opt_state)
  nnx.replace_by_pure_dict(weights, moved)
  nnx.update(model.experts, weights)
  model.transition.set_value(transition)


def stay(model: MoeModel, optimizer: nnx.Optimizer) -> None:
  del model, optimizer


def keep(model: MoeModel, optimizer: nnx.Optimizer) -> tuple[jax.Array, jax.Array, jax.Array]:
  nan = jnp.full((), jnp.nan)
  return nan, nan, nan


@nnx.jit
def train_step(model: MoeModel, optimizer: nnx.Optimizer) -> dict:
  """One Adam step, then (every ``rebalance_every`` steps) a rebalance, in one program."""
  cfg = model.cfg
  x, y = base.batch(cfg, model.step.get_value())

  def loss_fn(model: MoeModel):
    out, ids, dispatched = model(x)
    return jnp.mean((out - y) ** 2), (ids, dispatched)

  (loss, (ids, dispatched)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  service = model.transition.get_value().service
  grads["experts"] = expert_params.sum_replicas(
    grads["experts"], service.phy2log, cfg.num_experts, mesh=model.mesh
  )
  optimizer.update(model, grads)
  counts = stats.expert_counts(ids, cfg.num_experts)
  model.window.set_value(stats.window_update(model.window.get_value(), counts))
  model.step.set_value(model.step.get_value() + 1)
  out = base.step_metrics(loss, dispatched, cfg, ids, service)
  due = model.step.get_value() % cfg.rebalance_every == 0
  out["before"], out["after"], out["layers_rebalanced"] = nnx.cond(
    due, rebalance, keep, model, optimizer
  )
  # The first layers of a new placement move in the step that made it.
  moving = model.transition.get_value().next_layer < cfg.num_layers
  nnx.cond(moving, move_layers, stay, model, optimizer)
  return out


def train(cfg: base.Config, steps: int, mesh: Mesh) -> dict[str, np.ndarray]:
  """Trains the NNX model; returns the per-step metrics as :func:`train_moe.train` does."""
  model = MoeModel(cfg, mesh)
  optimizer = nnx.Optimizer(model, base.optimizer(cfg), wrt=nnx.Param)
  return base.run_steps(lambda s: (s, train_step(*s)), (model, optimizer), steps)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  base.add_arguments(parser, steps=100)
  args = base.parse_arguments(parser, argv)
  cfg = base.Config(
    rebalance_every=args.rebalance_every,
    split=args.split,
    capacity_per=args.capacity_per,
    spare_slots=args.spare_slots,
    layers_per_step=args.layers_per_step,
  )
  mesh = base.make_mesh(cfg)
  run = train(cfg, args.steps, mesh)
  rows = base.periods(run, cfg.rebalance_every)
  print("\n".join(base.table(rows)))
  print("\nEvery split and capacity on the same router choices:")
  print("\n".join(base.split_table(rows, cfg)))
  reference = base.train(cfg, args.steps, mesh)
  # The same computation as the pure-JAX example, checked as that one checks its logical model.
  summary = base.check_same_model(
    run, reference, tight_steps=args.tight_steps, rtol=args.rtol, loose_rtol=args.loose_rtol
  )
  print(f"against the pure-JAX example: {summary}")
  print("OK: the NNX model matches the pure-JAX example")


if __name__ == "__main__":
  main()
