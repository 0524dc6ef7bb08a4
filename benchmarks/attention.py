"""Block-sparse attention vs its peers, side by side in one run.

    python benchmarks/attention.py                       # GPU: TARGETS.md shapes (S = 8k, 32k)
    python benchmarks/attention.py --smoke               # CPU: tiny shapes, checks the script runs

For each sequence length and mask (causal, causal & window 1024, causal BigBird, strided) it times
forward and forward+backward of:
  ours        kernels_pallas block_sparse_attention (impl=auto: Pallas on GPU, jnp path on CPU)
  jax_dense   jax.nn.dot_product_attention, dense causal (cuDNN on GPU, XLA on CPU) - the cost of
              ignoring sparsity
  torch_flex  torch FlexAttention (torch.compile'd) with the same mask, when torch + CUDA exist
Prints one table (ms and ratios against the peers of the same row) and writes JSON. Only
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
  args = parser.parse_args()
  on_gpu = jax.devices()[0].platform == "gpu"
  if args.smoke:
    args.seqs, args.heads, args.dim, args.block, args.reps = "256", 2, 32, 32, 2
  window, num_global = (1024, 64) if not args.smoke else (64, 8)
  dtype = jnp.bfloat16 if on_gpu else jnp.float32
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
