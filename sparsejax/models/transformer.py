"""Decoder-only transformer assembled from the attention / FFN registries.

    tokens_BxT -> embed -> [pre-norm attention + residual, pre-norm FFN + residual] x L
               -> final RMSNorm -> logits_BxTxV (float32; tied or untied head)

Layer i uses ``cfg.layer_types()[i]`` = (attention type, ffn type), so per-layer patterns
(e.g. memory FFN in layers 4 and 8, alternating local / global attention) need no model code.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.config import Config
from sparsejax.layers import registry
from sparsejax.layers.common import DTYPES, RMSNorm, param
from sparsejax.models import scan
from sparsejax.parallel.sharding import constrain

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}

_ACT = ("act_batch", "act_length", "act_embed")


class Block(nnx.Module):
  def __init__(self, cfg: Config, layer_idx: int, *, rngs: nnx.Rngs, shared: dict):
    attn_family, ffn_family = registry.layer_families(cfg)[layer_idx]
    d, eps = cfg.model.d_model, cfg.model.norm_eps
    self.attn_norm = RMSNorm(d, eps=eps)
    self.attn = attn_family.build(cfg, layer_idx, rngs=rngs, shared=shared)
    self.ffn_norm = RMSNorm(d, eps=eps)
    self.ffn = ffn_family.build(cfg, layer_idx, rngs=rngs, shared=shared)

    # Optional call context, passed only to layers whose __call__ declares it:
    #   tokens_BxT (hash routing), rng (a per-step, per-layer key; None in eval).
    self._attn_ctx = _context_args(self.attn)
    self._ffn_ctx = _context_args(self.ffn)

  def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array,
               tokens_BxT: jax.Array | None = None, rng: jax.Array | None = None) -> jax.Array:
    ctx = {"tokens_BxT": tokens_BxT, "rng": rng}
    attn_kw = {k: ctx[k] for k in self._attn_ctx}
    x_BxTxD = x_BxTxD + self.attn(self.attn_norm(x_BxTxD), positions_BxT, **attn_kw)
    x_BxTxD = constrain(x_BxTxD, _ACT)
    x_BxTxD = x_BxTxD + self.ffn(self.ffn_norm(x_BxTxD), **{k: ctx[k] for k in self._ffn_ctx})
    return constrain(x_BxTxD, _ACT)


def _context_args(layer) -> tuple[str, ...]:
  params = inspect.signature(type(layer).__call__).parameters
  return tuple(k for k in ("tokens_BxT", "rng") if k in params)


def _run_block(block: Block, x_BxTxD, positions_BxT, tokens_BxT, rng):
  return block(x_BxTxD, positions_BxT, tokens_BxT, rng)


class Transformer(nnx.Module):
  """``vocab_size`` is the padded embedding size (``cfg.padded_vocab(dataset vocab)``)."""

  def __init__(self, cfg: Config, vocab_size: int, *, rngs: nnx.Rngs):
    d, pdt = cfg.model.d_model, DTYPES[cfg.model.param_dtype]
    self.vocab_size = vocab_size
    self.dtype = DTYPES[cfg.model.compute_dtype]
    self.embed_VxD = param(rngs, (vocab_size, d), ("vocab", "embed"), std=cfg.model.init_std,
                           dtype=pdt)
    # Modules shared across layers (e.g. a memory value pool). NNX stores a shared variable once,
    # under the first layer (in sorted path order) that references it.
    shared: dict = {}
    self.blocks = nnx.List([Block(cfg, i, rngs=rngs, shared=shared)
                            for i in range(cfg.model.num_layers)])
    self.final_norm = RMSNorm(d, eps=cfg.model.norm_eps)
    self.head_DxV = (None if cfg.model.tie_embeddings else
                     param(rngs, (d, vocab_size), ("embed", "vocab"),
                           std=1.0 / d ** 0.5, dtype=pdt))
    self.loss_chunk = cfg.model.loss_chunk  # > 0: forward_sums computes the loss in chunks
    policy = cfg.model.remat
    self._block_fn = (_run_block if policy == "none" else
                      nnx.remat(_run_block, policy=REMAT_POLICIES[policy]))
    # config.model.scan_layers: runs of identical blocks under one lax.scan (models/scan.py);
    # built per layer, they run as a loop until `stack_scanned` moves them to stacked storage
    self._segments = (scan.plan(self.blocks) if cfg.model.scan_layers else
                      (scan.Segment(0, cfg.model.num_layers, 1),))
    self.stacked = False

  def stack_scanned(self) -> "Transformer":
    """In place: the train layout (``scan/<start>/<j>`` stacks for the scanned segments, see
    models/scan.py). A no-op without ``config.model.scan_layers``."""
    if not self.stacked and self.scan_segments(planned=True):
      self.scan = scan.stack_blocks(self.blocks, self._segments)
      self.stacked = True
    return self

  def scan_segments(self, planned: bool = False) -> tuple:
    """The segments stored stacked (or, ``planned``, those the plan would stack)."""
    if not (planned or self.stacked):
      return ()
    return tuple(s for s in self._segments if s.repeats > 1)

  def embed(self, tokens_BxT: jax.Array) -> jax.Array:
    x_BxTxD = jnp.take(self.embed_VxD[...], tokens_BxT, axis=0).astype(self.dtype)
    return constrain(x_BxTxD, _ACT)

  def decode(self, x_BxTxD: jax.Array, positions_BxT: jax.Array | None = None, *,
             tokens_BxT: jax.Array | None = None, rng: jax.Array | None = None) -> jax.Array:
    """Embedded inputs -> float32 logits. Separate from `embed` so tests can differentiate
    through continuous inputs (causality). `rng` (a key, training only) is folded with the layer
    index for layers that take one; `tokens_BxT` reaches layers that route by token id."""
    x_BxTxD = self.hidden(x_BxTxD, positions_BxT, tokens_BxT=tokens_BxT, rng=rng)
    return self.head_logits(x_BxTxD)

  def hidden(self, x_BxTxD: jax.Array, positions_BxT: jax.Array | None = None, *,
             tokens_BxT: jax.Array | None = None, rng: jax.Array | None = None) -> jax.Array:
    """Embedded inputs -> the blocks -> final norm: the hidden states the head reads
    (compute dtype). Arguments as `decode`."""
    b, t = x_BxTxD.shape[:2]
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    call = lambda block, x, layer_rng: self._block_fn(block, x, positions_BxT, tokens_BxT,
                                                      layer_rng)
    for seg in self._segments:
      if self.stacked and seg.repeats > 1:
        x_BxTxD = scan.run_stacked(self.scan[seg.start], seg, call, x_BxTxD, rng)
        continue
      for i in range(seg.start, seg.stop):
        layer_rng = None if rng is None else jax.random.fold_in(rng, i)
        x_BxTxD = call(self.blocks[i], x_BxTxD, layer_rng)
    return self.final_norm(x_BxTxD)

  def head_logits(self, x_BxCxD: jax.Array) -> jax.Array:
    """Hidden states (all positions, or a chunk of C of them) -> float32 logits_BxCxV through
    the tied embedding or the untied head. The weight is cast to the compute dtype here, so
    under a scan over chunks its gradient accumulates in the parameter dtype."""
    if self.head_DxV is None:
      logits = jnp.einsum("btd,vd->btv", x_BxCxD, self.embed_VxD[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)
    else:
      logits = jnp.einsum("btd,dv->btv", x_BxCxD, self.head_DxV[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)
    return constrain(logits, ("act_batch", "act_length", "act_vocab"))

  def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None, *,
               rng: jax.Array | None = None) -> jax.Array:
    return self.decode(self.embed(tokens_BxT), positions_BxT, tokens_BxT=tokens_BxT, rng=rng)


def build_model(cfg: Config, vocab_size: int, seed: int = 0) -> Transformer:
  """The model stored per layer (``blocks/<i>``), however config.model.scan_layers is set."""
  return Transformer(cfg, cfg.padded_vocab(vocab_size), rngs=nnx.Rngs(params=seed))


def build_train_model(cfg: Config, vocab_size: int, seed: int = 0) -> Transformer:
  """The model as the train state stores it: with config.model.scan_layers, the scanned
  segments stacked (same values as `build_model`'s layers)."""
  return build_model(cfg, vocab_size, seed).stack_scanned()
