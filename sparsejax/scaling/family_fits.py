"""Per-family scaling-law fits of a sweep's rows (one dict per usable record, built by
sparsejax.scaling.analyze): isoFLOP budgets, Chinchilla approach 3 and approach 2
(sparsejax.scaling.fit), compute-optimal predictions at the budgets and beyond, and warnings where
a fit looks degenerate. The conventions are in the docstring of sparsejax.scaling.analyze.

Two compute measures, each named by its key (fits.json):
  ``total_flops``  the records' training FLOPs (6N + attention, padded head; what the runs
                   executed): runs are GROUPED into budgets by it, and approach 2 regresses on it
                   (a budget's value: the geometric mean of its runs').
  ``C_6ND``        C = 6ND with the fit's N: approach 3's compute (its predictions, frontier).
A budget carries both; a prediction is made at both (approach 3 at ``C_6ND``, approach 2 at
``total_flops``).
"""

from __future__ import annotations

import math

import numpy as np

from sparsejax.scaling.fit import fit_approach2, fit_approach3

EXTRAPOLATE = (10.0, 100.0)


class FitError(ValueError):
  """A one-line reason the analysis cannot run; ``problems`` lists the records left out."""

  def __init__(self, message: str, problems: list[dict] | None = None):
    super().__init__(message)
    self.problems = problems or []


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
  return {"total_flops": _geomean(flops), "C_6ND": _geomean([r["C"] for r in group]),
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
  """Isoflop parabolas per budget; the power laws are in the budgets' total_flops (the quantity
  that grouped them), D* read off each budget's runs."""
  usable, skipped = [], []
  for g in groups:
    b = _budget_summary(g)
    if b["sizes"] < 3:
      skipped.append({"total_flops": b["total_flops"],
                      "reason": f"{b['sizes']} distinct size(s); a parabola needs 3"})
    else:
      usable.append((b["total_flops"], g))
  if len(usable) < 2:
    return {"skipped": f"{len(usable)} budget(s) with >= 3 sizes of {len(groups)}; approach 2 "
                       "needs 2", "skipped_budgets": skipped}, None
  F = [f for f, g in usable for _ in g]
  try:
    fit = fit_approach2(F, [r["N"] for _, g in usable for r in g],
                        [r["L"] for _, g in usable for r in g],
                        [r["D"] for _, g in usable for r in g])
  except ValueError as e:
    return {"skipped": str(e), "skipped_budgets": skipped}, None
  minima = [{"total_flops": m.C, "N_opt": m.N_opt, "D_opt": m.D_opt, "L_opt": m.L_opt,
             "coeffs": list(m.coeffs), "n_points": m.n_points, "log_n_range": list(m.log_n_range),
             "positive_curvature": m.positive_curvature, "in_range": m.in_range, "ok": m.ok}
            for m in fit.minima]
  return {"compute": "total_flops", "a": fit.a, "b": fit.b, "n_intercept": fit.n_intercept,
          "d_intercept": fit.d_intercept, "n_used": fit.n_used, "minima": minima,
          "skipped_budgets": skipped}, fit


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
  last = max(out["budgets"], key=lambda b: b["total_flops"])
  targets = [(b["total_flops"], b["C_6ND"], "budget") for b in out["budgets"]]
  targets += [(f * last["total_flops"], f * last["C_6ND"], f"{f:g}x largest")
              for f in EXTRAPOLATE]
  preds = []
  for F, C, label in targets:
    p = {"total_flops": F, "C_6ND": C, "label": label, "approach3": None, "approach2": None}
    if fit3 is not None:
      n, d = (float(v) for v in fit3.optimal(C))
      n_ci, d_ci = _optimal_interval(fit3, C)
      p["approach3"] = {"N_opt": n, "D_opt": d, "L_opt": float(fit3.predict(n, d)),
                        "N_opt_ci": n_ci, "D_opt_ci": d_ci}
    if fit2 is not None:
      n, d = (float(v) for v in fit2.optimal(F))
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
