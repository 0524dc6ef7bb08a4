"""The Pallas kernels as compile cases: each builder returns a ``Case`` whose forward and
forward+backward functions call the kernel on abstract arguments with ``impl="pallas"`` (the
Triton lowering, for ``_aot.compile_for_gpu``) or its TPU implementation (``impl="splash"``
for block-sparse attention, ``"mosaic"`` for the others; for ``_aot.compile_for_tpu``).

  case = gmm_case(m=8192, k=1024, n=512, groups=64)
  fwd = _aot.compile_for_gpu(case.forward, case.args)
  bwd = _aot.compile_for_gpu(case.backward, case.args)
  tpu = gmm_case(m=8192, k=1024, n=512, groups=64, impl="mosaic")   # -> compile_for_tpu

``backward`` is the VJP of the forward (cotangent of ones) with respect to ``case.diff``: the
kernels' custom_vjp backward kernels, compiled together with the forward. ``kernels`` counts the
Pallas kernels each direction launches at least (forward, forward+backward), which the compile
checks hold against the custom calls in the compiled HLO. Dimension names follow the kernels'
own (T tokens, S slots per token, N table rows, D width, H heads, n sub-keys, C half key width).

TPU cases exist for the kernels of ``TPU_KERNELS`` whose ops list the TPU impl in ``IMPLS``
(``tpu_impl_ready``); ``tpu_small_cases`` leaves the others out and says so in ``tpu_missing``.
Splash attention on a TPU needs kv blocks that are multiples of 128 and, for the backward, q
blocks too (``splash_blocks`` rounds up; the bridge pads the sequence to the blocks).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from kernels_pallas._util import cdiv
from kernels_pallas.block_sparse_attention import ops as attention_ops
from kernels_pallas.block_sparse_attention import splash
from kernels_pallas.block_sparse_attention.layout import compile_layout
from kernels_pallas.block_sparse_attention.masks import parse_mask
from kernels_pallas.block_sparse_attention.ops import block_sparse_attention
from kernels_pallas.gather_sum import ops as gather_ops
from kernels_pallas.gather_sum.ops import gather_dot, gather_sum, peer_ffn
from kernels_pallas.grouped_matmul import ops as gmm_ops
from kernels_pallas.grouped_matmul.ops import grouped_matmul
from kernels_pallas.product_key_topk.ops import product_key_topk

KERNELS = ("block_sparse_attention", "product_key_topk", "gather_sum", "gather_dot", "peer_ffn",
           "grouped_matmul")
# kernel -> (its ops module, the impl that runs it on a TPU); product-key top-k has none.
_TPU_IMPL = {"block_sparse_attention": (attention_ops, "splash"),
             "gather_sum": (gather_ops, "mosaic"), "gather_dot": (gather_ops, "mosaic"),
             "peer_ffn": (gather_ops, "mosaic"), "grouped_matmul": (gmm_ops, "mosaic")}
TPU_KERNELS = tuple(_TPU_IMPL)
# Mosaic kernels at least in (forward, forward+backward) of a "mosaic" case: the forward kernel,
# and at least one backward kernel (the grouped matmul: dlhs and drhs both), as the impls stand.
MOSAIC_KERNELS = {"gather_sum": (1, 2), "gather_dot": (1, 2), "peer_ffn": (1, 2),
                  "grouped_matmul": (1, 3)}
SPLASH_LANES = 128        # splash's NUM_LANES: kv blocks (and q blocks, backward) are multiples
# Host bytes per element of one dense [Tp, Sp] evaluation in the splash bridge (int64 index
# temporaries), on top of 1 byte per element for every distinct dense head mask kept: measured
# peaks 1.7 GB (8k, BigBird, 12 distinct heads) and 5.0 GB (16k, strided, one) fit this.
_DENSE_EVAL_BYTES = 16
BF16, F32, I32 = jnp.bfloat16, jnp.float32, jnp.int32


def tpu_impl_ready(kernel: str) -> bool:
  """Whether ``kernel``'s ops accept its TPU impl (``"splash"`` / ``"mosaic"``) yet."""
  module, impl = _TPU_IMPL[kernel]
  return impl in module.IMPLS


def splash_blocks(block_q: int, block_kv: int) -> tuple[int, int]:
  """Block sizes splash attention compiles for on a TPU, forward and backward: each rounded up
  to a multiple of 128 (its kv blocks are lane-wide; the backward's q blocks are the last
  dimension of a block too). Smaller blocks fail in Python with 'bkv_compute=64 must be a
  multiple of 128' (forward) or Pallas TPU's '(8, 128)' block-shape error (backward, q)."""
  up = lambda b: cdiv(max(int(b), 1), SPLASH_LANES) * SPLASH_LANES
  return up(block_q), up(block_kv)


@dataclasses.dataclass(frozen=True)
class Case:
  kernel: str                     # one of KERNELS
  shape: str                      # the dimensions, for tables
  forward: Callable               # (*args) -> outputs
  args: tuple                     # jax.ShapeDtypeStruct per argument
  diff: tuple[int, ...]           # argnums the backward differentiates
  kernels: tuple[int, int]        # Pallas kernels at least in (forward, forward+backward)
  host_bytes: int = 0             # host memory building the kernel takes (splash dense masks)

  @property
  def backward(self) -> Callable:
    return functools.partial(_vjp, self.forward, self.diff)


