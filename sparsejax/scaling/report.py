"""Markdown report of a scaling-law analysis (the dict ``sparsejax.scaling.analyze`` writes
to fits.json).

``headline(data)`` is the per-family table of fitted parameters with its conventions line,
printable on its own; ``render`` ties it to the N choice and the definitions of N, D, C, F, G,
S, the weight-sparse N and L (with notes on old records), the sweep summary, compute-optimal
predictions, the approach-2 budgets (labelled by the total FLOPs that grouped them), the sparse
laws (Frantar, average-parameter, granularity, and which weight-sparse law fits better), the plots
(relative links) and the records left out. Numbers are rounded here (3 significant digits);
fits.json keeps full precision.
"""

from __future__ import annotations

import pathlib

REPORT = "REPORT.md"
BUDGET_LABEL = "total FLOPs, 6N+attn"


def _g(x, digits: int = 3) -> str:
  if x is None:
    return "–"
  if isinstance(x, bool):
    return "yes" if x else "no"
  if isinstance(x, int):
    return str(x)
  return f"{x:.{digits}g}"


def _ci(value, interval, digits: int = 3) -> str:
  if not interval or None in interval:
    return _g(value, digits)
  return f"{_g(value, digits)} [{_g(interval[0], digits)}, {_g(interval[1], digits)}]"


def _table(header, rows) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return lines


def _conventions_line(data: dict) -> str:
  c = data["conventions"]
  return (f"Fit L = E + A/N^α + B/D^β (Chinchilla approach 3, Huber δ={_g(c['huber_delta'])} on "
          f"log L); {c['N']}; {c['D']}; C = 6ND, N_opt ∝ C^a, D_opt ∝ C^b; approach 2: "
          f"N* ∝ F^a with F = budget ({c['budget']}); {c['L']}; brackets: {c['intervals']}.")


def _n_choice(c: dict) -> str:
  """The report header's statement of N: which field, whether it is the default, and why."""
  chosen = f"`--n {c['n']}`" if c.get("n") else f"`--n-field {c['n_field']}`"
  default = (" (the default)" if c["n_field"] == c["n_default_field"] else
             f" (the default is {c['n_default']})")
  return (f"**N** = `{c['n_field']}`, chosen by {chosen}{default}. The default is the "
          "Chinchilla-style total (active matmul weights including the output head at the true "
          "vocabulary): the head is a matmul every token pays for, a large share of the compute "
          "at small widths, so only an N that includes it makes C = 6ND the training compute; "
          "`--n non_embedding` gives the Kaplan-style count without the head.")


def headline(data: dict) -> str:
  """The per-family parameter table (markdown) preceded by its conventions line."""
  rows = []
  for fam, f in data["families"].items():
    a3, a2 = f["approach3"], f["approach2"]
    a2_cell = _g(a2["a"]) if "skipped" not in a2 else "skipped"
    if "skipped" in a3:
      rows.append([fam, f["runs"], *(["–"] * 7), a2_cell])
      continue
    iv = a3.get("intervals") or {}
    rows.append([fam, f["runs"], *(_ci(a3[k], iv.get(k)) for k in
                                    ("E", "A", "alpha", "B", "beta", "a", "b")), a2_cell])
  header = ["family", "runs", "E", "A", "α", "B", "β", "a (N_opt ∝ C^a)", "b (D_opt ∝ C^b)",
            "a (approach 2, N* ∝ F^a)"]
  warnings = [f"- ⚠ {fam}: {w}" for fam, f in data["families"].items()
              for w in f.get("warnings", [])]
  return "\n".join([_conventions_line(data), "", *_table(header, rows),
                    *([""] + warnings if warnings else [])])


