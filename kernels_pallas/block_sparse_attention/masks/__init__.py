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

Modules (everything public is re-exported here):

* ``states.py``      ``EMPTY`` / ``PARTIAL`` / ``FULL`` / ``UNKNOWN``, ``SAME_SEGMENT_NOTE``, the
                     numpy / jnp helpers and the analytic band states / counts;
* ``base.py``        ``Mask`` and the combinators ``And`` / ``Or`` / ``Not``;
* ``primitives.py``  ``Full``, ``Causal``, ``SlidingWindow``, ``KeyPrefix``, ``DiagStride``,
                     ``SameBlock``, ``KeyModTail``;
* ``patterns.py``    ``Strided``, ``Fixed``, ``Dilated``, ``PrefixLM`` (expanded into primitives);
* ``bigbird.py``     ``BigBird`` and its hashed ``RandomBlocks``;
* ``functions.py``   ``FromFunction``, ``FromArray``, ``PerHead``;
* ``parse.py``       ``parse_mask`` (cached per spec string) and ``MASK_FORMS``.
"""

from kernels_pallas.block_sparse_attention.masks.base import And, Mask, Not, Or
from kernels_pallas.block_sparse_attention.masks.bigbird import BigBird, RandomBlocks
from kernels_pallas.block_sparse_attention.masks.functions import FromArray, FromFunction, PerHead
from kernels_pallas.block_sparse_attention.masks.parse import MASK_FORMS, parse_mask
from kernels_pallas.block_sparse_attention.masks.patterns import Dilated, Fixed, PrefixLM, Strided
from kernels_pallas.block_sparse_attention.masks.primitives import (Causal, DiagStride, Full,
                                                                    KeyModTail, KeyPrefix,
                                                                    SameBlock, SlidingWindow)
from kernels_pallas.block_sparse_attention.masks.states import (EMPTY, FULL, PARTIAL,
                                                                SAME_SEGMENT_NOTE, UNKNOWN)

__all__ = ["EMPTY", "FULL", "MASK_FORMS", "PARTIAL", "SAME_SEGMENT_NOTE", "UNKNOWN", "And",
           "BigBird", "Causal", "DiagStride", "Dilated", "Fixed", "FromArray", "FromFunction",
           "Full", "KeyModTail", "KeyPrefix", "Mask", "Not", "Or", "PerHead", "PrefixLM",
           "RandomBlocks", "SameBlock", "SlidingWindow", "Strided", "parse_mask"]
