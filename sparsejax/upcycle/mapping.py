r"""Sparse upcycling (Komatsuzaki et al. 2023): a dense checkpoint's parameters -> an MoE model's.

Every parameter outside the FFN layers (embeddings, head, attention, the norms) is copied; a
target FFN layer of the source's type is copied unchanged; a dense FFN layer that the target
makes MoE gets routed experts built from that layer's SwiGLU (W_gate D x F, W_up D x F,
W_down F x D), a fresh router and fresh shared experts.

Chunks. A SwiGLU is a sum over its hidden units, so cutting F into C chunks of f = F / C units,
chunk_c(x) = (act(x W_gate[:, c]) * (x W_up[:, c])) W_down[c, :], gives dense(x) = sum_c
chunk_c(x) exactly. The layer's E' routed experts (E' = num_experts x granularity, width f, k'
picked per token; ``moe.sizes``) are laid out as whole copies of the chunk sequence: expert j
is chunk (j mod C), E' / C copies, so base expert e (experts e*C .. e*C + C - 1 at granularity
C) is the whole dense FFN. ``--mode copy``: C = 1, every expert is the dense FFN (the paper's
upcycling; f must equal F). ``--mode granular``: C = F / f (= G with ``moe.granularity`` G and
no ``d_expert``), fine-grained experts (Krajewski et al. 2024) cut from the dense FFN.

Scaling. Every routed expert's W_down is multiplied by s, chosen so that the MoE output equals
dense(x) when a zero router (``--router_init zero``: logits 0) gives every expert the same score:
top-k then keeps experts 0 .. k'-1 (``lax.top_k`` picks the lower index on ties), which hold each
chunk k' / C times (C must divide k'), each with the same gate g: softmax 1 / E', sigmoid 1 / 2,
renormalised 1 / k'. The output is s * g * (k' / C) * dense(x), so

    s = C / (g * k')      (renormalised gates: s = C; copy mode with renormalisation: s = 1).

When exact. Copy mode with renormalised token-choice gates is exact for ANY router: the k'
selected experts are the same function and their gates sum to 1, so the router starts random
(``--router_init auto`` = normal) and training breaks the symmetry through which tokens each
expert receives. Every other token-choice combination (granular, or gates not renormalised) is
exact only at the zero router (``auto`` = zero), in evaluation: a noisy router's training noise
reorders the tied experts. Hash routing (no router) is exact for any table when C equals
``num_hashes`` (MultiHash sends each token to one segment j of some expert, j = 0 .. h - 1: one
of each chunk, gate 1, s = 1). Not exact, refused unless ``allow_inexact``: expert-choice routing
(a token gets 0 .. E' experts, depending on the other tokens), capacity dispatch whose capacity is
below the sequence length (a zero router sends every token to the same k' experts; overflow is
dropped), ``router_init normal`` where a zero router is needed, and a chunk count that does not
divide k'. Noise (``--noise r``: each expert's weights plus r * RMS(dense weight) * N(0, 1),
independent per expert, seeded) is inexact by design.

Shared experts (``moe.num_shared_experts``) are always on: they keep their fresh W_gate / W_up
and get W_down = 0, so they add exactly 0 at step 0 (any width) and learn from the first step,
as W_down's gradient h^T dy is not zero. Other new parameters (a noisy router's W_noise, the
aux-loss-free selection bias) keep their own initialisation (zeros)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.config import Config
from sparsejax.errors import ConfigError
from sparsejax.layers import moe
from sparsejax.layers.moe_dispatch import capacity
from sparsejax.models.transformer import build_model

MODES = ("copy", "granular")
ROUTER_INITS = ("auto", "zero", "normal")
# Non-shaping fields that change what a copied layer computes; they must match too.
_FUNCTIONAL = (("model", "norm_eps"), ("attention", "rope_theta"), ("attention", "mask"),
               ("ffn", "activation"), ("ffn", "activation_topk"))
_DENSE = ("w_gate_DxF", "w_up_DxF", "w_down_FxD")
_EXPERTS = ("w_gate_ExDxF", "w_up_ExDxF", "w_down_ExFxD")


@dataclasses.dataclass(frozen=True)
class Options:
  """How dense FFNs become experts (see the module docstring)."""
  mode: str = "copy"             # copy | granular
  noise: float = 0.0             # relative to each dense weight's RMS; 0 = exact copies
  router_init: str = "auto"      # auto | zero | normal
  seed: int = 0                  # the noise draw
  allow_inexact: bool = False    # upcycle although the MoE will not compute the dense function


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """What happens to one layer's FFN parameters."""
  layer: int
  action: str                    # "copy" (same FFN type as the source) | "upcycle" (dense -> MoE)
  chunks: int = 1                # C: dense hidden units cut into C chunks of the expert width
  scale: float = 1.0             # s: multiplies every routed expert's W_down
  zero_router: bool = False
  exact: str = ""                # when the layer equals the dense one at step 0, or why not


