"""Block-sparse attention vs its peers, side by side in one run.

    python benchmarks/attention.py                       # GPU: TARGETS.md shapes (S = 8k, 32k)
    python benchmarks/attention.py --smoke               # CPU: tiny shapes, checks the script runs
    python benchmarks/attention.py --tune                # sweep block sizes x num_warps for `ours`

For each sequence length and mask (causal, causal & window 1024, causal BigBird, strided) it times
forward and forward+backward of:
  ours        kernels_pallas block_sparse_attention (impl=auto: Pallas on GPU, jnp path on CPU)
  jax_dense   jax.nn.dot_product_attention, dense causal (cuDNN on GPU, XLA on CPU) - the cost of
              ignoring sparsity
  torch_flex  torch FlexAttention (torch.compile'd) with the same mask, when torch + CUDA exist
Prints one table (ms and ratios against the peers of the same row) and writes JSON.

--tune instead sweeps `ours` over block sizes (--tune-blocks) x num_warps (--tune-warps) x
num_stages (--tune-stages), forward and forward+backward, and prints / writes the best per row in
the format of kernels_pallas/block_sparse_attention/tuning.py (a ready-to-paste TABLE line). Only
kernels_pallas and jax are needed (plus torch for the FlexAttention column): nothing to carry.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels_pallas.block_sparse_attention.layout import compile_layout  # noqa: E402
from kernels_pallas.block_sparse_attention import tuning  # noqa: E402
from kernels_pallas.block_sparse_attention.ops import block_sparse_attention  # noqa: E402

MASKS = {  # name -> mask spec (window / global sizes scale down in --smoke)
    "causal": "causal",
    "window": "causal&window:{w}",
    "bigbird": "bigbird:{w}:{g}:3:{b}:seed=0",
    "strided": "strided:{b}:{b}",
}


def time_ms(fn, *args, reps: int) -> float:
  out = fn(*args)
  jax.block_until_ready(out)
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, (time.perf_counter() - t) * 1000)
  return best


def jax_rows(q, k, v, layout, reps: int, dense_impl: str) -> dict:
  ours = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, layout))
  ours_bwd = jax.jit(jax.grad(lambda q, k, v: block_sparse_attention(q, k, v, layout)
                              .astype(jnp.float32).sum(), argnums=(0, 1, 2)))
  dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation=dense_impl))
  dense_bwd = jax.jit(jax.grad(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation=dense_impl).astype(jnp.float32).sum(),
      argnums=(0, 1, 2)))
  return {"ours_fwd_ms": time_ms(ours, q, k, v, reps=reps),
          "ours_fwdbwd_ms": time_ms(ours_bwd, q, k, v, reps=reps),
          "jax_dense_fwd_ms": time_ms(dense, q, k, v, reps=reps),
          "jax_dense_fwdbwd_ms": time_ms(dense_bwd, q, k, v, reps=reps)}


def _ints(text: str, none_ok: bool = False) -> list:
  vals = [None if (none_ok and x in ("", "none", "None")) else int(x) for x in text.split(",")]
  return vals or ([None] if none_ok else [])


def _table_key(device_kind: str) -> str:
  """The tuning.TABLE substring that matches this device, else the device kind itself."""
  for sub, _ in tuning.TABLE:
    if sub.lower() in device_kind.lower():
      return sub
  return device_kind


def tune_row(q, k, v, spec, s, heads, reps, blocks, warps, stages) -> dict:
  """Times `ours` fwd and fwd+bwd for every (block_q, block_kv) x num_warps x num_stages; returns
  every trial and the best per direction as tuning.BlockConfig dicts (plus ms)."""
  trials = []
  for bq, bkv in blocks:
    if bq > max(16, s) or bkv > max(16, s):
      continue
    layout = compile_layout(spec, s, s, bq, bkv, num_heads=heads)
    for nw in warps:
      for ns in stages:
        kw = dict(num_warps=nw, num_stages=ns)
        cfg = tuning.BlockConfig(bq, bkv, nw, ns).asdict()
        try:
          fwd = jax.jit(lambda q, k, v, layout=layout, kw=kw: block_sparse_attention(
              q, k, v, layout, **kw))
          bwd = jax.jit(jax.grad(lambda q, k, v, layout=layout, kw=kw: block_sparse_attention(
              q, k, v, layout, **kw).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
          trial = dict(cfg, fwd_ms=time_ms(fwd, q, k, v, reps=reps),
                       fwdbwd_ms=time_ms(bwd, q, k, v, reps=reps))
        except Exception as e:  # e.g. a tile that does not fit in shared memory
          trial = dict(cfg, error=f"{type(e).__name__}: {e}"[:200])
        trials.append(trial)
        print("  ", json.dumps(trial), flush=True)
  ok = [t for t in trials if "error" not in t]
  best = {}
  for key in ("fwd_ms", "fwdbwd_ms"):
    if ok:
      t = min(ok, key=lambda t: t[key])
      best[key.removesuffix("_ms")] = {f: t[f] for f in
                                       ("block_q", "block_kv", "num_warps", "num_stages")}
      best[key.removesuffix("_ms")]["ms"] = t[key]
  return {"trials": trials, "best": best}


def tune(args, on_gpu: bool, dtype, window: int, num_global: int) -> list:
  kind = jax.devices()[0].device_kind
  blocks = [tuple(map(int, b.split("x"))) for b in args.tune_blocks.split(",")]
  warps = _ints(args.tune_warps, none_ok=True) if on_gpu else [None]  # the jnp path ignores them
  stages = _ints(args.tune_stages, none_ok=True) if on_gpu else [None]
  rows = []
  for s in map(int, args.seqs.split(",")):
    for name in args.masks.split(","):
      spec = MASKS[name].format(w=window, g=num_global, b=args.block)
      keys = jax.random.split(jax.random.key(0), 3)
      q, k, v = (jax.random.normal(key, (1, s, args.heads, args.dim), dtype) for key in keys)
      print(f"tune S={s} mask={name} ({spec})", flush=True)
      res = tune_row(q, k, v, spec, s, args.heads, args.reps, blocks, warps, stages)
      row = {"seq": s, "mask": name, "spec": spec, "device_kind": kind, "head_dim": args.dim,
             **res}
      if "fwdbwd" in res["best"]:  # training runs fwd+bwd: that best is the table candidate
        b = res["best"]["fwdbwd"]
        row["table_entry"] = (f"({_table_key(kind)!r}, {args.dim}): BlockConfig("
                              f"{b['block_q']}, {b['block_kv']}, num_warps={b['num_warps']}, "
                              f"num_stages={b['num_stages']}),")
      rows.append(row)
  print(f"\n{'S':>6} {'mask':8} | {'best fwd (bq,bkv,warps,stages)':>34} {'ms':>8} | "
        f"{'best f+b':>34} {'ms':>8}")
  for r in rows:
    cells = []
    for d in ("fwd", "fwdbwd"):
      b = r["best"].get(d)
      cells.append(f"{'n/a':>34} {'':>8}" if b is None else
                   f"{str((b['block_q'], b['block_kv'], b['num_warps'], b['num_stages'])):>34} "
                   f"{b['ms']:8.3f}")
    print(f"{r['seq']:>6} {r['mask']:8} | {cells[0]} | {cells[1]}")
  for r in rows:
    if "table_entry" in r:
      print(f"    {r['table_entry']}  # S={r['seq']} {r['mask']}")
  return rows


def torch_rows(q, k, v, layout, reps: int, name: str, window: int) -> dict:
  """FlexAttention with the same mask (elementwise mask_mod from our spec)."""
  try:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
  except ImportError:
    return {"torch_flex_error": "torch not importable"}
  if not torch.cuda.is_available():
    return {"torch_flex_error": "no CUDA device"}
  mask = layout.mask
  b, s, h, d = q.shape
  tq, tk, tv = (torch.from_numpy(np.asarray(x.astype(jnp.float32))).to("cuda", torch.bfloat16)
                .transpose(1, 2).contiguous().requires_grad_(True) for x in (q, k, v))
  # Native mask_mods for the TARGETS rows; other masks try our elementwise on torch tensors.
  native = {"causal": lambda b_, h_, qi, ki: qi >= ki,
            "window": lambda b_, h_, qi, ki: (qi >= ki) & (qi - ki <= window)}
  mask_mod = native.get(name, lambda b_, h_, qi, ki: mask.elementwise(qi, ki, h_))
  try:
    block_mask = create_block_mask(mask_mod, None,
                                   None if layout.num_heads == 1 else h, s, s, device="cuda",
                                   BLOCK_SIZE=layout.block_q)
  except Exception as e:  # a mask whose elementwise is not torch-traceable
    return {"torch_flex_error": f"{type(e).__name__}: {e}"[:200]}
  flex = torch.compile(flex_attention)

  def run(backward: bool) -> float:
    def once():
      out = flex(tq, tk, tv, block_mask=block_mask)
      if backward:
        out.float().sum().backward()
    once()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
      start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
      start.record()
      once()
      end.record()
      torch.cuda.synchronize()
      best = min(best, start.elapsed_time(end))
    return best

  return {"torch_flex_fwd_ms": run(False), "torch_flex_fwdbwd_ms": run(True)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seqs", default="8192,32768")
  parser.add_argument("--masks", default=",".join(MASKS))
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--block", type=int, default=128)
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes")
  parser.add_argument("--json", default="")
  parser.add_argument("--tune", action="store_true",
                      help="sweep block sizes x num_warps for `ours` instead of the peer table")
  parser.add_argument("--tune-blocks", default="64x64,128x64,128x128,64x128",
                      help="block_qxblock_kv list")
  parser.add_argument("--tune-warps", default="4,8", help="num_warps list (GPU only)")
  parser.add_argument("--tune-stages", default="none",
                      help="num_stages list (GPU only; none = kernel default)")
  args = parser.parse_args()
  on_gpu = jax.devices()[0].platform == "gpu"
  if args.smoke:
    args.seqs, args.heads, args.dim, args.block, args.reps = "256", 2, 32, 32, 2
    if args.tune:
      args.tune_blocks, args.masks = "32x32,64x32", "causal,window"
  window, num_global = (1024, 64) if not args.smoke else (64, 8)
  dtype = jnp.bfloat16 if on_gpu else jnp.float32
  if args.tune:
    rows = tune(args, on_gpu, dtype, window, num_global)
    out = {"script": "benchmarks/attention.py", "mode": "tune", "args": vars(args),
           "jax": jax.__version__, "device_kind": jax.devices()[0].device_kind,
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "rows": rows}
    path = pathlib.Path(args.json or REPO / "benchmarks" / "results" /
                        f"attention-tune-{jax.devices()[0].platform}-"
                        f"{datetime.date.today():%Y%m%d}.json")
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return
  rows = []
  for s in map(int, args.seqs.split(",")):
    for name in args.masks.split(","):
      spec = MASKS[name].format(w=window, g=num_global, b=args.block)
      t0 = time.perf_counter()
      layout = compile_layout(spec, s, s, args.block, args.block, num_heads=args.heads)
      build_ms = (time.perf_counter() - t0) * 1000
      keys = jax.random.split(jax.random.key(0), 3)
      q, k, v = (jax.random.normal(key, (1, s, args.heads, args.dim), dtype) for key in keys)
      row = {"seq": s, "mask": name, "spec": spec, "density": layout.density,
             "layout_build_ms": build_ms}
      row.update(jax_rows(q, k, v, layout, args.reps, "cudnn" if on_gpu else "xla"))
      row.update(torch_rows(q, k, v, layout, args.reps, name, window) if on_gpu else
                 {"torch_flex_error": "CPU run"})
      rows.append(row)
      print(json.dumps(row), flush=True)
  print(f"\n{'S':>6} {'mask':8} {'dens':>5} | {'ours fwd':>8} {'dense':>7} {'flex':>7} "
        f"{'x dense':>7} {'x flex':>6} | {'ours f+b':>8} {'dense':>7} {'flex':>7} {'x dense':>7} "
        f"{'x flex':>6}")
  for r in rows:
    def col(key):
      return f"{r[key]:7.3f}" if key in r else "    n/a"

    def ratio(peer, ours):
      return f"{r[peer] / r[ours]:7.2f}" if peer in r else "    n/a"
    print(f"{r['seq']:>6} {r['mask']:8} {r['density']:5.3f} | {r['ours_fwd_ms']:8.3f} "
          f"{col('jax_dense_fwd_ms')} {col('torch_flex_fwd_ms')} "
          f"{ratio('jax_dense_fwd_ms', 'ours_fwd_ms')} {ratio('torch_flex_fwd_ms', 'ours_fwd_ms')} "
          f"| {r['ours_fwdbwd_ms']:8.3f} {col('jax_dense_fwdbwd_ms')} {col('torch_flex_fwdbwd_ms')} "
          f"{ratio('jax_dense_fwdbwd_ms', 'ours_fwdbwd_ms')} "
          f"{ratio('torch_flex_fwdbwd_ms', 'ours_fwdbwd_ms')}")
  out = {"script": "benchmarks/attention.py", "args": vars(args), "jax": jax.__version__,
         "device_kind": jax.devices()[0].device_kind,
         "date": datetime.datetime.now().isoformat(timespec="seconds"), "rows": rows}
  path = pathlib.Path(args.json or REPO / "benchmarks" / "results" /
                      f"attention-{jax.devices()[0].platform}-{datetime.date.today():%Y%m%d}.json")
  path.write_text(json.dumps(out, indent=1))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
