"""Compile the Pallas kernels, forward and forward+backward, for a GPU (H100: Triton to a cubin)
or a TPU (v5e / v5p: Mosaic, inside libtpu's XLA:TPU compiler) on this host (no accelerator
needed): the compiler's verdict at the shapes the presets run.

    JAX_PLATFORMS=cpu <gpu-compiler python> benchmarks/kernel_compile.py          # H100, presets
    JAX_PLATFORMS=cpu <gpu-compiler python> benchmarks/kernel_compile.py --small  # what CI runs
    JAX_PLATFORMS=cpu PYTHONPATH=.tpu-compiler python benchmarks/kernel_compile.py --target v5e

The GPU compiler environment is jax plus the CUDA PJRT plugin (``jax-cuda13-plugin`` and
``jax-cuda13-pjrt`` of jax's version, ``--no-deps``); the TPU one is jax plus libtpu (see
docs/kernels.md, "Compile checks"). ``JAX_PLATFORMS`` defaults to cpu here. Cases
(``kernels_pallas/_aot_cases.py`` builders; on a TPU the kernels with a TPU implementation:
block-sparse attention through splash, the others with ``impl="mosaic"`` once it exists):

  kernel_parity       the shapes of benchmarks/kernel_parity.py (bf16 tables there)
  memory:<preset>     product-key top-k (n = sqrt(num_slots), C = d_key / 2, per-head keys,
                      softmax) and the weighted gather-sum read of the shared value table
                      (float32 params, S = heads x top_k) at configs/memory.py's GPU presets
  peer:<preset>       top-k with shared keys, the fused PEER kernel, and gather_dot + gather_sum
                      (the column-split path) at configs/peer.py's presets, float32 tables
  moe:<preset>        dropless grouped matmuls (M = tokens x top_k rows, the up / gate [D -> F]
                      and down [F -> D] products; moe.impl="pallas" runs them) at configs/moe.py
  sparse_attn:<preset>  block-sparse attention, batch = tokens // seq (at least 1), the layer's
                      blocks for the target (tuning table + explicit config blocks; on a TPU
                      rounded up to multiples of 128, what splash compiles: the shape column
                      names the layer's own blocks when they differ); TPU adds :tiny
  splash:8k-<mask>    (TPU) the 32k presets' BigBird and strided masks at 8k: splash evaluates
                      them densely on the host, which at 32k needs more memory than
                      --max_host_gib (those rows say so instead of compiling)
Tokens per device: ``--tokens`` (default 16384, 8 sequences of 2048). Identical cases of
several presets are compiled once. Prints one row per (case, direction): ok or the compiler's
message, compile seconds, then Triton kernels and cubins (GPU) or Mosaic kernels and the
tracing + lowering seconds (TPU; splash builds its mask tables there); writes JSON to
benchmarks/results/kernel_compile-<target>-<date>.json (or --json); exits 1 when any fails.
Compile times are CPU seconds on this host, not run times (nothing runs; no autotuning).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import math
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax: compile-only devices

from _common import REPO, print_table, write_json  # noqa: E402  (puts the repo on sys.path)

import jax.numpy as jnp  # noqa: E402
from tqdm import tqdm  # noqa: E402

from kernels_pallas import _aot, _aot_cases as cases  # noqa: E402

PRESETS = {"memory": ("125m", "350m", "760m", "1.3b"), "peer": ("125m", "350m", "760m"),
           "moe": ("125m", "350m"),
           "sparse_attn": ("8k-window", "8k-local-global", "32k-window", "32k-bigbird",
                           "32k-strided")}
# On a TPU also the CPU preset, whose blocks of 16 show the rounding to splash's 128.
TPU_EXTRA = {"sparse_attn": ("tiny",)}
# The 32k presets' dense-evaluated masks at 8k (the 32k ones take ~17 / ~28 GiB of host memory
# to build): 125m's heads and head_dim, blocks 128, 16384 tokens.
SPLASH_8K = {"splash:8k-bigbird": "bigbird:1024:64:3:128:seed=0",
             "splash:8k-strided": "strided:128:128"}
H100_KIND = "NVIDIA H100 80GB HBM3"
TARGETS = _aot.TARGETS + tuple(_aot.TPU_CHIPS)


class Target:
  """The compile target of a run: its impl per kernel and how to compile for it."""

  def __init__(self, name: str):
    self.name, self.tpu = name, name in _aot.TPU_CHIPS
    self.kernels = cases.TPU_KERNELS if self.tpu else cases.KERNELS

  def impl(self, kernel: str) -> str:
    if not self.tpu:
      return "pallas"
    return "splash" if kernel == "block_sparse_attention" else "mosaic"

  def available(self) -> bool:
    return _aot.libtpu_available() if self.tpu else _aot.plugin_available()

  def device_kind(self) -> str:
    if self.tpu:
      return str(_aot.tpu_device(self.name).device_kind)
    return str(_aot.gpu_mesh(self.name).devices.flat[0].device_kind)

  def compile(self, fn, args) -> _aot.CompileResult:
    if self.tpu:
      return _aot.compile_for_tpu(fn, args, chip=self.name)
    return _aot.compile_for_gpu(fn, args, target=self.name)


def parity_cases(t: Target) -> list:
  """benchmarks/kernel_parity.py's shapes."""
  n_tok, s, n, d = 4096, 128, 2 ** 18, 1024
  bf = jnp.bfloat16
  im = t.impl
  return [
      cases.pk_topk_case(tokens=n_tok, heads=4, subkeys=1024, half_dim=64, top_k=32),
      cases.gather_sum_case(tokens=n_tok, slots=s, rows=n, dim=d, table_dtype=bf,
                            impl=im("gather_sum")),
      cases.gather_dot_case(tokens=n_tok, slots=s, rows=n, dim=d, dtype=bf,
                            impl=im("gather_dot")),
      cases.peer_case(tokens=n_tok, slots=s, rows=n, dim=d, dtype=bf, impl=im("peer_ffn")),
      cases.gmm_case(m=8192, k=1024, n=512, groups=64, impl=im("grouped_matmul")),
      cases.block_sparse_case(seq=4096, heads=8, kv_heads=8, head_dim=128,
                              mask="causal&window:1024", block_q=128, block_kv=128,
                              impl=im("block_sparse_attention")),
  ]


