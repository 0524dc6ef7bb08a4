"""Weighted row gathers (EmbeddingBag, product-key memory reads, PEER): dispatch, validation,
padding and the ``jax.custom_vjp`` around the Pallas kernels of ``kernel.py`` / ``peer_kernel.py``.

  gather_sum(table_NxD, idx_TxS, w_TxS)        out[t] = Σ_j w[t, j] · table[idx[t, j]]   [T, D]
  gather_dot(table_NxD, idx_TxS, x_TxD)        s[t, j] = x[t] · table[idx[t, j]]          [T, S] f32
  peer_ffn(x_TxD, u_NxD, v_NxD, idx_TxS, g_TxS, activation=...)
                                               y[t] = Σ_j g · act(x[t] · u[idx]) · v[idx] [T, D]

impl:
  "pallas"            the Pallas kernels lowered for the GPU (Triton backend);
  "interpret"         the same kernels with ``interpret=True`` (CPU tests);
  "mosaic"            the Mosaic TPU kernels of ``tpu_kernel.py`` (indices in SMEM, row DMAs),
                      compiled for the TPU; table gradients by XLA scatter-add;
  "mosaic_interpret"  the same Mosaic kernels in Pallas TPU interpret mode
                      (``pltpu.InterpretParams``: DMAs and semaphores simulated on the CPU);
  "xla"               ``reference.py`` (jnp take + einsum in float32), differentiated by JAX;
  "auto"              "pallas" on a GPU, "mosaic" on a TPU, else "xla".

Gradients (Pallas paths, first order; the backward is not itself differentiable):
  gather_sum   d table = reverse_index(w, dout)  [N, D] dense, table dtype
               d w     = gather_dot(table, idx, dout)           (w dtype)
  gather_dot   d x     = gather_sum(table, idx, ds)             (x dtype)
               d table = reverse_index(ds, x)
  peer_ffn     pre = x·u[idx] is saved by the fused forward ([T, S] float32); with h = act(pre)
               and gv = gather_dot(v, idx, dy):  dg = h·gv, dpre = act'(pre)·g·gv,
               (du, dv) = reverse_index((dpre, x), (g·h, dy)) in one kernel (one sort),
               dx = gather_sum(u, idx, dpre).
``reverse_index`` is the deterministic sorted-contribution kernel (no atomics): two runs give
bitwise-equal gradients. With impl "mosaic*" every ``reverse_index`` is ``tpu_kernel.table_grad``
(XLA scatter-add in float32) and peer_ffn is composed: pre = gather_dot(u, idx, x),
y = gather_sum(v, idx, g·act(pre)), differentiated through those two ops. Indices get no gradient.

Indices are assumed to lie in [0, N). They are traced values, so nothing can raise on them: an
index outside that range is clamped to 0 or N - 1 (like ``jnp.take(mode="clip")``; the "xla"
reference does the same), i.e. it reads, and receives the gradient of, the first or last row.
Floating-point weights/inputs are accumulated in float32; outputs are cast to the documented
dtype. Block sizes must be powers of two (a Triton requirement; the interpret path applies the
same rule so that it runs exactly the GPU kernels); T, S, N and D are arbitrary (ragged edges are
masked inside the kernels, no table is padded or copied). The Mosaic kernels take block_tokens (a
multiple of 16) and block_d (a multiple of 128 dividing D); the other block options are Triton's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kernels_pallas.gather_sum import kernel as _k, peer_kernel as _pk, tpu_kernel as _tk
from kernels_pallas.gather_sum import reference as _ref
from kernels_pallas._util import cdiv as _cdiv, is_pow2 as _is_pow2, next_pow2 as _pow2_at_least

IMPLS = ("auto", "pallas", "interpret", "mosaic", "mosaic_interpret", "xla")
MOSAIC_IMPLS = ("mosaic", "mosaic_interpret")
ACTIVATION_NAMES = tuple(_k.ACTIVATIONS)
F32 = jnp.float32


def resolve_impl(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r} is not one of {', '.join(IMPLS)}; pick one of those")
  if impl == "auto":
    return {"gpu": "pallas", "tpu": "mosaic"}.get(jax.default_backend(), "xla")
  return impl


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------

def _check_float(name: str, x, ndim: int, shape_doc: str):
  if not hasattr(x, "shape") or x.ndim != ndim:
    raise ValueError(f"{name} must be a {ndim}-D array {shape_doc}; got shape "
                     f"{getattr(x, 'shape', type(x).__name__)}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must have a floating dtype (float32 / bfloat16 / float16); got "
                     f"{x.dtype}: cast it with .astype")


def _check_idx(idx_TxS):
  if not hasattr(idx_TxS, "shape") or idx_TxS.ndim != 2:
    raise ValueError(f"idx_TxS must be a 2-D integer array [T, S]; got shape "
                     f"{getattr(idx_TxS, 'shape', type(idx_TxS).__name__)} (flatten leading "
                     "token axes, e.g. idx.reshape(-1, heads * k))")
  if not jnp.issubdtype(idx_TxS.dtype, jnp.integer):
    raise ValueError(f"idx_TxS must have an integer dtype; got {idx_TxS.dtype}")
  t, s = idx_TxS.shape
  if t < 1 or s < 1:
    raise ValueError(f"idx_TxS has shape {idx_TxS.shape}; T and S must both be >= 1")
  if t * s >= 2 ** 31:
    raise ValueError(f"T·S = {t * s} selections exceed int32 positions; split the tokens into "
                     "chunks below 2^31 selections")


def _check_table(name: str, table_NxD):
  _check_float(name, table_NxD, 2, "[N, D]")
  n, d = table_NxD.shape
  if n < 1 or d < 1:
    raise ValueError(f"{name} has shape {table_NxD.shape}; N and D must both be >= 1")
  if n >= 2 ** 31:
    raise ValueError(f"{name} has {n} rows; int32 indices need N < 2^31")


def _check_same(name: str, x, shape, what: str):
  if tuple(x.shape) != tuple(shape):
    raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {tuple(shape)} ({what})")


# ----------------------------------------------------------------------------------------------
# tiles
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Plan:
  """Tiles for each kernel one op may launch (forward and backward); ``mosaic`` is set (and the
  Triton tiles None) for the Mosaic TPU impls."""
  sum: _k.Tiles | None
  dot: _k.Tiles | None
  rev: _k.Tiles | None
  peer: _k.Tiles | None
  mosaic: _tk.MosaicTiles | None = None


def _check_block(name: str, value):
  if value is not None and not _is_pow2(value):
    raise ValueError(f"{name}={value!r} must be a positive power of two (Triton tiles); e.g. "
                     f"{_pow2_at_least(value) if isinstance(value, int) and value > 0 else 16}")


def make_plan(t: int, s: int, n: int, d: int, *, impl: str, block_tokens=None, block_d=None,
              block_s=None, block_k=None, block_rows=None, block_contrib=None, num_warps=None,
              num_stages=None) -> Plan:
  """Default tiles, capped at the problem size, with the given overrides (block_tokens / block_s
  apply to the token-grid kernels, block_d to all, block_k to the PEER x·u dot, block_rows /
  block_contrib to the table gradient).

  The defaults were chosen for an H200 at D = 1024 bf16 from register counts (Triton 3.9 + ptxas
  for sm_90a, no spills; default warps: gather_sum 4 -> 56 regs, gather_dot 8 -> 68,
  reverse_index 8 -> 32 (one pair) / 64 (two), peer 8 -> 114), not from timings: run
  ``benchmarks/memory_lookup.py --tune`` on the GPU to tune them."""
  if impl in MOSAIC_IMPLS:
    mosaic = _tk.make_tiles(d, interpret=impl == "mosaic_interpret", block_tokens=block_tokens,
                            block_d=block_d, block_s=block_s, block_k=block_k,
                            block_rows=block_rows, block_contrib=block_contrib,
                            num_warps=num_warps, num_stages=num_stages)
    return Plan(None, None, None, None, mosaic=mosaic)
  for name, value in (("block_tokens", block_tokens), ("block_d", block_d), ("block_s", block_s),
                      ("block_k", block_k), ("block_rows", block_rows),
                      ("block_contrib", block_contrib)):
    _check_block(name, value)
  for name, value in (("num_warps", num_warps), ("num_stages", num_stages)):
    if value is not None and (not isinstance(value, int) or value < 1):
      raise ValueError(f"{name}={value!r} must be a positive int (or None for the default)")
  pt, ps, pn, pd = map(_pow2_at_least, (t, s, n, d))
  common = dict(interpret=(impl == "interpret"), num_warps=num_warps, num_stages=num_stages)
  bd = lambda default: block_d or min(default, pd)
  bt = lambda default: block_tokens or min(default, pt)
  u = lambda default: block_s or min(default, ps)
  return Plan(
      sum=_k.Tiles(block_tokens=bt(16), block_d=bd(256), block_s=u(4), **common),
      dot=_k.Tiles(block_tokens=bt(16), block_d=bd(256), block_s=u(4), **common),
      rev=_k.Tiles(block_d=bd(128), block_rows=block_rows or min(16, pn),
                   block_contrib=block_contrib or 4, **common),
      peer=_k.Tiles(block_tokens=bt(8), block_d=bd(1024), block_s=u(2),
                    block_k=block_k or min(128, pd), **common),
  )


# ----------------------------------------------------------------------------------------------
# kernel launchers on unpadded [T, S] metadata
# ----------------------------------------------------------------------------------------------

def _meta(x_TxS, tiles: _k.Tiles, dtype=None):
  """[T, S] -> [Sp, Tp] (transposed, zero-padded to whole blocks)."""
  t, s = x_TxS.shape
  sp = _cdiv(s, tiles.block_s) * tiles.block_s
  tp = _cdiv(t, tiles.block_tokens) * tiles.block_tokens
  x = x_TxS.T if dtype is None else x_TxS.T.astype(dtype)
  return jnp.pad(x, ((0, sp - s), (0, tp - t)))


def _run_sum(plan: Plan, table, idx, w, out_dtype):
  if plan.mosaic:
    return _tk.gather_sum(table, idx, w, out_dtype=out_dtype, tiles=plan.mosaic)
  tiles = plan.sum
  t, s = idx.shape
  return _k.gather_sum_fwd(table, _meta(idx, tiles), _meta(w, tiles), num_tokens=t,
                           num_slots=s, out_dtype=out_dtype, tiles=tiles)


def _run_dot(plan: Plan, table, idx, x):
  if plan.mosaic:
    return _tk.gather_dot(table, idx, x, tiles=plan.mosaic)
  tiles = plan.dot
  t, s = idx.shape
  out = _k.gather_dot(table, _meta(idx, tiles), x, num_slots=s, tiles=tiles)
  return out[:s, :t].T


def _run_rev(plan: Plan, idx, coefs, rows, num_rows, out_dtypes):
  if plan.mosaic:
    return tuple(_tk.table_grad(idx, c, r, num_rows=num_rows, out_dtype=dt)
                 for c, r, dt in zip(coefs, rows, out_dtypes))
  tiles = plan.rev
  offsets, tok, sorted_coefs = _k.sort_contributions(idx, coefs, num_rows=num_rows,
                                                     block_rows=tiles.block_rows)
  return _k.reverse_index(offsets, tok, sorted_coefs, rows, num_rows=num_rows,
                          out_dtypes=out_dtypes, tiles=tiles)


def _clamp(idx, n):
  return jnp.clip(idx.astype(jnp.int32), 0, n - 1)


# ----------------------------------------------------------------------------------------------
# gather_sum
# ----------------------------------------------------------------------------------------------

def gather_sum(table_NxD: jax.Array, idx_TxS: jax.Array, w_TxS: jax.Array, *,
               impl: str = "pallas", block_tokens: int | None = None,
               block_d: int | None = None, block_s: int | None = None,
               block_rows: int | None = None, block_contrib: int | None = None,
               num_warps: int | None = None, num_stages: int | None = None) -> jax.Array:
  """out[t] = Σ_j w[t, j] · table[idx[t, j]] (EmbeddingBag, mode="sum", per-sample weights).

  table [N, D] float, idx [T, S] int, w [T, S] float. Returns [T, D] in the table dtype (float32
  accumulation). Differentiable in table (dense [N, D], table dtype, deterministic) and w (w
  dtype)."""
  _check_table("table_NxD", table_NxD)
  _check_idx(idx_TxS)
  _check_float("w_TxS", w_TxS, 2, "[T, S]")
  _check_same("w_TxS", w_TxS, idx_TxS.shape, "one weight per selected row, like idx_TxS")
  impl = resolve_impl(impl)
  n, d = table_NxD.shape
  t, s = idx_TxS.shape
  plan = make_plan(t, s, n, d, impl=impl, block_tokens=block_tokens, block_d=block_d,
                   block_s=block_s, block_rows=block_rows, block_contrib=block_contrib,
                   num_warps=num_warps, num_stages=num_stages)
  if impl == "xla":
    return _ref.gather_sum_reference(table_NxD, idx_TxS, w_TxS)
  return _gather_sum_vjp(plan, table_NxD, _clamp(idx_TxS, n), w_TxS)


def _gather_sum_vjp(plan: Plan, table, idx, w, out_dtype=None):

  @jax.custom_vjp
  def fn(table, idx, w):
    return _run_sum(plan, table, idx, w, out_dtype or table.dtype)

  def fn_fwd(table, idx, w):
    return fn(table, idx, w), (table, idx, w)

  def fn_bwd(res, dout):
    table, idx, w = res
    (dtable,) = _run_rev(plan, idx, (w,), (dout,), table.shape[0], (table.dtype,))
    dw = _run_dot(plan, table, idx, dout).astype(w.dtype)
    return dtable, None, dw

  fn.defvjp(fn_fwd, fn_bwd)
  return fn(table, idx, w)


# ----------------------------------------------------------------------------------------------
# gather_dot
# ----------------------------------------------------------------------------------------------

def gather_dot(table_NxD: jax.Array, idx_TxS: jax.Array, x_TxD: jax.Array, *,
               impl: str = "pallas", block_tokens: int | None = None,
               block_d: int | None = None, block_s: int | None = None,
               block_rows: int | None = None, block_contrib: int | None = None,
               num_warps: int | None = None, num_stages: int | None = None) -> jax.Array:
  """s[t, j] = x[t] · table[idx[t, j]]: [T, S] float32. Differentiable in table ([N, D], table
  dtype, deterministic) and x (x dtype)."""
  _check_table("table_NxD", table_NxD)
  _check_idx(idx_TxS)
  _check_float("x_TxD", x_TxD, 2, "[T, D]")
  n, d = table_NxD.shape
  t, s = idx_TxS.shape
  _check_same("x_TxD", x_TxD, (t, d), "T from idx_TxS, D from table_NxD")
  impl = resolve_impl(impl)
  plan = make_plan(t, s, n, d, impl=impl, block_tokens=block_tokens, block_d=block_d,
                   block_s=block_s, block_rows=block_rows, block_contrib=block_contrib,
                   num_warps=num_warps, num_stages=num_stages)
  if impl == "xla":
    return _ref.gather_dot_reference(table_NxD, idx_TxS, x_TxD)
  return _gather_dot_vjp(plan, table_NxD, _clamp(idx_TxS, n), x_TxD)


def _gather_dot_vjp(plan: Plan, table, idx, x):

  @jax.custom_vjp
  def fn(table, idx, x):
    return _run_dot(plan, table, idx, x)

  def fn_fwd(table, idx, x):
    return fn(table, idx, x), (table, idx, x)

  def fn_bwd(res, ds):
    table, idx, x = res
    ds = ds.astype(F32)
    dx = _run_sum(plan, table, idx, ds, x.dtype)
    (dtable,) = _run_rev(plan, idx, (ds,), (x,), table.shape[0], (table.dtype,))
    return dtable, None, dx

  fn.defvjp(fn_fwd, fn_bwd)
  return fn(table, idx, x)


# ----------------------------------------------------------------------------------------------
# peer_ffn
# ----------------------------------------------------------------------------------------------

def peer_ffn(x_TxD: jax.Array, u_NxD: jax.Array, v_NxD: jax.Array, idx_TxS: jax.Array,
             g_TxS: jax.Array, *, activation: str = "gelu", impl: str = "pallas",
             block_tokens: int | None = None, block_d: int | None = None,
             block_s: int | None = None, block_k: int | None = None,
             block_rows: int | None = None, block_contrib: int | None = None,
             num_warps: int | None = None, num_stages: int | None = None) -> jax.Array:
  """PEER layer output y[t] = Σ_j g[t, j] · act(x[t] · u[idx[t, j]]) · v[idx[t, j]].

  x [T, D], expert tables u / v [N, D], idx [T, S] (all heads' top-k, flattened), gates g [T, S].
  activation: "gelu" (tanh approximation, jax.nn.gelu(approximate=True)), "relu" or "silu".
  Returns [T, D] in x's dtype; differentiable in x, u, v (dense [N, D], deterministic) and g.
  impl "mosaic" / "mosaic_interpret" have no fused TPU kernel: they compose gather_dot ->
  activation -> gather_sum (the [T, S] pre-activations round-trip through HBM)."""
  _check_float("x_TxD", x_TxD, 2, "[T, D]")
  _check_table("u_NxD", u_NxD)
  _check_table("v_NxD", v_NxD)
  _check_idx(idx_TxS)
  _check_float("g_TxS", g_TxS, 2, "[T, S]")
  _check_same("v_NxD", v_NxD, u_NxD.shape, "the same [N, D] as u_NxD")
  n, d = u_NxD.shape
  t, s = idx_TxS.shape
  _check_same("x_TxD", x_TxD, (t, d), "T from idx_TxS, D from u_NxD")
  _check_same("g_TxS", g_TxS, (t, s), "one gate per selected expert, like idx_TxS")
  if activation not in _k.ACTIVATIONS:
    raise ValueError(f"activation={activation!r} is not one of {', '.join(ACTIVATION_NAMES)}")
  impl = resolve_impl(impl)
  plan = make_plan(t, s, n, d, impl=impl, block_tokens=block_tokens, block_d=block_d,
                   block_s=block_s, block_k=block_k, block_rows=block_rows,
                   block_contrib=block_contrib, num_warps=num_warps, num_stages=num_stages)
  if impl == "xla":
    return _ref.peer_ffn_reference(x_TxD, u_NxD, v_NxD, idx_TxS, g_TxS, activation)
  if plan.mosaic:
    idx = _clamp(idx_TxS, n)
    h = g_TxS.astype(F32) * _k.ACTIVATIONS[activation](_gather_dot_vjp(plan, u_NxD, idx, x_TxD))
    return _gather_sum_vjp(plan, v_NxD, idx, h, x_TxD.dtype)
  return _peer_vjp(plan, activation, x_TxD, u_NxD, v_NxD, _clamp(idx_TxS, n), g_TxS)


def _peer_vjp(plan: Plan, activation: str, x, u, v, idx, g):
  act = _k.ACTIVATIONS[activation]

  def forward(x, u, v, idx, g):
    tiles = plan.peer
    t, s = idx.shape
    y, pre = _pk.peer_fwd(x, u, v, _meta(idx, tiles), _meta(g, tiles), num_slots=s,
                          activation=activation, out_dtype=x.dtype, tiles=tiles)
    return y, pre[:s, :t].T

  @jax.custom_vjp
  def fn(x, u, v, idx, g):
    return forward(x, u, v, idx, g)[0]

  def fn_fwd(x, u, v, idx, g):
    y, pre = forward(x, u, v, idx, g)
    return y, (x, u, v, idx, g, pre)

  def fn_bwd(res, dy):
    x, u, v, idx, g, pre = res
    gf = g.astype(F32)
    gv = _run_dot(plan, v, idx, dy)                           # dy · v[idx]   [T, S]
    h, act_vjp = jax.vjp(act, pre)
    dg = (h * gv).astype(g.dtype)
    (dpre,) = act_vjp(gf * gv)
    du, dv = _run_rev(plan, idx, (dpre, gf * h), (x, dy), u.shape[0], (u.dtype, v.dtype))
    dx = _run_sum(plan, u, idx, dpre, x.dtype)
    return dx, du, dv, None, dg

  fn.defvjp(fn_fwd, fn_bwd)
  return fn(x, u, v, idx, g)
