"""The ``Mask`` base class and its combinators ``And`` / ``Or`` / ``Not``.

``Mask`` defines the interface (``elementwise``, ``classify``, ``count``, ``block_class``,
``head_dependent``, ``for_layer``, ``band``) and the ``&`` / ``|`` / ``~`` operators. ``And`` /
``Or`` / ``Not`` combine their children's analytic states and counts where decidable; ``And``
merges its band children into one internal ``_Band`` so intersected bands stay exact.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kernels_pallas.block_sparse_attention.masks.states import (EMPTY, FULL, UNKNOWN, _area,
                                                                _band_classify, _band_count, _shape)


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
