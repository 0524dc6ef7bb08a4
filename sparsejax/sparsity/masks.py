"""Pure mask algebra for weight sparsity: N:M masks and their straight-through estimator, exact
top-k selection, block tiling, the GMP and drop-fraction schedules, per-layer densities and
random masks. Dynamic sparse training updates (RigL / SET / sparse momentum) are in dst.py.

Conventions: masks are ``bool`` arrays of the weight's shape; every selection is deterministic
(ties go to the lower flat index, i.e. a stable sort); counts and steps may be traced jnp
scalars (everything here is jit-compatible) while shapes, ``n``, ``m``, ``axis`` and blocks are
static Python values. A weight of rank >= 2 has a contraction axis ``axis``; its "other" axis
(block columns) is the last axis, or the one before it when ``axis`` is the last.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_PAIRWISE_MAX_M = 16   # N:M ranks by pairwise comparison up to this m, by sorting above it


def _descending(x):
  """A key whose ascending order is ``x``'s descending order, exactly (no overflow)."""
  if jnp.issubdtype(x.dtype, jnp.floating):
    return -x
  return ~x                                # ints (signed or not) and bools: order-reversing


def select(score, k, eligible=None):
  """``bool`` mask (score's shape) of the ``min(k, #eligible)`` eligible entries with the largest
  ``score``, ties to the lower flat index; ``eligible`` None means all. ``k`` may be traced."""
  flat = jnp.ravel(score)
  iota = lax.iota(jnp.int32, flat.size)
  if eligible is None:
    _, perm = lax.sort((_descending(flat), iota), num_keys=1, is_stable=True)
  elif jnp.issubdtype(flat.dtype, jnp.floating):   # one key: NaN sorts after every number
    ok = jnp.ravel(eligible)                       # (+-inf included), ~2x faster than two
    key = jnp.where(ok, -flat, jnp.nan)
    _, perm = lax.sort((key, iota), num_keys=1, is_stable=True)
  else:
    ok = jnp.ravel(eligible)
    _, _, perm = lax.sort((~ok, _descending(flat), iota), num_keys=2, is_stable=True)
  ranks = jnp.zeros(flat.size, jnp.int32).at[perm].set(iota, unique_indices=True)
  chosen = ranks < k
  if eligible is not None:
    chosen &= ok
  return chosen.reshape(jnp.shape(score))


def topk_mask(score, k):
  """Exactly ``k`` True (0 <= k <= size, may be traced) at the largest ``score`` entries, ties
  to the lower flat index."""
  return select(score, k)


def magnitude_mask(w, nnz):
  """Keep the ``nnz`` largest |w| (GMP / one-shot pruning to an exact count)."""
  return topk_mask(jnp.abs(w), nnz)


def _norm_axis(shape, axis: int) -> int:
  if len(shape) < 2:
    raise ValueError(f"sparsity masks need a weight of rank >= 2, got shape {tuple(shape)}")
  if not -len(shape) <= axis < len(shape):
    raise ValueError(f"axis {axis} is out of range for a weight of shape {tuple(shape)}")
  return axis % len(shape)


