"""Grouped matmul kernels (Pallas interpret mode) against jax.lax.ragged_dot and the pure-jnp
per-group loop: forward (plain and transposed rhs), tgmm and gradients through the custom_vjp,
f32 tight / bf16 loose, on balanced, skewed, empty and partial group sizes; hypothesis over group
size vectors; tile metadata; bad inputs; Triton lowering of all kernels for an H200 (compiling
them to a cubin for an H100: tests/test_gpu_compile.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels_pallas.grouped_matmul import (gmm, gmm_loop_reference, gmm_tile_metadata,
                                           grouped_matmul, ragged_dot_xla, row_group_ids, tgmm,
                                           tgmm_loop_reference)

# M, K, N are not multiples of the tiles: the wrapper pads all three.
M, K, N, G = 70, 40, 24, 6
SIZE_CASES = {
    "balanced": [11, 11, 12, 12, 12, 12],
    "skewed": [50, 10, 5, 3, 1, 1],
    "empty_groups": [0, 30, 0, 0, 40, 0],
    "sum_below_m": [5, 7, 3, 0, 9, 20],           # rows 44.. belong to no group -> 0
    "one_group_all": [0, 0, 70, 0, 0, 0],
    "tiny_groups": [1, 2, 3, 1, 2, 1],            # five groups inside the first 16-row tile
    "all_empty": [0, 0, 0, 0, 0, 0],
}
TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-4), jnp.bfloat16: dict(rtol=2e-2, atol=6e-2)}


def _data(dtype, transpose_rhs=False, seed=0, m=M, k=K, n=N, g=G):
  rng = np.random.default_rng(seed)
  lhs = jnp.asarray(rng.normal(size=(m, k)), dtype)
  rhs = jnp.asarray(rng.normal(size=(g, n, k) if transpose_rhs else (g, k, n)) / np.sqrt(k),
                    dtype)
  w = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
  return lhs, rhs, w


def _close(actual, expected, dtype):
  np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                             **TOL[dtype])


# ------------------------------------------------------------------------------------------------
# forward


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("transpose_rhs", [False, True], ids=["rhs", "rhs_t"])
def test_forward_matches_references(dtype, transpose_rhs):
  lhs, rhs, _ = _data(dtype, transpose_rhs)
  tiling = (16, 16, 16) if dtype == jnp.float32 else None      # bf16: default tiles, capped
  ours = jax.jit(lambda a, b, s: grouped_matmul(a, b, s, transpose_rhs=transpose_rhs,
                                                impl="interpret", tiling=tiling))
  xla = jax.jit(lambda a, b, s: ragged_dot_xla(a, b, s, transpose_rhs=transpose_rhs))
  for name, sizes in SIZE_CASES.items():
    s = jnp.asarray(sizes, jnp.int32)
    out = ours(lhs, rhs, s)
    assert out.shape == (M, N) and out.dtype == dtype, name
    _close(out, gmm_loop_reference(lhs, rhs, s, transpose_rhs=transpose_rhs), dtype)
    _close(out, xla(lhs, rhs, s), dtype)
    assert not np.asarray(out[sum(sizes):]).any(), f"{name}: rows past the groups must be 0"


def test_tgmm_matches_references():
  for dtype in (jnp.float32, jnp.bfloat16):
    lhs, _, w = _data(dtype, seed=1)
    dout = w.astype(dtype)
    ours = jax.jit(lambda a, d, s: tgmm(a, d, s, impl="interpret", tiling=(16, 16, 16)))
    xla = jax.jit(lambda a, d, s: tgmm(a, d, s, impl="xla"))
    for name, sizes in SIZE_CASES.items():
      s = jnp.asarray(sizes, jnp.int32)
      out = ours(lhs, dout, s)
      assert out.shape == (G, K, N) and out.dtype == dtype, name
      _close(out, tgmm_loop_reference(lhs, dout, s), dtype)
      _close(out, xla(lhs, dout, s), dtype)
      for g in np.flatnonzero(np.asarray(sizes) == 0):
        assert not np.asarray(out[g]).any(), f"{name}: empty group {g} must give zeros"


def test_rows_outside_groups_are_never_read():
  """NaN in rows past the last group (lhs and dout) does not leak into any output: the kernels
  load those rows masked, the reference selects with where."""
  lhs, rhs, w = _data(jnp.float32, seed=2)
  sizes = jnp.asarray(SIZE_CASES["sum_below_m"], jnp.int32)
  lhs = lhs.at[44:].set(jnp.nan)
  dout = w.at[44:].set(jnp.nan)
  out = jax.jit(lambda a, b: gmm(a, b, sizes, impl="interpret", tiling=(16, 16, 16)))(lhs, rhs)
  assert np.isfinite(np.asarray(out)).all()
  _close(out, gmm_loop_reference(lhs, rhs, sizes), jnp.float32)
  dw = jax.jit(lambda a, d: tgmm(a, d, sizes, impl="interpret", tiling=(16, 16, 16)))(lhs, dout)
  assert np.isfinite(np.asarray(dw)).all()
  _close(dw, tgmm_loop_reference(lhs, dout, sizes), jnp.float32)


def test_preferred_element_type_and_gradient_dtypes():
  lhs, rhs, w = _data(jnp.bfloat16, seed=3)
  sizes = jnp.asarray(SIZE_CASES["skewed"], jnp.int32)
  fn = lambda a, b: grouped_matmul(a, b, sizes, impl="interpret",
                                   preferred_element_type=jnp.float32)
  out, vjp = jax.jit(lambda a, b: jax.vjp(fn, a, b))(lhs, rhs)
  assert out.dtype == jnp.float32
  _close(out, gmm_loop_reference(lhs, rhs, sizes, preferred_element_type=jnp.float32),
         jnp.bfloat16)
  dl, dr = vjp(w)
  assert dl.dtype == jnp.bfloat16 and dr.dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------------
# gradients through the custom_vjp


def _loss(fn, w):
  return lambda a, b, s: jnp.sum(fn(a, b, s).astype(jnp.float32) * w)


@pytest.mark.parametrize("dtype,transpose_rhs", [(jnp.float32, False), (jnp.float32, True),
                                                 (jnp.bfloat16, False)],
                         ids=["f32-rhs", "f32-rhs_t", "bf16-rhs"])
def test_gradients_match_reference(dtype, transpose_rhs):
  lhs, rhs, w = _data(dtype, transpose_rhs, seed=4)
  # f32: block_n != block_k, so the backward swaps their roles where the padded dims need it.
  tiling = (16, 32, 16) if dtype == jnp.float32 else None
  ours = jax.jit(jax.value_and_grad(_loss(
      lambda a, b, s: grouped_matmul(a, b, s, transpose_rhs=transpose_rhs, impl="interpret",
                                     tiling=tiling), w), argnums=(0, 1)))
  ref = jax.jit(jax.value_and_grad(_loss(
      lambda a, b, s: gmm_loop_reference(a, b, s, transpose_rhs=transpose_rhs), w),
      argnums=(0, 1)))
  for name in ("balanced", "skewed", "empty_groups", "sum_below_m", "tiny_groups"):
    s = jnp.asarray(SIZE_CASES[name], jnp.int32)
    (v, (dl, dr)), (v_ref, (dl_ref, dr_ref)) = ours(lhs, rhs, s), ref(lhs, rhs, s)
    assert dl.dtype == dtype and dr.dtype == dtype and dr.shape == rhs.shape, name
    scale = 1.0 if dtype == jnp.float32 else float(np.abs(np.asarray(v_ref)) + 1.0) * 0.05
    np.testing.assert_allclose(float(v), float(v_ref), rtol=1e-4, atol=1e-3 * scale)
    _close(dl, dl_ref, dtype)
    _close(dr, dr_ref, dtype)
    total = sum(SIZE_CASES[name])
    assert not np.asarray(dl[total:]).any(), f"{name}: rows past the groups get no gradient"


def test_xla_impl_gradients_match_reference():
  lhs, rhs, w = _data(jnp.float32, seed=5)
  s = jnp.asarray(SIZE_CASES["empty_groups"], jnp.int32)
  got = jax.grad(_loss(lambda a, b, s: grouped_matmul(a, b, s, impl="xla"), w),
                 argnums=(0, 1))(lhs, rhs, s)
  want = jax.grad(_loss(gmm_loop_reference, w), argnums=(0, 1))(lhs, rhs, s)
  for a, b in zip(got, want):
    _close(a, b, jnp.float32)


# ------------------------------------------------------------------------------------------------
# properties over group size vectors (one compiled function: the sizes are traced)

HM, HK, HN, HG = 40, 16, 32, 5


@pytest.fixture(scope="module")
def hypothesis_fns():
  rng = np.random.default_rng(6)
  lhs = jnp.asarray(rng.normal(size=(HM, HK)), jnp.float32)
  rhs = jnp.asarray(rng.normal(size=(HG, HK, HN)), jnp.float32)
  rhs_t = jnp.swapaxes(rhs, 1, 2)
  w = jnp.asarray(rng.normal(size=(HM, HN)), jnp.float32)

  def run(fn):
    def f(s):
      loss = lambda a, b, bt: (jnp.sum(fn(a, b, s, False) * w) +
                               jnp.sum(fn(a, bt, s, True) * w * 0.5))
      return jax.value_and_grad(loss, argnums=(0, 1, 2))(lhs, rhs, rhs_t)
    return jax.jit(f)

  ours = run(lambda a, b, s, t: grouped_matmul(a, b, s, transpose_rhs=t, impl="interpret",
                                               tiling=(16, 16, 16)))
  ref = run(lambda a, b, s, t: gmm_loop_reference(a, b, s, transpose_rhs=t))
  return ours, ref


@settings(max_examples=15)
@given(sizes=st.lists(st.integers(0, 24), min_size=HG, max_size=HG))
def test_property_any_group_sizes(hypothesis_fns, sizes):
  """Any size vector (zeros, tiny groups, totals above M: traced sizes are clipped at row M)
  gives the loop reference's value and lhs / rhs / rhs_t gradients."""
  ours, ref = hypothesis_fns
  s = jnp.asarray(sizes, jnp.int32)
  (v, grads), (v_ref, grads_ref) = ours(s), ref(s)
  np.testing.assert_allclose(float(v), float(v_ref), rtol=1e-5, atol=1e-3)
  for a, b in zip(grads, grads_ref):
    _close(a, b, jnp.float32)


