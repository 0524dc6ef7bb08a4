"""The Pallas GPU kernels as compile cases: each builder returns a ``Case`` whose forward and
forward+backward functions call the kernel with ``impl="pallas"`` (the Triton lowering) on
abstract arguments, ready for ``_aot.compile_for_gpu``.

  case = gmm_case(m=8192, k=1024, n=512, groups=64)
  fwd = _aot.compile_for_gpu(case.forward, case.args)
  bwd = _aot.compile_for_gpu(case.backward, case.args)

``backward`` is the VJP of the forward (cotangent of ones) with respect to ``case.diff``: the
kernels' custom_vjp backward kernels, compiled together with the forward. ``kernels`` counts the
distinct Pallas kernels each direction launches at least (forward, forward+backward), which
``small_cases`` checks against the compiled HLO. Dimension names follow the kernels' own
(T tokens, S slots per token, N table rows, D width, H heads, n sub-keys, C half key width).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from kernels_pallas.block_sparse_attention.layout import compile_layout
from kernels_pallas.block_sparse_attention.masks import parse_mask
from kernels_pallas.block_sparse_attention.ops import block_sparse_attention
from kernels_pallas.gather_sum.ops import gather_dot, gather_sum, peer_ffn
from kernels_pallas.grouped_matmul.ops import grouped_matmul
from kernels_pallas.product_key_topk.ops import product_key_topk

KERNELS = ("block_sparse_attention", "product_key_topk", "gather_sum", "gather_dot", "peer_ffn",
           "grouped_matmul")
BF16, F32, I32 = jnp.bfloat16, jnp.float32, jnp.int32


@dataclasses.dataclass(frozen=True)
class Case:
  kernel: str                     # one of KERNELS
  shape: str                      # the dimensions, for tables
  forward: Callable               # (*args) -> outputs
  args: tuple                     # jax.ShapeDtypeStruct per argument
  diff: tuple[int, ...]           # argnums the backward differentiates
  kernels: tuple[int, int]        # Pallas kernels at least in (forward, forward+backward)

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


def block_sparse_case(*, seq: int, heads: int, kv_heads: int, head_dim: int, mask: str,
                      block_q: int, block_kv: int, batch: int = 1, dtype=BF16,
                      layer: int = 0, num_warps=None, num_stages=None) -> Case:
  """Block-sparse attention on q [B, T, H, D], k / v [B, S, K, D] (T = S = seq); a
  head-dependent mask (BigBird's random blocks) gets one layout row per head, as the layer's."""
  spec = parse_mask(mask)
  layout = compile_layout(spec, seq, seq, block_q, block_kv,
                          num_heads=heads if spec.head_dependent else 1, layer=layer)
  fwd = lambda q, k, v: block_sparse_attention(q, k, v, layout, impl="pallas",
                                               num_warps=num_warps, num_stages=num_stages)
  q, kv = _sds((batch, seq, heads, head_dim), dtype), _sds((batch, seq, kv_heads, head_dim), dtype)
  shape = (f"B={batch} T={seq} H={heads} K={kv_heads} D={head_dim} {mask} "
           f"blocks {block_q}x{block_kv}")
  return Case("block_sparse_attention", shape, fwd, (q, kv, kv), (0, 1, 2), (1, 3))


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


def gather_sum_case(*, tokens: int, slots: int, rows: int, dim: int, table_dtype=F32) -> Case:
  """out [T, D] = Σ_s w[t, s] · table[idx[t, s]]: table [N, D], idx int32 / w float32 [T, S]."""
  fwd = lambda table, w, idx: gather_sum(table, idx, w, impl="pallas")
  args = (_sds((rows, dim), table_dtype), _sds((tokens, slots), F32), _sds((tokens, slots), I32))
  shape = f"T={tokens} S={slots} N={rows} D={dim} {jnp.dtype(table_dtype).name} table"
  return Case("gather_sum", shape, fwd, args, (0, 1), (1, 3))


def gather_dot_case(*, tokens: int, slots: int, rows: int, dim: int, dtype=F32) -> Case:
  """s [T, S] = x[t] · table[idx[t, s]]: table [N, D], x [T, D], idx int32 [T, S]."""
  fwd = lambda table, x, idx: gather_dot(table, idx, x, impl="pallas")
  args = (_sds((rows, dim), dtype), _sds((tokens, dim), dtype), _sds((tokens, slots), I32))
  shape = f"T={tokens} S={slots} N={rows} D={dim} {jnp.dtype(dtype).name}"
  return Case("gather_dot", shape, fwd, args, (0, 1), (1, 3))


def peer_case(*, tokens: int, slots: int, rows: int, dim: int, activation: str = "gelu",
              dtype=F32) -> Case:
  """Fused PEER y [T, D] = Σ_s g · act(x · u[idx]) · v[idx]: u / v [N, D], x [T, D]."""
  fwd = lambda x, u, v, g, idx: peer_ffn(x, u, v, idx, g, activation=activation, impl="pallas")
  table, tok = _sds((rows, dim), dtype), _sds((tokens, slots), F32)
  args = (_sds((tokens, dim), dtype), table, table, tok, _sds((tokens, slots), I32))
  shape = f"T={tokens} S={slots} N={rows} D={dim} {activation} {jnp.dtype(dtype).name}"
  return Case("peer_ffn", shape, fwd, args, (0, 1, 2, 3), (1, 4))


def gmm_case(*, m: int, k: int, n: int, groups: int, dtype=BF16) -> Case:
  """Grouped matmul lhs [M, K] by rhs [G, K, N] over traced group sizes [G]."""
  fwd = lambda lhs, rhs, sizes: grouped_matmul(lhs, rhs, sizes, impl="pallas")
  args = (_sds((m, k), dtype), _sds((groups, k, n), dtype), _sds((groups,), I32))
  shape = f"M={m} K={k} N={n} G={groups} {jnp.dtype(dtype).name}"
  return Case("grouped_matmul", shape, fwd, args, (0, 1), (1, 3))


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
