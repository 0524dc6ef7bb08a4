"""Static, hashable attention-mask specs that compose (``&``, ``|``, ``~``).

A mask answers "may query position ``q`` see key position ``kv`` in head ``h``?" in two ways:

* ``elementwise(q_idx, kv_idx, head) -> bool array`` — broadcasting, written only with operators
  that trace under ``jax.numpy`` (comparisons, arithmetic, ``%``, ``//``, ``&``, ``|``, ``where``),
  so the same code runs on numpy arrays (layout compilation, tests) and on jnp int32 index
  vectors inside a Pallas kernel (partial blocks). ``head`` may be a Python int or a traced
  int32 scalar. Indices are global positions; range checks (``q < seq_q``, ``kv < seq_kv``)
  are *not* part of a mask — the layout / kernel adds them.
* ``classify(q0, q1, k0, k1, head) -> int8 states`` — vectorised over broadcastable numpy arrays
  of half-open rectangles ``[q0, q1) x [k0, k1)``: ``EMPTY`` (0), ``PARTIAL`` (1), ``FULL`` (2) or
  ``UNKNOWN`` (3: "evaluate the elements"). Analytic for bands (Causal, SlidingWindow), key
  prefixes, diagonal strides, Sparse-Transformer blocks and BigBird random blocks; ``And`` /
  ``Or`` / ``Not`` combine their children's states exactly where that is decidable and say
  ``UNKNOWN`` otherwise. ``count(q0, q1, k0, k1, head)`` gives exact visible-element counts
  where known analytically (-1 elsewhere), so layout density needs no element evaluation for
  most partial blocks. ``block_class`` is the single-block convenience returning ``(any, all)``.

Masks are frozen dataclasses: equal by value and hashable, so they can be ``jax.jit`` static
arguments and ``functools.lru_cache`` keys.

Segment / document masks for packed sequences (``segment_ids_q[t] == segment_ids_kv[s]``) are
DYNAMIC (they depend on the batch), so they are not masks here and never enter the static
block layout: the kernel compares segment ids on every visited block and ANDs the result with
the static mask (see ``SAME_SEGMENT_NOTE``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import re
from typing import Any, Callable

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


def _u32(xp, x):
  return xp.asarray(x).astype(xp.uint32)


_M1, _M2, _GOLD = 0x7FEB352D, 0x846CA68B, 0x9E3779B9


def _mix32(xp, x):
  """lowbias32 integer hash on uint32 arrays (wrap-around arithmetic; numpy and jnp agree)."""
  x = x ^ (x >> 16)
  x = x * xp.uint32(_M1)
  x = x ^ (x >> 15)
  x = x * xp.uint32(_M2)
  return x ^ (x >> 16)


def _mix_int(x: int) -> int:
  with np.errstate(over="ignore"):
    return int(_mix32(np, np.asarray(x & 0xFFFFFFFF, np.uint32)))


# ---------------------------------------------------------------------------------------------
# base class and combinators


@dataclasses.dataclass(frozen=True)
class Mask:
  """Base class. Subclasses implement ``elementwise`` (and optionally ``classify``), or
  ``_expand`` returning an equivalent mask built from primitives."""

  def _expand(self) -> "Mask | None":
    return None

  def elementwise(self, q_idx, kv_idx, head=0):
    inner = self._expand()
    if inner is None:
      raise TypeError(f"{type(self).__name__} defines neither elementwise() nor _expand(); a "
                      "Mask subclass must implement one of them")
    return inner.elementwise(q_idx, kv_idx, head)

  def classify(self, q0, q1, k0, k1, head: int = 0) -> np.ndarray:
    """int8 states of the non-empty rectangles [q0, q1) x [k0, k1) (broadcast). Default:
    delegate to the expansion, else ``UNKNOWN`` everywhere (the caller evaluates elements)."""
    inner = self._expand()
    if inner is not None:
      return inner.classify(q0, q1, k0, k1, head)
    shape = np.broadcast_shapes(np.shape(q0), np.shape(q1), np.shape(k0), np.shape(k1))
    return np.full(shape, UNKNOWN, np.int8)

  def count(self, q0, q1, k0, k1, head: int = 0) -> np.ndarray:
    """int64 visible-element counts of the rectangles (broadcast), -1 where not known
    analytically (the caller evaluates elements). Default: the expansion's, else all -1."""
    inner = self._expand()
    if inner is not None:
      return inner.count(q0, q1, k0, k1, head)
    return np.full(_shape(q0, q1, k0, k1), -1, np.int64)

  def block_class(self, q_block: int, kv_block: int, head: int, block_q: int,
                  block_kv: int) -> tuple[bool, bool]:
    """``(any visible, all visible)`` for block (q_block, kv_block), no sequence-end clipping:
    the analytic answer when decidable, else the block's elements evaluated (numpy)."""
    q0, k0 = q_block * block_q, kv_block * block_kv
    state = int(self.classify(q0, q0 + block_q, k0, k0 + block_kv, head))
    if state != UNKNOWN:
      return state != EMPTY, state == FULL
    q = np.arange(q0, q0 + block_q)[:, None]
    kv = np.arange(k0, k0 + block_kv)[None, :]
    vis = np.broadcast_to(self.elementwise(q, kv, head), (block_q, block_kv))
    return bool(vis.any()), bool(vis.all())

  @property
  def head_dependent(self) -> bool:
    inner = self._expand()
    return inner.head_dependent if inner is not None else False

  def for_layer(self, layer: int) -> "Mask":
    """This mask as used in layer ``layer`` (only seeded masks, e.g. BigBird, change)."""
    return self

  @property
  def band(self) -> tuple[int, int] | None:
    """``(lo, hi)`` if the mask is exactly ``lo <= kv - q <= hi`` (used to merge And-ed bands)."""
    return None

  def __and__(self, other: "Mask") -> "Mask":
    return And(_flatten(And, (self, other)))

  def __or__(self, other: "Mask") -> "Mask":
    return Or(_flatten(Or, (self, other)))

  def __invert__(self) -> "Mask":
    return self.mask if isinstance(self, Not) else Not(self)