_metadata = jax.jit(gmm_tile_metadata, static_argnums=(1, 2, 3))
_group_ids = jax.jit(row_group_ids, static_argnums=1)


@settings(max_examples=30)
@given(sizes=st.lists(st.integers(0, 40), min_size=8, max_size=8),
       block_m=st.sampled_from([16, 32]))
def test_property_tile_metadata(sizes, block_m):
  """Each M tile lists exactly the group range from the group of its first row to the group of
  its last grouped row; tiles past the groups list none."""
  num_rows = 96
  num_tiles = num_rows // block_m
  start, end, first, count = map(np.asarray, _metadata(
      jnp.asarray(sizes, jnp.int32), num_rows, num_tiles, block_m))
  gid = np.asarray(_group_ids(jnp.asarray(sizes, jnp.int32), num_rows))
  for i in range(num_tiles):
    groups = sorted(set(gid[i * block_m:(i + 1) * block_m].tolist()) - {len(sizes)})
    if not groups:
      assert count[i] == 0
      continue
    assert (first[i], first[i] + count[i] - 1) == (groups[0], groups[-1])
    listed = range(first[i], first[i] + count[i])
    assert all(end[g] == start[g] for g in listed if g not in groups)   # skipped ones are empty


# ------------------------------------------------------------------------------------------------
# bad inputs


