"""Weight sparsity as an optax wrapper whose state holds the masks (the design of
google-research/jaxpruner: masks live in the optimizer state, so Orbax saves them with it and a
resume is bitwise; they shard exactly like the parameters, see train/state.py), plus the
pre-forward hook the train step calls.

Per step t (the count of applied updates) and target leaf w (sparsejax/sparsity/targets.py):

  forward   ``forward_params``: N:M -> ``nm_ste(w)`` (mask from the dense w, SR-STE backward);
            every other method -> ``w * mask`` with a straight-through backward, so the gradient
            reaching the optimizer is dense (RigL grows by it);
  update    ``sparsify(inner, cfg).update(grads, state, params)``:
              1. the method's new mask (``_new_masks``: GMP / one-shot pruning by magnitude among
                 the active weights on their steps, RigL / SET / sparse-momentum drop-and-grow on
                 theirs; N:M recomputes its mask from w every step);
              2. the wrapped optimizer's update;
              3. except for N:M (dense weights, masked in the forward), with keep = old & new:
                 updates -> ``where(keep, u, -w)`` so a pruned weight is exactly 0 after the
                 update (and a grown one starts at 0), and every optimizer-state leaf mirroring
                 w (Adam moments) -> ``where(keep, x, 0)`` so momentum and decay cannot revive
                 a pruned weight and a grown weight's moments start at 0;
              4. bookkeeping: pruned weights averaged over the steps (N̄ of "The Journey
                 Matters"), flip rate of the masks at each logged step.

Counts: densities are per target (``distribution`` uniform or ERK over the targets' shapes);
with a ``block`` of r x c, masks are chosen on block scores (sum |w| over the block) and counts
are in blocks. ``metrics(state, params)`` gives what the train step logs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparsejax.config import Config
from sparsejax.sparsity import dst, masks as mk
from sparsejax.sparsity.targets import (Target, at_path, check_targets, find_targets, nested,
                                        parse_block)

DST_METHODS = ("rigl", "set", "momentum")


class SparsityState(NamedTuple):
  inner: Any            # the wrapped optimizer's state
  masks: dict           # bool per target (a sub-tree of the params): the current masks
  last_masks: dict      # the masks at the last logged step (flip rate)
  flip_rate: dict       # float32 per target: fraction of mask bits changed between logged steps
  pruned_mean: dict     # float32 per target: pruned weights averaged over the steps so far
  momentum: dict        # float32 gradient EMA per target (method "momentum"), else {}
  count: jax.Array      # int32: updates applied (the step of the next update)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything static about a config's sparsity over one model's targets."""
  cfg: Config
  targets: tuple[Target, ...]
  block: tuple[int, int]
  final_nnz: tuple[int, ...]      # per target, in mask units (blocks when block != 1x1)
  units: tuple[int, ...]          # mask units per target
  t0: int
  t1: int
  dense_start: int                # N:M: first dense step (train.steps when never)

  @property
  def method(self) -> str:
    return self.cfg.sparsity.method

  @property
  def prunes(self) -> bool:
    """False when no weight can ever be pruned (GMP / one-shot at sparsity 0): the masks stay
    all-ones and the hooks are left out, so the run is the dense run bitwise (XLA fuses the
    identity selects differently otherwise, which moves float32 results by an ulp)."""
    return not (self.method in ("gmp", "oneshot") and self.cfg.sparsity.sparsity <= 0)

  def view(self, t: Target, x):
    """Scores (or a 0/1 mask) at mask resolution: block sums, or x itself for 1x1."""
    return x if self.block == (1, 1) else mk.block_scores(x, self.block, t.axis)

  def view_mask(self, t: Target, mask):
    return mask if self.block == (1, 1) else mk.reduce_blocks(mask, self.block, t.axis)

  def expand(self, t: Target, mask_view):
    return mask_view if self.block == (1, 1) else mk.expand_blocks(mask_view, self.block,
                                                                   t.axis, t.shape)


def make_plan(cfg: Config, params) -> Plan:
  s, steps = cfg.sparsity, cfg.train.steps
  targets = tuple(find_targets(cfg, params))
  check_targets(cfg, targets)
  block = (1, 1) if s.method == "nm" else parse_block(s.block)
  units = tuple(t.size // (block[0] * block[1]) for t in targets)
  dens = mk.layer_densities({t.name: t.shape for t in targets}, s.sparsity, s.distribution)
  final = tuple(mk.nnz_target(dens[t.name], u) for t, u in zip(targets, units))
  t0 = int(round(s.start_fraction * steps))
  t1 = t0 if s.method == "oneshot" else int(round(s.end_fraction * steps))
  dense_start = steps - int(round(s.dense_fraction * steps)) if s.method == "nm" else steps
  return Plan(cfg, targets, block, final, units, t0, t1, dense_start)


# ---- sub-trees of the params holding one value per target ----
def subtree(targets, values) -> dict:
  """A nested dict with the targets' paths holding ``values`` (same order)."""
  return nested([t.path for t in targets], values)


def leaves(tree, targets) -> list:
  return [at_path(tree, t.path) for t in targets]


def replace_targets(params, targets, new) -> dict:
  by_path = {t.path: v for t, v in zip(targets, new)}

  def pick(path, x):
    return by_path.get(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path), x)
  return jax.tree_util.tree_map_with_path(pick, params)