def _flatten(cls, masks) -> tuple:
  out = []
  for m in masks:
    if not isinstance(m, Mask):
      raise TypeError(f"expected a Mask, got {type(m).__name__}")
    out.extend(m.masks if isinstance(m, cls) else (m,))
  return tuple(out)


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


@dataclasses.dataclass(frozen=True)
class And(Mask):
  """Visible where every child is visible."""
  masks: tuple

  def __post_init__(self):
    if not self.masks:
      raise ValueError("And needs at least one mask")

  def elementwise(self, q_idx, kv_idx, head=0):
    out = self.masks[0].elementwise(q_idx, kv_idx, head)
    for m in self.masks[1:]:
      out = out & m.elementwise(q_idx, kv_idx, head)
    return out

  @property
  def band(self):
    bands = [m.band for m in self.masks]
    if any(b is None for b in bands):
      return None
    return max(b[0] for b in bands), min(b[1] for b in bands)

  def classify(self, q0, q1, k0, k1, head=0):
    # the intersection of bands is a band: classified exactly
    states = [m.classify(q0, q1, k0, k1, head) for m in self._children()]
    s = np.stack(np.broadcast_arrays(*states))
    nonfull = (s != FULL).sum(0)
    single = np.where(s != FULL, s, 0).max(0)  # the one non-full child's state, if only one
    out = np.where(nonfull == 1, single, UNKNOWN)
    out = np.where(nonfull == 0, FULL, out)
    return np.where((s == EMPTY).any(0), EMPTY, out).astype(np.int8)

  def _children(self):
    """Children with And-ed bands merged into one SlidingWindow-like band child."""
    bands = [m.band for m in self.masks if m.band is not None]
    rest = [m for m in self.masks if m.band is None]
    if bands:
      rest.append(_Band(max(b[0] for b in bands), min(b[1] for b in bands)))
    return rest

  def count(self, q0, q1, k0, k1, head=0):
    kids = self._children()
    s = np.stack(np.broadcast_arrays(*[m.classify(q0, q1, k0, k1, head) for m in kids]))
    c = np.stack(np.broadcast_arrays(*[m.count(q0, q1, k0, k1, head) for m in kids]))
    nonfull = (s != FULL).sum(0)
    single = np.where(s != FULL, c, 0).sum(0)
    area = np.broadcast_to(_area(q0, q1, k0, k1), nonfull.shape)
    out = np.where(nonfull == 1, single, -1)
    out = np.where(nonfull == 0, area, out)
    return np.where((s == EMPTY).any(0), 0, out)

  @property
  def head_dependent(self):
    return any(m.head_dependent for m in self.masks)

  def for_layer(self, layer):
    return And(tuple(m.for_layer(layer) for m in self.masks))

  def __str__(self):
    return "&".join(f"({m})" if isinstance(m, Or) else str(m) for m in self.masks)


