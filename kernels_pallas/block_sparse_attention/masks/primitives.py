"""Primitive masks with analytic ``classify`` / ``count``: ``Full``, ``Causal``,
``SlidingWindow`` (diagonal bands), ``KeyPrefix`` and ``KeyModTail`` (column masks),
``DiagStride`` (every ``stride``-th diagonal) and ``SameBlock`` (block-diagonal).

The named patterns (``patterns.py``, ``bigbird.py``) expand into these.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kernels_pallas.block_sparse_attention.masks.base import Mask
from kernels_pallas.block_sparse_attention.masks.states import (_BIG, _area, _band_classify,
                                                                _band_count, _full_like, _shape,
                                                                _states, _sum_over_q, _xp)


@dataclasses.dataclass(frozen=True)
class Full(Mask):
  """Every key visible (bidirectional)."""

  def elementwise(self, q_idx, kv_idx, head=0):
    return _full_like(_xp(q_idx, kv_idx), q_idx, kv_idx)

  @property
  def band(self):
    return (-_BIG, _BIG)

  def classify(self, q0, q1, k0, k1, head=0):
    return _band_classify(-_BIG, _BIG, q0, q1, k0, k1)

  def count(self, q0, q1, k0, k1, head=0):
    return np.broadcast_to(_area(q0, q1, k0, k1), _shape(q0, q1, k0, k1))

  def __str__(self):
    return "full"


@dataclasses.dataclass(frozen=True)
class Causal(Mask):
  """kv <= q."""

  def elementwise(self, q_idx, kv_idx, head=0):
    return kv_idx <= q_idx

  @property
  def band(self):
    return (-_BIG, 0)

  def classify(self, q0, q1, k0, k1, head=0):
    return _band_classify(-_BIG, 0, q0, q1, k0, k1)

  def count(self, q0, q1, k0, k1, head=0):
    return _band_count(-_BIG, 0, q0, q1, k0, k1)

  def __str__(self):
    return "causal"


@dataclasses.dataclass(frozen=True)
class SlidingWindow(Mask):
  """q - left <= kv <= q + right (``left + right + 1`` keys in the interior). Not causal by
  itself unless ``right == 0``; ``Causal() & SlidingWindow(w)`` == ``SlidingWindow(w)``."""
  left: int
  right: int = 0

  def __post_init__(self):
    if self.left < 0 or self.right < 0:
      raise ValueError(f"SlidingWindow needs left, right >= 0, got {self.left}, {self.right}")

  def elementwise(self, q_idx, kv_idx, head=0):
    d = kv_idx - q_idx
    return (d >= -self.left) & (d <= self.right)

  @property
  def band(self):
    return (-self.left, self.right)

  def classify(self, q0, q1, k0, k1, head=0):
    return _band_classify(-self.left, self.right, q0, q1, k0, k1)

  def count(self, q0, q1, k0, k1, head=0):
    return _band_count(-self.left, self.right, q0, q1, k0, k1)

  def __str__(self):
    return f"window:{self.left}" + (f":{self.right}" if self.right else "")


@dataclasses.dataclass(frozen=True)
class KeyPrefix(Mask):
  """kv < length, for every query (a column mask; the "global keys" of BigBird / PrefixLM)."""
  length: int

  def elementwise(self, q_idx, kv_idx, head=0):
    return (kv_idx < self.length) & (q_idx == q_idx)

  def classify(self, q0, q1, k0, k1, head=0):
    k0, k1 = np.asarray(k0), np.asarray(k1)
    any_, all_ = np.broadcast_arrays(k0 < self.length, k1 <= self.length, np.asarray(q0))[:2]
    return _states(any_, all_)

  def count(self, q0, q1, k0, k1, head=0):
    k0, k1 = np.asarray(k0, np.int64), np.asarray(k1, np.int64)
    cols = np.clip(np.minimum(k1, self.length) - k0, 0, None)
    return np.broadcast_to((np.asarray(q1, np.int64) - q0) * cols, _shape(q0, q1, k0, k1))

  def __str__(self):
    return f"keyprefix:{self.length}"


@dataclasses.dataclass(frozen=True)
class DiagStride(Mask):
  """(kv - q) % stride == 0 (both directions; And it with a band)."""
  stride: int

  def __post_init__(self):
    if self.stride < 1:
      raise ValueError(f"stride must be >= 1, got {self.stride}")

  def elementwise(self, q_idx, kv_idx, head=0):
    return (kv_idx - q_idx) % self.stride == 0

  def classify(self, q0, q1, k0, k1, head=0):
    dmin = np.asarray(k0, np.int64) - (np.asarray(q1, np.int64) - 1)
    dmax = np.asarray(k1, np.int64) - 1 - np.asarray(q0, np.int64)
    any_ = (dmax // self.stride) * self.stride >= dmin
    return _states(any_, any_ & ((self.stride == 1) | (dmin == dmax)))

  def count(self, q0, q1, k0, k1, head=0):
    s = self.stride
    k0, k1 = np.asarray(k0, np.int64), np.asarray(k1, np.int64)
    below = lambda n, r: (n - r + s - 1) // s  # #{x in [0, n): x % s == r}, n >= 0, 0 <= r < s
    return _sum_over_q(q0, q1, lambda q: below(k1, q % s) - below(k0, q % s))

  def __str__(self):
    return f"diagstride:{self.stride}"


@dataclasses.dataclass(frozen=True)
class SameBlock(Mask):
  """q // block == kv // block (block-diagonal)."""
  block: int

  def elementwise(self, q_idx, kv_idx, head=0):
    return q_idx // self.block == kv_idx // self.block

  def classify(self, q0, q1, k0, k1, head=0):
    b = self.block
    qa, qb = np.asarray(q0) // b, (np.asarray(q1) - 1) // b
    ka, kb = np.asarray(k0) // b, (np.asarray(k1) - 1) // b
    any_ = np.maximum(qa, ka) <= np.minimum(qb, kb)
    return _states(any_, (qa == qb) & (ka == kb) & (qa == ka))

  def count(self, q0, q1, k0, k1, head=0):
    b = self.block
    k0, k1 = np.asarray(k0, np.int64), np.asarray(k1, np.int64)
    return _sum_over_q(q0, q1, lambda q: np.maximum(
        0, np.minimum(k1, (q // b + 1) * b) - np.maximum(k0, (q // b) * b)))

  def __str__(self):
    return f"sameblock:{self.block}"


@dataclasses.dataclass(frozen=True)
class KeyModTail(Mask):
  """kv % block >= block - num (the last ``num`` keys of every block; a column mask)."""
  block: int
  num: int

  def elementwise(self, q_idx, kv_idx, head=0):
    return (kv_idx % self.block >= self.block - self.num) & (q_idx == q_idx)

  def _count_below(self, n):
    b, c = self.block, min(max(self.num, 0), self.block)
    return (n // b) * c + np.maximum(0, n % b - (b - c))

  def classify(self, q0, q1, k0, k1, head=0):
    k0, k1 = np.asarray(k0, np.int64), np.asarray(k1, np.int64)
    cnt = self._count_below(k1) - self._count_below(k0)
    any_, all_ = np.broadcast_arrays(cnt > 0, cnt == k1 - k0, np.asarray(q0))[:2]
    return _states(any_, all_)

  def count(self, q0, q1, k0, k1, head=0):
    k0, k1 = np.asarray(k0, np.int64), np.asarray(k1, np.int64)
    cols = self._count_below(k1) - self._count_below(k0)
    return np.broadcast_to((np.asarray(q1, np.int64) - q0) * cols, _shape(q0, q1, k0, k1))

  def __str__(self):
    return f"keymodtail:{self.block}:{self.num}"
