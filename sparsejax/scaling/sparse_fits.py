"""Sparse scaling laws over a sweep's rows: the Frantar et al. form over the WEIGHT sparsity S
(sparsejax.scaling.sparse_laws) and the average-parameter law over N̄
(sparsejax.scaling.avg_params), each per family and pooled over the weight-sparse families; the
fine-grained MoE form over the granularity G per family. Each is fitted only where its axis
varies enough; where both weight-sparse laws are fitted on a scope, they are compared on its
points.

Inputs (rows built by sparsejax.scaling.analyze): S is the record's ``weight_sparsity`` (None
without one: the run is no input to either weight-sparse law, and a family without such runs is
never pooled); the Frantar law's N is the non-zero count at the end (``N_nonzero`` = N -
params_pruned_final), the average-parameter law's N̄ (``N_avg`` = N - params_pruned_mean); G is
the record's ``granularity`` (None for a run without MoE layers: no granularity input). Both
weight-sparse laws need some run with S > 0: ``--sparse frantar`` / ``--sparse avg_params``
without one is an error (``FRANTAR_NEEDS_WEIGHT_SPARSITY`` / ``AVG_PARAMS_NEEDS_WEIGHT_SPARSITY``);
``auto`` skips the Frantar law with that reason in the report and leaves out the average-parameter
law.
"""

from __future__ import annotations

from sparsejax.scaling import avg_params, sparse_laws

SPARSE_MODES = ("auto", "none", "frantar", "granularity", "avg_params")
FRANTAR_NEEDS_WEIGHT_SPARSITY = (
    "the Frantar et al. sparsity law is for weight-sparse runs (record field weight_sparsity); "
    "this sweep has none: MoE/memory/PEER activation sparsity is not weight sparsity — use "
    "--sparse granularity for MoE or fit families separately")
AVG_PARAMS_NEEDS_WEIGHT_SPARSITY = avg_params.NEEDS_WEIGHT_SPARSITY
NO_WEIGHT_SPARSITY = ("no run records weight_sparsity > 0 (the Frantar et al. law is for weight "
                      "sparsity; MoE / memory / PEER activation sparsity is not an input to it)")
# The N column each law reads from a row (analyze.to_row).
N_COLUMN = {"frantar": "N_nonzero", "granularity": "N", "avg_params": "N_avg"}


def has_weight_sparsity(rows) -> bool:
  """Whether any row is weight-sparse (S > 0), i.e. whether the weight-sparse laws apply."""
  return any(r["S"] is not None and r["S"] > 0 for r in rows)


def _sparse_scopes(by_family, form):
  """(scope, rows) pairs: per family its rows with the law's axis (S, G), and for the weight-sparse
  laws the pool of those families' rows (families without such a row are never pooled)."""
  x = "G" if form == "granularity" else "S"
  per_family = [(f, [r for r in rs if r[x] is not None]) for f, rs in by_family.items()]
  per_family = [(f, rs) for f, rs in per_family if rs]
  if form != "granularity" and len(per_family) > 1:
    return [("all families", [r for _, rs in per_family for r in rs])] + per_family
  return per_family


def _fit_scope(form, rows, *, huber_delta, bootstrap, seed):
  """(fits.json entry without scope, fit object); raises ValueError with the reason to skip."""
  if form == "avg_params":
    if not has_weight_sparsity(rows):
      raise ValueError("no run with weight_sparsity > 0 here (its law is approach 3 above)")
    return avg_params.fit_scope(rows, huber_delta=huber_delta, bootstrap=bootstrap, seed=seed)
  x = sparse_laws.FORMS[form]["x"]
  levels = sorted({round(r[x], 6) for r in rows})
  if len(levels) < sparse_laws.MIN_LEVELS:
    shown = ", ".join(f"{v:.4g}" for v in levels) or "none"
    raise ValueError(f"{x} does not vary enough ({shown}; needs {sparse_laws.MIN_LEVELS} "
                     "distinct values)")
  fitter = sparse_laws.fit_frantar if form == "frantar" else sparse_laws.fit_granularity
  n = N_COLUMN[form]
  fit = fitter([r[x] for r in rows], [r[n] for r in rows], [r["D"] for r in rows],
               [r["L"] for r in rows], huber_delta=huber_delta, bootstrap=bootstrap, seed=seed)
  return fit.to_json(), fit


def _law(form) -> dict:
  if form == "avg_params":
    return {"title": avg_params.TITLE, "formula": avg_params.FORMULA, "x": "S", "N": "N_avg"}
  f = sparse_laws.FORMS[form]
  return {"title": f["title"], "formula": f["formula"], "x": f["x"], "N": N_COLUMN[form]}


def fit_sparse(rows, by_family, mode, *, huber_delta, bootstrap, seed) -> dict:
  """{form: {"title", "formula", "x", "N", "fits": [...], "skipped": [{"scope", "reason"}]}} for
  the forms ``mode`` asks for ("auto": Frantar, granularity, and the average-parameter law where
  weight-sparse runs exist); "avg_params" also holds "comparison" (one entry per scope where both
  weight-sparse laws were fitted, avg_params.compare). Raises ValueError for mode "frantar" /
  "avg_params" without weight-sparse rows."""
  sparse = has_weight_sparsity(rows)
  if mode == "frantar" and not sparse:
    raise ValueError(FRANTAR_NEEDS_WEIGHT_SPARSITY)
  if mode == "avg_params" and not sparse:
    raise ValueError(AVG_PARAMS_NEEDS_WEIGHT_SPARSITY)
  forms = {"auto": ("frantar", "granularity") + (("avg_params",) if sparse else ()),
           "none": (), "frantar": ("frantar",), "granularity": ("granularity",),
           "avg_params": ("avg_params",)}[mode]
  out, fitted = {}, {}
  for form in forms:
    fits, skipped = [], []
    scopes = _sparse_scopes(by_family, form)
    if form == "frantar" and not sparse:
      scopes = []
      skipped.append({"scope": "all families", "reason": NO_WEIGHT_SPARSITY})
    elif form == "granularity" and not scopes:
      skipped.append({"scope": "all families",
                      "reason": "no run has MoE layers (record field granularity)"})
    for scope, rs in scopes:
      try:
        entry, fit = _fit_scope(form, rs, huber_delta=huber_delta, bootstrap=bootstrap,
                                seed=seed)
      except ValueError as e:
        skipped.append({"scope": scope, "reason": str(e)})
        continue
      fits.append({"scope": scope, **entry})
      fitted[form, scope] = (fit, rs)
    out[form] = {**_law(form), "fits": fits, "skipped": skipped}
  if "avg_params" in out:
    out["avg_params"]["comparison"] = [
        avg_params.compare(scope, rs, fitted["frantar", scope][0], fit, huber_delta)
        for (form, scope), (fit, rs) in fitted.items()
        if form == "avg_params" and ("frantar", scope) in fitted]
  return out
