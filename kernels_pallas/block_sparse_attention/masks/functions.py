"""User-defined and per-head masks: ``FromFunction`` (a jnp-traceable predicate),
``FromArray`` (an explicit bool table, hashed by content) and ``PerHead`` (one mask per head).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from typing import Callable

import jax.numpy as jnp
import numpy as np

from kernels_pallas.block_sparse_attention.masks.base import Mask
from kernels_pallas.block_sparse_attention.masks.states import _full_like, _xp


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
