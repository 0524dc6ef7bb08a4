"""Sparse scaling laws over a sweep's rows (sparsejax.scaling.sparse_laws): the Frantar et al.
form over S per family and pooled over all families, the fine-grained MoE form over G per family,
each fitted only where its axis varies enough.
"""

from __future__ import annotations

from sparsejax.scaling import sparse_laws

SPARSE_MODES = ("auto", "none", "frantar", "granularity")


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
