"""Pallas kernels for weighted row gathers: gather-sum (EmbeddingBag), gather-dot and the sorted
reverse-index table gradient, plus the tiles and helpers shared with the fused PEER forward
(``peer_kernel.py``).

Written for the Pallas Triton (GPU) lowering and for ``interpret=True`` on CPU. Every kernel is a
memory-bound loop of row gathers on 2-D [rows, columns] tiles; none uses ``tl.dot``, atomics or
scratch buffers.

Notation: table [N, D] (N rows), T tokens, each selecting S rows ``idx[t, j]`` with weight
``w[t, j]``. The wrappers in ``ops.py`` pass the per-token metadata transposed and padded,
``idx_SpxTp`` / ``w_SpxTp`` (Sp = S rounded up to ``block_s``, Tp = T rounded up to
``block_tokens``; padding has index 0 and weight 0), so that column j of a token block is one
contiguous [bt] load. Large arrays (tables, token rows) stay whole in global memory (full-array
BlockSpecs) and are read with explicit integer index vectors:

* **gather**: ``table_ref[ids[:, None], cols]`` with ``ids`` [bt] int32 and ``cols`` [1, bd]
  (d0 + iota) loads the [bt, bd] tile of bt rows (Triton: one pointer tensor; 16-byte vector
  loads along D). A loop step issues ``block_s`` (u) such independent gathers before they are
  consumed, so u·bt row segments are in flight per program;
* ragged edges (T not a multiple of ``block_tokens``, D not a multiple of ``block_d``, S not a
  multiple of ``block_s``, N not a multiple of ``block_rows``) are handled with load / store masks
  (``plgpu.load`` / ``plgpu.store``; masked lanes touch no memory): no table is padded or copied.

Kernels
-------
``gather_sum_fwd``   out[t] = Σ_j w[t, j] · table[idx[t, j]]. Grid (token blocks, D blocks);
                     each program loops over S in steps of u columns, accumulating w·rows
                     [bt, bd] in float32, and stores its [bt, bd] tile once.
``gather_dot``       s[t, j] = x[t] · table[idx[t, j]] (float32). Grid (token blocks, column
                     blocks of u); each program loops over D in chunks of ``block_d``, loads the
                     x chunk once and reduces x·rows along D for its u columns. Output [Sp, Tp]
                     (transposed).
``reverse_index``    dtable[r] = Σ_{(t, j): idx[t, j] = r} c[t, j] · rows[t] for one or two
                     (c, rows) pairs at once (PEER: du and dv). Deterministic, no atomics: the
                     wrapper sorts the flat indices once (stable ``lax.sort_key_val``) and passes
                     ``offsets`` [Np + 1] (row r owns sorted positions offsets[r] ..
                     offsets[r + 1], from ``searchsorted``), the token of each sorted position and
                     the coefficients permuted into sorted order. Grid (row blocks of
                     ``block_rows``, D blocks); a program loads the [bn] start / end offsets of
                     its rows and loops ``ceil(max count / block_contrib)`` times; each step
                     takes ``block_contrib`` positions of every row (lanes past a row's end are
                     masked), gathers their token rows [bn, bd] and accumulates coefficient·row
                     into the [bn, bd] float32 accumulator. Every row is written (zeros when
                     untouched), in a fixed summation order: bitwise reproducible. Cost: one
                     read of a token row per contribution plus the dense [N, D] write; a block
                     with a hot row (count c) runs ceil(c / block_contrib) steps.
``peer_fwd``         the fused PEER forward: see ``peer_kernel.py``.

Expected GPU behaviour (H200, T = 16,384, S = 128, N = 2^20, D = 1024, bf16): every kernel streams
the selected rows once (4.3 GB for the forward), so time ≈ bytes / achieved bandwidth. Checked
without a GPU: each kernel's Triton IR compiles with Triton 3.9 + ptxas for sm_90a, 16-byte
vector loads, no register spills (register counts in ``ops.make_plan``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

F32 = jnp.float32


def _gelu_tanh(x):
  return jax.nn.gelu(x, approximate=True)


# Activations used inside the PEER kernel and by the reference (the same functions: identical math).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": _gelu_tanh, "relu": jax.nn.relu, "silu": jax.nn.silu}


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Static tile sizes and launch options of one kernel call (all block sizes powers of two;
  ``ops.make_plan`` picks the per-kernel defaults)."""
  block_tokens: int = 16      # bt: tokens per program (gather_sum_fwd, gather_dot, peer_fwd)
  block_d: int = 256          # bd: columns per program (or per inner step in gather_dot)
  block_s: int = 4            # u: selected rows per token handled per loop step
  block_k: int = 256          # peer_fwd: D chunk of the x·u dot
  block_rows: int = 16        # reverse_index: table rows per program
  block_contrib: int = 4      # reverse_index: contributions per row per loop step
  interpret: bool = False
  num_warps: int | None = None
  num_stages: int | None = None


