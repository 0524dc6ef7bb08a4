"""Mosaic TPU grouped matmul (kernels_pallas/grouped_matmul/tpu_kernel.py) in Pallas TPU
interpret mode (impl="mosaic_interpret") against jax.lax.ragged_dot (impl="xla"): forward and
both gradients through the custom_vjp, float32 and bfloat16, plain and transposed rhs, on group
sizes with empty groups, groups straddling m tiles (and a tile holding three groups) and fewer
grouped rows than M (NaN in the rows past the groups: they must give 0 and never leak into a
gradient). The interpreter fills uninitialised VMEM with NaN and shuffles the parallel grid
axes, so a block stored before it is written or a visit order the kernel relies on shows up as
a mismatch. Also: the visit schedule's coverage properties, tile fitting, impl / dtype errors.
Compiling the kernels AOT for v5e / v5p: the TPU compile tests (kernels_pallas._aot_cases)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.grouped_matmul import (grouped_matmul, ops, ragged_dot_xla, resolve_impl,
                                           tpu_kernel, visit_schedule)

# K and N are not multiples of 128 (the wrapper pads them); 16-row tiles: M has 6 of them.
M, K, N = 96, 200, 136
TILING = (16, 128, 128)
# Rows: g1 [0, 21) straddles tiles 0-1, g2 [21, 26) and g4 [26, 64) share tile 1 with it (g3 is
# empty in between), g5 [64, 77); rows 77.. are in no group (tile 4 partly, tile 5 wholly).
SIZES = np.array([0, 21, 5, 0, 38, 13], np.int32)
TOTAL = int(SIZES.sum())
TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-4), jnp.bfloat16: dict(rtol=2e-2, atol=6e-2)}


def _data(dtype, transpose_rhs, seed=0):
  """(lhs, rhs, cotangent) with NaN in lhs / cotangent rows past the groups, and the same lhs
  and cotangent with those rows zeroed for the reference (whose result cannot depend on them)."""
  rng = np.random.default_rng(seed)
  lhs = rng.normal(size=(M, K)).astype(np.float32)
  rhs = rng.normal(size=(len(SIZES), N, K) if transpose_rhs else (len(SIZES), K, N)) / np.sqrt(K)
  dout = rng.normal(size=(M, N)).astype(np.float32)
  nan_tail = lambda x: np.where(np.arange(M)[:, None] >= TOTAL, np.nan, x)
  zero_tail = lambda x: np.where(np.arange(M)[:, None] >= TOTAL, 0.0, x)
  cast = lambda x: jnp.asarray(x, dtype)
  return (cast(nan_tail(lhs)), cast(rhs), cast(nan_tail(dout)),
          cast(zero_tail(lhs)), cast(zero_tail(dout)))


def _close(actual, expected, dtype):
  np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                             **TOL[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("transpose_rhs", [False, True], ids=["rhs", "rhs_t"])
def test_forward_and_gradients_match_xla(dtype, transpose_rhs):
  lhs, rhs, dout, lhs_ref, dout_ref = _data(dtype, transpose_rhs)
  sizes = jnp.asarray(SIZES)

  def run(impl, a, ct):
    fn = lambda a, b: grouped_matmul(a, b, sizes, transpose_rhs=transpose_rhs, impl=impl,
                                     tiling=TILING if impl != "xla" else None)
    out, vjp = jax.vjp(fn, a, rhs)
    return (out, *vjp(ct))

  got = jax.jit(lambda a, ct: run("mosaic_interpret", a, ct))(lhs, dout)
  # The reference in float32 on the same (rounded) values: bf16 results differ by one rounding.
  f32 = lambda x: x.astype(jnp.float32)
  want = jax.jit(lambda a, b, ct: jax.vjp(
      lambda a, b: ragged_dot_xla(a, b, sizes, transpose_rhs=transpose_rhs), a, b)[1](ct))
  out_ref = ragged_dot_xla(f32(lhs_ref), f32(rhs), sizes, transpose_rhs=transpose_rhs)
  dlhs_ref, drhs_ref = want(f32(lhs_ref), f32(rhs), f32(dout_ref))
  for name, g, w in (("out", got[0], out_ref), ("d lhs", got[1], dlhs_ref),
                     ("d rhs", got[2], drhs_ref)):
    assert g.dtype == dtype, name
    assert np.isfinite(np.asarray(g, np.float32)).all(), f"{name}: NaN / inf leaked"
    _close(g, w, dtype)
  np.testing.assert_array_equal(np.asarray(got[0][TOTAL:], np.float32), 0.0)
  np.testing.assert_array_equal(np.asarray(got[1][TOTAL:], np.float32), 0.0)
  for empty in np.flatnonzero(SIZES == 0):
    np.testing.assert_array_equal(np.asarray(got[2][empty], np.float32), 0.0)


def test_default_tiles_and_no_groups():
  """Default tiles fitted to tiny dims (one 96-row tile, one 256-lane block), and all groups
  empty: zeros everywhere (every output block is still stored)."""
  lhs, rhs, dout, *_ = _data(jnp.bfloat16, False, seed=1)
  for sizes in (SIZES, np.zeros_like(SIZES)):
    s = jnp.asarray(sizes)
    fn = lambda a, b: grouped_matmul(a, b, s, impl="mosaic_interpret")
    out, vjp = jax.vjp(fn, jnp.nan_to_num(lhs), rhs)
    dlhs, drhs = vjp(jnp.nan_to_num(dout))
    want = ragged_dot_xla(jnp.nan_to_num(lhs).astype(jnp.float32), rhs.astype(jnp.float32), s)
    _close(out, want, jnp.bfloat16)
    if not sizes.any():
      for x in (out, dlhs, drhs):
        np.testing.assert_array_equal(np.asarray(x, np.float32), 0.0)


@pytest.mark.parametrize("per", ["tile", "group"])
def test_visit_schedule_covers_every_row_once(per):
  """Active visits split the grouped rows [0, total) into disjoint [lo, hi) ranges inside their
  tile and group; every m tile (gmm) / group (tgmm) has exactly one first visit (and, tgmm, one
  last visit); visits are ordered; the static count is m_tiles + G - 1."""
  rng = np.random.default_rng(0)
  bm, m, g = 16, 96, 6
  tiles = m // bm
  for sizes in [SIZES, np.zeros(g, np.int32), np.array([0, 0, 96, 0, 0, 0]),
                *[rng.multinomial(rng.integers(0, m + 1), np.ones(g) / g) for _ in range(12)]]:
    s = {k: np.asarray(v) for k, v in visit_schedule(jnp.asarray(sizes, jnp.int32), m, tiles, bm,
                                                     per=per).items()}
    assert len(s["tile"]) == tiles + g - 1
    ends = np.cumsum(sizes)
    starts = ends - sizes
    act = s["active"] == 1
    covered = np.zeros(m, int)
    for lo, hi, t, gg in zip(s["lo"][act], s["hi"][act], s["tile"][act], s["group"][act]):
      assert t * bm <= lo < hi <= (t + 1) * bm and starts[gg] <= lo and hi <= ends[gg]
      covered[lo:hi] += 1
    np.testing.assert_array_equal(covered, (np.arange(m) < ends[-1]).astype(int))
    owner = s["tile"] if per == "tile" else s["group"]
    count = tiles if per == "tile" else g
    np.testing.assert_array_equal(np.bincount(owner[s["first"] == 1], minlength=count),
                                  np.ones(count, int))
    if per == "group":
      np.testing.assert_array_equal(np.bincount(owner[s["last"] == 1], minlength=count),
                                    np.ones(count, int))
    assert (np.diff(s["tile"]) >= 0).all() and (np.diff(s["group"]) >= 0).all()
    # Inactive visits read the blocks of the active visit before them (no extra copies).
    prev = np.maximum.accumulate(np.where(act, s["fetch_tile"], 0))
    np.testing.assert_array_equal(s["fetch_tile"], prev)


def test_tiles_are_fitted_with_little_padding():
  bf = jnp.bfloat16
  assert tpu_kernel.resolve_tiling(None, bf, 32768, 4096, 14336) == (512, 1024, 1024)
  assert tpu_kernel.resolve_tiling(None, bf, 49152, 688, 1408) == (512, 768, 768)
  assert tpu_kernel.resolve_tiling(None, jnp.float32, 20, 64, 100) == (24, 128, 128)
  assert tpu_kernel.resolve_tiling((16, 256, 128), bf, 96, 200, 136) == (16, 256, 128)


def test_impls_and_errors(monkeypatch):
  assert resolve_impl("auto") == "xla"                           # this CPU backend
  monkeypatch.setattr(ops.jax, "default_backend", lambda: "tpu")
  assert resolve_impl("auto") == "mosaic"
  lhs, rhs, *_ = _data(jnp.float32, False)
  s = jnp.asarray(SIZES)
  with pytest.raises(ValueError, match="float32 or bfloat16 operands; got float16"):
    grouped_matmul(lhs.astype(jnp.float16), rhs.astype(jnp.float16), s, impl="mosaic")
  with pytest.raises(ValueError, match="multiple of 16 .bfloat16 sublanes"):
    grouped_matmul(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), s, impl="mosaic",
                   tiling=(8, 128, 128))
  with pytest.raises(ValueError, match="multiples of 128"):
    grouped_matmul(lhs, rhs, s, impl="mosaic_interpret", tiling=(16, 64, 128))
  with pytest.raises(ValueError, match="Triton launch options"):
    grouped_matmul(lhs, rhs, s, impl="mosaic", num_warps=4)
