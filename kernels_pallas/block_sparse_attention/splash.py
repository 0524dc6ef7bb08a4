"""TPU bridge: block-sparse attention through JAX's splash attention kernel.

``splash_attention(q, k, v, layout)`` runs ``layout.mask`` with
``jax.experimental.pallas.ops.tpu.splash_attention`` (Pallas TPU / Mosaic). Our mask specs are
converted per head by ``to_splash_mask``:

* masks that are exactly a band ``lo <= kv - q <= hi`` (``causal``, ``window:L[:R]``,
  ``causal&window:W``, ``full``) become splash's *computable* masks (``CausalMask``,
  ``LocalMask``, ``FullMask``): the kernel evaluates them in-kernel from iota indices, nothing
  T×S is stored;
* ``And`` / ``Or`` whose children all convert to computable masks become splash
  ``LogicalAnd`` / ``LogicalOr`` (splash then stores the distinct partial blocks, deduplicated);
* everything else (BigBird, strided, fixed, dilated, prefix, ``~``, per-function / array masks,
  mixed And/Or) becomes a ``NumpyMask`` of the dense evaluation: T×S bools *per distinct head
  mask* held in host memory while the kernel is built. Measured compiling for v5e / v5p: host
  memory ~ (distinct head masks + 16) bytes x T^2, i.e. 1.7 GB and ~50 s at 8k BigBird (12 head
  masks), 5 GB at 16k strided, ~28 / ~17 GB for 32k BigBird / strided; past ~8-16k prefer a
  computable mask (band, And / Or of bands) or the Triton / xla paths.

Splash needs ``T % block_q == 0`` and ``S % block_kv == 0``: other lengths are zero-padded and
the padded keys masked (dense masks include the range check; band masks stay computable when
their band cannot reach a padded key from a real query). Splash leaves the softmax of a row
with no visible key undefined; here such rows (statically known from the mask) are set to 0 to
match ``reference.dense_masked_attention``. Rows emptied only by segment ids are not fixed up.

Built kernels are cached on (mask, shapes, heads, blocks, interpret). GQA (K < H kv heads) uses
``make_splash_mqa`` once per kv head group (H // K q heads share one k/v head).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as _sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as _sm

from kernels_pallas.block_sparse_attention import masks as _m
from kernels_pallas._util import cdiv as _cdiv

_BIG = 1 << 40  # |band limit| beyond this = unbounded (our masks use 1 << 62)
TPU_BLOCK = 128  # splash's NUM_LANES: kv blocks (forward) and q blocks (backward) are multiples


def tpu_blocks(block_q: int, block_kv: int) -> tuple[int, int]:
  """(block_q, block_kv) rounded up to multiples of 128: what splash compiles for a TPU, forward
  and backward (smaller blocks fail with 'bkv_compute=64 must be a multiple of 128', or in the
  backward with Pallas TPU's (8, 128) block-shape rule). The sequence is padded to them."""
  up = lambda b: _cdiv(max(int(b), 1), TPU_BLOCK) * TPU_BLOCK
  return up(block_q), up(block_kv)


def _head_mask(mask: _m.Mask, head: int) -> _m.Mask:
  """The head-independent mask that head ``head`` uses (resolves PerHead)."""
  while isinstance(mask, _m.PerHead):
    mask = mask.masks[head % len(mask.masks)]
  return mask


def _band_to_splash(band, shape, seq_q: int, seq_kv: int):
  """A computable splash mask for ``lo <= kv - q <= hi`` on ``shape`` (padded), or None when
  the band could see a padded key from a real query."""
  lo, hi = band
  tp, sp = shape
  if sp > seq_kv and hi > -_BIG and seq_kv - (seq_q - 1) <= hi:
    return None  # a real query row could see a padded key
  if sp > seq_kv and hi <= -_BIG:
    return None
  left = None if lo <= -_BIG else -lo
  right = None if hi >= _BIG else hi
  if left is None and right is None:
    if sp > seq_kv:
      return None
    return _sm.FullMask(shape)
  if left is None and right == 0:
    return _sm.CausalMask(shape)
  return _sm.LocalMask(shape, window_size=(left, right), offset=0)


def _dense_head(mask: _m.Mask, head: int, shape, seq_q: int, seq_kv: int) -> np.ndarray:
  """bool [Tp, Sp]: ``mask`` evaluated for ``head`` with the range check (padding False)."""
  out = np.zeros(shape, bool)
  q = np.arange(seq_q, dtype=np.int64)[:, None]
  kv = np.arange(seq_kv, dtype=np.int64)[None, :]
  out[:seq_q, :seq_kv] = np.broadcast_to(mask.elementwise(q, kv, head), (seq_q, seq_kv))
  return out


def _convert(mask: _m.Mask, head: int, shape, seq_q: int, seq_kv: int):
  """A computable splash mask (or Logical* of them) for ``mask``, or None."""
  band = mask.band
  if band is not None:
    return _band_to_splash(band, shape, seq_q, seq_kv)
  if isinstance(mask, (_m.And, _m.Or)):
    kids = [_convert(_head_mask(c, head), head, shape, seq_q, seq_kv) for c in mask.masks]
    if any(k is None for k in kids):
      return None
    comb = _sm.LogicalAnd if isinstance(mask, _m.And) else _sm.LogicalOr
    return functools.reduce(comb, kids)
  return None


def to_splash_mask(layout, num_heads: int | None = None, *, padded_shape=None):
  """``MultiHeadMask`` of ``num_heads`` (default ``layout.num_heads``) head masks for
  ``layout.mask``; head h uses layout row ``h % layout.num_heads``. ``padded_shape``
  (default (seq_q, seq_kv)) is the [Tp, Sp] the kernel runs on."""
  t, s = layout.seq_q, layout.seq_kv
  shape = tuple(padded_shape) if padded_shape is not None else (t, s)
  h = layout.num_heads if num_heads is None else int(num_heads)
  mask = layout.mask
  rows, cache = [], {}
  for hh in range(h):
    row = hh % layout.num_heads
    m = _head_mask(mask, row)
    key = (m, row if m.head_dependent else 0)
    if key not in cache:
      sm = _convert(m, row, shape, t, s)
      cache[key] = sm if sm is not None else _sm.NumpyMask(_dense_head(m, row, shape, t, s))
    rows.append(cache[key])
  return _sm.MultiHeadMask(rows)


def _empty_rows(layout, num_heads: int) -> np.ndarray | None:
  """bool [H, T]: q rows with no visible key (None if there are none). Only q blocks without
  a full kv block are examined, and only over their listed (partial) kv blocks."""
  t, bq, bkv = layout.seq_q, layout.block_q, layout.block_kv
  empty = np.zeros((layout.num_heads, t), bool)
  for r in range(layout.num_heads):
    for i in range(layout.num_q_blocks):
      n = int(layout.kv_num_blocks[r, i])
      q0, q1 = i * bq, min((i + 1) * bq, t)
      if n == 0:
        empty[r, q0:q1] = True
        continue
      if np.asarray(layout.kv_full[r, i, :n]).any():
        continue
      ids = np.asarray(layout.kv_indices[r, i, :n]).astype(np.int64)
      q = np.arange(q0, q1, dtype=np.int64)[:, None, None]
      kv = (ids[:, None] * bkv + np.arange(bkv))[None]
      vis = np.broadcast_to(layout.visible(q, kv, r), (q1 - q0,) + kv.shape[1:])
      empty[r, q0:q1] = ~vis.any(axis=(1, 2))
  if not empty.any():
    return None
  return empty[np.arange(num_heads) % layout.num_heads]


def _block_sizes(block_q: int, block_kv: int) -> _sk.BlockSizes:
  return _sk.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                        block_q_dkv=block_q, block_kv_dkv=block_kv,
                        block_kv_dkv_compute=block_kv, block_q_dq=block_q, block_kv_dq=block_kv)


