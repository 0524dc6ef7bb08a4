"""``python -m sparsejax.fit --root ROOT``: scaling-law fits of a sweep, plots and a report.

  python -m sparsejax.fit --root runs/isoflop_tiny [--out DIR] [--bootstrap 100]
      [--huber-delta 1e-3] [--loss eval_loss|eval_loss_smoothed]
      [--sparse auto|none|frantar|granularity] [--n-field params_active_per_token]
      [--budget-tol 0.3] [--no-plots]

Reads every ``ROOT/*/record.json`` (sparsejax.sweep.load_records) and writes to OUT (default
ROOT/report): REPORT.md, fits.json (full precision, everything the report shows) and PNG plots.
The headline table (one row per family) goes to stdout; skipped records go to stderr, one line
each with the reason, and are listed in the report. Only records with status "done" are fitted.

Per family (the record's ``family``, i.e. the config name):
  * Chinchilla approach 3: ``L = E + A/N^alpha + B/D^beta`` (sparsejax.scaling.fit), bootstrap
    (5%, 95%) intervals, ``N_opt ∝ C^a``, ``D_opt ∝ C^b``.
  * Approach 2: runs are grouped into isoFLOP budgets by their recorded ``total_flops`` (sorted,
    a new budget starts when it exceeds the budget's smallest by more than ``--budget-tol``); a
    budget needs 3 distinct sizes, the fit 2 such budgets, else the report says why it is skipped.
  * Compute-optimal N, D (and loss) at the family's budgets and at 10x / 100x the largest.
  * Warnings (report and headline) where a fit looks degenerate: alpha or beta outside (0, 2],
    E ~ 0, approach-2 slope outside (0, 1), or a line through only 2 budgets.
Sparse laws (sparsejax.scaling.sparse_laws) are fitted where their axis varies (``auto``): the
Frantar et al. form over S per family and pooled over all families, the fine-grained MoE form
over G per family.

Conventions (also written into the report and fits.json):
  N  ``--n-field`` of the record, by default ``params_active_per_token``: the matmul weights one
     token passes through (output head included, input embedding excluded; every matmul weight
     for dense, only the experts a token is routed to for MoE; sparsejax.scaling.flops).
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

from sparsejax.scaling import sparse_laws
from sparsejax.scaling.fit import fit_approach2, fit_approach3

N_FIELDS = {
    "params_active_per_token": "N = active parameters per token (matmul weights a token passes "
                               "through, output head included, input embedding excluded)",
    "params_active_avg": "N = params_active_avg (active parameters per token averaged over the "
                         "run's steps)",
    "params_total": "N = total parameters (every weight, embeddings and all experts included)",
}
LOSS_FIELDS = ("eval_loss", "eval_loss_smoothed")
SPARSE_MODES = ("auto", "none", "frantar", "granularity")
COMPUTE = "C = 6 N D"
EXTRAPOLATE = (10.0, 100.0)


class FitError(ValueError):
  """A one-line reason the analysis cannot run; ``problems`` lists the records left out."""

  def __init__(self, message: str, problems: list[dict] | None = None):
    super().__init__(message)
    self.problems = problems or []


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
  from sparsejax.sweep import load_records, RECORD  # imports jax: only when loading
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


# ----------------------------------------------------------------------------- grouping

def isoflop_budgets(rows: list[dict], tol: float) -> list[list[dict]]:
  """Group runs whose ``total_flops`` lie within a factor ``1 + tol`` of the group's smallest."""
  if not tol > 0:
    raise FitError(f"--budget-tol must be > 0, got {tol}")
  groups: list[list[dict]] = []
  for r in sorted(rows, key=lambda r: (r["total_flops"], r["N"])):
    if groups and r["total_flops"] <= groups[-1][0]["total_flops"] * (1 + tol):
      groups[-1].append(r)
    else:
      groups.append([r])
  return groups


def _geomean(xs) -> float:
  return float(np.exp(np.mean(np.log(xs))))


def _budget_summary(group: list[dict]) -> dict:
  flops = [r["total_flops"] for r in group]
  return {"C": _geomean([r["C"] for r in group]), "total_flops": _geomean(flops),
          "flops_spread": max(flops) / min(flops), "runs": len(group),
          "sizes": len({round(r["N"], 6) for r in group}), "names": [r["name"] for r in group]}


# ----------------------------------------------------------------------------- fits

