"""Query whitening (``query_center="whiten"``, sparsejax/layers/query_center.py): decorrelated
unit-covariance queries from batch statistics in training, running statistics in evaluation,
and the effective rank it restores to queries that vary along a few directions only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.layers import query_center
from sparsejax.layers.query_center import QueryCenter, inverse_sqrt


def _low_rank_queries(seed=0, b=4, t=64, h=2, k=8, rank=3):
  """Queries along ``rank`` strong directions plus weaker ones, with a shared offset."""
  rng = np.random.default_rng(seed)
  basis = rng.standard_normal((h, k, k))
  scales = np.array([10.0] * rank + [2.0] * (k - rank))
  z = rng.standard_normal((b, t, h, k)) * scales
  return jnp.asarray(np.einsum("bthj,hjk->bthk", z, basis) + 4.0, jnp.float32)


def _cov(x_NxK):
  x = np.asarray(x_NxK, np.float64)
  return np.cov(x, rowvar=False, bias=True)


def _whitened_cov(cov):
  """What ``inverse_sqrt`` leaves of a covariance: U diag(λ / (λ + floor)) Uᵀ."""
  lam, u = np.linalg.eigh(cov)
  floor = query_center.WHITEN_FLOOR * lam.mean(-1, keepdims=True)
  return np.einsum("...kj,...j,...lj->...kl", u, lam / (lam + floor), u)


def _inv_sqrt(cov):
  lam, u = np.linalg.eigh(cov)
  lam = lam + query_center.WHITEN_FLOOR * lam.mean(-1, keepdims=True)
  return np.einsum("...kj,...j,...lj->...kl", u, lam ** -0.5, u)


def _rank(x_NxK):
  lam = np.linalg.eigvalsh(_cov(x_NxK))
  return lam.sum() ** 2 / np.sum(lam ** 2)


def test_training_whitens_with_batch_statistics_and_moves_the_running_ones():
  q = _low_rank_queries()
  qc = QueryCenter("whiten", 2, 8, momentum=0.9, eps=1e-6)
  out, inter = nnx.capture(qc, nnx.Intermediate)(q, True)
  sown = nnx.to_pure_dict(inter)
  for h in range(2):
    flat = np.asarray(out[:, :, h]).reshape(-1, 8)
    raw = np.asarray(q[:, :, h]).reshape(-1, 8)
    np.testing.assert_allclose(flat.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(_cov(flat), _whitened_cov(_cov(raw)), atol=2e-3)
    assert _rank(raw) < 3.0 and _rank(flat) > 5.0  # the weak directions are lifted
    mu = raw.mean(0)
    np.testing.assert_allclose(sown["update__buffer_qmean_HxK"][-1][h], 0.1 * mu, rtol=1e-4)
    cov = _cov(np.asarray(q[:, :, h]).reshape(-1, 8))
    np.testing.assert_allclose(sown["update__buffer_qcov_HxKxK"][-1][h], 0.1 * (cov - np.eye(8)),
                               rtol=1e-3, atol=1e-3)


def test_evaluation_uses_the_running_statistics():
  q = _low_rank_queries(seed=1)
  qc = QueryCenter("whiten", 2, 8, momentum=0.9, eps=1e-6)
  eye_w = (1.0 + query_center.WHITEN_FLOOR) ** -0.5  # initial mean 0, covariance I
  np.testing.assert_allclose(np.asarray(qc(q, False)), eye_w * np.asarray(q), rtol=1e-5)
  rng = np.random.default_rng(2)
  a = rng.standard_normal((2, 8, 8))
  cov = np.einsum("hij,hkj->hik", a, a) + 0.5 * np.eye(8)
  mean = rng.standard_normal((2, 8))
  qc.buffer_qmean_HxK[...] = jnp.asarray(mean, jnp.float32)
  qc.buffer_qcov_HxKxK[...] = jnp.asarray(cov, jnp.float32)
  w = _inv_sqrt(cov)
  want = np.einsum("bthk,hkl->bthl", np.asarray(q) - mean, w)
  np.testing.assert_allclose(np.asarray(qc(q, False)), want, rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(np.asarray(inverse_sqrt(jnp.asarray(cov, jnp.float32))), w,
                             rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(np.einsum("hij,hjk,hkl->hil", w, cov, w), _whitened_cov(cov),
                             atol=1e-9)  # symmetric: W C W = what is left of C


def test_no_gradient_through_the_whitening_matrix():
  q = _low_rank_queries(seed=3, b=2, t=16)
  g = jax.random.normal(jax.random.key(0), q.shape)
  qc = QueryCenter("whiten", 2, 8, momentum=0.9, eps=1e-6)
  grad = jax.grad(lambda x: jnp.sum(qc(x, True) * g))(q)
  z = np.asarray(q, np.float64).reshape(-1, 2, 8)
  z = z - z.mean(0)
  cov = np.einsum("nhk,nhl->hkl", z, z) / z.shape[0]
  w = np.asarray(inverse_sqrt(jnp.asarray(cov, jnp.float32)), np.float64)
  # d/dq of sum(g · (q - mean(q)) W) with W constant: (g - mean(g)) Wᵀ
  gg = np.asarray(g, np.float64).reshape(-1, 2, 8)
  want = np.einsum("nhl,hkl->nhk", gg - gg.mean(0), w).reshape(q.shape)
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("family", ["memory", "peer"])
def test_whiten_mode_is_a_config_choice(family):
  from sparsejax.configure import load_config
  from sparsejax.train.state import model_spec
  cfg = load_config(f"configs/{family}.py:tiny", **{f"{family}.query_center": "whiten"})
  params = model_spec(cfg, 257).abstract_params
  layer = [b["ffn"] for b in params["blocks"].values() if "qcenter" in b["ffn"]][0]
  k = getattr(cfg, family).d_key
  assert layer["qcenter"]["buffer_qcov_HxKxK"].shape == (getattr(cfg, family).num_heads, k, k)
  assert "buffer_qvar_HxK" not in layer["qcenter"]