def _load(family: str, preset: str):
  from sparsejax.configure import load_config  # defers sparsejax (not needed for --small)
  return load_config(f"{REPO / 'configs' / family}.py:{preset}")


def _attention_blocks(cfg, seq: int, t: Target):
  """The layer's block sizes and launch parameters on the target
  (BlockSparseAttention.block_config with the target's device kind instead of the host's)."""
  from kernels_pallas.block_sparse_attention import tuning  # defers to preset mode
  tuned = tuning.choose(H100_KIND if not t.tpu else t.device_kind(), cfg.head_dim, seq)
  a = cfg.attention
  bq = tuned.block_q if a.block_q == 0 else min(a.block_q, seq)
  bkv = tuned.block_kv if a.block_kv == 0 else min(a.block_kv, seq)
  return tuned if (bq, bkv) == (tuned.block_q, tuned.block_kv) else tuning.BlockConfig(bq, bkv)


def config_cases(family: str, preset: str, tokens: int, t: Target) -> list:
  cfg = _load(family, preset)
  d = cfg.model.d_model
  compute = jnp.dtype(cfg.model.compute_dtype)
  params = jnp.dtype(cfg.model.param_dtype)
  im = t.impl
  if family == "memory":
    m = cfg.memory
    return [cases.pk_topk_case(tokens=tokens, heads=m.num_heads, subkeys=math.isqrt(m.num_slots),
                               half_dim=m.d_key // 2, top_k=m.top_k, dtype=compute),
            cases.gather_sum_case(tokens=tokens, slots=m.num_heads * m.top_k, rows=m.num_slots,
                                  dim=d, table_dtype=params, impl=im("gather_sum"))]
  if family == "peer":
    p = cfg.peer
    s = p.num_heads * p.top_k
    return [cases.pk_topk_case(tokens=tokens, heads=p.num_heads,
                               subkeys=math.isqrt(p.num_experts), half_dim=p.d_key // 2,
                               top_k=p.top_k, shared_keys=p.shared_keys,
                               softmax=p.score == "softmax", dtype=compute),
            cases.peer_case(tokens=tokens, slots=s, rows=p.num_experts, dim=d,
                            activation=p.activation, dtype=params, impl=im("peer_ffn")),
            cases.gather_dot_case(tokens=tokens, slots=s, rows=p.num_experts, dim=d,
                                  dtype=params, impl=im("gather_dot")),
            cases.gather_sum_case(tokens=tokens, slots=s, rows=p.num_experts, dim=d,
                                  table_dtype=params, impl=im("gather_sum"))]
  if family == "moe":
    from sparsejax.layers.moe_config import sizes  # defers to preset mode
    e, k, f = sizes(cfg)
    im_gmm = im("grouped_matmul")
    return [cases.gmm_case(m=tokens * k, k=d, n=f, groups=e, dtype=compute, impl=im_gmm),
            cases.gmm_case(m=tokens * k, k=f, n=d, groups=e, dtype=compute, impl=im_gmm)]
  if family == "sparse_attn":
    seq = cfg.data.seq_len
    bc = _attention_blocks(cfg, seq, t)
    bq, bkv = cases.splash_blocks(bc.block_q, bc.block_kv) if t.tpu else (bc.block_q,
                                                                           bc.block_kv)
    case = cases.block_sparse_case(seq=seq, heads=cfg.model.num_heads,
                                   kv_heads=cfg.model.num_kv_heads, head_dim=cfg.head_dim,
                                   mask=cfg.attention.mask, block_q=bq, block_kv=bkv,
                                   batch=max(1, tokens // seq), dtype=compute,
                                   num_warps=bc.num_warps, num_stages=bc.num_stages,
                                   impl=im("block_sparse_attention"))
    if (bq, bkv) != (bc.block_q, bc.block_kv):
      case = dataclasses.replace(case, shape=f"{case.shape} (layer: {bc.block_q}x{bc.block_kv})")
    return [case]
  raise ValueError(f"no kernels for config family {family!r}")


def collect(args, t: Target) -> list[tuple[list[str], cases.Case]]:
  """[(sources, case)] with identical (kernel, shape) cases merged; on a TPU only the kernels
  whose TPU impl exists (the others are listed in the output's ``missing``)."""
  found: dict[tuple[str, str], tuple[list[str], cases.Case]] = {}
  usable = set(t.kernels) - set(cases.tpu_missing() if t.tpu else ())

  def add(source, case):
    if case.kernel in usable:
      found.setdefault((case.kernel, case.shape), ([], case))[0].append(source)

  if args.small:
    for case in cases.tpu_small_cases() if t.tpu else cases.small_cases():
      add("small", case)
    return list(found.values())
  for case in parity_cases(t):
    add("kernel_parity", case)
  for source, mask in SPLASH_8K.items() if t.tpu else ():
    add(source, cases.block_sparse_case(seq=8192, heads=12, kv_heads=12, head_dim=64, mask=mask,
                                        block_q=128, block_kv=128, batch=2, impl="splash"))
  for family, presets in PRESETS.items():
    extra = TPU_EXTRA.get(family, ()) if t.tpu else ()
    for preset in presets + extra:
      cfg_cases = [c for c in config_cases(family, preset, args.tokens, t) if c.kernel in usable]
      for case in cfg_cases:
        add(f"{family}:{preset}", case)
  return list(found.values())


def _environment_error(t: Target) -> str:
  if t.tpu:
    return (f"libtpu is not installed in this environment: pip install --no-deps --target "
            f".tpu-compiler {_aot.TPU_PACKAGE} (the version jax[tpu] pins) and put .tpu-compiler "
            "on PYTHONPATH (docs/kernels.md, 'Compile checks')")
  return (f"the CUDA PJRT plugin is not installed in this environment: pip install --no-deps "
          f"{_aot.PLUGIN_PACKAGES} (jax's version), or use the GPU compiler environment "
          "(docs/kernels.md, 'Compile checks')")


def _row(case, direction: str, want: int, res: _aot.CompileResult, sources, t: Target) -> dict:
  if t.tpu:
    ok = res.ok and res.kernels >= want
    extra = {"mosaic_kernels": res.kernels, "lower_s": round(res.lower_seconds, 2)}
    short = f"expected >= {want} Mosaic kernels, got {res.kernels}"
  else:
    ok = res.ok and res.cubins >= 1 and res.kernels >= want
    extra = {"triton_kernels": res.kernels, "cubins": res.cubins,
             "executable_bytes": res.executable_bytes}
    short = f"expected >= {want} Triton kernels and a cubin, got {res.kernels} and {res.cubins}"
  return {"kernel": case.kernel, "direction": direction, "shape": case.shape,
          "presets": " ".join(sources), "ok": ok, "compile_s": round(res.seconds, 2), **extra,
          "message": res.message or ("" if ok else short)}


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--small", action="store_true", help="one small case per kernel (CI)")
  ap.add_argument("--target", default="h100", choices=TARGETS)
  ap.add_argument("--tokens", type=int, default=16384, help="tokens per device (preset cases)")
  ap.add_argument("--kernels", default="", help=f"comma-separated subset of {cases.KERNELS}")
  ap.add_argument("--json", default="", help="output path (default benchmarks/results/...)")
  ap.add_argument("--max_host_gib", type=float, default=8.0,
                  help="skip (as a failed row) cases whose kernel needs more host memory to "
                  "build: splash's dense head masks (Case.host_bytes)")
  args = ap.parse_args()
  t = Target(args.target)
  if not t.available():
    print(_environment_error(t), file=sys.stderr)
    return 2
  wanted = set(filter(None, args.kernels.split(","))) or set(cases.KERNELS)
  if wanted - set(cases.KERNELS):
    print(f"--kernels: unknown {sorted(wanted - set(cases.KERNELS))}; choose from "
          f"{', '.join(cases.KERNELS)}", file=sys.stderr)
    return 2
  missing = cases.tpu_missing() if t.tpu else []
  for kernel in missing:
    print(f"note: {kernel} has no TPU implementation yet ({kernel}'s ops IMPLS lack "
          f"{t.impl(kernel)!r}): no {args.target} cases for it", file=sys.stderr)
  todo = [(src, c) for src, c in collect(args, t) if c.kernel in wanted]
  rows, start = [], time.perf_counter()
  bar = tqdm(total=2 * len(todo), desc=f"compiling for {args.target}", unit="compile")
  for sources, case in todo:
    for direction, fn, want in (("fwd", case.forward, case.kernels[0]),
                                ("fwd+bwd", case.backward, case.kernels[1])):
      bar.set_postfix_str(f"{case.kernel} {direction}")
      if case.host_bytes > args.max_host_gib * 2 ** 30:
        res = _aot.CompileResult(False, 0.0, args.target, message=(
            f"not compiled: building the kernel takes ~{case.host_bytes / 2 ** 30:.0f} GiB of "
            f"host memory (splash's dense head masks), over --max_host_gib {args.max_host_gib:g}"))
      else:
        res = t.compile(fn, case.args)
      rows.append(_row(case, direction, want, res, sources, t))
      bar.update()
  bar.close()
  kind = t.device_kind()
  print(f"target {args.target} ({kind}), deviceless compile on {os.cpu_count()} CPUs, "
        f"{time.perf_counter() - start:.0f} s")
  counts = ["mosaic_kernels", "lower_s"] if t.tpu else ["triton_kernels", "cubins"]
  print_table(rows, ["kernel", "direction", "shape", "presets", "ok", "compile_s", *counts,
                     "message"])
  tag = "small" if args.small else f"{datetime.date.today():%Y%m%d}"
  path = args.json or str(REPO / "benchmarks" / "results" /
                          f"kernel_compile-{args.target}-{tag}.json")
  compiler = (f"libtpu {importlib.metadata.version('libtpu')}" if t.tpu else
              f"jax-cuda13-plugin {importlib.metadata.version('jax-cuda13-plugin')}")
  write_json("kernel_compile", tag, {
      "target": args.target, "device_kind": kind,
      "platform": f"{'tpu' if t.tpu else 'cuda'} (deviceless compile)",
      "compiler": compiler, "plugin": None if t.tpu else compiler,
      "tokens_per_device": None if args.small else args.tokens,
      "missing": [f"{k}: no impl={t.impl(k)!r} yet" for k in missing], "rows": rows}, path)
  print(f"wrote {path}")
  failed = [r for r in rows if not r["ok"]]
  for r in failed:
    print(f"FAILED {r['kernel']} {r['direction']} [{r['shape']}]: {r['message']}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