def test_bad_inputs_raise_one_line_value_errors():
  lhs, rhs, _ = _data(jnp.float32)
  s = jnp.asarray(SIZE_CASES["balanced"], jnp.int32)
  cases = [
      (lambda: grouped_matmul(lhs, rhs, s, impl="cuda"), "impl="),
      (lambda: grouped_matmul(lhs[0], rhs, s), r"lhs must be \[M, K\]"),
      (lambda: grouped_matmul(lhs, rhs[0], s), r"rhs must be \[G, K, N\]"),
      (lambda: grouped_matmul(lhs, rhs, s, transpose_rhs=True), "contraction mismatch"),
      (lambda: grouped_matmul(lhs, rhs, s[:5]), "rhs has G=6"),
      (lambda: grouped_matmul(lhs, rhs.astype(jnp.bfloat16), s), "cast both"),
      (lambda: grouped_matmul(lhs.astype(jnp.int32), rhs.astype(jnp.int32), s), "dtype int32"),
      (lambda: grouped_matmul(lhs, rhs, s.astype(jnp.float32)), "integer dtype"),
      (lambda: grouped_matmul(lhs, rhs, s[None]), "1-D integer array"),
      (lambda: grouped_matmul(lhs, rhs, s, tiling=(16, 24, 16)), "power of"),
      (lambda: grouped_matmul(lhs, rhs, s, tiling=(8, 16, 16)), ">= 16"),
      (lambda: grouped_matmul(lhs, rhs, s + 1), "exceeds the 70 rows"),
      (lambda: grouped_matmul(lhs, rhs, s.at[0].set(-1)), "negative"),
      (lambda: grouped_matmul(lhs, rhs, s, preferred_element_type=jnp.int8), "preferred_"),
      (lambda: tgmm(lhs, lhs[:10], s), "same rows"),
      (lambda: tgmm(lhs, lhs.astype(jnp.bfloat16), s), "cast both"),
  ]
  for fn, match in cases:
    with pytest.raises(ValueError, match=match) as info:
      fn()
    assert "\n" not in str(info.value)


