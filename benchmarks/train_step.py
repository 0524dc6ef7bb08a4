#!/usr/bin/env python
"""Train-step throughput and MFU of a sparsejax config on synthetic tokens (no dataset needed).

  python benchmarks/train_step.py --config configs/dense.py:350m --batch 8 --seq 2048 \
      --variants "remat=none;remat=dots_no_batch;remat=full"

Measures the square-matmul ceiling (bf16; also f32 on CPU and any variant's compute dtype) before
and after the sweep, and MFU against the best of the two (same-run peer). Each variant builds the
sharded state and jits the step as sparsejax/train/loop.py does (same shardings, state donated),
times compilation, runs --warmup steps, times --steps dispatched back to back with one block at
the end (step_ms_mean, tokens_per_s, MFU) and --blocked-steps blocked one by one (median, min).
FLOPs per token: sparsejax.models.accounting (6 x matmul weights incl. head + causal attention
6*T*H*Dh per layer; remat recomputation not counted). Single process. sparsejax (and so
ml_collections) is imported lazily so that --help works without it; grain/tensorboardX never.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import gc
import json
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import time

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a plain checkout (the GPU machine has no install)
  sys.path.insert(0, str(REPO))

ALIASES = {"batch": "data.global_batch_size", "seq": "data.seq_len",
           "accum": "train.grad_accum_steps", "dtype": "model.compute_dtype"}
GIB = 1024 ** 3


def matmul_tflops(n: int, dtype: str, reps: int, inner: int) -> float:
  """Best-of-`reps` TFLOP/s of an n x n x n matmul; each rep dispatches `inner` back to back."""
  a, b = (jax.random.normal(k, (n, n), dtype) for k in jax.random.split(jax.random.key(0)))
  f = jax.jit(lambda x, y: x @ y)
  for _ in range(2):  # compile, warm up
    f(a, b).block_until_ready()
  best_s = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = f(a, b)
    out.block_until_ready()
    best_s = min(best_s, (time.perf_counter() - t0) / inner)
  return 2.0 * n ** 3 / best_s / 1e12


def resolve_key(key: str) -> str:
  """``remat`` -> ``model.remat``: an alias, or a field name unique across config sections."""
  from sparsejax.configure import with_defaults
  if "." in key or key in ALIASES:
    return ALIASES.get(key, key)
  hits = [f"{sec}.{key}" for sec, fields in with_defaults({}).to_dict().items()
          if isinstance(fields, dict) and key in fields]
  if len(hits) != 1:
    why = f"ambiguous ({', '.join(hits)})" if hits else "unknown"
    raise SystemExit(f"override key {key!r}: {why}; write section.key")
  return hits[0]


def parse_overrides(text: str) -> dict:
  """``"remat=full, compute_dtype=float32"`` -> dotted dict (a comma splits only before key=)."""
  out = {}
  for pair in re.split(r",(?=\s*[\w.]+\s*=)", text.strip()):
    if pair.strip():
      key, sep, value = pair.partition("=")
      if not sep:
        raise SystemExit(f"override {pair!r}: expected key=value")
      try:
        out[resolve_key(key.strip())] = ast.literal_eval(value.strip())
      except (ValueError, SyntaxError):
        out[resolve_key(key.strip())] = value.strip()
  return out


def parse_variants(text: str | None) -> list[tuple[str, dict]]:
  """``"a=1;a=2"`` or a JSON list of strings / dicts (a dict may carry a "name")."""
  if not text:
    return [("base", {})]
  items = json.loads(text) if text.lstrip().startswith("[") else text.split(";")
  variants = []
  for item in items:
    if isinstance(item, dict):
      item = dict(item)
      name = item.pop("name", None) or ",".join(f"{k}={v}" for k, v in item.items())
      variants.append((name, {resolve_key(k): v for k, v in item.items()}))
    elif item.strip():
      variants.append((item.strip(), parse_overrides(item)))
  return variants


def vocab_of(cfg, vocab: int) -> int:
  tok = cfg.data.tokenizer
  if vocab or cfg.model.vocab_size or tok == "byte":
    return vocab or cfg.model.vocab_size or 257  # ByteTokenizer: 256 bytes + eos
  if tok.startswith("bpe:"):
    return int(tok.split(":", 1)[1])
  raise SystemExit(f"cannot infer the vocabulary of tokenizer {tok!r}; pass --vocab")


def run_variant(cfg, vocab: int, args, ceilings: dict, nominal: float | None) -> dict:
  from sparsejax.layers import registry
  from sparsejax.models import accounting as flops
  from sparsejax.parallel import mesh as mesh_lib
  from sparsejax.parallel import sharding as shd
  from sparsejax.train import step as steplib
  from sparsejax.train.optim import make_optimizer
  from sparsejax.train.state import init_state, model_spec

  devices = jax.devices()
  mesh, rules = mesh_lib.make_mesh(cfg.mesh, devices), registry.logical_rules(cfg.mesh)
  spec, optimizer = model_spec(cfg, vocab), make_optimizer(cfg)
  counts = flops.count(spec.abstract_model, cfg)
  b, t = cfg.data.global_batch_size, cfg.data.seq_len
  res = {"batch": b, "seq_len": t, "grad_accum_steps": cfg.train.grad_accum_steps,
         "compute_dtype": cfg.model.compute_dtype, "param_dtype": cfg.model.param_dtype,
         "remat": cfg.model.remat, "attention_impl": cfg.attention.impl,
         "tokens_per_step": b * t, "params_total": counts.params_total,
         "params_non_embedding": counts.params_non_embedding,
         "params_active_per_token": counts.params_active_per_token,
         "flops_per_token": counts.flops_per_token}
  micro = b // cfg.train.grad_accum_steps
  if micro % shd.batch_shards(mesh, rules):
    raise ValueError(f"micro-batch {micro} does not divide by the mesh's batch shards")

  state, shardings = init_state(spec, mesh, optimizer)
  batch_sh = shd.batch_sharding(mesh, rules)
  tokens = np.random.default_rng(0).integers(0, vocab, (b, t + 1), dtype=np.int32)
  batch = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, batch_sh)
  with shd.activation_sharding(mesh, rules):  # constraints apply while tracing, as in loop.py
    fn = steplib.jit_train_step(spec.graphdef, cfg, optimizer, shardings, batch_sh)
    t0 = time.perf_counter()
    compiled = fn.lower(state, batch).compile()
    res["compile_s"] = time.perf_counter() - t0
  cost = compiled.cost_analysis()  # XLA's count: includes remat recomputation (HFU-like)
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  res["xla_flops_per_step_per_device"] = cost.get("flops")
  mem = compiled.memory_analysis()
  res["compiled_bytes"] = mem and {k: getattr(mem, f"{k}_size_in_bytes", None)
                                   for k in ("argument", "output", "alias", "temp")}

  for _ in range(args.warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(args.steps):  # async dispatch: the host runs ahead, as in training
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  step_s = (time.perf_counter() - t0) / args.steps
  blocked_s = []
  for _ in range(args.blocked_steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    blocked_s.append(time.perf_counter() - t0)
  tflops_dev = counts.flops_per_token * b * t / step_s / len(devices) / 1e12
  res.update(loss_last=float(metrics["loss"]), step_ms_mean=1e3 * step_s,
             step_ms_median=1e3 * statistics.median(blocked_s) if blocked_s else None,
             step_ms_min=1e3 * min(blocked_s) if blocked_s else None,
             tokens_per_s=b * t / step_s, model_tflops_per_s_per_device=tflops_dev,
             ceiling_dtype=cfg.model.compute_dtype,
             mfu_vs_ceiling=tflops_dev / ceilings[cfg.model.compute_dtype]["tflops"],
             mfu_vs_nominal=tflops_dev / nominal if nominal else None,
             # process-wide peak since start (cumulative over variants); None on CPU
             peak_bytes_in_use=(devices[0].memory_stats() or {}).get("peak_bytes_in_use"))
  return res


def environment() -> dict:
  import flax
  import jaxlib
  import optax
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                            text=True, timeout=10).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    commit = None
  dev = jax.devices()[0]
  return {"platform": dev.platform, "device_kind": dev.device_kind,
          "device_count": jax.device_count(), "process_count": jax.process_count(),
          "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "python": platform.python_version(),
          "cpu_count": os.cpu_count(), "git_commit": commit,
          "env": {k: v for k, v in os.environ.items() if k.startswith(("JAX_", "XLA_"))},
          "date": datetime.datetime.now().isoformat(timespec="seconds"),
          "loadavg_start": os.getloadavg()}


def print_table(rows: list[dict]) -> None:
  cols = [("compile_s", "{:.1f}", "compile_s"), ("step_ms", "{:.1f}", "step_ms_mean"),
          ("med_ms", "{:.1f}", "step_ms_median"), ("min_ms", "{:.1f}", "step_ms_min"),
          ("tok/s", "{:,.0f}", "tokens_per_s"),
          ("TFLOP/s/dev", "{:.3g}", "model_tflops_per_s_per_device"),
          ("MFU_ceil", "{:.1%}", "mfu_vs_ceiling"), ("MFU_nominal", "{:.1%}", "mfu_vs_nominal"),
          ("peak_GiB", "{:.2f}", "peak_gib"), ("loss", "{:.3f}", "loss_last")]
  table = [["variant"] + [c[0] for c in cols]]
  for r in rows:
    r = {**r, "peak_gib": r["peak_bytes_in_use"] / GIB if r.get("peak_bytes_in_use") else None}
    table.append([r["name"]] + ([f"ERROR {r['error'][:120]}"] if r.get("error") else
                                [fmt.format(r[k]) if r.get(k) is not None else "-"
                                 for _, fmt, k in cols]))
  widths = [max(len(row[i]) for row in table if len(row) > 2 or i == 0)
            for i in range(len(cols) + 1)]
  for row in table:
    print("  ".join(cell.ljust(widths[0]) if i == 0 else cell if len(row) == 2 else
                    cell.rjust(widths[i]) for i, cell in enumerate(row)))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/dense.py:tiny", help="file.py:preset")
  p.add_argument("--override", action="append", default=[], help="key=value (repeatable)")
  p.add_argument("--variants", help='"remat=none;remat=full" or a JSON list of override dicts')
  p.add_argument("--batch", type=int, help="data.global_batch_size (default: the config's)")
  p.add_argument("--seq", type=int, help="data.seq_len (default: the config's)")
  p.add_argument("--accum", type=int, help="train.grad_accum_steps (default: the config's)")
  p.add_argument("--vocab", type=int, default=0, help="default: model.vocab_size or tokenizer")
  p.add_argument("--steps", type=int, default=10, help="timed async steps (>= 1)")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--blocked-steps", type=int, default=None, help="default: --steps; 0 skips")
  p.add_argument("--matmul-n", type=int, default=0, help="default: 8192 on GPU/TPU, 1024 CPU")
  p.add_argument("--json", help="output path (default: benchmarks/results/...)")
  args = p.parse_args(argv)
  args.steps = max(args.steps, 1)
  args.blocked_steps = args.steps if args.blocked_steps is None else args.blocked_steps
  try:
    import ml_collections  # noqa: F401  sparsejax.config imports it at module level
  except ImportError:
    raise SystemExit("ml_collections is missing (sparsejax.config needs it); on the GPU machine "
                     "carry its wheel, see benchmarks/README.md") from None
  from sparsejax.configure import load_config, replace
  from sparsejax.parallel import hardware

  base = {}
  for flag, key in (("batch", "data.global_batch_size"), ("seq", "data.seq_len"),
                    ("accum", "train.grad_accum_steps")):
    if getattr(args, flag) is not None:
      base[key] = getattr(args, flag)
  for text in args.override:
    base.update(parse_overrides(text))
  cfg0 = load_config(args.config, **base)
  variants = [(name, ov, replace(cfg0, **ov) if ov else cfg0)
              for name, ov in parse_variants(args.variants)]
  env = environment()
  on_cpu = env["platform"] == "cpu"
  n = args.matmul_n or (1024 if on_cpu else 8192)
  reps, inner = (5, 3) if on_cpu else (10, 10)
  dtypes = sorted({"bfloat16", *(["float32"] if on_cpu else []),
                   *(c.model.compute_dtype for _, _, c in variants)})
  ceilings = {d: {"n": n, "dtype": d, "tflops_start": matmul_tflops(n, d, reps, inner)}
              for d in dtypes}
  for c in ceilings.values():
    c["tflops"] = c["tflops_start"]
  nominal = hardware.peak_tflops(env["device_kind"])
  print(f"{env['device_kind']} x{env['device_count']}  jax {env['jax']}  matmul {n}^3: " +
        ", ".join(f"{d} {c['tflops_start']:.3g} TFLOP/s" for d, c in ceilings.items()) +
        f"  nominal bf16 peak: {nominal or '-'}", flush=True)

  out = pathlib.Path(args.json) if args.json else (
      REPO / "benchmarks" / "results" /
      f"train_step-{env['platform']}-{cfg0.name}-{datetime.date.today():%Y%m%d}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  rows = []

  def write():  # after every variant too: a run killed at its time limit keeps what it measured
    out.write_text(json.dumps({"script": "benchmarks/train_step.py", "argv": sys.argv[1:],
                               "config": args.config, "config_name": cfg0.name,
                               "base_overrides": base, "environment": env,
                               "matmul_ceiling": ceilings, "nominal_peak_tflops": nominal,
                               "variants": rows}, indent=1, default=str) + "\n")

  for name, ov, cfg in variants:
    print(f"[{name}] batch {cfg.data.global_batch_size} x seq {cfg.data.seq_len} ...", flush=True)
    try:
      row = {"name": name, "overrides": ov,
             **run_variant(cfg, vocab_of(cfg, args.vocab), args, ceilings, nominal)}
    except Exception as e:  # one failing variant (e.g. out of memory) must not end the sweep
      row = {"name": name, "overrides": ov, "error": f"{type(e).__name__}: {e}".split("\n")[0]}
    rows.append(row)
    print(json.dumps(row), flush=True)
    write()
    jax.clear_caches()
    gc.collect()
  for c in ceilings.values():  # again after the sweep (GPU clocks ramp up); keep the best
    c["tflops_end"] = matmul_tflops(c["n"], c["dtype"], reps, inner)
    c["tflops"] = max(c["tflops_start"], c["tflops_end"])
  for r in rows:
    if "error" not in r:
      r["mfu_vs_ceiling"] = (r["model_tflops_per_s_per_device"] /
                             ceilings[r["ceiling_dtype"]]["tflops"])
  env["loadavg_end"] = os.getloadavg()
  write()
  print(f"\n{args.config}  overrides {base or '-'}  matmul ceiling TFLOP/s: " +
        ", ".join(f"{d} {c['tflops']:.3g}" for d, c in ceilings.items()))
  print_table(rows)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
