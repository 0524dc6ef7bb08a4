"""Block-sparse flash attention (Pallas): kernels, pure-jnp reference, custom_vjp wrapper.

  from kernels_pallas.block_sparse_attention import block_sparse_attention, compile_layout
  layout = compile_layout("causal&window:1024", T, T, block_q=128, block_kv=64)
  out = block_sparse_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, layout, impl="auto")
"""

from kernels_pallas.block_sparse_attention.layout import (BlockLayout, compile_layout, dense_mask,
                                                          layout_from_dense_mask)
from kernels_pallas.block_sparse_attention.masks import Mask, parse_mask
from kernels_pallas.block_sparse_attention.ops import (IMPLS, block_sparse_attention,
                                                       block_sparse_attention_xla,
                                                       resolve_impl, triton_supports)
from kernels_pallas.block_sparse_attention.reference import (dense_masked_attention,
                                                             evaluate_mask)

__all__ = ["BlockLayout", "IMPLS", "Mask", "block_sparse_attention", "block_sparse_attention_xla",
           "compile_layout", "dense_mask", "dense_masked_attention", "evaluate_mask",
           "layout_from_dense_mask", "parse_mask", "resolve_impl", "triton_supports"]
