"""Golden training losses of every family's tiny preset (and the variants that exercise the
optimizer groups and buffers), used by tests/test_golden_losses.py to show that a refactor leaves
the numbers unchanged.

    python tests/golden_losses.py --write      # after an intended numerical change; review diff
    python tests/golden_losses.py --check      # compare only

Each case trains ``STEPS`` steps on one device on the embedded byte corpus through the public
API (``load_config`` + ``train_and_evaluate``), logging every step, and records the per-step loss
and the final eval loss.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "family_losses.json"
STEPS = 6
RTOL = 2e-5
COMMON = {"train.steps": STEPS, "train.log_every_steps": 1, "train.eval_every_steps": 0,
          "train.eval_batches": 1, "train.checkpoint_every_steps": 0,
          "train.async_checkpoint": False, "train.progress_bar": False,
          "optim.warmup_steps": 2, "mesh.data": 1}
CASES: dict[str, tuple[str, dict]] = {
    "dense": ("configs/dense.py:tiny", {}),
    "moe": ("configs/moe.py:tiny", {}),
    "moe-dropless-bias": ("configs/moe.py:tiny", {"moe.dispatch": "dropless",
                                                  "moe.bias_balancing": True}),
    "moe-hash": ("configs/moe.py:tiny", {"moe.router": "hash", "moe.top_k": 1}),
    "peer": ("configs/peer.py:tiny", {}),
    "memory": ("configs/memory.py:tiny", {}),
    "sparse_attn": ("configs/sparse_attn.py:tiny", {}),
}


def run_case(name: str, workdir: pathlib.Path) -> dict:
  import jax

  from sparsejax.configure import load_config
  from sparsejax.train.loop import train_and_evaluate
  path, overrides = CASES[name]
  cfg = load_config(path, **{**COMMON, **overrides})
  result = train_and_evaluate(cfg, workdir / name, devices=jax.devices()[:1])
  rows = [json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in rows if "loss" in r and "step" in r]
  return {"config": path, "overrides": overrides, "loss": losses,
          "eval_loss": result.eval_metrics["loss"]}


def compute(names=None) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    return {n: run_case(n, pathlib.Path(tmp)) for n in (names or CASES)}


def compare(golden: dict, current: dict, rtol: float = RTOL) -> list[str]:
  diffs = []
  for name, now in current.items():
    old = golden.get(name)
    if old is None:
      diffs.append(f"{name}: no golden entry")
      continue
    pairs = list(zip(old["loss"], now["loss"])) + [(old["eval_loss"], now["eval_loss"])]
    if len(old["loss"]) != len(now["loss"]):
      diffs.append(f"{name}: {len(now['loss'])} losses, golden has {len(old['loss'])}")
    for i, (a, b) in enumerate(pairs):
      if abs(a - b) > rtol * abs(a):
        what = "eval loss" if i == len(pairs) - 1 else f"loss at step {i + 1}"
        diffs.append(f"{name}: {what} {b!r} differs from golden {a!r}")
  return diffs


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  group = parser.add_mutually_exclusive_group(required=True)
  group.add_argument("--write", action="store_true")
  group.add_argument("--check", action="store_true")
  args = parser.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  current = compute()
  if args.write:
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(current, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
    return 0
  diffs = compare(json.loads(GOLDEN.read_text()), current)
  print("\n".join(diffs) or "all cases match")
  return 1 if diffs else 0


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
  sys.exit(main())
