"""PNG plots of a scaling-law analysis (the dict ``sparsejax.scaling.analyze`` writes
to fits.json).

matplotlib is imported here only (rendered with the Agg canvas, no pyplot, no GUI), so fitting
stays importable without it. File names are fixed; one colour per family (sorted names):
  loss_vs_compute.png      loss against C = 6ND: runs, and each family's approach-3
                           compute-optimal frontier (dashed beyond the largest budget)
  isoflop_<family>.png     loss against N per isoFLOP budget (labelled by its total FLOPs F,
                           6N+attn, the quantity that grouped it), the parabola, its minimum
  optimal_allocation.png   N_opt and D_opt against compute: approach 3 against C = 6ND,
                           approach 2 (minima and line) against F
  residuals.png            approach-3 prediction against observation, and relative residuals
  sparse_laws.png          where both weight-sparse laws were fitted: each scope's observed loss
                           against the Frantar and the average-parameter prediction
"""

from __future__ import annotations

import pathlib
import re

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

DPI = 110
_METADATA = {"Software": None}  # no version string: same inputs, same bytes


def _colors(families) -> dict[str, str]:
  return {f: f"C{i % 10}" for i, f in enumerate(sorted(families))}


def safe_name(family: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]", "_", family)


def _save(fig: Figure, out: pathlib.Path, name: str) -> str:
  FigureCanvasAgg(fig)
  fig.savefig(out / name, dpi=DPI, metadata=_METADATA)
  return name


def _a3_frontier(a3: dict, C: np.ndarray):
  """Approach-3 compute-optimal N, D and loss along budgets C (C = 6ND)."""
  n = a3["G"] * (C / 6.0) ** a3["a"]
  d = C / (6.0 * n)
  return n, d, a3["E"] + a3["A"] / n ** a3["alpha"] + a3["B"] / d ** a3["beta"]


def _c_range(fam: dict, runs: list[dict], key: str = "C") -> tuple[np.ndarray, float]:
  """A compute grid from half the smallest run to 100x the largest budget: C = 6ND (key "C")
  or F = total_flops (key "total_flops")."""
  lo = min(r[key] for r in runs) / 2
  hi = max(b["C_6ND" if key == "C" else key] for b in fam["budgets"])
  return np.geomspace(lo, hi * 100, 200), hi


def _family_runs(data: dict) -> dict[str, list[dict]]:
  out: dict[str, list[dict]] = {f: [] for f in data["families"]}
  for r in data["runs"]:
    out[r["family"]].append(r)
  return out


def loss_vs_compute(data: dict, out: pathlib.Path) -> str:
  fig = Figure(figsize=(7, 5))
  ax = fig.subplots()
  colors = _colors(data["families"])
  for fam, runs in _family_runs(data).items():
    c = colors[fam]
    ax.scatter([r["C"] for r in runs], [r["L"] for r in runs], s=18, color=c, alpha=0.8,
               label=f"{fam} runs")
    a3 = data["families"][fam]["approach3"]
    if "skipped" not in a3:
      C, hi = _c_range(data["families"][fam], runs)
      _, _, L = _a3_frontier(a3, C)
      ax.plot(C[C <= hi], L[C <= hi], color=c, lw=1.5, label=f"{fam} optimal frontier (appr. 3)")
      ax.plot(C[C >= hi], L[C >= hi], color=c, lw=1.5, ls="--")
  ax.set(xscale="log", yscale="log", xlabel="training compute C = 6·N·D (FLOPs)",
         ylabel=data["conventions"]["loss_field"],
         title=f"Loss vs compute ({data['conventions']['n_field']} as N)")
  ax.yaxis.set_major_formatter(ScalarFormatter())
  ax.yaxis.set_minor_formatter(ScalarFormatter())
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7)
  return _save(fig, out, "loss_vs_compute.png")


def isoflop(data: dict, fam: str, out: pathlib.Path) -> str:
  fig = Figure(figsize=(7, 5))
  ax = fig.subplots()
  f = data["families"][fam]
  by_name = {r["name"]: r for r in data["runs"] if r["family"] == fam}
  minima = f["approach2"].get("minima", [])
  for i, b in enumerate(f["budgets"]):
    c = f"C{i % 10}"
    runs = sorted((by_name[n] for n in b["names"]), key=lambda r: r["N"])
    ax.plot([r["N"] for r in runs], [r["L"] for r in runs], "o", color=c, ms=5,
            label=f"F = {b['total_flops']:.3g}")
    m = next((m for m in minima if np.isclose(m["total_flops"], b["total_flops"], rtol=1e-6)),
             None)
    if m is None:
      continue
    x = np.linspace(*m["log_n_range"], 100)
    ax.plot(np.exp(x), np.polyval(m["coeffs"], x), color=c, lw=1)
    if m["ok"]:
      ax.plot(m["N_opt"], m["L_opt"], "*", color=c, ms=12, mec="k")
  ax.set(xscale="log", xlabel=data["conventions"]["N"].split(" (")[0],
         ylabel=data["conventions"]["loss_field"],
         title=f"{fam}: isoFLOP curves (parabola in log N, ★ minimum)")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7, title="budget (total FLOPs, 6N+attn)", title_fontsize=7)
  return _save(fig, out, f"isoflop_{safe_name(fam)}.png")