@functools.lru_cache(maxsize=64)
def _kernels(mask, seq_q, seq_kv, block_q, block_kv, layout_heads, num_heads, num_kv_heads,
             interpret, layout_ref):
  """(list of kernels: one MHA, or one MQA per kv head group; padded shape)."""
  layout = layout_ref()
  tp, sp = _cdiv(seq_q, block_q) * block_q, _cdiv(seq_kv, block_kv) * block_kv
  mh = to_splash_mask(layout, num_heads, padded_shape=(tp, sp))
  bs = _block_sizes(block_q, block_kv)
  kw = dict(block_sizes=bs, head_shards=1, q_seq_shards=1, interpret=interpret)
  if num_kv_heads == num_heads:
    return [_sk.make_splash_mha(mh, **kw)], (tp, sp)
  g = num_heads // num_kv_heads
  built, out = {}, []
  for j in range(num_kv_heads):
    group = tuple(mh.masks[j * g:(j + 1) * g])
    key = tuple(id(x) for x in group)  # rows are shared objects (to_splash_mask's cache)
    if key not in built:
      built[key] = _sk.make_splash_mqa(_sm.MultiHeadMask(list(group)), **kw)
    out.append(built[key])
  return out, (tp, sp)


class _Ref:
  """Hashable-by-mask holder so the lru_cache key does not keep layouts apart needlessly."""

  def __init__(self, layout):
    self.layout = layout

  def __call__(self):
    return self.layout

  def __eq__(self, other):
    return isinstance(other, _Ref)

  def __hash__(self):
    return 0