def dense_phase(plan: Plan, step):
  """N:M: whether ``step`` is in the final dense phase (``dense_fraction``)."""
  return jnp.asarray(step) >= plan.dense_start


# ---- masks ----
def _key(plan: Plan, step, i: int):
  base = jax.random.fold_in(jax.random.key(plan.cfg.train.seed), 0x5ba25e)
  return jax.random.fold_in(jax.random.fold_in(base, step + 1), i)  # initial masks: step -1


def _initial_masks(plan: Plan, ws) -> list:
  s = plan.cfg.sparsity
  out = []
  for i, (t, w) in enumerate(zip(plan.targets, ws)):
    if plan.method == "nm":
      out.append(mk.nm_mask(w, s.n, s.m, t.axis))
    elif plan.method in ("random", *DST_METHODS):
      shape = jnp.shape(plan.view(t, w))
      out.append(plan.expand(t, mk.random_mask(_key(plan, -1, i), shape, plan.final_nnz[i])))
    else:
      out.append(jnp.ones(t.shape, bool))
  return out


def _nnz_at(plan: Plan, step, i: int):
  """GMP / one-shot: mask units kept after the update at ``step`` (traced)."""
  s = plan.cfg.sparsity
  units, final = plan.units[i], plan.final_nnz[i]
  s_t = mk.gmp_sparsity(step, s.sparsity, plan.t0, plan.t1, max(s.update_every, 1))
  if s.distribution == "uniform" or s.sparsity <= 0:
    keep = 1.0 - s_t
  else:  # this layer's own final sparsity, scaled by the schedule's progress
    keep = 1.0 - s_t * ((units - final) / units / s.sparsity)
  return jnp.round(keep * units).astype(jnp.int32)


def _is_update(plan: Plan, step):
  s = plan.cfg.sparsity
  every = max(s.update_every, 1)
  if plan.method == "gmp":
    on_grid = ((step - plan.t0) % every == 0) | (step == plan.t1)  # s_f is reached at t1
    return (step >= plan.t0) & (step <= plan.t1) & on_grid
  if plan.method == "oneshot":
    return step == plan.t0
  if plan.method in DST_METHODS:
    return (step > 0) & (step % every == 0) & (step < plan.t1)
  return jnp.asarray(False)


def _prune(plan: Plan, step, ws, old):
  out = []
  for i, (t, w, m) in enumerate(zip(plan.targets, ws, old)):
    chosen = mk.select(plan.view(t, jnp.abs(w)), _nnz_at(plan, step, i), plan.view_mask(t, m))
    out.append(plan.expand(t, chosen))
  return out


def _drop_grow(plan: Plan, step, ws, grads, old, mom):
  s = plan.cfg.sparsity
  frac = mk.cosine_drop_fraction(step, s.drop_fraction, plan.t1)
  views = [plan.view_mask(t, m) for t, m in zip(plan.targets, old)]
  active = [jnp.sum(v, dtype=jnp.int32) for v in views]
  n_drop = [jnp.round(frac * a).astype(jnp.int32) for a in active]
  out = []
  if plan.method == "momentum":
    mean = jnp.stack([jnp.sum(jnp.where(m, jnp.abs(g), 0.0)) / jnp.maximum(jnp.sum(m), 1)
                      for m, g in zip(old, mom)])
    cap = jnp.stack([u - a for u, a in zip(plan.units, active)])
    grow = dst.momentum_budgets(mean, jnp.stack(n_drop), cap)
  for i, (t, w, v) in enumerate(zip(plan.targets, ws, views)):
    wv = plan.view(t, w)
    if plan.method == "rigl":
      new = dst.rigl_update(wv, plan.view(t, grads[i]), v, n_drop[i])
    elif plan.method == "set":
      new = dst.set_update(_key(plan, step, i), wv, v, n_drop[i])
    else:
      new = dst.momentum_update(wv, plan.view(t, mom[i]), v, n_drop[i], grow[i])
    out.append(plan.expand(t, new))
  return out


def _new_masks(plan: Plan, step, ws, grads, old, mom):
  s = plan.cfg.sparsity
  if plan.method == "nm":
    masks = [mk.nm_mask(w, s.n, s.m, t.axis) for t, w in zip(plan.targets, ws)]
    if plan.dense_start < plan.cfg.train.steps:
      dense = dense_phase(plan, step)
      masks = [m | dense for m in masks]
    return masks
  if plan.method in ("gmp", "oneshot"):
    fn = lambda: _prune(plan, step, ws, old)
  elif plan.method in DST_METHODS:
    fn = lambda: _drop_grow(plan, step, ws, grads, old, mom)
  else:
    return list(old)
  return jax.lax.cond(_is_update(plan, step), fn, lambda: list(old))