def _plgpu():
  from jax.experimental.pallas import triton as plgpu  # Triton primitives; CPU-importable
  return plgpu


def _load(ref, idx, mask=None, other=0):
  """``ref[idx]`` with an optional mask; masked lanes read ``other`` and touch no memory on the
  GPU."""
  if mask is None:
    return ref[idx]
  return _plgpu().load(ref.at[idx], mask=mask, other=other)


def _store(ref, value, mask=None):
  if mask is None:
    ref[...] = value
  else:
    _plgpu().store(ref, value, mask=mask)


def _iota(shape, dim):
  return lax.broadcasted_iota(jnp.int32, shape, dim)


def _and(a, b):
  if a is None:
    return b
  if b is None:
    return a
  return jnp.logical_and(a, b)


def _compiler_params(tiles: Tiles, default_warps: int):
  if tiles.interpret:
    return {}
  params = dict(num_warps=tiles.num_warps or default_warps)
  if tiles.num_stages is not None:
    params["num_stages"] = tiles.num_stages
  return dict(compiler_params=_plgpu().CompilerParams(**params))


def _full_spec(x):
  """The whole array for every program (read with explicit indices)."""
  return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _col_mask(cols, dim, bd):
  """Mask of valid columns, or None when D is a multiple of the block (no mask needed)."""
  return None if dim % bd == 0 else cols < dim


# ----------------------------------------------------------------------------------------------
# gather_sum forward
# ----------------------------------------------------------------------------------------------

def _slot_mask(j, num_slots: int, u: int, col_ok, width: int):
  """Mask for selected-row column j (a padded column when j >= S), combined with the column
  mask; None when neither can be out of range."""
  if num_slots % u == 0:
    return col_ok
  ok = jnp.broadcast_to(j < num_slots, (1, width))
  return ok if col_ok is None else jnp.logical_and(ok, col_ok)