def _summary(data: dict) -> list[str]:
  rows, total_c, total_f, wall = [], 0.0, 0.0, 0.0
  walls_known = True
  runs_by_fam: dict[str, list[dict]] = {}
  for r in data["runs"]:
    runs_by_fam.setdefault(r["family"], []).append(r)
  for fam, f in data["families"].items():
    rs = runs_by_fam[fam]
    c = sum(r["C"] for r in rs)
    tf = sum(r["total_flops"] for r in rs)
    total_c, total_f = total_c + c, total_f + tf
    if f["wall_s"] is None:
      walls_known = False
    else:
      wall += f["wall_s"]
    budgets = ", ".join(f"{_g(b['total_flops'])} ({b['runs']})" for b in f["budgets"])
    rows.append([fam, f["runs"], f"{_g(min(r['N'] for r in rs))} – {_g(max(r['N'] for r in rs))}",
                 budgets, _g(c), _g(tf),
                 "–" if f["wall_s"] is None else f"{f['wall_s']:.0f} s"])
  header = ["family", "runs fitted", "N range", f"budgets ({BUDGET_LABEL}) (runs)", "Σ 6ND",
            "Σ total_flops", "wall time"]
  out = [f"{len(data['runs'])} runs fitted in {len(data['families'])} famil"
         f"{'y' if len(data['families']) == 1 else 'ies'}, {len(data['problems'])} record(s) "
         f"left out (see Problems). Compute: {_g(total_c)} FLOPs as 6ND, {_g(total_f)} as the "
         "records' total_flops (6N + attention, sparsejax.models.accounting)"
         + (f"; wall time {wall:.0f} s in all." if walls_known else "."), ""]
  return out + _table(header, rows)


def _predictions(data: dict) -> list[str]:
  rows = []
  for fam, f in data["families"].items():
    for p in f["predictions"]:
      a3, a2 = p["approach3"], p["approach2"]
      rows.append([fam, p["label"], _g(p["total_flops"]), _g(p["C_6ND"]),
                   _ci(a3["N_opt"], a3["N_opt_ci"]) if a3 else "–",
                   _ci(a3["D_opt"], a3["D_opt_ci"]) if a3 else "–",
                   _g(a3["D_opt"] / a3["N_opt"]) if a3 else "–",
                   _g(a3["L_opt"]) if a3 else "–",
                   _g(a2["N_opt"]) if a2 else "–", _g(a2["D_opt"]) if a2 else "–"])
  header = ["family", "at", f"budget ({BUDGET_LABEL})", "C = 6ND", "N_opt (appr. 3, at C)",
            "D_opt (appr. 3)", "D/N", "L_opt (appr. 3)", "N_opt (appr. 2, at F)",
            "D_opt (appr. 2)"]
  return _table(header, rows)


def _approach2(data: dict) -> list[str]:
  out = []
  for fam, f in data["families"].items():
    a2 = f["approach2"]
    out.append(f"**{fam}**: " + (f"skipped: {a2['skipped']}." if "skipped" in a2 else
                                f"N* ∝ F^{_g(a2['a'])}, D* ∝ F^{_g(a2['b'])} from "
                                f"{a2['n_used']} budget(s) (F = budget, {BUDGET_LABEL})."))
    rows = []
    for m in a2.get("minima", []):
      flag = "used" if m["ok"] else ("concave" if not m["positive_curvature"] else
                                     "minimum outside sampled N range")
      rows.append([_g(m["total_flops"]), m["n_points"], _g(m["N_opt"]), _g(m["D_opt"]),
                   _g(m["L_opt"]), flag])
    rows += [[_g(b["total_flops"]), "–", "–", "–", "–", f"skipped: {b['reason']}"]
             for b in a2.get("skipped_budgets", [])]
    if rows:
      out += [""] + _table([f"budget ({BUDGET_LABEL})", "runs", "N*", "D*", "L*", "status"],
                           rows)
    out.append("")
  return out


