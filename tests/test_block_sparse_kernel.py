"""Block-sparse attention kernels (Pallas interpret mode) and the XLA fallback against the dense
masked reference: forward and gradients, f32 and bf16, GQA, padding, segments, empty rows,
per-head layouts; plus a causality property."""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels_pallas.block_sparse_attention import block_sparse_attention, dense_masked_attention
from kernels_pallas.block_sparse_attention import layout as L
from kernels_pallas.block_sparse_attention import masks as M

# ------------------------------------------------------------------------------------------------
# Masks: the library's specs, user functions (in-kernel computable) and an explicit array; layouts
# from the layout compiler.


def _block_pattern(q, kv, h):
  """Random-looking per-head block pattern (diagonal always on); half the chosen 16x16 blocks are
  full, half are thinned element-wise (partial)."""
  qb, kb = q // 16, kv // 16
  chosen = ((qb * 7 + kb * 13 + h * 5) % 4 == 0) | (qb == kb)
  thinned = (qb + kb + h) % 2 == 0
  fine = (q + 2 * kv + h) % 3 != 0
  return chosen & (~thinned | fine)


def _random_block_table(h, t, block, seed=0):
  """bool [H, T, T]: random 32x32 blocks, some thinned at random inside (partial)."""
  rng = np.random.default_rng(seed)
  n = -(-t // block)
  keep = rng.random((h, n, n)) < 0.4
  keep[:, np.arange(n), np.arange(n)] = True
  dense = np.repeat(np.repeat(keep, block, 1), block, 2)[:, :t, :t]
  thin = np.repeat(np.repeat(rng.random((h, n, n)) < 0.5, block, 1), block, 2)[:, :t, :t]
  return dense & (~thin | (rng.random((h, t, t)) < 0.7))


CAUSAL = M.Causal()
WINDOW64 = M.SlidingWindow(63)
BLOCKS = M.FromFunction(_block_pattern, name="blocks")
BIGBIRD = M.BigBird(window=20, num_global=8, num_random_blocks=2, block=16, seed=1)
# Causal, but rows with q % 8 == 3 and the whole q range [32, 64) see nothing.
EMPTY_ROWS = M.FromFunction(lambda q, kv: (kv <= q) & (q % 8 != 3) & (q // 32 != 1),
                            name="empty_rows")


def make_layout(mask, t, s, bq, bkv, num_heads=1):
  if isinstance(mask, np.ndarray):
    return L.layout_from_dense_mask(mask, bq, bkv)
  return L.compile_layout(mask, t, s, bq, bkv, num_heads=num_heads)


# ------------------------------------------------------------------------------------------------

def _inputs(key, b, t, s, h, kvh, d, dtype):
  kq, kk, kv, ko = jax.random.split(key, 4)
  q = jax.random.normal(kq, (b, t, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (b, s, kvh, d), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (b, s, kvh, d), jnp.float32).astype(dtype)
  ct = jax.random.normal(ko, (b, t, h, d), jnp.float32).astype(dtype)
  return q, k, v, ct


def _fwd_bwd(fn, q, k, v, ct):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(ct))


def _segments(b, t, seed=0):
  """Packed documents: ids 0,0,..,1,1,..,2 with random boundaries per batch row."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((b, t), np.int32)
  for r in range(b):
    cuts = np.sort(rng.choice(np.arange(1, t), 3, replace=False))
    for c in cuts:
      ids[r, c:] += 1
  return jnp.asarray(ids)


CASES = {
    # name: (T, bq, bkv, H, K, D, mask, layout heads, segments)
    "causal": (128, 32, 32, 2, 2, 64, CAUSAL, 1, False),
    "window_d128_gqa2": (128, 32, 32, 4, 2, 128, WINDOW64, 1, False),
    "window64_gqa2": (128, 32, 16, 4, 2, 32, WINDOW64, 1, False),
    "blocks_per_head_gqa4": (128, 16, 16, 4, 1, 16, BLOCKS, 4, False),
    "array_per_head": (128, 32, 32, 2, 2, 16, _random_block_table(2, 128, 32), 2, False),
    "bigbird_2_layout_rows_gqa2": (128, 16, 16, 4, 2, 16, BIGBIRD, 2, False),
    "ragged_T100": (100, 32, 32, 2, 1, 16, CAUSAL, 1, False),
    "segments": (128, 32, 32, 2, 1, 16, CAUSAL, 1, True),
    "empty_rows": (128, 32, 32, 2, 2, 16, EMPTY_ROWS, 1, False),
}
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def _run_case(name, dtype, impls=("interpret", "xla")):
  t, bq, bkv, h, kvh, d, mask, layout_heads, segments = CASES[name]
  b = 2
  layout = make_layout(mask, t, t, bq, bkv, num_heads=layout_heads)
  assert layout.num_heads == layout_heads
  if name in ("window64_gqa2", "blocks_per_head_gqa4", "array_per_head",
              "bigbird_2_layout_rows_gqa2"):   # both block classes (full / partial) are exercised
    listed = np.arange(layout.kv_full.shape[-1]) < layout.kv_num_blocks[..., None]
    assert (layout.kv_full & listed).any() and (~layout.kv_full & listed).any(), name
  # Dense truth for q head h: layout row h % layout_heads (the kernel's contract).
  dense = L.dense_mask(layout.mask, t, t, layout_heads)[np.arange(h) % layout_heads]
  q, k, v, ct = _inputs(jax.random.key(zlib.crc32(name.encode())), b, t, t, h, kvh, d, dtype)
  seg = _segments(b, t) if segments else None

  ref_fn = lambda q, k, v: dense_masked_attention(q, k, v, dense, segment_ids_q=seg,
                                                  segment_ids_kv=seg)
  # Reference in f32 from the same (rounded) inputs.
  f32 = lambda x: x.astype(jnp.float32)
  want = jax.jit(lambda *a: _fwd_bwd(ref_fn, *a))(f32(q), f32(k), f32(v), f32(ct))
  errors = {}
  for impl in impls:
    fn = functools.partial(block_sparse_attention, layout=layout, segment_ids_q=seg,
                           segment_ids_kv=seg, impl=impl)
    got = jax.jit(lambda *a: _fwd_bwd(lambda q, k, v: fn(q, k, v), *a))(q, k, v, ct)
    for what, g, w in zip(("out", "dq", "dk", "dv"), got, want):
      assert g.dtype == dtype and g.shape == w.shape, (impl, what, g.dtype, g.shape)
      g = np.asarray(g.astype(jnp.float32))
      assert np.isfinite(g).all(), (name, impl, what, "non-finite values")
      err = float(np.max(np.abs(g - np.asarray(w)) / (1.0 + np.abs(np.asarray(w)))))
      errors[(impl, what)] = err
      assert err <= TOL[dtype], (name, impl, what, err)
  return errors, (q, k, v, ct, got, layout)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_dense_reference_f32(name):
  errors, (q, k, v, ct, got, layout) = _run_case(name, jnp.float32)
  print(name, "f32", {f"{i}/{w}": f"{e:.1e}" for (i, w), e in errors.items()})
  if name == "empty_rows":
    t = q.shape[1]
    rows = np.asarray([qi for qi in range(t) if qi % 8 == 3 or qi // 32 == 1])
    out, dq = np.asarray(got[0]), np.asarray(got[1])
    assert np.all(out[:, rows] == 0.0) and np.all(dq[:, rows] == 0.0)
    assert int(np.asarray(layout.kv_num_blocks)[0, 1]) == 0  # a q block with no kv block at all


@pytest.mark.parametrize("name", ["causal", "blocks_per_head_gqa4", "ragged_T100", "segments",
                                  "array_per_head"])
def test_matches_dense_reference_bf16(name):
  errors, _ = _run_case(name, jnp.bfloat16)
  print(name, "bf16", {f"{i}/{w}": f"{e:.1e}" for (i, w), e in errors.items()})


@settings(max_examples=4, deadline=None, derandomize=True)
@given(t=st.integers(17, 96), s=st.integers(17, 96), bq=st.sampled_from([16, 32]),
       bkv=st.sampled_from([16, 32]), group=st.sampled_from([1, 2]),
       mask=st.sampled_from(["causal", "full", "window:20"]), segments=st.booleans())
def test_random_shapes_cross_attention(t, s, bq, bkv, group, mask, segments):
  """Unequal T and S, odd lengths, mixed block sizes: interpret-mode forward + gradients."""
  layout = L.compile_layout(mask, t, s, bq, bkv)
  dense = L.dense_mask(layout.mask, t, s)
  q, k, v, ct = _inputs(jax.random.key(t * 131 + s), 1, t, s, 2, 2 // group, 16, jnp.float32)
  seg_q = _segments(1, t, seed=1) if segments else None
  seg_kv = jnp.sort(jax.random.randint(jax.random.key(s), (1, s), 0, 4), axis=1) if segments \
      else None
  ref = lambda q, k, v: dense_masked_attention(q, k, v, dense, segment_ids_q=seg_q,
                                               segment_ids_kv=seg_kv)
  fn = lambda q, k, v: block_sparse_attention(q, k, v, layout, segment_ids_q=seg_q,
                                              segment_ids_kv=seg_kv, impl="interpret")
  for g, w in zip(_fwd_bwd(fn, q, k, v, ct), _fwd_bwd(ref, q, k, v, ct)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=2e-5)


def test_causal_output_ignores_future_tokens():
  """Changing k/v at positions > t0 leaves outputs at positions <= t0 bit-identical."""
  t, t0 = 128, 70
  layout = make_layout(CAUSAL, t, t, 32, 32)
  q, k, v, _ = _inputs(jax.random.key(3), 1, t, t, 2, 2, 32, jnp.float32)
  noise = jax.random.normal(jax.random.key(4), k.shape)
  later = (jnp.arange(t) > t0)[None, :, None, None]
  k2, v2 = jnp.where(later, k + noise, k), jnp.where(later, v - noise, v)
  for impl in ("interpret", "xla"):
    fn = jax.jit(functools.partial(block_sparse_attention, layout=layout, impl=impl))
    a, b = np.asarray(fn(q, k, v)), np.asarray(fn(q, k2, v2))
    np.testing.assert_array_equal(a[:, :t0 + 1], b[:, :t0 + 1])
    assert not np.allclose(a[:, t0 + 1:], b[:, t0 + 1:])


def test_bad_inputs_raise_clear_errors():
  layout = make_layout(CAUSAL, 64, 64, 32, 32)
  q, k, v, _ = _inputs(jax.random.key(0), 1, 64, 64, 3, 2, 16, jnp.float32)
  with pytest.raises(ValueError, match="multiple of num kv heads"):
    block_sparse_attention(q, k, v, layout, impl="xla")
  q, k, v, _ = _inputs(jax.random.key(0), 1, 32, 32, 2, 2, 16, jnp.float32)
  with pytest.raises(ValueError, match="compiled for seq_q=64"):
    block_sparse_attention(q, k, v, layout, impl="xla")
  with pytest.raises(ValueError, match="impl="):
    block_sparse_attention(q, k, v, make_layout(CAUSAL, 32, 32, 32, 32), impl="cuda")


def test_kernels_lower_to_triton_for_h200(monkeypatch):
  """The three kernels (forward, dQ, dK/dV) lower to Triton IR on this CPU machine, with the GPU
  info faked as an H200 (jax 0.11.2 private hook); compiling that IR needs the GPU itself."""
  gpu_info = pytest.importorskip("jax._src.pallas.triton.gpu_info")
  if not hasattr(gpu_info, "get_gpu_info_from_version"):
    pytest.skip("jax changed its private Triton GPU-info hook")
  monkeypatch.setattr(gpu_info, "get_gpu_info",
                      lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200))
  t = 96
  layout = make_layout(BIGBIRD, t, t, 16, 32, num_heads=2)   # partial + full, padding, 2 rows
  seg = _segments(1, t)
  q = jax.ShapeDtypeStruct((1, t, 4, 64), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, t, 2, 64), jnp.bfloat16)

  def fwd_bwd(q, k, v):
    fn = lambda q, k, v: block_sparse_attention(q, k, v, layout, segment_ids_q=seg, impl="pallas")
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(out)

  hlo = jax.jit(fwd_bwd).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
  for name in ("block_sparse_attention_fwd", "block_sparse_attention_dq",
               "block_sparse_attention_dkv"):
    assert name in hlo, name
