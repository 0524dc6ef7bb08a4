"""``python -m sparsejax.scaling.analyze --root ROOT``: scaling-law fits of a sweep, plots and a
report.

  python -m sparsejax.scaling.analyze --root runs/isoflop_tiny [--out DIR] [--bootstrap 100]
      [--huber-delta 1e-3] [--loss eval_loss|eval_loss_smoothed]
      [--sparse auto|none|frantar|granularity] [--n-field params_active_per_token]
      [--budget-tol 0.3] [--no-plots]

Reads every ``ROOT/*/record.json`` (sparsejax.scaling.records.load_records) and writes to OUT
(default ROOT/report): REPORT.md, fits.json (full precision, everything the report shows) and PNG
plots. The headline table (one row per family) goes to stdout; skipped records go to stderr, one
line each with the reason, and are listed in the report. Only records with status "done" are
fitted.

Per family (the record's ``family``, i.e. the config name; sparsejax.scaling.family_fits):
  * Chinchilla approach 3: ``L = E + A/N^alpha + B/D^beta`` (sparsejax.scaling.fit), bootstrap
    (5%, 95%) intervals, ``N_opt ∝ C^a``, ``D_opt ∝ C^b``.
  * Approach 2: runs are grouped into isoFLOP budgets by their recorded ``total_flops`` (sorted,
    a new budget starts when it exceeds the budget's smallest by more than ``--budget-tol``); a
    budget needs 3 distinct sizes, the fit 2 such budgets, else the report says why it is skipped.
  * Compute-optimal N, D (and loss) at the family's budgets and at 10x / 100x the largest.
  * Warnings (report and headline) where a fit looks degenerate: alpha or beta outside (0, 2],
    E ~ 0, approach-2 slope outside (0, 1), or a line through only 2 budgets.
Sparse laws (sparsejax.scaling.sparse_fits over sparsejax.scaling.sparse_laws) are fitted where
their axis varies (``auto``): the Frantar et al. form over S per family and pooled over all
families, the fine-grained MoE form over G per family.

Conventions (also written into the report and fits.json):
  N  ``--n-field`` of the record, by default ``params_active_per_token``: the matmul weights one
     token passes through (output head included, input embedding excluded; every matmul weight
     for dense, only the experts a token is routed to for MoE; sparsejax.models.accounting).
  D  training tokens (``tokens``).  C  ``6 N D``, the compute every fit and plot uses (the
     records' ``total_flops``, 6N + attention, only groups runs into budgets).
  S  ``1 - params_active_per_token / params_total`` (params_total counts the input embedding,
     so an untied-embedding dense model gets S = embedding share > 0, not 0).
  G  ``overrides["moe.granularity"]``, 1 when not overridden (a base config's own value is not
     in the record).

Fits run with one OpenBLAS thread (sparse_laws.single_threaded_blas): L-BFGS-B on a handful of
parameters is dominated by thread synchronisation otherwise.

Exit status: 0 report written; 1 report written but no family could be fitted; 2 bad arguments,
or no usable record (one-line error).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys

import numpy as np
from tqdm import tqdm

from sparsejax.scaling import report, sparse_laws
from sparsejax.scaling.family_fits import FitError, fit_family
from sparsejax.scaling.sparse_fits import SPARSE_MODES, fit_sparse
from sparsejax.scaling.records import RECORD, load_records

N_FIELDS = {
    "params_active_per_token": "N = active parameters per token (matmul weights a token passes "
                               "through, output head included, input embedding excluded)",
    "params_active_avg": "N = params_active_avg (active parameters per token averaged over the "
                         "run's steps)",
    "params_total": "N = total parameters (every weight, embeddings and all experts included)",
}
LOSS_FIELDS = ("eval_loss", "eval_loss_smoothed")
COMPUTE = "C = 6 N D"


# ----------------------------------------------------------------------------- records -> rows

def _positive(rec: dict, key: str) -> float:
  v = rec.get(key)
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
    raise ValueError(f"{key} is {v!r}, not a positive number" if key in rec else
                     f"no {key}")
  return float(v)


def _granularity(rec: dict) -> float:
  v = (rec.get("overrides") or {}).get("moe.granularity", 1)
  try:
    g = float(v)
  except (TypeError, ValueError):
    raise ValueError(f"overrides moe.granularity is {v!r}, not a number") from None
  if not (math.isfinite(g) and g > 0):
    raise ValueError(f"overrides moe.granularity is {v!r}, not positive")
  return g


def to_row(rec: dict, path: str, loss: str, n_field: str) -> dict:
  """One fit point from a record; raises ValueError naming what is unusable."""
  if rec.get("status") != "done":
    raise ValueError(f"status {rec.get('status')!r} (only 'done' runs are fitted)")
  family = rec.get("family")
  if not isinstance(family, str) or not family:
    raise ValueError(f"family is {family!r}")
  N, D = _positive(rec, n_field), _positive(rec, "tokens")
  row = {"name": str(rec.get("name", pathlib.Path(path).parent.name)), "family": family,
         "file": path, "N": N, "D": D, "C": 6.0 * N * D,
         "total_flops": _positive(rec, "total_flops"), "L": _positive(rec, loss),
         "G": _granularity(rec), "S": None, "wall_s": None}
  try:
    row["S"] = float(sparse_laws.sparsity([_positive(rec, "params_active_per_token")],
                                          [_positive(rec, "params_total")])[0])
  except ValueError:
    pass  # no sparsity: the run stays out of the Frantar fits only
  w = rec.get("wall_s")
  if isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w):
    row["wall_s"] = float(w)
  return row


def collect(root, loss: str = "eval_loss", n_field: str = "params_active_per_token"):
  """(rows, problems): usable runs and ``{"name", "file", "reason"}`` for every record left out."""
  root = pathlib.Path(root)
  if not root.is_dir():
    raise FitError(f"--root {root} is not a directory; pass the sweep's --root")
  paths = sorted(root.glob(f"*/{RECORD}"))
  if not paths:
    raise FitError(f"no */{RECORD} under {root}; is it a sweep root (python -m sparsejax.sweep)?")
  records, bad = load_records(root)
  problems = [{"name": pathlib.Path(f).parent.name, "file": f, "reason": r} for f, r in bad]
  good = [p for p in paths if str(p) not in {f for f, _ in bad}]
  if len(good) != len(records):
    raise FitError(f"{root}: load_records returned {len(records)} records for {len(good)} files")
  rows = []
  for path, rec in zip(good, records):  # load_records reads the same sorted paths
    try:
      rows.append(to_row(rec, str(path), loss, n_field))
    except ValueError as e:
      problems.append({"name": path.parent.name, "file": str(path), "reason": str(e)})
  problems.sort(key=lambda p: p["file"])
  return rows, problems


def analyze(root, *, progress: bool = False, loss: str = "eval_loss",
            n_field: str = "params_active_per_token",
            huber_delta: float = 1e-3, bootstrap: int = 100, seed: int = 0,
            budget_tol: float = 0.3, sparse: str = "auto") -> dict:
  """Everything the report shows, as one JSON-able dict (NaN kept; ``to_json`` maps it to null).
  Raises FitError when nothing is usable."""
  if loss not in LOSS_FIELDS:
    raise FitError(f"--loss {loss!r}: expected one of {LOSS_FIELDS}")
  if n_field not in N_FIELDS:
    raise FitError(f"--n-field {n_field!r}: expected one of {tuple(N_FIELDS)}")
  if sparse not in SPARSE_MODES:
    raise FitError(f"--sparse {sparse!r}: expected one of {SPARSE_MODES}")
  if bootstrap < 0:
    raise FitError(f"--bootstrap must be >= 0, got {bootstrap}")
  if not (math.isfinite(huber_delta) and huber_delta > 0):
    raise FitError(f"--huber-delta must be positive, got {huber_delta}")
  rows, problems = collect(root, loss, n_field)
  if not rows:
    raise FitError(f"no usable record in {root}: {len(problems)} left out (first: "
                   f"{problems[0]['name']}: {problems[0]['reason']})", problems)
  by_family: dict[str, list[dict]] = {}
  for r in rows:
    by_family.setdefault(r["family"], []).append(r)
  by_family = dict(sorted(by_family.items()))
  with sparse_laws.single_threaded_blas():
    families = {f: fit_family(rs, huber_delta=huber_delta, bootstrap=bootstrap, seed=seed,
                              budget_tol=budget_tol)
                for f, rs in tqdm(by_family.items(), desc=f"fitting ({bootstrap} bootstrap "
                                  "resamples per family)", unit="family", file=sys.stderr,
                                  disable=not progress)}
  return {
      "root": str(root),
      "conventions": {"N": N_FIELDS[n_field], "n_field": n_field, "D": "D = training tokens",
                      "C": f"{COMPUTE} (training FLOPs; the records' total_flops, 6N + "
                           "attention, only group runs into isoFLOP budgets)",
                      "L": f"L = {loss}", "loss_field": loss,
                      "S": "S = 1 - params_active_per_token / params_total",
                      "G": "G = overrides['moe.granularity'] (default 1)",
                      "intervals": f"bootstrap (5%, 95%) percentiles, {bootstrap} resamples",
                      "huber_delta": huber_delta, "bootstrap": bootstrap, "seed": seed,
                      "budget_tol": budget_tol},
      "problems": problems,
      "runs": rows,
      "families": families,
      "sparse_laws": fit_sparse(rows, by_family, sparse, huber_delta=huber_delta,
                                bootstrap=bootstrap, seed=seed),
  }


def to_json(obj):
  """NaN / inf -> None, numpy scalars and tuples -> JSON types (strict JSON out)."""
  if isinstance(obj, dict):
    return {str(k): to_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_json(v) for v in obj]
  if isinstance(obj, (bool, np.bool_)):
    return bool(obj)
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    return float(obj) if math.isfinite(obj) else None
  return obj


def fitted_any(result: dict) -> bool:
  return any("skipped" not in f["approach3"] or "skipped" not in f["approach2"]
             for f in result["families"].values())


# ----------------------------------------------------------------------------- CLI

def _print_problems(prog: str, problems: list[dict]) -> None:
  for p in problems:
    print(f"{prog}: left out {p['name']}: {p['reason']}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m sparsejax.scaling.analyze", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--root", required=True, help="sweep root holding */record.json")
  ap.add_argument("--out", default=None, help="output directory (default ROOT/report)")
  ap.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples (0: none)")
  ap.add_argument("--huber-delta", type=float, default=1e-3, help="Huber delta on log loss")
  ap.add_argument("--loss", default="eval_loss", choices=LOSS_FIELDS, help="record loss field")
  ap.add_argument("--sparse", default="auto", choices=SPARSE_MODES,
                  help="sparse laws to fit (auto: those whose axis varies)")
  ap.add_argument("--n-field", default="params_active_per_token", choices=tuple(N_FIELDS),
                  help="record field used as N")
  ap.add_argument("--budget-tol", type=float, default=0.3,
                  help="isoFLOP grouping: relative total_flops spread within one budget")
  ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
  ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib)")
  a = ap.parse_args(argv)
  prog = "sparsejax.scaling.analyze"
  try:
    result = analyze(a.root, progress=True, loss=a.loss, n_field=a.n_field, huber_delta=a.huber_delta,
                     bootstrap=a.bootstrap, seed=a.seed, budget_tol=a.budget_tol,
                     sparse=a.sparse)
  except FitError as e:
    _print_problems(prog, e.problems)
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2
  _print_problems(prog, result["problems"])
  out = pathlib.Path(a.out) if a.out else pathlib.Path(a.root) / "report"
  out.mkdir(parents=True, exist_ok=True)
  data = to_json(result)
  images = []
  if not a.no_plots:
    try:
      # defers matplotlib: --no-plots and fitting work without it
      from sparsejax.scaling import plots
    except ImportError as e:
      print(f"{prog}: error: plots need matplotlib ({e}); pip install matplotlib, or pass "
            "--no-plots", file=sys.stderr)
      return 2
    images = plots.write_all(data, out)
  tmp = out / "fits.json.tmp"
  tmp.write_text(json.dumps(data, indent=1, allow_nan=False))
  os.replace(tmp, out / "fits.json")
  path = report.write(data, out, images)
  print(report.headline(data))
  print(f"{prog}: wrote {path}, {out / 'fits.json'} and {len(images)} plot(s)", file=sys.stderr)
  return 0 if fitted_any(result) else 1


if __name__ == "__main__":
  sys.exit(main())
