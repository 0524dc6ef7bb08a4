"""Weighted row gathers (Pallas): EmbeddingBag-style gather-sum, gather-dot and the fused PEER
forward, with deterministic sorted reverse-index table gradients (no atomics) on the GPU, and
Mosaic TPU gather-sum / gather-dot kernels (``tpu_kernel.py``; XLA scatter-add gradients).

  from kernels_pallas.gather_sum import gather_sum, gather_dot, peer_ffn
  out_TxD = gather_sum(values_NxD, idx_TxS, w_TxS, impl="pallas")     # Σ_j w · V[idx]
  out_TxD = gather_sum(values_NxD, idx_TxS, w_TxS, impl="mosaic")     # the TPU kernels
  s_TxS = gather_dot(keys_NxD, idx_TxS, x_TxD)                         # x · K[idx], float32
  y_TxD = peer_ffn(x_TxD, u_NxD, v_NxD, idx_TxS, g_TxS, activation="gelu")
"""

from kernels_pallas.gather_sum.kernel import ACTIVATIONS, Tiles
from kernels_pallas.gather_sum.ops import (IMPLS, MOSAIC_IMPLS, Plan, gather_dot, gather_sum,
                                           make_plan, peer_ffn, resolve_impl)
from kernels_pallas.gather_sum.reference import (gather_dot_reference, gather_sum_reference,
                                                 peer_ffn_reference, table_grad_reference)
from kernels_pallas.gather_sum.tpu_kernel import MosaicTiles

__all__ = ["ACTIVATIONS", "IMPLS", "MOSAIC_IMPLS", "MosaicTiles", "Plan", "Tiles", "gather_dot",
           "gather_dot_reference", "gather_sum", "gather_sum_reference", "make_plan", "peer_ffn",
           "peer_ffn_reference", "resolve_impl", "table_grad_reference"]
