"""Pure-jnp definitions of the gather kernels (``impl="xla"``; truth for the parity tests).

``jnp.take(..., mode="clip")`` + ``einsum`` in float32, result cast to the output dtype, plain JAX
autodiff (the table gradient is XLA's scatter-add). Out-of-range indices are clamped to
[0, N - 1], exactly as the Pallas path does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.gather_sum.kernel import ACTIVATIONS

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST


def _rows(table_NxD, idx_TxS):
  return jnp.take(table_NxD, idx_TxS, axis=0, mode="clip")        # [T, S, D]


def gather_sum_reference(table_NxD, idx_TxS, w_TxS) -> jax.Array:
  """out[t] = Σ_j w[t, j] · table[idx[t, j]]: [T, D] in the table dtype (float32 math)."""
  rows = _rows(table_NxD, idx_TxS)
  out = jnp.einsum("ts,tsd->td", w_TxS.astype(F32), rows.astype(F32), precision=HIGHEST)
  return out.astype(table_NxD.dtype)


def gather_dot_reference(table_NxD, idx_TxS, x_TxD) -> jax.Array:
  """s[t, j] = x[t] · table[idx[t, j]]: [T, S] float32."""
  rows = _rows(table_NxD, idx_TxS)
  return jnp.einsum("td,tsd->ts", x_TxD.astype(F32), rows.astype(F32), precision=HIGHEST)


def peer_ffn_reference(x_TxD, u_NxD, v_NxD, idx_TxS, g_TxS, activation: str = "gelu"):
  """y[t] = Σ_j g[t, j] · act(x[t] · u[idx[t, j]]) · v[idx[t, j]]: [T, D] in x's dtype."""
  pre = gather_dot_reference(u_NxD, idx_TxS, x_TxD)
  h = g_TxS.astype(F32) * ACTIVATIONS[activation](pre)
  y = jnp.einsum("ts,tsd->td", h, _rows(v_NxD, idx_TxS).astype(F32), precision=HIGHEST)
  return y.astype(x_TxD.dtype)


def table_grad_reference(idx_TxS, coef_TxS, rows_TxD, num_rows: int) -> jax.Array:
  """dtable[r] = Σ_{(t, j): idx[t, j] = r} coef[t, j] · rows[t] (float32 [N, D]), by
  segment-sum; what the reverse-index kernel computes."""
  t, s = idx_TxS.shape
  contrib = coef_TxS.astype(F32)[:, :, None] * rows_TxD.astype(F32)[:, None, :]
  flat = jnp.clip(idx_TxS, 0, num_rows - 1).reshape(-1)
  return jax.ops.segment_sum(contrib.reshape(t * s, -1), flat, num_segments=num_rows)