def _vjp(fn, diff, *args):
  """Outputs and the cotangents of ``args[diff]`` for an all-ones output cotangent (integer
  outputs get float0 zeros)."""
  def part(*d):
    full = list(args)
    for i, x in zip(diff, d):
      full[i] = x
    return fn(*full)

  out, pullback = jax.vjp(part, *(args[i] for i in diff))
  ones = jax.tree.map(lambda o: jnp.ones_like(o) if jnp.issubdtype(o.dtype, jnp.floating)
                      else jnp.zeros(o.shape, jax.dtypes.float0), out)
  return out, pullback(ones)


def _sds(shape, dtype):
  return jax.ShapeDtypeStruct(tuple(shape), dtype)


def splash_dense_masks(layout, heads: int) -> int:
  """How many distinct head masks the splash bridge evaluates densely on the host (as
  ``NumpyMask``s) for ``layout`` over ``heads`` heads; band masks and And / Or of them stay
  computable (0). Mirrors ``splash.to_splash_mask``'s per-head conversion and cache."""
  bq, bkv = splash_blocks(layout.block_q, layout.block_kv)
  shape = (cdiv(layout.seq_q, bq) * bq, cdiv(layout.seq_kv, bkv) * bkv)
  dense = set()
  for h in range(heads):
    row = h % layout.num_heads
    m = splash._head_mask(layout.mask, row)
    if splash._convert(m, row, shape, layout.seq_q, layout.seq_kv) is None:
      dense.add((m, row if m.head_dependent else 0))
  return len(dense)


def block_sparse_case(*, seq: int, heads: int, kv_heads: int, head_dim: int, mask: str,
                      block_q: int, block_kv: int, batch: int = 1, dtype=BF16,
                      layer: int = 0, num_warps=None, num_stages=None,
                      impl: str = "pallas") -> Case:
  """Block-sparse attention on q [B, T, H, D], k / v [B, S, K, D] (T = S = seq); a
  head-dependent mask (BigBird's random blocks) gets one layout row per head, as the layer's.
  ``impl="splash"`` (TPU) runs one splash kernel per call: one MHA kernel, or one MQA kernel
  per kv head when K < H; its backward adds a dq and a dkv kernel per call."""
  spec = parse_mask(mask)
  layout = compile_layout(spec, seq, seq, block_q, block_kv,
                          num_heads=heads if spec.head_dependent else 1, layer=layer)
  fwd = lambda q, k, v: block_sparse_attention(q, k, v, layout, impl=impl,
                                               num_warps=num_warps, num_stages=num_stages)
  q, kv = _sds((batch, seq, heads, head_dim), dtype), _sds((batch, seq, kv_heads, head_dim), dtype)
  shape = (f"B={batch} T={seq} H={heads} K={kv_heads} D={head_dim} {mask} "
           f"blocks {block_q}x{block_kv}")
  calls = 1 if kv_heads == heads else kv_heads
  if impl != "splash":
    return Case("block_sparse_attention", shape, fwd, (q, kv, kv), (0, 1, 2), (1, 3))
  n = splash_dense_masks(layout, heads)
  padded = cdiv(seq, block_q) * block_q * cdiv(seq, block_kv) * block_kv
  host = (n + _DENSE_EVAL_BYTES) * padded if n else 0
  return Case("block_sparse_attention", shape, fwd, (q, kv, kv), (0, 1, 2), (calls, 3 * calls),
              host)


def pk_topk_case(*, tokens: int, heads: int, subkeys: int, half_dim: int, top_k: int,
                 shared_keys: bool = False, softmax: bool = True, dtype=BF16) -> Case:
  """Product-key top-k over n² keys: q halves [T, H, C], sub-keys [H or 1, n, C]."""
  fwd = lambda q1, q2, k1, k2: product_key_topk(q1, q2, k1, k2, top_k, softmax=softmax,
                                                impl="pallas")
  q = _sds((tokens, heads, half_dim), dtype)
  keys = _sds((1 if shared_keys else heads, subkeys, half_dim), dtype)
  shape = (f"T={tokens} H={heads} n={subkeys} C={half_dim} k={top_k}"
           f"{' shared keys' if shared_keys else ''}")
  # the backward has no kernel (two matmuls per half): forward kernel only
  return Case("product_key_topk", shape, fwd, (q, q, keys, keys), (0, 1, 2, 3), (1, 1))


def _counts(kernel: str, impl: str, triton: tuple[int, int]) -> tuple[int, int]:
  return MOSAIC_KERNELS[kernel] if impl == "mosaic" else triton


