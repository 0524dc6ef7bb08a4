"""Pallas block-sparse flash attention: forward, dK/dV and dQ kernels.

Written for the Pallas Triton (GPU) lowering and for ``interpret=True`` on CPU. The pattern:

* the grid runs over (q block, batch, q head) in the forward and dQ kernels, and over
  (kv block, batch, kv head) in the dK/dV kernel; the sequence axis comes first so that
  consecutive programs share the same K/V (or Q) rows in L2;
* the block lists of the layout (FlexAttention BlockMask style) are ordinary int32 kernel
  inputs, flattened to 1-D and read with scalar loads (Triton has no scalar prefetch);
* each program loops ``for t in range(num_blocks[h, i])`` with ``lax.fori_loop`` and reads the
  indexed block with ``ref[pl.ds(index * block, block), ...]`` out of the whole sequence, which
  its BlockSpec keeps in global memory;
* online softmax in float32 in base 2 (``exp2``), the 1/sqrt(D)·log2(e) factor applied to the
  f32 scores; logsumexp is written in natural-log units;
* a "partial" block (``full`` flag 0), every block when segment ids are given, and the last
  q / kv block when the sequence is padded evaluate the visibility mask; "full" blocks skip it
  (``lax.cond``).

The backward is the standard flash-attention backward with ``delta_i = rowsum(dO ⊙ O)``
precomputed outside; dK/dV iterate the layout's transposed lists (q blocks of each kv block)
and, for grouped-query attention, loop over the G q heads of their kv head inside the kernel,
so no atomics are needed anywhere.

Inputs here are already padded to whole blocks; ``ops.py`` pads, dispatches and wraps all of
it in ``jax.custom_vjp``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from kernels_pallas._util import dot_f32 as _dot

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Finite "minus infinity" for masked scores: exp2(MASK_VALUE - m) == 0 for any sane m and no
# inf - inf = NaN in the online softmax.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True, eq=False)
class KernelConfig:
  """Static description of one call (shapes after padding to whole blocks)."""
  seq_q: int            # true lengths (positions >= these are padding, always masked)
  seq_kv: int
  block_q: int
  block_kv: int
  num_q_blocks: int     # nQ  (padded seq_q = nQ * block_q)
  num_kv_blocks: int    # nKV
  max_kv_blocks: int    # row length of kv_indices
  max_q_blocks: int     # row length of q_indices
  num_heads: int        # H (q heads)
  num_kv_heads: int     # K
  head_dim: int
  layout_heads: int     # rows of the layout tables; q head h uses row h % layout_heads
  has_segments: bool
  scale: float
  mask: Any = None      # object with .elementwise(q_idx, kv_idx, head) or None (all visible)
  table_heads: int = 0  # > 0: the mask is an explicit int8 table [table_heads·Tp, Sp] input
  interpret: bool = False
  num_warps: int | None = None
  num_stages: int | None = None

  @property
  def group(self) -> int:
    return self.num_heads // self.num_kv_heads

  @property
  def q_padded(self) -> bool:
    return self.seq_q % self.block_q != 0

  @property
  def kv_padded(self) -> bool:
    return self.seq_kv % self.block_kv != 0


def _split_refs(cfg: KernelConfig, refs):
  """Optional inputs after the fixed ones: (seg_q, seg_kv) if segments, table if a table mask;
  then the outputs."""
  refs = list(refs)
  seg_q_ref = seg_kv_ref = table_ref = None
  if cfg.has_segments:
    seg_q_ref, seg_kv_ref = refs.pop(0), refs.pop(0)
  if cfg.table_heads:
    table_ref = refs.pop(0)
  return seg_q_ref, seg_kv_ref, table_ref, refs


def _visible(cfg: KernelConfig, q_blk, kv_blk, head, seg_q, seg_kv, table_ref):
  """bool [bq, bkv] of block (q_blk, kv_blk): mask ∧ in-bounds ∧ same segment."""
  bq, bkv = cfg.block_q, cfg.block_kv
  q0, k0 = q_blk * bq, kv_blk * bkv
  qp = q0 + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  kp = k0 + lax.broadcasted_iota(jnp.int32, (1, bkv), 1)
  vis = jnp.ones((bq, bkv), dtype=jnp.bool_)
  if cfg.mask is not None:
    vis = jnp.logical_and(vis, cfg.mask.elementwise(qp, kp, head))
  if cfg.table_heads:
    row0 = (head % cfg.table_heads) * (cfg.num_q_blocks * bq) + q0
    tile = table_ref[pl.ds(row0, bq), pl.ds(k0, bkv)]
    vis = jnp.logical_and(vis, tile != 0)
  if cfg.q_padded:
    vis = jnp.logical_and(vis, qp < cfg.seq_q)
  if cfg.kv_padded:
    vis = jnp.logical_and(vis, kp < cfg.seq_kv)
  if seg_q is not None:
    vis = jnp.logical_and(vis, seg_q[:, None] == seg_kv[None, :])
  return vis


def _masked_scores(cfg: KernelConfig, s, full, q_blk, kv_blk, head, seg_q, seg_kv, table_ref):
  """Apply the visibility mask to scores ``s`` unless the block is known to be fully visible."""
  def apply(s):
    return jnp.where(_visible(cfg, q_blk, kv_blk, head, seg_q, seg_kv, table_ref), s,
                     MASK_VALUE)

  if cfg.has_segments:  # segment boundaries can cut any block: always mask
    return apply(s)
  needs_mask = full == 0
  if cfg.q_padded:
    needs_mask = jnp.logical_or(needs_mask, q_blk == cfg.num_q_blocks - 1)
  if cfg.kv_padded:
    needs_mask = jnp.logical_or(needs_mask, kv_blk == cfg.num_kv_blocks - 1)
  return lax.cond(needs_mask, apply, lambda s: s, s)


def _layout_head(cfg: KernelConfig, h):
  """Layout row of q head h; also the ``head`` the mask is evaluated with, so the kernel computes
  exactly what the layout was compiled for (row r = mask of head r)."""
  return h % cfg.layout_heads if cfg.layout_heads > 1 else 0


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------

def _fwd_kernel(kv_num_ref, kv_idx_ref, kv_full_ref, q_ref, k_ref, v_ref, *refs,
                cfg: KernelConfig):
  seg_q_ref, seg_kv_ref, table_ref, (o_ref, lse_ref) = _split_refs(cfg, refs)
  bq, bkv, d = cfg.block_q, cfg.block_kv, cfg.head_dim
  qi, h = pl.program_id(0), pl.program_id(2)
  hl = _layout_head(cfg, h)
  row = hl * cfg.num_q_blocks + qi
  num = kv_num_ref[row]

  q = q_ref[...]
  seg_q = seg_q_ref[...] if cfg.has_segments else None
  s_scale = cfg.scale * LOG2E

  def body(t, carry):
    acc, m_prev, l_prev = carry
    kj = kv_idx_ref[row * cfg.max_kv_blocks + t]
    full = kv_full_ref[row * cfg.max_kv_blocks + t]
    start = pl.multiple_of(kj * bkv, bkv)
    k = k_ref[pl.ds(start, bkv), :]
    v = v_ref[pl.ds(start, bkv), :]
    seg_kv = seg_kv_ref[pl.ds(start, bkv)] if cfg.has_segments else None
    s = _dot(q, k, trans_b=True) * s_scale                      # [bq, bkv] f32, log2 units
    s = _masked_scores(cfg, s, full, qi, kj, hl, seg_q, seg_kv, table_ref)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    # While a row has seen only masked scores m_new == MASK_VALUE; subtracting 0 instead makes
    # its probabilities exp2(MASK_VALUE) == 0 rather than exp2(0) == 1.
    m_ref_pt = jnp.where(m_new > 0.5 * MASK_VALUE, m_new, 0.0)
    p = jnp.exp2(s - m_ref_pt[:, None])
    alpha = jnp.exp2(m_prev - m_new)
    l_new = alpha * l_prev + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_new, l_new

  init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), MASK_VALUE, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = lax.fori_loop(0, num, body, init)
  nonempty = l > 0.0
  out = acc / jnp.where(nonempty, l, 1.0)[:, None]
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = jnp.where(nonempty, (m + jnp.log2(jnp.where(nonempty, l, 1.0))) * LN2,
                           -jnp.inf)


def _compiler_params(cfg: KernelConfig, num_stages_default: int):
  if cfg.interpret:
    return {}
  from jax.experimental.pallas import triton as plgpu  # GPU-only import, kept lazy
  num_warps = cfg.num_warps or (4 if cfg.head_dim <= 64 else 8)
  return dict(compiler_params=plgpu.CompilerParams(
      num_warps=num_warps, num_stages=cfg.num_stages or num_stages_default))


def _full_spec(x):
  """Whole (1-D) array for every program: the layout tables."""
  return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def forward(cfg: KernelConfig, q, k, v, seg_q, seg_kv, table, kv_num, kv_idx, kv_full):
  """q [B, Tp, H, D], k/v [B, Sp, K, D] (padded); layout tables flattened int32.
  Returns out [B, Tp, H, D] (q dtype) and lse [B, H, Tp] float32 (natural log, -inf if empty)."""
  b, tp, h, d = q.shape
  sp = k.shape[1]
  g = cfg.group
  bq = cfg.block_q
  in_specs = [
      _full_spec(kv_num), _full_spec(kv_idx), _full_spec(kv_full),
      pl.BlockSpec((None, bq, None, d), lambda i, bb, hh: (bb, i, hh, 0)),
      pl.BlockSpec((None, sp, None, d), lambda i, bb, hh: (bb, 0, hh // g, 0)),
      pl.BlockSpec((None, sp, None, d), lambda i, bb, hh: (bb, 0, hh // g, 0)),
  ]
  args = [kv_num, kv_idx, kv_full, q, k, v]
  if cfg.has_segments:
    in_specs += [pl.BlockSpec((None, bq), lambda i, bb, hh: (bb, i)),
                 pl.BlockSpec((None, sp), lambda i, bb, hh: (bb, 0))]
    args += [seg_q, seg_kv]
  if cfg.table_heads:
    in_specs.append(pl.BlockSpec(table.shape, lambda *_: (0, 0)))
    args.append(table)
  out_specs = [pl.BlockSpec((None, bq, None, d), lambda i, bb, hh: (bb, i, hh, 0)),
               pl.BlockSpec((None, None, bq), lambda i, bb, hh: (bb, hh, i))]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((b, h, tp), jnp.float32)]
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg),
      grid=(cfg.num_q_blocks, b, h),
      in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      interpret=cfg.interpret, name="block_sparse_attention_fwd",
      **_compiler_params(cfg, 2),
  )(*args)


# ----------------------------------------------------------------------------------------------
# backward: dQ (grid over q blocks, kv lists)
# ----------------------------------------------------------------------------------------------

def _dq_kernel(kv_num_ref, kv_idx_ref, kv_full_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, *refs, cfg: KernelConfig):
  seg_q_ref, seg_kv_ref, table_ref, (dq_ref,) = _split_refs(cfg, refs)
  bq, bkv, d = cfg.block_q, cfg.block_kv, cfg.head_dim
  qi, h = pl.program_id(0), pl.program_id(2)
  hl = _layout_head(cfg, h)
  row = hl * cfg.num_q_blocks + qi
  num = kv_num_ref[row]

  q = q_ref[...]
  do = do_ref[...]
  lse2 = lse_ref[...]        # log2 units; +inf on rows with no visible key (p == 0 there)
  delta = delta_ref[...]
  seg_q = seg_q_ref[...] if cfg.has_segments else None
  s_scale = cfg.scale * LOG2E

  def body(t, dq):
    kj = kv_idx_ref[row * cfg.max_kv_blocks + t]
    full = kv_full_ref[row * cfg.max_kv_blocks + t]
    start = pl.multiple_of(kj * bkv, bkv)
    k = k_ref[pl.ds(start, bkv), :]
    v = v_ref[pl.ds(start, bkv), :]
    seg_kv = seg_kv_ref[pl.ds(start, bkv)] if cfg.has_segments else None
    s = _dot(q, k, trans_b=True) * s_scale
    s = _masked_scores(cfg, s, full, qi, kj, hl, seg_q, seg_kv, table_ref)
    p = jnp.exp2(s - lse2[:, None])
    dp = _dot(do, v, trans_b=True)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(0, num, body, jnp.zeros((bq, d), jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def backward_dq(cfg: KernelConfig, q, k, v, do, lse2, delta, seg_q, seg_kv, table, kv_num,
                kv_idx, kv_full):
  """dQ [B, Tp, H, D]. lse2/delta: [B, H, Tp] float32 (lse2 in log2 units, +inf if empty)."""
  b, tp, h, d = q.shape
  sp = k.shape[1]
  g, bq = cfg.group, cfg.block_q
  q_spec = pl.BlockSpec((None, bq, None, d), lambda i, bb, hh: (bb, i, hh, 0))
  kv_spec = pl.BlockSpec((None, sp, None, d), lambda i, bb, hh: (bb, 0, hh // g, 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda i, bb, hh: (bb, hh, i))
  in_specs = [_full_spec(kv_num), _full_spec(kv_idx), _full_spec(kv_full),
              q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
  args = [kv_num, kv_idx, kv_full, q, k, v, do, lse2, delta]
  if cfg.has_segments:
    in_specs += [pl.BlockSpec((None, bq), lambda i, bb, hh: (bb, i)),
                 pl.BlockSpec((None, sp), lambda i, bb, hh: (bb, 0))]
    args += [seg_q, seg_kv]
  if cfg.table_heads:
    in_specs.append(pl.BlockSpec(table.shape, lambda *_: (0, 0)))
    args.append(table)
  return pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid=(cfg.num_q_blocks, b, h),
      in_specs=in_specs, out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      interpret=cfg.interpret, name="block_sparse_attention_dq",
      **_compiler_params(cfg, 2),
  )(*args)


# ----------------------------------------------------------------------------------------------
# backward: dK/dV (grid over kv blocks, transposed q lists, loop over the group's q heads)
# ----------------------------------------------------------------------------------------------

def _dkv_kernel(q_num_ref, q_idx_ref, q_full_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, *refs, cfg: KernelConfig):
  seg_q_ref, seg_kv_ref, table_ref, (dk_ref, dv_ref) = _split_refs(cfg, refs)
  bq, bkv, d, g = cfg.block_q, cfg.block_kv, cfg.head_dim, cfg.group
  tp = cfg.num_q_blocks * bq
  kj, kh = pl.program_id(0), pl.program_id(2)

  k = k_ref[...]
  v = v_ref[...]
  seg_kv = seg_kv_ref[...] if cfg.has_segments else None
  s_scale = cfg.scale * LOG2E

  def head_body(gi, carry):
    h = kh * g + gi
    hl = _layout_head(cfg, h)
    row = hl * cfg.num_kv_blocks + kj
    num = q_num_ref[row]

    def body(t, carry):
      dk, dv = carry
      qi = q_idx_ref[row * cfg.max_q_blocks + t]
      full = q_full_ref[row * cfg.max_q_blocks + t]
      start = pl.multiple_of(qi * bq, bq)
      # q / dO are [Tp, H·D] (free reshape outside): a 2-D dynamic slice picks rows and head.
      col = pl.multiple_of(h * d, d)
      row0 = pl.multiple_of(h * tp + start, bq)
      q = q_ref[pl.ds(start, bq), pl.ds(col, d)]
      do = do_ref[pl.ds(start, bq), pl.ds(col, d)]
      lse2 = lse_ref[pl.ds(row0, bq)]
      delta = delta_ref[pl.ds(row0, bq)]
      seg_q = seg_q_ref[pl.ds(start, bq)] if cfg.has_segments else None
      s = _dot(q, k, trans_b=True) * s_scale                     # [bq, bkv]
      s = _masked_scores(cfg, s, full, qi, kj, hl, seg_q, seg_kv, table_ref)
      p = jnp.exp2(s - lse2[:, None])
      dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)     # [bkv, D]
      dp = _dot(do, v, trans_b=True)                           # [bq, bkv]
      ds = p * (dp - delta[:, None])
      dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)      # [bkv, D]
      return dk, dv

    return lax.fori_loop(0, num, body, carry)

  zeros = jnp.zeros((bkv, d), jnp.float32)
  dk, dv = lax.fori_loop(0, g, head_body, (zeros, zeros))
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward_dkv(cfg: KernelConfig, q, k, v, do, lse2, delta, seg_q, seg_kv, table, q_num,
                 q_idx, q_full):
  """dK, dV [B, Sp, K, D]; dK/dV of a kv head summed over its G q heads inside the kernel."""
  b, tp, h, d = q.shape
  kvh = k.shape[2]
  bkv = cfg.block_kv
  q_flat = q.reshape(b, tp, h * d)
  do_flat = do.reshape(b, tp, h * d)
  lse_flat = lse2.reshape(b, h * tp)
  delta_flat = delta.reshape(b, h * tp)
  all_q_spec = pl.BlockSpec((None, tp, h * d), lambda j, bb, kk: (bb, 0, 0))
  all_row_spec = pl.BlockSpec((None, h * tp), lambda j, bb, kk: (bb, 0))
  kv_spec = pl.BlockSpec((None, bkv, None, d), lambda j, bb, kk: (bb, j, kk, 0))
  in_specs = [_full_spec(q_num), _full_spec(q_idx), _full_spec(q_full),
              all_q_spec, kv_spec, kv_spec, all_q_spec, all_row_spec, all_row_spec]
  args = [q_num, q_idx, q_full, q_flat, k, v, do_flat, lse_flat, delta_flat]
  if cfg.has_segments:
    in_specs += [pl.BlockSpec((None, tp), lambda j, bb, kk: (bb, 0)),
                 pl.BlockSpec((None, bkv), lambda j, bb, kk: (bb, j))]
    args += [seg_q, seg_kv]
  if cfg.table_heads:
    in_specs.append(pl.BlockSpec(table.shape, lambda *_: (0, 0)))
    args.append(table)
  return pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg),
      grid=(cfg.num_kv_blocks, b, kvh),
      in_specs=in_specs, out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      interpret=cfg.interpret, name="block_sparse_attention_dkv",
      **_compiler_params(cfg, 2),
  )(*args)
