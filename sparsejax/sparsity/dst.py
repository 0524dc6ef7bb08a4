"""Dynamic sparse training, one layer (leaf) at a time: drop active weights by magnitude and
grow previously inactive ones by |gradient| (RigL, Evci et al. 2020), at random (SET, Mocanu et
al. 2018) or by |momentum| with layer budgets by mean momentum (sparse momentum, Dettmers &
Zettlemoyer 2019).

Shape-agnostic: for block sparsity call them on ``masks.block_scores`` of the weight and of
|grad| with the block-level mask (``masks.reduce_blocks``), then ``masks.expand_blocks``.
Counts may be traced; dropped and grown sets are disjoint (growth only among the weights
inactive before the update), and ties go to the lower flat index.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from sparsejax.sparsity.masks import select


def _drop_grow(w, grow_score, mask, n_drop, n_grow):
  """``mask`` minus the ``n_drop`` smallest |w| among its active entries, plus the ``n_grow``
  largest ``grow_score`` among its inactive ones (both counts clamped to what exists)."""
  mask = mask.astype(bool)
  active = jnp.sum(mask, dtype=jnp.int32)
  inactive = mask.size - active
  n_drop = jnp.clip(jnp.asarray(n_drop, jnp.int32), 0, active)
  n_grow = jnp.clip(jnp.asarray(n_grow, jnp.int32), 0, inactive)
  a = jnp.abs(w)
  drop = select(-a if jnp.issubdtype(a.dtype, jnp.floating) else ~a, n_drop, mask)
  grow = select(grow_score, n_grow, ~mask)
  return (mask & ~drop) | grow


def _clamped(mask, n):
  """``n`` limited to the active and the inactive counts (RigL / SET keep the count)."""
  active = jnp.sum(mask.astype(bool), dtype=jnp.int32)
  return jnp.clip(jnp.asarray(n, jnp.int32), 0, jnp.minimum(active, mask.size - active))


def rigl_update(w, grad, mask, n):
  """RigL: drop the ``n`` active weights with the smallest |w|, grow the ``n`` previously
  inactive ones with the largest |grad|; ``n`` clamped to min(n, active, inactive), so the
  number of True is unchanged."""
  n = _clamped(mask, n)
  return _drop_grow(w, jnp.abs(grad), mask, n, n)


def set_update(key, w, mask, n):
  """SET: RigL's drop, then grow ``n`` uniformly at random among the previously inactive
  weights (deterministic per ``key``); the number of True is unchanged."""
  n = _clamped(mask, n)
  return _drop_grow(w, jax.random.uniform(key, jnp.shape(mask)), mask, n, n)


def momentum_update(w, momentum, mask, n_drop, n_grow):
  """Sparse momentum: drop ``n_drop`` smallest |w| among the active weights (clamped to the
  active count), grow ``n_grow`` largest |momentum| among the previously inactive ones (clamped
  to the inactive count). The layer's count changes by ``n_grow - n_drop``; with budgets from
  ``momentum_budgets`` the total over layers is kept."""
  return _drop_grow(w, jnp.abs(momentum), mask, n_drop, n_grow)


def momentum_budgets(mean_momentum, n_drop, capacity):
  """Growth budgets per layer (int32 [L]): the total ``sum(n_drop)`` shared in proportion to
  ``mean_momentum`` (equal shares when those are all 0), each layer capped at ``capacity`` (the
  weights it may grow: its inactive count before the update) with the overflow going to the
  others; largest-remainder rounding (ties to the lower layer index). Sums exactly to
  ``sum(n_drop)`` when ``sum(capacity)`` allows, else every layer gets its capacity."""
  p = jnp.maximum(jnp.asarray(mean_momentum, jnp.float32), 0.0)
  cap = jnp.maximum(jnp.asarray(capacity, jnp.int32), 0)
  total = jnp.sum(jnp.asarray(n_drop, jnp.int32))
  count = p.shape[0]

  def shares(capped):
    free = ~capped
    rest = total - jnp.sum(jnp.where(capped, cap, 0))
    weight = jnp.where(free, p, 0.0)
    weight = jnp.where(jnp.sum(weight) > 0, weight, free.astype(jnp.float32))
    return jnp.where(free, rest.astype(jnp.float32) * weight
                     / jnp.maximum(jnp.sum(weight), 1e-30), 0.0), rest

  def fill(_, capped):               # water-filling: each round caps at least one layer or
    share, _ = shares(capped)        # changes nothing, so ``count`` rounds reach the fixpoint
    return capped | (share >= cap.astype(jnp.float32))

  capped = lax.fori_loop(0, count, fill, jnp.zeros(count, bool))
  share, rest = shares(capped)
  free = ~capped
  base = jnp.where(free, jnp.floor(share).astype(jnp.int32), cap)
  frac = share - jnp.floor(share)
  short = rest - jnp.sum(jnp.where(free, base, 0))     # in [0, #free) up to float32 rounding
  plus = select(frac, jnp.maximum(short, 0), free)
  minus = select(-frac, jnp.maximum(-short, 0), free & (base > 0))
  out = base + plus.astype(jnp.int32) - minus.astype(jnp.int32)
  return jnp.where(jnp.all(capped), cap, out)
