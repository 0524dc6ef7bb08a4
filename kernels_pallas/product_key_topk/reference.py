"""Pure-jnp product-key top-k: the reference the Pallas kernel must match exactly, and a
brute-force version over all n² keys for tests.

Product keys (Lample et al. 2019): key (i, j) of the N = n² keys is the pair of sub-keys
``k1[i]``, ``k2[j]``; its score against a query (q1, q2) is ``q1·k1[i] + q2·k2[j]``. The exact
top-k over all N keys only needs each half's own top-k:

    s1 = q1 k1ᵀ, s2 = q2 k2ᵀ                 [..., H, n] float32 accumulation
    (a1, i1) = top_k(s1), (a2, i2) = top_k(s2)       a1, a2 sorted descending
    cand[a, b] = a1[a] + a2[b]                [..., H, k·k], row-major (position a·k + b)
    (scores, c) = top_k(cand)                 index = i1[c // k] · n + i2[c % k]

Tie rule (what ``jax.lax.top_k`` does, and what the kernel reproduces bit for bit):

* per half, equal sub-key scores keep the lower sub-key index first;
* in the combine, equal candidate scores keep the lower candidate position a·k + b first, i.e.
  the pair whose half-1 rank is lower, then whose half-2 rank is lower. When the tie comes from
  equal sub-key scores (duplicated sub-keys) this is "lower global index i·n + j first", the
  same order as ``lax.top_k`` over all n² scores (``product_key_topk_bruteforce``); a
  coincidental tie between different (a1, a2) sums keeps the lower half-1 rank.

Gradients flow through the selected entries only (``lax.top_k`` is differentiated as a gather):
score_j = q1·k1[r_j] + q2·k2[c_j] with r = index // n, c = index % n.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def subkey_scores(q_half: jax.Array, keys_half: jax.Array) -> jax.Array:
  """q_half [..., H, C] x keys_half [H or 1, n, C] -> [..., H, n] float32.

  Keys are cast to the query dtype; float32 inputs are multiplied at full precision (no TF32)."""
  h = q_half.shape[-2]
  keys = jnp.broadcast_to(keys_half, (h,) + keys_half.shape[1:]).astype(q_half.dtype)
  precision = lax.Precision.HIGHEST if q_half.dtype == jnp.float32 else None
  return jnp.einsum("...hc,hnc->...hn", q_half, keys, precision=precision,
                    preferred_element_type=jnp.float32)


def product_key_topk_reference(q1: jax.Array, q2: jax.Array, k1: jax.Array, k2: jax.Array,
                               top_k: int, *, softmax: bool = False
                               ) -> tuple[jax.Array, jax.Array]:
  """Exact top-k over the n² product keys, the k×k-candidate algorithm with ``lax.top_k``.

  Args:
    q1, q2: query halves [..., H, C1] / [..., H, C2].
    k1, k2: sub-key tables [H or 1, n, C1] / [H or 1, n, C2] (leading 1: shared by all heads).
    top_k: k in [1, n].
    softmax: return softmax weights over the k scores instead of the raw scores.
  Returns:
    (scores or weights [..., H, k] float32, descending; indices [..., H, k] int32 in [0, n²)).
  """
  n = k1.shape[-2]
  s1 = subkey_scores(q1, k1)
  s2 = subkey_scores(q2, k2)
  a1, i1 = lax.top_k(s1, top_k)
  a2, i2 = lax.top_k(s2, top_k)
  cand = (a1[..., :, None] + a2[..., None, :]).reshape(a1.shape[:-1] + (top_k * top_k,))
  scores, c = lax.top_k(cand, top_k)
  rows = jnp.take_along_axis(i1, c // top_k, axis=-1)
  cols = jnp.take_along_axis(i2, c % top_k, axis=-1)
  if softmax:
    scores = jax.nn.softmax(scores, axis=-1)
  return scores, (rows * n + cols).astype(jnp.int32)


def product_key_topk_bruteforce(q1: jax.Array, q2: jax.Array, k1: jax.Array, k2: jax.Array,
                                top_k: int, *, softmax: bool = False
                                ) -> tuple[jax.Array, jax.Array]:
  """Scores all n² keys and takes ``lax.top_k`` (equal scores: lower global index first).
  Memory [..., H, n²]: tests only. Same signature and outputs as the reference."""
  n = k1.shape[-2]
  s1 = subkey_scores(q1, k1)
  s2 = subkey_scores(q2, k2)
  full = (s1[..., :, None] + s2[..., None, :]).reshape(s1.shape[:-1] + (n * n,))
  scores, idx = lax.top_k(full, top_k)
  if softmax:
    scores = jax.nn.softmax(scores, axis=-1)
  return scores, idx.astype(jnp.int32)
