"""Dense causal grouped-query attention with RoPE and optional QK-norm (registry: "dense").

``config.attention.qkv_bias`` adds q / k / v projection biases (Qwen2): ``q_bias_HxK``,
``k_bias_KxH``, ``v_bias_KxH``, zero-initialised, added before QK-norm and RoPE; leaves named
``*bias*`` are never weight-decayed, and they are not matmul weights for FLOP accounting."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.layers.common import DTYPES, RMSNorm, param, rope
from sparsejax.layers.family import Family, LayerCost, Prunable
from sparsejax.parallel import hardware
from sparsejax.parallel.sharding import constrain


def _resolve_impl(impl: str, dtype) -> str:
  """"auto": cuDNN flash attention on NVIDIA GPUs for 16-bit compute, XLA elsewhere.
  (jax.nn.dot_product_attention's own default is XLA, which materialises B·H·T² scores.) The
  GPU is the target platform (sparsejax.parallel.hardware), the local device by default."""
  if impl != "auto":
    return impl
  on_gpu = hardware.backend() == "gpu"
  return "cudnn" if on_gpu and jnp.dtype(dtype).itemsize == 2 else "xla"


class DenseAttention(nnx.Module):
  """q heads H, kv heads K (K divides H), head dim Dh; causal softmax attention."""

  def __init__(self, cfg, layer_idx: int, *, rngs: nnx.Rngs, shared: dict | None = None):
    d, h, k, dh = cfg.model.d_model, cfg.model.num_heads, cfg.num_kv_heads, cfg.head_dim
    std, pdt = cfg.model.init_std, DTYPES[cfg.model.param_dtype]
    out_std = std / (2 * cfg.model.num_layers) ** 0.5
    self.wq_DxHxK = param(rngs, (d, h, dh), ("embed", "q_heads", "head_dim"), std=std, dtype=pdt)
    self.wk_DxKxH = param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), std=std, dtype=pdt)
    self.wv_DxKxH = param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), std=std, dtype=pdt)
    self.wo_HxKxD = param(rngs, (h, dh, d), ("q_heads", "head_dim", "embed"), std=out_std,
                          dtype=pdt)
    if cfg.attention.qkv_bias:
      zeros = lambda *shape: jnp.zeros(shape, pdt)
      self.q_bias_HxK = nnx.Param(zeros(h, dh), logical_axes=("q_heads", "head_dim"))
      self.k_bias_KxH = nnx.Param(zeros(k, dh), logical_axes=("kv_heads", "head_dim"))
      self.v_bias_KxH = nnx.Param(zeros(k, dh), logical_axes=("kv_heads", "head_dim"))
    else:
      self.q_bias_HxK = self.k_bias_KxH = self.v_bias_KxH = None
    self.q_norm = RMSNorm(dh, eps=cfg.model.norm_eps) if cfg.attention.qk_norm else None
    self.k_norm = RMSNorm(dh, eps=cfg.model.norm_eps) if cfg.attention.qk_norm else None
    self.rope_theta = cfg.attention.rope_theta
    self.dtype = DTYPES[cfg.model.compute_dtype]
    self.impl = _resolve_impl(cfg.attention.impl, self.dtype)

  def project_qkv(self, x_BxTxD: jax.Array, positions_BxT: jax.Array):
    """q [B,T,H,Dh], k and v [B,T,K,Dh] after QK-norm and RoPE (shared by attention variants)."""
    dt = self.dtype
    q = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.wq_DxHxK[...].astype(dt))
    k = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.wk_DxKxH[...].astype(dt))
    v = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.wv_DxKxH[...].astype(dt))
    if self.q_bias_HxK is not None:
      q = q + self.q_bias_HxK[...].astype(dt)
      k = k + self.k_bias_KxH[...].astype(dt)
      v = v + self.v_bias_KxH[...].astype(dt)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q = constrain(rope(q, positions_BxT, self.rope_theta),
                  ("act_batch", "act_length", "act_heads", None))
    k = constrain(rope(k, positions_BxT, self.rope_theta),
                  ("act_batch", "act_length", "act_kv_heads", None))
    v = constrain(v, ("act_batch", "act_length", "act_kv_heads", None))
    return q, k, v

  def project_out(self, o_BxTxHxK: jax.Array) -> jax.Array:
    o_BxTxHxK = constrain(o_BxTxHxK, ("act_batch", "act_length", "act_heads", None))
    return jnp.einsum("bthk,hkd->btd", o_BxTxHxK, self.wo_HxKxD[...].astype(self.dtype))

  def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array) -> jax.Array:
    q, k, v = self.project_qkv(x_BxTxD, positions_BxT)
    o_BxTxHxK = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.impl)
    return self.project_out(o_BxTxHxK)


# q / k / v contract over d_model (axis 0); the output projection over heads x head_dim, its
# N:M groups run along head_dim (axis 1)
PRUNABLE = (Prunable("wq_DxHxK", 0), Prunable("wk_DxKxH", 0), Prunable("wv_DxKxH", 0),
            Prunable("wo_HxKxD", 1))
MATMUL_WEIGHTS = tuple(p.leaf for p in PRUNABLE)


def matmul_params(layer: DenseAttention) -> int:
  """The projection weights a token passes through (biases and norm scales excluded)."""
  return sum(math.prod(getattr(layer, name).shape) for name in MATMUL_WEIGHTS)


def cost(layer: DenseAttention, seq_len: int) -> LayerCost:
  """The q / k / v / o projections are active; attention itself is dense causal (default)."""
  del seq_len
  return LayerCost(active_params=matmul_params(layer))


FAMILY = Family("dense", "attention", DenseAttention, cost=cost, shapes=("model", "attention"),
                prunable=PRUNABLE)
