"""Grouped matmul: checks, padding, dispatch and the ``custom_vjp`` around the Pallas kernels.

``grouped_matmul(lhs [M, K], rhs [G, K, N], group_sizes [G])`` multiplies each contiguous row
group of lhs by its own rhs[g] (dropless MoE after sorting token-expert assignments by expert);
rows past ``sum(group_sizes)`` give 0, like ``jax.lax.ragged_dot``. ``transpose_rhs=True`` takes
rhs as [G, N, K] and uses rhs[g].T. Gradients (``custom_vjp``, never autodiff of a pallas_call):

  d lhs = gmm(dout, rhs, transpose_rhs=not transpose_rhs)
  d rhs = tgmm(lhs, dout)            ([G, K, N]; with transpose_rhs: tgmm(dout, lhs) [G, N, K])
  group_sizes: no gradient.

impl:
  "pallas"     the Pallas kernels lowered for the GPU (Triton backend, kernel.py);
  "interpret"  the same kernels with ``interpret=True`` (CPU tests);
  "mosaic"     the Pallas TPU kernels (tpu_kernel.py: scalar-prefetched visit schedule, Mosaic);
  "mosaic_interpret"  the same TPU kernels in Pallas TPU interpret mode on the CPU (tests);
  "xla"        ``jax.lax.ragged_dot_general`` (reference / fallback), differentiated by JAX;
  "auto"       "pallas" on a GPU, "mosaic" on a TPU, else "xla".

Group sizes. Negative sizes count as 0. A total larger than M is an error when ``group_sizes``
is concrete (a numpy/jax array or list outside ``jit``); under ``jit`` (traced sizes) the groups
are clipped at row M instead: later groups lose rows, every implementation agrees.

Shapes and tiles. ``tiling = (block_m, block_n, block_k)``: powers of two >= 16 (Triton dots);
default (128, 128, 64) for bf16/f16, (64, 64, 32) for float32; each block is capped at the next
power of two of its dimension, so small problems get small tiles. Any M, K, N work: the wrapper
zero-pads M to a multiple of block_m, K to a multiple of block_k and N to a multiple of block_n
(no copy when they already divide; MoE sizes such as D=2048, F=1024 do) and slices the result.
The backward reuses the same tiling (block_n and block_k swap roles when the padded dims need
it). The Triton path indexes with int32: each padded operand must have < 2^31 elements.

Mosaic tiles: (block_m, block_n, block_k) with block_m a multiple of 8 (float32) / 16
(bfloat16) and block_n, block_k multiples of 128; defaults and the fitting rule (few tiles of
the smallest covering size, so padding stays small) in tpu_kernel.py; float16 is not supported
there (cast to bfloat16).

dtypes: lhs and rhs share one of float32 / bfloat16 / float16; group_sizes is an integer array.
Accumulation is float32; the output has lhs's dtype unless ``preferred_element_type`` is given.
Gradients have the dtypes of lhs / rhs (the output cotangent is cast to lhs's dtype for the
backward kernels). float32 kernels use full-precision (non-TF32) dots.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.grouped_matmul import kernel as _k
from kernels_pallas.grouped_matmul import reference as _ref
from kernels_pallas.grouped_matmul import tpu_kernel as _tpu
from kernels_pallas._util import is_pow2 as _is_pow2, next_pow2 as _next_pow2

IMPLS = ("pallas", "interpret", "mosaic", "mosaic_interpret", "xla", "auto")
_MOSAIC = ("mosaic", "mosaic_interpret")
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_MAX_ELEMENTS = 2 ** 31 - 1


def _round_up(x: int, b: int) -> int:
  return -(-x // b) * b


def default_tiling(dtype) -> tuple[int, int, int]:
  """(block_m, block_n, block_k) used when ``tiling`` is None."""
  return (64, 64, 32) if jnp.dtype(dtype) == jnp.float32 else (128, 128, 64)


def resolve_tiling(tiling, dtype, m: int, k: int, n: int) -> tuple[int, int, int]:
  """Validated (block_m, block_n, block_k), each capped at max(16, next_pow2(dim))."""
  tiles = default_tiling(dtype) if tiling is None else tuple(tiling)
  if len(tiles) != 3 or not all(_is_pow2(t) and t >= 16 for t in tiles):
    raise ValueError(f"tiling={tiling!r}; expected (block_m, block_n, block_k), each a power of "
                     "two >= 16 (Triton dots), e.g. (128, 128, 64)")
  cap = lambda t, d: int(min(t, max(16, _next_pow2(d))))
  bm, bn, bk = tiles
  return cap(bm, m), cap(bn, n), cap(bk, k)


def resolve_impl(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}; allowed: {', '.join(IMPLS)}")
  if impl != "auto":
    return impl
  return {"gpu": "pallas", "tpu": "mosaic"}.get(jax.default_backend(), "xla")


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------

def _check_float(name: str, x) -> None:
  if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
    raise ValueError(f"{name} has dtype {x.dtype}; expected float32, bfloat16 or float16 (cast it)")


def _check_group_sizes(group_sizes_G, num_rows: int) -> jax.Array:
  """int32 [G] group sizes; concrete sizes are checked (>= 0, total <= num_rows)."""
  if isinstance(group_sizes_G, jax.core.Tracer):
    sizes = group_sizes_G
  else:
    sizes = np.asarray(group_sizes_G)
  if sizes.ndim != 1 or sizes.shape[0] < 1:
    raise ValueError(f"group_sizes must be a 1-D integer array [G] with G >= 1; got shape "
                     f"{tuple(sizes.shape)}")
  if not jnp.issubdtype(sizes.dtype, jnp.integer):
    raise ValueError(f"group_sizes has dtype {sizes.dtype}; expected an integer dtype (int32)")
  if isinstance(sizes, np.ndarray):
    if (sizes < 0).any():
      raise ValueError(f"group_sizes has negative entries {sizes[sizes < 0].tolist()}; sizes must "
                       "be >= 0")
    if int(sizes.astype(np.int64).sum()) > num_rows:
      raise ValueError(f"sum(group_sizes)={int(sizes.astype(np.int64).sum())} exceeds the "
                       f"{num_rows} rows of lhs; pass at most M rows in total (under jit the "
                       "groups would be clipped at row M)")
  return jnp.asarray(sizes).astype(jnp.int32)


def _check_out_dtype(preferred_element_type, default):
  if preferred_element_type is None:
    return jnp.dtype(default)
  dt = jnp.dtype(preferred_element_type)
  if dt not in SUPPORTED_DTYPES:
    raise ValueError(f"preferred_element_type={dt}; expected float32, bfloat16 or float16")
  return dt


def _check_gmm(lhs, rhs, group_sizes, transpose_rhs):
  if jnp.ndim(lhs) != 2:
    raise ValueError(f"lhs must be [M, K]; got shape {jnp.shape(lhs)}")
  if jnp.ndim(rhs) != 3:
    want = "[G, N, K] (transpose_rhs=True)" if transpose_rhs else "[G, K, N]"
    raise ValueError(f"rhs must be {want}; got shape {jnp.shape(rhs)}")
  m, k = lhs.shape
  g = rhs.shape[0]
  rk, n = (rhs.shape[2], rhs.shape[1]) if transpose_rhs else (rhs.shape[1], rhs.shape[2])
  if rk != k:
    where = "rhs.shape[2]" if transpose_rhs else "rhs.shape[1]"
    raise ValueError(f"contraction mismatch: lhs {lhs.shape} has K={k} but {where}={rk} "
                     f"(rhs {rhs.shape}, transpose_rhs={transpose_rhs})")
  _check_float("lhs", lhs)
  _check_float("rhs", rhs)
  if lhs.dtype != rhs.dtype:
    raise ValueError(f"lhs dtype {lhs.dtype} != rhs dtype {rhs.dtype}; cast both to one dtype")
  sizes = _check_group_sizes(group_sizes, m)
  if sizes.shape[0] != g:
    raise ValueError(f"group_sizes has {sizes.shape[0]} groups but rhs has G={g} "
                     f"(rhs shape {rhs.shape}); they must match")
  return m, k, n, g, sizes


def _check_int32_indexing(**shapes) -> None:
  for name, shape in shapes.items():
    if int(np.prod(shape, dtype=np.int64)) > _MAX_ELEMENTS:
      raise ValueError(f"{name} padded to {shape} has >= 2^31 elements, beyond the Triton "
                       "kernel's int32 indexing; split the call or use impl='xla'")


def _pad_to(x, shape):
  pads = [(0, t - s) for s, t in zip(x.shape, shape)]
  return jnp.pad(x, pads) if any(p for _, p in pads) else x


def _fit(cfg: _k.KernelConfig, dim_n: int, dim_k: int) -> _k.KernelConfig:
  """``cfg`` if block_n | dim_n and block_k | dim_k, else with block_n and block_k swapped (the
  padded dims are multiples of one of the two by construction)."""
  if dim_n % cfg.block_n == 0 and dim_k % cfg.block_k == 0:
    return cfg
  swapped = dataclasses.replace(cfg, block_n=cfg.block_k, block_k=cfg.block_n)
  assert dim_n % swapped.block_n == 0 and dim_k % swapped.block_k == 0, (dim_n, dim_k, cfg)
  return swapped


# ----------------------------------------------------------------------------------------------
# custom_vjp over padded operands
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Static:
  cfg: _k.KernelConfig | _tpu.MosaicConfig
  transpose_rhs: bool
  num_rows: int
  out_dtype: np.dtype


def _kernels(cfg):
  """The kernel module of a config: tpu_kernel (Mosaic) or kernel (Triton); same signatures."""
  return _tpu if isinstance(cfg, _tpu.MosaicConfig) else _k


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm_diff(st: _Static, lhs, rhs, group_sizes):
  return _kernels(st.cfg).gmm(st.cfg, lhs, rhs, group_sizes, num_rows=st.num_rows,
                              transpose_rhs=st.transpose_rhs, out_dtype=st.out_dtype)


def _gmm_diff_fwd(st: _Static, lhs, rhs, group_sizes):
  return _gmm_diff(st, lhs, rhs, group_sizes), (lhs, rhs, group_sizes)


def _gmm_diff_bwd(st: _Static, res, dout):
  lhs, rhs, group_sizes = res
  dout = dout.astype(lhs.dtype)
  kern = _kernels(st.cfg)
  kp, np_ = lhs.shape[1], dout.shape[1]
  # d lhs [Mp, Kp] = dout @ rhs[g].T (or rhs[g]): output columns Kp, contraction Np.
  dlhs = kern.gmm(_fit(st.cfg, kp, np_), dout, rhs, group_sizes, num_rows=st.num_rows,
                  transpose_rhs=not st.transpose_rhs, out_dtype=lhs.dtype)
  if st.transpose_rhs:   # rhs [G, Np, Kp]: d rhs[g] = dout_gᵀ @ lhs_g
    drhs = kern.tgmm(_fit(st.cfg, kp, np_), dout, lhs, group_sizes, num_rows=st.num_rows,
                     out_dtype=rhs.dtype)
  else:                  # rhs [G, Kp, Np]: d rhs[g] = lhs_gᵀ @ dout_g
    drhs = kern.tgmm(_fit(st.cfg, np_, kp), lhs, dout, group_sizes, num_rows=st.num_rows,
                     out_dtype=rhs.dtype)
  return dlhs, drhs, None


_gmm_diff.defvjp(_gmm_diff_fwd, _gmm_diff_bwd)


# ----------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------

def _kernel_config(impl, tiling, dtype, m, k, n, num_warps, num_stages):
  """The kernel config of a Pallas impl, tiles fitted to (M, K, N)."""
  if impl in _MOSAIC:
    if num_warps is not None or num_stages is not None:
      raise ValueError(f"num_warps / num_stages are Triton launch options; impl={impl!r} takes "
                       "only tiling (drop them)")
    if jnp.dtype(dtype) not in _tpu.MOSAIC_DTYPES:
      raise ValueError(f"impl={impl!r} runs float32 or bfloat16 operands; got "
                       f"{jnp.dtype(dtype).name} (cast to bfloat16)")
    bm, bn, bk = _tpu.resolve_tiling(tiling, dtype, m, k, n)
    return _tpu.MosaicConfig(bm, bn, bk, interpret=impl == "mosaic_interpret")
  bm, bn, bk = resolve_tiling(tiling, dtype, m, k, n)
  return _k.KernelConfig(bm, bn, bk, interpret=impl == "interpret", num_warps=num_warps,
                         num_stages=num_stages)


def _gmm_entry(lhs, rhs, group_sizes, *, transpose_rhs, impl, tiling, preferred_element_type,
               num_warps, num_stages, differentiable):
  m, k, n, g, sizes = _check_gmm(lhs, rhs, group_sizes, transpose_rhs)
  out_dtype = _check_out_dtype(preferred_element_type, lhs.dtype)
  impl = resolve_impl(impl)
  if impl == "xla":
    return _ref.ragged_dot_xla(lhs, rhs, sizes, transpose_rhs=transpose_rhs,
                               preferred_element_type=out_dtype)
  cfg = _kernel_config(impl, tiling, lhs.dtype, m, k, n, num_warps, num_stages)
  mp, kp, np_ = _round_up(m, cfg.block_m), _round_up(k, cfg.block_k), _round_up(n, cfg.block_n)
  rhs_shape = (g, np_, kp) if transpose_rhs else (g, kp, np_)
  if isinstance(cfg, _k.KernelConfig):
    _check_int32_indexing(lhs=(mp, kp), rhs=rhs_shape, out=(mp, np_))
  lhs_p, rhs_p = _pad_to(lhs, (mp, kp)), _pad_to(rhs, rhs_shape)
  if differentiable:
    out = _gmm_diff(_Static(cfg, bool(transpose_rhs), m, out_dtype), lhs_p, rhs_p, sizes)
  else:
    out = _kernels(cfg).gmm(cfg, lhs_p, rhs_p, sizes, num_rows=m,
                            transpose_rhs=bool(transpose_rhs), out_dtype=out_dtype)
  return out if (mp, np_) == (m, n) else out[:m, :n]


def grouped_matmul(lhs_MxK: jax.Array, rhs_GxKxN: jax.Array, group_sizes_G: jax.Array, *,
                   transpose_rhs: bool = False, impl: str = "pallas",
                   tiling: tuple[int, int, int] | None = None, preferred_element_type=None,
                   num_warps: int | None = None, num_stages: int | None = None) -> jax.Array:
  """Differentiable grouped matmul: out [M, N] with out[r] = lhs[r] @ rhs[g(r)] (rhs[g(r)].T
  with ``transpose_rhs``; rhs then [G, N, K]); 0 for rows past the groups. See the module
  docstring for impls, tiling, padding and group-size rules. ``num_warps`` / ``num_stages``
  override the Triton launch defaults (8 warps for 128x128 tiles else 4; 3 stages)."""
  return _gmm_entry(lhs_MxK, rhs_GxKxN, group_sizes_G, transpose_rhs=transpose_rhs, impl=impl,
                    tiling=tiling, preferred_element_type=preferred_element_type,
                    num_warps=num_warps, num_stages=num_stages, differentiable=True)


def gmm(lhs_MxK: jax.Array, rhs_GxKxN: jax.Array, group_sizes_G: jax.Array, *,
        transpose_rhs: bool = False, impl: str = "pallas",
        tiling: tuple[int, int, int] | None = None, preferred_element_type=None,
        num_warps: int | None = None, num_stages: int | None = None) -> jax.Array:
  """The raw forward kernel of ``grouped_matmul`` (same arguments), without the custom_vjp:
  not differentiable except with impl="xla"."""
  return _gmm_entry(lhs_MxK, rhs_GxKxN, group_sizes_G, transpose_rhs=transpose_rhs, impl=impl,
                    tiling=tiling, preferred_element_type=preferred_element_type,
                    num_warps=num_warps, num_stages=num_stages, differentiable=False)


def tgmm(lhs_MxK: jax.Array, dout_MxN: jax.Array, group_sizes_G: jax.Array, *,
         impl: str = "pallas", tiling: tuple[int, int, int] | None = None,
         preferred_element_type=None, num_warps: int | None = None,
         num_stages: int | None = None) -> jax.Array:
  """Per-group transposed product out [G, K, N], out[g] = lhs[rows of g].T @ dout[rows of g]
  (0 for empty groups): the weight gradient of ``grouped_matmul``. Raw kernel (no custom_vjp).
  Tiles: out[g] in (block_k, block_n) tiles, rows in steps of block_m."""
  if jnp.ndim(lhs_MxK) != 2 or jnp.ndim(dout_MxN) != 2:
    raise ValueError(f"lhs and dout must be [M, K] and [M, N]; got {jnp.shape(lhs_MxK)}, "
                     f"{jnp.shape(dout_MxN)}")
  (m, k), (m2, n) = lhs_MxK.shape, dout_MxN.shape
  if m != m2:
    raise ValueError(f"lhs {lhs_MxK.shape} and dout {dout_MxN.shape} must have the same rows M")
  _check_float("lhs", lhs_MxK)
  _check_float("dout", dout_MxN)
  if lhs_MxK.dtype != dout_MxN.dtype:
    raise ValueError(f"lhs dtype {lhs_MxK.dtype} != dout dtype {dout_MxN.dtype}; cast both to "
                     "one dtype")
  sizes = _check_group_sizes(group_sizes_G, m)
  g = sizes.shape[0]
  out_dtype = _check_out_dtype(preferred_element_type, lhs_MxK.dtype)
  impl = resolve_impl(impl)
  if impl == "xla":
    return _ref.tgmm_xla(lhs_MxK, dout_MxN, sizes, preferred_element_type=out_dtype)
  cfg = _kernel_config(impl, tiling, lhs_MxK.dtype, m, k, n, num_warps, num_stages)
  mp, kp, np_ = _round_up(m, cfg.block_m), _round_up(k, cfg.block_k), _round_up(n, cfg.block_n)
  if isinstance(cfg, _k.KernelConfig):
    _check_int32_indexing(lhs=(mp, kp), dout=(mp, np_), out=(g, kp, np_))
  out = _kernels(cfg).tgmm(cfg, _pad_to(lhs_MxK, (mp, kp)), _pad_to(dout_MxN, (mp, np_)), sizes,
                           num_rows=m, out_dtype=out_dtype)
  return out if (kp, np_) == (k, n) else out[:, :k, :n]
