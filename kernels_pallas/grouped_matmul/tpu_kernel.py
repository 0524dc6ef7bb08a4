"""Pallas TPU (Mosaic) grouped matmul kernels: ``gmm`` (optionally with transposed rhs) and
``tgmm``, driven by a visit schedule computed in the wrapper and scalar-prefetched into SMEM.

Same semantics as kernel.py (group g owns rows [start[g], end[g]), rows past the last group
give 0), written for the TPU instead of Triton: a TPU core runs its grid steps one after the
other and Pallas pipelines the HBM <-> VMEM copies of the blocks that the index maps select, so
the grids below walk a precomputed list of *visits* and the index maps read that list.

Visit schedule (``visit_schedule``; V = m_tiles + G - 1 visits, a static bound). A visit is
one (m tile, group) pair with the rows [lo, hi) they share:
* gmm (``per="tile"``): m tiles in order; for each, the groups whose rows meet it (one visit
  per group; a tile that straddles a boundary gets two or more), or one inactive visit (lo ==
  hi) for tiles past the last group, which then store zeros.
* tgmm (``per="group"``): groups in order; for each, the m tiles its rows meet, or one inactive
  visit for an empty group, which then stores a zero out[g].
Unused visits at the end (V is an upper bound) are inactive and repeat the last visit's blocks.
Inactive visits fetch the blocks of the previous active visit (``fetch_*`` arrays; gmm also
holds the k block at the last one), so Pallas sees an unchanged block index and copies nothing.

* gmm: grid (N tiles "parallel", visits, K tiles). acc [bm, bn] float32 in VMEM scratch is
  zeroed at k == 0 and gets lhs[tile, k] @ rhs[group][k, n] per k step (no masking: rows of
  a matmul are independent); at the last k step the rows [lo, hi) of acc are selected into the
  output block (the other rows: zeros on a tile's first visit, else what earlier visits of the
  tile stored). Consecutive visits of one tile keep the output block index, so the block stays
  in VMEM and is written back to HBM once, after the tile's last visit.
* tgmm: grid (K tiles, N tiles "parallel", visits). acc [bk, bn] float32 is zeroed on a
  group's first visit, gets lhs[tile, k].T @ dout[tile, n] with the rows outside [lo, hi)
  selected to 0 in both operands (only on tiles the group covers partially; select, not
  multiply, so NaN in rows of other groups or past the end never leaks in) and is stored to
  out[g] on the group's last visit.

Tiles (``resolve_tiling``). TPU blocks are (sublane, lane) tiled: the last dim of a block a
multiple of 128, the second to last of 8 (float32) or 16 (bfloat16, two rows per sublane);
the MXU is 128 x 128 (v5e, v5p) or 256 x 256 (v6e). Defaults (block_m, block_n, block_k):
(512, 1024, 1024) for bfloat16, (512, 512, 512) for float32. Why: a gmm grid step reads
bm·bk + bk·bn elements and does 2·bm·bk·bn flops, bm·bn / (bm + bn) flops per byte for bf16:
341 at (512, 1024) against the 240 a v5e needs to stay MXU-bound (197 TFLOP/s / 819 GB/s; v5p
166); a k step is ~1 GFLOP (~5 us on a v5e), far above the ~0.35 us per-step overhead; and the
VMEM use (double-buffered lhs, rhs, out blocks + the f32 acc) is ~10 MiB for gmm and ~12 MiB
for tgmm (bf16), inside the 16 MiB scoped VMEM default of v5e / v5p. float32 dots run in
several MXU passes (HIGHEST precision), compute-bound at smaller tiles (7 MiB). Each block is
capped to its dimension (rounded up to 128 lanes or to the sublane multiple) and the number of
tiles along a dimension is kept while the block is shrunk to the smallest multiple that covers
it (N = 1408 at 1024: two tiles of 768, not one of 2048), so padding stays small.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas._util import cdiv as _cdiv, dot_f32 as _dot
from kernels_pallas.grouped_matmul.kernel import group_bounds

MOSAIC_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_LANES = 128
_MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
  """Static description of one Mosaic kernel call (hashable: a ``custom_vjp`` nondiff arg).

  gmm: output tile (block_m, block_n), contraction step block_k. tgmm: output tile of out[g]
  (block_k, block_n), rows in steps of block_m. ``interpret``: run in Pallas TPU interpret mode
  on the CPU (``pltpu.InterpretParams``: uninitialised VMEM reads NaN, parallel grid axes are
  visited in a shuffled order), the numerics check of the compiled kernel."""
  block_m: int
  block_n: int
  block_k: int
  interpret: bool = False


def default_tiling(dtype) -> tuple[int, int, int]:
  """(block_m, block_n, block_k) when ``tiling`` is None (module docstring: why)."""
  return (512, 512, 512) if jnp.dtype(dtype) == jnp.float32 else (512, 1024, 1024)


def sublanes(dtype) -> int:
  """Rows per (sublane) tile of a block: 8 for 32-bit, 16 for 16-bit dtypes."""
  return 8 * (4 // jnp.dtype(dtype).itemsize)


def _fit_block(block: int, dim: int, unit: int) -> int:
  """The block for ``dim``: as many tiles as ``block`` needs, each the smallest multiple of
  ``unit`` that still covers ``dim`` with that many tiles."""
  dim_u = _cdiv(max(dim, 1), unit) * unit
  tiles = _cdiv(dim_u, min(block, dim_u))
  return _cdiv(_cdiv(dim_u, tiles), unit) * unit


def resolve_tiling(tiling, dtype, m: int, k: int, n: int) -> tuple[int, int, int]:
  """Validated (block_m, block_n, block_k) for the Mosaic kernels, fitted to (M, N, K)."""
  sub = sublanes(dtype)
  tiles = default_tiling(dtype) if tiling is None else tuple(tiling)
  if (len(tiles) != 3 or not all(isinstance(t, int) and t > 0 for t in tiles)
      or tiles[0] % sub or tiles[1] % _LANES or tiles[2] % _LANES):
    raise ValueError(f"tiling={tiling!r}; expected (block_m, block_n, block_k) for Mosaic with "
                     f"block_m a multiple of {sub} ({jnp.dtype(dtype).name} sublanes) and "
                     f"block_n, block_k multiples of {_LANES} (TPU lanes), e.g. (512, 1024, 1024)")
  bm, bn, bk = tiles
  return _fit_block(bm, m, sub), _fit_block(bn, n, _LANES), _fit_block(bk, k, _LANES)


# ----------------------------------------------------------------------------------------------
# visit schedule (scalar-prefetch operands)
# ----------------------------------------------------------------------------------------------

def visit_schedule(group_sizes_G: jax.Array, num_rows: int, num_m_tiles: int, block_m: int, *,
                   per: str) -> dict[str, jax.Array]:
  """The visits of the gmm (``per="tile"``) or tgmm (``per="group"``) grid (module docstring).

  Returns int32 [V] arrays, V = num_m_tiles + G - 1: ``tile`` and ``group`` of each visit (the
  output block: tile for gmm, group for tgmm), ``lo`` / ``hi`` its absolute rows (lo == hi:
  inactive), ``first`` / ``last`` (1 on a tile's (gmm) or group's (tgmm) first / last visit),
  ``fetch_tile`` / ``fetch_group`` the blocks to read (the previous active visit's when
  inactive) and ``active``."""
  g_count = group_sizes_G.shape[0]
  num_visits = num_m_tiles + g_count - 1
  start, end = group_bounds(group_sizes_G, num_rows)
  total = end[-1]
  v = jnp.arange(num_visits, dtype=jnp.int32)
  if per == "tile":
    tile_lo = jnp.arange(num_m_tiles, dtype=jnp.int32) * block_m
    tile_last = jnp.minimum(tile_lo + block_m, total) - 1
    first_g = jnp.searchsorted(end, tile_lo, side="right").astype(jnp.int32)
    last_g = jnp.searchsorted(end, tile_last, side="right").astype(jnp.int32)
    count = jnp.where(tile_last >= tile_lo, last_g - first_g + 1, 1)      # >= 1 visit per tile
    offset = jnp.cumsum(count, dtype=jnp.int32)
    owner = jnp.minimum(jnp.searchsorted(offset, v, side="right"), num_m_tiles - 1)
    within = v - (offset[owner] - count[owner])
    tile, group = owner, jnp.minimum(first_g[owner] + within, g_count - 1)
  elif per == "group":
    t0, t1 = start // block_m, (end - 1) // block_m
    count = jnp.where(end > start, t1 - t0 + 1, 1)                         # >= 1 visit per group
    offset = jnp.cumsum(count, dtype=jnp.int32)
    owner = jnp.minimum(jnp.searchsorted(offset, v, side="right"), g_count - 1)
    within = v - (offset[owner] - count[owner])
    group, tile = owner, jnp.minimum(t0[owner] + within, num_m_tiles - 1)
  else:
    raise ValueError(f"per={per!r}; expected 'tile' (gmm) or 'group' (tgmm)")
  valid = v < offset[-1]
  row0 = tile * block_m
  lo = jnp.maximum(start[group], row0)
  hi = jnp.minimum(end[group], row0 + block_m)
  active = valid & (hi > lo)
  lo, hi = jnp.where(active, lo, 0), jnp.where(active, hi, 0)
  # Inactive visits read the blocks of the last active visit before them (0 if none): tiles
  # and groups are non-decreasing over the active visits, so a running max carries them.
  carry = lambda x: lax.cummax(jnp.where(active, x, 0))
  as_i32 = lambda x: x.astype(jnp.int32)
  first, last = valid & (within == 0), valid & (within == count[owner] - 1)
  return dict(tile=as_i32(tile), group=as_i32(group), lo=as_i32(lo), hi=as_i32(hi),
              first=as_i32(first), last=as_i32(last), fetch_tile=as_i32(carry(tile)),
              fetch_group=as_i32(carry(group)), active=as_i32(active))


def _interpret(cfg: MosaicConfig):
  return pltpu.InterpretParams() if cfg.interpret else False


def _vmem_limit(*block_bytes: int) -> int:
  """Scoped VMEM to ask for: the blocks (inputs / outputs double-buffered by the caller's
  count) with 50% headroom, at least the 16 MiB default, in whole MiB."""
  need = sum(block_bytes) * 3 // 2
  return max(16, _cdiv(need, _MIB)) * _MIB


def _row_mask(shape, row0, lo, hi):
  rows = row0 + lax.broadcasted_iota(jnp.int32, shape, 0)
  return jnp.logical_and(rows >= lo, rows < hi)


# ----------------------------------------------------------------------------------------------
# gmm: out [M, N] = per-row-group lhs @ rhs[g] (or rhs[g].T)
# ----------------------------------------------------------------------------------------------

def _gmm_kernel(tile_ref, _fetch_tile_ref, _fetch_group_ref, lo_ref, hi_ref, first_ref,
                lhs_ref, rhs_ref, out_ref, acc_ref, *, block_m: int, num_k: int,
                transpose_rhs: bool):
  v, kk = pl.program_id(1), pl.program_id(2)
  lo, hi = lo_ref[v], hi_ref[v]

  @pl.when(kk == 0)
  def _zero():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(hi > lo)
  def _accumulate():
    acc_ref[...] += _dot(lhs_ref[...], rhs_ref[...], trans_b=transpose_rhs)

  @pl.when(kk == num_k - 1)
  def _store():
    keep = _row_mask(out_ref.shape, tile_ref[v] * block_m, lo, hi)
    acc = acc_ref[...].astype(out_ref.dtype)

    @pl.when(first_ref[v] != 0)
    def _first_visit():             # rows of no visit so far (other groups / past the end): 0
      out_ref[...] = jnp.where(keep, acc, jnp.zeros_like(acc))

    @pl.when(first_ref[v] == 0)
    def _later_visit():
      out_ref[...] = jnp.where(keep, acc, out_ref[...])


def gmm(cfg: MosaicConfig, lhs_MxK: jax.Array, rhs: jax.Array, group_sizes_G: jax.Array, *,
        num_rows: int, transpose_rhs: bool, out_dtype) -> jax.Array:
  """Padded gmm: lhs [Mp, Kp], rhs [G, Kp, Np] (or [G, Np, Kp] with ``transpose_rhs``) ->
  out [Mp, Np] in ``out_dtype``; ``num_rows`` is the unpadded M (groups are clipped to it)."""
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  mp, kp = lhs_MxK.shape
  np_ = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  assert mp % bm == 0 and kp % bk == 0 and np_ % bn == 0, (lhs_MxK.shape, rhs.shape, cfg)
  num_m, num_n, num_k = mp // bm, np_ // bn, kp // bk
  s = visit_schedule(group_sizes_G, num_rows, num_m, bm, per="tile")
  meta = (s["tile"], s["fetch_tile"], s["fetch_group"], s["lo"], s["hi"], s["first"])

  def k_at(v, k, lo_ref, hi_ref):   # inactive visits hold the last k block: no copy
    return jnp.where(hi_ref[v] > lo_ref[v], k, num_k - 1)

  def lhs_map(n, v, k, tile_ref, ftile_ref, fgroup_ref, lo_ref, hi_ref, first_ref):
    return ftile_ref[v], k_at(v, k, lo_ref, hi_ref)

  def rhs_map(n, v, k, tile_ref, ftile_ref, fgroup_ref, lo_ref, hi_ref, first_ref):
    kb = k_at(v, k, lo_ref, hi_ref)
    return (fgroup_ref[v], n, kb) if transpose_rhs else (fgroup_ref[v], kb, n)

  def out_map(n, v, k, tile_ref, *_):
    return tile_ref[v], n

  rhs_block = (None, bn, bk) if transpose_rhs else (None, bk, bn)
  isz, osz = lhs_MxK.dtype.itemsize, jnp.dtype(out_dtype).itemsize
  vmem = _vmem_limit(2 * bm * bk * isz, 2 * bk * bn * isz, 2 * bm * bn * osz, bm * bn * 4)
  kernel = functools.partial(_gmm_kernel, block_m=bm, num_k=num_k, transpose_rhs=transpose_rhs)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(meta),
          grid=(num_n, meta[0].shape[0], num_k),
          in_specs=[pl.BlockSpec((bm, bk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
          out_specs=pl.BlockSpec((bm, bn), out_map),
          scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary"), vmem_limit_bytes=vmem),
      interpret=_interpret(cfg),
      name="grouped_matmul_gmm_t_mosaic" if transpose_rhs else "grouped_matmul_gmm_mosaic",
  )(*meta, lhs_MxK, rhs)


# ----------------------------------------------------------------------------------------------
# tgmm: out [G, K, N] = per-group lhs[rows].T @ dout[rows]
# ----------------------------------------------------------------------------------------------

def _tgmm_kernel(_group_ref, tile_ref, lo_ref, hi_ref, first_ref, last_ref, lhs_ref, dout_ref,
                 out_ref, acc_ref, *, block_m: int):
  v = pl.program_id(2)
  lo, hi = lo_ref[v], hi_ref[v]
  row0 = tile_ref[v] * block_m
  full = jnp.logical_and(lo == row0, hi == row0 + block_m)
  contract_rows = lambda x, dy: _dot(x, dy, trans_a=True)

  @pl.when(first_ref[v] != 0)
  def _zero():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(full)
  def _whole_tile():
    acc_ref[...] += contract_rows(lhs_ref[...], dout_ref[...])

  @pl.when(jnp.logical_and(hi > lo, jnp.logical_not(full)))
  def _partial_tile():           # select both operands: 0 * NaN would leak from other rows
    x, dy = lhs_ref[...], dout_ref[...]
    x = jnp.where(_row_mask(x.shape, row0, lo, hi), x, jnp.zeros_like(x))
    dy = jnp.where(_row_mask(dy.shape, row0, lo, hi), dy, jnp.zeros_like(dy))
    acc_ref[...] += contract_rows(x, dy)

  @pl.when(last_ref[v] != 0)
  def _store():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(cfg: MosaicConfig, lhs_MxK: jax.Array, dout_MxN: jax.Array, group_sizes_G: jax.Array,
         *, num_rows: int, out_dtype) -> jax.Array:
  """Padded tgmm: lhs [Mp, Kp], dout [Mp, Np] -> out [G, Kp, Np] in ``out_dtype``."""
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  mp, kp = lhs_MxK.shape
  np_ = dout_MxN.shape[1]
  assert mp % bm == 0 and kp % bk == 0 and np_ % bn == 0, (lhs_MxK.shape, dout_MxN.shape, cfg)
  g = group_sizes_G.shape[0]
  s = visit_schedule(group_sizes_G, num_rows, mp // bm, bm, per="group")
  # The fetched tile is the visit's own on active visits (inactive ones only zero / store).
  meta = (s["group"], s["fetch_tile"], s["lo"], s["hi"], s["first"], s["last"])

  def lhs_map(k, n, v, group_ref, ftile_ref, *_):
    return ftile_ref[v], k

  def dout_map(k, n, v, group_ref, ftile_ref, *_):
    return ftile_ref[v], n

  def out_map(k, n, v, group_ref, *_):
    return group_ref[v], k, n

  isz, osz = lhs_MxK.dtype.itemsize, jnp.dtype(out_dtype).itemsize
  vmem = _vmem_limit(2 * bm * bk * isz, 2 * bm * bn * isz, 2 * bk * bn * osz, bk * bn * 4)
  return pl.pallas_call(
      functools.partial(_tgmm_kernel, block_m=bm),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(meta),
          grid=(kp // bk, np_ // bn, meta[0].shape[0]),
          in_specs=[pl.BlockSpec((bm, bk), lhs_map), pl.BlockSpec((bm, bn), dout_map)],
          out_specs=pl.BlockSpec((None, bk, bn), out_map),
          scratch_shapes=[pltpu.VMEM((bk, bn), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct((g, kp, np_), out_dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary"), vmem_limit_bytes=vmem),
      interpret=_interpret(cfg),
      name="grouped_matmul_tgmm_mosaic",
  )(*meta, lhs_MxK, dout_MxN)
