"""Optimizer: AdamW with warmup + (cosine | linear | wsd | constant), global-norm clipping and a
weight-decay mask (no decay on vectors: norms and biases; embeddings optional)."""

from __future__ import annotations

import jax
import optax

from sparsejax.config import Config
from sparsejax.layers import registry


def lr_schedule(cfg: Config) -> optax.Schedule:
  o, steps = cfg.optim, cfg.train.steps
  peak, floor, warm = o.lr, o.lr * o.min_lr_ratio, o.warmup_steps
  # Linear warmup that reaches `peak` at update `warm - 1`; the first update is not wasted.
  warmup = optax.linear_schedule(peak / max(warm, 1), peak, max(warm - 1, 1))
  rest = max(steps - warm, 1)
  if o.schedule == "constant":
    main = optax.constant_schedule(peak)
  elif o.schedule == "cosine":
    main = optax.cosine_decay_schedule(peak, rest, alpha=o.min_lr_ratio)
  elif o.schedule == "linear":
    main = optax.linear_schedule(peak, floor, rest)
  else:  # wsd: warmup, stable at peak, linear decay over the last wsd_decay_fraction of steps
    decay = max(int(round(steps * o.wsd_decay_fraction)), 1)
    stable = max(rest - decay, 0)
    main = optax.join_schedules([optax.constant_schedule(peak),
                                 optax.linear_schedule(peak, floor, decay)], [stable])
  if warm == 0:
    return main
  return optax.join_schedules([warmup, main], [warm])


def decay_mask(params, cfg: Config):
  """True where weight decay applies: matrices (ndim >= 2), embeddings only if configured, never
  norm scales or biases (leaves named ``*scale*`` / ``*bias*``, e.g. the product-key
  ``query_scale_HxK``, whatever their rank)."""
  def leaf_mask(path, x):
    name = jax.tree_util.keystr(path)
    if "embed_VxD" in name and not cfg.optim.decay_embeddings:
      return False
    last = str(getattr(path[-1], "key", path[-1]))
    if "scale" in last or "bias" in last:
      return False
    return x.ndim >= 2
  return jax.tree_util.tree_map_with_path(leaf_mask, params)


BUFFER_PREFIX = "buffer_"  # non-gradient state updated by sown "update__buffer_*" (step.py)


def param_groups(params) -> dict:
  """Label each leaf: "frozen" for buffers (never touched by the optimizer), the name of the
  first family ParamGroup whose prefix the leaf name starts with (e.g. memory value tables,
  ``values_*`` -> "memory_values"), else "default"."""
  groups = registry.param_groups()

  def label(path, _):
    last = path[-1]
    name = str(getattr(last, "key", getattr(last, "name", last)))
    if name.startswith(BUFFER_PREFIX):
      return "frozen"
    return next((g.name for g in groups if name.startswith(g.prefix)), "default")
  return jax.tree_util.tree_map_with_path(label, params)


def _adamw(lr, clip: float, weight_decay: float, mask, cfg: Config):
  o = cfg.optim
  parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
  parts.append(optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=weight_decay,
                           mask=mask))
  return optax.chain(*parts)


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
  """AdamW over all parameters; each family ParamGroup (sparsejax/layers/family.py) gets its own
  AdamW with the family's hyper-parameters (memory values: constant ``memory.value_lr``, own
  clipping and weight decay, as in Memory Layers at Scale); ``buffer_*`` leaves are frozen."""
  o = cfg.optim
  txs = {"default": _adamw(lr_schedule(cfg), o.grad_clip, o.weight_decay,
                           lambda p: decay_mask(p, cfg), cfg)}
  for g in registry.param_groups():
    h = g.hyper(cfg)
    txs[g.name] = _adamw(h["lr"], h["grad_clip"], h["weight_decay"], None, cfg)
  txs["frozen"] = optax.set_to_zero()
  return optax.multi_transform(txs, param_groups)
