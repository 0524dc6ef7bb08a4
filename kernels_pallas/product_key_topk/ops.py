"""Product-key top-k: input checks, padding, dispatch and the ``custom_vjp`` around the kernel.

``product_key_topk(q1, q2, k1, k2, top_k)`` returns the exact top-k of the n² product keys
(scores q1·k1[i] + q2·k2[j], indices i·n + j) per query row and head, optionally as softmax
weights. impl:

  "pallas"     the fused Pallas kernel lowered for the GPU (Triton backend);
  "interpret"  the same kernel with ``interpret=True`` (CPU tests);
  "xla"        ``reference.product_key_topk_reference`` (pure jnp, ``lax.top_k``), JAX autodiff.

All three give the same indices (same tie rule, see reference.py) when the sub-key scores are
computed identically; on a GPU the kernel's and XLA's matmuls may round the last bit of an f32
score differently, which can swap two keys whose scores are within that rounding.

Backward (no kernel, deterministic): the cotangent of the selected scores (through the softmax
when ``softmax=True``) is summed per distinct sub-key of each row, written into a dense
[T, H, n] sub-key-score gradient (equal values for duplicate positions, so the scatter order
does not matter), and turned into query / sub-key gradients with two matmuls per half — what
autodiff of the reference does, at O(T·H·n·C) tensor-core work and T·H·n·4 bytes per half.
Shared sub-keys (leading dim 1) sum their gradient over heads. No gradient for the indices.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas.product_key_topk import kernel as _k
from kernels_pallas.product_key_topk.reference import product_key_topk_reference
from kernels_pallas._util import cdiv as _cdiv, is_pow2 as _is_pow2

IMPLS = ("pallas", "interpret", "xla")
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
DEFAULT_BLOCK_TOKENS = 16
DEFAULT_KEY_CHUNK = 128
MAX_SUBKEYS = 46340          # n² must fit int32 indices


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check(q1, q2, k1, k2, top_k, impl, block_tokens, key_chunk):
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}; allowed: {', '.join(IMPLS)}")
  if q1.ndim < 2 or q1.shape[:-1] != q2.shape[:-1]:
    raise ValueError(f"q1 {q1.shape} and q2 {q2.shape} must both be [..., H, C] with the same "
                     "leading dims and H")
  for name, x in (("q1", q1), ("q2", q2), ("k1", k1), ("k2", k2)):
    if jnp.dtype(x.dtype) not in DTYPES:
      raise ValueError(f"{name} has dtype {x.dtype}; use float32 or bfloat16")
  if q1.dtype != q2.dtype:
    raise ValueError(f"q1 is {q1.dtype} but q2 is {q2.dtype}; cast both halves to one dtype")
  h = q1.shape[-2]
  for name, key, q in (("k1", k1, q1), ("k2", k2, q2)):
    if key.ndim != 3 or key.shape[0] not in (1, h):
      raise ValueError(f"{name} has shape {key.shape}; expected [H={h} or 1, n, C]")
    if key.shape[2] != q.shape[-1]:
      raise ValueError(f"{name} has C={key.shape[2]} but its query half has C={q.shape[-1]}; "
                       "sub-keys and query halves must have the same width")
  n = k1.shape[1]
  if k2.shape[1] != n:
    raise ValueError(f"k1 has n={n} sub-keys but k2 has {k2.shape[1]}; both halves need the "
                     "same n (N = n² keys)")
  if not 1 <= n <= MAX_SUBKEYS:
    raise ValueError(f"n={n} sub-keys must be in [1, {MAX_SUBKEYS}] (indices n² fit int32)")
  if not _is_int(top_k) or not 1 <= top_k <= n:
    raise ValueError(f"top_k={top_k!r} must be an int in [1, n={n}]")
  for name, v in (("block_tokens", block_tokens), ("key_chunk", key_chunk)):
    if v is not None and (not _is_int(v) or not _is_pow2(int(v)) or v < _k.MIN_BLOCK):
      raise ValueError(f"{name}={v!r} must be a power of two >= {_k.MIN_BLOCK} (Triton tiles)")
  if any(d == 0 for d in q1.shape) or any(d == 0 for d in k1.shape + k2.shape + q2.shape):
    raise ValueError(f"empty input: q1 {q1.shape}, q2 {q2.shape}, k1 {k1.shape}, k2 {k2.shape}")


def product_key_topk(q1: jax.Array, q2: jax.Array, k1: jax.Array, k2: jax.Array, top_k: int,
                     *, softmax: bool = False, impl: str = "pallas",
                     block_tokens: int | None = None,
                     key_chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Exact top-k over the n² product keys.

  Args:
    q1, q2: query halves [..., H, C1] / [..., H, C2], float32 or bfloat16 (same dtype).
    k1, k2: sub-key tables [H or 1, n, C1] / [H or 1, n, C2] (1: shared by all heads); cast to
      the query dtype for the scores, gradients returned in their own dtype.
    top_k: k in [1, n].
    softmax: return softmax weights over the k scores instead of the raw scores.
    impl: "pallas" (GPU, Triton), "interpret" (same kernel on CPU), "xla" (pure jnp).
    block_tokens: query rows per kernel program (power of two >= 16; default 16).
    key_chunk: sub-keys scored per step (power of two >= 16; default 128, at most n rounded up).
  Returns:
    (scores or weights [..., H, k] float32, descending; indices [..., H, k] int32, i·n + j).
  """
  _check(q1, q2, k1, k2, top_k, impl, block_tokens, key_chunk)
  top_k = int(top_k)
  if impl == "xla":
    return product_key_topk_reference(q1, q2, k1, k2, top_k, softmax=softmax)
  n = k1.shape[1]
  t = math.prod(q1.shape[:-2])
  bt = int(block_tokens or DEFAULT_BLOCK_TOKENS)
  kc = int(key_chunk) if key_chunk else min(DEFAULT_KEY_CHUNK, max(_k.MIN_BLOCK, _k.next_pow2(n)))
  cfg = _k.KernelConfig(
      num_tokens=_cdiv(t, bt) * bt, num_heads=q1.shape[-2], num_subkeys=n,
      subkeys_padded=_cdiv(n, kc) * kc, top_k=top_k, block_tokens=bt, key_chunk=kc,
      softmax=softmax, shared_keys1=k1.shape[0] == 1, shared_keys2=k2.shape[0] == 1,
      interpret=(impl == "interpret"),
      # 4 warps up to C = 128 (152 registers, no spills at bt=16, kc=128, k=32), 8 above.
      num_warps=4 if max(q1.shape[-1], q2.shape[-1]) <= 128 else 8)
  return _pallas_topk(cfg, q1, q2, k1, k2)


