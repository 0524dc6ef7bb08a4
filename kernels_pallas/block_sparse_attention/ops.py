"""Block-sparse attention: dispatch, padding and the ``custom_vjp`` around the Pallas kernels.

``block_sparse_attention(q, k, v, layout, ...)`` runs softmax attention restricted to the blocks
listed in ``layout`` (a ``BlockLayout``: FlexAttention-style kv lists per q block plus the
transposed q lists per kv block, with full/partial flags) and, inside partial blocks, to
``layout.mask.elementwise(q_idx, kv_idx, head)``.

impl:
  "pallas"     Pallas kernels lowered for the GPU (Triton backend);
  "interpret"  the same kernels with ``interpret=True`` (CPU tests);
  "xla"        pure jnp: the same block-sparse algorithm with gathers, differentiated by JAX;
  "splash"     JAX's TPU splash attention kernel via ``splash.splash_attention`` (TPU only);
  "auto"       "splash" on a TPU, "pallas" on a GPU when the shapes suit Triton, else "xla".
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.block_sparse_attention import kernel as _k
from kernels_pallas._util import cdiv as _cdiv, is_pow2 as _is_pow2

IMPLS = ("auto", "pallas", "interpret", "xla", "splash")


def _check(q, k, v, layout, segment_ids_q, segment_ids_kv):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"expected q [B,T,H,D], k/v [B,S,K,D]; got {q.shape}, {k.shape}, {v.shape}")
  b, t, h, d = q.shape
  _, s, kvh, _ = k.shape
  if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"k {k.shape} and v {v.shape} must both be [B={b}, S, K, D={d}]")
  if h % kvh:
    raise ValueError(f"num q heads {h} must be a multiple of num kv heads {kvh} (GQA)")
  if (layout.seq_q, layout.seq_kv) != (t, s):
    raise ValueError(f"layout was compiled for seq_q={layout.seq_q}, seq_kv={layout.seq_kv} "
                     f"but q/k have T={t}, S={s}; compile the layout for these lengths")
  if h % layout.num_heads:
    raise ValueError(f"layout.num_heads={layout.num_heads} must divide the number of q heads {h} "
                     "(1 = one layout for all heads; head h uses row h % num_heads)")
  nq, nkv = _cdiv(t, layout.block_q), _cdiv(s, layout.block_kv)
  hl = layout.num_heads
  for name, shape in (("kv_num_blocks", (hl, nq)), ("q_num_blocks", (hl, nkv))):
    if tuple(np.shape(getattr(layout, name))) != shape:
      raise ValueError(f"layout.{name} has shape {np.shape(getattr(layout, name))}; "
                       f"expected {shape}")
  for name, lead in (("kv_indices", (hl, nq)), ("kv_full", (hl, nq)),
                     ("q_indices", (hl, nkv)), ("q_full", (hl, nkv))):
    if tuple(np.shape(getattr(layout, name)))[:2] != lead:
      raise ValueError(f"layout.{name} has shape {np.shape(getattr(layout, name))}; "
                       f"expected {lead} + (max blocks,)")
  for name, seg, n in (("segment_ids_q", segment_ids_q, t), ("segment_ids_kv", segment_ids_kv, s)):
    if seg is not None and tuple(seg.shape) != (b, n):
      raise ValueError(f"{name} has shape {tuple(seg.shape)}; expected [B={b}, {n}]")


def _segments(segment_ids_q, segment_ids_kv, t, s):
  if segment_ids_q is None and segment_ids_kv is None:
    return None, None
  if segment_ids_kv is None or segment_ids_q is None:
    if t != s:
      raise ValueError("give both segment_ids_q and segment_ids_kv when T != S")
    seg = segment_ids_q if segment_ids_q is not None else segment_ids_kv
    return seg.astype(jnp.int32), seg.astype(jnp.int32)
  return segment_ids_q.astype(jnp.int32), segment_ids_kv.astype(jnp.int32)


def triton_supports(head_dim: int, block_q: int, block_kv: int) -> bool:
  """Whether the Triton lowering can take these sizes (power-of-two tiles of at least 16)."""
  return all(_is_pow2(x) and x >= 16 for x in (head_dim, block_q, block_kv))


def resolve_impl(impl: str, head_dim: int, block_q: int, block_kv: int) -> str:
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}; allowed: {', '.join(IMPLS)}")
  if impl != "auto":
    return impl
  if jax.default_backend() == "tpu":
    return "splash"
  on_gpu = jax.default_backend() == "gpu"
  return "pallas" if on_gpu and triton_supports(head_dim, block_q, block_kv) else "xla"


def block_sparse_attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array,
                           layout, *, segment_ids_q: jax.Array | None = None,
                           segment_ids_kv: jax.Array | None = None,
                           scale: float | None = None, impl: str = "auto",
                           num_warps: int | None = None,
                           num_stages: int | None = None) -> jax.Array:
  """Block-sparse softmax attention; returns out [B, T, H, D] in q's dtype.

  q head h reads kv head h // (H // K). Segment ids (int [B, T] / [B, S]; one of them suffices
  when T == S) restrict attention to equal ids. Rows with no visible key give 0. Block sizes
  come from the layout; ``scale`` defaults to 1/sqrt(D)."""
  q, k, v = q_BxTxHxD, k_BxSxKxD, v_BxSxKxD
  _check(q, k, v, layout, segment_ids_q, segment_ids_kv)
  b, t, h, d = q.shape
  s, kvh = k.shape[1], k.shape[2]
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  scale = float(d ** -0.5 if scale is None else scale)
  seg_q, seg_kv = _segments(segment_ids_q, segment_ids_kv, t, s)
  impl = resolve_impl(impl, d, layout.block_q, layout.block_kv)
  if impl == "xla":
    return block_sparse_attention_xla(q, k, v, layout, seg_q, seg_kv, scale)
  if impl == "splash":
    from kernels_pallas.block_sparse_attention import splash as _splash  # defers the TPU-only splash kernel
    return _splash.splash_attention(q, k, v, layout, segment_ids_q=seg_q,
                                    segment_ids_kv=seg_kv, scale=scale)
  if impl == "pallas" and not triton_supports(d, layout.block_q, layout.block_kv):
    raise ValueError(f"impl='pallas' (Triton) needs power-of-two head_dim and blocks >= 16; got "
                     f"head_dim={d}, block_q={layout.block_q}, block_kv={layout.block_kv}; "
                     "use impl='xla' or change the layout's block sizes")

  bq, bkv = layout.block_q, layout.block_kv
  nq, nkv = _cdiv(t, bq), _cdiv(s, bkv)
  mask, table = _kernel_mask(getattr(layout, "mask", None), t, s, nq * bq, nkv * bkv)
  cfg = _k.KernelConfig(
      seq_q=t, seq_kv=s, block_q=bq, block_kv=bkv, num_q_blocks=nq, num_kv_blocks=nkv,
      max_kv_blocks=int(np.shape(layout.kv_indices)[2]),
      max_q_blocks=int(np.shape(layout.q_indices)[2]),
      num_heads=h, num_kv_heads=kvh, head_dim=d, layout_heads=layout.num_heads,
      has_segments=seg_q is not None, scale=scale, mask=mask,
      table_heads=0 if table is None else table.shape[0] // (nq * bq),
      interpret=(impl == "interpret"), num_warps=num_warps, num_stages=num_stages)
  as_flat = lambda x: jnp.asarray(x).astype(jnp.int32).reshape(-1)
  fwd_tables = (as_flat(layout.kv_num_blocks), as_flat(layout.kv_indices),
                as_flat(layout.kv_full))
  bwd_tables = (as_flat(layout.q_num_blocks), as_flat(layout.q_indices), as_flat(layout.q_full))

  tp, sp = nq * bq, nkv * bkv
  pad_t = lambda x: jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2))
  pad_s = lambda x: jnp.pad(x, [(0, 0), (0, sp - s)] + [(0, 0)] * (x.ndim - 2))
  if seg_q is not None:
    seg_q, seg_kv = pad_t(seg_q), pad_s(seg_kv)
  out = _pallas_attention(cfg, pad_t(q), pad_s(k), pad_s(v), seg_q, seg_kv, table, fwd_tables,
                          bwd_tables)
  return out[:, :t]


def _is_table_mask(mask) -> bool:
  """An explicit-array mask (``masks.FromArray``: bool ``.table`` [H, T, S])."""
  table = getattr(mask, "table", None)
  return isinstance(table, np.ndarray) and table.ndim == 3 and table.dtype == bool


def _kernel_mask(mask, t, s, tp, sp):
  """(elementwise mask or None, int8 table [Hm·Tp, Sp] or None). An array mask cannot be a
  captured constant of a Pallas kernel: it becomes an input whose tiles the kernel loads."""
  if not _is_table_mask(mask):
    return mask, None
  table = np.asarray(mask.table)
  if table.shape[1:] != (t, s):
    raise ValueError(f"array mask has shape {table.shape}; expected [H, {t}, {s}]")
  padded = np.zeros((table.shape[0], tp, sp), np.int8)
  padded[:, :t, :s] = table
  return None, jnp.asarray(padded.reshape(-1, sp))


def _pallas_attention(cfg, q, k, v, seg_q, seg_kv, table, fwd_tables, bwd_tables):
  """custom_vjp over padded inputs; the integer inputs get no cotangent."""

  @jax.custom_vjp
  def attention(q, k, v, seg_q, seg_kv, table, fwd_tables, bwd_tables):
    return _k.forward(cfg, q, k, v, seg_q, seg_kv, table, *fwd_tables)[0]

  def attention_fwd(q, k, v, seg_q, seg_kv, table, fwd_tables, bwd_tables):
    out, lse = _k.forward(cfg, q, k, v, seg_q, seg_kv, table, *fwd_tables)
    return out, (q, k, v, seg_q, seg_kv, table, fwd_tables, bwd_tables, out, lse)

  def attention_bwd(res, do):
    q, k, v, seg_q, seg_kv, table, fwd_tables, bwd_tables, out, lse = res
    do = do.astype(q.dtype)
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
    # log2 units; +inf on empty rows so that exp2(s - lse2) == 0 there.
    lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * _k.LOG2E)
    dq = _k.backward_dq(cfg, q, k, v, do, lse2, delta, seg_q, seg_kv, table, *fwd_tables)
    dk, dv = _k.backward_dkv(cfg, q, k, v, do, lse2, delta, seg_q, seg_kv, table, *bwd_tables)
    none = lambda tree: jax.tree.map(lambda _: None, tree)
    return (dq, dk, dv, none(seg_q), none(seg_kv), none(table), none(fwd_tables),
            none(bwd_tables))

  attention.defvjp(attention_fwd, attention_bwd)
  return attention(q, k, v, seg_q, seg_kv, table, fwd_tables, bwd_tables)


def block_sparse_attention_xla(q, k, v, layout, seg_q, seg_kv, scale):
  """Pure-jnp block-sparse attention (gathers the listed K/V blocks of every q block), plain
  JAX autodiff. Memory: B·H·T·(max kv blocks·block_kv) scores, not T·S."""
  b, t, h, d = q.shape
  s, kvh = k.shape[1], k.shape[2]
  g = h // kvh
  bq, bkv = layout.block_q, layout.block_kv
  nq, nkv = _cdiv(t, bq), _cdiv(s, bkv)
  tp, sp = nq * bq, nkv * bkv
  idx = jnp.asarray(layout.kv_indices).astype(jnp.int32)          # [Hl, nQ, M]
  num = jnp.asarray(layout.kv_num_blocks).astype(jnp.int32)       # [Hl, nQ]
  hl, m = idx.shape[0], idx.shape[2]
  idx = jnp.clip(idx, 0, nkv - 1)
  if 1 < hl < h:  # layout rows h % Hl: expand to one row per q head
    rows = np.arange(h) % hl
    idx, num, hl = idx[rows], num[rows], h

  q = jnp.pad(q, [(0, 0), (0, tp - t), (0, 0), (0, 0)])
  k = jnp.pad(k, [(0, 0), (0, sp - s), (0, 0), (0, 0)])
  v = jnp.pad(v, [(0, 0), (0, sp - s), (0, 0), (0, 0)])

  # Visible slots: listed block, in bounds. kv_pos [Hl, nQ, M·bkv].
  kv_pos = (idx[..., None] * bkv + jnp.arange(bkv, dtype=jnp.int32)).reshape(hl, nq, m * bkv)
  slot_ok = jnp.repeat(jnp.arange(m)[None, None, :] < num[..., None], bkv, axis=-1)
  kv_ok = slot_ok & (kv_pos < s)
  q_pos = jnp.arange(tp, dtype=jnp.int32).reshape(nq, bq)
  layout_head = (lambda hh: hh % hl) if hl > 1 else (lambda hh: 0)
  mask_head = lambda hh: hh % layout.num_heads   # the head the layout row was compiled for
  mask = getattr(layout, "mask", None)

  def head_visible(hh):
    kp = kv_pos[layout_head(hh)][:, None, :]                      # [nQ, 1, M·bkv]
    vis = kv_ok[layout_head(hh)][:, None, :] & (q_pos < t)[..., None]
    if mask is not None:
      vis = vis & mask.elementwise(q_pos[..., None], kp, mask_head(hh))
    return vis                                                    # [nQ, bq, M·bkv]
  vis = jax.vmap(head_visible)(jnp.arange(h, dtype=jnp.int32))    # [H, nQ, bq, M·bkv]
  vis = vis.reshape(1, kvh, g, nq, bq, m * bkv)
  if seg_q is not None:
    sq = jnp.pad(seg_q, [(0, 0), (0, tp - t)]).reshape(b, 1, nq, bq)
    skv = jnp.pad(seg_kv, [(0, 0), (0, sp - s)])[:, kv_pos]         # [B, H|1, nQ, M·bkv]
    same = sq[..., :, None] == skv[..., None, :]                   # [B, Hl, nQ, bq, M·bkv]
    same = same.reshape(b, kvh, g, nq, bq, m * bkv) if hl > 1 else same[:, :, None]
    vis = vis & same

  # Gather K/V blocks per kv head: [B, K, G or 1, nQ, M·bkv, D].
  idx_kg = idx.reshape(kvh, g, nq, m) if hl > 1 else jnp.broadcast_to(idx, (kvh, 1, nq, m))
  def gather(x):
    xb = x.reshape(b, nkv, bkv, kvh, d)
    take = lambda xk, ik: jnp.take(xk, ik, axis=1)              # [B, G', nQ, M, bkv, D]
    out = jax.vmap(take, in_axes=(3, 0), out_axes=1)(xb, idx_kg)
    return out.reshape(b, kvh, idx_kg.shape[1], nq, m * bkv, d)
  kg, vg = gather(k), gather(v)

  qg = q.reshape(b, nq, bq, kvh, g, d).transpose(0, 3, 4, 1, 2, 5)  # [B, K, G, nQ, bq, D]
  precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  scores = jnp.matmul(qg, jnp.swapaxes(kg, -1, -2), precision=precision,
                      preferred_element_type=jnp.float32) * scale
  scores = jnp.where(vis, scores, _k.MASK_VALUE)
  row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
  p = jnp.where(vis, jnp.exp(scores - row_max), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.matmul(p.astype(v.dtype), vg, precision=precision, preferred_element_type=jnp.float32)
  o = o / jnp.where(denom == 0.0, 1.0, denom)
  o = o.transpose(0, 3, 4, 1, 2, 5).reshape(b, tp, h, d)[:, :t]
  return o.astype(q.dtype)