def _approach3(rows, huber_delta, bootstrap, seed) -> tuple[dict, object]:
  fit = fit_approach3([r["N"] for r in rows], [r["D"] for r in rows], [r["L"] for r in rows],
                      huber_delta=huber_delta, bootstrap=bootstrap, seed=seed)
  out = {"E": fit.E, "A": fit.A, "B": fit.B, "alpha": fit.alpha, "beta": fit.beta, "a": fit.a,
         "b": fit.b, "G": fit.G, "loss": fit.loss, "n_points": fit.n_points,
         "n_inits": fit.n_inits, "converged": fit.converged, "huber_delta": fit.huber_delta,
         "bootstrap": 0 if fit.bootstrap_samples is None else len(fit.bootstrap_samples),
         "intervals": fit.intervals}
  return out, fit


def _optimal_interval(fit, C: float):
  """(5%, 95%) bootstrap percentiles of N_opt and D_opt at budget C, or (None, None)."""
  s = fit.bootstrap_samples
  if s is None or len(s) == 0:
    return None, None
  log_a, log_b, alpha, beta = s[:, 0], s[:, 1], s[:, 3], s[:, 4]
  with np.errstate(all="ignore"):
    log_g = (np.log(alpha / beta) + log_a - log_b) / (alpha + beta)
    log_n = log_g + beta / (alpha + beta) * math.log(C / 6.0)
    log_d = math.log(C / 6.0) - log_n
  ok = np.isfinite(log_n)
  if not ok.any():
    return None, None
  pct = lambda v: tuple(float(x) for x in np.exp(np.percentile(v[ok], [5, 95])))  # noqa: E731
  return pct(log_n), pct(log_d)


def _approach2(groups: list[list[dict]]) -> tuple[dict, object]:
  usable, skipped = [], []
  for g in groups:
    b = _budget_summary(g)
    if b["sizes"] < 3:
      skipped.append({"C": b["C"], "reason": f"{b['sizes']} distinct size(s); a parabola needs 3"})
    else:
      usable.append((b["C"], g))
  if len(usable) < 2:
    return {"skipped": f"{len(usable)} budget(s) with >= 3 sizes of {len(groups)}; approach 2 "
                       "needs 2", "skipped_budgets": skipped}, None
  C = [c for c, g in usable for _ in g]
  try:
    fit = fit_approach2(C, [r["N"] for _, g in usable for r in g],
                        [r["L"] for _, g in usable for r in g])
  except ValueError as e:
    return {"skipped": str(e), "skipped_budgets": skipped}, None
  minima = [{"C": m.C, "N_opt": m.N_opt, "D_opt": m.D_opt, "L_opt": m.L_opt,
             "coeffs": list(m.coeffs), "n_points": m.n_points, "log_n_range": list(m.log_n_range),
             "positive_curvature": m.positive_curvature, "in_range": m.in_range, "ok": m.ok}
            for m in fit.minima]
  return {"a": fit.a, "b": fit.b, "n_intercept": fit.n_intercept, "d_intercept": fit.d_intercept,
          "n_used": fit.n_used, "minima": minima, "skipped_budgets": skipped}, fit


def fit_family(rows: list[dict], *, huber_delta: float, bootstrap: int, seed: int,
               budget_tol: float) -> dict:
  groups = isoflop_budgets(rows, budget_tol)
  out = {"runs": len(rows), "budgets": [_budget_summary(g) for g in groups],
         "wall_s": (sum(r["wall_s"] for r in rows)
                    if all(r["wall_s"] is not None for r in rows) else None)}
  fit3 = None
  try:
    out["approach3"], fit3 = _approach3(rows, huber_delta, bootstrap, seed)
  except ValueError as e:
    out["approach3"] = {"skipped": str(e)}
  out["approach2"], fit2 = _approach2(groups)
  for r in rows:
    r["L_pred"] = None if fit3 is None else float(fit3.predict(r["N"], r["D"]))
  largest = max(b["C"] for b in out["budgets"])
  targets = [(b["C"], "budget") for b in out["budgets"]]
  targets += [(f * largest, f"{f:g}x largest") for f in EXTRAPOLATE]
  preds = []
  for C, label in targets:
    p = {"C": C, "label": label, "approach3": None, "approach2": None}
    if fit3 is not None:
      n, d = (float(v) for v in fit3.optimal(C))
      n_ci, d_ci = _optimal_interval(fit3, C)
      p["approach3"] = {"N_opt": n, "D_opt": d, "L_opt": float(fit3.predict(n, d)),
                        "N_opt_ci": n_ci, "D_opt_ci": d_ci}
    if fit2 is not None:
      n, d = (float(v) for v in fit2.optimal(C))
      p["approach2"] = {"N_opt": n, "D_opt": d}
    preds.append(p)
  out["predictions"] = preds
  out["warnings"] = fit_warnings(out, min(r["L"] for r in rows))
  return out


