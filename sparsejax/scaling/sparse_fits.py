"""Sparse scaling laws over a sweep's rows (sparsejax.scaling.sparse_laws): the Frantar et al.
form over the WEIGHT sparsity S per family and pooled over all families, the fine-grained MoE
form over the granularity G per family, each fitted only where its axis varies enough.

Inputs (rows built by sparsejax.scaling.analyze): S is the record's ``weight_sparsity`` (None
without one: the run is no Frantar input); G is the record's ``granularity`` (None for a run
without MoE layers: no granularity input). The Frantar law needs some run with S > 0: ``--sparse
frantar`` without one is an error (``FRANTAR_NEEDS_WEIGHT_SPARSITY``), ``auto`` skips the law with
that reason in the report.
"""

from __future__ import annotations

from sparsejax.scaling import sparse_laws

SPARSE_MODES = ("auto", "none", "frantar", "granularity")
FRANTAR_NEEDS_WEIGHT_SPARSITY = (
    "the Frantar et al. sparsity law is for weight-sparse runs (record field weight_sparsity); "
    "this sweep has none: MoE/memory/PEER activation sparsity is not weight sparsity — use "
    "--sparse granularity for MoE or fit families separately")


def has_weight_sparsity(rows) -> bool:
  """Whether any row is weight-sparse (S > 0), i.e. whether the Frantar law applies at all."""
  return any(r["S"] is not None and r["S"] > 0 for r in rows)


def _sparse_scopes(rows, by_family, form):
  x = sparse_laws.FORMS[form]["x"]
  per_family = [(f, [r for r in rs if r[x] is not None]) for f, rs in by_family.items()]
  per_family = [(f, rs) for f, rs in per_family if rs]
  if form == "frantar" and len(per_family) > 1:
    return [("all families", [r for _, rs in per_family for r in rs])] + per_family
  return per_family


def fit_sparse(rows, by_family, mode, *, huber_delta, bootstrap, seed) -> dict:
  """{form: {"fits": [...], "skipped": [{"scope", "reason"}]}} for the forms ``mode`` asks for.
  Raises ValueError (FRANTAR_NEEDS_WEIGHT_SPARSITY) for mode "frantar" without weight-sparse
  rows."""
  forms = {"auto": ("frantar", "granularity"), "none": (), "frantar": ("frantar",),
           "granularity": ("granularity",)}[mode]
  if mode == "frantar" and not has_weight_sparsity(rows):
    raise ValueError(FRANTAR_NEEDS_WEIGHT_SPARSITY)
  out = {}
  for form in forms:
    x = sparse_laws.FORMS[form]["x"]
    fitter = sparse_laws.fit_frantar if form == "frantar" else sparse_laws.fit_granularity
    fits, skipped = [], []
    scopes = _sparse_scopes(rows, by_family, form)
    if form == "frantar" and not has_weight_sparsity(rows):
      scopes = []
      skipped.append({"scope": "all families",
                      "reason": "no run records weight_sparsity > 0 (the Frantar et al. law is "
                                "for weight sparsity; MoE / memory / PEER activation sparsity "
                                "is not an input to it)"})
    elif form == "granularity" and not scopes:
      skipped.append({"scope": "all families",
                      "reason": "no run has MoE layers (record field granularity)"})
    for scope, rs in scopes:
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
                 "formula": sparse_laws.FORMS[form]["formula"], "x": x, "fits": fits,
                 "skipped": skipped}
  return out
