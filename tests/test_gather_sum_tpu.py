"""Mosaic TPU gather kernels (kernels_pallas/gather_sum/tpu_kernel.py, impl="mosaic_interpret":
Pallas TPU interpret mode, DMAs and semaphores simulated on the CPU) against the pure-jnp
reference: gather_sum / gather_dot forward and gradients (table, w / x) for a float32 table with
D = 128 and a bfloat16 table with D = 72 (not a lane multiple), ragged T (not a multiple of the
token block), S not a multiple of 8, duplicate and clamped out-of-range indices; peer_ffn
against impl="xla"; several SMEM chunks and D tiles; the bfloat16 row-pair repack; clear
errors; "auto" on a TPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.gather_sum import (gather_dot, gather_dot_reference, gather_sum,
                                       gather_sum_reference, peer_ffn, resolve_impl)
from kernels_pallas.gather_sum import tpu_kernel

IMPL = "mosaic_interpret"
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
# (T, S, N, D, table dtype): T = 21 is ragged for the 16-token block, S = 5 / 3 pad to 8 slots.
CASES = [(21, 5, 48, 128, jnp.float32), (19, 3, 40, 72, jnp.bfloat16)]


def _inputs(seed, t, s, n, d, dtype):
  """Random rows plus a duplicate inside token 0 and out-of-range indices (-3 and n + 2, which
  read and receive the gradient of rows 0 and n - 1)."""
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, n, (t, s))
  idx[0, 1] = idx[0, 0]
  idx[1, 0], idx[2, s - 1] = -3, n + 2
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
  return dict(idx=jnp.asarray(idx, jnp.int32), table=normal(n, d).astype(dtype), w=normal(t, s),
              x=normal(t, d), ct_sum=normal(t, d), ct_dot=normal(t, s))


def _assert_close(got, want, dtype, what):
  got = np.asarray(jnp.asarray(got).astype(jnp.float32))
  want = np.asarray(jnp.asarray(want).astype(jnp.float32))
  assert got.shape == want.shape, (what, got.shape, want.shape)
  err = float(np.max(np.abs(got - want) / (1.0 + np.abs(want))))
  assert err <= TOL[dtype], (what, err)


def _vjp(fn, primals, ct):
  out, vjp = jax.vjp(fn, *primals)
  return (out, *vjp(ct))


@pytest.mark.parametrize("t,s,n,d,dtype", CASES)
def test_gather_sum_and_dot_match_reference(t, s, n, d, dtype):
  a = _inputs(t, t, s, n, d, dtype)
  idx, clip = a["idx"], jnp.clip(a["idx"], 0, n - 1)

  def both(gs, gd, idx, tb, w, x):
    return (_vjp(lambda tb, w: gs(tb, idx, w), (tb, w), a["ct_sum"].astype(tb.dtype)),
            _vjp(lambda tb, x: gd(tb, idx, x), (tb, x), a["ct_dot"]))

  ours = jax.jit(lambda *p: both(lambda *q: gather_sum(*q, impl=IMPL),
                                 lambda *q: gather_dot(*q, impl=IMPL), idx, *p))
  # The reference in float32 (its bfloat16 table gradient would be accumulated in bfloat16).
  ref = jax.jit(lambda *p: both(gather_sum_reference, gather_dot_reference, clip, *p))
  got = ours(a["table"], a["w"], a["x"])
  want = ref(a["table"].astype(jnp.float32), a["w"], a["x"])
  for op, g_op, r_op in zip(("sum", "dot"), got, want):
    for what, g, r in zip(("out", "dtable", "dw" if op == "sum" else "dx"), g_op, r_op):
      _assert_close(g, r, dtype, f"{op} {what}")
  assert got[0][0].dtype == dtype and got[0][1].dtype == dtype and got[1][0].dtype == jnp.float32
  # Clamping: row n - 1 gets token 2's out-of-range slot, so its gradient is non-zero.
  assert np.any(np.asarray(got[0][1][n - 1], np.float32) != 0)


def test_peer_ffn_matches_xla():
  t, s, n, d = 21, 5, 48, 128
  a = _inputs(3, t, s, n, d, jnp.float32)
  v = jnp.asarray(np.random.default_rng(4).standard_normal((n, d), np.float32))
  x = a["x"] / np.sqrt(d)                   # unit-scale pre-activations, as in a real layer

  def run(impl):
    fn = lambda x, u, v, g: peer_ffn(x, u, v, a["idx"], g, activation="gelu", impl=impl)
    return jax.jit(lambda *p: _vjp(fn, p, a["ct_sum"]))(x, a["table"], v, a["w"])

  for what, g, r in zip(("y", "dx", "du", "dv", "dg"), run(IMPL), run("xla")):
    _assert_close(g, r, jnp.float32, what)


def test_chunks_and_d_tiles():
  """Several pallas_calls over token chunks (lax.map), two D tiles (gather-dot accumulates over
  them) and gather-dot's 128-token lane blocks (T = 136: two chunks, the second ragged) give
  the reference too."""
  t, s, n, d = 40, 6, 32, 256
  a = _inputs(5, t, s, n, d, jnp.float32)
  idx = jnp.clip(a["idx"], 0, n - 1)
  tiles = tpu_kernel.MosaicTiles(block_tokens=16, block_d=128, chunk_selections=16 * 8,
                                 interpret=True)
  out = tpu_kernel.gather_sum(a["table"], idx, a["w"], out_dtype=jnp.float32, tiles=tiles)
  _assert_close(out, gather_sum_reference(a["table"], idx, a["w"]), jnp.float32, "sum")
  dots = tpu_kernel.gather_dot(a["table"], idx, a["x"], tiles=tiles)
  _assert_close(dots, gather_dot_reference(a["table"], idx, a["x"]), jnp.float32, "dot")
  b = _inputs(6, 136, 2, n, 128, jnp.float32)
  idx = jnp.clip(b["idx"], 0, n - 1)
  lanes = tpu_kernel.MosaicTiles(chunk_selections=128 * 8, interpret=True)
  dots = tpu_kernel.gather_dot(b["table"], idx, b["x"], tiles=lanes)
  _assert_close(dots, gather_dot_reference(b["table"], idx, b["x"]), jnp.float32, "dot 128")


def test_pack_row_pairs():
  """The bfloat16 repack (whole, and in blocks of rows) against numpy's bit arithmetic."""
  table = jnp.asarray(np.random.default_rng(6).standard_normal((64, 256)), jnp.bfloat16)
  bits = np.asarray(table).view(np.uint16).astype(np.uint32)
  want = bits[0::2] | (bits[1::2] << 16)
  for block_rows in (1 << 16, 16):
    np.testing.assert_array_equal(np.asarray(tpu_kernel.pack_row_pairs(table, block_rows)), want)


def test_errors_and_auto(monkeypatch):
  table, idx, w = jnp.zeros((8, 128)), jnp.zeros((4, 2), jnp.int32), jnp.zeros((4, 2))
  for kwargs, message in [(dict(block_s=4), "block_s tune the Triton kernels"),
                          (dict(block_tokens=24), "multiple of 16"),
                          (dict(block_d=96), "multiple of 128 that divides D=128")]:
    with pytest.raises(ValueError, match=message):
      gather_sum(table, idx, w, impl="mosaic", **kwargs)
  with pytest.raises(ValueError, match="float32 or bfloat16 tables; got float16"):
    gather_sum(table.astype(jnp.float16), idx, w, impl=IMPL)
  with pytest.raises(ValueError, match="needs an even N; got N=7"):
    gather_dot(jnp.zeros((7, 128), jnp.bfloat16), idx, jnp.zeros((4, 128)), impl=IMPL)
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert resolve_impl("auto") == "mosaic"
