"""Block states, the segment-mask note and the array helpers shared by every mask module.

``EMPTY`` / ``PARTIAL`` / ``FULL`` / ``UNKNOWN`` are the int8 states ``Mask.classify`` returns for
rectangles ``[q0, q1) x [k0, k1)``. The helpers work on numpy arrays and (``_xp``, ``_full_like``)
on jnp arrays / tracers alike; ``_band_classify`` / ``_band_count`` are the exact analytic states
and visible-element counts of a diagonal band ``lo <= kv - q <= hi`` on such rectangles.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SAME_SEGMENT_NOTE = (
    "Segment (document) masking for packed sequences is dynamic: visible(q, kv) = "
    "mask.elementwise(q, kv, h) & (segment_ids_q[q] == segment_ids_kv[kv]). It is applied "
    "in-kernel on every visited block (a block listed as full is still segment-masked when "
    "segment ids are given) and is never part of the static BlockLayout.")

EMPTY, PARTIAL, FULL, UNKNOWN = 0, 1, 2, 3
_BIG = 1 << 62  # stands in for +-infinity in band limits


# ---------------------------------------------------------------------------------------------
# helpers usable by both numpy and jax.numpy


def _xp(*xs) -> Any:
  """The array namespace: jax.numpy if any argument is a jax array / tracer, else numpy."""
  return jnp if any(isinstance(x, jax.Array) for x in xs) else np


def _full_like(xp, q, kv):
  """An all-True bool array of the broadcast shape of q and kv."""
  return (q == q) & (kv == kv)


def _states(any_, all_) -> np.ndarray:
  return np.where(all_, FULL, np.where(any_, PARTIAL, EMPTY)).astype(np.int8)


def _shape(*xs):
  return np.broadcast_shapes(*(np.shape(x) for x in xs))


def _area(q0, q1, k0, k1):
  return (np.asarray(q1, np.int64) - q0) * (np.asarray(k1, np.int64) - k0)


def _sum_over_q(q0, q1, per_q):
  """sum_{q in [q0, q1)} per_q(q), vectorised over rectangles (loops over the q offset)."""
  q0, q1 = np.asarray(q0, np.int64), np.asarray(q1, np.int64)
  out = np.zeros(np.broadcast_shapes(q0.shape, np.shape(per_q(q0))), np.int64)
  for t in range(int((q1 - q0).max()) if q0.size else 0):
    q = q0 + t
    out += np.where(q < q1, per_q(q), 0)
  return out


def _band_count(lo, hi, q0, q1, k0, k1):
  k0, k1 = np.asarray(k0, np.int64), np.asarray(k1, np.int64)
  return _sum_over_q(q0, q1, lambda q: np.maximum(
      0, np.minimum(k1 - 1, q + hi) - np.maximum(k0, q + lo) + 1))


def _band_classify(lo, hi, q0, q1, k0, k1) -> np.ndarray:
  """Exact states of {lo <= kv - q <= hi} on rectangles: kv - q takes every integer value in
  [k0 - (q1 - 1), (k1 - 1) - q0] on a non-empty rectangle."""
  dmin = np.asarray(k0, np.int64) - (np.asarray(q1, np.int64) - 1)
  dmax = np.asarray(k1, np.int64) - 1 - np.asarray(q0, np.int64)
  return _states((dmin <= hi) & (dmax >= lo), (dmin >= lo) & (dmax <= hi))