def test_traced_oversized_groups_are_clipped_like_the_reference():
  lhs, rhs, _ = _data(jnp.float32)
  s = jnp.asarray([30, 30, 30, 30, 0, 5], jnp.int32)                 # total 125 > M = 70
  out = jax.jit(lambda s: gmm(lhs, rhs, s, impl="interpret", tiling=(16, 16, 16)))(s)
  gid = np.asarray(row_group_ids(s, M))
  assert gid.max() == 2 and (gid[60:] == 2).all()                    # group 2 keeps 10 rows
  _close(out, gmm_loop_reference(lhs, rhs, s), jnp.float32)
  _close(out, jax.jit(lambda s: ragged_dot_xla(lhs, rhs, s))(s), jnp.float32)


# ------------------------------------------------------------------------------------------------
# GPU path: Triton lowering with a faked H200


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
def test_kernels_lower_to_triton_for_h200(monkeypatch):
  """gmm, gmm with transposed rhs and tgmm (forward and both backward products, for both rhs
  layouts) lower to Triton IR in bf16 at the default 128x128x64 tiles, with the GPU info faked
  as an H200 (jax 0.11.2 private hook). Lowering does not verify the IR: XLA's Triton compile
  does (tests/test_gpu_compile.py, deviceless for an H100)."""
  gpu_info = pytest.importorskip("jax._src.pallas.triton.gpu_info")
  if not hasattr(gpu_info, "get_gpu_info_from_version"):
    pytest.skip("jax changed its private Triton GPU-info hook")
  monkeypatch.setattr(gpu_info, "get_gpu_info",
                      lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200))
  m, k, n, g = 1000, 512, 384, 6      # M padded to 1024; G and N not powers of two
  lhs = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
  sizes = jax.ShapeDtypeStruct((g,), jnp.int32)
  for transpose_rhs, rhs_shape in ((False, (g, k, n)), (True, (g, n, k))):
    rhs = jax.ShapeDtypeStruct(rhs_shape, jnp.bfloat16)

    def fwd_bwd(a, b, s):
      fn = lambda a, b: grouped_matmul(a, b, s, transpose_rhs=transpose_rhs, impl="pallas")
      out, vjp = jax.vjp(fn, a, b)
      return out, vjp(out)

    hlo = jax.jit(fwd_bwd).trace(lhs, rhs, sizes).lower(lowering_platforms=("cuda",)).as_text()
    assert hlo.count("custom_call @__gpu$xla.gpu.triton") == 3, transpose_rhs   # fwd, d lhs, d rhs
    for name in ('grouped_matmul_gmm"', "grouped_matmul_gmm_t", "grouped_matmul_tgmm"):
      assert name in hlo, (transpose_rhs, name)
