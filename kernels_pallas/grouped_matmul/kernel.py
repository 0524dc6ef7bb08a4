"""Pallas grouped matmul kernels for dropless MoE: ``gmm`` (optionally with transposed rhs) and
``tgmm``, plus the tile metadata both are driven by.

Rows of ``lhs`` are grouped contiguously: group g owns rows [start[g], end[g]) with
``end = min(cumsum(max(sizes, 0)), M)`` and ``start = end`` shifted right by one (0 first). Rows
at or past ``end[G-1]`` belong to no group.

gmm   out[r, :] = lhs[r, :] @ rhs[g(r)]            rhs [G, K, N]   (0 for rows in no group)
gmm_t out[r, :] = lhs[r, :] @ rhs[g(r)].T          rhs [G, N, K]
tgmm  out[g]    = lhs[rows of g].T @ dout[rows of g]              out [G, K, N]  (0 if empty)

Written for the Pallas Triton (GPU) lowering and for ``interpret=True`` on CPU. GPU programs run
concurrently, so the grids are chosen such that every program owns exactly one output tile and
writes it once: no atomics, no races, deterministic results.

* ``gmm``: grid (N tiles, M tiles); axis 0 varies fastest on the GPU, so the programs in flight
  share a few lhs row tiles (read from DRAM once, then L2) and the weights of one or two experts.
  Metadata per M tile (``gmm_tile_metadata``: first group intersecting the tile and the number
  of groups intersecting it, from ``searchsorted`` over the group ends). A program loops over
  those groups (one, except at group boundaries) and, for each, runs the K loop
  ``acc += lhs[tile rows, k] @ rhs[g][k, n tile]`` with the lhs rows outside the group loaded as
  zeros (a masked load: rows of other groups contribute nothing, and garbage or NaN in rows past
  the end is never read). One float32 accumulator per program; a group with no row in the tile
  gets a zero-trip K loop. Tiles past the last group write zeros.
* ``tgmm`` (the weight gradient): grid (N tiles, K tiles, G). Grid row z handles group
  ``order[z]`` (groups by decreasing size: the longest programs start first, which shortens the
  tail on skewed sizes). A program loops over the M tiles covering its group's rows
  [start[g], end[g]), loads lhs and dout rows with the rows outside the group masked to zero, and
  accumulates ``lhs_tile.T @ dout_tile`` in float32; it stores its (K tile, N tile) of out[g].
  Empty group: zero trips, zeros written. All programs of one group are adjacent in launch order,
  so the group's rows stay in L2 while its K x N tiles are computed.

Every block size is a power of two >= 16 (Triton ``tl.dot``); inputs here are already padded: M
to a multiple of ``block_m``, the contraction and output-column dims to multiples of their
blocks. ``ops.py`` pads, dispatches and wraps everything in ``jax.custom_vjp``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from kernels_pallas._util import dot_f32 as _dot


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static description of one kernel call (hashable: used as a ``custom_vjp`` nondiff arg).

  For gmm the output tile is (block_m, block_n) and block_k is the contraction step; for tgmm the
  output tile of out[g] is (block_k, block_n) and block_m the contraction (row) step."""
  block_m: int
  block_n: int
  block_k: int
  interpret: bool = False
  num_warps: int | None = None
  num_stages: int | None = None


def _masked_load(ref, mask, dtype):
  """Load ``ref`` (a view) with the False positions of ``mask`` read as 0 (never touched)."""
  from jax.experimental.pallas import triton as plgpu  # masked load: Triton and interpret
  return plgpu.load(ref, mask=mask, other=jnp.zeros((), dtype))


def _compiler_params(cfg: KernelConfig):
  if cfg.interpret:
    return {}
  from jax.experimental.pallas import triton as plgpu  # GPU-only import, kept lazy
  big = cfg.block_m * cfg.block_n >= 128 * 128 or cfg.block_k * cfg.block_n >= 128 * 128
  return dict(compiler_params=plgpu.CompilerParams(
      num_warps=cfg.num_warps or (8 if big else 4), num_stages=cfg.num_stages or 3))


def _trips_if(nonempty, trips):
  """``trips`` where ``nonempty`` else 0, as an int32 loop bound. Not ``jnp.where(c, n, 0)``:
  the Pallas Triton lowering (jax 0.11.2) types a weakly typed Python-scalar branch of a scalar
  select like the predicate (i1), so the bound became an i1 next to the i32 lower bound and
  Triton rejected the loop ('scf.for' op failed to verify that all of {lowerBound, upperBound,
  step} have same type). A bool -> int32 cast times the count lowers to plain i32 arithmetic."""
  return nonempty.astype(jnp.int32) * trips


