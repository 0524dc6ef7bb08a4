"""Fused PEER forward Pallas kernel ``peer_fwd``, the forward of ``ops.peer_ffn``.

Same conventions as ``kernel.py`` (whose ``Tiles``, ``ACTIVATIONS`` and load / store / mask
helpers it uses): per-token metadata ``idx_SpxTp`` / ``g_SpxTp`` transposed and padded, tables
whole in global memory, read by explicit row gathers with load masks on ragged edges.

``peer_fwd``         y[t] = Σ_j g[t, j] · act(x[t] · u[idx[t, j]]) · v[idx[t, j]], fused. Grid
                     (token blocks, D blocks of the output); per step of u columns the program
                     first computes pre = x·u over the full D (inner loop over D chunks of
                     ``block_k``), then h = g·act(pre), then accumulates h·v rows for its D block.
                     With the default block_d = D (up to 1024) there is one D block, so every
                     u and v row is read exactly once; a smaller block_d re-reads u once per D
                     block. It also writes pre [Sp, Tp] (float32; programs (i, 0) only) for the
                     backward, which is composed of the kernels in ``kernel.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.gather_sum.kernel import (ACTIVATIONS, F32, Tiles, _and, _col_mask,
                                              _compiler_params, _full_spec, _iota, _load,
                                              _slot_mask, _store)


# ----------------------------------------------------------------------------------------------
# PEER forward (fused): y[t] = Σ_j g · act(x·u[idx]) · v[idx]; also writes pre = x·u[idx]
# ----------------------------------------------------------------------------------------------

def _peer_kernel(idx_ref, g_ref, x_ref, u_ref, v_ref, y_ref, pre_ref, *, tiles: Tiles,
                 num_tokens: int, num_slots: int, dim: int, activation: str):
  bt, bd, u, bk = tiles.block_tokens, tiles.block_d, tiles.block_s, tiles.block_k
  act = ACTIVATIONS[activation]
  sp = idx_ref.shape[0]
  t0 = pl.program_id(0) * bt
  dblk = pl.program_id(1)
  d0 = pl.multiple_of(dblk * bd, bd)
  cols = d0 + _iota((1, bd), 1)
  col_ok = _col_mask(cols, dim, bd)
  tok = t0 + _iota((bt, 1), 0)
  row_ok = tok < num_tokens if num_tokens % bt else None

  def body(step, acc):
    j0 = pl.multiple_of(step * u, u)
    ids = [idx_ref[j0 + k, :] for k in range(u)]                 # u x [bt]

    def dot_body(c, pres):
      k0 = pl.multiple_of(c * bk, bk)
      kcols = k0 + _iota((1, bk), 1)
      kcol_ok = _col_mask(kcols, dim, bk)
      xs = _load(x_ref, (tok, kcols), _and(row_ok, kcol_ok)).astype(F32)   # [bt, bk]
      new = []
      for k in range(u):
        mask = _and(row_ok, _slot_mask(j0 + k, num_slots, u, kcol_ok, bk))
        us = _load(u_ref, (ids[k][:, None], kcols), mask)                 # [bt, bk]
        new.append(pres[k] + jnp.sum(us.astype(F32) * xs, axis=1))
      return tuple(new)

    pres = lax.fori_loop(0, pl.cdiv(dim, bk), dot_body,
                         tuple(jnp.zeros((bt,), F32) for _ in range(u)))

    @pl.when(dblk == 0)
    def _():
      for k in range(u):
        pre_ref[j0 + k, :] = pres[k]

    for k in range(u):
      h = g_ref[j0 + k, :].astype(F32) * act(pres[k])            # [bt]; 0 on padding (g = 0)
      mask = _and(row_ok, _slot_mask(j0 + k, num_slots, u, col_ok, bd))
      vs = _load(v_ref, (ids[k][:, None], cols), mask)           # [bt, bd]
      acc = acc + h[:, None] * vs.astype(F32)
    return acc

  acc = lax.fori_loop(0, sp // u, body, jnp.zeros((bt, bd), F32))
  mask = None
  if num_tokens % bt:
    mask = (t0 + _iota((bt, bd), 0)) < num_tokens
  if dim % bd:
    mask = _and(mask, (d0 + _iota((bt, bd), 1)) < dim)
  _store(y_ref, acc.astype(y_ref.dtype), mask)


def peer_fwd(x_TxD, u_NxD, v_NxD, idx_SpxTp, g_SpxTp, *, num_slots: int, activation: str,
             out_dtype, tiles: Tiles):
  """(y [T, D] out_dtype, pre [Sp, Tp] float32 = x·u[idx], transposed and padded)."""
  num_tokens, dim = x_TxD.shape
  sp, tp = idx_SpxTp.shape
  bt, bd = tiles.block_tokens, tiles.block_d
  meta_spec = pl.BlockSpec((sp, bt), lambda i, j: (0, i))
  y, pre = pl.pallas_call(
      functools.partial(_peer_kernel, tiles=tiles, num_tokens=num_tokens, num_slots=num_slots,
                        dim=dim, activation=activation),
      grid=(tp // bt, pl.cdiv(dim, bd)),
      in_specs=[meta_spec, meta_spec, _full_spec(x_TxD), _full_spec(u_NxD), _full_spec(v_NxD)],
      out_specs=[pl.BlockSpec((bt, bd), lambda i, j: (i, j)), meta_spec],
      out_shape=[jax.ShapeDtypeStruct((num_tokens, dim), out_dtype),
                 jax.ShapeDtypeStruct((sp, tp), F32)],
      interpret=tiles.interpret, name="peer_ffn_fwd",
      **_compiler_params(tiles, 8),
  )(idx_SpxTp, g_SpxTp, x_TxD, u_NxD, v_NxD)
  return y, pre