def check_compatible(src: Config, src_vocab: int, cfg: Config, vocab: int) -> None:
  """One ConfigError naming the first model / attention field (every parameter-shaping one and
  the few that change a copied layer's function) or vocabulary that differs."""
  for section, key in [(s, f.name) for s in ("model", "attention")
                       for f in dataclasses.fields(getattr(cfg, s))
                       if f.metadata.get("shapes")] + list(_FUNCTIONAL):
    old, new = getattr(getattr(src, section), key), getattr(getattr(cfg, section), key)
    if old != new:
      raise ConfigError(f"config.{section}.{key}: {old!r} in the source run, {new!r} in the "
                        f"target; upcycling copies every layer outside the FFNs, so set "
                        f"--config.{section}.{key} to the source's value")
  if src_vocab != vocab or src.padded_vocab(src_vocab) != cfg.padded_vocab(vocab):
    raise ConfigError(f"vocabulary: the source run's dataset has {src_vocab} tokens, the "
                      f"target's {vocab}; use the source's config.data (path / tokenizer)")


def plan(src: Config, cfg: Config, options: Options) -> tuple[LayerPlan, ...]:
  """A LayerPlan per layer, or one ConfigError: a layer type that cannot be mapped, or (unless
  ``options.allow_inexact``) the first reason the MoE would not equal the dense model."""
  if options.mode not in MODES or options.router_init not in ROUTER_INITS:
    raise ConfigError(f"--mode must be one of {MODES} and --router_init one of {ROUTER_INITS}, "
                      f"got {options.mode!r} / {options.router_init!r}")
  if options.noise < 0:
    raise ConfigError(f"--noise must be >= 0 (relative to each weight's RMS), got {options.noise}")
  out = []
  for i, ((_, old), (_, new)) in enumerate(zip(src.layer_types(), cfg.layer_types())):
    if old == new:
      if old == "dense" and src.d_ff != cfg.d_ff:
        raise ConfigError(f"config.ffn.d_ff: {src.d_ff} in the source run, {cfg.d_ff} in the "
                          f"target; dense layer {i} is copied unchanged, so keep d_ff (set "
                          "config.moe.d_expert for other expert widths)")
      out.append(LayerPlan(i, "copy", exact="copied"))
    elif old == "dense" and new == "moe":
      out.append(LayerPlan(i, "upcycle", *_moe_rule(cfg, src.d_ff, options)))
    else:
      raise ConfigError(f"layer {i}: the source's FFN is {old!r} and the target's {new!r}; "
                        "upcycling turns dense FFNs into 'moe' and copies layers of the same "
                        "type (set config.ffn.type / pattern / first_k_dense accordingly)")
  if not any(p.action == "upcycle" for p in out):
    raise ConfigError("the target config has no MoE layer where the source is dense: nothing to "
                      "upcycle (--config.train.init_from starts a run of the same shape)")
  return tuple(out)


def _moe_rule(cfg: Config, d_ff: int, options: Options) -> tuple[int, float, bool, str]:
  """(chunks C, scale s, zero router, exactness) of an upcycled layer, see the docstring."""
  m = cfg.moe
  e, k, f = moe.sizes(cfg)
  if options.mode == "copy" and f != d_ff:
    raise ConfigError(f"--mode copy: the target's experts are {f} wide but the source's dense "
                      f"FFN has d_ff={d_ff}; use --mode granular to cut it into experts of width "
                      f"{f}, or make the widths equal (config.moe.d_expert, granularity)")
  if d_ff % f:
    raise ConfigError(f"--mode granular: the source's d_ff={d_ff} is not a multiple of the "
                      f"target's expert width {f} (config.moe.d_expert or d_ff / granularity)")
  c = 1 if options.mode == "copy" else d_ff // f
  if e % c:
    raise ConfigError(f"--mode granular: the {e} routed experts cannot be whole copies of the "
                      f"dense FFN's {c} chunks; make num_experts x granularity a multiple of {c}")
  why = []
  if m.router == "hash":
    if c != m.num_hashes:
      why.append(f"router='hash' with num_hashes={m.num_hashes} sums one segment of each of "
                 f"{m.num_hashes} experts, but the dense FFN is cut into {c} chunk(s): use "
                 f"--mode granular with experts {d_ff // m.num_hashes} wide")
    zero, scale, exact = False, 1.0, "exact for any hash table"
  else:
    any_router = m.router != "expert_choice" and m.renormalize and c == 1
    zero = options.router_init == "zero" or (options.router_init == "auto" and not any_router)
    gate = (1.0 / k if m.renormalize or m.router == "expert_choice" else
            1.0 / e if m.score_fn == "softmax" else 0.5)
    scale = c / (gate * k)
    exact = ("exact for any router" if any_router else
             "exact with the zero router (evaluation)" if m.router == "noisy_token_choice" else
             "exact with the zero router")
    if m.router == "expert_choice":
      why.append("router='expert_choice' gives a token 0 to E experts depending on the other "
                 "tokens, so no expert initialisation reproduces the dense FFN; use token_choice")
    elif not any_router and not zero:
      why.append(f"--router_init normal: this MoE ({options.mode} mode, renormalize="
                 f"{m.renormalize}) equals the dense FFN only with a zero router; use "
                 "--router_init zero (or auto)")
    elif not any_router and k % c:
      why.append(f"top-k {k} (top_k x granularity) is not a multiple of the {c} chunks: the "
                 "zero router's first k experts must hold every chunk equally often")
  if m.router != "expert_choice" and m.dispatch == "capacity":
    slots, t = capacity(m.capacity_factor, cfg.data.seq_len, k, e), cfg.data.seq_len
    if slots < t:
      why.append(f"config.moe.dispatch='capacity': {slots} slots per expert for a sequence of "
                 f"{t} drop tokens the dense FFN would process; set config.moe.dispatch=dropless "
                 f"or capacity_factor >= {e / k:g} (E / k)")
  if why and not options.allow_inexact:
    raise ConfigError(f"{why[0]}; or pass --allow_inexact to upcycle anyway")
  if why:
    exact = "inexact: " + why[0]
  elif options.noise:
    exact += f", up to the noise {options.noise:g}"
  return c, scale, zero, exact


