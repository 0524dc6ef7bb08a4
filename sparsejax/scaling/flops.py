"""Analytic parameter and FLOP accounting.

Convention (written once, used by metrics, MFU and scaling fits):
  * A matmul with an ``m x n`` weight costs ``2·m·n`` FLOPs per token forward; training
    (forward + backward) costs 3x forward, hence the familiar ``6·N`` per token.
  * N counts every weight that multiplies activations: all blocks' matrices plus the output head
    (tied or not). The input embedding lookup is a gather and costs nothing.
  * Attention scores and values add ``4·T·H·Dh`` per token per layer forward for full attention
    (QK^T and AV); causal attention halves it to ``2·T·H·Dh``. Training: x3.
  * Norms, RoPE, softmax and the loss are ignored (< 1% at our shapes).

A layer whose cost differs (MoE: only active experts; block-sparse attention: only visited blocks)
defines ``active_params_per_token()`` and/or ``attention_flops_per_token(seq_len)`` (forward) on
its module; otherwise all its matmul weights (ndim >= 2) are active and attention is dense
causal. Table lookups (memory values, PEER experts) report ``bytes_read_per_token()``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from flax import nnx

from sparsejax.config import Config


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
  for block in model.blocks:
    for sub in (block.attn, block.ffn):
      fn = getattr(sub, "active_params_per_token", None)
      active += fn() if fn is not None else _matmul_params(sub)
      fn = getattr(sub, "bytes_read_per_token", None)
      table_bytes += fn() if fn is not None else 0.0
    fn = getattr(block.attn, "attention_flops_per_token", None)
    attn_fwd += (fn(seq_len) if fn is not None else
                 2.0 * seq_len * cfg.model.num_heads * cfg.head_dim)
  fwd = 2.0 * active + attn_fwd
  return ModelCounts(params_total=total, params_embedding=embed + head,
                     params_non_embedding=total - embed - head,
                     params_active_per_token=active, flops_per_token=3.0 * fwd,
                     flops_per_token_fwd=fwd, table_bytes_read_per_token=table_bytes)


# Dense bf16 peak FLOP/s per device, for MFU. Override with config.train.peak_tflops_per_device.
PEAK_TFLOPS = {
    "h200": 989.0, "h100": 989.0, "gh200": 989.0, "a100": 312.0, "l4": 121.0, "b200": 2250.0,
    "tpu v4": 275.0, "tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v5p": 459.0, "tpu v5": 459.0,
    "tpu v6 lite": 918.0, "tpu v6e": 918.0,
}


def peak_tflops(device_kind: str, override: float = 0.0) -> float | None:
  """Peak dense bf16 TFLOP/s for a jax device kind; None if unknown (then MFU is not logged)."""
  if override > 0:
    return override
  kind = device_kind.lower()
  for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
    if key in kind:
      return PEAK_TFLOPS[key]
  return None
