"""Weight-sparsity mask algebra (sparsejax/sparsity/masks.py, dst.py) against independent numpy
references (loops and stable argsorts), on small random shapes including rank 3 (experts
ExDxF, contraction axis 1) and many ties; every selection breaks ties by the lower flat index.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.sparsity import dst
from sparsejax.sparsity import masks as M


def _tied(rng, shape):
  """Values from a handful of levels (many exact ties, zeros and sign flips)."""
  return (rng.integers(-3, 4, shape) * 0.5).astype(np.float32)


def _np_topk(score, k, eligible=None):
  flat = np.asarray(score, np.float64).ravel()
  idx = np.arange(flat.size) if eligible is None else np.flatnonzero(np.ravel(eligible))
  out = np.zeros(flat.size, bool)
  out[idx[np.argsort(-flat[idx], kind="stable")[:k]]] = True
  return out.reshape(np.shape(score))


def _np_nm(w, n, m, axis):
  a = np.moveaxis(np.abs(w), axis, -1)
  keep = np.zeros(a.shape, bool)
  for idx in np.ndindex(a.shape[:-1]):
    for g in range(0, a.shape[-1], m):
      keep[idx + (g + np.argsort(-a[idx][g:g + m], kind="stable")[:n],)] = True
  return np.moveaxis(keep, -1, axis)


def _np_drop_grow(w, score, mask, n_drop, n_grow):
  """(dropped, grown) flat index sets: bottom-n_drop |w| among active, top-n_grow |score| among
  previously inactive."""
  flat_mask = np.ravel(mask)
  active, inactive = np.flatnonzero(flat_mask), np.flatnonzero(~flat_mask)
  a, s = np.abs(np.ravel(w)), np.abs(np.ravel(score))
  drop = active[np.argsort(a[active], kind="stable")[:n_drop]]
  grow = inactive[np.argsort(-s[inactive], kind="stable")[:n_grow]]
  return set(drop.tolist()), set(grow.tolist())


def _sets(old, new):
  old, new = np.ravel(old), np.ravel(np.asarray(new))
  return set(np.flatnonzero(old & ~new).tolist()), set(np.flatnonzero(new & ~old).tolist())


# --- exact top-k -----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(6, 10), (3, 4, 5)])
def test_topk_mask_exact_count_with_ties_and_traced_k(shape):
  rng = np.random.default_rng(0)
  score = _tied(rng, shape)
  size = math.prod(shape)
  f = jax.jit(lambda s, k: M.topk_mask(s, k))
  for k in (0, 1, 7, size // 2, size - 1, size):
    got = np.asarray(f(score, jnp.int32(k)))
    assert got.dtype == bool and got.shape == shape and got.sum() == k
    np.testing.assert_array_equal(got, _np_topk(score, k))
  assert f._cache_size() == 1                                      # k traced, one compile


def test_select_among_eligible_with_infinities_and_integers():
  rng = np.random.default_rng(6)
  score = _tied(rng, (5, 6))
  score[0, :3] = [-np.inf, np.inf, -np.inf]
  score[4, 5] = -np.inf
  eligible = rng.random((5, 6)) < 0.6
  eligible[0, :3] = eligible[4, 5] = True
  f = jax.jit(M.select)
  for k in (0, 3, 10, int(eligible.sum()), 30):
    for s in (score, np.rint(np.nan_to_num(score, posinf=9, neginf=-9) * 2).astype(np.int32)):
      got = np.asarray(f(s, jnp.int32(k), eligible))
      assert got.sum() == min(k, eligible.sum()) and not (got & ~eligible).any()
      np.testing.assert_array_equal(got, _np_topk(s, k, eligible))


def test_topk_mask_integer_scores_keep_order():
  score = np.array([[3, -2, 3], [7, 0, -2]], np.int32)
  np.testing.assert_array_equal(M.topk_mask(score, 3), _np_topk(score, 3))
  np.testing.assert_array_equal(M.topk_mask(score.astype(np.uint8), 2),
                                _np_topk(score.astype(np.uint8), 2))


# --- N:M -------------------------------------------------------------------------------------

NM_CASES = [((8, 12), 2, 4, 0), ((8, 12), 2, 4, 1), ((3, 8, 6), 2, 4, 1), ((3, 6, 8), 1, 4, 2),
            ((2, 4, 16), 4, 16, -1), ((4, 64), 3, 32, 1), ((4, 8), 0, 4, 1), ((4, 8), 4, 4, 1)]


@pytest.mark.parametrize("shape,n,m,axis", NM_CASES)
def test_nm_mask_keeps_the_n_largest_of_every_group(shape, n, m, axis):
  rng = np.random.default_rng(1)
  f = jax.jit(M.nm_mask, static_argnums=(1, 2, 3))
  tied = _tied(rng, shape)                                         # pairwise (m <= 16) and
  np.testing.assert_array_equal(f(tied, n, m, axis), _np_nm(tied, n, m, axis))  # sort paths
  w = rng.standard_normal(shape).astype(np.float32)                # no zeros: count non-zeros
  kept = np.asarray(w * f(w, n, m, axis))
  groups = np.moveaxis(kept, axis, -1).reshape(-1, m)
  assert (np.count_nonzero(groups, axis=-1) == n).all()
  np.testing.assert_array_equal(kept != 0, _np_nm(w, n, m, axis))
  assert bool(M.nm_satisfied(kept, n, m, axis))
  if n < m:
    assert not bool(M.nm_satisfied(w, n, m, axis))


def test_nm_mask_rejects_a_size_that_m_does_not_divide():
  with pytest.raises(ValueError, match=r"axis 1 has size 10, not a multiple of m=4"):
    M.nm_mask(jnp.ones((8, 10)), 2, 4, 1)
  with pytest.raises(ValueError, match="rank >= 2"):
    M.nm_mask(jnp.ones(8), 2, 4, 0)


@pytest.mark.parametrize("lam", [0.0, 2e-4, 0.5])
def test_nm_ste_gradient_is_straight_through_plus_sr_ste_decay(lam):
  rng = np.random.default_rng(2)
  w = rng.standard_normal((2, 8, 6)).astype(np.float32)
  c = rng.standard_normal((2, 8, 6)).astype(np.float32)
  out = M.nm_ste(jnp.asarray(w), 2, 4, 1, lam)
  mask = _np_nm(w, 2, 4, 1)
  np.testing.assert_array_equal(out, np.where(mask, w, 0))
  g = np.asarray(jax.jit(jax.grad(lambda w: jnp.sum(c * M.nm_ste(w, 2, 4, 1, lam))))(w))
  if lam == 0:
    np.testing.assert_array_equal(g, c)
  else:
    np.testing.assert_array_equal(g, np.where(mask, c, c + np.float32(lam) * w))
    assert not np.array_equal(g, c)


# --- blocks ----------------------------------------------------------------------------------

def _np_block_scores(w, r, c, axis):
  other = w.ndim - 1 if axis != w.ndim - 1 else w.ndim - 2
  a = np.moveaxis(np.abs(w), (axis, other), (-2, -1))
  out = np.zeros(a.shape[:-2] + (a.shape[-2] // r, a.shape[-1] // c), np.float32)
  for idx in np.ndindex(out.shape):
    lead, i, j = idx[:-2], idx[-2], idx[-1]
    out[idx] = a[lead][i * r:(i + 1) * r, j * c:(j + 1) * c].sum()
  return np.moveaxis(out, (-2, -1), (axis, other))


@pytest.mark.parametrize("shape,block,axis", [((8, 12), (2, 4), 0), ((8, 12), (4, 2), 1),
                                              ((3, 8, 6), (4, 3), 1), ((3, 6, 8), (2, 2), 2)])
def test_block_scores_and_masks_are_block_constant(shape, block, axis):
  rng = np.random.default_rng(3)
  w = rng.standard_normal(shape).astype(np.float32)
  k = math.prod(shape) // (3 * block[0] * block[1])

  @jax.jit
  def run(w):
    scores = M.block_scores(w, block, axis)
    bmask = M.topk_mask(scores, k)
    full = M.expand_blocks(bmask, block, axis, shape)
    return scores, bmask, full, M.reduce_blocks(full, block, axis)

  scores, bmask, full, back = (np.asarray(x) for x in run(w))
  np.testing.assert_allclose(scores, _np_block_scores(w, *block, axis), rtol=1e-6)
  assert full.shape == shape and full.sum() == k * block[0] * block[1]
  np.testing.assert_array_equal(back, bmask)
  r, c = block                                                     # every block is constant
  other = len(shape) - 1 if axis != len(shape) - 1 else len(shape) - 2
  t = np.moveaxis(full, (axis, other), (-2, -1))
  t = t.reshape(t.shape[:-2] + (t.shape[-2] // r, r, t.shape[-1] // c, c))
  assert (t.all(axis=(-3, -1)) == t.any(axis=(-3, -1))).all()


def test_block_1x1_is_elementwise_and_bad_blocks_raise():
  rng = np.random.default_rng(4)
  w = _tied(rng, (3, 8, 6))
  np.testing.assert_array_equal(M.block_scores(w, (1, 1), 1), np.abs(w))
  mask = M.topk_mask(np.abs(w), 40)
  np.testing.assert_array_equal(M.expand_blocks(mask, (1, 1), 1, w.shape), mask)
  assert M.parse_block("16x16") == (16, 16) and M.parse_block("1X4") == (1, 4)
  for bad in ("16", "0x4", "ax4", "4x4x4", "-1x2"):
    with pytest.raises(ValueError, match="RxC"):
      M.parse_block(bad)
  with pytest.raises(ValueError, match="axis 2 has size 6, not a multiple of 4"):
    M.block_scores(w, (2, 4), 1)


def test_rigl_on_block_scores_keeps_blocks_whole():
  rng = np.random.default_rng(5)
  shape, block, axis = (8, 12), (2, 3), 0
  w, g = rng.standard_normal(shape), rng.standard_normal(shape)

  @jax.jit
  def run(w, g):
    bw, bg = M.block_scores(w, block, axis), M.block_scores(g, block, axis)
    bmask = M.random_mask(jax.random.key(0), bw.shape, 6)
    new = dst.rigl_update(bw, bg, bmask, 2)
    full = M.expand_blocks(new, block, axis, shape)
    return bw, bg, bmask, new, full, M.reduce_blocks(full, block, axis)

  bw, bg, bmask, new, full, back = (np.asarray(x) for x in run(w, g))
  assert _sets(bmask, new) == _np_drop_grow(bw, bg, bmask, 2, 2)
  np.testing.assert_array_equal(back, new)
  assert full.sum() == 6 * 6


# --- schedules -------------------------------------------------------------------------------

def test_gmp_cubic_schedule():
  s_f, t0, t1, every = 0.8, 100, 300, 25
  py = [M.gmp_sparsity(t, s_f, t0, t1, every) for t in range(400)]
  traced = np.asarray(jax.jit(jax.vmap(
      lambda t: M.gmp_sparsity(t, s_f, t0, t1, every)))(jnp.arange(400)))
  np.testing.assert_allclose(traced, py, rtol=1e-6, atol=1e-7)
  assert py[:t0] == [0.0] * t0 and py[t1:] == [s_f] * (400 - t1)
  for t in range(t0, t1):                                          # held between updates
    tq = t0 + (t - t0) // every * every
    assert py[t] == py[tq] == s_f * (1 - (1 - (tq - t0) / (t1 - t0)) ** 3)
  assert all(a <= b for a, b in zip(py, py[1:]))
  assert M.gmp_sparsity(5, 0.5, 10, 10, 3) == 0.0
  assert M.gmp_sparsity(10, 0.5, 10, 10, 3) == 0.5 == M.gmp_sparsity(12, 0.5, 10, 4, 3)
  assert float(M.gmp_sparsity(jnp.int32(12), 0.5, 10, 4, 3)) == 0.5


def test_gmp_mean_sparsity_over_the_run_is_five_eighths_of_final():
  """Issue 13's acceptance check: a cubic schedule over [0.25T, 0.75T] gives mean 0.625 s_f."""
  T, s_f = 2000, 0.9
  mean = np.mean([M.gmp_sparsity(t, s_f, T // 4, 3 * T // 4, 1) for t in range(T)])
  assert mean == pytest.approx(0.625 * s_f, rel=1e-2)
  traced = jax.jit(lambda: jnp.mean(jax.vmap(
      lambda t: M.gmp_sparsity(t, s_f, T // 4, 3 * T // 4, 1))(jnp.arange(T))))()
  assert float(traced) == pytest.approx(mean, rel=1e-5)


def test_cosine_drop_fraction():
  alpha, t_end = 0.3, 1000
  assert M.cosine_drop_fraction(0, alpha, t_end) == pytest.approx(alpha)
  assert M.cosine_drop_fraction(500, alpha, t_end) == pytest.approx(alpha / 2)
  assert M.cosine_drop_fraction(1000, alpha, t_end) == 0.0 == M.cosine_drop_fraction(
      1500, alpha, t_end)
  steps = jnp.array([0, 250, 500, 999, 1000, 1500])
  got = jax.jit(lambda s: M.cosine_drop_fraction(s, alpha, t_end))(steps)
  want = [M.cosine_drop_fraction(int(s), alpha, t_end) for s in steps]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


# --- densities and random masks --------------------------------------------------------------

SHAPES = {"attn_q": (64, 64), "ffn_up": (64, 256), "ffn_down": (256, 64), "tiny": (4, 8),
          "experts": (4, 64, 32)}


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
def test_layer_densities_uniform_and_erk(sparsity):
  sizes = {k: math.prod(s) for k, s in SHAPES.items()}
  total = sum(sizes.values())
  uni = M.layer_densities(SHAPES, sparsity, "uniform")
  assert uni == {k: 1.0 - sparsity for k in SHAPES}
  erk = M.layer_densities(SHAPES, sparsity, "erk")
  assert all(0.0 <= d <= 1.0 for d in erk.values())
  nnz = {k: M.nnz_target(erk[k], sizes[k]) for k in SHAPES}
  assert abs(sum(nnz.values()) - (1 - sparsity) * total) <= len(SHAPES) / 2 + 1e-9
  raw = {k: sum(s) / sizes[k] for k, s in SHAPES.items()}
  sparse = [k for k in SHAPES if erk[k] < 1.0]                     # one eps for the rest
  eps = {erk[k] / raw[k] for k in sparse}
  assert max(eps, default=0) - min(eps, default=0) <= 1e-9 * max(eps, default=1)
  if sparse:                                                       # dense ones would exceed 1
    assert all(raw[k] * max(eps) >= 1.0 - 1e-9 for k in SHAPES if erk[k] == 1.0)
  by_size = sorted(SHAPES, key=lambda k: raw[k])                   # smaller layers denser
  assert all(erk[a] <= erk[b] for a, b in zip(by_size, by_size[1:]))
  if sparsity == 0.9:
    assert erk["tiny"] == 1.0 and erk["experts"] < 1.0 - sparsity < erk["attn_q"]
  with pytest.raises(ValueError, match="distribution"):
    M.layer_densities(SHAPES, sparsity, "normal")


def test_random_mask_exact_count_deterministic_and_uniform():
  shape, nnz = (4, 5), 5
  f = jax.jit(M.random_mask, static_argnums=1)
  a = f(jax.random.key(7), shape, jnp.int32(nnz))
  assert int(a.sum()) == nnz
  np.testing.assert_array_equal(a, f(jax.random.key(7), shape, jnp.int32(nnz)))
  keys = jax.random.split(jax.random.key(8), 4000)
  many = np.asarray(jax.vmap(lambda k: M.random_mask(k, shape, nnz))(keys))
  assert (many.sum(axis=(1, 2)) == nnz).all()
  np.testing.assert_allclose(many.mean(axis=0), nnz / 20, atol=0.04)


# --- dynamic sparse training -----------------------------------------------------------------

@pytest.mark.parametrize("shape", [(6, 10), (3, 4, 5)])
def test_rigl_drops_smallest_active_and_grows_largest_gradient(shape):
  rng = np.random.default_rng(9)
  f = jax.jit(lambda *a: dst.rigl_update(*a))
  size = math.prod(shape)
  for trial, n in enumerate((0, 1, 4, 9, size)):                   # size: clamped
    w, g = _tied(rng, shape), _tied(rng, shape)
    mask = np.asarray(M.random_mask(jax.random.key(trial), shape, size // 3 + trial))
    new = np.asarray(f(w, g, mask, jnp.int32(n)))
    assert new.sum() == mask.sum()
    n_eff = min(n, mask.sum(), size - mask.sum())
    assert _sets(mask, new) == _np_drop_grow(w, g, mask, n_eff, n_eff)
  assert f._cache_size() == 1


def test_set_grows_at_random_among_previously_inactive():
  rng = np.random.default_rng(10)
  shape, n = (3, 4, 5), 6
  w = _tied(rng, shape)
  mask = np.asarray(M.random_mask(jax.random.key(1), shape, 25))
  f = jax.jit(dst.set_update)
  new = np.asarray(f(jax.random.key(2), w, mask, n))
  dropped, grown = _sets(mask, new)
  assert new.sum() == mask.sum() and len(grown) == n
  assert dropped == _np_drop_grow(w, w, mask, n, 0)[0]
  assert not grown & set(np.flatnonzero(mask).tolist())            # only previously inactive
  np.testing.assert_array_equal(f(jax.random.key(2), w, mask, n), new)
  other = np.asarray(f(jax.random.key(3), w, mask, n))
  assert _sets(mask, other)[0] == dropped and _sets(mask, other)[1] != grown


def test_momentum_update_drop_and_grow_counts():
  rng = np.random.default_rng(11)
  shape = (3, 8, 6)
  w, mom = _tied(rng, shape), _tied(rng, shape)
  mask = np.asarray(M.random_mask(jax.random.key(4), shape, 60))
  f = jax.jit(dst.momentum_update)
  for n_drop, n_grow in ((5, 5), (4, 9), (7, 0), (0, 3), (80, 200)):
    new = np.asarray(f(w, mom, mask, jnp.int32(n_drop), jnp.int32(n_grow)))
    d, g = min(n_drop, 60), min(n_grow, mask.size - 60)
    assert new.sum() == 60 - d + g
    assert _sets(mask, new) == _np_drop_grow(w, mom, mask, d, g)


def _np_budgets(p, n_drop, cap):
  p, cap = np.maximum(np.asarray(p, np.float64), 0), np.asarray(cap)
  total, capped = int(np.sum(n_drop)), np.zeros(len(p), bool)
  if total >= cap.sum():
    return cap.copy()
  while True:
    rest = total - cap[capped].sum()
    weight = np.where(capped, 0.0, p)
    weight = weight if weight.sum() > 0 else (~capped).astype(float)
    share = rest * weight / weight.sum()
    newly = ~capped & (share >= cap)
    if not newly.any():
      break
    capped |= newly
  out = np.where(capped, cap, np.floor(share)).astype(int)
  free = np.flatnonzero(~capped)
  frac = (share - np.floor(share))[free]
  out[free[np.argsort(-frac, kind="stable")[:total - out.sum()]]] += 1
  return out


def test_momentum_budgets_proportional_capped_and_exact():
  f = jax.jit(dst.momentum_budgets)
  np.testing.assert_array_equal(f(jnp.array([1.0, 1.0, 2.0]), jnp.array([4, 4, 4]),
                                  jnp.array([100, 100, 100])), [3, 3, 6])
  np.testing.assert_array_equal(f(jnp.array([10.0, 1.0, 1.0]), jnp.array([5, 5, 5]),
                                  jnp.array([2, 100, 100])), [2, 7, 6])  # tie -> lower index
  np.testing.assert_array_equal(f(jnp.zeros(3), jnp.array([1, 1, 2]),
                                  jnp.array([9, 9, 9])), [2, 1, 1])      # no momentum: equal
  np.testing.assert_array_equal(f(jnp.ones(3), jnp.array([9, 9, 9]),
                                  jnp.array([1, 2, 3])), [1, 2, 3])      # all at capacity
  rng = np.random.default_rng(12)
  for _ in range(20):
    L = 7
    p = rng.exponential(size=L).astype(np.float32) * (rng.random(L) > 0.2)
    n_drop = rng.integers(0, 50, L)
    cap = rng.integers(0, 80, L)
    got = np.asarray(f(jnp.asarray(p), jnp.asarray(n_drop), jnp.asarray(cap)))
    assert (got >= 0).all() and (got <= cap).all()
    assert got.sum() == min(n_drop.sum(), cap.sum())
    np.testing.assert_array_equal(got, _np_budgets(p, n_drop, cap))
