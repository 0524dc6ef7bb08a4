"""Grouped matmul for dropless MoE vs its peers, side by side in one run.

    python benchmarks/moe_gmm.py                   # GPU: T=32768, D=2048, F=1024, E=64, bf16
    python benchmarks/moe_gmm.py --top-k 2         # M = T x top-k assignment rows
    python benchmarks/moe_gmm.py --smoke           # CPU: tiny shapes, ours in interpret mode
    python benchmarks/moe_gmm.py --tune            # sweep tiling x num_warps x num_stages (ours)

For M = tokens x top-k rows sorted by expert, E experts, d_model D and d_ff F, two group-size
distributions (balanced: M/E rows each; skewed: Zipf(--zipf) over experts in a shuffled order)
and the two expert matmul shapes (up: [M, D] x [E, D, F]; down: [M, F] x [E, F, D]) it times
forward and forward+backward (jax.vjp: d lhs and d rhs) of:

  ours        kernels_pallas.grouped_matmul.grouped_matmul (impl="pallas"; "interpret" on CPU)
  ragged_dot  jax.lax.ragged_dot (differentiated by JAX)
  capacity    batched einsum [E, C, K] x [E, K, N] with C = M / E (balanced rows only: the
              dense-capacity MoE layout, no dropping needed when every expert gets M / E)
  dense       one dense dot [M, K] x [K, N] of the same FLOPs: the rate to match

and a "swiglu" row: the three-matmul expert block silu(x·wg) * (x·wu) · wd, ours vs ragged_dot
vs dense dots of the same FLOPs. Reported: median ms, TFLOP/s (2·M·K·N per matmul; x3 for
fwd+bwd), the rate relative to the dense dot of the same run (target: ours >= 0.8, forward and
backward, balanced and skewed), and ours' forward error against ragged_dot (relative to
max |ragged_dot|). Table + JSON (benchmarks/results/moe_gmm-<platform>-<tag>.json).

--tune times ours for every tiling (--tune-tilings) x num_warps x num_stages on every shape and
distribution and prints the best per row (forward and forward+backward), ready to become the
defaults in kernels_pallas/grouped_matmul/ops.py.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from _common import platform, print_table, time_jax_ms, write_json  # noqa: E402
from kernels_pallas.grouped_matmul import grouped_matmul  # noqa: E402

COLUMNS = ["case", "dist", "impl", "fwd_ms", "fwd_tflops", "fwd_x_dense", "fwdbwd_ms",
           "fwdbwd_tflops", "fwdbwd_x_dense", "rel_err"]


def group_sizes(m: int, e: int, dist: str, zipf: float, seed: int = 0) -> np.ndarray:
  """int32 [E] summing to m: equal shares, or Zipf(zipf) shares in a shuffled expert order."""
  if dist == "balanced":
    return (m // e + (np.arange(e) < m % e)).astype(np.int32)
  p = 1.0 / np.arange(1, e + 1) ** zipf
  sizes = np.floor(p / p.sum() * m).astype(np.int64)
  sizes[0] += m - sizes.sum()
  return np.random.default_rng(seed).permutation(sizes).astype(np.int32)


def _fwd_bwd(fn):
  """jit((ct, sizes, *arrays) -> (fn(*arrays, sizes), vjp(ct))): forward + d of every array.
  Group sizes are a traced argument, as in a MoE layer (tile metadata is computed per call)."""
  def run(ct, sizes, *args):
    out, vjp = jax.vjp(lambda *a: fn(*a, sizes), *args)
    return out, vjp(ct)
  return jax.jit(run)


def _time(fn, args, reps, warmup):
  return time_jax_ms(fn, *args, reps=reps, warmup=warmup)


def _row(case, dist, impl, flops, fwd_ms, fwdbwd_ms, dense, rel_err=None):
  row = {"case": case, "dist": dist, "impl": impl, "flops_fwd": flops}
  if fwd_ms is not None:
    row.update(fwd_ms=fwd_ms, fwd_tflops=flops / fwd_ms / 1e9)
    if dense:
      row["fwd_x_dense"] = dense["fwd_ms"] / fwd_ms
  if fwdbwd_ms is not None:
    row.update(fwdbwd_ms=fwdbwd_ms, fwdbwd_tflops=3 * flops / fwdbwd_ms / 1e9)
    if dense:
      row["fwdbwd_x_dense"] = dense["fwdbwd_ms"] / fwdbwd_ms
  if rel_err is not None:
    row["rel_err"] = rel_err
  return row


def matmul_rows(case, dist, m, k, n, e, sizes, dtype, args, ours_kw) -> list[dict]:
  """ours / ragged_dot / capacity (balanced) / dense for lhs [m, k] x rhs [e, k, n]."""
  kx, kw, kc = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, (m, k), dtype)
  w = (jax.random.normal(kw, (e, k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
  ct = jax.random.normal(kc, (m, n), dtype)
  s = jnp.asarray(sizes)
  flops = 2.0 * int(sizes.sum()) * k * n
  rep = dict(reps=args.reps, warmup=args.warmup)

  def timed(fn, cot, *arrays):
    return (_time(jax.jit(fn), (*arrays, s), **rep), _time(_fwd_bwd(fn), (cot, s, *arrays), **rep))

  # Peers in the input dtype (f32 accumulation inside), like ours: no extra f32 output pass.
  dense_fn = lambda a, b, _: jnp.dot(a, b)
  dense_fwd, dense_fb = timed(dense_fn, ct, x, w[0])
  dense = {"fwd_ms": dense_fwd, "fwdbwd_ms": dense_fb}
  rows = [_row(case, dist, "dense", flops, dense_fwd, dense_fb, dense)]

  ragged_fn = lambda a, b, sz: jax.lax.ragged_dot(a, b, sz)
  rows.append(_row(case, dist, "ragged_dot", flops, *timed(ragged_fn, ct, x, w), dense))

  if dist == "balanced" and m % e == 0:
    cap_fn = lambda a, b, _: jnp.einsum("eck,ekn->ecn", a.reshape(e, m // e, k), b)
    rows.append(_row(case, dist, "capacity", flops,
                     *timed(cap_fn, ct.reshape(e, m // e, n), x, w), dense))

  ours_fn = lambda a, b, sz: grouped_matmul(a, b, sz, **ours_kw)
  ref = jax.jit(ragged_fn)(x, w, s).astype(jnp.float32)
  got = jax.jit(ours_fn)(x, w, s).astype(jnp.float32)
  err = float(jnp.max(jnp.abs(got - ref))) / (float(jnp.max(jnp.abs(ref))) or 1.0)
  rows.append(_row(case, dist, "ours", flops, *timed(ours_fn, ct, x, w), dense, err))
  return rows


def swiglu_rows(dist, m, d, f, e, sizes, dtype, args, ours_kw) -> list[dict]:
  """The expert block silu(x·wg) * (x·wu) · wd: ours vs ragged_dot vs dense dots, fwd and f+b."""
  keys = jax.random.split(jax.random.key(2), 5)
  x = jax.random.normal(keys[0], (m, d), dtype)
  wg, wu = ((jax.random.normal(kk, (e, d, f), jnp.float32) / np.sqrt(d)).astype(dtype)
            for kk in keys[1:3])
  wd = (jax.random.normal(keys[3], (e, f, d), jnp.float32) / np.sqrt(f)).astype(dtype)
  ct = jax.random.normal(keys[4], (m, d), dtype)
  s = jnp.asarray(sizes)
  flops = 3 * 2.0 * int(sizes.sum()) * d * f
  rep = dict(reps=args.reps, warmup=args.warmup)

  def block(mm):
    def fn(x, wg, wu, wd, sz):
      h = jax.nn.silu(mm(x, wg, sz)) * mm(x, wu, sz)
      return mm(h, wd, sz)
    return fn

  def timed(fn, weights):
    return (_time(jax.jit(fn), (x, *weights, s), **rep),
            _time(_fwd_bwd(fn), (ct, s, x, *weights), **rep))

  dense_mm = lambda a, b, _: jnp.dot(a, b)
  dense_fwd, dense_fb = timed(block(dense_mm), (wg[0], wu[0], wd[0]))
  dense = {"fwd_ms": dense_fwd, "fwdbwd_ms": dense_fb}
  ragged_mm = lambda a, b, sz: jax.lax.ragged_dot(a, b, sz)
  ours_mm = lambda a, b, sz: grouped_matmul(a, b, sz, **ours_kw)
  ref = jax.jit(block(ragged_mm))(x, wg, wu, wd, s).astype(jnp.float32)
  got = jax.jit(block(ours_mm))(x, wg, wu, wd, s).astype(jnp.float32)
  err = float(jnp.max(jnp.abs(got - ref))) / (float(jnp.max(jnp.abs(ref))) or 1.0)
  return [_row("swiglu", dist, "dense", flops, dense_fwd, dense_fb, dense),
          _row("swiglu", dist, "ragged_dot", flops, *timed(block(ragged_mm), (wg, wu, wd)), dense),
          _row("swiglu", dist, "ours", flops, *timed(block(ours_mm), (wg, wu, wd)), dense, err)]


def _shapes(args):
  """(case name, K, N) of the two expert matmuls."""
  return [(f"up {args.d_model}x{args.d_ff}", args.d_model, args.d_ff),
          (f"down {args.d_ff}x{args.d_model}", args.d_ff, args.d_model)]


def tune(args, m, dtype, ours_kw) -> list[dict]:
  tilings = [tuple(int(v) for v in t.split(",")) for t in args.tune_tilings.split(";")]
  warps = [int(v) for v in args.tune_warps.split(",")]
  stages = [int(v) for v in args.tune_stages.split(",")]
  rep = dict(reps=args.reps, warmup=args.warmup)
  results = []
  for dist in args.dists.split(","):
    sizes = group_sizes(m, args.experts, dist, args.zipf)
    s = jnp.asarray(sizes)
    for case, k, n in _shapes(args):
      kx, kw, kc = jax.random.split(jax.random.key(3), 3)
      x = jax.random.normal(kx, (m, k), dtype)
      w = (jax.random.normal(kw, (args.experts, k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
      ct = jax.random.normal(kc, (m, n), dtype)
      flops = 2.0 * int(sizes.sum()) * k * n
      trials = []
      for tiling in tilings:
        for nw in warps:
          for ns in stages:
            kw_ = dict(ours_kw, tiling=tiling, num_warps=nw, num_stages=ns)
            fn = lambda a, b, sz, kw_=kw_: grouped_matmul(a, b, sz, **kw_)
            trial = {"tiling": tiling, "num_warps": nw, "num_stages": ns}
            try:
              trial["fwd_ms"] = _time(jax.jit(fn), (x, w, s), **rep)
              trial["fwdbwd_ms"] = _time(_fwd_bwd(fn), (ct, s, x, w), **rep)
            except Exception as exc:  # e.g. tiles that overflow shared memory
              trial["error"] = f"{type(exc).__name__}: {exc}"[:200]
            trials.append(trial)
            print(f"  {case} {dist} {trial}", flush=True)
      ok = [t for t in trials if "error" not in t]
      for key, mult in (("fwd_ms", 1), ("fwdbwd_ms", 3)):
        if ok:
          best = min(ok, key=lambda t: t[key])
          results.append({"case": case, "dist": dist, "pass": key.removesuffix("_ms"),
                          "tiling": str(best["tiling"]), "num_warps": best["num_warps"],
                          "num_stages": best["num_stages"], "ms": best[key],
                          "tflops": mult * flops / best[key] / 1e9})
  print_table(results, ["case", "dist", "pass", "tiling", "num_warps", "num_stages", "ms",
                        "tflops"])
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=32768)
  parser.add_argument("--top-k", type=int, default=1, help="rows M = tokens x top-k")
  parser.add_argument("--d-model", type=int, default=2048)
  parser.add_argument("--d-ff", type=int, default=1024)
  parser.add_argument("--experts", type=int, default=64)
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
  parser.add_argument("--dists", default="balanced,skewed")
  parser.add_argument("--zipf", type=float, default=1.0, help="skewed: share of expert i ~ 1/i^z")
  parser.add_argument("--impl", default="", help="ours: pallas (GPU default) or interpret")
  parser.add_argument("--tiling", default="", help="ours: block_m,block_n,block_k")
  parser.add_argument("--num-warps", type=int, default=None)
  parser.add_argument("--num-stages", type=int, default=None)
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--no-swiglu", action="store_true", help="skip the expert-block rows")
  parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes, ours interpreted")
  parser.add_argument("--tune", action="store_true", help="sweep ours' launch parameters")
  parser.add_argument("--tune-tilings", default="128,128,64;128,128,32;64,128,64;128,64,64;"
                                                 "128,256,64;256,128,64")
  parser.add_argument("--tune-warps", default="4,8")
  parser.add_argument("--tune-stages", default="3,4")
  parser.add_argument("--tag", default="", help="JSON file tag (default: today's date)")
  parser.add_argument("--json", default="", help="explicit JSON output path")
  args = parser.parse_args()

  on_gpu = platform() == "gpu"
  if args.smoke:
    args.tokens, args.d_model, args.d_ff, args.experts = 256, 64, 32, 4
    args.reps, args.warmup = 2, 1
    args.tune_tilings, args.tune_warps, args.tune_stages = "32,32,16;64,32,32", "4", "3"
    args.tag = args.tag or "smoke"
  elif not on_gpu:
    parser.error("full shapes need a GPU (ours runs the Triton kernels); use --smoke on CPU")
  impl = args.impl or ("pallas" if on_gpu else "interpret")
  ours_kw = dict(impl=impl, num_warps=args.num_warps, num_stages=args.num_stages)
  if args.tiling:
    ours_kw["tiling"] = tuple(int(v) for v in args.tiling.split(","))
  dtype = jnp.dtype(args.dtype)
  m = args.tokens * args.top_k
  print(f"M={m} (T={args.tokens} x top-k {args.top_k}) D={args.d_model} F={args.d_ff} "
        f"E={args.experts} {dtype.name} ours impl={impl} on {jax.devices()[0].device_kind}",
        flush=True)

  payload = {"script": "benchmarks/moe_gmm.py", "args": vars(args), "rows_m": m}
  if args.tune:
    payload["mode"] = "tune"
    payload["best"] = tune(args, m, dtype, ours_kw)
  else:
    rows = []
    payload["group_sizes"] = {}
    for dist in args.dists.split(","):
      sizes = group_sizes(m, args.experts, dist, args.zipf)
      payload["group_sizes"][dist] = sizes.tolist()
      print(f"{dist}: group sizes min {sizes.min()} max {sizes.max()} "
            f"(empty {(sizes == 0).sum()})", flush=True)
      for case, k, n in _shapes(args):
        rows += matmul_rows(case, dist, m, k, n, args.experts, sizes, dtype, args, ours_kw)
      if not args.no_swiglu:
        rows += swiglu_rows(dist, m, args.d_model, args.d_ff, args.experts, sizes, dtype, args,
                            ours_kw)
    print()
    print_table(rows, COLUMNS)
    payload["rows"] = rows
  path = write_json("moe_gmm", args.tag, payload, args.json)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
