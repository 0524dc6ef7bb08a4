"""The average-parameter law of weight-sparse runs ("The Journey Matters", Jin et al.):
``L = E + A / N̄**alpha + B / D**beta`` with N̄ the non-zero parameters averaged over the training
steps (a run pruned late spends most of its steps near its dense N, one pruned early near its
final N), fitted as Chinchilla approach 3 (sparsejax.scaling.fit: Huber on log L, L-BFGS-B from a
grid, bootstrap intervals); and the comparison of that law with the Frantar et al. law on the same
points.

Record level: ``nonzero_counts`` turns a record's pruned counts (sparsejax.scaling.records:
``params_pruned_final`` / ``params_pruned_mean``, per-token shares) into the non-zero N at the end
(Frantar's N) and the average N̄, both subtracted from the fit's N flavour.
"""

from __future__ import annotations

import math

import numpy as np

from sparsejax.scaling.fit import fit_approach3
from sparsejax.scaling.sparse_laws import single_threaded_blas

TITLE = "Average-parameter law (Jin et al., 'The Journey Matters')"
FORMULA = "L = E + A/N̄^α + B/D^β, N̄ = N - params_pruned_mean"
PARAMS = ("E", "A", "alpha", "B", "beta")
NEEDS_WEIGHT_SPARSITY = (
    "the average-parameter law is for weight-sparse runs (record fields weight_sparsity, "
    "params_pruned_mean); this sweep has none: MoE/memory/PEER activation sparsity is not weight "
    "sparsity; run a sparsity sweep (config.sparsity.method) or use --sparse granularity for MoE")
MISSING_PRUNED = "missing (N taken as the non-zero count)"


def _count(rec: dict, key: str) -> float | None:
  v = rec.get(key)
  if v is None:
    return None
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
    raise ValueError(f"{key} is {v!r}, not a count >= 0")
  return float(v)


def nonzero_counts(rec: dict, N: float, S: float | None) -> tuple[float, float, str | None]:
  """(N_nonzero at the end, N̄ averaged over training, source) of a record whose fit N is ``N``.

  Ordinary runs (S None): (N, N, None). Weight-sparse runs: ``N - params_pruned_final`` and
  ``N - params_pruned_mean``; source "record", or ``MISSING_PRUNED`` for a record with S > 0 that
  lacks the counts (written before them: its N is then taken as already non-zero). The pruned
  counts are per-token shares (MoE experts k/E), exact for every active-parameter N flavour; for
  ``--n-field params_total`` of an MoE run they understate the stored pruned weights."""
  if S is None:
    return N, N, None
  final, mean = _count(rec, "params_pruned_final"), _count(rec, "params_pruned_mean")
  if final is None and mean is None:
    return N, N, (MISSING_PRUNED if S > 0 else "record")
  if final is None or mean is None:
    have, lack = (("params_pruned_final", "params_pruned_mean") if mean is None else
                  ("params_pruned_mean", "params_pruned_final"))
    raise ValueError(f"has {have} but no {lack}")
  for key, v in (("params_pruned_final", final), ("params_pruned_mean", mean)):
    if v >= N:
      raise ValueError(f"{key} = {v:.6g} is not below N = {N:.6g}: no non-zero weight left")
  return N - final, N - mean, "record"


def fit_scope(rows: list[dict], *, huber_delta: float, bootstrap: int, seed: int):
  """Approach 3 over (N̄, D, L) of the rows: (fits.json entry without scope, FitResult)."""
  with single_threaded_blas():  # as the other fits: L-BFGS-B on 5 parameters
    fit = fit_approach3([r["N_avg"] for r in rows], [r["D"] for r in rows],
                        [r["L"] for r in rows], huber_delta=huber_delta, bootstrap=bootstrap,
                        seed=seed)
  iv = fit.intervals or {}
  entry = {"form": "avg_params", "formula": FORMULA,
           "params": {k: float(getattr(fit, k)) for k in PARAMS},
           "intervals": {k: iv[k] for k in PARAMS if k in iv} or None, "loss": fit.loss,
           "n_points": fit.n_points, "n_inits": fit.n_inits, "converged": fit.converged,
           "huber_delta": fit.huber_delta,
           "levels": sorted({round(r["S"], 6) for r in rows})}
  return entry, fit


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
  a = np.abs(r)
  return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def compare(scope: str, rows: list[dict], frantar, avg, huber_delta: float) -> dict:
  """Both laws on the same points: Huber objective per point and RMSE of log L (lower is
  better; the Frantar form has 7 parameters, the average-parameter law 5)."""
  log_l = np.log([r["L"] for r in rows])
  pred = {"frantar": frantar.predict([r["S"] for r in rows], [r["N_nonzero"] for r in rows],
                                     [r["D"] for r in rows]),
          "avg_params": avg.predict([r["N_avg"] for r in rows], [r["D"] for r in rows])}
  out = {"scope": scope, "n_points": len(rows), "huber_delta": huber_delta, "laws": {}}
  for law, p in pred.items():
    with np.errstate(divide="ignore", invalid="ignore"):
      res = np.log(np.asarray(p, dtype=np.float64)) - log_l
    out["laws"][law] = {"huber_per_point": float(_huber(res, huber_delta).mean()),
                        "rmse_log_l": float(np.sqrt(np.mean(res ** 2))),
                        "max_abs_log_l": float(np.max(np.abs(res))),
                        "n_params": 7 if law == "frantar" else len(PARAMS)}
  h = {k: v["huber_per_point"] for k, v in out["laws"].items()}
  out["better"] = min(h, key=lambda k: (h[k], k)) if all(map(math.isfinite, h.values())) else None
  out["points"] = [{"name": r["name"], "S": r["S"], "L": r["L"],
                    "frantar": float(pf), "avg_params": float(pa)}
                   for r, pf, pa in zip(rows, pred["frantar"], pred["avg_params"])]
  return out
