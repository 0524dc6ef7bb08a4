"""The hooks around the optimizer wrapper (sparsejax/sparsity/transform.py): what the forward
pass sees during training (``forward_params``: N:M through SR-STE, other methods ``w * mask``
with a straight-through gradient), the weights to evaluate or export (``inference_params``),
a fresh state's masked parameters, and the metrics the train step logs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sparsejax.config import Config
from sparsejax.sparsity import masks as mk
from sparsejax.sparsity.transform import (Plan, SparsityState, dense_phase, find_state, leaves,
                                          make_plan, replace_targets)


@jax.custom_vjp
def ste_mask(w, mask):
  """``w * mask`` forward; the gradient passes to every entry of w (straight through)."""
  return w * mask.astype(w.dtype)


ste_mask.defvjp(lambda w, mask: (w * mask.astype(w.dtype), mask),
                lambda mask, g: (g, jnp.zeros(mask.shape, jax.dtypes.float0)))


def forward_params(plan: Plan, params, state: SparsityState) -> dict:
  """The parameters the forward pass sees (the train step differentiates through this)."""
  s = plan.cfg.sparsity
  ws = leaves(params, plan.targets)
  if plan.method == "nm":
    lam = s.nm_lambda if s.nm_decay == "backward" else 0.0
    sparse = [mk.nm_ste(w, s.n, s.m, t.axis, lam) for t, w in zip(plan.targets, ws)]
    if plan.dense_start < plan.cfg.train.steps:
      dense = dense_phase(plan, state.count)
      sparse = [jnp.where(dense, w, v) for w, v in zip(ws, sparse)]
    return replace_targets(params, plan.targets, sparse)
  if not plan.prunes:
    return params
  ms = leaves(state.masks, plan.targets)
  return replace_targets(params, plan.targets, [ste_mask(w, m) for w, m in zip(ws, ms)])


def effective_params(plan: Plan, params, step=None) -> dict:
  """The weights the model computes with, outside training (eval, export, the ``sparsejax
  sparsity`` command): N:M applies its mask (dense from ``dense_start`` on; ``step`` may be
  traced, None: the sparse phase); other methods store pruned weights as exact zeros already."""
  if plan.method != "nm":
    return params
  s = plan.cfg.sparsity
  ws = leaves(params, plan.targets)
  out = [w * mk.nm_mask(w, s.n, s.m, t.axis).astype(w.dtype) for t, w in zip(plan.targets, ws)]
  if step is not None and plan.dense_start < plan.cfg.train.steps:
    out = [jnp.where(dense_phase(plan, step), w, v) for w, v in zip(ws, out)]
  return replace_targets(params, plan.targets, out)


def masked_params(plan: Plan, params, state: SparsityState) -> dict:
  """Params with the state's masks applied (a fresh state's random / DST masks)."""
  if plan.method == "nm":
    return params
  ws, ms = leaves(params, plan.targets), leaves(state.masks, plan.targets)
  return replace_targets(params, plan.targets, [jnp.where(m, w, jnp.zeros_like(w))
                                                for w, m in zip(ws, ms)])


def metrics(plan: Plan, state: SparsityState, params) -> dict[str, jax.Array]:
  """Per target density / flip rate / pruned-mean, and the totals (``sparsity/...``)."""
  tg = plan.targets
  nnz = [jnp.sum(m, dtype=jnp.float32) for m in leaves(state.masks, tg)]
  total = sum(t.size for t in tg)
  storage = sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(params))
  out = {"sparsity/params_nonzero": storage - (total - sum(nnz)),
         "sparsity/weight_sparsity": 1.0 - sum(nnz) / total,
         "sparsity/pruned_mean": sum(leaves(state.pruned_mean, tg))}
  for t, k, f, p in zip(tg, nnz, leaves(state.flip_rate, tg), leaves(state.pruned_mean, tg)):
    out[f"sparsity/density/{t.name}"] = k / t.size
    out[f"sparsity/flip_rate/{t.name}"] = f
    out[f"sparsity/pruned_mean/{t.name}"] = p
  return out


def jitted_inference_params(cfg: Config, shardings):
  """``inference_params`` jitted onto the parameters' shardings, compiled once: (params,
  opt_state, step) -> params (the identity without weight sparsity)."""
  if cfg.sparsity.method == "none":
    return lambda params, opt_state, step: params

  def run(params, opt_state, step):
    return inference_params(cfg, params, opt_state, step)
  return jax.jit(run, out_shardings=shardings)


def inference_params(cfg: Config, params, opt_state, step=None) -> dict:
  """The weights to evaluate or export a train state with: unchanged without weight sparsity;
  N:M masked by ``effective_params``; other methods with the state's masks applied."""
  sparse = find_state(opt_state)
  if sparse is None:
    return params
  plan = make_plan(cfg, params)
  if plan.method == "nm":
    return effective_params(plan, params, step)
  return masked_params(plan, params, sparse)
