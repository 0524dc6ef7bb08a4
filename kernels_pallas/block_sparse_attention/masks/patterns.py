"""Named sparse-attention patterns that expand into primitive masks: the Sparse Transformer
``Strided`` and ``Fixed`` patterns (Child et al. 2019), the causal ``Dilated`` window and
``PrefixLM`` (bidirectional prefix, causal after). BigBird lives in ``bigbird.py``.
"""

from __future__ import annotations

import dataclasses

from kernels_pallas.block_sparse_attention.masks.base import And, Mask, Or
from kernels_pallas.block_sparse_attention.masks.primitives import (Causal, DiagStride, KeyModTail,
                                                                    KeyPrefix, SameBlock,
                                                                    SlidingWindow)


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
