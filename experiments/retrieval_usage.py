"""Does product-key retrieval stay alive? Memory and PEER tiny presets (and a 128²-slot memory)
trained on the embedded corpus under each query-centring mode; the fraction of slots / experts
touched per training step (train-time usage, one step's batch) at chosen steps, and at the end
over the eval window, with the final eval loss.

    python experiments/retrieval_usage.py [--steps 300] [--out experiments/results/retrieval_usage]

Writes ``results.json`` and ``REPORT.md`` (a table) to --out.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

import jax

from sparsejax.configure import load_config
from sparsejax.train.loop import train_and_evaluate

VARIANTS = {
    "memory-32²": ("configs/memory.py:tiny", {}),
    "memory-128²": ("configs/memory.py:tiny", {"memory.num_slots": 128 ** 2}),
    "peer-32²": ("configs/peer.py:tiny", {}),
    "peer-32² key_norm off": ("configs/peer.py:tiny", {"peer.key_norm": False}),
}
MODES = {
    "none": {"query_center": "none"},
    "running-0.5": {"query_center": "running", "query_center_momentum": 0.5},
    "running-0.9": {"query_center": "running", "query_center_momentum": 0.9},
    "batch": {"query_center": "batch"},
}
AT_STEPS = (1, 5, 30, 60, 300)


def run(variant: str, mode: str, steps: int, workdir: pathlib.Path) -> dict:
  path, over = VARIANTS[variant]
  family = path.split("/")[-1].split(".")[0]
  cfg = load_config(path, **{**over, **{f"{family}.{k}": v for k, v in MODES[mode].items()},
                             "train.steps": steps, "train.log_every_steps": 1,
                             "train.eval_every_steps": 0, "train.checkpoint_every_steps": 0,
                             "train.eval_batches": 8, "train.progress_bar": False,
                             "mesh.data": 1})
  result = train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])
  rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  touched = {}
  for r in rows:
    vals = [v for k, v in r.items() if k.endswith("/touched_fraction") and k.startswith("sown/")]
    if vals and r.get("step") in AT_STEPS:
      touched[r["step"]] = sum(vals) / len(vals)  # mean over the family's layers
  ev = result.eval_metrics
  eval_touched = [v for k, v in ev.items() if k.endswith("/touched_fraction")]
  return {"train_touched": touched, "eval_touched": sum(eval_touched) / len(eval_touched),
          "eval_loss": ev["loss"]}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--out", default="experiments/results/retrieval_usage")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for variant in VARIANTS:
      for mode in MODES:
        r = run(variant, mode, args.steps, pathlib.Path(tmp) / f"{variant}-{mode}")
        results.setdefault(variant, {})[mode] = r
        print(variant, mode, json.dumps(r), flush=True)
  (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
  steps = [s for s in AT_STEPS if s <= args.steps]
  lines = ["# Retrieval usage by query-centring mode", "",
           f"`python experiments/retrieval_usage.py --steps {args.steps}` (CPU, 1 device). "
           "Touched fraction of slots / experts per training step (mean over the family's "
           "layers), and over the final eval window (8 val batches); final eval loss.", "",
           "| variant | mode | " + " | ".join(f"step {s}" for s in steps) +
           " | eval window | eval loss |", "|---" * (len(steps) + 4) + "|"]
  for variant, modes in results.items():
    for mode, r in modes.items():
      cells = [f"{100 * r['train_touched'].get(s, float('nan')):.1f}%" for s in steps]
      lines.append(f"| {variant} | {mode} | " + " | ".join(cells) +
                   f" | {100 * r['eval_touched']:.1f}% | {r['eval_loss']:.3f} |")
  (out / "REPORT.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
