"""Static mask specs and their block layouts (kernels_pallas.block_sparse_attention.{masks,layout}).

The central property: the layout covers the mask exactly — every block with a visible element is
listed, no other block is, full flags are exact, transposed lists agree, and the kernel's view
(full blocks all True, partial blocks evaluated element-wise) equals the directly evaluated mask.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels_pallas.block_sparse_attention import layout as lay
from kernels_pallas.block_sparse_attention import masks as M
from kernels_pallas.block_sparse_attention import reference

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _checker(q, kv):  # module-level so FromFunction masks compare equal across draws
  return (q + 2 * kv) % 3 != 0


def _head_fn(q, kv, h):
  return (kv <= q) & ((q - kv) % (h + 2) != 1)


# ---------------------------------------------------------------------------------------------
# strategies

ints = st.integers


def _base_masks():
  return st.one_of(
      st.just(M.Causal()), st.just(M.Full()),
      st.builds(M.SlidingWindow, ints(0, 40), ints(0, 12)),
      st.builds(M.Strided, ints(1, 20), ints(1, 20)),
      st.builds(lambda b, c: M.Fixed(b, min(c, b)), ints(1, 24), ints(0, 8)),
      st.builds(M.BigBird, ints(0, 24), ints(0, 20), ints(0, 3), ints(1, 24), ints(0, 5)),
      st.builds(M.Dilated, ints(0, 48), ints(1, 5)),
      st.builds(M.PrefixLM, ints(0, 80)),
      st.builds(M.KeyPrefix, ints(0, 40)),
      st.builds(M.SameBlock, ints(1, 20)),
      st.builds(M.DiagStride, ints(1, 9)),
      st.builds(M.RandomBlocks, ints(1, 3), ints(1, 16), ints(0, 3)),
      st.just(M.FromFunction(_checker, "checker")),
      st.just(M.FromFunction(_head_fn, "headfn")),
  )


def _masks():
  base = _base_masks()
  return st.one_of(
      base,
      st.builds(lambda a, b: a & b, base, base),
      st.builds(lambda a, b: a | b, base, base),
      st.builds(lambda a: ~a, base),
      st.builds(lambda a, b, c: (a | b) & c, base, base, base),
      st.builds(lambda a, b: M.PerHead((a, b)), base, base),
  )


shapes = st.tuples(ints(1, 130), ints(1, 130),
                   st.sampled_from([1, 3, 4, 7, 8, 16, 32]), st.sampled_from([1, 5, 8, 16, 32]),
                   ints(1, 3), ints(0, 2))


# ---------------------------------------------------------------------------------------------
# the exact-cover property


def check_layout(mask, L: lay.BlockLayout, layer: int = 0):
  H, Tq, Tk, bq, bk = L.num_heads, L.seq_q, L.seq_kv, L.block_q, L.block_kv
  nq, nk = math.ceil(Tq / bq), math.ceil(Tk / bk)
  dense = lay.dense_mask(mask, Tq, Tk, H, layer=layer)
  # kernel's view == direct evaluation
  np.testing.assert_array_equal(lay.to_dense(L), dense)
  # block-level truth (out-of-range padding counts as masked)
  pad = np.zeros((H, nq * bq, nk * bk), bool)
  pad[:, :Tq, :Tk] = dense
  blocks = pad.reshape(H, nq, bq, nk, bk)
  any_b, all_b = blocks.any((2, 4)), blocks.all((2, 4))
  for name, arr, dt in (("kv_num_blocks", L.kv_num_blocks, np.int32),
                        ("kv_indices", L.kv_indices, np.int32), ("kv_full", L.kv_full, np.bool_),
                        ("q_num_blocks", L.q_num_blocks, np.int32),
                        ("q_indices", L.q_indices, np.int32), ("q_full", L.q_full, np.bool_)):
    assert arr.dtype == dt, name
  assert L.kv_num_blocks.shape == (H, nq) and L.q_num_blocks.shape == (H, nk)
  assert L.kv_indices.shape[:2] == (H, nq) and L.kv_full.shape == L.kv_indices.shape
  assert L.q_indices.shape[:2] == (H, nk) and L.q_full.shape == L.q_indices.shape
  fwd, bwd = set(), set()
  for h in range(H):
    for n_rows, out, swap in ((nq, fwd, False), (nk, bwd, True)):
      num = L.q_num_blocks if swap else L.kv_num_blocks
      idx = L.q_indices if swap else L.kv_indices
      full = L.q_full if swap else L.kv_full
      for r in range(n_rows):
        n = int(num[h, r])
        ids = idx[h, r]
        assert np.all(np.diff(ids[:n]) > 0), "indices must be strictly ascending"
        assert np.all(ids[n:] == (ids[n - 1] if n else 0)), "padding repeats the last id"
        assert not full[h, r, n:].any(), "padding is never full"
        for j, f in zip(ids[:n], full[h, r, :n]):
          out.add((h, j, r, bool(f)) if swap else (h, r, j, bool(f)))
  assert fwd == bwd, "transposed lists disagree with the forward lists"
  truth = {(h, i, j, bool(all_b[h, i, j])) for h, i, j in zip(*np.nonzero(any_b))}
  assert fwd == truth, "listed blocks / full flags differ from the mask's blocks"
  assert L.density == pytest.approx(dense.mean(), abs=1e-12)
  assert L.block_density == pytest.approx(any_b.mean(), abs=1e-12)
  return dense


@SETTINGS
@given(_masks(), shapes)
def test_layout_covers_mask_exactly(mask, shape):
  tq, tk, bq, bk, heads, layer = shape
  L = lay.compile_layout(mask, tq, tk, bq, bk, num_heads=heads, layer=layer)
  assert L.mask == mask.for_layer(layer)
  check_layout(mask, L, layer)


@SETTINGS
@given(_base_masks(), _base_masks(), ints(1, 90), st.sampled_from([1, 4, 8, 16]))
def test_composition_is_elementwise_logic(a, b, t, block):
  da, db = lay.dense_mask(a, t, t, 2), lay.dense_mask(b, t, t, 2)
  np.testing.assert_array_equal(lay.dense_mask(a & b, t, t, 2), da & db)
  np.testing.assert_array_equal(lay.dense_mask(a | b, t, t, 2), da | db)
  np.testing.assert_array_equal(lay.dense_mask(~a, t, t, 2), ~da)
  for m in (a & b, a | b, ~a):
    check_layout(m, lay.compile_layout(m, t, t, block, block, num_heads=2))


@pytest.mark.parametrize("mask", [M.Causal(), M.Strided(5, 3), M.Fixed(6, 2), M.Dilated(20, 3),
                                  M.BigBird(8, 4, 2, 8, seed=1), M.SlidingWindow(9),
                                  M.Causal() & M.PrefixLM(30) | M.Causal() & M.SameBlock(7)])
def test_causal_masks_never_look_ahead(mask):
  L = lay.compile_layout(mask, 100, 100, 8, 16, num_heads=3, layer=1)
  dense = check_layout(mask, L, layer=1)
  assert not np.triu(dense, 1).any()
  for h in range(3):
    for i in range(L.num_q_blocks):
      for j in L.kv_indices[h, i, :L.kv_num_blocks[h, i]]:
        assert j * 16 <= min((i + 1) * 8, 100) - 1, "a kv block entirely in the future is listed"


COUNTED = [M.Causal(), M.Full(), M.SlidingWindow(7, 2), M.KeyPrefix(13), M.DiagStride(3),
           M.SameBlock(5), M.KeyModTail(6, 2), M.Strided(4, 3), M.Fixed(6, 2), M.Dilated(9, 2),
           M.PrefixLM(11), ~M.SlidingWindow(4)]


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(COUNTED), ints(0, 60), ints(1, 20), ints(0, 60), ints(1, 20))
def test_analytic_counts_and_classes_match_elements(mask, q0, nq, k0, nk):
  dense = lay.dense_mask(mask, 80, 80)[0][q0:q0 + nq, k0:k0 + nk]
  args = (np.array([q0]), np.array([q0 + nq]), np.array([k0]), np.array([k0 + nk]))
  state, cnt = int(mask.classify(*args)[0]), int(mask.count(*args)[0])
  if state != M.UNKNOWN:
    assert state == (M.FULL if dense.all() else M.PARTIAL if dense.any() else M.EMPTY)
  assert cnt in (-1, int(dense.sum()))
  if state == M.PARTIAL and isinstance(mask, (M.Causal, M.SlidingWindow, M.KeyPrefix,
                                              M.DiagStride, M.SameBlock, M.KeyModTail)):
    assert cnt >= 0  # primitives always know their counts


def test_kernels_pallas_imports_with_jax_and_numpy_alone():
  import subprocess
  import sys
  code = ("import sys; import kernels_pallas.block_sparse_attention.layout, "
          "kernels_pallas.block_sparse_attention.masks; "
          "bad = [m for m in ('flax', 'sparsejax', 'optax') if m in sys.modules]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(
      __file__).resolve().parent.parent))


# ---------------------------------------------------------------------------------------------
# definitions (small hand-checked cases)


def test_definitions_by_hand():
  q, kv = np.arange(12)[:, None], np.arange(12)[None, :]
  d = q - kv
  cases = {
      M.SlidingWindow(2, 1): (d <= 2) & (d >= -1),
      M.Strided(4, 2): (d >= 0) & ((d < 2) | (d % 4 == 0)),
      M.Fixed(4, 1): (d >= 0) & ((q // 4 == kv // 4) | (kv % 4 == 3)),
      M.Dilated(6, 2): (d >= 0) & (d <= 6) & (d % 2 == 0),
      M.PrefixLM(5): (d >= 0) | (kv < 5),
  }
  for m, want in cases.items():
    np.testing.assert_array_equal(lay.dense_mask(m, 12, 12)[0], want, err_msg=str(m))
  bb = lay.dense_mask(M.BigBird(2, 3, 0, 4), 12, 12)[0]
  np.testing.assert_array_equal(bb, (d >= 0) & ((d <= 2) | (kv < 3)))


def test_bigbird_random_blocks_reproducible_and_per_layer_head():
  m = M.BigBird(window=16, num_global=8, num_random_blocks=3, block=16, seed=7)
  a = lay.dense_mask(m, 512, 512, num_heads=4, layer=2)
  b = lay.dense_mask(M.parse_mask(str(m)), 512, 512, num_heads=4, layer=2)
  np.testing.assert_array_equal(a, b)
  assert all(not np.array_equal(a[0], a[h]) for h in (1, 2, 3)), "heads must differ"
  c = lay.dense_mask(m, 512, 512, num_heads=4, layer=3)
  assert not np.array_equal(a, c), "layers must differ"
  s = lay.dense_mask(M.BigBird(16, 8, 3, 16, seed=8), 512, 512, num_heads=4, layer=2)
  assert not np.array_equal(a, s), "seeds must differ"
  # random draws: each query block sees min(3, q block + 1) distinct key blocks at or before it
  rb = M.RandomBlocks(3, 16, seed=7, layer=2)
  ch = rb.choices(32, head=1)
  drawn = ch >= 0
  assert ch.shape == (32, 3) and np.all(ch <= np.arange(32)[:, None])
  np.testing.assert_array_equal(drawn.sum(1), np.minimum(3, np.arange(32) + 1))
  r = lay.dense_mask(rb, 512, 512, num_heads=2)[1].reshape(32, 16, 32, 16)
  got = r.all((1, 3))
  want = np.zeros((32, 32), bool)
  want[np.nonzero(drawn)[0], ch[drawn]] = True
  np.testing.assert_array_equal(got, want)
  assert got.sum() == drawn.sum()  # distinct: no two draws of a query block coincide
  L1 = lay.compile_layout(m, 512, 512, 32, 32, num_heads=4, layer=2)
  L2 = lay.compile_layout(m, 512, 512, 32, 32, num_heads=4, layer=3)
  assert not np.array_equal(L1.kv_indices, L2.kv_indices)
  check_layout(m, L1, layer=2)


def _random_part(mask):
  """The RandomBlocks inside a BigBird's expansion."""
  rb = [m for m in mask._expand().masks[1].masks if isinstance(m, M.RandomBlocks)]
  return rb[0]