def _mask_mirrors(tree, plan: Plan, keep: list):
  """Zero every leaf of ``tree`` (an optimizer state) that mirrors a target (its path ends with
  the target's path, same shape) where ``keep`` is False."""
  by_key = {jax.tree_util.keystr(tuple(jax.tree_util.DictKey(k) for k in t.path)): (t.shape, k)
            for t, k in zip(plan.targets, keep)}

  def fix(path, x):
    name = jax.tree_util.keystr(path)
    for key, (shape, k) in by_key.items():
      if name.endswith(key) and tuple(jnp.shape(x)) == shape:
        return jnp.where(k, x, jnp.zeros_like(x))
    return x
  return jax.tree_util.tree_map_with_path(fix, tree)


def sparsify(inner: optax.GradientTransformation, cfg: Config) -> optax.GradientTransformation:
  """``inner`` with config.sparsity's masks (see the module docstring)."""
  s = cfg.sparsity
  log_every = max(cfg.train.log_every_steps, 1)

  def init(params):
    plan = make_plan(cfg, params)
    ms = _initial_masks(plan, leaves(params, plan.targets))
    zeros = [jnp.zeros((), jnp.float32) for _ in plan.targets]
    mom = (subtree(plan.targets, [jnp.zeros(t.shape, jnp.float32) for t in plan.targets])
           if s.method == "momentum" else {})
    return SparsityState(inner.init(params), subtree(plan.targets, ms),
                         subtree(plan.targets, ms), subtree(plan.targets, zeros),
                         subtree(plan.targets, zeros), mom, jnp.zeros((), jnp.int32))

  def update(grads, state: SparsityState, params=None):
    if params is None:
      raise ValueError("config.sparsity needs the params in optimizer.update(grads, state, params)")
    plan = make_plan(cfg, params)
    step, tg = state.count, plan.targets
    ws, gs, old = leaves(params, tg), leaves(grads, tg), leaves(state.masks, tg)
    mom = leaves(state.momentum, tg) if s.method == "momentum" else []
    if mom:
      mom = [s.momentum_beta * m + (1 - s.momentum_beta) * g.astype(jnp.float32)
             for m, g in zip(mom, gs)]
    forward = _new_masks(plan, step, ws, gs, old, mom) if s.method == "nm" else old
    new = forward if s.method == "nm" else _new_masks(plan, step, ws, gs, old, mom)
    updates, inner_state = inner.update(grads, state.inner, params)
    if s.method != "nm" and plan.prunes:
      keep = [o & n for o, n in zip(old, new)]
      us = leaves(updates, tg)
      updates = replace_targets(updates, tg, [jnp.where(k, u, -w.astype(u.dtype))
                                              for k, u, w in zip(keep, us, ws)])
      inner_state = _mask_mirrors(inner_state, plan, keep)
    pruned = [jnp.asarray(t.size, jnp.float32) - jnp.sum(m, dtype=jnp.float32)
              for t, m in zip(tg, forward)]
    n = (step + 1).astype(jnp.float32)
    means = [m + (p - m) / n for m, p in zip(leaves(state.pruned_mean, tg), pruned)]
    logged = ((step + 1) % log_every == 0) | (step + 1 == cfg.train.steps)
    last, flips = leaves(state.last_masks, tg), leaves(state.flip_rate, tg)
    # at logged steps only: the flip rate since the previous log, and the masks to compare next
    flips, last = jax.lax.cond(
        logged, lambda: ([mk.flip_fraction(a, b) for a, b in zip(last, new)], list(new)),
        lambda: (flips, last))
    return updates, SparsityState(
        inner_state, subtree(tg, new), subtree(tg, last), subtree(tg, flips),
        subtree(tg, means), subtree(tg, mom) if mom else {}, step + 1)

  return optax.GradientTransformation(init, update)


def nm_decay_after_clip(cfg: Config) -> optax.GradientTransformation:
  """The 2:4-pretraining variant's masked decay: ``g + nm_lambda * (1 - M(w)) * w`` on the
  clipped gradients (M from the dense w, as in the forward); off in the dense phase."""
  s = cfg.sparsity

  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros((), jnp.int32))

  def update(grads, state, params=None):
    plan = make_plan(cfg, params)
    dense = dense_phase(plan, state.count)
    gs, ws = leaves(grads, plan.targets), leaves(params, plan.targets)
    new = [g + jnp.where(dense, 0.0, s.nm_lambda) * (~mk.nm_mask(w, s.n, s.m, t.axis)).astype(
        g.dtype) * w.astype(g.dtype) for t, g, w in zip(plan.targets, gs, ws)]
    return (replace_targets(grads, plan.targets, new),
            optax.ScaleByScheduleState(count=state.count + 1))

  return optax.GradientTransformation(init, update)


def find_state(opt_state) -> SparsityState | None:
  """The SparsityState in an optimizer state (the outermost wrapper), if any."""
  return opt_state if isinstance(opt_state, SparsityState) else None
