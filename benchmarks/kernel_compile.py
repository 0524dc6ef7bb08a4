"""Compile every Pallas GPU kernel, forward and forward+backward, to a cubin for an H100 on this
host (no GPU needed): the compiler's verdict at the shapes the presets run.

    JAX_PLATFORMS=cpu <gpu-compiler python> benchmarks/kernel_compile.py          # preset shapes
    JAX_PLATFORMS=cpu <gpu-compiler python> benchmarks/kernel_compile.py --small  # what CI runs

The GPU compiler environment is jax plus the CUDA PJRT plugin (``jax-cuda13-plugin`` and
``jax-cuda13-pjrt`` of jax's version, ``--no-deps``; see docs/kernels.md, "Compile checks").
``JAX_PLATFORMS`` defaults to cpu here. Cases (``kernels_pallas/_aot_cases.py`` builders):

  kernel_parity       the shapes of benchmarks/kernel_parity.py (bf16 tables there)
  memory:<preset>     product-key top-k (n = sqrt(num_slots), C = d_key / 2, per-head keys,
                      softmax) and the weighted gather-sum read of the shared value table
                      (float32 params, S = heads x top_k) at configs/memory.py's GPU presets
  peer:<preset>       top-k with shared keys, the fused PEER kernel, and gather_dot + gather_sum
                      (the column-split path) at configs/peer.py's presets, float32 tables
  moe:<preset>        dropless grouped matmuls (M = tokens x top_k rows, the up / gate [D -> F]
                      and down [F -> D] products; moe.impl="pallas" runs them) at configs/moe.py
  sparse_attn:<preset>  block-sparse attention, batch = tokens // seq (at least 1), the layer's
                      blocks for an H100 (tuning table + explicit config blocks)
Tokens per device: ``--tokens`` (default 16384, 8 sequences of 2048). Identical cases of
several presets are compiled once. Prints one row per (case, direction): ok or the compiler's
message, compile seconds, Triton kernels in the HLO, cubins in the executable; writes JSON to
benchmarks/results/kernel_compile-<target>-<date>.json (or --json); exits 1 when any fails.
Compile times are CPU seconds on this host, not GPU run times (nothing runs; no autotuning).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import math
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax: compile-only GPU devices

from _common import REPO, print_table, write_json  # noqa: E402  (puts the repo on sys.path)

import jax.numpy as jnp  # noqa: E402
from tqdm import tqdm  # noqa: E402

from kernels_pallas import _aot, _aot_cases as cases  # noqa: E402

PRESETS = {"memory": ("125m", "350m", "760m", "1.3b"), "peer": ("125m", "350m", "760m"),
           "moe": ("125m", "350m"),
           "sparse_attn": ("8k-window", "8k-local-global", "32k-window", "32k-bigbird",
                           "32k-strided")}
H100_KIND = "NVIDIA H100 80GB HBM3"


def parity_cases() -> list:
  """benchmarks/kernel_parity.py's shapes."""
  t, s, n, d = 4096, 128, 2 ** 18, 1024
  bf = jnp.bfloat16
  return [
      cases.pk_topk_case(tokens=t, heads=4, subkeys=1024, half_dim=64, top_k=32),
      cases.gather_sum_case(tokens=t, slots=s, rows=n, dim=d, table_dtype=bf),
      cases.gather_dot_case(tokens=t, slots=s, rows=n, dim=d, dtype=bf),
      cases.peer_case(tokens=t, slots=s, rows=n, dim=d, dtype=bf),
      cases.gmm_case(m=8192, k=1024, n=512, groups=64),
      cases.block_sparse_case(seq=4096, heads=8, kv_heads=8, head_dim=128,
                              mask="causal&window:1024", block_q=128, block_kv=128),
  ]


def _load(family: str, preset: str):
  from sparsejax.configure import load_config  # defers sparsejax (not needed for --small)
  return load_config(f"{REPO / 'configs' / family}.py:{preset}")


def _attention_blocks(cfg, seq: int):
  """The layer's block sizes and launch parameters on an H100 (BlockSparseAttention.block_config
  with the target's device kind instead of the host's)."""
  from kernels_pallas.block_sparse_attention import tuning  # defers to preset mode
  tuned = tuning.choose(H100_KIND, cfg.head_dim, seq)
  a = cfg.attention
  bq = tuned.block_q if a.block_q == 0 else min(a.block_q, seq)
  bkv = tuned.block_kv if a.block_kv == 0 else min(a.block_kv, seq)
  return tuned if (bq, bkv) == (tuned.block_q, tuned.block_kv) else tuning.BlockConfig(bq, bkv)