# (T, block, window, num_global, r, seed): window narrower / wider than a block, globals inside
# one block / over several, T not a multiple of the block, r above what early rows can take
BIGBIRD_CASES = [(256, 16, 16, 8, 3, 0), (250, 16, 40, 20, 3, 5), (512, 32, 0, 0, 4, 1),
                 (192, 8, 7, 33, 2, 9), (256, 16, 100, 16, 5, 3), (96, 4, 3, 0, 1, 2)]


@pytest.mark.parametrize("case", BIGBIRD_CASES, ids=str)
def test_bigbird_random_blocks_distinct_outside_window_and_globals(case):
  t, b, w, g, r, seed = case
  heads, nb, layer = 3, -(-t // b), seed % 3
  bb = M.BigBird(w, g, r, b, seed=seed).for_layer(layer)
  dense = lay.dense_mask(bb, t, t, heads)
  base = lay.dense_mask(M.BigBird(w, g, 0, b), t, t, 1)[0]  # causal & (window | global)
  pad = np.zeros((heads, nb * b, nb * b), bool)
  pad[:, :t, :t] = dense & ~base  # what the random part adds
  extra = pad.reshape(heads, nb, b, nb, b).any((2, 4))
  pad[:, :t, :t] = base
  touched = pad[0].reshape(nb, b, nb, b).any((1, 3))  # blocks window / globals reach at all
  eligible = np.tril(~touched)  # causal blocks neither touches
  rb = _random_part(bb)
  for h in range(heads):
    ch = rb.choices(nb, h)
    for qb in range(nb):
      want = min(r, int(eligible[qb].sum()))
      got = np.flatnonzero(extra[h, qb])
      drawn = ch[qb][ch[qb] >= 0]
      assert len(got) == want, (case, h, qb, got, drawn)  # exactly min(r, available)
      assert len(set(drawn.tolist())) == len(drawn) == want  # distinct draws
      assert eligible[qb, drawn].all()  # causal, none in the window / global set
      np.testing.assert_array_equal(np.sort(drawn), got)
      for kb in got:  # a drawn block is seen whole (within the sequence)
        assert dense[h, qb * b:(qb + 1) * b, kb * b:(kb + 1) * b].all()
  # deterministic under the seed; the kernel's layout (mask blocks = layout blocks, and not)
  # and the reference see the same mask
  np.testing.assert_array_equal(dense, lay.dense_mask(M.parse_mask(str(bb)), t, t, heads))
  assert not np.array_equal(dense, lay.dense_mask(M.BigBird(w, g, r, b, seed=seed + 1).for_layer(
      layer), t, t, heads)), "seeds must differ"
  check_layout(bb, lay.compile_layout(bb, t, t, b, b, num_heads=heads), layer)
  check_layout(bb, lay.compile_layout(bb, t, t, max(b // 2, 1), 2 * b, num_heads=heads), layer)
  np.testing.assert_array_equal(np.asarray(reference.evaluate_mask(bb, t, t, heads)), dense)


def test_block_class_matches_dense():
  for m in (M.Causal() & M.SlidingWindow(10), M.Strided(7, 3), M.BigBird(5, 3, 2, 6, seed=2),
            M.FromFunction(_checker, "c")):
    dense = lay.dense_mask(m, 64, 64)[0].reshape(8, 8, 4, 16)
    for i in range(8):
      for j in range(4):
        blk = dense[i, :, j, :]
        assert m.block_class(i, j, 0, 8, 16) == (blk.any(), blk.all()), (m, i, j)


def test_empty_rows_and_all_masked():
  L = lay.compile_layout(~M.Full(), 40, 30, 8, 8)
  assert (L.kv_num_blocks == 0).all() and (L.q_num_blocks == 0).all() and L.density == 0
  assert L.kv_indices.shape[-1] == 1 and (L.kv_indices == 0).all() and not L.kv_full.any()
  m = M.Causal() & ~M.KeyPrefix(0) & M.SlidingWindow(3) & ~M.SameBlock(1)  # q sees [q-3, q-1]
  L = lay.compile_layout(m, 33, 33, 4, 4)
  assert L.kv_num_blocks[0, 0] == 1  # row 0 has no key, rows 1..3 do
  check_layout(m, L)


# ---------------------------------------------------------------------------------------------
# dense-array masks (for kernel tests)


@settings(max_examples=25, deadline=None)
@given(ints(1, 3), ints(1, 70), ints(1, 70), st.sampled_from([1, 4, 8, 16]),
       st.sampled_from([2, 8, 16]), ints(0, 2**31 - 1))
def test_layout_from_dense_mask(heads, tq, tk, bq, bk, seed):
  rng = np.random.default_rng(seed)
  arr = rng.random((heads, tq, tk)) < rng.choice([0.0, 0.05, 0.5, 1.0])
  arr &= rng.random((heads, 1, tk)) < 0.7  # some all-masked columns / blocks
  L = lay.layout_from_dense_mask(arr, bq, bk)
  assert L.num_heads == heads and isinstance(L.mask, M.FromArray)
  np.testing.assert_array_equal(lay.dense_mask(L.mask, tq, tk, heads), arr)
  check_layout(L.mask, L)
  assert lay.layout_from_dense_mask(arr.copy(), bq, bk) is L  # equal by content -> cached


# ---------------------------------------------------------------------------------------------
# jnp / jit


JIT_MASKS = [M.Causal(), M.Full(), M.SlidingWindow(5, 2), M.Strided(4, 3), M.Fixed(8, 2),
             M.BigBird(6, 3, 2, 8, seed=3, layer=1), M.Dilated(12, 3), M.PrefixLM(9),
             M.PerHead((M.Causal(), M.SlidingWindow(3), M.BigBird(2, 1, 1, 4))),
             M.FromFunction(_checker, "c"), M.FromFunction(_head_fn, "h"),
             M.FromArray(np.random.default_rng(0).random((3, 50, 50)) < 0.3),
             M.Causal() & ~M.SlidingWindow(4) | M.KeyPrefix(3)]


@pytest.mark.parametrize("mask", JIT_MASKS, ids=str)
def test_elementwise_under_jit_equals_numpy(mask):
  t = 50
  fn = jax.jit(lambda q, kv, h: jnp.broadcast_to(mask.elementwise(q, kv, h), (t, t)))
  q = jnp.arange(t, dtype=jnp.int32)[:, None]
  kv = jnp.arange(t, dtype=jnp.int32)[None, :]
  want = lay.dense_mask(mask, t, t, num_heads=3)
  for h in range(3):
    got = fn(q, kv, jnp.int32(h))  # traced head, as in-kernel
    assert got.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(got), want[h])
  # the 1-D partial-block form the kernel uses: [bq] x [bk] vectors
  got = jax.jit(lambda q, kv: mask.elementwise(q[:, None], kv[None, :], 1))(
      jnp.arange(8, 16, dtype=jnp.int32), jnp.arange(0, 16, dtype=jnp.int32))
  np.testing.assert_array_equal(np.broadcast_to(np.asarray(got), (8, 16)), want[1, 8:16, 0:16])


def test_masks_are_hashable_static_args():
  a, b = M.parse_mask("causal&window:64"), M.Causal() & M.SlidingWindow(64)
  assert a == b and hash(a) == hash(b) and a != M.Causal() & M.SlidingWindow(65)
  assert M.BigBird(1, 2, 3, 4, seed=5) == M.BigBird(1, 2, 3, 4, 5)
  calls = []
  f = jax.jit(lambda m, x: (calls.append(1), m.elementwise(x, x, 0))[1], static_argnums=0)
  x = jnp.arange(4)
  f(a, x), f(b, x)
  assert len(calls) == 1  # equal masks hit the same jit cache entry
  assert lay.compile_layout(a, 64, 64, 16, 16) is lay.compile_layout(b, 64, 64, 16, 16)


# ---------------------------------------------------------------------------------------------
# parse_mask


DOCUMENTED = ["causal", "full", "causal&window:1024", "window:16:4", "strided:128:128",
              "fixed:128:8", "bigbird:256:64:3:128:seed=0", "bigbird:256:64:3:128:seed=4:layer=2",
              "prefix:512", "dilated:256:2", "heads(causal,window:8)", "(causal|prefix:5)&window:9",
              "~window:3&causal"]


@pytest.mark.parametrize("spec", DOCUMENTED)
def test_parse_round_trips(spec):
  m = M.parse_mask(spec)
  assert isinstance(m, M.Mask)
  assert M.parse_mask(str(m)) == m
  assert M.parse_mask(spec.replace("&", " & ")) == m


def test_parse_values():
  assert M.parse_mask("causal&window:1024") == M.And((M.Causal(), M.SlidingWindow(1024)))
  assert M.parse_mask("bigbird:256:64:3:128:seed=0") == M.BigBird(256, 64, 3, 128, seed=0)
  assert M.parse_mask("strided:128:64") == M.Strided(stride=128, local=64)
  assert M.parse_mask("fixed:128:8") == M.Fixed(block=128, num_summary=8)
  assert M.parse_mask("causal|prefix:3") == M.Or((M.Causal(), M.PrefixLM(3)))
  assert M.parse_mask("causal|window:2&prefix:4") == M.Causal() | (M.SlidingWindow(2) &
                                                                   M.PrefixLM(4))


@pytest.mark.parametrize("junk", ["", "causa", "window", "window:a", "strided:1", "causal&",
                                  "(causal", "causal)", "window:-1", "bigbird:1:2:3:4:foo=1",
                                  "fixed:4:9", "causal window:3", "heads()", "prefix:1:seed=2"])
def test_parse_rejects_junk_in_one_line(junk):
  with pytest.raises(ValueError) as e:
    M.parse_mask(junk)
  msg = str(e.value)
  assert "\n" not in msg and "causal" in msg and "bigbird:" in msg, msg


def test_parse_caches_each_spec_string_once():
  m = M.parse_mask("causal&window:16")
  assert m is M.parse_mask("causal&window:16")
  assert m == M.Causal() & M.SlidingWindow(16)
  assert M.parse_mask(m) is m  # a Mask passes through (uncached path)
  # a bad spec is not cached: it raises the same ValueError, with the same message, every time
  msgs = []
  for _ in range(2):
    with pytest.raises(ValueError, match=r"^bad mask spec 'causal&window:x' \('x' is not an "
                       r"integer\); forms: full, causal, window:LEFT\[:RIGHT\], ") as e:
      M.parse_mask("causal&window:x")
    msgs.append(str(e.value))
  assert msgs[0] == msgs[1]
  with pytest.raises(ValueError, match=r"^bad mask spec '3' \(not a string\); forms: "):
    M.parse_mask(3)


# ---------------------------------------------------------------------------------------------
# long sequences stay cheap (no T x T)


def test_long_causal_window_layout():
  t, w, b = 32768, 1024, 128
  L = lay.compile_layout("causal&window:1024", t, t, b, b)
  expected = (sum(min(q, w) + 1 for q in range(t))) / t**2
  assert L.density == pytest.approx(expected, rel=0.01)
  assert L.kv_indices.shape == (1, t // b, w // b + 1)
  assert np.all(L.kv_num_blocks[0, w // b:] == w // b + 1)
  assert L.kv_full[0, -1].sum() == w // b - 1  # diagonal and window-edge blocks are partial
  bb = lay.compile_layout("bigbird:256:64:3:128:seed=0", t, t, b, b, num_heads=2, layer=1)
  assert bb.kv_indices.shape[-1] <= 3 + 1 + 3 + 1  # window(3) + global(1) + random(3) (+1 overlap)
  assert np.all(bb.kv_indices[:, :, 0] == 0)  # every q block visits the global block
  assert 0 < bb.density < 0.03