@dataclasses.dataclass(frozen=True)
class Or(Mask):
  """Visible where any child is visible."""
  masks: tuple

  def __post_init__(self):
    if not self.masks:
      raise ValueError("Or needs at least one mask")

  def elementwise(self, q_idx, kv_idx, head=0):
    out = self.masks[0].elementwise(q_idx, kv_idx, head)
    for m in self.masks[1:]:
      out = out | m.elementwise(q_idx, kv_idx, head)
    return out

  def classify(self, q0, q1, k0, k1, head=0):
    s = np.stack(np.broadcast_arrays(*[m.classify(q0, q1, k0, k1, head) for m in self.masks]))
    nonempty = (s != EMPTY).sum(0)
    single = s.max(0)  # the one non-empty child's state, if only one
    out = np.where(nonempty == 1, single, UNKNOWN)
    out = np.where(nonempty == 0, EMPTY, out)
    return np.where((s == FULL).any(0), FULL, out).astype(np.int8)

  def count(self, q0, q1, k0, k1, head=0):
    s = np.stack(np.broadcast_arrays(*[m.classify(q0, q1, k0, k1, head) for m in self.masks]))
    c = np.stack(np.broadcast_arrays(*[m.count(q0, q1, k0, k1, head) for m in self.masks]))
    nonempty = (s != EMPTY).sum(0)
    single = np.where(s != EMPTY, c, 0).sum(0)
    area = np.broadcast_to(_area(q0, q1, k0, k1), nonempty.shape)
    out = np.where(nonempty == 1, single, -1)
    out = np.where(nonempty == 0, 0, out)
    return np.where((s == FULL).any(0), area, out)

  @property
  def head_dependent(self):
    return any(m.head_dependent for m in self.masks)

  def for_layer(self, layer):
    return Or(tuple(m.for_layer(layer) for m in self.masks))

  def __str__(self):
    return "|".join(str(m) for m in self.masks)


@dataclasses.dataclass(frozen=True)
class Not(Mask):
  """Visible where the child is not."""
  mask: Mask

  def elementwise(self, q_idx, kv_idx, head=0):
    return ~self.mask.elementwise(q_idx, kv_idx, head)

  def classify(self, q0, q1, k0, k1, head=0):
    s = self.mask.classify(q0, q1, k0, k1, head)
    return np.where(s == FULL, EMPTY, np.where(s == EMPTY, FULL, s)).astype(np.int8)

  def count(self, q0, q1, k0, k1, head=0):
    c = self.mask.count(q0, q1, k0, k1, head)
    return np.where(c >= 0, _area(q0, q1, k0, k1) - c, -1)

  @property
  def head_dependent(self):
    return self.mask.head_dependent

  def for_layer(self, layer):
    return Not(self.mask.for_layer(layer))

  def __str__(self):
    return f"~({self.mask})" if isinstance(self.mask, (And, Or)) else f"~{self.mask}"


# ---------------------------------------------------------------------------------------------
# primitives


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
class _Band(Mask):
  """lo <= kv - q <= hi (internal: the merged band of an And)."""
  lo: int
  hi: int

  def elementwise(self, q_idx, kv_idx, head=0):
    d = kv_idx - q_idx
    return (d >= self.lo) & (d <= self.hi)

  def classify(self, q0, q1, k0, k1, head=0):
    return _band_classify(self.lo, self.hi, q0, q1, k0, k1)

  def count(self, q0, q1, k0, k1, head=0):
    return _band_count(self.lo, self.hi, q0, q1, k0, k1)


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


