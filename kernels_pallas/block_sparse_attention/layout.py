"""Compile a static ``Mask`` into a FlexAttention-style block layout, without materialising T×T.

For every (head, q block) the layout lists the kv blocks that have at least one visible element
(ascending), and flags the *full* ones (every element visible and inside the sequence: the
kernel skips the element mask there). Partial blocks evaluate ``layout.mask.elementwise`` (and
the range check ``q < seq_q``, ``kv < seq_kv``; see ``BlockLayout.visible``) in-kernel.
Transposed lists (per kv block, the q blocks that see it) serve the dK/dV backward pass.

Positions past ``seq_q`` / ``seq_kv`` in the last (short) block are out of range and count as
masked, so a block that reaches past the end is never full. A q block with no visible key has
``kv_num_blocks == 0`` (the kernel writes zeros there).

Compilation walks the [nQ, nKV] block grid in row chunks: the mask's analytic ``classify``
decides empty / full / partial where it can (bands, prefixes, strides, BigBird blocks and And/Or
of them), and only blocks it calls partial or unknown are evaluated element-wise, one q block
row at a time (memory O(block_q · T_kv)). Results are cached on (mask, shapes).

Segment masks for packed sequences are dynamic and not part of the layout (``SAME_SEGMENT_NOTE``).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from kernels_pallas.block_sparse_attention.masks import (EMPTY, FULL, PARTIAL, UNKNOWN, FromArray,
                                                         Mask, parse_mask)

_ELEMENTS_PER_CHUNK = 1 << 22
_CELLS_PER_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True, eq=False)
class BlockLayout:
  """Block-sparse layout. Arrays are read-only numpy (shared through the compile cache).

  kv_num_blocks int32 [H, nQ]          kv blocks visited by each q block (partial + full)
  kv_indices    int32 [H, nQ, maxKV]   their ids, ascending; padded by repeating the last valid
                                       id (0 if none)
  kv_full       bool  [H, nQ, maxKV]   block entirely visible (no element mask); False on padding
  q_num_blocks / q_indices / q_full    the same transposed: per kv block, the q blocks that
                                       visit it ([H, nKV], [H, nKV, maxQ], [H, nKV, maxQ])
  density        visible elements / (H · seq_q · seq_kv)
  block_density  visited blocks / (H · nQ · nKV)
  H = num_heads; head h of attention uses row ``h`` (``h % num_heads``; 1 = broadcast).
  """
  seq_q: int
  seq_kv: int
  block_q: int
  block_kv: int
  num_heads: int
  kv_num_blocks: np.ndarray
  kv_indices: np.ndarray
  kv_full: np.ndarray
  q_num_blocks: np.ndarray
  q_indices: np.ndarray
  q_full: np.ndarray
  density: float
  mask: Mask
  block_density: float = float("nan")

  @property
  def num_q_blocks(self) -> int:
    return -(-self.seq_q // self.block_q)

  @property
  def num_kv_blocks(self) -> int:
    return -(-self.seq_kv // self.block_kv)

  def visible(self, q_idx, kv_idx, head=0):
    """The element mask of partial blocks: ``mask.elementwise`` and both indices in range
    (numpy or jnp, like ``Mask.elementwise``)."""
    return (self.mask.elementwise(q_idx, kv_idx, head) & (q_idx < self.seq_q)
            & (kv_idx < self.seq_kv))

  def __repr__(self):
    return (f"BlockLayout(mask={self.mask}, seq=({self.seq_q}, {self.seq_kv}), "
            f"block=({self.block_q}, {self.block_kv}), heads={self.num_heads}, "
            f"maxKV={self.kv_indices.shape[-1]}, density={self.density:.4f}, "
            f"block_density={self.block_density:.4f})")


def _ranges(seq: int, block: int):
  n = -(-seq // block)
  lo = np.arange(n, dtype=np.int64) * block
  return lo, np.minimum(lo + block, seq), lo + block <= seq


def _count_row(mask: Mask, head: int, q0: int, q1: int, k0: np.ndarray, k1: np.ndarray,
               block_kv: int) -> np.ndarray:
  """Visible-element counts of blocks [q0, q1) x [k0[i], k1[i]) by element evaluation."""
  q = np.arange(q0, q1, dtype=np.int64)[:, None, None]
  off = np.arange(block_kv, dtype=np.int64)
  step = max(1, _ELEMENTS_PER_CHUNK // ((q1 - q0) * block_kv))
  out = np.empty(len(k0), np.int64)
  for s in range(0, len(k0), step):
    kv = k0[s:s + step, None] + off  # [u, bkv]
    valid = kv < k1[s:s + step, None]
    kv = np.minimum(kv, k1[s:s + step, None] - 1)[None]
    vis = np.broadcast_to(mask.elementwise(q, kv, head), (q1 - q0,) + kv.shape[1:])
    out[s:s + step] = (vis & valid[None]).sum(axis=(0, 2))
  return out


def _compile_head(mask: Mask, seq_q: int, seq_kv: int, block_q: int, block_kv: int,
                  head: int) -> tuple[np.ndarray, int]:
  """Final states (EMPTY / PARTIAL / FULL) [nQ, nKV] and the number of visible elements."""
  q0, q1, q_in = _ranges(seq_q, block_q)
  k0, k1, k_in = _ranges(seq_kv, block_kv)
  n_q, n_kv = len(q0), len(k0)
  states = np.empty((n_q, n_kv), np.int8)
  total = 0
  rows = max(1, _CELLS_PER_CHUNK // n_kv)
  for r0 in range(0, n_q, rows):
    sl = slice(r0, min(r0 + rows, n_q))
    st = np.broadcast_to(mask.classify(q0[sl, None], q1[sl, None], k0[None], k1[None], head),
                         (sl.stop - sl.start, n_kv)).astype(np.int8)
    area = (q1 - q0)[sl, None] * (k1 - k0)[None]
    in_range = q_in[sl, None] & k_in[None]
    pattern_full = st == FULL
    total += int(area[pattern_full].sum())
    st[pattern_full & ~in_range] = PARTIAL  # visible, but the block reaches past the end
    need = (st == UNKNOWN) | ((st == PARTIAL) & ~pattern_full)
    ri, ci = np.nonzero((st == PARTIAL) & ~pattern_full)
    if len(ri):  # analytic counts of partial blocks where the mask knows them
      gi = sl.start + ri
      cnt = mask.count(q0[gi], q1[gi], k0[ci], k1[ci], head)
      known = cnt >= 0
      total += int(cnt[known].sum())
      need[ri[known], ci[known]] = False
      full = (cnt == area[ri, ci]) & in_range[ri, ci]
      st[ri[known], ci[known]] = np.where(cnt == 0, EMPTY, np.where(full, FULL, PARTIAL))[known]
    for i in np.flatnonzero(need.any(1)):
      cols = np.flatnonzero(need[i])
      qi = sl.start + i
      cnt = _count_row(mask, head, int(q0[qi]), int(q1[qi]), k0[cols], k1[cols], block_kv)
      total += int(cnt.sum())
      full = (cnt == area[i, cols]) & in_range[i, cols]
      st[i, cols] = np.where(cnt == 0, EMPTY, np.where(full, FULL, PARTIAL))
    states[sl] = st
  return states, total


def _block_lists(visited: np.ndarray, full: np.ndarray):
  """(num [H, R], indices [H, R, M], full flags [H, R, M]) from [H, R, C] grids."""
  num = visited.sum(-1).astype(np.int32)
  m = max(1, int(num.max()) if num.size else 1)
  order = np.argsort(~visited, axis=-1, kind="stable")[..., :m]
  valid = np.arange(m) < num[..., None]
  last = np.take_along_axis(order, np.maximum(num - 1, 0)[..., None].astype(np.int64), -1)
  last = np.where(num[..., None] > 0, last, 0)
  idx = np.where(valid, order, last).astype(np.int32)
  flags = np.take_along_axis(full, idx.astype(np.int64), -1) & valid
  return num, idx, flags


def _readonly(*arrays):
  for a in arrays:
    a.setflags(write=False)
  return arrays


@functools.lru_cache(maxsize=64)
def _compile_cached(mask: Mask, seq_q: int, seq_kv: int, block_q: int, block_kv: int,
                    num_heads: int) -> BlockLayout:
  heads = range(num_heads) if mask.head_dependent else range(1)
  per_head = [_compile_head(mask, seq_q, seq_kv, block_q, block_kv, h) for h in heads]
  states = np.stack([s for s, _ in per_head])
  total = sum(t for _, t in per_head)
  if len(per_head) < num_heads:  # head-independent: one compile, tiled
    states = np.repeat(states, num_heads, axis=0)
    total *= num_heads
  visited, full = states != EMPTY, states == FULL
  kv = _block_lists(visited, full)
  qt = _block_lists(visited.transpose(0, 2, 1), full.transpose(0, 2, 1))
  _readonly(*kv, *qt)
  return BlockLayout(
      seq_q=seq_q, seq_kv=seq_kv, block_q=block_q, block_kv=block_kv, num_heads=num_heads,
      kv_num_blocks=kv[0], kv_indices=kv[1], kv_full=kv[2],
      q_num_blocks=qt[0], q_indices=qt[1], q_full=qt[2],
      density=total / (num_heads * seq_q * seq_kv), mask=mask,
      block_density=float(visited.mean()))


def compile_layout(mask: Mask | str, seq_q: int, seq_kv: int, block_q: int, block_kv: int,
                   num_heads: int = 1, layer: int | None = None) -> BlockLayout:
  """The block layout of ``mask`` (a ``Mask`` or a ``parse_mask`` string) bound to ``layer``
  (seeded masks such as BigBird draw per layer and head; ``None`` keeps the mask's own layer,
  which defaults to 0). ``num_heads`` rows are produced; a
  head-independent mask is compiled once and repeated. Cached on all arguments."""
  mask = parse_mask(mask) if isinstance(mask, str) else mask
  if not isinstance(mask, Mask):
    raise TypeError(f"compile_layout needs a Mask or a mask string, got {type(mask).__name__}")
  for name, v in (("seq_q", seq_q), ("seq_kv", seq_kv), ("block_q", block_q),
                  ("block_kv", block_kv), ("num_heads", num_heads)):
    if not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"compile_layout: {name} must be a positive integer, got {v!r}")
  if layer is not None:
    mask = mask.for_layer(int(layer))
  return _compile_cached(mask, int(seq_q), int(seq_kv), int(block_q),
                         int(block_kv), int(num_heads))


def dense_mask(mask: Mask | str, seq_q: int, seq_kv: int, num_heads: int = 1,
               layer: int | None = None) -> np.ndarray:
  """The mask evaluated directly, bool [H, seq_q, seq_kv] (materialises; tests / references);
  ``layer`` as in ``compile_layout``."""
  mask = parse_mask(mask) if isinstance(mask, str) else mask
  mask = mask if layer is None else mask.for_layer(layer)
  q = np.arange(seq_q, dtype=np.int64)[:, None]
  kv = np.arange(seq_kv, dtype=np.int64)[None, :]
  return np.stack([np.broadcast_to(mask.elementwise(q, kv, h), (seq_q, seq_kv))
                   for h in range(num_heads)]).astype(bool)


def to_dense(layout: BlockLayout) -> np.ndarray:
  """bool [H, seq_q, seq_kv] as the kernel sees it: listed full blocks all True, listed partial
  blocks evaluated with ``layout.visible``, unlisted blocks False (materialises; tests only)."""
  bq, bk = layout.block_q, layout.block_kv
  n_q, n_kv = layout.num_q_blocks, layout.num_kv_blocks
  out = np.zeros((layout.num_heads, n_q * bq, n_kv * bk), bool)
  off_k = np.arange(bk)
  for h in range(layout.num_heads):
    for i in range(n_q):
      n = int(layout.kv_num_blocks[h, i])
      ids, full = layout.kv_indices[h, i, :n], layout.kv_full[h, i, :n]
      rows = slice(i * bq, (i + 1) * bq)
      for j in ids[full]:
        out[h, rows, j * bk:(j + 1) * bk] = True
      part = ids[~full]
      if len(part):
        q = np.arange(i * bq, (i + 1) * bq)[:, None, None]
        kv = (part[:, None].astype(np.int64) * bk + off_k)[None]
        vis = np.broadcast_to(layout.visible(q, kv, h), (bq,) + kv.shape[1:])
        out[h, rows].reshape(bq, n_kv, bk)[:, part] = vis  # a view: writes into out
  return out[:, :layout.seq_q, :layout.seq_kv]


def layout_from_dense_mask(mask_HxTxT, block_q: int, block_kv: int) -> BlockLayout:
  """A layout from an explicit bool mask [H, T_q, T_kv] (or [T_q, T_kv]); its ``mask`` is a
  ``FromArray`` whose ``elementwise`` is a table lookup (numpy, or a jnp constant under jax)."""
  m = FromArray(np.asarray(mask_HxTxT, bool))
  h, tq, tk = m.table.shape
  return compile_layout(m, tq, tk, block_q, block_kv, num_heads=h)
