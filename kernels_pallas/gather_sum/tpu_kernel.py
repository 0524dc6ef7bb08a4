"""Mosaic TPU kernels for weighted row gathers: gather-sum and gather-dot (``impl="mosaic"`` /
``"mosaic_interpret"`` in ``ops.py``), plus the XLA scatter-add of their table gradients.
Written for the TPU memory hierarchy (docs/kernels.md, "TPU (Mosaic) gather kernels"):

* **indices in SMEM**: idx (and gather-sum's weights) are scalar-prefetched
  (``pltpu.PrefetchScalarGridSpec``) as flat [Tc·Sp] arrays. SMEM holds 1 MiB per core and a
  real batch's indices 8 MiB (16,384 x 128 int32), so the wrapper runs one ``pallas_call`` per
  chunk of at most ``chunk_selections`` indices (``lax.map`` over the chunks);
* **rows by DMA from HBM** (``memory_space=pltpu.HBM``: with ``pl.ANY`` XLA may put a small
  table in VMEM, where one-row slices are refused): each selected row's [1, bd] slice has its own
  ``pltpu.make_async_copy`` into a VMEM buffer [2, Sp, bd]; the S copies of token t + 1 are in
  flight (one DMA semaphore, waited S times) while token t's rows are reduced;
* **float32 reduction on the VPU**, 8 rows (one vreg of sublanes) at a time: gather-sum
  multiplies a weight column [8, 1] built from SMEM scalars by rows [8, bd] and reduces over
  sublanes once per token; gather-dot reduces rows · x over lanes to an [8, 1] score column. The
  MXU is not used: with one token's rows as its stationary operand it is bound by weight loads.

Grids: gather-sum (token blocks of 32, D blocks), both parallel, output block [bt, bd];
gather-dot (token blocks of 128, D blocks), D sequential, accumulating into an [Sp, 128] block
with the tokens on lanes (the wrapper transposes the small [T, S] result). S is padded to a
multiple of 8 (rows past S are zero, weight 0) and T to whole chunks (padding tokens read row 0
with weight 0). D is tiled in multiples of 128 (``pick_block_d``); a D that is not a multiple of
128 is one whole-D block. The table is never padded or copied, except bfloat16 tables, which
are repacked into uint32 row pairs (``pack_row_pairs`` says why); float16 tables are refused.

The table gradient (``table_grad``) is XLA's scatter-add into float32, one [T, D] update per
slot: not a deterministic reverse-index kernel like ``kernel.py``'s (that needs the sort plus
per-row DMAs of token rows; left until TPU profiles show the scatter matters).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas._util import cdiv

F32 = jnp.float32
LANES = 128
DOT_TOKENS = 128        # gather-dot tokens per grid step: its output block has tokens on lanes
MAX_BLOCK_D = 1024      # default D tile cap (elements): one [8, bd] float32 chunk = 8 vregs
ROWS = 8                # buffer rows reduced at a time: one 32-bit tile of sublanes
BUFFER_BYTES = 4 << 20  # default cap of the [2, Sp, bd] row buffer in VMEM
PACK_ROWS = 1 << 16     # bfloat16 rows repacked per step (pack_row_pairs)


@dataclasses.dataclass(frozen=True)
class MosaicTiles:
  """Static launch parameters of the Mosaic kernels (``ops.make_plan`` fills them)."""
  block_tokens: int = 32          # gather-sum tokens per grid step (a multiple of 16)
  block_d: int | None = None      # D tile: a multiple of 128 dividing D; None = default
  chunk_selections: int = 65536   # T·S indices per pallas_call (SMEM: 256 KiB each of idx, w)
  interpret: bool = False         # Pallas TPU interpret mode (CPU), DMAs and semaphores included


def make_tiles(dim: int, *, interpret: bool, block_tokens=None, block_d=None,
               **triton_only) -> MosaicTiles:
  """MosaicTiles for a table of width ``dim`` (one-line ValueError for a bad option)."""
  given = sorted(k for k, v in triton_only.items() if v is not None)
  if given:
    raise ValueError(f"{', '.join(given)} tune the Triton kernels; impl='mosaic' takes only "
                     "block_tokens and block_d: drop the others")
  if block_tokens is not None and (not isinstance(block_tokens, int) or block_tokens < 16
                                   or block_tokens % 16):
    raise ValueError(f"block_tokens={block_tokens!r} must be a positive multiple of 16 for "
                     "impl='mosaic' (output tiles of 8 / 16 sublanes)")
  pick_block_d(dim, block_d)
  return MosaicTiles(block_tokens=block_tokens or MosaicTiles.block_tokens, block_d=block_d,
                     interpret=interpret)


def _round_up(x: int, m: int) -> int:
  return cdiv(x, m) * m


def check_table_dtype(table_NxD) -> None:
  """One-line ValueError for a table the kernels cannot read (see "16-bit tables")."""
  n, dtype = table_NxD.shape[0], jnp.dtype(table_NxD.dtype)
  if dtype not in (jnp.dtype(F32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f"impl='mosaic' reads float32 or bfloat16 tables; got {dtype}: cast the "
                     "table or use impl='xla'")
  if dtype.itemsize == 2 and n % 2:
    raise ValueError(f"impl='mosaic' reads bfloat16 tables as row pairs and needs an even N; "
                     f"got N={n}: add a row or use impl='xla'")


def pick_block_d(dim: int, block_d: int | None, sp: int = ROWS) -> int:
  """The D tile: ``block_d`` if given (checked), else the whole D when it is not a multiple of
  128, else the largest multiple of 128 dividing D that is <= 1024 and keeps the row buffer
  [2, Sp, bd] (32-bit) within BUFFER_BYTES (at least 128)."""
  if block_d is not None:
    if block_d % LANES or dim % block_d:
      raise ValueError(f"block_d={block_d} must be a multiple of {LANES} that divides D={dim} "
                       "for impl='mosaic'; leave it None for the default")
    return block_d
  if dim % LANES:
    return dim            # one whole-D block (Mosaic pads lanes in VMEM; the table is not copied)
  cap = max(LANES, min(MAX_BLOCK_D, BUFFER_BYTES // (2 * sp * 4)))
  return max(b for b in range(LANES, min(dim, cap) + 1, LANES) if dim % b == 0)


def _compiler_params(tiles: MosaicTiles, semantics: tuple[str, ...]):
  if tiles.interpret:
    return dict(interpret=pltpu.InterpretParams())
  return dict(compiler_params=pltpu.CompilerParams(dimension_semantics=semantics))


@dataclasses.dataclass(frozen=True)
class _Geom:
  """Static shape facts of one kernel launch."""
  num_slots: int    # S: real slots per token
  sp: int           # S rounded up to ROWS
  bt: int           # tokens per grid step
  bd: int           # D columns per grid step
  packed: bool      # bfloat16 table read as uint32 row pairs


def _launch(table_NxD, t: int, s: int, tiles: MosaicTiles, *, dot: bool):
  """(geometry, number of token chunks n, tokens per chunk tc). A chunk's indices (and weights)
  fill at most ``chunk_selections`` SMEM entries where one token block allows it. gather-dot
  steps over 128 tokens (its output block has tokens on lanes); when 128 tokens' indices do not
  fit, or T < 128, a chunk is one smaller block (a block as wide as its array is allowed)."""
  sp = _round_up(s, ROWS)
  fit = max(16, tiles.chunk_selections // sp // 16 * 16)   # tokens whose indices fit in SMEM
  if dot and min(t, fit) >= DOT_TOKENS:
    bt, one_block = DOT_TOKENS, False
  else:
    bt = min(fit, _round_up(t, 16), DOT_TOKENS if dot else tiles.block_tokens)
    one_block = dot
  per_chunk = bt if one_block else max(bt, fit // bt * bt)
  n = cdiv(t, per_chunk)
  tc = per_chunk if one_block else _round_up(cdiv(t, n), bt)
  g = _Geom(num_slots=s, sp=sp, bt=bt, bd=pick_block_d(table_NxD.shape[1], tiles.block_d, sp),
            packed=jnp.dtype(table_NxD.dtype).itemsize == 2)
  return g, n, tc


def _table_operand(table_NxD, g: _Geom):
  """The table as the kernels read it: float32 as is, bfloat16 as ``pack_row_pairs``."""
  return pack_row_pairs(table_NxD) if g.packed else table_NxD


def pack_row_pairs(table_NxD, block_rows: int = PACK_ROWS) -> jax.Array:
  """bfloat16 [N, D] -> uint32 [N / 2, D]: word [r, d] holds row 2r (low half) and 2r + 1 (high
  half) at column d.

  Why: XLA stores a bfloat16 [N, D] in (8, 128)(2, 1) tiles, where one row is half of each
  32-bit word it occupies, and Mosaic refuses a one-row copy at an offset that is not a multiple
  of 8 (an in-kernel ``bitcast`` to uint32 gives (4, 128) tiles with the same rule). Cost: one
  read and write of the table per call. XLA materialises the strided row slices, so the pairs
  are made ``block_rows`` rows at a time (``lax.map``): at N = 2^20, D = 1024 the temporaries
  are 0.2 GiB besides the 2 GiB result, instead of 2 GiB."""
  n, dim = table_NxD.shape

  def pack(rows):
    half = lambda r: lax.bitcast_convert_type(r, jnp.uint16).astype(jnp.uint32)
    return half(rows[0::2]) | (half(rows[1::2]) << 16)

  if n <= block_rows or n % block_rows:
    return pack(table_NxD)
  blocks = lax.map(pack, table_NxD.reshape(n // block_rows, block_rows, dim))
  return blocks.reshape(n // 2, dim)


# ----------------------------------------------------------------------------------------------
# shared DMA pipeline: the S rows of one token into one half of the VMEM buffer
# ----------------------------------------------------------------------------------------------

def _row_copy(words_hbm, buf, sem, slot, j, row, d0, bd):
  cols = slice(None) if bd == words_hbm.shape[1] else pl.ds(d0, bd)
  return pltpu.make_async_copy(words_hbm.at[pl.ds(row, 1), cols],
                               buf.at[slot, pl.ds(j, 1), :], sem.at[slot])


def _token_loop(idx_sm, table_hbm, buf, sem, base, d0, consume, g: _Geom):
  """For t in [0, bt): the rows of token base + t land in buf[t % 2] while token t - 1 is
  consumed; ``consume(t, slot)`` reads buf[slot] once its S copies have completed."""
  if g.num_slots < g.sp:  # rows past S are never copied: keep them zero (weight 0 / sliced off)
    buf[:, g.num_slots:, :] = jnp.zeros((2, g.sp - g.num_slots, g.bd), buf.dtype)

  def start(slot, tok):
    def body(j, carry):
      row = idx_sm[tok * g.sp + j]
      _row_copy(table_hbm, buf, sem, slot, j, row // 2 if g.packed else row, d0, g.bd).start()
      return carry
    lax.fori_loop(0, g.num_slots, body, 0)

  def wait(slot):         # each wait consumes one row's bytes from the slot's semaphore
    def body(j, carry):
      _row_copy(table_hbm, buf, sem, slot, 0, 0, 0, g.bd).wait()
      return carry
    lax.fori_loop(0, g.num_slots, body, 0)

  start(0, base)

  def body(t, carry):
    slot = t % 2

    @pl.when(t + 1 < g.bt)
    def _():
      start(1 - slot, base + t + 1)

    wait(slot)
    consume(t, slot)
    return carry

  lax.fori_loop(0, g.bt, body, 0)


def _column(get, pos, dtype):
  """[ROWS, 1] column of the SMEM scalars get(pos + r) (scalars -> one vreg)."""
  sub = lax.broadcasted_iota(jnp.int32, (ROWS, 1), 0)
  col = jnp.zeros((ROWS, 1), dtype)
  for r in range(ROWS):
    col = jnp.where(sub == r, get(pos + r).astype(dtype), col)
  return col


def _chunk_f32(buf, slot, r0, idx_sm, pos, g: _Geom):
  """Rows r0 .. r0 + ROWS of buf[slot] as float32 [ROWS, bd] (bfloat16: the wanted half of
  each uint32 word, by the parity of its index; bf16 -> f32 is a 16-bit shift)."""
  chunk = buf[slot, pl.ds(r0, ROWS), :]
  if not g.packed:
    return chunk.astype(F32)
  odd = _column(lambda i: idx_sm[i] % 2, pos, jnp.int32) == 1
  hi = lax.bitcast_convert_type(chunk & jnp.uint32(0xFFFF0000), F32)
  lo = lax.bitcast_convert_type(chunk << jnp.uint32(16), F32)
  return jnp.where(odd, hi, lo)


# ----------------------------------------------------------------------------------------------
# gather-sum
# ----------------------------------------------------------------------------------------------

def _gather_sum_kernel(idx_sm, w_sm, table_hbm, out_ref, buf, acc_ref, sem, *, g: _Geom):
  base = pl.program_id(0) * g.bt
  d0 = pl.multiple_of(pl.program_id(1) * g.bd, g.bd)

  def consume(t, slot):
    pos0 = (base + t) * g.sp

    def chunk(c, acc):
      r0 = pl.multiple_of(c * ROWS, ROWS)
      w_col = _column(lambda i: w_sm[i], pos0 + r0, F32)
      return acc + w_col * _chunk_f32(buf, slot, r0, idx_sm, pos0 + r0, g)

    acc = lax.fori_loop(0, g.sp // ROWS, chunk, jnp.zeros((ROWS, g.bd), F32))
    row = jnp.sum(acc, axis=0, keepdims=True)                    # [1, bd]
    g0 = pl.multiple_of((t // 8) * 8, 8)
    sub = lax.broadcasted_iota(jnp.int32, (8, g.bd), 0)
    acc_ref[pl.ds(g0, 8), :] = jnp.where(sub == t % 8, row, acc_ref[pl.ds(g0, 8), :])

  _token_loop(idx_sm, table_hbm, buf, sem, base, d0, consume, g)
  out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _gather_sum_chunk(words, idx_flat, w_flat, *, num_tokens, g: _Geom, out_dtype, tiles):
  dim = words.shape[1]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(num_tokens // g.bt, dim // g.bd),
      in_specs=[pl.BlockSpec(memory_space=pltpu.HBM)],
      out_specs=pl.BlockSpec((g.bt, g.bd), lambda i, d, *_: (i, d)),
      scratch_shapes=[pltpu.VMEM((2, g.sp, g.bd), words.dtype),
                      pltpu.VMEM((g.bt, g.bd), F32), pltpu.SemaphoreType.DMA((2,))])
  return pl.pallas_call(
      functools.partial(_gather_sum_kernel, g=g), grid_spec=grid_spec,
      name="gather_sum_mosaic", out_shape=jax.ShapeDtypeStruct((num_tokens, dim), out_dtype),
      **_compiler_params(tiles, ("parallel", "parallel")),
  )(idx_flat, w_flat, words)


def _pad_meta(x_TxS, tp: int, sp: int, dtype):
  t, s = x_TxS.shape
  return jnp.pad(x_TxS.astype(dtype), ((0, tp - t), (0, sp - s)))


def _map_chunks(fn, n: int, *chunked):
  """fn over the leading-axis chunks of ``chunked`` (one call when n == 1)."""
  if n == 1:
    return fn(*(c[0] for c in chunked))[None]
  return lax.map(lambda args: fn(*args), chunked)


def gather_sum(table_NxD, idx_TxS, w_TxS, *, out_dtype, tiles: MosaicTiles) -> jax.Array:
  """out [T, D] (out_dtype) = Σ_j w[t, j] · table[idx[t, j]], float32 accumulation. idx must
  already lie in [0, N) (``ops`` clamps it): a row copy outside the table would fault."""
  check_table_dtype(table_NxD)
  t, s = idx_TxS.shape
  dim = table_NxD.shape[1]
  g, n, tc = _launch(table_NxD, t, s, tiles, dot=False)
  idx = _pad_meta(idx_TxS, n * tc, g.sp, jnp.int32).reshape(n, tc * g.sp)
  w = _pad_meta(w_TxS, n * tc, g.sp, F32).reshape(n, tc * g.sp)
  run = functools.partial(_gather_sum_chunk, _table_operand(table_NxD, g), num_tokens=tc, g=g,
                          out_dtype=out_dtype, tiles=tiles)
  return _map_chunks(run, n, idx, w).reshape(n * tc, dim)[:t]


# ----------------------------------------------------------------------------------------------
# gather-dot
# ----------------------------------------------------------------------------------------------

def _gather_dot_kernel(idx_sm, x_ref, table_hbm, out_ref, buf, sem, *, g: _Geom, xrows: int):
  base = pl.program_id(0) * g.bt
  d = pl.program_id(1)
  d0 = pl.multiple_of(d * g.bd, g.bd)

  @pl.when(d == 0)
  def _():
    out_ref[...] = jnp.zeros_like(out_ref)

  def consume(t, slot):
    pos0 = (base + t) * g.sp
    x0 = pl.multiple_of((t // xrows) * xrows, xrows)
    sub = lax.broadcasted_iota(jnp.int32, (xrows, g.bd), 0)
    group = x_ref[pl.ds(x0, xrows), :].astype(F32)                        # [xrows, bd]
    x_row = jnp.sum(jnp.where(sub == t % xrows, group, 0.0), axis=0, keepdims=True)
    lane = lax.broadcasted_iota(jnp.int32, (ROWS, g.bt), 1)

    def chunk(c, carry):
      r0 = pl.multiple_of(c * ROWS, ROWS)
      rows = _chunk_f32(buf, slot, r0, idx_sm, pos0 + r0, g)             # [ROWS, bd]
      col = jnp.sum(rows * x_row, axis=1, keepdims=True)                 # [ROWS, 1]
      out_ref[pl.ds(r0, ROWS), :] += jnp.where(lane == t, col, 0.0)
      return carry

    lax.fori_loop(0, g.sp // ROWS, chunk, 0)

  _token_loop(idx_sm, table_hbm, buf, sem, base, d0, consume, g)


def _gather_dot_chunk(words, idx_flat, x_TxD, *, g: _Geom, tiles):
  tc, dim = x_TxD.shape
  xrows = 8 * max(1, 4 // jnp.dtype(x_TxD.dtype).itemsize)   # one packed tile of x rows
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(tc // g.bt, dim // g.bd),
      in_specs=[pl.BlockSpec((g.bt, g.bd), lambda i, d, *_: (i, d)),
                pl.BlockSpec(memory_space=pltpu.HBM)],
      out_specs=pl.BlockSpec((g.sp, g.bt), lambda i, d, *_: (0, i)),
      scratch_shapes=[pltpu.VMEM((2, g.sp, g.bd), words.dtype),
                      pltpu.SemaphoreType.DMA((2,))])
  return pl.pallas_call(
      functools.partial(_gather_dot_kernel, g=g, xrows=xrows), grid_spec=grid_spec,
      name="gather_dot_mosaic", out_shape=jax.ShapeDtypeStruct((g.sp, tc), F32),
      **_compiler_params(tiles, ("parallel", "arbitrary")),
  )(idx_flat, x_TxD, words)


def gather_dot(table_NxD, idx_TxS, x_TxD, *, tiles: MosaicTiles) -> jax.Array:
  """s [T, S] float32 = x[t] · table[idx[t, j]]. idx must already lie in [0, N)."""
  check_table_dtype(table_NxD)
  t, s = idx_TxS.shape
  dim = table_NxD.shape[1]
  g, n, tc = _launch(table_NxD, t, s, tiles, dot=True)
  idx = _pad_meta(idx_TxS, n * tc, g.sp, jnp.int32).reshape(n, tc * g.sp)
  x = jnp.pad(x_TxD, ((0, n * tc - t), (0, 0))).reshape(n, tc, dim)
  run = functools.partial(_gather_dot_chunk, _table_operand(table_NxD, g), g=g, tiles=tiles)
  out_nxSpxTc = _map_chunks(run, n, idx, x)
  return out_nxSpxTc.transpose(0, 2, 1).reshape(n * tc, g.sp)[:t, :s]


# ----------------------------------------------------------------------------------------------
# table gradient (XLA)
# ----------------------------------------------------------------------------------------------

def table_grad(idx_TxS, coef_TxS, rows_TxD, *, num_rows: int, out_dtype) -> jax.Array:
  """dtable[r] = Σ_{(t, j): idx[t, j] = r} coef[t, j] · rows[t]: [N, D] in out_dtype.

  XLA scatter-add into a float32 [N, D], one [T, D] update per slot j (``lax.fori_loop``), so
  that no [T, S, D] array of contributions is built. idx must already lie in [0, N)."""
  rows = rows_TxD.astype(F32)
  coef = coef_TxS.astype(F32)

  def body(j, acc):
    upd = lax.dynamic_index_in_dim(coef, j, axis=1) * rows            # [T, 1] x [T, D]
    ids = lax.dynamic_index_in_dim(idx_TxS, j, axis=1, keepdims=False)
    return acc.at[ids].add(upd, mode="promise_in_bounds")

  acc = lax.fori_loop(0, idx_TxS.shape[1], body,
                      jnp.zeros((num_rows, rows_TxD.shape[1]), F32))
  return acc.astype(out_dtype)