def _pad_to(x, shape):
  return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape)])


def _forward(cfg: _k.KernelConfig, q1, q2, k1, k2):
  lead, h = q1.shape[:-2], q1.shape[-2]
  t = math.prod(lead)
  tp, n_pad, k = cfg.num_tokens, cfg.subkeys_padded, cfg.top_k

  def prep(q, key):
    c = q.shape[-1]
    cp = max(_k.MIN_BLOCK, _k.next_pow2(c))
    q = _pad_to(q.reshape(t, h, c), (tp, h, cp))
    key = _pad_to(key.astype(q.dtype), (key.shape[0], n_pad, cp))
    return q, key

  (q1p, k1p), (q2p, k2p) = prep(q1, k1), prep(q2, k2)
  scores, idx = _k.forward(cfg, q1p, q2p, k1p, k2p)
  shape = lead + (h, k)
  return scores[:t, :, :k].reshape(shape), idx[:t, :, :k].reshape(shape)


def _half_grads(q, keys, sub, ds, n):
  """Gradients of sum_j ds_j · (q · keys[sub_j]) w.r.t. q [..., H, C] and keys [1 or H, n, C]."""
  lead, (h, c) = q.shape[:-2], q.shape[-2:]
  t, k = math.prod(lead), sub.shape[-1]
  sub = sub.reshape(t, h, k).transpose(1, 0, 2)                  # [H, T, k]
  ds = ds.reshape(t, h, k).transpose(1, 0, 2)
  # Total cotangent of each distinct sub-key of a row, stored at every slot that holds it: the
  # scatter below then writes equal values for duplicates (deterministic, no accumulation).
  same = sub[..., :, None] == sub[..., None, :]
  total = jnp.sum(jnp.where(same, ds[..., None, :], 0.0), axis=-1)
  dense = jnp.zeros((h, t, n), jnp.float32).at[
      jnp.arange(h)[:, None, None], jnp.arange(t)[None, :, None], sub].set(total)
  mm = jnp.float32 if q.dtype == jnp.float32 else q.dtype
  dot = functools.partial(lax.dot_general, preferred_element_type=jnp.float32,
                          precision=lax.Precision.HIGHEST if mm == jnp.float32 else None)
  dense = dense.astype(mm)                                       # [H, T, n]
  q_htc = q.reshape(t, h, c).transpose(1, 0, 2).astype(mm)       # [H, T, C]
  key_dtype = keys.dtype
  keys = keys.astype(mm)
  # Batch dims leading, 2-D where possible (XLA:CPU has no bf16 x bf16 -> f32 dot for every
  # dimension order).
  if keys.shape[0] == 1:
    dq = dot(dense.reshape(h * t, n), keys[0], (((1,), (0,)), ((), ())))           # [H·T, C]
    dk = dot(dense.reshape(h * t, n), q_htc.reshape(h * t, c),
             (((0,), (0,)), ((), ())))[None]                                        # [1, n, C]
  else:
    dq = dot(dense, keys, (((2,), (1,)), ((0,), (0,))))                            # [H, T, C]
    dk = dot(dense, q_htc, (((1,), (1,)), ((0,), (0,))))                           # [H, n, C]
  dq = dq.reshape(h, t, c).transpose(1, 0, 2).reshape(q.shape)
  return dq.astype(q.dtype), dk.astype(key_dtype)


def _pallas_topk(cfg: _k.KernelConfig, q1, q2, k1, k2):
  """custom_vjp around the kernel; gradients flow through the selected scores only."""
  n = cfg.num_subkeys

  @jax.custom_vjp
  def topk(q1, q2, k1, k2):
    return _forward(cfg, q1, q2, k1, k2)

  def topk_fwd(q1, q2, k1, k2):
    scores, idx = _forward(cfg, q1, q2, k1, k2)
    return (scores, idx), (q1, q2, k1, k2, idx, scores if cfg.softmax else None)

  def topk_bwd(res, cts):
    q1, q2, k1, k2, idx, weights = res
    g = cts[0].astype(jnp.float32)
    if cfg.softmax:
      g = weights * (g - jnp.sum(g * weights, axis=-1, keepdims=True))
    dq1, dk1 = _half_grads(q1, k1, idx // n, g, n)
    dq2, dk2 = _half_grads(q2, k2, idx % n, g, n)
    return dq1, dq2, dk1, dk2

  topk.defvjp(topk_fwd, topk_bwd)
  return topk(q1, q2, k1, k2)