def _experts(w, chunks: int, copies: int, axis: int):
  """Dense W (the hidden axis at ``axis``) -> E' stacked experts, expert j = chunk j mod C."""
  parts = jnp.stack(jnp.split(w, chunks, axis=axis))
  return jnp.tile(parts, (copies,) + (1,) * w.ndim)


def _rms(w):
  return jnp.sqrt(jnp.mean(jnp.square(w.astype(jnp.float32))))


def build_params(src: dict, cfg: Config, vocab_size: int, plans: tuple[LayerPlan, ...],
                 options: Options) -> dict:
  """The target's parameters (a pure dict, traceable): fresh ones from the target's own
  initialisation (seed ``config.train.seed``) with everything the plans map overwritten."""
  fresh = nnx.to_pure_dict(nnx.split(build_model(cfg, vocab_size, seed=cfg.train.seed))[1])
  out = jax.tree.map(lambda x: x, fresh)
  for key in fresh:
    if key != "blocks":
      out[key] = _copied(src[key], fresh[key], key)
  for p in plans:
    s_blk, t_blk = src["blocks"][p.layer], fresh["blocks"][p.layer]
    for name in t_blk:
      if name != "ffn" or p.action == "copy":
        out["blocks"][p.layer][name] = _copied(s_blk[name], t_blk[name], f"blocks/{p.layer}/{name}")
    if p.action == "upcycle":
      out["blocks"][p.layer]["ffn"] = _upcycled(s_blk["ffn"], t_blk["ffn"], p, options)
  return out


def _copied(src, fresh, where: str):
  """``src`` cast to ``fresh``'s dtypes; the trees must agree (paths and shapes)."""
  s_leaves, s_def = jax.tree_util.tree_flatten_with_path(src)
  f_leaves, f_def = jax.tree_util.tree_flatten_with_path(fresh)
  if s_def != f_def or any(a.shape != b.shape for (_, a), (_, b) in zip(s_leaves, f_leaves)):
    raise ConfigError(f"parameters under {where} differ between the source run and the target "
                      "(paths or shapes); upcycling copies them, so the configs must agree there")
  return jax.tree.map(lambda a, b: a.astype(b.dtype), src, fresh)


def _upcycled(dense: dict, fresh: dict, p: LayerPlan, options: Options) -> dict:
  out = dict(fresh)
  e = fresh["w_gate_ExDxF"].shape[0]
  key = jax.random.fold_in(jax.random.key(options.seed), p.layer)
  for i, (name, new) in enumerate(zip(_DENSE, _EXPERTS)):
    w = dense[name].astype(jnp.float32)
    axis = 0 if name == "w_down_FxD" else 1  # the hidden (F) axis
    experts = _experts(w, p.chunks, e // p.chunks, axis)
    if options.noise:
      eps = jax.random.normal(jax.random.fold_in(key, i), experts.shape, jnp.float32)
      experts = experts + options.noise * _rms(w) * eps
    if name == "w_down_FxD":
      experts = experts * p.scale
    out[new] = experts.astype(fresh[new].dtype)
  if fresh.get("router_DxE") is not None and p.zero_router:
    out["router_DxE"] = jnp.zeros_like(fresh["router_DxE"])
  if fresh.get("shared_down_SxD") is not None:  # shared experts start as an exact 0
    out["shared_down_SxD"] = jnp.zeros_like(fresh["shared_down_SxD"])
  return out


def device_params(src: dict, cfg: Config, vocab_size: int, plans: tuple[LayerPlan, ...],
                  options: Options, shardings=None, layout=lambda p: p) -> dict:
  """``build_params`` jitted, straight into ``shardings`` (the target's; None: default
  placement). Only the target's parameters are materialised, never a host copy. ``src`` is per
  layer; ``layout`` maps the result to the target's train layout (``ModelSpec.to_train``)."""
  fn = jax.jit(lambda s: layout(build_params(s, cfg, vocab_size, plans, options)),
               out_shardings=shardings)
  return fn(src)


def param_counts(params: dict) -> int:
  """Total number of weights of a params tree."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