def _groups(w, m: int, axis: int):
  """|w| with ``axis`` moved last and split into groups of ``m``: (..., size / m, m)."""
  axis = _norm_axis(w.shape, axis)
  if m < 1 or w.shape[axis] % m:
    raise ValueError(f"N:M groups: axis {axis} has size {w.shape[axis]}, not a multiple of "
                     f"m={m}")
  a = jnp.moveaxis(jnp.abs(w), axis, -1)
  return a.reshape(*a.shape[:-1], a.shape[-1] // m, m), axis


def _group_ranks(a):
  """Rank of each entry within its group (last dim) by descending value, ties to the lower
  index: 0 = largest."""
  m = a.shape[-1]
  if m <= _PAIRWISE_MAX_M:
    ai, aj = a[..., :, None], a[..., None, :]                      # [.., i, j]
    lower = np.arange(m)[:, None] < np.arange(m)[None, :]          # i before j
    beats = (ai > aj) | ((ai == aj) & lower)
    return jnp.sum(beats, axis=-2, dtype=jnp.int32)
  iota = lax.broadcasted_iota(jnp.int32, a.shape, a.ndim - 1)
  _, perm = lax.sort((-a, iota), dimension=a.ndim - 1, num_keys=1, is_stable=True)
  _, ranks = lax.sort((perm, iota), dimension=a.ndim - 1, num_keys=1, is_stable=True)
  return ranks


def nm_mask(w, n: int, m: int, axis: int):
  """In every group of ``m`` consecutive entries along ``axis`` keep the ``n`` largest |w|
  (ties to the lower index). ValueError when the axis size is not a multiple of ``m``."""
  if not 0 <= n <= m:
    raise ValueError(f"N:M needs 0 <= n <= m, got n={n}, m={m}")
  a, axis = _groups(w, m, axis)
  keep = _group_ranks(a) < n
  keep = keep.reshape(*keep.shape[:-2], -1)
  return jnp.moveaxis(keep, -1, axis)


def nm_satisfied(w, n: int, m: int, axis: int):
  """True when every group of ``m`` along ``axis`` has at most ``n`` non-zeros (a pruned
  checkpoint's check); a traced bool."""
  a, _ = _groups(w, m, axis)
  return jnp.all(jnp.sum(a != 0, axis=-1) <= n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def nm_ste(w, n: int, m: int, axis: int, lam: float):
  """``w * nm_mask(w)``, the mask recomputed from ``w``. Backward (SR-STE, Zhou et al. 2021):
  the cotangent passes straight to every entry of ``w`` plus ``lam * w`` on the pruned ones;
  ``lam = 0`` is the plain straight-through estimator, exactly."""
  return jnp.where(nm_mask(w, n, m, axis), w, jnp.zeros_like(w))


def _nm_ste_fwd(w, n, m, axis, lam):
  mask = nm_mask(w, n, m, axis)
  return jnp.where(mask, w, jnp.zeros_like(w)), (w, mask)


def _nm_ste_bwd(n, m, axis, lam, res, g):
  w, mask = res
  if lam == 0:
    return (g,)
  decay = (jnp.asarray(lam, w.dtype) * w).astype(g.dtype)
  return (jnp.where(mask, g, g + decay),)


nm_ste.defvjp(_nm_ste_fwd, _nm_ste_bwd)


def parse_block(text: str) -> tuple[int, int]:
  """``"16x16"`` -> (16, 16); ValueError unless two positive integers joined by ``x``."""
  parts = text.lower().split("x")
  if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
    raise ValueError(f"block {text!r} is not 'RxC' with positive integers R, C (e.g. '16x16')")
  return int(parts[0]), int(parts[1])


def other_axis(ndim: int, axis: int) -> int:
  """The block-column axis: the last axis, or ndim - 2 when ``axis`` is the last."""
  return ndim - 1 if axis != ndim - 1 else ndim - 2


def _block_sizes(shape, block, axis: int) -> tuple[int, ...]:
  axis = _norm_axis(shape, axis)
  r, c = block
  sizes = [1] * len(shape)
  sizes[axis], sizes[other_axis(len(shape), axis)] = r, c
  for d, (s, b) in enumerate(zip(shape, sizes)):
    if b < 1 or s % b:
      raise ValueError(f"block {r}x{c}: axis {d} has size {s}, not a multiple of {b} "
                       f"(rows along axis {axis}, columns along axis "
                       f"{other_axis(len(shape), axis)})")
  return tuple(sizes)


def block_scores(w, block: tuple[int, int], axis: int):
  """Sum of |w| over each r x c block (r along ``axis``, c along the other axis); shape = w's
  with those two axes divided by r and c. Block (1, 1) gives |w|."""
  sizes = _block_sizes(w.shape, block, axis)
  a = jnp.abs(w)
  if all(b == 1 for b in sizes):
    return a
  split = [v for s, b in zip(w.shape, sizes) for v in (s // b, b)]
  return jnp.sum(a.reshape(split), axis=tuple(range(1, 2 * w.ndim, 2)))


def expand_blocks(block_mask, block: tuple[int, int], axis: int, shape):
  """A block-level mask (``block_scores``' shape) repeated to the weight's ``shape``."""
  sizes = _block_sizes(tuple(shape), block, axis)
  out = block_mask
  for d, b in enumerate(sizes):
    if b > 1:
      out = jnp.repeat(out, b, axis=d, total_repeat_length=shape[d])
  return out


def reduce_blocks(mask, block: tuple[int, int], axis: int):
  """A weight-shaped mask to block level: a block is on when any of its entries is (the
  inverse of ``expand_blocks`` on block-constant masks)."""
  sizes = _block_sizes(mask.shape, block, axis)
  split = [v for s, b in zip(mask.shape, sizes) for v in (s // b, b)]
  return jnp.any(mask.reshape(split), axis=tuple(range(1, 2 * mask.ndim, 2)))


def _is_python_scalar(x) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating))


def gmp_sparsity(step, s_f, t0: int, t1: int, every: int):
  """Zhu & Gupta (2017) cubic schedule: 0 before ``t0``; ``s_f * (1 - (1 - (tq - t0) / (t1 -
  t0))**3)`` with ``tq = t0 + floor((step - t0) / every) * every`` (held between updates);
  ``s_f`` at and after ``t1`` (from ``t0`` on when ``t1 <= t0``). A Python float for a Python
  ``step``, a float32 jnp scalar otherwise (traced steps welcome)."""
  if every < 1:
    raise ValueError(f"gmp_sparsity: every must be >= 1, got {every}")
  if _is_python_scalar(step) and _is_python_scalar(s_f):
    if step < t0:
      return 0.0
    if step >= t1:
      return float(s_f)
    tq = t0 + (int(step) - t0) // every * every
    return float(s_f) * (1.0 - (1.0 - (tq - t0) / (t1 - t0)) ** 3)
  step = jnp.asarray(step)
  tq = t0 + (step.astype(jnp.int32) - t0) // every * every
  frac = jnp.clip((tq - t0).astype(jnp.float32) / max(t1 - t0, 1), 0.0, 1.0)
  s_f = jnp.asarray(s_f, jnp.float32)
  s = s_f * (1.0 - (1.0 - frac) ** 3)
  return jnp.where(step < t0, 0.0, jnp.where(step >= t1, s_f, s))


def cosine_drop_fraction(step, alpha, t_end):
  """RigL's drop fraction ``alpha / 2 * (1 + cos(pi * step / t_end))``, 0 at and after
  ``t_end``. A Python float for Python arguments, a float32 jnp scalar otherwise."""
  if _is_python_scalar(step) and _is_python_scalar(alpha) and _is_python_scalar(t_end):
    return 0.0 if step >= t_end else alpha / 2 * (1 + math.cos(math.pi * step / t_end))
  step = jnp.asarray(step, jnp.float32)
  f = alpha / 2 * (1 + jnp.cos(jnp.pi * step / t_end))
  return jnp.where(step >= t_end, 0.0, f).astype(jnp.float32)


def nnz_target(density: float, n: int) -> int:
  """The non-zero count of a layer of ``n`` weights at ``density``: ``round(density * n)``."""
  return int(round(density * n))


def layer_densities(shapes: dict, sparsity: float, distribution: str) -> dict:
  """Per-layer densities (Python floats) with ``sum(density * size) = (1 - sparsity) * total``.
  "uniform": ``1 - sparsity`` everywhere. "erk" (Erdős–Rényi-Kernel, Evci et al. 2020):
  ``eps * sum(shape) / prod(shape)``, layers that would exceed 1 dense and ``eps`` re-solved
  over the rest until none does."""
  if not 0.0 <= sparsity <= 1.0:
    raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
  if distribution == "uniform":
    return {k: 1.0 - sparsity for k in shapes}
  if distribution != "erk":
    raise ValueError(f"unknown density distribution {distribution!r} (uniform, erk)")
  size = {k: math.prod(s) for k, s in shapes.items()}
  raw = {k: sum(s) / size[k] for k, s in shapes.items()}
  target = (1.0 - sparsity) * sum(size.values())
  dense: set = set()
  eps = 0.0
  while True:
    rest = [k for k in shapes if k not in dense]
    if not rest:
      break
    budget = target - sum(size[k] for k in dense)
    eps = budget / sum(raw[k] * size[k] for k in rest)
    over = {k for k in rest if eps * raw[k] > 1.0}
    if not over:
      break
    dense |= over
  return {k: 1.0 if k in dense else min(1.0, max(0.0, eps * raw[k])) for k in shapes}


def random_mask(key, shape, nnz):
  """Exactly ``nnz`` True (may be traced) at uniformly random positions."""
  return topk_mask(jax.random.uniform(key, tuple(shape)), nnz)


def flip_fraction(old, new):
  """Fraction of mask bits that differ (the N:M flip rate between two logs)."""
  return jnp.mean(old != new)
