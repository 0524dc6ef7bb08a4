"""Analytic parameter and FLOP accounting.

Convention (written once, used by metrics, MFU and scaling fits):
  * A matmul with an ``m x n`` weight costs ``2·m·n`` FLOPs per token forward; training
    (forward + backward) costs 3x forward, hence the familiar ``6·N`` per token.
  * N counts every weight that multiplies activations: all blocks' matrices plus the output head
    (tied or not). The input embedding lookup is a gather and costs nothing.
  * Attention scores and values add ``4·T·H·Dh`` per token per layer forward for full attention
    (QK^T and AV); causal attention halves it to ``2·T·H·Dh``. Training: x3.
  * Norms, RoPE, softmax and the loss are ignored (< 1% at our shapes).

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
  params_embedding: int        # input embedding table (+ untied output head)
  params_non_embedding: int
  params_active_per_token: int  # weights touched per token (matmul weights incl. head)
  flops_per_token: float       # training (fwd + bwd) FLOPs per token, convention above
  flops_per_token_fwd: float
  table_bytes_read_per_token: float = 0.0  # memory / PEER rows gathered per token (forward)

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


def count(model, cfg: Config) -> ModelCounts:
  """Counts for a (possibly abstract, from nnx.eval_shape) Transformer."""
  seq_len = cfg.data.seq_len
  total = _module_params(model)
  vocab_rows = model.embed_VxD.shape[0]
  embed = vocab_rows * cfg.model.d_model
  head = 0 if model.head_DxV is None else _size(model.head_DxV)
  head_matmul = vocab_rows * cfg.model.d_model  # the output projection, tied or not
  active = head_matmul
  attn_fwd = 0.0
  table_bytes = 0.0
  for block, families in zip(model.blocks, registry.layer_families(cfg)):
    for sub, family in zip((block.attn, block.ffn), families):
      cost = family.cost(sub, seq_len) if family.cost is not None else LayerCost()
      active += cost.active_params if cost.active_params is not None else _matmul_params(sub)
      table_bytes += cost.table_bytes
      if sub is block.attn:
        attn_fwd += (cost.attention_flops if cost.attention_flops is not None else
                     2.0 * seq_len * cfg.model.num_heads * cfg.head_dim)
  fwd = 2.0 * active + attn_fwd
  return ModelCounts(params_total=total, params_embedding=embed + head,
                     params_non_embedding=total - embed - head,
                     params_active_per_token=active, flops_per_token=3.0 * fwd,
                     flops_per_token_fwd=fwd, table_bytes_read_per_token=table_bytes)
