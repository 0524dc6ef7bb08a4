"""Layer loop vs scanned layers (``config.model.scan_layers``): compile time and memory of the
trainer's real step, compiled for a target with ``sparsejax compile-check``'s machinery.

    PYTHONPATH=.tpu-compiler .venv/bin/python benchmarks/scan_compile.py \
        --target v5p-8 --case 'configs/dense.py:1.3b' \
        --case 'configs/dense.py:1.3b model.num_layers=80' --remat full,dots_no_batch

``--host``: instead of a target, XLA:CPU on this host compiles the loss gradient (forward +
backward, no optimizer, 2 x 256 tokens) of each case, loop vs scan: what a CPU run's compile costs.

For each case and remat policy it compiles the step twice, loop then scan (parameters and
optimizer state stored stacked: the train layout), in this process and records
``compile_cpu_s`` (CPU seconds of this process for lower + compile: XLA's TPU / GPU
pipelines are mostly single-threaded, and CPU time is what a loaded host does not distort),
``compile_s`` (wall), the per-device memory verdict (``peak_bytes``, ``temp_bytes``) and the scan
segments. Prints a table and writes benchmarks/results/scan_compile-cpu-<target>-<date>.json
(or --json). Nothing executes: these are compiler figures for the target, made on this host.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only target devices

from _common import print_table, write_json  # noqa: E402  (puts the repo on sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from sparsejax.compile_check import devices as devlib, program  # noqa: E402
from sparsejax.configure import load_config  # noqa: E402
from sparsejax.models.forward import forward_sums  # noqa: E402
from sparsejax.models.transformer import build_train_model  # noqa: E402
from sparsejax.parallel import targets  # noqa: E402


def host_compile(cfg, vocab: int = 8192, batch: int = 2, seq: int = 256) -> dict:
  """CPU seconds to lower and compile the loss gradient of ``cfg`` for this host's CPU."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: build_train_model(cfg, vocab)))
  params = nnx.to_pure_dict(state)
  tokens = {k: jax.ShapeDtypeStruct((batch, seq), jnp.int32) for k in ("inputs", "targets")}
  grad = lambda p, b: jax.grad(lambda q: forward_sums(graphdef, q, b, 1e-4)[0]["ce_sum"])(p)
  cpu0 = time.process_time()
  compiled = jax.jit(grad).lower(params, tokens).compile()
  mem = compiled.memory_analysis()
  return {"compile_cpu_s": round(time.process_time() - cpu0, 1),
          "temp_gib": round(mem.temp_size_in_bytes / 2 ** 30, 3), "fits": True}


def _overrides(words: list[str]) -> dict:
  out = {}
  for w in words:
    k, v = w.split("=", 1)
    out[k] = int(v) if v.lstrip("-").isdigit() else v
  return out


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--target", default="v5p-8")
  ap.add_argument("--case", action="append", required=True,
                  help="'<config file>:<preset> [key=value ...]' (repeatable)")
  ap.add_argument("--remat", default="full", help="comma-separated remat policies")
  ap.add_argument("--mesh_preset", default="fsdp")
  ap.add_argument("--per_device_batch", type=int, default=2)
  ap.add_argument("--host", action="store_true",
                  help="compile the loss gradient for this host's CPU instead of a target")
  ap.add_argument("--json", default=None)
  args = ap.parse_args()
  if args.host:
    args.target = "host-cpu"
  else:
    target = targets.parse(args.target)
    devices = devlib.target_devices(target)
  rows, records = [], []
  for case in args.case:
    preset, *words = case.split()
    for remat in args.remat.split(","):
      for scan in (False, True):
        base = {"mesh.preset": args.mesh_preset, "model.remat": remat,
                "model.scan_layers": scan, **_overrides(words)}
        cfg = load_config(preset, **base)
        if args.host:
          row = {"case": case, "remat": remat, "layers": "scan" if scan else "loop",
                 "num_layers": cfg.model.num_layers, **host_compile(cfg)}
          rows.append(row)
          records.append(row)
          print_table(rows[-1:], list(row))
          continue
        unit = program.batch_unit(cfg, target, devices)
        cfg = program.with_batch(cfg, unit * args.per_device_batch)
        print(f"compiling {case} remat={remat} {'scan' if scan else 'loop'} for "
              f"{args.target} ...", file=sys.stderr, flush=True)
        cpu0 = time.process_time()
        rec = program.check(cfg, target, devices)
        cpu = time.process_time() - cpu0
        mem = rec["memory"]
        row = {"case": case, "remat": remat, "layers": "scan" if scan else "loop",
               "num_layers": cfg.model.num_layers, "fits": rec["fits"],
               "compile_cpu_s": round(cpu, 1), "compile_s": rec["compile_s"],
               "peak_gib": round(mem.get("peak_bytes", 0) / 2 ** 30, 3),
               "temp_gib": round(mem.get("temp_bytes", 0) / 2 ** 30, 3)}
        rows.append(row)
        records.append({**row, "record": rec})
        print_table(rows[-1:], list(row))
        write_json("scan_compile", f"{args.target}-{time.strftime('%Y%m%d')}",
                   {"target": args.target, "rows": records}, args.json or "")
    if args.host:
      write_json("scan_compile", f"{args.target}-{time.strftime('%Y%m%d')}",
                 {"target": args.target, "rows": records}, args.json or "")
  print_table(rows, list(rows[0]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
