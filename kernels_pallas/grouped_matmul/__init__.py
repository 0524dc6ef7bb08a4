"""Grouped matmul for dropless MoE (Pallas: Triton GPU lowering, Mosaic TPU lowering, and their
interpret modes): gmm, gmm with transposed rhs, tgmm, a custom_vjp wrapper, and ragged_dot /
per-group loop references.

  from kernels_pallas.grouped_matmul import grouped_matmul
  # xs_MxD sorted by expert, sizes_E = tokens per expert, w_ExDxF
  h_MxF = grouped_matmul(xs_MxD, w_ExDxF, sizes_E, impl="pallas")
  # impl: "pallas" (GPU) / "mosaic" (TPU) / "interpret" / "mosaic_interpret" / "xla" / "auto"
"""

from kernels_pallas.grouped_matmul.kernel import KernelConfig, group_bounds, gmm_tile_metadata
from kernels_pallas.grouped_matmul.ops import (IMPLS, SUPPORTED_DTYPES, default_tiling, gmm,
                                               grouped_matmul, resolve_impl, resolve_tiling, tgmm)
from kernels_pallas.grouped_matmul.reference import (clipped_group_sizes, gmm_loop_reference,
                                                     ragged_dot_xla, row_group_ids,
                                                     tgmm_loop_reference, tgmm_xla)
from kernels_pallas.grouped_matmul.tpu_kernel import MOSAIC_DTYPES, MosaicConfig, visit_schedule

__all__ = ["IMPLS", "KernelConfig", "MOSAIC_DTYPES", "MosaicConfig", "SUPPORTED_DTYPES",
           "clipped_group_sizes", "default_tiling", "gmm", "gmm_loop_reference",
           "gmm_tile_metadata", "group_bounds", "grouped_matmul", "ragged_dot_xla",
           "resolve_impl", "resolve_tiling", "row_group_ids", "tgmm", "tgmm_loop_reference",
           "tgmm_xla", "visit_schedule"]
