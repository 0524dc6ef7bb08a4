"""Fused product-key top-k (Pallas): kernel, pure-jnp reference, custom_vjp wrapper.

  from kernels_pallas.product_key_topk import product_key_topk
  scores, idx = product_key_topk(q1, q2, k1, k2, top_k=32, softmax=True, impl="pallas")
  # q1, q2 [..., H, C]; k1, k2 [H or 1, n, C]; -> [..., H, k] float32, [..., H, k] int32 (i·n + j)
"""

from kernels_pallas.product_key_topk.ops import IMPLS, product_key_topk
from kernels_pallas.product_key_topk.reference import (product_key_topk_bruteforce,
                                                       product_key_topk_reference, subkey_scores)

__all__ = ["IMPLS", "product_key_topk", "product_key_topk_bruteforce",
           "product_key_topk_reference", "subkey_scores"]