@dataclasses.dataclass(frozen=True)
class RandomBlocks(Mask):
  """Query block ``q // block`` sees ``num`` key blocks drawn (with replacement, so up to
  ``num`` distinct) uniformly from ``0 .. q // block`` (causal at block granularity; And with
  Causal for element causality). The draw is a counter-based hash of (seed, layer, head,
  query block, draw index), so numpy and jnp (in-kernel) agree and no table is needed."""
  num: int
  block: int
  seed: int = 0
  layer: int = 0

  def _choice(self, xp, qb_u32, head, r: int):
    salt = _mix_int(_mix_int(_mix_int(self.seed) ^ (self.layer * _GOLD)) ^ (r * 0x85EBCA6B))
    h = _u32(xp, head) * xp.uint32(_GOLD) ^ xp.uint32(salt)
    h = _mix32(xp, _mix32(xp, h) ^ qb_u32)
    return h % (qb_u32 + xp.uint32(1))

  def choices(self, num_q_blocks: int, head: int) -> np.ndarray:
    """int64 [num_q_blocks, num] chosen key blocks (numpy)."""
    qb = np.arange(num_q_blocks, dtype=np.uint32)
    with np.errstate(over="ignore"):
      cols = [self._choice(np, qb, head, r) for r in range(self.num)]
    return np.stack(cols, axis=1).astype(np.int64) if cols else np.zeros((num_q_blocks, 0),
                                                                          np.int64)

  def elementwise(self, q_idx, kv_idx, head=0):
    xp = _xp(q_idx, kv_idx, head)
    q_idx, kv_idx = xp.asarray(q_idx), xp.asarray(kv_idx)
    qb = _u32(xp, q_idx // self.block)
    kb = _u32(xp, kv_idx // self.block)
    out = (q_idx != q_idx) & (kv_idx != kv_idx)
    with np.errstate(over="ignore"):
      for r in range(self.num):
        out = out | (self._choice(xp, qb, head, r) == kb)
    return out

  def classify(self, q0, q1, k0, k1, head=0):
    b = self.block
    q0, q1, k0, k1 = np.broadcast_arrays(*(np.asarray(x, np.int64) for x in (q0, q1, k0, k1)))
    qa, qz = q0 // b, (q1 - 1) // b
    ka, kz = k0 // b, (k1 - 1) // b
    table = self.choices(int(qz.max()) + 1 if qz.size else 1, head)
    # distinct choices per query block (duplicates -> -1) so counts are exact
    srt = np.sort(table, axis=1)
    dup = np.zeros_like(srt, bool)
    dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
    srt = np.where(dup, -1, srt)
    any_ = np.zeros(q0.shape, bool)
    all_ = np.ones(q0.shape, bool)
    for j in range(int((qz - qa).max()) + 1 if qz.size else 0):
      qb = qa + j
      valid = qb <= qz
      ch = srt[np.minimum(qb, qz)]  # [..., num]
      inside = (ch >= ka[..., None]) & (ch <= kz[..., None])
      any_ |= valid & inside.any(-1)
      all_ &= ~valid | (inside.sum(-1) == kz - ka + 1)
    return _states(any_, all_ & any_)

  @property
  def head_dependent(self):
    return True

  def for_layer(self, layer):
    return dataclasses.replace(self, layer=layer)

  def __str__(self):
    return f"randomblocks:{self.num}:{self.block}:seed={self.seed}:layer={self.layer}"


# ---------------------------------------------------------------------------------------------
# named patterns (expanded into primitives)


@dataclasses.dataclass(frozen=True)
class Strided(Mask):
  """Sparse Transformer "strided" pattern (Child et al. 2019, both heads' sets unioned, as in
  OpenAI's ``blocksparse`` reference): causal, and either local or on the stride:
  ``0 <= q - kv < local``  or  ``(q - kv) % stride == 0``.
  (Use ``PerHead((Causal() & SlidingWindow(local-1), Causal() & DiagStride(stride)))`` for the
  factorised two-head version.)"""
  stride: int
  local: int

  def __post_init__(self):
    if self.stride < 1 or self.local < 1:
      raise ValueError(f"Strided needs stride, local >= 1, got {self.stride}, {self.local}")

  def _expand(self):
    return And((Causal(), Or((SlidingWindow(self.local - 1, 0), DiagStride(self.stride)))))

  def __str__(self):
    return f"strided:{self.stride}:{self.local}"


@dataclasses.dataclass(frozen=True)
class Fixed(Mask):
  """Sparse Transformer "fixed" pattern (Child et al. 2019, A(1) ∪ A(2)), causal:
  ``q // block == kv // block`` (same block)  or  ``kv % block >= block - num_summary``
  (the last ``num_summary`` positions of every block are summary cells everyone later sees)."""
  block: int
  num_summary: int

  def __post_init__(self):
    if self.block < 1 or not 0 <= self.num_summary <= self.block:
      raise ValueError(f"Fixed needs block >= 1 and 0 <= num_summary <= block, got "
                       f"{self.block}, {self.num_summary}")

  def _expand(self):
    return And((Causal(), Or((SameBlock(self.block), KeyModTail(self.block, self.num_summary)))))

  def __str__(self):
    return f"fixed:{self.block}:{self.num_summary}"


@dataclasses.dataclass(frozen=True)
class Dilated(Mask):
  """Causal dilated window: ``0 <= q - kv <= window`` and ``(q - kv) % dilation == 0``
  (``window // dilation + 1`` keys in the interior; ``dilation=1`` is ``SlidingWindow(window)``)."""
  window: int
  dilation: int

  def __post_init__(self):
    if self.window < 0 or self.dilation < 1:
      raise ValueError(f"Dilated needs window >= 0, dilation >= 1, got {self.window}, "
                       f"{self.dilation}")

  def _expand(self):
    return And((SlidingWindow(self.window, 0), DiagStride(self.dilation)))

  def __str__(self):
    return f"dilated:{self.window}:{self.dilation}"


@dataclasses.dataclass(frozen=True)
class PrefixLM(Mask):
  """Bidirectional inside the prefix, causal after: ``kv <= q  or  kv < prefix_len``."""
  prefix_len: int

  def _expand(self):
    return Or((Causal(), KeyPrefix(self.prefix_len)))

  def __str__(self):
    return f"prefix:{self.prefix_len}"


@dataclasses.dataclass(frozen=True)
class BigBird(Mask):
  """Causal BigBird: ``kv <= q`` and any of
  * window:  ``q - kv <= window``;
  * global:  ``kv < num_global`` (everyone sees the first ``num_global`` tokens; they in turn see
    all previous tokens, which within causality are themselves global keys);
  * random:  ``num_random_blocks`` key blocks (size ``block``) per query block (size ``block``),
    drawn with replacement from the blocks at or before the query block by a hash of
    (seed, layer, head, query block) — reproducible per layer and head (``RandomBlocks``).
  ``layer`` is bound by ``compile_layout(..., layer=)`` / ``for_layer``."""
  window: int
  num_global: int
  num_random_blocks: int
  block: int
  seed: int = 0
  layer: int = 0

  def __post_init__(self):
    if min(self.window, self.num_global, self.num_random_blocks) < 0 or self.block < 1:
      raise ValueError(f"BigBird needs window, num_global, num_random_blocks >= 0 and "
                       f"block >= 1, got {self}")

  def _expand(self):
    parts = [SlidingWindow(self.window, 0)]
    if self.num_global:
      parts.append(KeyPrefix(self.num_global))
    if self.num_random_blocks:
      parts.append(RandomBlocks(self.num_random_blocks, self.block, self.seed, self.layer))
    return And((Causal(), Or(tuple(parts))))

  def for_layer(self, layer):
    return dataclasses.replace(self, layer=layer)

  def __str__(self):
    s = (f"bigbird:{self.window}:{self.num_global}:{self.num_random_blocks}:{self.block}"
         f":seed={self.seed}")
    return s + (f":layer={self.layer}" if self.layer else "")


# ---------------------------------------------------------------------------------------------
# user-defined and per-head


@dataclasses.dataclass(frozen=True)
class FromFunction(Mask):
  """A user function ``fn(q_idx, kv_idx) -> bool`` or ``fn(q_idx, kv_idx, head) -> bool``,
  jnp-traceable if it is to run in-kernel. Equal when ``fn`` is the same object and names match.
  ``head_dependent`` is inferred from the arity (override with ``takes_head``)."""
  fn: Callable
  name: str = "fn"
  takes_head: bool | None = None

  def __post_init__(self):
    if self.takes_head is None:
      try:
        params = [p for p in inspect.signature(self.fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
        takes = len(params) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)
      except (TypeError, ValueError):
        takes = True
      object.__setattr__(self, "takes_head", takes)

  def elementwise(self, q_idx, kv_idx, head=0):
    out = self.fn(q_idx, kv_idx, head) if self.takes_head else self.fn(q_idx, kv_idx)
    return out & _full_like(_xp(q_idx, kv_idx, out), q_idx, kv_idx)

  @property
  def head_dependent(self):
    return bool(self.takes_head)

  def __str__(self):
    return f"fn:{self.name}"


@dataclasses.dataclass(frozen=True, eq=False)
class FromArray(Mask):
  """An explicit bool table ``[H, T_q, T_kv]`` (or ``[T_q, T_kv]``); head h uses table
  ``h % H``. ``elementwise`` is a table lookup (numpy, or a jnp constant under jax); indices
  outside the table are masked. Equal / hashed by content digest.

  Note: inside a Pallas kernel a captured constant table may be rejected; a kernel should pass
  ``table`` as an input (or use the layout's full/partial blocks plus a dense reference)."""
  table: np.ndarray
  digest: str = ""

  def __post_init__(self):
    t = np.asarray(self.table, bool)
    if t.ndim == 2:
      t = t[None]
    if t.ndim != 3:
      raise ValueError(f"FromArray needs a [H, T_q, T_kv] or [T_q, T_kv] table, got {t.shape}")
    t = np.ascontiguousarray(t)
    t.setflags(write=False)
    object.__setattr__(self, "table", t)
    object.__setattr__(self, "digest", hashlib.sha1(
        repr(t.shape).encode() + np.packbits(t).tobytes()).hexdigest())

  def __eq__(self, other):
    return isinstance(other, FromArray) and other.digest == self.digest

  def __hash__(self):
    return hash(("FromArray", self.digest))

  def elementwise(self, q_idx, kv_idx, head=0):
    xp = _xp(q_idx, kv_idx, head)
    h, tq, tk = self.table.shape
    q_idx, kv_idx = xp.asarray(q_idx), xp.asarray(kv_idx)
    ok = (q_idx >= 0) & (q_idx < tq) & (kv_idx >= 0) & (kv_idx < tk)
    table = jnp.asarray(self.table) if xp is jnp else self.table
    val = table[xp.asarray(head) % h, xp.clip(q_idx, 0, tq - 1), xp.clip(kv_idx, 0, tk - 1)]
    return val & ok

  @property
  def head_dependent(self):
    return self.table.shape[0] > 1

  def __str__(self):
    return f"array:{self.digest[:12]}"


@dataclasses.dataclass(frozen=True)
class PerHead(Mask):
  """Head h uses ``masks[h % len(masks)]`` (in-kernel ``head`` may be traced: a ``where``
  chain selects)."""
  masks: tuple

  def __post_init__(self):
    if not self.masks:
      raise ValueError("PerHead needs at least one mask")
    object.__setattr__(self, "masks", tuple(self.masks))

  def elementwise(self, q_idx, kv_idx, head=0):
    n = len(self.masks)
    if isinstance(head, (int, np.integer)):
      return self.masks[int(head) % n].elementwise(q_idx, kv_idx, head)
    xp = _xp(q_idx, kv_idx, head)
    sel = xp.asarray(head) % n
    out = self.masks[-1].elementwise(q_idx, kv_idx, head)
    for i in range(n - 2, -1, -1):
      out = xp.where(sel == i, self.masks[i].elementwise(q_idx, kv_idx, head), out)
    return out

  def classify(self, q0, q1, k0, k1, head=0):
    return self.masks[int(head) % len(self.masks)].classify(q0, q1, k0, k1, head)

  def count(self, q0, q1, k0, k1, head=0):
    return self.masks[int(head) % len(self.masks)].count(q0, q1, k0, k1, head)

  @property
  def head_dependent(self):
    return len(self.masks) > 1 or self.masks[0].head_dependent

  def for_layer(self, layer):
    return PerHead(tuple(m.for_layer(layer) for m in self.masks))

  def __str__(self):
    return "heads(" + ",".join(str(m) for m in self.masks) + ")"


# ---------------------------------------------------------------------------------------------
# config strings

MASK_FORMS = ("full", "causal", "window:LEFT[:RIGHT]", "strided:STRIDE:LOCAL",
              "fixed:BLOCK:NUM_SUMMARY", "bigbird:WINDOW:GLOBAL:RANDOM:BLOCK[:seed=S][:layer=L]",
              "prefix:LEN", "dilated:WINDOW:DILATION", "heads(M,M,...)",
              "combined with & | ~ and parentheses, e.g. causal&window:1024")

_TERMS = {  # name -> (constructor, number of positional ints (min, max))
    "full": (Full, 0, 0), "causal": (Causal, 0, 0), "window": (SlidingWindow, 1, 2),
    "strided": (Strided, 2, 2), "fixed": (Fixed, 2, 2), "bigbird": (BigBird, 4, 4),
    "prefix": (PrefixLM, 1, 1), "dilated": (Dilated, 2, 2),
}


def _bad(spec: str, why: str) -> ValueError:
  return ValueError(f"bad mask spec {spec!r} ({why}); forms: " + ", ".join(MASK_FORMS))


def parse_mask(spec: str) -> Mask:
  """Parse a config string (see ``MASK_FORMS``); ``&`` binds tighter than ``|``.
  ``str(mask)`` of a parseable mask round-trips."""
  if isinstance(spec, Mask):
    return spec
  if not isinstance(spec, str):
    raise _bad(str(spec), "not a string")
  tokens = re.findall(r"[A-Za-z_][\w]*(?::[\w=\-]+)*|[&|~(),]|\S", spec.replace(" ", ""))
  pos = 0

  def peek():
    return tokens[pos] if pos < len(tokens) else None

  def take():
    nonlocal pos
    pos += 1
    return tokens[pos - 1]

  def expr():
    parts = [conj()]
    while peek() == "|":
      take()
      parts.append(conj())
    return parts[0] if len(parts) == 1 else Or(_flatten(Or, parts))

  def conj():
    parts = [unary()]
    while peek() == "&":
      take()
      parts.append(unary())
    return parts[0] if len(parts) == 1 else And(_flatten(And, parts))

  def unary():
    if peek() == "~":
      take()
      return ~unary()
    tok = take() if peek() is not None else None
    if tok is None:
      raise _bad(spec, "unexpected end")
    if tok == "(":
      m = expr()
      if peek() != ")":
        raise _bad(spec, "missing ')'")
      take()
      return m
    if tok == "heads":
      if peek() != "(":
        raise _bad(spec, "heads needs '('")
      take()
      ms = [expr()]
      while peek() == ",":
        take()
        ms.append(expr())
      if peek() != ")":
        raise _bad(spec, "missing ')'")
      take()
      return PerHead(tuple(ms))
    return term(tok)

  def term(tok):
    name, *args = tok.split(":")
    if name not in _TERMS:
      raise _bad(spec, f"unknown term {name!r}")
    cls, lo, hi = _TERMS[name]
    pos_args, kw = [], {}
    for a in args:
      k, eq, v = a.partition("=")
      try:
        if eq:
          if name != "bigbird" or k not in ("seed", "layer"):
            raise _bad(spec, f"unknown option {k!r} for {name}")
          kw[k] = int(v)
        else:
          if kw:
            raise _bad(spec, "positional value after an option")
          pos_args.append(int(a))
      except ValueError as e:
        if "forms:" in str(e):
          raise
        raise _bad(spec, f"{a!r} is not an integer") from None
    if not lo <= len(pos_args) <= hi:
      raise _bad(spec, f"{name} takes {lo if lo == hi else f'{lo}-{hi}'} integers")
    try:
      return cls(*pos_args, **kw)
    except ValueError as e:
      raise _bad(spec, str(e)) from None

  m = expr()
  if pos != len(tokens):
    raise _bad(spec, f"unexpected {tokens[pos]!r}")
  return m
