"""``sparsejax sparsity --workdir W [--step N]``: check a pruned checkpoint before export.

Prints one JSON object: for every parameter its shape, non-zero count and density of the weights
the model computes with (N:M runs: the masked weights; other methods: the stored zeros), for the
weight-sparsity targets whether each satisfies the run's N:M pattern along its contraction axis
(``nm_ok``; N:M runs only), and the global counts. Exit status 0; 1 when an N:M target violates
its pattern; 2 for a bad workdir / step (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np

from sparsejax.errors import CheckpointError
from sparsejax.eval.checkpoint import restore
from sparsejax.sparsity import masks
from sparsejax.sparsity.targets import find_targets


def report(workdir: str, step: int | None = None) -> dict:
  r = restore(workdir, step)
  s = r.cfg.sparsity
  targets = {t.name: t for t in find_targets(r.cfg, r.spec.abstract_params)}
  out, total, nonzero, t_total, t_nonzero = {}, 0, 0, 0, 0
  for path, x in jax.tree_util.tree_leaves_with_path(r.params):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    w = np.asarray(jax.device_get(x))
    nz = int(np.count_nonzero(w))
    entry = {"shape": list(w.shape), "nonzero": nz, "density": nz / max(w.size, 1)}
    total, nonzero = total + w.size, nonzero + nz
    t = targets.get(name)
    if t is not None and s.method != "none":
      entry["target"] = True
      t_total, t_nonzero = t_total + w.size, t_nonzero + nz
      if s.method == "nm":
        entry["nm_ok"] = bool(masks.nm_satisfied(w, s.n, s.m, t.axis))
    out[name] = entry
  nm_ok = all(e.get("nm_ok", True) for e in out.values())
  return {"workdir": str(workdir), "step": r.step, "method": s.method,
          "pattern": f"{s.n}:{s.m}" if s.method == "nm" else None,
          "params_total": total, "params_nonzero": nonzero,
          "targets_total": t_total, "targets_nonzero": t_nonzero,
          "weight_sparsity": 1 - t_nonzero / t_total if t_total else 0.0,
          "nm_ok": nm_ok if s.method == "nm" else None, "params": out}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="sparsejax sparsity", description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=int, default=None, help="a committed step (default: latest)")
  args = p.parse_args(argv)
  try:
    rep = report(args.workdir, args.step)
  except (FileNotFoundError, CheckpointError) as e:
    print(f"sparsejax sparsity: {e}", file=sys.stderr)
    return 2
  print(json.dumps(rep, indent=1))
  return 0 if rep["nm_ok"] in (None, True) else 1


if __name__ == "__main__":
  sys.exit(main())