def _full_spec(x):
  """The whole (1-D metadata) array for every program."""
  return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


# ----------------------------------------------------------------------------------------------
# metadata
# ----------------------------------------------------------------------------------------------

def group_bounds(group_sizes_G: jax.Array, num_rows: int):
  """(start_G, end_G) int32 row ranges of the groups; negative sizes count as 0 and the ranges
  are clipped at ``num_rows`` (groups past the end of lhs get fewer or no rows)."""
  sizes = jnp.maximum(group_sizes_G.astype(jnp.int32), 0)
  end = jnp.minimum(jnp.cumsum(sizes, dtype=jnp.int32), num_rows)
  start = jnp.concatenate([jnp.zeros((1,), jnp.int32), end[:-1]])
  return start, end


def gmm_tile_metadata(group_sizes_G: jax.Array, num_rows: int, num_m_tiles: int, block_m: int):
  """Per-M-tile group lists for ``gmm``: (start_G, end_G, first_T, count_T).

  Tile i covers rows [i·bm, (i+1)·bm); ``first[i]`` is the group owning row i·bm and
  ``count[i]`` the number of consecutive groups first..first+count-1 that may own rows of the
  tile (empty groups inside that range are skipped by the kernel); 0 for tiles starting at or
  past the last grouped row."""
  start, end = group_bounds(group_sizes_G, num_rows)
  total = end[-1]
  tile_lo = jnp.arange(num_m_tiles, dtype=jnp.int32) * block_m
  tile_last = jnp.minimum(tile_lo + block_m, total) - 1
  first = jnp.searchsorted(end, tile_lo, side="right").astype(jnp.int32)
  last = jnp.searchsorted(end, tile_last, side="right").astype(jnp.int32)
  count = jnp.where(tile_last >= tile_lo, last - first + 1, 0).astype(jnp.int32)
  first = jnp.minimum(first, group_sizes_G.shape[0] - 1)    # never read when count == 0
  return start, end, first, count


# ----------------------------------------------------------------------------------------------
# gmm: out [M, N] = per-row-group lhs @ rhs[g] (or rhs[g].T)
# ----------------------------------------------------------------------------------------------

