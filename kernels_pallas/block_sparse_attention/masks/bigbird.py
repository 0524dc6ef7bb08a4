"""BigBird (causal window + global keys + random key blocks) and its ``RandomBlocks`` primitive.

The random blocks are drawn by a counter-based 32-bit hash (lowbias32) of (seed, layer, head,
query block, draw index) whose wrap-around uint32 arithmetic agrees between numpy (layout
compilation) and jnp (in-kernel), so no table of choices is stored.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kernels_pallas.block_sparse_attention.masks.base import And, Mask, Or
from kernels_pallas.block_sparse_attention.masks.primitives import Causal, KeyPrefix, SlidingWindow
from kernels_pallas.block_sparse_attention.masks.states import _states, _xp


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
