"""Analytic parameter and FLOP accounting.

Convention (written once, used by metrics, MFU and scaling fits):
  * A matmul with an ``m x n`` weight costs ``2·m·n`` FLOPs per token forward; training
    (forward + backward) costs 3x forward, hence the familiar ``6·N`` per token.
  * The input embedding lookup is a gather and costs nothing; the output head (tied or not) is a
    ``D x V`` matmul every token pays for.
  * Attention scores and values add ``4·T·H·Dh`` per token per layer forward for full attention
    (QK^T and AV); causal attention halves it to ``2·T·H·Dh``. Training: x3.
  * Norms, RoPE, softmax and the loss are ignored (< 1% at our shapes).

Vocabulary rows. The model stores ``cfg.padded_vocab(V)`` rows (a multiple of
``config.model.vocab_multiple_of``) for the TRUE vocabulary ``V`` of the dataset / tokenizer;
padded rows are never a target and never an input. ``count(..., vocab_size=V)`` is told V (the
model only knows its padded rows); without it, ``config.model.vocab_size`` if set, else the
padded rows (``vocab_counted`` in the result says which V was used).

Parameter counts (N of the scaling fits; sparsejax.scaling.analyze ``--n``):
  * ``params_active_total`` (Chinchilla-style N, ``--n total``): the matmul weights one token
    passes through — every block weight a token uses (MoE: only the routed and shared experts;
    block-sparse attention: visited blocks; memory / PEER: the selected rows) plus the output
    head at the TRUE vocabulary, ``V·D``. The untied input embedding is not counted (a lookup).
  * ``params_active_non_embedding`` (Kaplan-style N, ``--n non_embedding``): the same without the
    output head (and, as always, without the input embedding).
  * ``params_active_per_token`` (kept for old records, the only N they carry): the active block
    weights plus the head at the PADDED rows — the head matmul as executed. At tiny widths the
    padding is a large share (d=16, V=257 -> 384 rows: the head is 6,144 weights padded,
    4,112 at the true vocabulary).

FLOPs count what the hardware executes: ``flops_per_token = 6·params_active_per_token +
attention``, i.e. the head at the padded rows (the logits of padded rows are computed and enter
the softmax). ``6·params_active_total + attention`` is smaller by ``6·D·(V_padded - V)``; the
scaling fits use ``C = 6·N·D`` with their own N, the records' ``total_flops`` (this convention)
only group runs into isoFLOP budgets.

Storage counts (what a checkpoint holds, padded rows included): ``params_total``,
``params_embedding`` (input embedding table + untied output head), ``params_non_embedding``.

Exploitable FLOPs (``flops_per_token_exploitable``): what a kernel that skips structurally zero
work would execute; ``flops_per_token`` stays the dense count (what XLA runs today). Only FFN
activation top-k (``config.ffn.activation_topk = k``, dense FFN layers of width F) is counted:
all of h must be computed to pick its k largest entries, so the gate and up projections' forward
stays dense (2·2·D·F); every other matmul of the layer touches only the k kept units per token
— the down projection forward (2·D·k) and backward (4·D·k), and the gate / up backward, whose
pre-activation gradients are exactly zero at dropped units (2·4·D·k). Training: dense 18·D·F,
exploitable 4·D·F + 14·D·k, i.e. 14·D·(F − k) less per top-k layer (the dense FFN family's
``LayerCost.skippable_flops``). ReLU / ReLU² / dReLU zeros are data-dependent and not counted
(exploitable = flops_per_token without top-k); the measured fraction is the train metric
``sown/<layer>/act_nonzero``.

A family whose cost differs (MoE: only active experts; block-sparse attention: only visited
blocks; memory / PEER: selected rows) declares ``Family.cost(module, seq_len) -> LayerCost``
(sparsejax/layers/family.py); otherwise all its matmul weights (ndim >= 2) are active and
attention is dense causal. Table lookups (memory values, PEER experts) report table bytes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from flax import nnx

from sparsejax.config import Config
from sparsejax.layers import registry
from sparsejax.layers.family import LayerCost


@dataclasses.dataclass(frozen=True)
class ModelCounts:
  params_total: int
  params_embedding: int        # input embedding table (+ untied output head), padded rows
  params_non_embedding: int
  params_active_per_token: int  # active matmul weights, head at the PADDED rows (as executed)
  flops_per_token: float       # training (fwd + bwd) FLOPs per token, convention above
  flops_per_token_fwd: float
  table_bytes_read_per_token: float = 0.0  # memory / PEER rows gathered per token (forward)
  params_active_total: int = 0  # Chinchilla-style N: active matmul weights, head at TRUE vocab
  params_active_non_embedding: int = 0  # Kaplan-style N: the same without the output head
  vocab_counted: int = 0       # V used for params_active_total (true vocab when it was known)
  vocab_rows: int = 0          # rows stored and computed (cfg.padded_vocab(V))
  flops_per_token_exploitable: float = 0.0  # training FLOPs a top-k-aware kernel executes

  def as_metrics(self) -> dict[str, float]:
    return {k: float(v) for k, v in dataclasses.asdict(self).items()}


def _size(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _module_params(module) -> int:
  return _size(nnx.state(module, nnx.Param))


def _matmul_params(module) -> int:
  """Weights that multiply activations: parameters with 2+ dims (norm scales are vectors)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param))
             if len(x.shape) >= 2)


def count(model, cfg: Config, *, vocab_size: int | None = None) -> ModelCounts:
  """Counts for a (possibly abstract, from nnx.eval_shape) Transformer. ``vocab_size``: the true
  vocabulary (dataset / tokenizer, before padding) the model was built for; None: the config's
  ``model.vocab_size`` if set, else the model's (padded) rows."""
  seq_len = cfg.data.seq_len
  d = cfg.model.d_model
  total = _module_params(model)
  vocab_rows = model.embed_VxD.shape[0]
  vocab = vocab_size or cfg.model.vocab_size or vocab_rows
  if not 0 < vocab <= vocab_rows:
    raise ValueError(f"vocab_size {vocab} does not fit the model's {vocab_rows} embedding rows; "
                     "pass the vocabulary the model was built for")
  embed = vocab_rows * d
  head = 0 if model.head_DxV is None else _size(model.head_DxV)
  body = 0  # active block weights
  attn_fwd = 0.0
  table_bytes = 0.0
  skippable = 0.0  # training FLOPs per token of exploitable activation sparsity (top-k)
  for block, families in zip(model.blocks, registry.layer_families(cfg)):
    for sub, family in zip((block.attn, block.ffn), families):
      cost = family.cost(sub, seq_len) if family.cost is not None else LayerCost()
      body += cost.active_params if cost.active_params is not None else _matmul_params(sub)
      table_bytes += cost.table_bytes
      skippable += cost.skippable_flops
      if sub is block.attn:
        attn_fwd += (cost.attention_flops if cost.attention_flops is not None else
                     2.0 * seq_len * cfg.model.num_heads * cfg.head_dim)
  active = body + vocab_rows * d  # the output projection as executed, tied or not
  fwd = 2.0 * active + attn_fwd
  return ModelCounts(params_total=total, params_embedding=embed + head,
                     params_non_embedding=total - embed - head,
                     params_active_per_token=active, flops_per_token=3.0 * fwd,
                     flops_per_token_fwd=fwd, table_bytes_read_per_token=table_bytes,
                     params_active_total=body + vocab * d, params_active_non_embedding=body,
                     vocab_counted=vocab, vocab_rows=vocab_rows,
                     flops_per_token_exploitable=3.0 * fwd - skippable)
