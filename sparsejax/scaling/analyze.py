"""``python -m sparsejax.scaling.analyze --root ROOT``: scaling-law fits of a sweep, plots and a
report.

  python -m sparsejax.scaling.analyze --root runs/isoflop_tiny [--out DIR] [--bootstrap 100]
      [--huber-delta 1e-3] [--loss eval_loss|eval_loss_smoothed]
      [--sparse auto|none|frantar|granularity|avg_params]
      [--n total|non_embedding | --n-field FIELD]
      [--budget-tol 0.3] [--no-plots]

Reads every ``ROOT/*/record.json`` (sparsejax.scaling.records.load_records) and writes to OUT
(default ROOT/report): REPORT.md, fits.json (full precision, everything the report shows) and PNG
plots. The headline table (one row per family) goes to stdout; skipped records go to stderr, one
line each with the reason, and are listed in the report. Only records with status "done" are
fitted.

Per family (the record's ``family``, i.e. the config name; sparsejax.scaling.family_fits):
  * Chinchilla approach 3: ``L = E + A/N^alpha + B/D^beta`` (sparsejax.scaling.fit), bootstrap
    (5%, 95%) intervals, ``N_opt ∝ C^a``, ``D_opt ∝ C^b`` with C = 6ND.
  * Approach 2: runs are grouped into isoFLOP budgets by their recorded ``total_flops`` (sorted,
    a new budget starts when it exceeds the budget's smallest by more than ``--budget-tol``); a
    budget needs 3 distinct sizes, the fit 2 such budgets, else the report says why it is skipped.
    Its power laws are in the grouping quantity: ``N* ∝ F^a``, ``D* ∝ F^b`` with F the budget's
    geometric-mean total_flops (D* read off the budget's runs at N*).
  * Compute-optimal N, D (and loss) at the family's budgets and at 10x / 100x the largest.
  * Warnings (report and headline) where a fit looks degenerate: alpha or beta outside (0, 2],
    E ~ 0, approach-2 slope outside (0, 1), or a line through only 2 budgets.
Sparse laws (sparsejax.scaling.sparse_fits over sparsejax.scaling.sparse_laws / avg_params) are
fitted where their axis varies (``auto``): the Frantar et al. form over S with the non-zero N per
family and pooled over the families whose runs record weight_sparsity (runs without it are never
an input), the average-parameter law ``L = E + A/N̄^alpha + B/D^beta`` (approach 3 with N̄,
same scopes, whenever some run has weight_sparsity > 0; compared with the Frantar fit on the same
points: Huber objective and RMSE of log L per point), the fine-grained MoE form over G per family.

Conventions (also written into the report and fits.json):
  N  ``--n total`` (the default): ``params_active_total``, the matmul weights one token passes
     through — every block weight it uses (MoE: its routed + shared experts only) plus the output
     head at the TRUE vocabulary; the input embedding (a lookup) is excluded. Chinchilla-style:
     the head is a matmul every token pays for (20-44% of the compute at the tiny widths), so
     only with it is 6ND the compute. ``--n non_embedding``: ``params_active_non_embedding``,
     the same without the head (Kaplan-style). ``--n-field`` names any other record field
     (``params_active_per_token``: head at the padded rows, the only N of records written before
     the two above; ``params_active_avg``; ``params_total``). sparsejax.models.accounting.
  D  training tokens (``tokens``).
  C  ``6 N D`` with that N: approach 3's compute (fits, predictions, frontier).
  F  the records' ``total_flops`` (6 x active params with the padded head + causal attention,
     per token, x D; sparsejax.models.accounting): groups runs into isoFLOP budgets and is the
     compute axis of approach 2. Budgets are labelled by it.
  S  the record's ``weight_sparsity`` (fraction of pruned weights), weight-sparse laws only;
     runs without it (MoE, PEER, memory and ordinary dense runs) are no input. Weight-sparse
     runs' N for the Frantar law: N_nonzero = N - params_pruned_final (the non-zero count at the
     end); for the average-parameter law: N̄ = N - params_pruned_mean (averaged over the steps);
     both with the N flavour above (the pruned counts are per-token shares, never in the head).
     Approaches 2 and 3 per family keep the dense N.
  G  the record's ``granularity`` (the resolved Config's ``config.moe.granularity``, a base
     config's own value included) for runs with MoE layers, none otherwise; records written
     before that key fall back to ``overrides["moe.granularity"]`` (1 without one), noted in
     the report.

Fits run with one OpenBLAS thread (sparse_laws.single_threaded_blas): L-BFGS-B on a handful of
parameters is dominated by thread synchronisation otherwise.

Exit status: 0 report written; 1 report written but no family could be fitted; 2 bad arguments,
no usable record, or ``--sparse frantar`` / ``--sparse avg_params`` without weight-sparse runs
(one-line error).
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
from sparsejax.scaling.avg_params import MISSING_PRUNED, nonzero_counts
from sparsejax.scaling.family_fits import FitError, fit_family
from sparsejax.scaling.sparse_fits import (AVG_PARAMS_NEEDS_WEIGHT_SPARSITY,
                                           FRANTAR_NEEDS_WEIGHT_SPARSITY, SPARSE_MODES,
                                           fit_sparse, has_weight_sparsity)
from sparsejax.scaling.records import RECORD, load_records

N_FIELDS = {
    "params_active_total": "N = params_active_total: active matmul weights per token with the "
                           "output head at the true vocabulary, input embedding excluded "
                           "(Chinchilla-style total)",
    "params_active_non_embedding": "N = params_active_non_embedding: active matmul weights per "
                                   "token without the output head and input embedding "
                                   "(Kaplan-style non-embedding)",
    "params_active_per_token": "N = params_active_per_token: active matmul weights per token "
                               "with the output head at the PADDED vocabulary rows (the N of old "
                               "records)",
    "params_active_avg": "N = params_active_avg (params_active_per_token averaged over the run's "
                         "steps)",
    "params_total": "N = total parameters (every stored weight, embeddings, padded rows and all "
                    "experts included)",
}
N_CHOICES = {"total": "params_active_total", "non_embedding": "params_active_non_embedding"}
DEFAULT_N = "total"
DEFAULT_N_FIELD = N_CHOICES[DEFAULT_N]
LOSS_FIELDS = ("eval_loss", "eval_loss_smoothed")
COMPUTE = "C = 6 N D"
BUDGET = "total FLOPs, 6N+attn"  # what isoFLOP budgets are grouped by and labelled with


# ----------------------------------------------------------------------------- records -> rows

def _positive(rec: dict, key: str) -> float:
  v = rec.get(key)
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
    raise ValueError(f"{key} is {v!r}, not a positive number" if key in rec else
                     f"no {key}")
  return float(v)


def _granularity(rec: dict) -> tuple[float | None, str]:
  """(G, source): the record's ``granularity`` (None: no MoE layer), else for records written
  before that key the ``moe.granularity`` override (1 without one)."""
  if "granularity" in rec:
    return (None if rec["granularity"] is None else _positive(rec, "granularity")), "record"
  v = (rec.get("overrides") or {}).get("moe.granularity", 1)
  try:
    g = float(v)
  except (TypeError, ValueError):
    raise ValueError(f"overrides moe.granularity is {v!r}, not a number") from None
  if not (math.isfinite(g) and g > 0):
    raise ValueError(f"overrides moe.granularity is {v!r}, not positive")
  return g, "overrides (old record)"


def _weight_sparsity(rec: dict) -> float | None:
  v = rec.get("weight_sparsity")
  if v is None:
    return None
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
    raise ValueError(f"weight_sparsity is {v!r}, not a fraction in [0, 1)")
  return float(v)


def _missing_n_reason(rec: dict, n_field: str) -> str:
  if n_field in N_CHOICES.values() and "params_active_per_token" in rec:
    return (f"no {n_field} (record written before N was counted at the true vocabulary; re-run "
            "its sweep into a new --root, or fit old records with --n-field "
            "params_active_per_token: head at the padded rows)")
  return f"no {n_field}"


def to_row(rec: dict, path: str, loss: str, n_field: str) -> dict:
  """One fit point from a record; raises ValueError naming what is unusable."""
  if rec.get("status") != "done":
    raise ValueError(f"status {rec.get('status')!r} (only 'done' runs are fitted)")
  family = rec.get("family")
  if not isinstance(family, str) or not family:
    raise ValueError(f"family is {family!r}")
  if n_field not in rec:
    raise ValueError(_missing_n_reason(rec, n_field))
  N, D = _positive(rec, n_field), _positive(rec, "tokens")
  G, g_source = _granularity(rec)
  S = _weight_sparsity(rec)
  n_nonzero, n_avg, pruned_source = nonzero_counts(rec, N, S)
  row = {"name": str(rec.get("name", pathlib.Path(path).parent.name)), "family": family,
         "file": path, "N": N, "D": D, "C": 6.0 * N * D,
         "total_flops": _positive(rec, "total_flops"), "L": _positive(rec, loss),
         "G": G, "G_source": g_source, "S": S, "N_nonzero": n_nonzero, "N_avg": n_avg,
         "pruned_source": pruned_source, "method": rec.get("sparsity_method"),
         "total_flops_sparse": (_positive(rec, "total_flops_sparse")
                                if rec.get("total_flops_sparse") is not None else None),
         "wall_s": None}
  w = rec.get("wall_s")
  if isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w):
    row["wall_s"] = float(w)
  return row


def collect(root, loss: str = "eval_loss", n_field: str = DEFAULT_N_FIELD):
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


def _notes(rows: list[dict], problems: list[dict], n_field: str) -> list[str]:
  """What the reader must know about old records (fitted with a fallback, or left out)."""
  notes = []
  old_n = [p["name"] for p in problems if p["reason"].startswith(f"no {n_field} (record written")]
  if old_n:
    notes.append(f"{len(old_n)} record(s) lack {n_field} (written before N was counted at the "
                 "true vocabulary) and are left out: " + ", ".join(old_n[:5]) +
                 (", ..." if len(old_n) > 5 else "") + "; --n-field params_active_per_token "
                 "fits them with the head at the padded rows")
  old_g = [r["name"] for r in rows if r["G_source"] != "record"]
  if old_g:
    notes.append(f"{len(old_g)} record(s) lack granularity (written before it was recorded): "
                 "their G is overrides['moe.granularity'], 1 without one, so a base config's own "
                 "granularity is not seen: " + ", ".join(old_g[:5]) +
                 (", ..." if len(old_g) > 5 else ""))
  old_s = [r["name"] for r in rows if r["pruned_source"] == MISSING_PRUNED]
  if old_s:
    notes.append(f"{len(old_s)} weight-sparse record(s) lack params_pruned_final / "
                 "params_pruned_mean (written before they were recorded): their N is taken as "
                 "the non-zero count for both sparse laws: " + ", ".join(old_s[:5]) +
                 (", ..." if len(old_s) > 5 else ""))
  mixed = sorted({r["family"] for r in rows if r["S"]})
  if mixed:
    notes.append("famil" + ("ies " if len(mixed) > 1 else "y ") + ", ".join(mixed) + " hold "
                 "weight-sparse runs: approaches 2 and 3 fit them with the dense N, across "
                 "sparsity levels; the sparse laws below use the non-zero / average N")
  return notes


def conventions(n_field: str, loss: str, *, bootstrap: int, huber_delta: float, seed: int,
                budget_tol: float) -> dict:
  n = next((k for k, v in N_CHOICES.items() if v == n_field), None)
  return {"N": N_FIELDS[n_field], "n_field": n_field, "n": n,
          "n_default": f"--n {DEFAULT_N} ({DEFAULT_N_FIELD})", "n_default_field": DEFAULT_N_FIELD,
          "D": "D = training tokens (record field tokens)",
          "C": f"{COMPUTE} with this N: approach 3's compute (fits, predictions, frontier)",
          "F": "F = the records' total_flops (6 x active params with the padded head + causal "
               "attention, per token, x D): groups runs into isoFLOP budgets (labelled "
               f"'budget ({BUDGET})', geometric mean of the budget's runs) and is approach 2's "
               "compute axis",
          "budget": BUDGET,
          "L": f"L = {loss}", "loss_field": loss,
          "S": "S = the record's weight_sparsity (final fraction of pruned weights among the "
               "targeted weights), weight-sparse laws only; runs without it are no input to them "
               "(MoE / PEER / memory conditional computation is not weight sparsity)",
          "N_sparse": "Weight-sparse runs: the Frantar law's N is N_nonzero = N - "
                      "params_pruned_final (non-zero at the end), the average-parameter law's N̄ "
                      "= N - params_pruned_mean (averaged over the training steps); pruned counts "
                      "are per-token shares (MoE experts k/E) and never in the head",
          "G": "G = the record's granularity (the resolved config.moe.granularity) for runs "
               "with MoE layers, none otherwise; older records: overrides['moe.granularity'] "
               "(default 1)",
          "intervals": f"bootstrap (5%, 95%) percentiles, {bootstrap} resamples",
          "huber_delta": huber_delta, "bootstrap": bootstrap, "seed": seed,
          "budget_tol": budget_tol}


def analyze(root, *, progress: bool = False, loss: str = "eval_loss",
            n_field: str = DEFAULT_N_FIELD,
            huber_delta: float = 1e-3, bootstrap: int = 100, seed: int = 0,
            budget_tol: float = 0.3, sparse: str = "auto") -> dict:
  """Everything the report shows, as one JSON-able dict (NaN kept; ``to_json`` maps it to null).
  Raises FitError when nothing is usable, or for ``sparse="frantar"`` / ``"avg_params"`` without
  weight-sparse runs.
  """
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
  if sparse == "frantar" and not has_weight_sparsity(rows):
    raise FitError(FRANTAR_NEEDS_WEIGHT_SPARSITY, problems)
  if sparse == "avg_params" and not has_weight_sparsity(rows):
    raise FitError(AVG_PARAMS_NEEDS_WEIGHT_SPARSITY, problems)
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
      "conventions": conventions(n_field, loss, bootstrap=bootstrap, huber_delta=huber_delta,
                                 seed=seed, budget_tol=budget_tol),
      "notes": _notes(rows, problems, n_field),
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
  n_group = ap.add_mutually_exclusive_group()
  n_group.add_argument("--n", default=None, choices=tuple(N_CHOICES),
                       help=f"N of the fits (default {DEFAULT_N}): total = {N_CHOICES['total']} "
                            "(head at the true vocabulary), non_embedding = "
                            f"{N_CHOICES['non_embedding']}")
  n_group.add_argument("--n-field", default=None, choices=tuple(N_FIELDS),
                       help="record field used as N (instead of --n)")
  ap.add_argument("--budget-tol", type=float, default=0.3,
                  help="isoFLOP grouping: relative total_flops spread within one budget")
  ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
  ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib)")
  a = ap.parse_args(argv)
  prog = "sparsejax.scaling.analyze"
  try:
    n_field = a.n_field or N_CHOICES[a.n or DEFAULT_N]
    result = analyze(a.root, progress=True, loss=a.loss, n_field=n_field, huber_delta=a.huber_delta,
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
