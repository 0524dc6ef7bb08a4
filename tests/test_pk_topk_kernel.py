"""Fused product-key top-k (Pallas, interpret mode) against the pure-jnp reference and a brute-force
top-k over all n² keys: exact indices (ties included), scores, softmax, gradients; f32 and bf16,
shared / per-head sub-keys, ragged token counts and key chunks; Triton lowering for an H200."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels_pallas.product_key_topk import (product_key_topk, product_key_topk_bruteforce,
                                             product_key_topk_reference)
from kernels_pallas.product_key_topk import kernel as K


def _inputs(seed, lead, h, n, c, dtype, shared1, shared2, grid=True):
  """numpy inputs (no per-shape XLA compiles). ``grid``: multiples of 1/8 in [-2, 2] — exact in
  bf16, and every dot product / sum of them is exact in f32 whatever the summation order, so
  kernel and reference scores agree bit for bit and equal scores (ties) are frequent."""
  rng = np.random.default_rng(seed)

  def make(shape):
    x = rng.standard_normal(shape, dtype=np.float32)
    if grid:
      x = np.clip(np.round(x * 4.0), -16, 16) / 8.0
    return x.astype(dtype)

  return (make(lead + (h, c)), make(lead + (h, c)), make((1 if shared1 else h, n, c)),
          make((1 if shared2 else h, n, c)))


def _fwd_grads(fn, args, weights):
  """Outputs and gradients of the linear functional sum(weights * scores) w.r.t. all inputs."""
  def loss(*a):
    scores, idx = fn(*a)
    return jnp.sum(scores * weights), (scores, idx)
  grads, (scores, idx) = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(*args)
  return scores, idx, grads


def _assert_valid_indices(idx, n):
  idx = np.asarray(idx)
  assert idx.min() >= 0 and idx.max() < n * n
  flat = idx.reshape(-1, idx.shape[-1])
  assert all(len(set(row)) == len(row) for row in flat.tolist()), "duplicate index in a row"


def _max_rel_err(got, want):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.max(np.abs(got - want) / (1.0 + np.abs(want))))


GRAD_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2}

CASES = {
    # name: (lead dims, H, n, C, k, dtype, shared k1, shared k2, softmax, block_tokens, key_chunk)
    "f32_shared_ragged": ((2, 13), 2, 40, 16, 6, jnp.float32, True, True, False, 16, 16),
    "bf16_per_head_softmax": ((19,), 3, 33, 24, 8, jnp.bfloat16, False, False, True, 16, 32),
    "f32_k1_mixed_sharing": ((7,), 2, 24, 16, 1, jnp.float32, True, False, False, 16, 16),
    "bf16_k_equals_n_padded_chunk": ((5,), 2, 12, 8, 12, jnp.bfloat16, False, True, True, 16, 16),
    "f32_k20_many_chunks_bt32": ((37,), 2, 70, 16, 20, jnp.float32, True, False, True, 32, 16),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_exactly(name):
  """Same indices as the reference (bit-exact scores on grid values), same gradients."""
  lead, h, n, c, k, dtype, sh1, sh2, softmax, bt, kc = CASES[name]
  seed = zlib.crc32(name.encode())
  args = _inputs(seed, lead, h, n, c, dtype, sh1, sh2)
  weights = np.random.default_rng(seed + 1).standard_normal(lead + (h, k), np.float32)

  got = _fwd_grads(lambda *a: product_key_topk(*a, k, softmax=softmax, impl="interpret",
                                               block_tokens=bt, key_chunk=kc), args, weights)
  want = _fwd_grads(lambda *a: product_key_topk(*a, k, softmax=softmax, impl="xla"), args, weights)
  scores, idx, grads = got
  assert scores.shape == idx.shape == lead + (h, k)
  assert scores.dtype == jnp.float32 and idx.dtype == jnp.int32
  _assert_valid_indices(idx, n)
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(want[1]))
  if softmax:
    np.testing.assert_allclose(np.asarray(scores), np.asarray(want[0]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(scores).sum(-1), 1.0, rtol=1e-5)
  else:
    np.testing.assert_array_equal(np.asarray(scores), np.asarray(want[0]))
  assert np.all(np.diff(np.asarray(scores), axis=-1) <= 0), "not descending"
  for what, g, w, x in zip(("dq1", "dq2", "dk1", "dk2"), grads, want[2], args):
    assert g.dtype == x.dtype and g.shape == x.shape, (what, g.dtype, g.shape)
    err = _max_rel_err(g, w)
    assert err <= GRAD_TOL[dtype], (name, what, err)


def test_ties_from_duplicate_subkeys_follow_the_index_order():
  """Duplicated sub-key rows make exactly equal scores. On continuous data (no other ties) the
  kernel orders them like the reference and like lax.top_k over all n² keys: lower global index
  first; and the outputs really contain such ties."""
  lead, h, n, c, k = (24,), 2, 32, 16, 10
  q1, q2, k1, k2 = _inputs(7, lead, h, n, c, jnp.float32, False, True, grid=False)
  # Rows 3, 17, 30 of k1 are copies of row 5; rows 0, 9 of k2 copies of row 21.
  k1[:, [3, 17, 30]] = k1[:, 5:6]
  k2[:, [0, 9]] = k2[:, 21:22]
  # Queries aligned with the duplicated rows so the duplicates rank high.
  q1[::2] = 2.0 * k1[:, 5]
  q2[::3] = 2.0 * k2[0, 21]
  args = (q1, q2, k1, k2)
  s, i = jax.jit(lambda *a: product_key_topk(*a, k, impl="interpret"))(*args)
  s_ref, i_ref = jax.jit(lambda *a: product_key_topk_reference(*a, k))(*args)
  s_bf, i_bf = jax.jit(lambda *a: product_key_topk_bruteforce(*a, k))(*args)
  s_np, i_np = np.asarray(s), np.asarray(i)
  np.testing.assert_array_equal(i_np, np.asarray(i_ref))
  np.testing.assert_array_equal(i_np, np.asarray(i_bf))
  np.testing.assert_allclose(s_np, np.asarray(s_ref), rtol=1e-6)
  tied = s_np[..., 1:] == s_np[..., :-1]
  assert tied.sum() >= 40, f"the data should produce many exact ties, got {tied.sum()}"
  assert np.all(i_np[..., 1:][tied] > i_np[..., :-1][tied])     # lower index first
  # The tied keys are the duplicated sub-keys.
  dup1, dup2 = {3, 5, 17, 30}, {0, 9, 21}
  r, col = i_np // n, i_np % n
  pairs = zip(r[..., 1:][tied], col[..., 1:][tied], r[..., :-1][tied], col[..., :-1][tied])
  assert all((a == b or {a, b} <= dup1) and (x == y or {x, y} <= dup2) for a, x, b, y in pairs)


@pytest.mark.parametrize("key_chunk", [16, 64])   # ties across chunks / inside one chunk
def test_per_half_lists_with_heavy_ties_are_exact(key_chunk):
  """One half made dominant (a sub-key scoring far above the rest) turns the output into the
  other half's complete top-k list, so its streaming selection and tie rule are observed
  directly: integer sub-key scores in [-16, 16] over 64 sub-keys tie constantly, also at the
  k-th place and across key chunks. Rows 0-15 expose half 1, rows 16-31 half 2."""
  n, c, k, bt = 64, 16, 12, 16
  rng = np.random.default_rng(3)
  ints = lambda shape: rng.integers(-1, 2, shape).astype(np.float32)
  q1, q2 = ints((2 * bt, 2, c)), ints((2 * bt, 2, c))
  k1, k2 = ints((2, n, c)), ints((1, n, c))
  k1[:, 7], k2[:, 7] = 4.0, 4.0
  q2[:bt], q1[bt:] = 2.0, 2.0        # s2[7] = 128 (rows < bt); s1[7] = 128 (rows >= bt)
  args = (q1, q2, k1, k2)
  s, i = jax.jit(lambda *a: product_key_topk(*a, k, impl="interpret", block_tokens=bt,
                                             key_chunk=key_chunk))(*args)
  s_ref, i_ref = jax.jit(lambda *a: product_key_topk_reference(*a, k))(*args)
  i_bf = jax.jit(lambda *a: product_key_topk_bruteforce(*a, k))(*args)[1]
  i_np, s_np = np.asarray(i), np.asarray(s)
  assert np.all(i_np[:bt] % n == 7) and np.all(i_np[bt:] // n == 7)   # one half exposed
  np.testing.assert_array_equal(i_np, np.asarray(i_ref))
  np.testing.assert_array_equal(i_np, np.asarray(i_bf))   # ties: lower sub-key index first
  np.testing.assert_array_equal(s_np, np.asarray(s_ref))
  assert (s_np[..., 1:] == s_np[..., :-1]).mean() > 0.3
  # Ties at the cut: in many rows the k-th score also belongs to sub-keys that were left out.
  half1 = np.einsum("thc,hnc->thn", q1, k1)
  half2 = np.einsum("thc,nc->thn", q2, k2[0])
  half = np.where(np.arange(2 * bt)[:, None, None] < bt, half1, half2)
  kth = s_np[..., -1] - 128.0
  left_out_ties = (half == kth[..., None]).sum(-1) > (s_np == s_np[..., -1:]).sum(-1)
  assert left_out_ties.sum() >= 8, left_out_ties.sum()


def test_streaming_extremes_and_rows_out_of_step():
  """Half-1 scores that rise along the sub-keys (every key chunk displaces the whole running
  top-k), that are all equal (nothing after the first chunk may enter: lower index wins), both in
  one token block so the insertion loop keeps running for rows that are already done; and a block
  whose scores fall (later chunks insert nothing: zero loop rounds). Half 2 has one dominant
  sub-key, so the outputs are the half-1 lists themselves."""
  n, c, k, bt = 48, 16, 12, 16
  q1 = np.zeros((2 * bt, 1, c), np.float32)
  q1[:bt:2, 0, 0] = 1.0                    # block 0, even rows: rising
  q1[1:bt:2, 0, 1] = 1.0                   # block 0, odd rows: all tied
  q1[bt:, 0, 0] = -1.0                     # block 1: falling
  k1 = np.zeros((1, n, c), np.float32)
  k1[0, :, 0] = (np.arange(n) - 24) / 16.0
  k1[0, :, 1] = 1.0
  q2 = np.full((2 * bt, 1, c), 2.0, np.float32)
  k2 = np.random.default_rng(4).integers(-1, 2, (1, n, c)).astype(np.float32)
  k2[0, 7] = 4.0                           # s2[7] = 128, every other s2 <= 32
  args = (q1, q2, k1, k2)
  s, i = jax.jit(lambda *a: product_key_topk(*a, k, impl="interpret", block_tokens=bt,
                                             key_chunk=16))(*args)
  s_ref, i_ref = jax.jit(lambda *a: product_key_topk_reference(*a, k))(*args)
  i_bf = jax.jit(lambda *a: product_key_topk_bruteforce(*a, k))(*args)[1]
  np.testing.assert_array_equal(np.asarray(i), np.asarray(i_ref))
  np.testing.assert_array_equal(np.asarray(i), np.asarray(i_bf))
  np.testing.assert_array_equal(np.asarray(s), np.asarray(s_ref))
  rows, cols = np.asarray(i)[:, 0] // n, np.asarray(i)[:, 0] % n
  assert np.all(cols == 7)
  np.testing.assert_array_equal(rows[:bt:2], np.broadcast_to(np.arange(n - 1, n - 1 - k, -1),
                                                             (bt // 2, k)))
  np.testing.assert_array_equal(rows[1:bt:2], np.broadcast_to(np.arange(k), (bt // 2, k)))
  np.testing.assert_array_equal(rows[bt:], np.broadcast_to(np.arange(k), (bt, k)))


@pytest.mark.parametrize("softmax", [False, True])
def test_gradients_match_bruteforce(softmax):
  """Continuous (tie-free) data: same selection, scores and gradients as differentiating
  lax.top_k over all n² scores (gradients only through the chosen entries)."""
  lead, h, n, c, k = (2, 2), 2, 64, 16, 7
  args = _inputs(11, lead, h, n, c, jnp.float32, False, True, grid=False)
  weights = np.random.default_rng(12).standard_normal(lead + (h, k), np.float32)
  got = _fwd_grads(lambda *a: product_key_topk(*a, k, softmax=softmax, impl="interpret"),
                   args, weights)
  want = _fwd_grads(lambda *a: product_key_topk_bruteforce(*a, k, softmax=softmax), args,
                    weights)
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
  np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-6, atol=1e-6)
  for what, g, w in zip(("dq1", "dq2", "dk1", "dk2"), got[2], want[2]):
    assert _max_rel_err(g, w) <= 1e-5, (what, _max_rel_err(g, w))
  # A sub-key no row selected gets exactly zero gradient.
  rows_used = np.unique(np.asarray(got[1]) // n)
  unused = np.setdiff1d(np.arange(n), rows_used)
  assert unused.size and np.all(np.asarray(got[2][2])[:, unused] == 0.0)


@settings(max_examples=5, deadline=None, derandomize=True)
@given(t=st.integers(1, 40), h=st.integers(1, 3), n=st.integers(1, 48), k_frac=st.floats(0, 1),
       c=st.sampled_from([8, 16, 20]), dtype=st.sampled_from(["float32", "bfloat16"]),
       shared=st.tuples(st.booleans(), st.booleans()), softmax=st.booleans(),
       key_chunk=st.sampled_from([16, 32]))
def test_random_shapes_match_reference(t, h, n, k_frac, c, dtype, shared, softmax, key_chunk):
  k = max(1, min(n, round(k_frac * min(n, 24))))
  dtype = jnp.dtype(dtype)
  args = _inputs(t * 1000 + n * 10 + h, (t,), h, n, c, dtype, *shared)
  s, i = jax.jit(lambda *a: product_key_topk(*a, k, softmax=softmax, impl="interpret",
                                             key_chunk=key_chunk))(*args)
  s_ref, i_ref = jax.jit(lambda *a: product_key_topk_reference(*a, k, softmax=softmax))(*args)
  _assert_valid_indices(i, n)
  np.testing.assert_array_equal(np.asarray(i), np.asarray(i_ref))
  np.testing.assert_allclose(np.asarray(s), np.asarray(s_ref), rtol=1e-6, atol=1e-7)


def test_combine_staircase_covers_every_possible_winner():
  """The candidate rectangles hold every (a, b) with (a+1)(b+1) <= k (the only pairs that can be
  in the top-k of sorted halves) and stay well below k² for large k."""
  for k in range(1, 129):
    kp = K.pad_k(k)
    ra, wb = K.combine_blocks(k, kp)
    assert ra & (ra - 1) == 0 and wb & (wb - 1) == 0 and 2 <= ra <= kp and 2 <= wb <= kp
    for a in range(k):
      for b in range(k):
        if (a + 1) * (b + 1) <= k:
          assert a < ra or b < wb, (k, a, b, ra, wb)
    if k >= 32:
      assert (ra + wb) * kp <= kp * kp // 2, (k, ra, wb)
  assert K.combine_blocks(32, 32) == (4, 8)   # 384 candidates instead of 1024


def test_bad_inputs_raise_clear_errors():
  q1, q2, k1, k2 = _inputs(0, (4,), 2, 16, 8, jnp.float32, False, True)
  cases = [
      (dict(impl="cuda"), "impl="),
      (dict(top_k=0), "top_k=0"),
      (dict(top_k=17), "top_k=17"),
      (dict(k1=k1[:, :15]), "same n"),
      (dict(k2=k2[..., :4]), "same width"),
      (dict(k1=np.concatenate([k1, k1[:1]])), "expected \\[H=2 or 1"),
      (dict(q2=q2[:3]), "same leading dims"),
      (dict(q2=q2.astype(jnp.bfloat16)), "one dtype"),
      (dict(q1=q1.astype(np.float16), q2=q2.astype(np.float16)), "float32 or bfloat16"),
      (dict(block_tokens=24), "block_tokens=24"),
      (dict(key_chunk=8), "key_chunk=8"),
  ]
  base = dict(q1=q1, q2=q2, k1=k1, k2=k2, top_k=4)
  for override, match in cases:
    kw = {**base, **override}
    with pytest.raises(ValueError, match=match):
      product_key_topk(kw.pop("q1"), kw.pop("q2"), kw.pop("k1"), kw.pop("k2"), kw.pop("top_k"),
                       **{"impl": "interpret", **kw})


def test_kernel_lowers_to_triton_for_h200(monkeypatch):
  """The forward kernel (and the jnp backward around it) lowers to Triton IR on this CPU machine
  at realistic sizes, bf16, with the GPU info faked as an H200 (jax 0.11.2 private hook);
  compiling that IR needs the GPU itself."""
  gpu_info = pytest.importorskip("jax._src.pallas.triton.gpu_info")
  if not hasattr(gpu_info, "get_gpu_info_from_version"):
    pytest.skip("jax changed its private Triton GPU-info hook")
  monkeypatch.setattr(gpu_info, "get_gpu_info",
                      lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200))
  t, h, n, c, k = 256, 4, 1024, 128, 32
  q = jax.ShapeDtypeStruct((t, h, c), jnp.bfloat16)
  per_head = jax.ShapeDtypeStruct((h, n, c), jnp.bfloat16)
  shared = jax.ShapeDtypeStruct((1, n, c), jnp.bfloat16)

  for softmax, keys2 in ((True, shared), (False, per_head)):
    def fwd_bwd(q1, q2, k1, k2, softmax=softmax):
      fn = lambda *a: product_key_topk(*a, k, softmax=softmax, impl="pallas")
      (scores, idx), vjp = jax.vjp(fn, q1, q2, k1, k2)
      return scores, idx, vjp((scores, np.zeros(idx.shape, jax.dtypes.float0)))

    lowered = jax.jit(fwd_bwd).trace(q, q, per_head, keys2).lower(lowering_platforms=("cuda",))
    hlo = lowered.as_text()
    assert "product_key_topk" in hlo
    # The Triton module is embedded: its loops and reductions made it through the lowering.
    for op in ("while", "for", "reduce", "dot"):
      assert f"{op}\\00" in hlo, op
