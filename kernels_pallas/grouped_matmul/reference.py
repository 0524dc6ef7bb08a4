"""References for the grouped matmul: XLA's ``ragged_dot`` and a readable pure-jnp loop.

Semantics (shared by every implementation in this package). ``group_sizes`` [G] splits the rows
of lhs [M, K] into consecutive groups; group g owns rows [start[g], end[g]) with

  end = min(cumsum(max(group_sizes, 0)), M),   start = [0, end[0], ..., end[G-2]]

so negative sizes count as 0 and a total larger than M is clipped (later groups lose rows). Then

  gmm(lhs, rhs)[r]            = lhs[r] @ rhs[g(r)]     rhs [G, K, N]; 0 for rows r >= end[G-1]
  gmm(lhs, rhs, transposed)[r] = lhs[r] @ rhs[g(r)].T  rhs [G, N, K]
  tgmm(lhs, dout)[g]          = lhs[start[g]:end[g]].T @ dout[start[g]:end[g]]    [G, K, N]

``ragged_dot_xla`` / ``tgmm_xla`` are the XLA ops (``jax.lax.ragged_dot_general``; the "xla"
impl and TPU fallback, differentiated by JAX). ``gmm_loop_reference`` / ``tgmm_loop_reference``
compute every group densely in float32 (HIGHEST precision) and select rows with ``jnp.where``
(so NaN in rows outside a group never leaks in): the ground truth for tests, O(G·M·K·N).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.grouped_matmul.kernel import group_bounds

_HIGHEST = jax.lax.Precision.HIGHEST


def clipped_group_sizes(group_sizes_G: jax.Array, num_rows: int) -> jax.Array:
  """Group sizes after the clipping rules above (>= 0, summing to at most ``num_rows``)."""
  start, end = group_bounds(jnp.asarray(group_sizes_G), num_rows)
  return end - start


def row_group_ids(group_sizes_G: jax.Array, num_rows: int) -> jax.Array:
  """int32 [M]: the group of each row, G for rows past the last group."""
  _, end = group_bounds(jnp.asarray(group_sizes_G), num_rows)
  rows = jnp.arange(num_rows, dtype=jnp.int32)
  return jnp.searchsorted(end, rows, side="right").astype(jnp.int32)


def ragged_dot_xla(lhs_MxK: jax.Array, rhs: jax.Array, group_sizes_G: jax.Array, *,
                   transpose_rhs: bool = False, preferred_element_type=None) -> jax.Array:
  """``jax.lax.ragged_dot`` semantics (rhs [G, K, N], or [G, N, K] with ``transpose_rhs``)."""
  sizes = clipped_group_sizes(group_sizes_G, lhs_MxK.shape[0])
  dims = jax.lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(([1], [2 if transpose_rhs else 1]), ([], [])),
      lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
  out_dtype = preferred_element_type or lhs_MxK.dtype
  precision = _HIGHEST if lhs_MxK.dtype == jnp.float32 else None
  return jax.lax.ragged_dot_general(lhs_MxK, rhs, sizes, dims, precision=precision,
                                    preferred_element_type=out_dtype)


def tgmm_xla(lhs_MxK: jax.Array, dout_MxN: jax.Array, group_sizes_G: jax.Array, *,
             preferred_element_type=None) -> jax.Array:
  """Per-group lhsᵀ @ dout [G, K, N] with ``ragged_dot_general`` (ragged contracting dim)."""
  sizes = clipped_group_sizes(group_sizes_G, lhs_MxK.shape[0])
  dims = jax.lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(([0], [0]), ([], [])),
      lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
  out_dtype = preferred_element_type or lhs_MxK.dtype
  precision = _HIGHEST if lhs_MxK.dtype == jnp.float32 else None
  return jax.lax.ragged_dot_general(lhs_MxK, dout_MxN, sizes, dims, precision=precision,
                                    preferred_element_type=out_dtype)


def gmm_loop_reference(lhs_MxK: jax.Array, rhs: jax.Array, group_sizes_G: jax.Array, *,
                       transpose_rhs: bool = False, preferred_element_type=None) -> jax.Array:
  """Dense per-group loop in float32: out = Σ_g where(g(r) == g, lhs @ rhs[g], 0)."""
  m = lhs_MxK.shape[0]
  gid = row_group_ids(group_sizes_G, m)[:, None]
  x = lhs_MxK.astype(jnp.float32)
  out = None
  for g in range(rhs.shape[0]):
    w = rhs[g].astype(jnp.float32)
    y = jnp.dot(x, w.T if transpose_rhs else w, precision=_HIGHEST)
    out = jnp.where(gid == g, y, 0.0 if out is None else out)
  return out.astype(preferred_element_type or lhs_MxK.dtype)


def tgmm_loop_reference(lhs_MxK: jax.Array, dout_MxN: jax.Array, group_sizes_G: jax.Array, *,
                        preferred_element_type=None) -> jax.Array:
  """Dense per-group loop in float32: out[g] = (rows of g in lhs)ᵀ @ (rows of g in dout)."""
  m = lhs_MxK.shape[0]
  gid = row_group_ids(group_sizes_G, m)[:, None]
  x, dy = lhs_MxK.astype(jnp.float32), dout_MxN.astype(jnp.float32)
  outs = [jnp.dot(jnp.where(gid == g, x, 0.0).T, jnp.where(gid == g, dy, 0.0), precision=_HIGHEST)
          for g in range(jnp.shape(group_sizes_G)[0])]
  return jnp.stack(outs).astype(preferred_element_type or lhs_MxK.dtype)