def optimal_allocation(data: dict, out: pathlib.Path) -> str:
  fig = Figure(figsize=(11, 4.5))
  ax_n, ax_d = fig.subplots(1, 2)
  colors = _colors(data["families"])
  for fam, runs in _family_runs(data).items():
    f, c = data["families"][fam], colors[fam]
    C, _ = _c_range(f, runs)
    if "skipped" not in f["approach3"]:
      n, d, _ = _a3_frontier(f["approach3"], C)
      ax_n.plot(C, n, color=c, lw=1.5, label=f"{fam} appr. 3 (a={f['approach3']['a']:.3f})")
      ax_d.plot(C, d, color=c, lw=1.5, label=f"{fam} appr. 3 (b={f['approach3']['b']:.3f})")
    a2 = f["approach2"]
    if "skipped" not in a2:
      F, _ = _c_range(f, runs, "total_flops")
      n2 = np.exp(a2["n_intercept"]) * F ** a2["a"]
      d2 = np.exp(a2["d_intercept"]) * F ** a2["b"]
      ax_n.plot(F, n2, color=c, lw=1, ls="--", label=f"{fam} appr. 2 vs F (a={a2['a']:.3f})")
      ax_d.plot(F, d2, color=c, lw=1, ls="--", label=f"{fam} appr. 2 vs F (b={a2['b']:.3f})")
      for m in a2["minima"]:
        if m["N_opt"] is None or m["D_opt"] is None:
          continue
        style = dict(color=c) if m["ok"] else dict(mfc="none", mec=c)
        ax_n.plot(m["total_flops"], m["N_opt"], "o", ms=6, **style)
        ax_d.plot(m["total_flops"], m["D_opt"], "o", ms=6, **style)
  for ax, what in ((ax_n, "N_opt"), (ax_d, "D_opt (tokens)")):
    ax.set(xscale="log", yscale="log",
           xlabel="compute (FLOPs): C = 6·N·D for appr. 3, F = total FLOPs (6N+attn) for appr. 2",
           ylabel=what)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  ax_n.set_title(f"Compute-optimal N ({data['conventions']['n_field']})", fontsize=10)
  ax_d.set_title("Compute-optimal D (points: isoFLOP minima, hollow: not used)", fontsize=10)
  fig.tight_layout()
  return _save(fig, out, "optimal_allocation.png")


def residuals(data: dict, out: pathlib.Path) -> str | None:
  runs = [r for r in data["runs"] if r.get("L_pred")]
  if not runs:
    return None
  fig = Figure(figsize=(11, 4.5))
  ax_p, ax_r = fig.subplots(1, 2)
  colors = _colors(data["families"])
  for fam in sorted(data["families"]):
    rs = [r for r in runs if r["family"] == fam]
    if not rs:
      continue
    obs, pred = np.array([r["L"] for r in rs]), np.array([r["L_pred"] for r in rs])
    ax_p.scatter(pred, obs, s=18, color=colors[fam], label=fam)
    ax_r.scatter([r["C"] for r in rs], obs / pred - 1, s=18, color=colors[fam], label=fam)
  lo = min(min(r["L"], r["L_pred"]) for r in runs)
  hi = max(max(r["L"], r["L_pred"]) for r in runs)
  ax_p.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="y = x")
  ax_p.set(xlabel="predicted loss (approach 3)", ylabel="observed loss",
           title="Approach 3: predicted vs observed")
  ax_r.axhline(0, color="k", lw=0.8)
  ax_r.set(xscale="log", xlabel="C = 6·N·D (FLOPs)", ylabel="observed / predicted - 1",
           title="Relative residuals")
  for ax in (ax_p, ax_r):
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  return _save(fig, out, "residuals.png")


def sparse_laws(data: dict, out: pathlib.Path) -> str | None:
  comparison = ((data.get("sparse_laws") or {}).get("avg_params") or {}).get("comparison") or []
  if not comparison:
    return None
  fig = Figure(figsize=(5 * len(comparison), 4.5))
  axes = np.atleast_1d(fig.subplots(1, len(comparison)))
  for ax, cmp_ in zip(axes, comparison):
    pts = cmp_["points"]
    obs = [p["L"] for p in pts]
    for law, marker, label in (("frantar", "o", "Frantar (N non-zero, S)"),
                               ("avg_params", "s", "average-parameter (N̄)")):
      rmse = cmp_["laws"][law]["rmse_log_l"]
      ax.scatter([p[law] for p in pts], obs, s=18, marker=marker, alpha=0.7,
                 label=f"{label}: RMSE log L {rmse:.3g}")
    lo = min(min(obs), *(p[k] for p in pts for k in ("frantar", "avg_params")))
    hi = max(max(obs), *(p[k] for p in pts for k in ("frantar", "avg_params")))
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
    ax.set(xlabel="predicted loss", ylabel="observed loss", title=f"{cmp_['scope']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle("Weight-sparse laws: predicted vs observed (same points)", fontsize=10)
  fig.tight_layout()
  return _save(fig, out, "sparse_laws.png")


def write_all(data: dict, out) -> list[tuple[str, str]]:
  """Write every plot into ``out``; returns (title, file name) pairs in report order."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  images = [("Loss vs compute", loss_vs_compute(data, out))]
  images += [(f"isoFLOP curves: {fam}", isoflop(data, fam, out))
             for fam in sorted(data["families"])]
  images.append(("Compute-optimal allocation", optimal_allocation(data, out)))
  name = residuals(data, out)
  if name:
    images.append(("Approach-3 residuals", name))
  name = sparse_laws(data, out)
  if name:
    images.append(("Weight-sparse laws", name))
  return images
