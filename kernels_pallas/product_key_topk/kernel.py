"""Pallas fused product-key top-k: sub-key scores, per-half top-k, k×k combine, top-k, softmax.

Written for the Pallas Triton (GPU) lowering and for ``interpret=True`` on CPU; exact w.r.t.
``reference.product_key_topk_reference`` (same scores bit for bit given the same sub-key
scores, same indices, same tie rule — see reference.py).

Grid: (token blocks, heads). One program takes ``block_tokens`` (bt) query rows of one head;
the sub-key scores never leave the chip:

1. per half, stream the sub-key table in chunks of ``key_chunk`` (kc) rows:
   ``s = q_blk @ chunkᵀ`` ([bt, kc], float32 accumulation; padded sub-keys masked to -inf),
   then fold the chunk into a running top-k *set* R (k of the [bt, kp] slots, unsorted) by
   "replace the worst": while some row has a chunk entry better than its worst R entry, take
   each row's best chunk entry (max value, lowest index) and, where it beats the worst R entry
   (min value, highest index), overwrite that slot. A ``lax.while_loop`` with a data-dependent
   trip count: the first chunk needs k insertions, later chunks only as many as the busiest
   row of the block has new top-k members (≈ k·kc / (position + kc) on random data).
   Empty slots start at -inf (slots >= k at +inf: never the worst, never filled) with
   distinct placeholder indices n + slot, so every index in R is unique and "worst" / "kill"
   can match on indices;
2. sort R: k rounds of "take the row max, the lowest index reaching it, mask it out" → a1, i1
   descending (ties: lower sub-key index first, as ``lax.top_k``);
3. combine: because a1, a2 are sorted, a pair (a, b) can only be in the top-k if
   (a+1)(b+1) <= k (every (a', b') <= (a, b) scores at least as much and comes first on ties),
   so only the "staircase" is scored: rectangle A = rows [0, RA) × all columns and rectangle
   B = rows [RA, kp) × columns [0, WB) with WB >= floor(k / (RA + 1)) (``combine_blocks``:
   k = 32 → RA·kp + kp·WB = 384 candidates instead of 1024). k rounds of "max, then lowest
   candidate position a·kp + b" give exactly ``lax.top_k`` over the row-major k×k grid;
   the winning (a, b) is mapped back to i1[a]·n + i2[b] with one-hot row sums;
4. optional softmax over the k scores; write [bt, kp] float32 scores (or weights) and int32
   indices (slots >= k are -inf / placeholders, sliced off by ops.py).

``k_pad`` (kp) is the next power of two >= max(k, 16); padded slots hold -inf and are never
chosen while k <= n. Every tensor dimension is a power of two (ops.py pads T to whole token
blocks, C to a power of two >= 16 with zeros, n to whole key chunks).

Expected GPU cost (H200, bf16, n = 1024, C = 128, k = 32, bt = 16, kc = 128, 4 warps):
the two sub-key matmuls are 2·n·C = 0.26 M multiply-adds per (token, head) — tens of µs for 65,536
queries on tensor cores. The selection dominates: per (token, head) and half, ~130
insertion rounds on random data (32 + ~24 + ~17 + ... over the 8 chunks; each round ≈ 6 ops ×
kc + 8 ops × kp, 4 row reductions), plus 32 sort rounds over kp and 32 combine rounds over 384
candidates — ≈ 0.35 M simple ops per query, ≈ 2.3·10¹⁰ for 65,536 queries: ~1 ms of ALU time at
full occupancy, 1–2 ms with the reduction shuffles (target ≤ 2 ms; XLA's unfused path ~9 ms).
Adversarial inputs (each chunk better than the last) need k rounds per chunk: ~2× slower.
Nothing here has been timed on a GPU yet; tune ``block_tokens`` / ``key_chunk`` / num_warps with
the benchmark. Register use, from compiling this kernel's Triton IR offline for sm_90a (pip
triton 3.9 + ptxas, not XLA's bundled Triton), bf16, n = 1024, k = 32: bt=16, kc=128, C=128:
152 registers at 4 warps / 124 at 8, no spills; C=256: 206 / 128; bt=32 needs ~250 (avoid);
kc=256 at 8 warps spills a little. Hence the defaults bt=16, kc=128, 4 warps (8 when C > 128).

The backward needs no kernel (ops.py: dense sub-key gradients + matmuls, O(T·H·n·C)).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas._util import next_pow2

NEG_INF = float("-inf")
POS_INF = float("inf")
BIG_INDEX = 2**31 - 1       # "no match" for min-index reductions
MIN_BLOCK = 16              # Triton dot operands: power-of-two dims >= 16


def pad_k(top_k: int) -> int:
  """Slots per row: the next power of two >= max(top_k, 16)."""
  return max(MIN_BLOCK, next_pow2(top_k))


def combine_blocks(top_k: int, k_pad: int) -> tuple[int, int]:
  """(RA, WB), powers of two >= 2: the two candidate rectangles rows [0, RA) × [0, k_pad) and
  rows [RA, k_pad) × [0, WB) cover every (a, b) with (a+1)(b+1) <= top_k; the cheapest such
  pair (fewest candidates, then smaller RA)."""
  best = None
  ra = 2
  while ra <= k_pad:
    wb = min(k_pad, max(2, next_pow2(top_k // (ra + 1))))
    cost = (ra + wb, ra)
    if best is None or cost < best[0]:
      best = (cost, ra, wb)
    ra *= 2
  return best[1], best[2]


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static description of one call (shapes after padding)."""
  num_tokens: int       # padded T (multiple of block_tokens)
  num_heads: int        # H
  num_subkeys: int      # n (true); sub-keys >= n are padding, masked to -inf
  subkeys_padded: int   # multiple of key_chunk
  top_k: int
  block_tokens: int
  key_chunk: int
  softmax: bool
  shared_keys1: bool    # k1 has a leading dim of 1 (shared by all heads)
  shared_keys2: bool
  interpret: bool = False
  num_warps: int | None = None
  num_stages: int | None = None

  @property
  def k_pad(self) -> int:
    return pad_k(self.top_k)

  @property
  def blocks(self) -> tuple[int, int]:
    return combine_blocks(self.top_k, self.k_pad)


