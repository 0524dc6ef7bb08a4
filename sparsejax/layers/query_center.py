"""Query centring for product-key retrieval (PEER and memory layers).

Why: as a model first learns byte / token frequencies, the inputs of a retrieval layer become
aligned across tokens (mean pairwise cosine 0.09 -> 0.93 within ~5 steps on the tiny presets), so
every query points the same way and retrieval collapses onto a few keys. Per-token RMS / layer
norm rescales each query but cannot remove a direction shared by all tokens; subtracting the
mean query (per head and dimension) and dividing by its spread can.

Modes (``config.memory.query_center`` / ``config.peer.query_center``):
  * ``"batch"``: in training, the statistics of the current micro-batch (all its tokens), as the
    query BatchNorm of PKM / PEER. It mixes statistics across the batch and across positions of
    a sequence, so training is not strictly causal (one mean over B·T tokens); evaluation uses
    the running statistics and is causal.
  * ``"running"``: statistics from earlier steps only (an exponential moving average held in
    ``buffer_*`` parameters, moved by the sown ``update__buffer_*`` after each step), in training
    and evaluation: causal-safe.
  * ``"whiten"`` (default): as "batch", but the centred queries are decorrelated too (ZCA:
    multiplied by the inverse square root of their covariance over the head's whole d_key,
    computed without gradient; ``WHITEN_FLOOR`` x the mean eigenvalue is added to every
    eigenvalue). Per-dimension scaling
    cannot undo queries that vary along a few directions only (an effective rank of ~4 of the
    16 dimensions of each half on the 128²-slot tiny memory), nor a correlation between the
    two halves (row and column sub-key choices then go together); see
    experiments/results/retrieval_usage/REPORT.md. Costs B·T·H·d_key² multiply-adds and an
    eigendecomposition of H d_key x d_key matrices per step.
  * ``"none"``: raw queries.
All non-trivial modes keep the running statistics (momentum ``query_center_momentum``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.layers.common import sow

MODES = ("batch", "running", "whiten", "none")
# Eigenvalue floor of the whitening, relative to the mean eigenvalue: weak directions are lifted
# towards, not up to, unit variance. On the tiny presets (300 steps) 0.1 raised usage and
# lowered the eval loss; 1e-3 (near-full whitening) raised usage more but cost eval loss
# (experiments/results/retrieval_usage/REPORT.md).
WHITEN_FLOOR = 0.1


def inverse_sqrt(cov_HxKxK: jax.Array) -> jax.Array:
  """Symmetric (cov + floor)^-1/2 per head (floor: ``WHITEN_FLOOR`` x the mean eigenvalue)."""
  lam, u = jnp.linalg.eigh(cov_HxKxK)
  lam = jnp.maximum(lam, 0.0)
  lam = lam + WHITEN_FLOOR * jnp.mean(lam, axis=-1, keepdims=True) + 1e-12
  return jnp.einsum("hkj,hj,hlj->hkl", u, jax.lax.rsqrt(lam), u)


class QueryCenter(nnx.Module):
  """(q - mean) / sqrt(var + eps) per head and query dimension; see the module docstring."""

  def __init__(self, mode: str, num_heads: int, d_key: int, *, momentum: float, eps: float):
    if mode not in MODES:
      raise ValueError(f"query centring mode {mode!r}; choose one of {MODES}")
    self.mode, self.momentum, self.eps = mode, momentum, eps
    if mode != "none":
      axes = ("pk_heads", "pk_dim")
      self.buffer_qmean_HxK = nnx.Param(jnp.zeros((num_heads, d_key), jnp.float32),
                                        logical_axes=axes)
    if mode in ("batch", "running"):
      self.buffer_qvar_HxK = nnx.Param(jnp.ones((num_heads, d_key), jnp.float32),
                                       logical_axes=axes)
    if mode == "whiten":
      eye = jnp.broadcast_to(jnp.eye(d_key, dtype=jnp.float32), (num_heads, d_key, d_key))
      self.buffer_qcov_HxKxK = nnx.Param(eye, logical_axes=("pk_heads", "pk_dim", None))

  def __call__(self, q_BxTxHxK: jax.Array, training: bool) -> jax.Array:
    if self.mode == "none":
      return q_BxTxHxK
    if self.mode == "whiten":
      return self._whiten(q_BxTxHxK.astype(jnp.float32), training)
    q = q_BxTxHxK.astype(jnp.float32)
    mean_r = jax.lax.stop_gradient(self.buffer_qmean_HxK[...])
    var_r = jax.lax.stop_gradient(self.buffer_qvar_HxK[...])
    mean, var = mean_r, var_r
    if training:
      mu = jnp.mean(q, axis=(0, 1))
      sigma2 = jnp.mean(jnp.square(q - mu), axis=(0, 1))
      step = 1.0 - self.momentum
      sow(self, "update__buffer_qmean_HxK", step * (jax.lax.stop_gradient(mu) - mean_r))
      sow(self, "update__buffer_qvar_HxK", step * (jax.lax.stop_gradient(sigma2) - var_r))
      if self.mode == "batch":
        mean, var = mu, sigma2
    return (q - mean) * jax.lax.rsqrt(var + self.eps)

  def _whiten(self, q: jax.Array, training: bool) -> jax.Array:
    mean = jax.lax.stop_gradient(self.buffer_qmean_HxK[...])
    cov = jax.lax.stop_gradient(self.buffer_qcov_HxKxK[...])
    if training:
      mu = jnp.mean(q, axis=(0, 1))
      z = jax.lax.stop_gradient(q - mu)
      batch_cov = jnp.einsum("bthk,bthl->hkl", z, z) / (q.shape[0] * q.shape[1])
      step = 1.0 - self.momentum
      sow(self, "update__buffer_qmean_HxK", step * (jax.lax.stop_gradient(mu) - mean))
      sow(self, "update__buffer_qcov_HxKxK", step * (batch_cov - cov))
      mean, cov = mu, batch_cov
    w = jax.lax.stop_gradient(inverse_sqrt(cov))
    return jnp.einsum("bthk,hkl->bthl", q - mean, w)


def usage_scalars(counts_N: jax.Array) -> dict[str, jax.Array]:
  """Touched fraction and KL(usage || uniform) of one step's selection counts (train-time
  usage: the window is the step's batch)."""
  total = jnp.maximum(jnp.sum(counts_N), 1.0)
  p = counts_N / total
  kl = jnp.sum(jnp.where(p > 0, p * jnp.log(p * counts_N.size), 0.0))
  return {"touched_fraction": jnp.mean((counts_N > 0).astype(jnp.float32)),
          "kl_from_uniform": kl}
