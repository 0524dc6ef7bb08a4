"""Correctness of every Pallas kernel against its XLA path on the device at hand, forward and
gradients, at realistic (not tiny) shapes: the first thing to run on a GPU, before any timing.

    python benchmarks/kernel_parity.py            # GPU: impl="pallas" vs impl="xla"
    python benchmarks/kernel_parity.py --smoke    # CPU: small shapes, impl="interpret"

Checks (bf16 inputs unless noted, float32 accumulation in both paths):
  pk_topk        product-key top-k + softmax, 4,096 queries x 4 heads, n = 1,024, C = 128,
                 k = 32: index agreement (GPU and XLA matmuls may round a last bit differently,
                 which can swap near-ties, so >= 99.9% of (token, head) rows must agree
                 exactly), weights and query / sub-key gradients on the agreeing rows
  gather_sum     weighted gather-sum T = 4,096, S = 128, N = 2^18, D = 1,024: out, d table, d w
  gather_dot     x . table[idx]: out, d table, d x
  peer_ffn       fused PEER forward + composed backward, gelu: y, d x, d u, d v, d g
  gmm_balanced   grouped matmul M = 8,192, K = 1,024, N = 512, 64 groups: out, d lhs, d rhs
  gmm_skewed     same, Zipf group sizes with empty groups
  block_sparse   block-sparse attention S = 4,096, causal & window 1,024, 8 heads, D = 128
Errors are max |a - b| / max |b| per output (relative to the output's scale); tolerances are
bf16-level (2e-2). Prints one table, writes JSON (benchmarks/results/kernel_parity-<platform>-
<date>.json), exits 1 when any check fails. Needs only jax: nothing to carry.
"""

from __future__ import annotations

import argparse
import sys
import traceback

import numpy as np

from _common import print_table, write_json  # noqa: F401  (also puts the repo on sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

TOL = 2e-2


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  scale = float(np.max(np.abs(b))) or 1.0
  return float(np.max(np.abs(a - b))) / scale


def vjp_all(fn, diff_args, rest, seed=0):
  """(out, grads of a random linear functional of out w.r.t. diff_args)."""
  def run(*diff):
    out, vjp = jax.vjp(lambda *d: fn(*d, *rest), *diff)
    ct = jax.random.normal(jax.random.key(seed), out.shape, jnp.float32).astype(out.dtype)
    return out, vjp(ct)
  return jax.jit(run)(*diff_args)


def compare(name, outs_k, outs_x, labels) -> dict:
  row = {"check": name}
  worst = 0.0
  for label, a, b in zip(labels, outs_k, outs_x):
    e = rel_err(a, b)
    row[label] = e
    worst = max(worst, e)
  row["ok"] = worst <= TOL
  return row


def randn(key, shape, dtype=jnp.bfloat16, scale=1.0):
  return (jax.random.normal(jax.random.key(key), shape, jnp.float32) * scale).astype(dtype)


def check_pk_topk(impl, smoke):
  from kernels_pallas.product_key_topk import product_key_topk
  t, h, n, c, k = (64, 2, 64, 32, 8) if smoke else (4096, 4, 1024, 64, 32)
  q1, q2 = randn(1, (t, h, c)), randn(2, (t, h, c))
  k1, k2 = randn(3, (h, n, c), scale=c ** -0.5), randn(4, (h, n, c), scale=c ** -0.5)

  def fn(impl_):
    def f(q1, q2, k1, k2):
      w, idx = product_key_topk(q1, q2, k1, k2, k, softmax=True, impl=impl_)
      return w, idx
    def loss(q1, q2, k1, k2, ct):
      w, _ = f(q1, q2, k1, k2)
      return jnp.sum(w * ct)
    ct = jax.random.normal(jax.random.key(9), (t, h, k), jnp.float32)
    w, idx = jax.jit(f)(q1, q2, k1, k2)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q1, q2, k1, k2, ct)
    return w, idx, grads

  wk, ik, gk = fn(impl)
  wx, ix, gx = fn("xla")
  rows_equal = np.all(np.asarray(ik) == np.asarray(ix), axis=-1)
  agree = float(np.mean(rows_equal))
  row = {"check": "pk_topk", "index_rows_equal": agree,
         "weights": rel_err(np.asarray(wk)[rows_equal], np.asarray(wx)[rows_equal])}
  # gradients: compare only when every row agrees (else a swapped key moves gradient mass)
  if agree == 1.0:
    for label, a, b in zip(("d_q1", "d_q2", "d_k1", "d_k2"), gk, gx):
      row[label] = rel_err(a, b)
  row["ok"] = agree >= 0.999 and all(v <= TOL for key, v in row.items()
                                     if key not in ("check", "index_rows_equal"))
  return row