def gather_sum_case(*, tokens: int, slots: int, rows: int, dim: int, table_dtype=F32,
                    impl: str = "pallas") -> Case:
  """out [T, D] = Σ_s w[t, s] · table[idx[t, s]]: table [N, D], idx int32 / w float32 [T, S]."""
  fwd = lambda table, w, idx: gather_sum(table, idx, w, impl=impl)
  args = (_sds((rows, dim), table_dtype), _sds((tokens, slots), F32), _sds((tokens, slots), I32))
  shape = f"T={tokens} S={slots} N={rows} D={dim} {jnp.dtype(table_dtype).name} table"
  return Case("gather_sum", shape, fwd, args, (0, 1), _counts("gather_sum", impl, (1, 3)))


def gather_dot_case(*, tokens: int, slots: int, rows: int, dim: int, dtype=F32,
                    impl: str = "pallas") -> Case:
  """s [T, S] = x[t] · table[idx[t, s]]: table [N, D], x [T, D], idx int32 [T, S]."""
  fwd = lambda table, x, idx: gather_dot(table, idx, x, impl=impl)
  args = (_sds((rows, dim), dtype), _sds((tokens, dim), dtype), _sds((tokens, slots), I32))
  shape = f"T={tokens} S={slots} N={rows} D={dim} {jnp.dtype(dtype).name}"
  return Case("gather_dot", shape, fwd, args, (0, 1), _counts("gather_dot", impl, (1, 3)))


def peer_case(*, tokens: int, slots: int, rows: int, dim: int, activation: str = "gelu",
              dtype=F32, impl: str = "pallas") -> Case:
  """Fused PEER y [T, D] = Σ_s g · act(x · u[idx]) · v[idx]: u / v [N, D], x [T, D]."""
  fwd = lambda x, u, v, g, idx: peer_ffn(x, u, v, idx, g, activation=activation, impl=impl)
  table, tok = _sds((rows, dim), dtype), _sds((tokens, slots), F32)
  args = (_sds((tokens, dim), dtype), table, table, tok, _sds((tokens, slots), I32))
  shape = f"T={tokens} S={slots} N={rows} D={dim} {activation} {jnp.dtype(dtype).name}"
  return Case("peer_ffn", shape, fwd, args, (0, 1, 2, 3), _counts("peer_ffn", impl, (1, 4)))


def gmm_case(*, m: int, k: int, n: int, groups: int, dtype=BF16, impl: str = "pallas") -> Case:
  """Grouped matmul lhs [M, K] by rhs [G, K, N] over traced group sizes [G]."""
  fwd = lambda lhs, rhs, sizes: grouped_matmul(lhs, rhs, sizes, impl=impl)
  args = (_sds((m, k), dtype), _sds((groups, k, n), dtype), _sds((groups,), I32))
  shape = f"M={m} K={k} N={n} G={groups} {jnp.dtype(dtype).name}"
  return Case("grouped_matmul", shape, fwd, args, (0, 1),
              _counts("grouped_matmul", impl, (1, 3)))


def small_cases() -> list[Case]:
  """One small case per kernel (seconds each to compile): the CI compile checks."""
  return [
      block_sparse_case(seq=256, heads=2, kv_heads=1, head_dim=64, mask="causal&window:128",
                        block_q=64, block_kv=64),
      pk_topk_case(tokens=64, heads=2, subkeys=64, half_dim=32, top_k=8),
      gather_sum_case(tokens=64, slots=16, rows=512, dim=64),
      gather_dot_case(tokens=64, slots=16, rows=512, dim=64),
      peer_case(tokens=64, slots=16, rows=512, dim=64),
      gmm_case(m=256, k=64, n=128, groups=8),
  ]


def tpu_missing() -> list[str]:
  """The TPU kernels whose ops do not offer their TPU impl yet (no TPU cases are built)."""
  return [k for k in TPU_KERNELS if not tpu_impl_ready(k)]


def tpu_small_cases() -> list[Case]:
  """Small TPU cases (a second or less each to compile): the CI compile checks for v5e / v5p.
  Splash: a band mask (computable in-kernel) with GQA, and a dense-evaluated BigBird mask (one
  ``NumpyMask`` per head) on a length that is not a multiple of the blocks (padded); the TPU
  cases of the other kernels when their ``impl="mosaic"`` exists (``tpu_missing``)."""
  build = {
      "block_sparse_attention": lambda: [
          block_sparse_case(seq=256, heads=4, kv_heads=2, head_dim=128,
                            mask="causal&window:128", block_q=128, block_kv=128, impl="splash"),
          block_sparse_case(seq=320, heads=2, kv_heads=2, head_dim=64,
                            mask="bigbird:64:32:1:64:seed=0", block_q=128, block_kv=128,
                            impl="splash")],
      "gather_sum": lambda: [gather_sum_case(tokens=64, slots=16, rows=512, dim=128,
                                             impl="mosaic")],
      "gather_dot": lambda: [gather_dot_case(tokens=64, slots=16, rows=512, dim=128,
                                             impl="mosaic")],
      "peer_ffn": lambda: [peer_case(tokens=64, slots=16, rows=512, dim=128, impl="mosaic")],
      "grouped_matmul": lambda: [gmm_case(m=256, k=128, n=128, groups=8, impl="mosaic")],
  }
  return [case for kernel, make in build.items() if tpu_impl_ready(kernel) for case in make()]
