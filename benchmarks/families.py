"""Side-by-side comparison of the model families at one preset on the embedded corpus.

    python benchmarks/families.py [--preset tiny] [--steps 60] [--eval-batches 16] [--json PATH]

For each ``configs/<family>.py:<preset>``: train ``--steps`` steps from scratch (same data order,
same tokens for every family), then report total / active parameters, analytic training FLOPs
per token, median step time (steps/s) over the logged steps after the first (compile excluded),
and the validation loss / bits-per-byte on the first ``--eval-batches`` val batches. Prints a
table and writes JSON. Ratios against the dense row are what to read; absolute CPU times depend on
the machine (the load average is recorded).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def run_family(config_file: str, preset: str, steps: int, eval_batches: int, workdir) -> dict:
  import jax
  from sparsejax.configure import load_config
  from sparsejax.eval.checkpoint import evaluate
  from sparsejax.train.loop import train_and_evaluate

  cfg = load_config(f"configs/{config_file}:{preset}", **{
      "train.steps": steps, "train.log_every_steps": 1, "train.eval_every_steps": 0,
      "train.checkpoint_every_steps": 0, "train.progress_bar": False})
  train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
  info = json.loads((workdir / "run_info.json").read_text())
  step_ms = [r["step_ms"] for r in records if "step_ms" in r][2:]  # skip compile-bound steps
  ev = evaluate(workdir, max_batches=eval_batches, devices=jax.devices()[:1])
  median_ms = statistics.median(step_ms)
  return {"family": config_file.removesuffix(".py"), "config": cfg.name,
          "params_total": info["params_total"],
          "params_active_per_token": info["params_active_per_token"],
          "flops_per_token": info["flops_per_token"],
          "table_bytes_read_per_token": info.get("table_bytes_read_per_token", 0.0),
          "step_ms_median": median_ms, "steps_per_s": 1000.0 / median_ms,
          "tokens": steps * cfg.data.global_batch_size * cfg.data.seq_len,
          "train_loss_last": records[-1].get("loss"),
          "val_loss": ev["loss"], "val_bits_per_byte": ev["bits_per_byte"],
          "val_tokens": ev["tokens"]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--eval-batches", type=int, default=16)
  parser.add_argument("--families", default="", help="comma list, e.g. dense,moe (default: all)")
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  files = sorted(p.name for p in (REPO / "configs").glob("*.py"))
  files.sort(key=lambda f: f != "dense.py")
  if args.families:
    files = [f for f in files if f.removesuffix(".py") in args.families.split(",")]
  import jax
  rows = []
  load_start = os.getloadavg()
  with tempfile.TemporaryDirectory() as tmp:
    for f in files:
      rows.append(run_family(f, args.preset, args.steps, args.eval_batches,
                             pathlib.Path(tmp) / f.removesuffix(".py")))
  base = next((r for r in rows if r["family"] == "dense"), rows[0])
  head = (f"{'family':8} {'params':>10} {'active':>10} {'FLOPs/tok':>11} {'x dense':>7} "
          f"{'ms/step':>8} {'steps/s':>8} {'val loss':>9} {'val bpb':>8}")
  print(head)
  for r in rows:
    print(f"{r['family']:8} {r['params_total']:>10,.0f} {r['params_active_per_token']:>10,.0f} "
          f"{r['flops_per_token']:>11,.0f} {r['flops_per_token'] / base['flops_per_token']:>7.2f} "
          f"{r['step_ms_median']:>8.1f} {r['steps_per_s']:>8.1f} {r['val_loss']:>9.4f} "
          f"{r['val_bits_per_byte']:>8.4f}")
  out = {"script": "benchmarks/families.py", "args": vars(args),
         "date": datetime.datetime.now().isoformat(timespec="seconds"),
         "platform": jax.devices()[0].platform, "device_kind": jax.devices()[0].device_kind,
         "jax": jax.__version__, "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
         "rows": rows}
  path = pathlib.Path(args.json or REPO / "benchmarks" / "results" /
                      f"families-{out['platform']}-{args.preset}-{datetime.date.today():%Y%m%d}.json")
  path.write_text(json.dumps(out, indent=1))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