def splash_attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, layout,
                     *, segment_ids_q: jax.Array | None = None,
                     segment_ids_kv: jax.Array | None = None, segment_ids: jax.Array | None = None,
                     scale: float | None = None, block_q: int | None = None,
                     block_kv: int | None = None, interpret: bool = False) -> jax.Array:
  """Block-sparse attention of ``layout.mask`` via splash attention; out [B, T, H, D].

  q [B, T, H, D], k/v [B, S, K, D] (H % K == 0; q head h reads kv head h // (H // K)).
  ``segment_ids`` (int [B, T], self-attention) or ``segment_ids_q`` / ``segment_ids_kv`` use
  splash ``SegmentIds``. Block sizes default to the layout's (on TPU they should be multiples
  of 128). ``interpret=True`` runs the Pallas kernels in interpret mode (CPU tests)."""
  q, k, v = q_BxTxHxD, k_BxSxKxD, v_BxSxKxD
  b, t, h, d = q.shape
  s, kvh = k.shape[1], k.shape[2]
  if h % kvh:
    raise ValueError(f"num q heads {h} must be a multiple of num kv heads {kvh}")
  if (layout.seq_q, layout.seq_kv) != (t, s):
    raise ValueError(f"layout is for ({layout.seq_q}, {layout.seq_kv}); q/k have ({t}, {s})")
  bq = int(block_q or layout.block_q)
  bkv = int(block_kv or layout.block_kv)
  if segment_ids is not None:
    segment_ids_q = segment_ids if segment_ids_q is None else segment_ids_q
    segment_ids_kv = segment_ids if segment_ids_kv is None else segment_ids_kv
  if (segment_ids_q is None) != (segment_ids_kv is None):
    if t != s:
      raise ValueError("give both segment_ids_q and segment_ids_kv when T != S")
    segment_ids_q = segment_ids_kv = (segment_ids_q if segment_ids_q is not None
                                      else segment_ids_kv)

  mask = layout.mask
  kernels, (tp, sp) = _kernels(mask, t, s, bq, bkv, layout.num_heads, h, kvh, bool(interpret),
                               _Ref(layout))
  scale = float(d ** -0.5 if scale is None else scale)
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  # splash does not scale the logits: fold the scale into q. [B,T,H,D] -> [B,H,Tp,D]
  qh = jnp.pad((q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3),
               [(0, 0), (0, 0), (0, tp - t), (0, 0)])
  kh = jnp.pad(k.transpose(0, 2, 1, 3), [(0, 0), (0, 0), (0, sp - s), (0, 0)])
  vh = jnp.pad(v.transpose(0, 2, 1, 3), [(0, 0), (0, 0), (0, sp - s), (0, 0)])
  seg = None
  if segment_ids_q is not None:
    # padded keys get an id no real query has (they are masked anyway, except band masks that
    # cannot reach them); padded queries are discarded.
    sq = jnp.pad(segment_ids_q.astype(jnp.int32), [(0, 0), (0, tp - t)])
    skv = jnp.pad(segment_ids_kv.astype(jnp.int32), [(0, 0), (0, sp - s)],
                  constant_values=jnp.iinfo(jnp.int32).min)
    seg = _sk.SegmentIds(q=sq, kv=skv)

  def one(qb, kb, vb, segb):
    if len(kernels) == 1 and kvh == h:
      return kernels[0](qb, kb, vb, segb) if segb is not None else kernels[0](qb, kb, vb)
    g = h // kvh
    outs = []
    for j, kern in enumerate(kernels):
      args = (qb[j * g:(j + 1) * g], kb[j], vb[j])
      outs.append(kern(*args, segb) if segb is not None else kern(*args))
    return jnp.concatenate(outs, axis=0)

  if seg is None:
    out = jax.vmap(lambda a, b_, c: one(a, b_, c, None))(qh, kh, vh)
  else:
    out = jax.vmap(one)(qh, kh, vh, seg)
  out = out[:, :, :t].transpose(0, 2, 1, 3)                         # [B, T, H, D]
  empty = _empty_rows(layout, h)
  if empty is not None:
    out = jnp.where(jnp.asarray(empty.T)[None, :, :, None], 0, out)
  return out.astype(q.dtype)
