"""Optimizer: AdamW with warmup + (cosine | linear | wsd | constant), global-norm clipping and a
weight-decay mask (no decay on vectors: norms and biases; embeddings optional), split into the
layer families' parameter groups (sparsejax/layers/family.py ``ParamGroup``): each group runs
its own AdamW on the main schedule's shape scaled to its own peak (or a constant lr), with its
own weight decay and, optionally, its own clipping."""

from __future__ import annotations

import functools

import jax
import optax

from sparsejax.config import Config
from sparsejax.finetune import hooks as finetune
from sparsejax.layers import registry
from sparsejax.sparsity import transform as sparsity


def lr_schedule(cfg: Config, peak: float | None = None) -> optax.Schedule:
  """The main schedule (peak ``optim.lr``); ``peak``: the same warmup and decay shape scaled to
  that peak (parameter groups)."""
  o, steps = cfg.optim, cfg.train.steps
  peak = o.lr if peak is None else peak
  floor, warm = peak * o.min_lr_ratio, o.warmup_steps
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


def _stacked(path) -> int:
  """1 for a leaf of scanned layers' stacked storage (``scan/<start>/<j>/...``, [R, ...])."""
  return int(len(path) > 3 and _key_name(path[0]) == "scan")


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
    return x.ndim - _stacked(path) >= 2  # a layer's own rank, also when scanned (stacked)
  return jax.tree_util.tree_map_with_path(leaf_mask, params)


BUFFER_PREFIX = "buffer_"  # non-gradient state updated by sown "update__buffer_*" (step.py)


def _key_name(k) -> str:
  return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def param_groups(params, cfg: Config | None = None) -> dict:
  """Label each leaf: "frozen" for buffers (never touched by the optimizer); else the first
  family ParamGroup whose prefix the leaf name starts with (e.g. memory value tables,
  ``values_*`` -> "memory_values"); else "default".

  With ``cfg``, a leaf under ``blocks/<i>/`` (or stacked under ``scan/<start>/<j>/``: layer
  start + j, whose repeats have the same families) is matched only against the groups of layer
  i's attention and FFN families, so families that name leaves alike (memory's and PEER's
  ``w_query_DxHxK``) keep their own groups; without ``cfg`` (and outside ``blocks``) every
  registered family's groups are tried in registry order."""
  everyone = registry.param_groups()
  per_layer = None if cfg is None else [
      [g for f in pair for g in f.param_groups] for pair in registry.layer_families(cfg)]

  def label(path, _):
    name = _key_name(path[-1])
    if name.startswith(BUFFER_PREFIX):
      return "frozen"
    groups = everyone
    if per_layer is not None and len(path) > 2 and _key_name(path[0]) == "blocks":
      groups = per_layer[int(_key_name(path[1]))]
    elif per_layer is not None and _stacked(path):  # scan/<start>/<j>: layer start + j's groups
      groups = per_layer[int(_key_name(path[1])) + int(_key_name(path[2]))]
    return next((g.name for g in groups if name.startswith(g.prefix)), "default")
  return jax.tree_util.tree_map_with_path(label, params)


def group_hypers(cfg: Config) -> dict[str, dict]:
  """Every optimizer group's resolved hyper-parameters: ``{"lr": schedule, "weight_decay":
  float, "grad_clip": float | None}`` ("default" and every registered family's groups; None
  clip: one global norm together with the default group)."""
  o = cfg.optim
  out = {"default": {"lr": lr_schedule(cfg), "weight_decay": o.weight_decay, "grad_clip": None}}
  for g in registry.param_groups():
    h = g.hyper(cfg)
    given = [k for k in ("lr", "lr_mult", "peak_lr") if k in h]
    if len(given) != 1:
      raise ValueError(f"parameter group {g.name!r}: hyper() must give exactly one of lr, "
                       f"lr_mult, peak_lr; got {sorted(h)}")
    if "lr" in h:
      lr = h["lr"]
    else:
      lr = lr_schedule(cfg, h["peak_lr"] if "peak_lr" in h else h["lr_mult"] * o.lr)
    out[g.name] = {"lr": lr, "weight_decay": h.get("weight_decay", o.weight_decay),
                   "grad_clip": h.get("grad_clip")}
  return out


def _adamw(lr, clip: float | None, weight_decay: float, mask, cfg: Config):
  o = cfg.optim
  parts = [optax.clip_by_global_norm(clip)] if clip else []
  parts.append(optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=weight_decay,
                           mask=mask))
  return optax.chain(*parts)


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
  """AdamW over all parameters, one per group (``group_hypers``): "default", each family
  ParamGroup (memory values: ``memory.value_lr`` constant or as the peak of the main
  schedule, own clip and weight decay; product keys / query projections / PEER experts:
  multiples of the main schedule), "frozen" for ``buffer_*`` leaves. The decay mask holds in
  every group. ``optim.grad_clip`` clips one global norm over the default group and every
  group without a clip of its own, before the groups' updates. ``config.finetune.mode``
  (sparsejax/finetune/hooks.py): "lora" trains only adapters held in the optimizer state;
  memory modes freeze every leaf but the value tables."""
  o = cfg.optim
  hypers = group_hypers(cfg)
  mask = functools.partial(decay_mask, cfg=cfg)
  if cfg.finetune.mode == "lora":  # adapters only, on the default group's settings
    return finetune.lora_optimizer(cfg, _adamw(hypers["default"]["lr"], o.grad_clip or None,
                                               o.weight_decay, mask, cfg))
  txs = {name: _adamw(h["lr"], h["grad_clip"], h["weight_decay"], mask, cfg)
         for name, h in hypers.items()}
  txs["frozen"] = optax.set_to_zero()
  # memory finetune modes: every leaf but the value tables "frozen"
  labels = finetune.trainable_labels(cfg, functools.partial(param_groups, cfg=cfg))
  tx = optax.multi_transform(txs, labels)
  s = cfg.sparsity
  if s.method == "nm" and s.nm_decay == "after_clip":  # on the clipped gradients
    tx = optax.chain(sparsity.nm_decay_after_clip(cfg), tx)
  if o.grad_clip > 0:
    joint = {name for name, h in hypers.items() if h["grad_clip"] is None}
    clip = optax.multi_transform(
        {"joint": optax.clip_by_global_norm(o.grad_clip), "own": optax.identity()},
        lambda p: jax.tree.map(lambda g: "joint" if g in joint else "own", labels(p)))
    tx = optax.chain(clip, tx)
  tx = finetune.wrap_optimizer(cfg, tx)  # sparse_memory: TF-IDF row selection
  # outermost: sees the raw gradients (RigL grows by them), holds the masks
  return tx if s.method == "none" else sparsity.sparsify(tx, cfg)
