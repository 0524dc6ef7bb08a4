"""Pure-jnp reference for block-sparse attention: the dense masked softmax attention.

Everything here materialises B·H·T·S scores; it is the ground truth for parity tests and a
readable statement of the semantics the kernels implement:

  out[b, t, h] = softmax_s( scale · q[b,t,h] · k[b,s,h//G] | visible(b, h, t, s) ) @ v[b, :, h//G]

where ``visible`` = mask(t, s, h) ∧ (segment_ids_q[b,t] == segment_ids_kv[b,s]), G = H // K, the
softmax is taken in float32, and a row with no visible key has output 0 (and logsumexp -inf).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MaskLike = "jax.Array | Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | object"


def evaluate_mask(mask, seq_q: int, seq_kv: int, num_heads: int) -> jax.Array:
  """A bool [Hm, T, S] array (Hm = 1 or H) from a bool array, a callable
  ``f(q_idx, kv_idx, head) -> bool`` or an object with ``.elementwise(q_idx, kv_idx, head)``."""
  if hasattr(mask, "elementwise"):
    mask = mask.elementwise
  if callable(mask):
    q_idx = jnp.arange(seq_q, dtype=jnp.int32)[:, None]
    kv_idx = jnp.arange(seq_kv, dtype=jnp.int32)[None, :]
    fn = lambda h: jnp.broadcast_to(mask(q_idx, kv_idx, h), (seq_q, seq_kv))
    return jax.vmap(fn)(jnp.arange(num_heads, dtype=jnp.int32)).astype(bool)
  mask = jnp.asarray(mask, dtype=bool)
  if mask.ndim == 2:
    mask = mask[None]
  if mask.shape[1:] != (seq_q, seq_kv) or mask.shape[0] not in (1, num_heads):
    raise ValueError(f"mask has shape {mask.shape}; expected [1 or {num_heads}, {seq_q}, "
                     f"{seq_kv}] (or a callable mask)")
  return mask


def dense_masked_attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array,
                           mask, *, segment_ids_q: jax.Array | None = None,
                           segment_ids_kv: jax.Array | None = None,
                           scale: float | None = None,
                           return_lse: bool = False):
  """Dense reference. ``mask``: bool [H or 1, T, S] / [T, S], a callable
  ``(q_idx, kv_idx, head) -> bool`` or a mask object with ``.elementwise``; ``None`` = all visible.

  Returns out [B, T, H, D] in q's dtype (and, with ``return_lse``, float32 logsumexp [B, H, T]
  of the scaled scores, -inf on rows with no visible key)."""
  b, t, h, d = q_BxTxHxD.shape
  s, kh = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
  if h % kh:
    raise ValueError(f"num q heads {h} must be a multiple of num kv heads {kh}")
  g = h // kh
  scale = d ** -0.5 if scale is None else scale
  k = jnp.repeat(k_BxSxKxD, g, axis=2)
  v = jnp.repeat(v_BxSxKxD, g, axis=2)
  scores = jnp.einsum("bthd,bshd->bhts", q_BxTxHxD.astype(jnp.float32), k.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST) * scale
  visible = jnp.ones((1, 1, t, s), bool) if mask is None else evaluate_mask(mask, t, s, h)[None]
  if segment_ids_q is not None or segment_ids_kv is not None:
    seg_q = segment_ids_q if segment_ids_q is not None else jnp.zeros((b, t), jnp.int32)
    seg_kv = segment_ids_kv if segment_ids_kv is not None else jnp.zeros((b, s), jnp.int32)
    visible = visible & (seg_q[:, None, :, None] == seg_kv[:, None, None, :])
  visible = jnp.broadcast_to(visible, scores.shape)
  masked = jnp.where(visible, scores, -jnp.inf)
  row_max = jnp.max(masked, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.where(visible, jnp.exp(masked - row_max), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  probs = p / jnp.where(denom == 0, 1.0, denom)
  out = jnp.einsum("bhts,bshd->bthd", probs, v.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST).astype(q_BxTxHxD.dtype)
  if not return_lse:
    return out
  lse = jnp.where(denom[..., 0] == 0, -jnp.inf, row_max[..., 0] + jnp.log(denom[..., 0]))
  return out, lse