def fit_warnings(fam: dict, min_loss: float) -> list[str]:
  """Signs that a fit is degenerate rather than a scaling law (the numbers are still reported)."""
  w = []
  a3, a2 = fam["approach3"], fam["approach2"]
  if "skipped" not in a3:
    for k in ("alpha", "beta"):
      if not 0 < a3[k] <= 2:
        w.append(f"approach 3: {k} = {a3[k]:.3g} is outside (0, 2]")
    if a3["E"] < 1e-3 * min_loss:
      w.append(f"approach 3: E = {a3['E']:.3g} is ~0 (below 0.1% of the lowest loss)")
    if w:
      w.append("approach 3 looks degenerate: too few runs, or N and D ranges too narrow to "
               "separate the terms")
  if "skipped" not in a2:
    if not 0 < a2["a"] < 1:
      w.append(f"approach 2: a = {a2['a']:.3g} is outside (0, 1)")
    if a2["n_used"] == 2:
      w.append("approach 2: a line through 2 budgets has no residual to check it against")
  return w


def _sparse_scopes(rows, by_family, form):
  if form == "frantar":
    scopes = [("all families", [r for r in rows if r["S"] is not None])] if len(by_family) > 1 \
        else []
    return scopes + [(f, [r for r in rs if r["S"] is not None]) for f, rs in by_family.items()]
  return list(by_family.items())


def fit_sparse(rows, by_family, mode, *, huber_delta, bootstrap, seed) -> dict:
  """{form: {"fits": [...], "skipped": [{"scope", "reason"}]}} for the forms ``mode`` asks for."""
  forms = {"auto": ("frantar", "granularity"), "none": (), "frantar": ("frantar",),
           "granularity": ("granularity",)}[mode]
  out = {}
  for form in forms:
    x = sparse_laws.FORMS[form]["x"]
    fitter = sparse_laws.fit_frantar if form == "frantar" else sparse_laws.fit_granularity
    fits, skipped = [], []
    for scope, rs in _sparse_scopes(rows, by_family, form):
      levels = sorted({round(r[x], 6) for r in rs})
      if len(levels) < sparse_laws.MIN_LEVELS:
        shown = ", ".join(f"{v:.4g}" for v in levels) or "none"
        skipped.append({"scope": scope, "reason": f"{x} does not vary enough ({shown}; needs "
                                                  f"{sparse_laws.MIN_LEVELS} distinct values)"})
        continue
      try:
        fit = fitter([r[x] for r in rs], [r["N"] for r in rs], [r["D"] for r in rs],
                     [r["L"] for r in rs], huber_delta=huber_delta, bootstrap=bootstrap,
                     seed=seed)
      except ValueError as e:
        skipped.append({"scope": scope, "reason": str(e)})
        continue
      fits.append({"scope": scope, **fit.to_json()})
    out[form] = {"title": sparse_laws.FORMS[form]["title"],
                 "formula": sparse_laws.FORMS[form]["formula"], "fits": fits, "skipped": skipped}
  return out


def analyze(root, *, loss: str = "eval_loss", n_field: str = "params_active_per_token",
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
                              budget_tol=budget_tol) for f, rs in by_family.items()}
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
  ap = argparse.ArgumentParser(prog="python -m sparsejax.fit", description=__doc__,
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
  prog = "sparsejax.fit"
  try:
    result = analyze(a.root, loss=a.loss, n_field=a.n_field, huber_delta=a.huber_delta,
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
      from sparsejax.scaling import plots
    except ImportError as e:
      print(f"{prog}: error: plots need matplotlib ({e}); pip install matplotlib, or pass "
            "--no-plots", file=sys.stderr)
      return 2
    images = plots.write_all(data, out)
  from sparsejax.scaling import report
  tmp = out / "fits.json.tmp"
  tmp.write_text(json.dumps(data, indent=1, allow_nan=False))
  os.replace(tmp, out / "fits.json")
  path = report.write(data, out, images)
  print(report.headline(data))
  print(f"{prog}: wrote {path}, {out / 'fits.json'} and {len(images)} plot(s)", file=sys.stderr)
  return 0 if fitted_any(result) else 1


if __name__ == "__main__":
  sys.exit(main())
