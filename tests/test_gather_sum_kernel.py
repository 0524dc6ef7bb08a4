"""Gather kernels (kernels_pallas.gather_sum) in Pallas interpret mode against the pure-jnp
reference: gather_sum / gather_dot / peer_ffn forward and every gradient, float32 (tight) and
bfloat16 (loose); duplicate indices within and across tokens, hot rows, ragged T / S / N / D,
S = 1, clamped out-of-range indices; exact integer sums and bitwise determinism of the
reverse-index table gradient; random shapes (hypothesis); clear errors; Triton lowering (H200)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels_pallas.gather_sum import (gather_dot, gather_dot_reference, gather_sum,
                                       gather_sum_reference, peer_ffn, peer_ffn_reference,
                                       table_grad_reference)

# Small tiles so that every ragged edge is hit: T=21 (bt 8), S=5 (block_s 2), N=37 (rows 8),
# D=40 (bd 16, peer dot chunk 8).
SMALL = dict(block_tokens=8, block_d=16, block_s=2, block_rows=8, block_contrib=2)
N, T, S, D = 37, 21, 5, 40
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _indices(rng, t, s, n):
  """Random rows plus duplicates: a repeated row inside token 0, a hot row (5) shared by every
  selection of token 3 and by one selection of every other token."""
  idx = rng.integers(0, n, (t, s))
  if t > 3 and s > 1:
    idx[0, 1] = idx[0, 0]
    idx[3, :] = 5 % n
    idx[:, s - 1] = 5 % n
  return jnp.asarray(idx, jnp.int32)


def _inputs(seed, t, s, n, d, dtype):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)
  return dict(idx=_indices(rng, t, s, n), table=normal(n, d), w=normal(t, s), x=normal(t, d),
              v=normal(n, d), ct=normal(t, d))


def _assert_close(got, want, dtype, what):
  got = np.asarray(jnp.asarray(got).astype(jnp.float32))
  want = np.asarray(jnp.asarray(want).astype(jnp.float32))
  assert got.shape == want.shape, (what, got.shape, want.shape)
  assert np.isfinite(got).all(), (what, "non-finite")
  scale = 1.0 + np.abs(want)
  err = float(np.max(np.abs(got - want) / scale)) if got.size else 0.0
  assert err <= TOL[dtype], (what, err)


def _vjp(fn, primals, ct):
  out, vjp = jax.vjp(fn, *primals)
  return (out, *vjp(ct))


def _f32(*xs):
  return tuple(x.astype(jnp.float32) for x in xs)


# ------------------------------------------------------------------------------------------------
# parity: forward + gradients


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gather_sum_matches_reference(dtype):
  a = _inputs(1, T, S, N, D, dtype)
  idx = a["idx"]
  ours = jax.jit(lambda tb, w, ct: _vjp(
      lambda tb, w: gather_sum(tb, idx, w, impl="interpret", **SMALL), (tb, w), ct))
  ref = jax.jit(lambda tb, w, ct: _vjp(
      lambda tb, w: gather_sum_reference(tb, idx, w), (tb, w), ct))
  got = ours(a["table"], a["w"], a["ct"])
  want = ref(*_f32(a["table"], a["w"], a["ct"]))
  for what, g, r, dt in zip(("out", "dtable", "dw"), got, want, (dtype, dtype, dtype)):
    assert g.dtype == dt, (what, g.dtype)
    _assert_close(g, r, dtype, what)
  # The dense table gradient is exactly zero on rows nobody selected.
  untouched = np.setdiff1d(np.arange(N), np.asarray(idx))
  assert untouched.size and np.all(np.asarray(got[1], np.float32)[untouched] == 0.0)
  # The xla impl is the reference.
  np.testing.assert_array_equal(
      np.asarray(gather_sum(a["table"], idx, a["w"], impl="xla"), np.float32),
      np.asarray(gather_sum_reference(a["table"], idx, a["w"]), np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gather_dot_matches_reference(dtype):
  a = _inputs(2, T, S, N, D, dtype)
  idx = a["idx"]
  ct = jnp.asarray(np.random.default_rng(7).standard_normal((T, S), np.float32))
  ours = jax.jit(lambda tb, x: _vjp(
      lambda tb, x: gather_dot(tb, idx, x, impl="interpret", **SMALL), (tb, x), ct))
  ref = jax.jit(lambda tb, x: _vjp(
      lambda tb, x: gather_dot_reference(tb, idx, x), (tb, x), ct))
  got = ours(a["table"], a["x"])
  want = ref(*_f32(a["table"], a["x"]))
  for what, g, r, dt in zip(("s", "dtable", "dx"), got, want, (jnp.float32, dtype, dtype)):
    assert g.dtype == dt, (what, g.dtype)
    # s sums D=40 products of N(0,1): compare relative to sqrt(D)-sized values.
    _assert_close(g / np.sqrt(D), r / np.sqrt(D), dtype, what)


@pytest.mark.parametrize("activation,dtype", [("gelu", jnp.float32), ("relu", jnp.float32),
                                              ("silu", jnp.float32), ("gelu", jnp.bfloat16)])
def test_peer_ffn_matches_reference(activation, dtype):
  a = _inputs(3, T, S, N, D, dtype)
  idx = a["idx"]
  x = (a["x"].astype(jnp.float32) / np.sqrt(D)).astype(dtype)     # pre ~ N(0, 1)
  kw = dict(SMALL, block_k=8)
  ours = jax.jit(lambda *p: _vjp(
      lambda x, u, v, g: peer_ffn(x, u, v, idx, g, activation=activation, impl="interpret",
                                  **kw), p, a["ct"]))
  ref = jax.jit(lambda *p: _vjp(
      lambda x, u, v, g: peer_ffn_reference(x, u, v, idx, g, activation), p,
      a["ct"].astype(jnp.float32)))
  got = ours(x, a["table"], a["v"], a["w"])
  want = ref(*_f32(x, a["table"], a["v"], a["w"]))
  for what, g, r in zip(("y", "dx", "du", "dv", "dg"), got, want):
    assert g.dtype == dtype, (what, g.dtype)
    _assert_close(g, r, dtype, f"{activation}/{what}")


def test_s_equals_one():
  """S = 1 (one row per token): all three ops, forward and gradients."""
  t, s = 9, 1
  a = _inputs(4, t, s, N, D, jnp.float32)
  idx = a["idx"]
  x = a["x"] / np.sqrt(D)
  ct_s = jnp.ones((t, s), jnp.float32)

  def run(sum_fn, dot_fn, peer_fn, table, v, w, x):
    return (_vjp(lambda tb, w: sum_fn(tb, idx, w), (table, w), a["ct"]),
            _vjp(lambda tb, x: dot_fn(tb, idx, x), (table, x), ct_s),
            _vjp(lambda x, u, v, g: peer_fn(x, u, v, idx, g), (x, table, v, w), a["ct"]))

  kw = dict(impl="interpret", **SMALL)
  got = jax.jit(functools.partial(
      run, functools.partial(gather_sum, **kw), functools.partial(gather_dot, **kw),
      functools.partial(peer_ffn, block_k=8, **kw)))(a["table"], a["v"], a["w"], x)
  want = run(gather_sum_reference, gather_dot_reference, peer_ffn_reference, a["table"], a["v"],
             a["w"], x)
  for op, gs, rs in zip(("sum", "dot", "peer"), got, want):
    for g, r in zip(gs, rs):
      _assert_close(g / np.sqrt(D), r / np.sqrt(D), jnp.float32, op)


# ------------------------------------------------------------------------------------------------
# reverse index: exactness, hot rows, determinism


def _hot_case(seed=5, t=24, s=7, n=13, d=24):
  """Integer-valued data (every product and partial sum exact in float32) and heavily skewed
  indices: row 0 is selected ~half the time (count >> block_contrib), several rows never."""
  rng = np.random.default_rng(seed)
  idx = np.where(rng.random((t, s)) < 0.5, 0, rng.integers(0, n // 2, (t, s)))
  ints = lambda *shape: jnp.asarray(rng.integers(-4, 5, shape), jnp.float32)
  return jnp.asarray(idx, jnp.int32), ints(n, d), ints(t, s), ints(t, d), n


def test_table_gradient_exact_on_hot_rows_and_deterministic():
  idx, table, w, dout, n = _hot_case()
  counts = np.bincount(np.asarray(idx).ravel(), minlength=n)
  assert counts.max() > 8 * SMALL["block_contrib"] and (counts == 0).any()

  def grads(table, w):
    _, vjp = jax.vjp(lambda tb, w: gather_sum(tb, idx, w, impl="interpret", **SMALL), table, w)
    return vjp(dout)

  dtable, dw = jax.jit(grads)(table, w)
  want = table_grad_reference(idx, w, dout, n)
  # Integer data: the sorted accumulation is exact, so it equals the segment sum bit for bit.
  np.testing.assert_array_equal(np.asarray(dtable), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(dw), np.asarray(gather_dot_reference(table, idx, dout)))
  # Two independent compilations and runs on random (non-integer) data: bitwise equal.
  rnd = jnp.asarray(np.random.default_rng(9).standard_normal(dout.shape, np.float32))
  run1 = jax.jit(lambda tb, w, c: jax.vjp(
      lambda tb, w: gather_sum(tb, idx, w, impl="interpret", **SMALL), tb, w)[1](c))
  run2 = jax.jit(lambda tb, w, c: jax.vjp(
      lambda tb, w: gather_sum(tb, idx, w, impl="interpret", **SMALL), tb, w)[1](c))
  for a, b in zip(run1(table, w, rnd), run2(table, w, rnd)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_out_of_range_indices_are_clamped_like_reference():
  """Indices < 0 or >= N read (and receive the gradient of) row 0 / N - 1; default tiles."""
  a = _inputs(6, 10, 3, N, D, jnp.float32)
  idx = jnp.asarray([[-3, 0, N], [N + 7, 1, -1]] * 5, jnp.int32)
  clamped = jnp.clip(idx, 0, N - 1)
  ct = a["ct"][:10]

  def both(table, w):
    return (_vjp(lambda tb, w: gather_sum(tb, idx, w, impl="interpret"), (table, w), ct),
            _vjp(lambda tb, w: gather_sum_reference(tb, clamped, w), (table, w), ct),
            gather_sum(table, idx, w, impl="xla"))

  got, want, xla = jax.jit(both)(a["table"], a["w"])
  for g, r in zip(got, want):
    _assert_close(g, r, jnp.float32, "clamped")
  _assert_close(xla, got[0], jnp.float32, "xla clamps too")


# ------------------------------------------------------------------------------------------------
# random shapes


@settings(max_examples=3, deadline=None, derandomize=True)
@given(t=st.integers(1, 40), s=st.integers(1, 9), n=st.integers(1, 50), d=st.integers(1, 48),
       bt=st.sampled_from([8, 16]), bd=st.sampled_from([8, 16, 32]),
       u=st.sampled_from([1, 2, 4]), rows=st.sampled_from([4, 8]),
       contrib=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2 ** 16))
def test_random_shapes_gather_sum_and_dot(t, s, n, d, bt, bd, u, rows, contrib, seed):
  a = _inputs(seed, t, s, n, d, jnp.float32)
  idx = a["idx"]
  kw = dict(impl="interpret", block_tokens=bt, block_d=bd, block_s=u, block_rows=rows,
            block_contrib=contrib)
  ct_s = jnp.ones((t, s), jnp.float32)

  def both(fn_sum, fn_dot, table, w, x):
    return (_vjp(lambda tb, w: fn_sum(tb, idx, w), (table, w), a["ct"]),
            _vjp(lambda tb, x: fn_dot(tb, idx, x), (table, x), ct_s))

  got = jax.jit(functools.partial(both, functools.partial(gather_sum, **kw),
                                  functools.partial(gather_dot, **kw)))(a["table"], a["w"],
                                                                        a["x"])
  want = both(gather_sum_reference, gather_dot_reference, a["table"], a["w"], a["x"])
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-5, atol=2e-5 * max(1, d))


@settings(max_examples=2, deadline=None, derandomize=True)
@given(t=st.integers(1, 30), s=st.integers(1, 6), n=st.integers(1, 30), d=st.integers(1, 40),
       bd=st.sampled_from([8, 32]), bk=st.sampled_from([8, 16]),
       activation=st.sampled_from(["gelu", "relu", "silu"]), seed=st.integers(0, 2 ** 16))
def test_random_shapes_peer(t, s, n, d, bd, bk, activation, seed):
  a = _inputs(seed, t, s, n, d, jnp.float32)
  idx = a["idx"]
  x = a["x"] / np.sqrt(d)
  prim = (x, a["table"], a["v"], a["w"])
  fn = lambda x, u, v, g: peer_ffn(x, u, v, idx, g, activation=activation, impl="interpret",
                                   block_tokens=8, block_d=bd, block_k=bk, block_s=2,
                                   block_rows=4, block_contrib=2)
  got = jax.jit(lambda *p: _vjp(fn, p, a["ct"]))(*prim)
  want = _vjp(lambda x, u, v, g: peer_ffn_reference(x, u, v, idx, g, activation), prim, a["ct"])
  for g, r in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-5, atol=2e-5 * max(1, d))


# ------------------------------------------------------------------------------------------------
# errors


def test_bad_inputs_raise_clear_errors():
  a = _inputs(0, 4, 3, 8, 16, jnp.float32)
  table, idx, w, x = a["table"], a["idx"], a["w"], a["x"]
  cases = [
      (lambda: gather_sum(table, idx, w, impl="cuda"), "impl="),
      (lambda: gather_sum(table[0], idx, w), "table_NxD must be a 2-D"),
      (lambda: gather_sum(table.astype(jnp.int32), idx, w), "floating dtype"),
      (lambda: gather_sum(table, idx.astype(jnp.float32), w), "integer dtype"),
      (lambda: gather_sum(table, idx[None], w), "idx_TxS must be a 2-D"),
      (lambda: gather_sum(table, idx, w[:, :2]), "w_TxS has shape"),
      (lambda: gather_sum(table, idx[:, :0], w[:, :0]), "must both be >= 1"),
      (lambda: gather_sum(table, idx, w, block_d=24), "block_d=24 must be a positive power"),
      (lambda: gather_sum(table, idx, w, block_tokens=0), "block_tokens=0"),
      (lambda: gather_sum(table, idx, w, num_warps=0), "num_warps=0"),
      (lambda: gather_dot(table, idx, x[:, :8]), "x_TxD has shape"),
      (lambda: peer_ffn(x, table, table[:4], idx, w), "v_NxD has shape"),
      (lambda: peer_ffn(x, table, table, idx, w, activation="tanh"), "activation='tanh'"),
      (lambda: peer_ffn(x, table, table, idx, w[:2]), "g_TxS has shape"),
  ]
  for fn, match in cases:
    with pytest.raises(ValueError, match=match) as info:
      fn()
    assert "\n" not in str(info.value), str(info.value)


# ------------------------------------------------------------------------------------------------
# GPU path


def test_kernels_lower_to_triton_for_h200(monkeypatch):
  """All four kernels (gather_sum forward, gather_dot, reverse-index table gradient, fused PEER
  forward), reached through the forward and backward of every op, lower to Triton IR in bf16
  with the default (H200) tiles: aligned TARGETS-like shapes and a ragged variant that needs
  every mask. The GPU info is faked as an H200 (jax 0.11.2 private hook); compiling that IR
  needs the GPU itself."""
  gpu_info = pytest.importorskip("jax._src.pallas.triton.gpu_info")
  if not hasattr(gpu_info, "get_gpu_info_from_version"):
    pytest.skip("jax changed its private Triton GPU-info hook")
  monkeypatch.setattr(gpu_info, "get_gpu_info",
                      lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200))
  bf16 = jnp.bfloat16

  def fwd_bwd(table, v, idx, w, x):
    out, vjp_sum = jax.vjp(lambda tb, w: gather_sum(tb, idx, w, impl="pallas"), table, w)
    s, vjp_dot = jax.vjp(lambda tb, x: gather_dot(tb, idx, x, impl="pallas"), table, x)
    y, vjp_peer = jax.vjp(lambda x, u, v, g: peer_ffn(x, u, v, idx, g, impl="pallas"),
                          x, table, v, w)
    return vjp_sum(out), vjp_dot(s), vjp_peer(y)

  names = ("gather_sum_fwd", "gather_dot", "reverse_index_grad", "peer_ffn_fwd")
  for t, s, n, d in ((4096, 128, 2 ** 20, 1024), (1000, 100, 50_000, 1000)):
    sd = jax.ShapeDtypeStruct
    table, idx = sd((n, d), bf16), sd((t, s), jnp.int32)
    w, x = sd((t, s), bf16), sd((t, d), bf16)
    hlo = jax.jit(fwd_bwd).trace(table, table, idx, w, x).lower(
        lowering_platforms=("cuda",)).as_text()
    for name in names:
      assert name in hlo, (name, t, s, n, d)
