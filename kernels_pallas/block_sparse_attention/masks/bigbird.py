"""BigBird (causal window + global keys + random key blocks) and its ``RandomBlocks`` primitive.

The random blocks of a query block are drawn without replacement (Floyd's algorithm) from the
causal key blocks that neither the window nor the global keys touch, fed by a counter-based
32-bit hash (lowbias32) of (seed, layer, head, query block, draw index) whose wrap-around uint32
arithmetic agrees between numpy (layout compilation) and jnp (in-kernel), so no table of choices
is stored.
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
  """Query block ``qb = q // block`` sees ``min(num, n)`` distinct key blocks drawn uniformly
  WITHOUT replacement from the ``n`` eligible key blocks ``skip_first <= kb <= qb - skip_recent``
  (causal at block granularity; And with Causal for element causality). With fewer eligible
  blocks than ``num`` (early query blocks) it sees all ``n`` of them.

  ``skip_first`` / ``skip_recent`` leave out blocks another part of the mask already covers:
  BigBird passes its global blocks (``ceil(num_global / block)``) and its window blocks
  (``ceil(window / block) + 1``, the query's own block included), so no draw is spent on a block
  the kernel visits anyway. The draw is Floyd's sampling over the eligible range, fed by a
  counter-based hash of (seed, layer, head, query block, draw index): numpy (layout) and jnp
  (in-kernel) agree and no table is stored."""
  num: int
  block: int
  seed: int = 0
  layer: int = 0
  skip_first: int = 0
  skip_recent: int = 0

  def __post_init__(self):
    if self.num < 0 or self.block < 1 or self.skip_first < 0 or self.skip_recent < 0:
      raise ValueError(f"RandomBlocks needs num, skip_first, skip_recent >= 0 and block >= 1, "
                       f"got {self}")

  def _hash(self, xp, qb_u32, head, r: int):
    salt = _mix_int(_mix_int(_mix_int(self.seed) ^ (self.layer * _GOLD)) ^ (r * 0x85EBCA6B))
    h = _u32(xp, head) * xp.uint32(_GOLD) ^ xp.uint32(salt)
    return _mix32(xp, _mix32(xp, h) ^ qb_u32)

  def _draws(self, xp, qb_u32, head):
    """[(key block uint32, valid bool)] * num for query blocks ``qb_u32`` (broadcasting).

    Floyd's algorithm over the n eligible blocks (offsets t in [0, n)): draw i takes
    t = hash_i % (j + 1) with j = n - num + i, or j itself when t was drawn before; every
    ``num``-subset is equally likely and the draws are distinct. When n <= num, draw i is
    offset i, valid only for i < n (all eligible blocks)."""
    lo = self.skip_first + self.skip_recent  # n = max(0, qb + 1 - lo)
    qb1 = qb_u32 + xp.uint32(1)
    n = xp.maximum(qb1, xp.uint32(lo)) - xp.uint32(lo)
    top = xp.maximum(n, xp.uint32(self.num)) - xp.uint32(self.num)  # n - num, clipped at 0
    many = n > xp.uint32(self.num)
    picks, out = [], []
    for i in range(self.num):
      j = top + xp.uint32(i)
      t = self._hash(xp, qb_u32, head, i) % (j + xp.uint32(1))
      seen = t != t
      for p in picks:
        seen = seen | (t == p)
      t = xp.where(many, xp.where(seen, j, t), xp.uint32(i))
      picks.append(t)
      out.append((t + xp.uint32(self.skip_first), n > xp.uint32(i)))
    return out

  def choices(self, num_q_blocks: int, head: int) -> np.ndarray:
    """int64 [num_q_blocks, num] drawn key blocks (numpy), -1 where a query block has fewer
    than ``num`` eligible blocks."""
    qb = np.arange(num_q_blocks, dtype=np.uint32)
    with np.errstate(over="ignore"):
      cols = [np.where(ok, kb.astype(np.int64), -1) for kb, ok in self._draws(np, qb, head)]
    return np.stack(cols, axis=1) if cols else np.zeros((num_q_blocks, 0), np.int64)

  def elementwise(self, q_idx, kv_idx, head=0):
    xp = _xp(q_idx, kv_idx, head)
    q_idx, kv_idx = xp.asarray(q_idx), xp.asarray(kv_idx)
    qb = _u32(xp, q_idx // self.block)
    kb = _u32(xp, kv_idx // self.block)
    out = (q_idx != q_idx) & (kv_idx != kv_idx)
    with np.errstate(over="ignore"):
      for pick, ok in self._draws(xp, qb, head):
        out = out | (ok & (pick == kb))
    return out

  def classify(self, q0, q1, k0, k1, head=0):
    b = self.block
    q0, q1, k0, k1 = np.broadcast_arrays(*(np.asarray(x, np.int64) for x in (q0, q1, k0, k1)))
    qa, qz = q0 // b, (q1 - 1) // b
    ka, kz = k0 // b, (k1 - 1) // b
    table = self.choices(int(qz.max()) + 1 if qz.size else 1, head)  # distinct, -1 = none
    any_ = np.zeros(q0.shape, bool)
    all_ = np.ones(q0.shape, bool)
    for j in range(int((qz - qa).max()) + 1 if qz.size else 0):
      qb = qa + j
      valid = qb <= qz
      ch = table[np.minimum(qb, qz)]  # [..., num]
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
    skips = (f":skip_first={self.skip_first}" if self.skip_first else "") + (
        f":skip_recent={self.skip_recent}" if self.skip_recent else "")
    return f"randomblocks:{self.num}:{self.block}:seed={self.seed}:layer={self.layer}" + skips


@dataclasses.dataclass(frozen=True)
class BigBird(Mask):
  """Causal BigBird: ``kv <= q`` and any of
  * window:  ``q - kv <= window``;
  * global:  ``kv < num_global`` (everyone sees the first ``num_global`` tokens; they in turn see
    all previous tokens, which within causality are themselves global keys);
  * random:  ``num_random_blocks`` distinct key blocks (size ``block``) per query block (size
    ``block``), drawn without replacement from the causal key blocks that the window and the
    global keys do not touch — blocks ``ceil(num_global / block) <= kb < qb - ceil(window /
    block)`` for query block ``qb`` (a block only partly inside the window or the global prefix
    counts as touched). When fewer blocks than ``num_random_blocks`` are eligible (early query
    blocks) the query block gets all of them. A hash of (seed, layer, head, query block, draw)
    makes the draw reproducible per layer and head (``RandomBlocks``).
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
      parts.append(RandomBlocks(self.num_random_blocks, self.block, self.seed, self.layer,
                                skip_first=-(-self.num_global // self.block),
                                skip_recent=-(-self.window // self.block) + 1))
    return And((Causal(), Or(tuple(parts))))

  def for_layer(self, layer):
    return dataclasses.replace(self, layer=layer)

  def __str__(self):
    s = (f"bigbird:{self.window}:{self.num_global}:{self.num_random_blocks}:{self.block}"
         f":seed={self.seed}")
    return s + (f":layer={self.layer}" if self.layer else "")