def _gather_sum_kernel(idx_ref, w_ref, table_ref, out_ref, *, tiles: Tiles, num_tokens: int,
                       num_slots: int, dim: int):
  bt, bd, u = tiles.block_tokens, tiles.block_d, tiles.block_s
  sp = idx_ref.shape[0]
  t0 = pl.program_id(0) * bt
  d0 = pl.multiple_of(pl.program_id(1) * bd, bd)
  cols = d0 + _iota((1, bd), 1)
  col_ok = _col_mask(cols, dim, bd)

  def body(step, acc):
    j0 = pl.multiple_of(step * u, u)
    # u independent [bt, bd] row gathers per step: no dependence between them, so they can be
    # in flight together.
    for k in range(u):
      ids = idx_ref[j0 + k, :]                                   # [bt] int32
      wk = w_ref[j0 + k, :].astype(F32)                          # [bt]
      rows = _load(table_ref, (ids[:, None], cols),
                   _slot_mask(j0 + k, num_slots, u, col_ok, bd))  # [bt, bd]
      acc = acc + wk[:, None] * rows.astype(F32)
    return acc

  acc = lax.fori_loop(0, sp // u, body, jnp.zeros((bt, bd), F32))
  mask = None
  if num_tokens % bt:
    mask = (t0 + _iota((bt, bd), 0)) < num_tokens
  if dim % bd:
    mask = _and(mask, (d0 + _iota((bt, bd), 1)) < dim)
  _store(out_ref, acc.astype(out_ref.dtype), mask)


def gather_sum_fwd(table_NxD, idx_SpxTp, w_SpxTp, *, num_tokens: int, num_slots: int,
                   out_dtype, tiles: Tiles) -> jax.Array:
  """out [T, D] (out_dtype) = Σ_j w[t, j] · table[idx[t, j]], float32 accumulation."""
  dim = table_NxD.shape[1]
  sp, tp = idx_SpxTp.shape
  bt, bd = tiles.block_tokens, tiles.block_d
  meta_spec = pl.BlockSpec((sp, bt), lambda i, j: (0, i))
  return pl.pallas_call(
      functools.partial(_gather_sum_kernel, tiles=tiles, num_tokens=num_tokens,
                        num_slots=num_slots, dim=dim),
      grid=(tp // bt, pl.cdiv(dim, bd)),
      in_specs=[meta_spec, meta_spec, _full_spec(table_NxD)],
      out_specs=pl.BlockSpec((bt, bd), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((num_tokens, dim), out_dtype),
      interpret=tiles.interpret, name="gather_sum_fwd",
      **_compiler_params(tiles, 4),
  )(idx_SpxTp, w_SpxTp, table_NxD)


# ----------------------------------------------------------------------------------------------
# gather_dot: s[t, j] = x[t] · table[idx[t, j]]
# ----------------------------------------------------------------------------------------------

def _gather_dot_kernel(idx_ref, x_ref, table_ref, out_ref, *, tiles: Tiles, num_tokens: int,
                       num_slots: int, dim: int):
  bt, bd, u = tiles.block_tokens, tiles.block_d, tiles.block_s
  t0 = pl.program_id(0) * bt
  j0 = pl.program_id(1) * u
  tok = t0 + _iota((bt, 1), 0)
  row_ok = tok < num_tokens if num_tokens % bt else None
  ids = [idx_ref[k, :] for k in range(u)]                        # u x [bt]

  def body(c, accs):
    d0 = pl.multiple_of(c * bd, bd)
    cols = d0 + _iota((1, bd), 1)
    col_ok = _col_mask(cols, dim, bd)
    xs = _load(x_ref, (tok, cols), _and(row_ok, col_ok)).astype(F32)     # [bt, bd]
    new = []
    for k in range(u):
      mask = _and(row_ok, _slot_mask(j0 + k, num_slots, u, col_ok, bd))
      rows = _load(table_ref, (ids[k][:, None], cols), mask)             # [bt, bd]
      new.append(accs[k] + jnp.sum(rows.astype(F32) * xs, axis=1))
    return tuple(new)

  init = tuple(jnp.zeros((bt,), F32) for _ in range(u))
  accs = lax.fori_loop(0, pl.cdiv(dim, bd), body, init)
  for k in range(u):
    out_ref[k, :] = accs[k]


def gather_dot(table_NxD, idx_SpxTp, x_TxD, *, num_slots: int, tiles: Tiles) -> jax.Array:
  """s [Sp, Tp] float32 (transposed; rows >= S and columns >= T are padding)."""
  dim = table_NxD.shape[1]
  num_tokens = x_TxD.shape[0]
  sp, tp = idx_SpxTp.shape
  bt, u = tiles.block_tokens, tiles.block_s
  block = pl.BlockSpec((u, bt), lambda i, j: (j, i))
  return pl.pallas_call(
      functools.partial(_gather_dot_kernel, tiles=tiles, num_tokens=num_tokens,
                        num_slots=num_slots, dim=dim),
      grid=(tp // bt, sp // u),
      in_specs=[block, _full_spec(x_TxD), _full_spec(table_NxD)],
      out_specs=block,
      out_shape=jax.ShapeDtypeStruct((sp, tp), F32),
      interpret=tiles.interpret, name="gather_dot",
      **_compiler_params(tiles, 8),
  )(idx_SpxTp, x_TxD, table_NxD)


# ----------------------------------------------------------------------------------------------
# reverse index: deterministic table gradient from sorted contributions
# ----------------------------------------------------------------------------------------------

def sort_contributions(idx_TxS: jax.Array, coefs_TxS: tuple[jax.Array, ...], *, num_rows: int,
                       block_rows: int):
  """Plain-jnp preparation of ``reverse_index``: (offsets [Np + 1] int32, token of each sorted
  position [T·S] int32, coefficients in sorted order (float32 [T·S] each)).

  Np = N rounded up to ``block_rows``; offsets[r] = number of entries < r, so row r owns sorted
  positions offsets[r] .. offsets[r + 1] (empty for padded rows). The sort is stable: within a
  row, contributions keep token-major order (deterministic summation order)."""
  t, s = idx_TxS.shape
  flat = idx_TxS.reshape(-1).astype(jnp.int32)
  sorted_rows, order = lax.sort_key_val(flat, lax.iota(jnp.int32, t * s), is_stable=True)
  np_rows = pl.cdiv(num_rows, block_rows) * block_rows
  method = "scan_unrolled" if jax.default_backend() == "gpu" else "scan"
  offsets = jnp.searchsorted(sorted_rows, jnp.arange(np_rows + 1, dtype=jnp.int32),
                             side="left", method=method).astype(jnp.int32)
  tok = order // s
  coefs = tuple(c.reshape(-1).astype(F32)[order] for c in coefs_TxS)
  return offsets, tok, coefs


def _reverse_index_kernel(off_ref, tok_ref, *refs, tiles: Tiles, num_pairs: int, num_rows: int,
                          dim: int):
  coef_refs = refs[:num_pairs]
  row_refs = refs[num_pairs:2 * num_pairs]
  out_refs = refs[2 * num_pairs:]
  bn, c, bd = tiles.block_rows, tiles.block_contrib, tiles.block_d
  r0 = pl.program_id(0) * bn
  d0 = pl.multiple_of(pl.program_id(1) * bd, bd)
  cols = d0 + _iota((1, bd), 1)
  col_ok = _col_mask(cols, dim, bd)
  start = off_ref[pl.ds(r0, bn)]                                 # [bn]
  end = off_ref[pl.ds(r0 + 1, bn)]
  steps = (jnp.max(end - start) + (c - 1)) // c

  def body(k, accs):
    accs = list(accs)
    # c independent contributions per row and step: positions start + k·c + i of every row.
    for i in range(c):
      pos = start + (k * c + i)                                  # [bn] sorted positions
      valid = pos < end
      tok = _load(tok_ref, pos, valid, 0)                         # [bn] token ids
      row_mask = _and(valid[:, None], col_ok)
      for p in range(num_pairs):
        coef = _load(coef_refs[p], pos, valid, 0.0)              # [bn] float32
        rows = _load(row_refs[p], (tok[:, None], cols), row_mask, 0)   # [bn, bd]
        accs[p] = accs[p] + coef[:, None] * rows.astype(F32)
    return tuple(accs)

  init = tuple(jnp.zeros((bn, bd), F32) for _ in range(num_pairs))
  accs = lax.fori_loop(0, steps, body, init)
  mask = None
  if num_rows % bn:
    mask = (r0 + _iota((bn, bd), 0)) < num_rows
  if dim % bd:
    mask = _and(mask, (d0 + _iota((bn, bd), 1)) < dim)
  for acc, out_ref in zip(accs, out_refs):
    _store(out_ref, acc.astype(out_ref.dtype), mask)


def reverse_index(offsets, tok, coefs: tuple, rows_TxD: tuple, *, num_rows: int,
                  out_dtypes: tuple, tiles: Tiles) -> tuple:
  """For each pair p: out_p [N, D] (out_dtypes[p]) with out_p[r] = Σ_{sorted positions q of r}
  coefs[p][q] · rows_TxD[p][tok[q]] in float32. Inputs from ``sort_contributions``."""
  dim = rows_TxD[0].shape[1]
  bn, bd = tiles.block_rows, tiles.block_d
  n = len(coefs)
  out_spec = pl.BlockSpec((bn, bd), lambda i, j: (i, j))
  outs = pl.pallas_call(
      functools.partial(_reverse_index_kernel, tiles=tiles, num_pairs=n, num_rows=num_rows,
                        dim=dim),
      grid=(pl.cdiv(num_rows, bn), pl.cdiv(dim, bd)),
      in_specs=[_full_spec(offsets), _full_spec(tok), *map(_full_spec, coefs),
                *map(_full_spec, rows_TxD)],
      out_specs=[out_spec] * n,
      out_shape=[jax.ShapeDtypeStruct((num_rows, dim), dt) for dt in out_dtypes],
      interpret=tiles.interpret, name="reverse_index_grad",
      **_compiler_params(tiles, 8),
  )(offsets, tok, *coefs, *rows_TxD)
  return tuple(outs)