def _gmm_kernel(start_ref, end_ref, first_ref, count_ref, lhs_ref, rhs_ref, out_ref, *,
                cfg: KernelConfig, num_k_tiles: int, transpose_rhs: bool):
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  i = pl.program_id(1)                                       # M tile (axis 0 is the N tile)
  row0 = i * bm
  rows = row0 + lax.broadcasted_iota(jnp.int32, (bm, bk), 0)
  first = first_ref[i]
  count = count_ref[i]

  def group_body(t, acc):
    g = first + t
    lo = jnp.maximum(start_ref[g], row0)
    hi = jnp.minimum(end_ref[g], row0 + bm)
    in_group = jnp.logical_and(rows >= lo, rows < hi)       # [bm, bk], invariant in the K loop
    num_k = _trips_if(hi > lo, num_k_tiles)

    def k_body(kk, acc):
      k0 = pl.multiple_of(kk * bk, bk)
      x = _masked_load(lhs_ref.at[:, pl.ds(k0, bk)], in_group, lhs_ref.dtype)   # [bm, bk]
      if transpose_rhs:
        w = rhs_ref[g, :, pl.ds(k0, bk)]                                         # [bn, bk]
      else:
        w = rhs_ref[g, pl.ds(k0, bk), :]                                         # [bk, bn]
      return acc + _dot(x, w, trans_b=transpose_rhs)

    return lax.fori_loop(0, num_k, k_body, acc)

  acc = lax.fori_loop(0, count, group_body, jnp.zeros((bm, bn), jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


def gmm(cfg: KernelConfig, lhs_MxK: jax.Array, rhs: jax.Array, group_sizes_G: jax.Array, *,
        num_rows: int, transpose_rhs: bool, out_dtype) -> jax.Array:
  """Padded gmm: lhs [Mp, Kp], rhs [G, Kp, Np] (or [G, Np, Kp] with ``transpose_rhs``) ->
  out [Mp, Np] in ``out_dtype``. ``num_rows`` is the unpadded M (groups are clipped to it)."""
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  mp, kp = lhs_MxK.shape
  g = rhs.shape[0]
  np_ = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  assert mp % bm == 0 and kp % bk == 0 and np_ % bn == 0, (lhs_MxK.shape, rhs.shape, cfg)
  num_m, num_n = mp // bm, np_ // bn
  meta = gmm_tile_metadata(group_sizes_G, num_rows, num_m, bm)
  if transpose_rhs:
    rhs_spec = pl.BlockSpec((g, bn, kp), lambda j, i: (0, j, 0))
  else:
    rhs_spec = pl.BlockSpec((g, kp, bn), lambda j, i: (0, 0, j))
  kernel = functools.partial(_gmm_kernel, cfg=cfg, num_k_tiles=kp // bk,
                             transpose_rhs=transpose_rhs)
  return pl.pallas_call(
      kernel,
      grid=(num_n, num_m),
      in_specs=[*(_full_spec(x) for x in meta),
                pl.BlockSpec((bm, kp), lambda j, i: (i, 0)),
                rhs_spec],
      out_specs=pl.BlockSpec((bm, bn), lambda j, i: (i, j)),
      out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
      interpret=cfg.interpret,
      name="grouped_matmul_gmm_t" if transpose_rhs else "grouped_matmul_gmm",
      **_compiler_params(cfg),
  )(*meta, lhs_MxK, rhs)


# ----------------------------------------------------------------------------------------------
# tgmm: out [G, K, N] = per-group lhs[rows].T @ dout[rows]
# ----------------------------------------------------------------------------------------------

def _tgmm_kernel(order_ref, start_ref, end_ref, lhs_ref, dout_ref, out_ref, *,
                 cfg: KernelConfig):
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  g = order_ref[pl.program_id(2)]                    # groups in decreasing size order
  k0 = pl.multiple_of(pl.program_id(1) * bk, bk)
  n0 = pl.multiple_of(pl.program_id(0) * bn, bn)
  lo = start_ref[g]
  hi = end_ref[g]
  tile0 = lo // bm
  num_tiles = _trips_if(hi > lo, (hi + bm - 1) // bm - tile0)
  iota_k = lax.broadcasted_iota(jnp.int32, (bm, bk), 0)
  iota_n = lax.broadcasted_iota(jnp.int32, (bm, bn), 0)

  def body(t, acc):
    row0 = pl.multiple_of((tile0 + t) * bm, bm)
    in_k = jnp.logical_and(row0 + iota_k >= lo, row0 + iota_k < hi)
    in_n = jnp.logical_and(row0 + iota_n >= lo, row0 + iota_n < hi)
    x = _masked_load(lhs_ref.at[pl.ds(row0, bm), :], in_k, lhs_ref.dtype)     # [bm, bk]
    dy = _masked_load(dout_ref.at[pl.ds(row0, bm), :], in_n, dout_ref.dtype)  # [bm, bn]
    return acc + _dot(x, dy, trans_a=True)

  acc = lax.fori_loop(0, num_tiles, body, jnp.zeros((bk, bn), jnp.float32))
  out_ref[g, pl.ds(k0, bk), pl.ds(n0, bn)] = acc.astype(out_ref.dtype)


def tgmm(cfg: KernelConfig, lhs_MxK: jax.Array, dout_MxN: jax.Array, group_sizes_G: jax.Array,
         *, num_rows: int, out_dtype) -> jax.Array:
  """Padded tgmm: lhs [Mp, Kp], dout [Mp, Np] -> out [G, Kp, Np] in ``out_dtype``."""
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  mp, kp = lhs_MxK.shape
  np_ = dout_MxN.shape[1]
  assert mp % bm == 0 and kp % bk == 0 and np_ % bn == 0, (lhs_MxK.shape, dout_MxN.shape, cfg)
  g = group_sizes_G.shape[0]
  start, end = group_bounds(group_sizes_G, num_rows)
  # Largest groups first: their programs run longest, so launching them first shortens the tail
  # when sizes are skewed (the output is written at out[g], so any order is race-free).
  order = jnp.argsort(start - end, stable=True).astype(jnp.int32)
  meta = (order, start, end)
  return pl.pallas_call(
      functools.partial(_tgmm_kernel, cfg=cfg),
      grid=(np_ // bn, kp // bk, g),
      in_specs=[*(_full_spec(x) for x in meta),
                pl.BlockSpec((mp, bk), lambda n, k, gg: (0, k)),
                pl.BlockSpec((mp, bn), lambda n, k, gg: (0, n))],
      # The whole [G, Kp, Np] output: a program stores its (bk, bn) tile of out[order[z]].
      out_specs=pl.BlockSpec((g, kp, np_), lambda n, k, gg: (0, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((g, kp, np_), out_dtype),
      interpret=cfg.interpret,
      name="grouped_matmul_tgmm",
      **_compiler_params(cfg),
  )(*meta, lhs_MxK, dout_MxN)