def _sparse(data: dict) -> list[str]:
  laws = data.get("sparse_laws") or {}
  if not laws:
    return ["Not requested (--sparse none)."]
  c = data["conventions"]
  out = [". ".join(c[k] for k in ("S", "N_sparse", "G") if k in c) + ". N, D and L as above.",
         ""]
  for form, law in laws.items():
    n = {"N_nonzero": " (N = non-zero parameters at the end)",
         "N_avg": " (N̄ = non-zero parameters averaged over training)"}.get(law.get("N"), "")
    out.append(f"**{law['title']}**: `{law['formula']}`{n}")
    if law["fits"]:
      names = list(law["fits"][0]["params"])
      rows = [[f["scope"], f["n_points"], ", ".join(_g(v, 4) for v in f["levels"]),
               *(_ci(f["params"][k], (f["intervals"] or {}).get(k)) for k in names)]
              for f in law["fits"]]
      out += [""] + _table(["scope", "runs", "levels", *names], rows)
    for s in law["skipped"]:
      out.append(f"- not fitted for {s['scope']}: {s['reason']}")
    out.append("")
    out += _comparison(law.get("comparison"))
  return out


def _comparison(comparison) -> list[str]:
  """Frantar vs average-parameter law on each scope's points (avg_params.compare)."""
  if not comparison:
    return []
  rows = []
  for cmp_ in comparison:
    f, a = cmp_["laws"]["frantar"], cmp_["laws"]["avg_params"]
    rows.append([cmp_["scope"], cmp_["n_points"], _g(f["huber_per_point"]),
                 _g(a["huber_per_point"]), _g(f["rmse_log_l"]), _g(a["rmse_log_l"]),
                 {"frantar": "Frantar", "avg_params": "average-parameter"}.get(
                     cmp_["better"], "–")])
  return (["**Which weight-sparse law fits better** (same points; Huber objective per point and "
           "RMSE of log L, lower is better; Frantar has 7 parameters, the average-parameter law "
           "5):", ""] +
          _table(["scope", "runs", "Huber/pt Frantar", "Huber/pt avg-params",
                  "RMSE log L Frantar", "RMSE log L avg-params", "better (Huber)"], rows) + [""])


def _definitions(data: dict) -> list[str]:
  c = data["conventions"]
  out = [f"- {c[k]}" for k in ("N", "D", "C", "F", "G", "S", "N_sparse", "L") if k in c]
  notes = data.get("notes") or []
  if notes:
    out += ["", "Notes:", ""] + [f"- {n}" for n in notes]
  return out


def render(data: dict, images: list[tuple[str, str]]) -> str:
  lines = [f"# Scaling-law report: `{data['root']}`", "",
           "Written by `python -m sparsejax.scaling.analyze`; full-precision numbers in "
           "`fits.json`.", "", _n_choice(data["conventions"]), "",
           "## Definitions", "", *_definitions(data), "",
           "## Sweep summary", "", *_summary(data), "",
           "## Fitted parameters", "", headline(data), "",
           "## Compute-optimal predictions", "",
           "At each family's isoFLOP budgets and at 10x / 100x its largest (extrapolations): "
           f"approach 3 at the budget's C = 6ND (geometric mean of its runs'), approach 2 at its "
           f"F ({BUDGET_LABEL}); approach-3 brackets are bootstrap (5%, 95%) percentiles.", "",
           *_predictions(data), "",
           "## Approach 2 (isoFLOP parabolas)", "",
           f"Budgets group runs by their recorded total_flops F ({BUDGET_LABEL}; within a factor "
           f"1 + {_g(data['conventions']['budget_tol'])}) and are labelled with the budget's "
           "geometric-mean F; N* and D* are the parabola's minimum and the D of the budget's "
           "runs at N*; the lines are fitted against F (6ND of the runs in one budget differs "
           "with N: it is in the summary and predictions, not used here).", "",
           *_approach2(data),
           "## Sparse scaling laws", "", *_sparse(data),
           "## Plots", ""]
  lines += [f"### {title}\n\n![{title}]({name})\n" for title, name in images] or ["None written."]
  lines += ["", "## Problems (records left out)", ""]
  lines += ([f"- `{p['name']}` ({p['file']}): {p['reason']}" for p in data["problems"]] or
            ["None."])
  return "\n".join(lines).rstrip() + "\n"


def write(data: dict, out, images: list[tuple[str, str]]) -> pathlib.Path:
  path = pathlib.Path(out) / REPORT
  path.write_text(render(data, images))
  return path