def _dot_t(a, b):
  """a [m, c] · b [n, c]ᵀ -> [m, n] float32; float32 inputs at full precision (no TF32)."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def _row_max(x):
  return jnp.max(x, axis=1)


def _half_topk(cfg: KernelConfig, q, k_ref):
  """Top-k sub-keys of one half for the bt rows of ``q``: (values [bt, kp] descending,
  indices [bt, kp], head of the values [bt, RA] and [bt, WB] for the combine)."""
  bt, kp, kc, n = cfg.block_tokens, cfg.k_pad, cfg.key_chunk, cfg.num_subkeys
  slot = lax.broadcasted_iota(jnp.int32, (bt, kp), 1)
  col0 = lax.broadcasted_iota(jnp.int32, (bt, kc), 1)

  def best_and_worst(s, col, rv, ri):
    bv = _row_max(s)                                                   # best chunk entry
    bi = jnp.min(jnp.where(s == bv[:, None], col, BIG_INDEX), axis=1)
    wv = jnp.min(rv, axis=1)                                           # worst running entry
    wi = jnp.max(jnp.where(rv == wv[:, None], ri, -1), axis=1)
    return bv, bi, wv, wi

  def chunk_body(c, carry):
    rv, ri = carry
    start = pl.multiple_of(c * kc, kc)
    s = _dot_t(q, k_ref[pl.ds(start, kc), :])                          # [bt, kc] f32
    col = start + col0
    if cfg.subkeys_padded != n:
      s = jnp.where(col < n, s, NEG_INF)

    def more(state):
      _, _, _, bv, _, wv, _ = state
      return jnp.max((bv > wv).astype(jnp.int32)) > 0

    def insert(state):
      s, rv, ri, bv, bi, wv, wi = state
      # Chunk indices exceed every real index in R, so a chunk entry beats R's worst only with a
      # strictly larger score.
      hit = (ri == wi[:, None]) & (bv > wv)[:, None]
      rv = jnp.where(hit, bv[:, None], rv)
      ri = jnp.where(hit, bi[:, None], ri)
      s = jnp.where(col == bi[:, None], NEG_INF, s)
      return (s, rv, ri) + best_and_worst(s, col, rv, ri)

    state = lax.while_loop(more, insert, (s, rv, ri) + best_and_worst(s, col, rv, ri))
    return state[1], state[2]

  # Slots < k start empty (-inf); slots >= k hold +inf so they are never the worst entry and
  # never replaced: the set keeps exactly k entries. Placeholder indices n + slot are distinct.
  init = (jnp.where(slot < cfg.top_k, NEG_INF, POS_INF), n + slot)
  rv, ri = lax.fori_loop(0, cfg.subkeys_padded // kc, chunk_body, init)
  return _sort_desc(cfg, rv, ri, slot)


def _sort_desc(cfg: KernelConfig, rv, ri, slot):
  """k rounds of max extraction (ties: lowest index) over the unsorted set (rv, ri)."""
  bt, kp, n = cfg.block_tokens, cfg.k_pad, cfg.num_subkeys
  ra, wb = cfg.blocks
  slot_a = lax.broadcasted_iota(jnp.int32, (bt, ra), 1)
  slot_b = lax.broadcasted_iota(jnp.int32, (bt, wb), 1)

  rv = jnp.where(slot < cfg.top_k, rv, NEG_INF)       # drop the +inf filler slots

  def body(j, carry):
    rv, ov, oi, ha, hb = carry
    m = _row_max(rv)
    pick = jnp.min(jnp.where(rv == m[:, None], ri, BIG_INDEX), axis=1)
    rv = jnp.where(ri == pick[:, None], NEG_INF, rv)
    ov = jnp.where(slot == j, m[:, None], ov)
    oi = jnp.where(slot == j, pick[:, None], oi)
    ha = jnp.where(slot_a == j, m[:, None], ha)
    hb = jnp.where(slot_b == j, m[:, None], hb)
    return rv, ov, oi, ha, hb

  init = (rv, jnp.full((bt, kp), NEG_INF, jnp.float32), n + slot,
          jnp.full((bt, ra), NEG_INF, jnp.float32), jnp.full((bt, wb), NEG_INF, jnp.float32))
  _, ov, oi, ha, hb = lax.fori_loop(0, cfg.top_k, body, init)
  return ov, oi, ha, hb


def _combine(cfg: KernelConfig, v1, i1, h1, v2, i2, h2):
  """Top-k of a1[a] + a2[b] over the staircase (a+1)(b+1) <= k; ties: lowest a·kp + b."""
  bt, kp, n = cfg.block_tokens, cfg.k_pad, cfg.num_subkeys
  ra, wb = cfg.blocks
  shift = kp.bit_length() - 1
  slot = lax.broadcasted_iota(jnp.int32, (bt, kp), 1)
  # Rectangle A: rows a < RA (head of half 1) × all kp columns of half 2.
  ra_a = lax.broadcasted_iota(jnp.int32, (bt, ra, kp), 1)
  cb_a = lax.broadcasted_iota(jnp.int32, (bt, ra, kp), 2)
  cand_a = (h1[:, :, None] + v2[:, None, :]).reshape(bt, ra * kp)
  pos_a = (ra_a * kp + cb_a).reshape(bt, ra * kp)
  # Rectangle B: rows a >= RA × columns b < WB (head of half 2).
  ra_b = lax.broadcasted_iota(jnp.int32, (bt, kp, wb), 1)
  cb_b = lax.broadcasted_iota(jnp.int32, (bt, kp, wb), 2)
  cand_b = jnp.where(ra_b >= ra, v1[:, :, None] + h2[:, None, :], NEG_INF).reshape(bt, kp * wb)
  pos_b = (ra_b * kp + cb_b).reshape(bt, kp * wb)

  def body(j, carry):
    ca, cb, ov, oi = carry
    m = jnp.maximum(_row_max(ca), _row_max(cb))
    pos = jnp.minimum(jnp.min(jnp.where(ca == m[:, None], pos_a, BIG_INDEX), axis=1),
                      jnp.min(jnp.where(cb == m[:, None], pos_b, BIG_INDEX), axis=1))
    ca = jnp.where(pos_a == pos[:, None], NEG_INF, ca)
    cb = jnp.where(pos_b == pos[:, None], NEG_INF, cb)
    a = lax.shift_right_logical(pos, jnp.int32(shift))
    b = pos & (kp - 1)
    row = jnp.sum(jnp.where(slot == a[:, None], i1, 0), axis=1)
    col = jnp.sum(jnp.where(slot == b[:, None], i2, 0), axis=1)
    ov = jnp.where(slot == j, m[:, None], ov)
    oi = jnp.where(slot == j, (row * n + col)[:, None], oi)
    return ca, cb, ov, oi

  init = (cand_a, cand_b, jnp.full((bt, kp), NEG_INF, jnp.float32),
          jnp.zeros((bt, kp), jnp.int32))
  _, _, ov, oi = lax.fori_loop(0, cfg.top_k, body, init)
  return ov, oi


def _kernel(q1_ref, q2_ref, k1_ref, k2_ref, out_ref, idx_ref, *, cfg: KernelConfig):
  v1, i1, h1a, _ = _half_topk(cfg, q1_ref[...], k1_ref)
  v2, i2, _, h2b = _half_topk(cfg, q2_ref[...], k2_ref)
  scores, idx = _combine(cfg, v1, i1, h1a, v2, i2, h2b)
  if cfg.softmax:   # padded slots are -inf: weight 0
    e = jnp.exp(scores - _row_max(scores)[:, None])
    scores = e / jnp.sum(e, axis=1)[:, None]
  out_ref[...] = scores
  idx_ref[...] = idx


def _compiler_params(cfg: KernelConfig):
  if cfg.interpret:
    return {}
  from jax.experimental.pallas import triton as plgpu  # GPU-only import, kept lazy
  return dict(compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps or 4,
                                                   num_stages=cfg.num_stages or 2))


def forward(cfg: KernelConfig, q1, q2, k1, k2):
  """q1 [Tp, H, C1], q2 [Tp, H, C2] (padded, same dtype); k1 [1 or H, n_pad, C1],
  k2 [1 or H, n_pad, C2] in the query dtype. Returns (scores or softmax weights [Tp, H, kp]
  float32 descending, indices [Tp, H, kp] int32); slots >= top_k are padding."""
  tp, h, c1 = q1.shape
  c2 = q2.shape[2]
  bt, kp, n_pad = cfg.block_tokens, cfg.k_pad, cfg.subkeys_padded

  def q_spec(c):
    return pl.BlockSpec((bt, None, c), lambda i, hh: (i, hh, 0))

  def key_spec(c, shared):
    if shared:
      return pl.BlockSpec((None, n_pad, c), lambda i, hh: (0, 0, 0))
    return pl.BlockSpec((None, n_pad, c), lambda i, hh: (hh, 0, 0))

  out_spec = pl.BlockSpec((bt, None, kp), lambda i, hh: (i, hh, 0))
  return pl.pallas_call(
      functools.partial(_kernel, cfg=cfg),
      grid=(tp // bt, h),
      in_specs=[q_spec(c1), q_spec(c2), key_spec(c1, cfg.shared_keys1),
                key_spec(c2, cfg.shared_keys2)],
      out_specs=[out_spec, out_spec],
      out_shape=[jax.ShapeDtypeStruct((tp, h, kp), jnp.float32),
                 jax.ShapeDtypeStruct((tp, h, kp), jnp.int32)],
      interpret=cfg.interpret, name="product_key_topk",
      **_compiler_params(cfg),
  )(q1, q2, k1, k2)