def config_cases(family: str, preset: str, tokens: int) -> list:
  cfg = _load(family, preset)
  d = cfg.model.d_model
  compute = jnp.dtype(cfg.model.compute_dtype)
  params = jnp.dtype(cfg.model.param_dtype)
  if family == "memory":
    m = cfg.memory
    return [cases.pk_topk_case(tokens=tokens, heads=m.num_heads, subkeys=math.isqrt(m.num_slots),
                               half_dim=m.d_key // 2, top_k=m.top_k, dtype=compute),
            cases.gather_sum_case(tokens=tokens, slots=m.num_heads * m.top_k, rows=m.num_slots,
                                  dim=d, table_dtype=params)]
  if family == "peer":
    p = cfg.peer
    s = p.num_heads * p.top_k
    return [cases.pk_topk_case(tokens=tokens, heads=p.num_heads,
                               subkeys=math.isqrt(p.num_experts), half_dim=p.d_key // 2,
                               top_k=p.top_k, shared_keys=p.shared_keys,
                               softmax=p.score == "softmax", dtype=compute),
            cases.peer_case(tokens=tokens, slots=s, rows=p.num_experts, dim=d,
                            activation=p.activation, dtype=params),
            cases.gather_dot_case(tokens=tokens, slots=s, rows=p.num_experts, dim=d,
                                  dtype=params),
            cases.gather_sum_case(tokens=tokens, slots=s, rows=p.num_experts, dim=d,
                                  table_dtype=params)]
  if family == "moe":
    from sparsejax.layers.moe_config import sizes  # defers to preset mode
    e, k, f = sizes(cfg)
    return [cases.gmm_case(m=tokens * k, k=d, n=f, groups=e, dtype=compute),
            cases.gmm_case(m=tokens * k, k=f, n=d, groups=e, dtype=compute)]
  if family == "sparse_attn":
    seq = cfg.data.seq_len
    bc = _attention_blocks(cfg, seq)
    return [cases.block_sparse_case(seq=seq, heads=cfg.model.num_heads,
                                    kv_heads=cfg.model.num_kv_heads, head_dim=cfg.head_dim,
                                    mask=cfg.attention.mask, block_q=bc.block_q,
                                    block_kv=bc.block_kv, batch=max(1, tokens // seq),
                                    dtype=compute, num_warps=bc.num_warps,
                                    num_stages=bc.num_stages)]
  raise ValueError(f"no kernels for config family {family!r}")


def collect(args) -> list[tuple[list[str], cases.Case]]:
  """[(sources, case)] with identical (kernel, shape) cases merged."""
  found: dict[tuple[str, str], tuple[list[str], cases.Case]] = {}

  def add(source, case):
    found.setdefault((case.kernel, case.shape), ([], case))[0].append(source)

  if args.small:
    for case in cases.small_cases():
      add("small", case)
    return list(found.values())
  for case in parity_cases():
    add("kernel_parity", case)
  for family, presets in PRESETS.items():
    for preset in presets:
      for case in config_cases(family, preset, args.tokens):
        add(f"{family}:{preset}", case)
  return list(found.values())


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--small", action="store_true", help="one small case per kernel (CI)")
  ap.add_argument("--target", default="h100", choices=_aot.TARGETS)
  ap.add_argument("--tokens", type=int, default=16384, help="tokens per device (preset cases)")
  ap.add_argument("--kernels", default="", help=f"comma-separated subset of {cases.KERNELS}")
  ap.add_argument("--json", default="", help="output path (default benchmarks/results/...)")
  args = ap.parse_args()
  if not _aot.plugin_available():
    print(f"the CUDA PJRT plugin is not installed in this environment: pip install --no-deps "
          f"{_aot.PLUGIN_PACKAGES} (jax's version), or use the GPU compiler environment "
          "(docs/kernels.md, 'Compile checks')", file=sys.stderr)
    return 2
  wanted = set(filter(None, args.kernels.split(","))) or set(cases.KERNELS)
  if wanted - set(cases.KERNELS):
    print(f"--kernels: unknown {sorted(wanted - set(cases.KERNELS))}; choose from "
          f"{', '.join(cases.KERNELS)}", file=sys.stderr)
    return 2
  todo = [(src, c) for src, c in collect(args) if c.kernel in wanted]
  rows, start = [], time.perf_counter()
  bar = tqdm(total=2 * len(todo), desc=f"compiling for {args.target}", unit="compile")
  for sources, case in todo:
    for direction, fn, want in (("fwd", case.forward, case.kernels[0]),
                                ("fwd+bwd", case.backward, case.kernels[1])):
      bar.set_postfix_str(f"{case.kernel} {direction}")
      res = _aot.compile_for_gpu(fn, case.args, target=args.target)
      ok = res.ok and res.cubins >= 1 and res.triton_kernels >= want
      message = res.message or ("" if ok else f"expected >= {want} Triton kernels and a cubin, "
                                f"got {res.triton_kernels} and {res.cubins}")
      rows.append({"kernel": case.kernel, "direction": direction, "shape": case.shape,
                   "presets": " ".join(sources), "ok": ok, "compile_s": round(res.seconds, 2),
                   "triton_kernels": res.triton_kernels, "cubins": res.cubins,
                   "executable_bytes": res.executable_bytes, "message": message})
      bar.update()
  bar.close()
  print(f"target {args.target} ({_aot.gpu_mesh(args.target).devices.flat[0].device_kind}), "
        f"deviceless compile on {os.cpu_count()} CPUs, {time.perf_counter() - start:.0f} s")
  print_table(rows, ["kernel", "direction", "shape", "presets", "ok", "compile_s",
                     "triton_kernels", "cubins", "message"])
  tag = "small" if args.small else f"{datetime.date.today():%Y%m%d}"
  path = args.json or str(REPO / "benchmarks" / "results" /
                          f"kernel_compile-{args.target}-{tag}.json")
  kind = str(_aot.gpu_mesh(args.target).devices.flat[0].device_kind)
  write_json("kernel_compile", tag, {
      "target": args.target, "platform": "cuda (deviceless compile)", "device_kind": kind,
      "plugin": f"jax-cuda13-plugin {importlib.metadata.version('jax-cuda13-plugin')}",
      "tokens_per_device": None if args.small else args.tokens, "rows": rows}, path)
  print(f"wrote {path}")
  failed = [r for r in rows if not r["ok"]]
  for r in failed:
    print(f"FAILED {r['kernel']} {r['direction']} [{r['shape']}]: {r['message']}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
