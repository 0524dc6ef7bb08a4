"""Memory-layer kernels vs their peers, side by side in one run.

    python benchmarks/memory_lookup.py            # GPU: TARGETS.md shapes
    python benchmarks/memory_lookup.py --smoke    # CPU: tiny shapes, ours in interpret mode
    python benchmarks/memory_lookup.py --tune     # GPU: sweep gather_sum tiles (fwd, fwd+bwd)

Sections (each timed forward and forward+backward, median of --reps after warmup):
  (a) value lookup  out[t] = Σ_j w[t, j] · V[idx[t, j]]  (T=16,384, 4 heads · k=32, N=2^20,
      D=1024, bf16); fwd+bwd = d V (dense [N, D]) and d w:
        ours       kernels_pallas.gather_sum.gather_sum (impl pallas; interpret with --smoke)
        xla        the same op with impl="xla" (jnp take + einsum in float32, JAX autodiff)
        jax_layer  bf16 take + einsum exactly as sparsejax/layers/memory.py `read` does today
        torch      torch.nn.functional.embedding_bag(mode="sum", per_sample_weights=w), when
                   torch with CUDA is importable
      with the achieved GB/s of selected rows (T·S·D·bytes / time) and the floor: those bytes at
      the device-to-device copy bandwidth measured in this run (read + write of a 1 GiB buffer).
  (b) PEER layer  y[t] = Σ_j g · act(x·u[idx]) · v[idx]: ours (peer_ffn, fused forward) vs xla
      vs jax_layer (sparsejax/layers/peer.py's einsums); fwd+bwd = d x, d u, d v, d g.
  (c) product-key index: kernels_pallas.product_key_topk (65,536 queries × H=1 × n=1,024 × C=128,
      top-32, softmax), pallas vs xla; reported "not available" when it does not import.
Prints one table (ms, GB/s, ratios: peer ms / ours ms) and writes
benchmarks/results/memory_lookup-<platform>-<tag>.json. Only jax (plus torch for its column)
is needed: nothing to carry.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import _common as C  # noqa: E402
from kernels_pallas.gather_sum import gather_sum, peer_ffn  # noqa: E402


def copy_bandwidth_gbs(num_bytes: int, reps: int) -> float:
  """Device-to-device copy bandwidth (read + write bytes per second, GB/s) of a bf16 buffer."""
  x = jnp.zeros((num_bytes // 2,), jnp.bfloat16)
  copy = jax.jit(lambda x: x + jnp.ones((), x.dtype))       # one read + one write per element
  ms = C.time_jax_ms(copy, x, reps=reps)
  return 2 * num_bytes / (ms * 1e-3) / 1e9


def _grad_fn(fn, num_diff: int):
  """fwd+bwd, jitted: run(*args, ct) -> gradients of fn w.r.t. its first ``num_diff`` args for the
  cotangent ct (the remaining args, e.g. indices, are not differentiated)."""
  def run(*args):
    *args, ct = args
    diff, rest = args[:num_diff], args[num_diff:]
    out, vjp = jax.vjp(lambda *d: fn(*d, *rest), *diff)
    return vjp(ct.astype(out.dtype))
  return jax.jit(run)


# ----------------------------------------------------------------------------------------------
# (a) value lookup
# ----------------------------------------------------------------------------------------------

def jax_layer_read(table, idx, w):
  """sparsejax/layers/memory.py `read` today: bf16 take + einsum ([T, S, D] materialised)."""
  rows = jnp.take(table, idx, axis=0)
  return jnp.einsum("ts,tsd->td", w.astype(table.dtype), rows)


def value_lookup(args, impl: str, dtype, copy_gbs: float) -> list[dict]:
  t, s, n, d = args.tokens, args.heads * args.topk, args.rows, args.dim
  k = jax.random.split(jax.random.key(0), 4)
  table = jax.random.normal(k[0], (n, d), dtype)
  idx = jax.random.randint(k[1], (t, s), 0, n, jnp.int32)
  w = jax.nn.softmax(jax.random.normal(k[2], (t, s), jnp.float32), axis=-1).astype(dtype)
  ct = jax.random.normal(k[3], (t, d), dtype)
  selected_bytes = t * s * d * jnp.dtype(dtype).itemsize
  floor_ms = selected_bytes / (copy_gbs * 1e9) * 1e3
  fns = {
      "ours": lambda tb, w, idx: gather_sum(tb, idx, w, impl=impl, **args.ours_kw),
      "xla": lambda tb, w, idx: gather_sum(tb, idx, w, impl="xla"),
      "jax_layer": lambda tb, w, idx: jax_layer_read(tb, idx, w),
  }
  rows = []
  for name, fn in fns.items():
    fwd_ms = C.time_jax_ms(jax.jit(fn), table, w, idx, reps=args.reps)
    fwdbwd_ms = C.time_jax_ms(_grad_fn(fn, 2), table, w, idx, ct, reps=args.reps)
    rows.append({"section": "value_lookup", "impl": name, "fwd_ms": fwd_ms,
                 "fwdbwd_ms": fwdbwd_ms, "fwd_GBps": selected_bytes / (fwd_ms * 1e-3) / 1e9,
                 "floor_ms": floor_ms})
  rows.append(torch_embedding_bag(args, t, s, n, d, selected_bytes, floor_ms))
  return rows


def torch_embedding_bag(args, t, s, n, d, selected_bytes, floor_ms) -> dict:
  row = {"section": "value_lookup", "impl": "torch"}
  torch, why = C.torch_cuda()
  if torch is None:
    row["error"] = why
    return row
  import torch.nn.functional as F
  table = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
  idx = torch.randint(0, n, (t, s), device="cuda")
  w = torch.softmax(torch.randn(t, s, device="cuda"), -1).to(torch.bfloat16).requires_grad_(True)
  ct = torch.randn(t, d, device="cuda", dtype=torch.bfloat16)

  def fwd():
    with torch.no_grad():
      return F.embedding_bag(idx, table, mode="sum", per_sample_weights=w)

  def fwd_bwd():
    out = F.embedding_bag(idx, table, mode="sum", per_sample_weights=w)
    return torch.autograd.grad(out, (table, w), ct)

  try:
    fwd_ms = C.time_torch_ms(fwd, reps=args.reps)
    row.update(fwd_ms=fwd_ms, fwdbwd_ms=C.time_torch_ms(fwd_bwd, reps=args.reps),
               fwd_GBps=selected_bytes / (fwd_ms * 1e-3) / 1e9, floor_ms=floor_ms)
  except Exception as e:  # e.g. out of memory, an unsupported dtype combination
    row["error"] = f"{type(e).__name__}: {e}"[:200]
  return row


# ----------------------------------------------------------------------------------------------
# (b) PEER
# ----------------------------------------------------------------------------------------------

def jax_layer_peer(x, u, v, idx, g, activation):
  """sparsejax/layers/peer.py `__call__` today (after retrieval), on flattened heads."""
  act = {"gelu": lambda z: jax.nn.gelu(z, approximate=True), "relu": jax.nn.relu,
         "silu": jax.nn.silu}[activation]
  ur = jnp.take(u, idx, axis=0).astype(x.dtype)
  vr = jnp.take(v, idx, axis=0).astype(x.dtype)
  hidden = act(jnp.einsum("td,tsd->ts", x, ur, preferred_element_type=jnp.float32))
  return jnp.einsum("ts,tsd->td", (g * hidden).astype(x.dtype), vr)


def peer_section(args, impl: str, dtype) -> list[dict]:
  t, s, n, d = args.tokens, args.peer_heads * args.peer_topk, args.rows, args.dim
  k = jax.random.split(jax.random.key(1), 6)
  x = jax.random.normal(k[0], (t, d), dtype)
  u = (jax.random.normal(k[1], (n, d), jnp.float32) * d ** -0.5).astype(dtype)
  v = (jax.random.normal(k[2], (n, d), jnp.float32) * d ** -0.5).astype(dtype)
  idx = jax.random.randint(k[3], (t, s), 0, n, jnp.int32)
  g = jax.nn.softmax(jax.random.normal(k[4], (t, s), jnp.float32), axis=-1)
  ct = jax.random.normal(k[5], (t, d), dtype)
  act = args.activation
  fns = {
      "ours": lambda x, u, v, g, idx: peer_ffn(x, u, v, idx, g, activation=act, impl=impl,
                                               **args.ours_kw),
      "xla": lambda x, u, v, g, idx: peer_ffn(x, u, v, idx, g, activation=act, impl="xla"),
      "jax_layer": lambda x, u, v, g, idx: jax_layer_peer(x, u, v, idx, g, act),
  }
  selected_bytes = 2 * t * s * d * jnp.dtype(dtype).itemsize      # u and v rows
  rows = []
  for name, fn in fns.items():
    fwd_ms = C.time_jax_ms(jax.jit(fn), x, u, v, g, idx, reps=args.reps)
    fwdbwd_ms = C.time_jax_ms(_grad_fn(fn, 4), x, u, v, g, idx, ct, reps=args.reps)
    rows.append({"section": "peer", "impl": name, "fwd_ms": fwd_ms, "fwdbwd_ms": fwdbwd_ms,
                 "fwd_GBps": selected_bytes / (fwd_ms * 1e-3) / 1e9})
  return rows


# ----------------------------------------------------------------------------------------------
# (c) product-key index
# ----------------------------------------------------------------------------------------------

def product_key_section(args, impl: str, dtype) -> list[dict]:
  try:
    from kernels_pallas.product_key_topk.ops import product_key_topk
  except Exception as e:  # written by another change; absent or broken here
    return [{"section": "pk_index", "impl": "ours", "error": f"not available ({e})"[:200]}]
  q, h, n, c, top = args.pk_queries, args.pk_heads, args.pk_keys, args.pk_dim, args.pk_topk
  k = jax.random.split(jax.random.key(2), 5)
  q1, q2 = (jax.random.normal(kk, (q, h, c), dtype) for kk in k[:2])
  k1, k2 = ((jax.random.normal(kk, (h, n, c), jnp.float32) * c ** -0.5).astype(dtype)
            for kk in k[2:4])
  ct = jax.random.normal(k[4], (q, h, top), jnp.float32)
  rows = []
  for name, which in (("ours", impl), ("xla", "xla")):
    fn = lambda q1, q2, k1, k2, which=which: product_key_topk(q1, q2, k1, k2, top, softmax=True,
                                                              impl=which)[0]
    row = {"section": "pk_index", "impl": name}
    try:
      row["fwd_ms"] = C.time_jax_ms(jax.jit(fn), q1, q2, k1, k2, reps=args.reps)
      row["fwdbwd_ms"] = C.time_jax_ms(_grad_fn(fn, 4), q1, q2, k1, k2, ct, reps=args.reps)
    except Exception as e:
      row["error"] = f"{type(e).__name__}: {e}"[:200]
    rows.append(row)
  return rows


# ----------------------------------------------------------------------------------------------
# --tune: gather_sum tiles
# ----------------------------------------------------------------------------------------------

def tune(args, impl: str, dtype) -> list[dict]:
  t, s, n, d = args.tokens, args.heads * args.topk, args.rows, args.dim
  k = jax.random.split(jax.random.key(0), 4)
  table = jax.random.normal(k[0], (n, d), dtype)
  idx = jax.random.randint(k[1], (t, s), 0, n, jnp.int32)
  w = jax.random.normal(k[2], (t, s), dtype)
  ct = jax.random.normal(k[3], (t, d), dtype)
  trials = []
  fwd_grid = [dict(block_tokens=bt, block_d=bd, block_s=u, num_warps=nw)
              for bt in (8, 16, 32) for bd in (128, 256, 512) for u in (2, 4, 8) for nw in (4, 8)]
  bwd_grid = [dict(block_rows=br, block_contrib=bc, block_d=bd, num_warps=nw)
              for br in (8, 16, 32) for bc in (2, 4, 8) for bd in (128, 256) for nw in (4, 8)]
  if args.smoke:
    fwd_grid, bwd_grid = fwd_grid[:2], bwd_grid[:2]
  for kind, grid in (("fwd", fwd_grid), ("fwdbwd", bwd_grid)):
    for kw in grid:
      fn = lambda tb, w, idx, kw=kw: gather_sum(tb, idx, w, impl=impl, **kw)
      try:
        ms = (C.time_jax_ms(jax.jit(fn), table, w, idx, reps=args.reps) if kind == "fwd" else
              C.time_jax_ms(_grad_fn(fn, 2), table, w, idx, ct, reps=args.reps))
        trial = {"section": f"tune_{kind}", **kw, "ms": ms}
      except Exception as e:  # a tile that does not compile / fit
        trial = {"section": f"tune_{kind}", **kw, "error": f"{type(e).__name__}: {e}"[:200]}
      print(trial, flush=True)
      trials.append(trial)
  return trials


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=16384)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--topk", type=int, default=32)
  parser.add_argument("--rows", type=int, default=2 ** 20, help="table rows N")
  parser.add_argument("--dim", type=int, default=1024)
  parser.add_argument("--peer-heads", type=int, default=8)
  parser.add_argument("--peer-topk", type=int, default=16)
  parser.add_argument("--activation", default="gelu", choices=("gelu", "relu", "silu"))
  parser.add_argument("--pk-queries", type=int, default=65536)
  parser.add_argument("--pk-heads", type=int, default=1)
  parser.add_argument("--pk-keys", type=int, default=1024)
  parser.add_argument("--pk-dim", type=int, default=128)
  parser.add_argument("--pk-topk", type=int, default=32)
  parser.add_argument("--block-tokens", type=int, default=None)
  parser.add_argument("--block-d", type=int, default=None)
  parser.add_argument("--num-warps", type=int, default=None)
  parser.add_argument("--sections", default="lookup,peer,pk",
                      help="comma list of lookup, peer, pk")
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--tune", action="store_true", help="sweep gather_sum tiles instead")
  parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes, ours interpreted")
  parser.add_argument("--tag", default="", help="JSON file tag (default: date)")
  parser.add_argument("--json", default="", help="explicit JSON output path")
  args = parser.parse_args()
  on_gpu = C.platform() == "gpu"
  if args.smoke:
    args.tokens, args.heads, args.topk, args.rows, args.dim = 48, 2, 4, 200, 64
    args.peer_heads, args.peer_topk = 2, 3
    args.pk_queries, args.pk_keys, args.pk_dim, args.pk_topk = 64, 32, 16, 4
    args.reps = 2
    args.tag = args.tag or "smoke"
  impl = "pallas" if on_gpu else "interpret"
  dtype = jnp.bfloat16
  args.ours_kw = {k: v for k, v in (("block_tokens", args.block_tokens),
                                    ("block_d", args.block_d),
                                    ("num_warps", args.num_warps)) if v is not None}
  meta = {"script": "benchmarks/memory_lookup.py", "ours_impl": impl, "dtype": "bfloat16",
          "args": {k: v for k, v in vars(args).items() if k != "ours_kw"}}
  if args.tune:
    rows = tune(args, impl, dtype)
    ok = [r for r in rows if "ms" in r]
    for kind in ("tune_fwd", "tune_fwdbwd"):
      best = min((r for r in ok if r["section"] == kind), key=lambda r: r["ms"], default=None)
      print(f"best {kind}: {best}")
    path = C.write_json("memory_lookup", f"tune-{args.tag}" if args.tag else "tune",
                        {**meta, "rows": rows}, args.json)
    print(f"wrote {path}")
    return

  copy_gbs = copy_bandwidth_gbs(1 << (20 if args.smoke else 30), args.reps)
  print(f"device: {C.device_kind()}  copy bandwidth (read + write): {copy_gbs:.0f} GB/s",
        flush=True)
  sections = set(args.sections.split(","))
  rows = []
  if "lookup" in sections:
    rows += value_lookup(args, impl, dtype, copy_gbs)
  if "peer" in sections:
    rows += peer_section(args, impl, dtype)
  if "pk" in sections:
    rows += product_key_section(args, impl, dtype)
  # Ratios: the same section's peer ms over ours (> 1: ours is faster).
  for r in rows:
    ours = next((o for o in rows if o["section"] == r["section"] and o["impl"] == "ours"), None)
    if ours is None:
      continue
    for key in ("fwd_ms", "fwdbwd_ms"):
      if key in r and key in ours and r is not ours:
        r[f"{key[:-3]}_x_vs_ours"] = r[key] / ours[key]
    if r is ours and "floor_ms" in r and "fwd_ms" in r:
      r["fwd_floor_fraction"] = r["floor_ms"] / r["fwd_ms"]
  C.print_table(rows, ["section", "impl", "fwd_ms", "fwdbwd_ms", "fwd_GBps", "floor_ms",
                       "fwd_floor_fraction", "fwd_x_vs_ours", "fwdbwd_x_vs_ours", "error"])
  path = C.write_json("memory_lookup", args.tag,
                      {**meta, "copy_GBps": copy_gbs, "rows": rows}, args.json)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