def check_gather(impl, smoke):
  from kernels_pallas.gather_sum import gather_dot, gather_sum, peer_ffn
  t, s, n, d = (64, 16, 512, 64) if smoke else (4096, 128, 2 ** 18, 1024)
  table = randn(1, (n, d), scale=d ** -0.5)
  idx = jax.random.randint(jax.random.key(2), (t, s), 0, n, jnp.int32)
  idx = idx.at[:, 1].set(idx[:, 0])                       # duplicates within a token
  w = jax.random.uniform(jax.random.key(3), (t, s), jnp.float32)
  x = randn(4, (t, d))
  rows = []
  out_k = vjp_all(lambda tb, ww, i: gather_sum(tb, i, ww, impl=impl), (table, w), (idx,))
  out_x = vjp_all(lambda tb, ww, i: gather_sum(tb, i, ww, impl="xla"), (table, w), (idx,))
  rows.append(compare("gather_sum", (out_k[0], *out_k[1]), (out_x[0], *out_x[1]),
                      ("out", "d_table", "d_w")))
  out_k = vjp_all(lambda tb, xx, i: gather_dot(tb, i, xx, impl=impl), (table, x), (idx,))
  out_x = vjp_all(lambda tb, xx, i: gather_dot(tb, i, xx, impl="xla"), (table, x), (idx,))
  rows.append(compare("gather_dot", (out_k[0], *out_k[1]), (out_x[0], *out_x[1]),
                      ("out", "d_table", "d_x")))
  v = randn(5, (n, d), scale=d ** -0.5)
  g = jax.nn.softmax(jax.random.normal(jax.random.key(6), (t, s)), -1)
  peer = lambda impl_: (lambda xx, uu, vv, gg, i: peer_ffn(xx, uu, vv, i, gg, activation="gelu",
                                                            impl=impl_))
  out_k = vjp_all(peer(impl), (x, table, v, g), (idx,))
  out_x = vjp_all(peer("xla"), (x, table, v, g), (idx,))
  rows.append(compare("peer_ffn", (out_k[0], *out_k[1]), (out_x[0], *out_x[1]),
                      ("out", "d_x", "d_u", "d_v", "d_g")))
  return rows


def check_gmm(impl, smoke):
  from kernels_pallas.grouped_matmul import grouped_matmul
  m, k, n, e = (256, 64, 32, 8) if smoke else (8192, 1024, 512, 64)
  lhs, rhs = randn(1, (m, k)), randn(2, (e, k, n), scale=k ** -0.5)
  balanced = np.full((e,), m // e, np.int32)
  ranks = np.arange(1, e + 1, dtype=np.float64)
  zipf = np.floor(m * (1 / ranks) / np.sum(1 / ranks)).astype(np.int32)
  zipf[e // 2:e // 2 + 3] = 0                                  # empty groups
  zipf[0] += m - int(zipf.sum()) - 5                            # 5 rows in no group
  rows = []
  for name, sizes in (("gmm_balanced", balanced), ("gmm_skewed", zipf)):
    sizes = jnp.asarray(sizes)
    out_k = vjp_all(lambda a, b, s: grouped_matmul(a, b, s, impl=impl), (lhs, rhs), (sizes,))
    out_x = vjp_all(lambda a, b, s: grouped_matmul(a, b, s, impl="xla"), (lhs, rhs), (sizes,))
    rows.append(compare(name, (out_k[0], *out_k[1]), (out_x[0], *out_x[1]),
                        ("out", "d_lhs", "d_rhs")))
  return rows


def check_block_sparse(impl, smoke):
  from kernels_pallas.block_sparse_attention.layout import compile_layout
  from kernels_pallas.block_sparse_attention.ops import block_sparse_attention
  s, h, d, window, blk = (256, 2, 64, 64, 64) if smoke else (4096, 8, 128, 1024, 128)
  layout = compile_layout(f"causal&window:{window}", s, s, blk, blk)
  q, k, v = (randn(i, (1, s, h, d)) for i in (1, 2, 3))
  attend = lambda impl_: (lambda q, k, v: block_sparse_attention(q, k, v, layout, impl=impl_))
  out_k = vjp_all(attend(impl), (q, k, v), ())
  out_x = vjp_all(attend("xla"), (q, k, v), ())
  return compare("block_sparse", (out_k[0], *out_k[1]), (out_x[0], *out_x[1]),
                 ("out", "d_q", "d_k", "d_v"))


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--smoke", action="store_true", help="small shapes, interpret mode (CPU)")
  ap.add_argument("--json", default="")
  args = ap.parse_args()
  on_gpu = jax.default_backend() == "gpu"
  if not on_gpu and not args.smoke:
    print("no GPU: run with --smoke (interpret mode, small shapes)", file=sys.stderr)
    return 2
  impl = "pallas" if on_gpu else "interpret"
  rows = []
  for check in (check_pk_topk, check_gather, check_gmm, check_block_sparse):
    try:
      out = check(impl, args.smoke)
      rows.extend(out if isinstance(out, list) else [out])
    except Exception as e:  # record and go on: one broken kernel must not hide the others
      traceback.print_exc()
      rows.append({"check": check.__name__, "ok": False,
                   "error": f"{type(e).__name__}: {e}"[:300]})
  columns = ["check", "ok", "out", "weights", "index_rows_equal", "d_table", "d_w", "d_x",
             "d_u", "d_v", "d_g", "d_lhs", "d_rhs", "d_q", "d_k", "d_v", "d_q1", "d_k1",
             "error"]
  columns = [c for i, c in enumerate(columns) if c not in columns[:i]]
  print(f"device: {jax.devices()[0].device_kind}  impl={impl}  tolerance {TOL}")
  print_table(rows, [c for c in columns if any(c in r for r in rows)])
  path = write_json("kernel_parity", "smoke" if args.smoke else "", {
      "impl": impl, "tolerance": TOL, "rows": rows}, args.json)
  print(f"wrote {path}")
  return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
