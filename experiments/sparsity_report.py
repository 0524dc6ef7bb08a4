"""Report of a weight-sparsity sweep (experiments/sparsity_tiny.py): which sparsity gives the lowest
loss at a fixed training FLOP budget, and both weight-sparse scaling laws fitted.

  python experiments/sparsity_report.py --root runs/sparsity_tiny \
      --out experiments/results/sparsity_tiny [--loss eval_loss|eval_loss_smoothed]
      [--n total|non_embedding] [--budget-tol 0.3] [--bootstrap 100] [--no-plots]

Reads ROOT/*/record.json (sparsejax.scaling.records.load_records through
sparsejax.scaling.analyze.collect: only "done" runs; the others are listed with the reason) and
writes to OUT: REPORT.md, results.json, loss_vs_flops.png, and OUT/fits/ (the output of
``python -m sparsejax.scaling.analyze --root ROOT --out OUT/fits --sparse auto``: the Frantar et al.
law on the non-zero N, the average-parameter law on N̄, which fits better, their plots).

Sparsity level of a run: its record's sparsity_method and weight_sparsity (the final fraction of
pruned weights among the targeted weights); weight_sparsity 0 (or none) is "dense", N:M runs are
labelled n:m. Two FLOP conventions: dense-equivalent (total_flops: every weight counted) and
sparse (total_flops_sparse: only the non-zero weights at the end; a dense run's equals its
total_flops). Runs that differ only in their seed are one configuration (mean loss; the seed
noise is the pooled standard deviation of one run's loss over seeds).

At a FLOP budget, a level's loss is read off its compute frontier (its configurations that no
cheaper configuration of the level beats, joined by straight lines in log FLOPs - log loss; none
outside the frontier's FLOP range, no extrapolation); budgets are the geometric means of the
configurations' FLOPs grouped as sparsejax.scaling.analyze groups isoFLOP budgets (within a factor
1 + --budget-tol). The report also names the best run observed inside each budget group.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import numpy as np

from sparsejax.scaling import analyze
from sparsejax.scaling.family_fits import FitError, isoflop_budgets
from sparsejax.scaling.records import read_record

# convention: (run field, short name, what it counts)
CONVENTIONS = {
    "dense_equivalent": ("total_flops", "dense-equivalent FLOPs",
                         "training FLOPs counting every weight, pruned or not (total_flops)"),
    "sparse": ("flops_sparse", "sparse FLOPs",
               "training FLOPs counting only the weights non-zero at the end "
               "(total_flops_sparse)")}


def level_of(rec: dict, S: float | None) -> tuple[str, float]:
  """(label, sort key) of a run's sparsity level."""
  method = rec.get("sparsity_method") or "none"
  if method == "none" or not S:
    return "dense", 0.0
  if method == "nm":
    o = rec.get("overrides") or {}
    return f"nm {o.get('sparsity.n', 2)}:{o.get('sparsity.m', 4)}", S + 1e-6
  return f"{method} {S:g}", S


def load_runs(root, loss: str, n_field: str) -> tuple[list[dict], list[dict]]:
  rows, problems = analyze.collect(root, loss, n_field)
  runs = []
  for r in rows:
    rec = read_record(pathlib.Path(r["file"]))
    label, key = level_of(rec, r["S"])
    sparse = r["total_flops_sparse"]
    if sparse is None and not r["S"]:
      sparse = r["total_flops"]  # a dense run: every weight is non-zero
    runs.append({"name": r["name"], "family": r["family"], "method": r["method"] or "none",
                 "S": r["S"], "level": label, "level_key": key, "seed": rec.get("seed"),
                 "N": r["N"], "N_nonzero": r["N_nonzero"], "N_avg": r["N_avg"], "D": r["D"],
                 "total_flops": r["total_flops"], "flops_sparse": sparse, "L": r["L"]})
  return sorted(runs, key=lambda r: (r["level_key"], r["N"], r["D"], str(r["seed"]))), problems


def configurations(runs: list[dict]) -> list[dict]:
  """Runs that differ only in the seed, merged: mean loss, its seeds' losses."""
  groups: dict[tuple, list[dict]] = {}
  for r in runs:
    groups.setdefault((r["family"], r["level"], r["N"], r["D"]), []).append(r)
  out = []
  for members in groups.values():
    m = members[0]
    losses = [r["L"] for r in members]
    sparse = [r["flops_sparse"] for r in members]
    out.append({"level": m["level"], "level_key": m["level_key"], "family": m["family"],
                "N": m["N"], "D": m["D"], "total_flops": m["total_flops"],
                "flops_sparse": None if None in sparse else float(np.mean(sparse)),
                "L": float(np.mean(losses)), "losses": losses, "seeds": len(members),
                "names": [r["name"] for r in members]})
  return out


def seed_noise(configs: list[dict]) -> dict:
  """Pooled standard deviation of one run's loss over seeds (None without repeated seeds)."""
  reps = [c["losses"] for c in configs if len(c["losses"]) > 1]
  if not reps:
    return {"sigma": None, "configurations": 0, "dof": 0}
  dof = sum(len(x) - 1 for x in reps)
  ss = sum(float(np.sum((np.asarray(x) - np.mean(x)) ** 2)) for x in reps)
  return {"sigma": math.sqrt(ss / dof), "configurations": len(reps), "dof": dof}


def frontier(configs: list[dict], key: str) -> list[tuple[float, float]]:
  """(FLOPs, loss) of the configurations no cheaper one beats, by FLOPs."""
  pts = sorted((c[key], c["L"]) for c in configs if c[key] is not None)
  out: list[tuple[float, float]] = []
  for f, loss in pts:
    if not out or loss < out[-1][1]:
      out.append((f, loss))
  return out


def loss_at(front: list[tuple[float, float]], budget: float, rtol: float = 1e-9) -> float | None:
  """The frontier's loss at ``budget`` (log-log linear between points; None outside)."""
  if not front or budget < front[0][0] * (1 - rtol) or budget > front[-1][0] * (1 + rtol):
    return None
  if len(front) == 1:
    return front[0][1]
  x = np.log([f for f, _ in front])
  y = np.log([loss for _, loss in front])
  return float(np.exp(np.interp(math.log(budget), x, y)))


def best_at_budgets(configs: list[dict], key: str, tol: float, sigma: float | None) -> list[dict]:
  levels = sorted({(c["level_key"], c["level"]) for c in configs})
  fronts = {lv: frontier([c for c in configs if c["level"] == lv], key) for _, lv in levels}
  usable = [dict(c, total_flops=c[key], name=c["level"]) for c in configs if c[key] is not None]
  out = []
  for group in isoflop_budgets(usable, tol):
    budget = float(np.exp(np.mean(np.log([c["total_flops"] for c in group]))))
    losses = {lv: loss_at(fronts[lv], budget) for _, lv in levels}
    ranked = sorted((v, lv) for lv, v in losses.items() if v is not None)
    observed = min(group, key=lambda c: c["L"])
    row = {"budget": budget, "runs": sum(c["seeds"] for c in group), "losses": losses,
           "best": ranked[0][1] if ranked else None,
           "best_loss": ranked[0][0] if ranked else None,
           "runner_up": ranked[1][1] if len(ranked) > 1 else None,
           "margin": ranked[1][0] - ranked[0][0] if len(ranked) > 1 else None,
           "observed_best": observed["level"], "observed_best_loss": observed["L"],
           "observed_levels": sorted({c["level"] for c in group})}
    row["margin_sigma"] = (row["margin"] / sigma if sigma and row["margin"] is not None
                           else None)
    out.append(row)
  return out


def wins(rows: list[dict]) -> dict[str, int]:
  out: dict[str, int] = {}
  for r in rows:
    if r["best"] is not None and r["runner_up"] is not None:
      out[r["best"]] = out.get(r["best"], 0) + 1
  return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def run_fits(root, out: pathlib.Path, args) -> dict:
  """``python -m sparsejax.scaling.analyze --sparse auto`` into OUT/fits; its weight-sparse laws."""
  argv = ["--root", str(root), "--out", str(out / "fits"), "--sparse", "auto", "--bootstrap",
          str(args.bootstrap), "--loss", args.loss, "--n", args.n,
          "--budget-tol", str(args.budget_tol)] + (["--no-plots"] if args.no_plots else [])
  code = analyze.main(argv)
  path = out / "fits" / "fits.json"
  result = {"exit_code": code, "command": "python -m sparsejax.scaling.analyze " + " ".join(argv)}
  if code == 2 or not path.exists():
    return result
  laws = json.loads(path.read_text()).get("sparse_laws") or {}
  for form in ("frantar", "avg_params"):
    law = laws.get(form) or {}
    result[form] = {k: law.get(k) for k in ("title", "formula", "fits", "skipped")}
  result["comparison"] = [{k: v for k, v in c.items() if k != "points"}
                          for c in (laws.get("avg_params") or {}).get("comparison") or []]
  return result


# ----------------------------------------------------------------------------- output

def _g(x, digits: int = 4) -> str:
  return "–" if x is None else f"{x:.{digits}g}"


def _table(header, rows) -> list[str]:
  return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
          ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def plot(configs: list[dict], path: pathlib.Path) -> None:
  # defers matplotlib: --no-plots works without it
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(12, 4.8))
  FigureCanvasAgg(fig)
  levels = sorted({(c["level_key"], c["level"]) for c in configs})
  for ax, (key, short, _) in zip(fig.subplots(1, 2), CONVENTIONS.values()):
    for i, (_, lv) in enumerate(levels):
      cs = [c for c in configs if c["level"] == lv and c[key] is not None]
      if not cs:
        continue
      ax.scatter([c[key] for c in cs], [c["L"] for c in cs], s=16, color=f"C{i % 10}",
                 alpha=0.6)
      front = frontier(cs, key)
      ax.plot([f for f, _ in front], [v for _, v in front], "-o", ms=3, color=f"C{i % 10}",
              label=lv)
    ax.set(xscale="log", yscale="log", xlabel=f"training {short}", ylabel="eval loss",
           title=f"{short}: runs (dots), each level's compute frontier")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, title="sparsity", title_fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110, metadata={"Software": None})


def _answer(best: dict, sigma: float | None) -> list[str]:
  out = []
  for conv, rows in best.items():
    w = wins(rows)
    compared = sum(w.values())
    if not compared:
      out.append(f"- **{CONVENTIONS[conv][1]}**: no budget where two sparsity levels can be "
                 "compared.")
      continue
    top = next(iter(w))
    margins = [r["margin"] for r in rows if r["best"] is not None and r["runner_up"] is not None]
    noise = (f"seed noise σ = {sigma:.3g} (one run's loss)" if sigma else
             "one seed per configuration: the seed noise is unknown")
    out.append(f"- **{CONVENTIONS[conv][1]}** ({CONVENTIONS[conv][2]}): lowest loss with "
               f"**{top}** at "
               f"{w[top]} of {compared} budgets (" +
               ", ".join(f"{k}: {v}" for k, v in w.items()) +
               f"); margin to the runner-up {min(margins):.3g} – {max(margins):.3g} in loss, "
               f"{noise}.")
  return out


def render(root, runs, configs, problems, noise, best, fits, images) -> str:
  sigma = noise["sigma"]
  lines = ["# Weight sparsity at a fixed training FLOP budget", "",
           f"`python experiments/sparsity_report.py --root {root} ...` over {len(runs)} done "
           f"run(s) ({len(configs)} configuration(s), {len(problems)} record(s) left out).", "",
           "## Answer: which sparsity gives the lowest loss at a fixed FLOP budget?", "",
           *_answer(best, sigma), "",
           "Per budget, each level's loss is read off its compute frontier (log-log "
           "interpolation between its runs, none outside their FLOP range); 'observed' is the "
           "best run inside the budget group. Margin = runner-up − best"
           + (f"; margin / σ in units of the seed noise σ = {sigma:.3g} (one run's loss; a "
              "mean over k seeds has σ/√k)." if sigma else "."), ""]
  for conv, rows in best.items():
    lines += [f"### At equal {CONVENTIONS[conv][1]}", ""]
    levels = sorted({(c["level_key"], c["level"]) for c in configs})
    table = [[_g(r["budget"], 3), r["runs"], *(_g(r["losses"][lv]) for _, lv in levels),
              r["best"] or "–", _g(r["margin"], 3),
              _g(r["margin_sigma"], 3), f"{r['observed_best']} ({_g(r['observed_best_loss'])})"]
             for r in rows]
    lines += _table(["budget (FLOPs)", "runs", *(lv for _, lv in levels), "best",
                     "margin", "margin / σ", "observed best run (loss)"], table) + [""]
  lines += ["## Runs", "",
            "N = the fit's N (params_active_total unless --n non_embedding), N_nonzero = N − "
            "params_pruned_final, N̄ = N − params_pruned_mean; FLOPs are training totals.", ""]
  lines += _table(["run", "method", "S", "seed", "N", "N_nonzero", "N̄", "tokens",
                   "FLOPs dense-eq.", "FLOPs sparse", "eval loss"],
                  [[r["name"], r["method"], _g(r["S"], 3), r["seed"], _g(r["N"]),
                    _g(r["N_nonzero"]), _g(r["N_avg"]), _g(r["D"]), _g(r["total_flops"]),
                    _g(r["flops_sparse"]), _g(r["L"])] for r in runs])
  lines += ["", "## Scaling laws", "", f"`{fits['command']}` (exit {fits['exit_code']}); full "
            "report in [fits/REPORT.md](fits/REPORT.md).", ""]
  for form in ("frantar", "avg_params"):
    law = fits.get(form)
    if not law or not law.get("title"):
      lines.append(f"- {form}: not fitted (see fits/REPORT.md).")
      continue
    lines += [f"**{law['title']}**: `{law['formula']}`", ""]
    if law["fits"]:
      names = list(law["fits"][0]["params"])
      lines += _table(["scope", "runs", *names],
                      [[f["scope"], f["n_points"],
                        *(_g(f["params"][k], 3) + (
                            f" [{_g(f['intervals'][k][0], 3)}, {_g(f['intervals'][k][1], 3)}]"
                            if f.get("intervals") and f["intervals"].get(k) else "")
                          for k in names)] for f in law["fits"]])
    lines += [f"- not fitted for {s['scope']}: {s['reason']}" for s in law["skipped"]] + [""]
  if fits.get("comparison"):
    lines += ["Which law fits better (same points; lower is better):", ""]
    lines += _table(["scope", "runs", "Huber/pt Frantar", "Huber/pt avg-params",
                     "RMSE log L Frantar", "RMSE log L avg-params", "better"],
                    [[c["scope"], c["n_points"],
                      *(_g(c["laws"][law][k], 3) for k in ("huber_per_point", "rmse_log_l")
                        for law in ("frantar", "avg_params")), c["better"] or "–"]
                     for c in fits["comparison"]]) + [""]
  lines += ["## Plots", ""] + ([f"![{t}]({n})" for t, n in images] or ["None written."])
  lines += ["", "## Records left out", ""] + (
      [f"- `{p['name']}`: {p['reason']}" for p in problems] or ["None."])
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--root", required=True, help="the sparsity sweep's --root")
  ap.add_argument("--out", default="experiments/results/sparsity_tiny")
  ap.add_argument("--loss", default="eval_loss", choices=analyze.LOSS_FIELDS)
  ap.add_argument("--n", default=analyze.DEFAULT_N, choices=tuple(analyze.N_CHOICES))
  ap.add_argument("--budget-tol", type=float, default=0.3)
  ap.add_argument("--bootstrap", type=int, default=100)
  ap.add_argument("--no-plots", action="store_true")
  args = ap.parse_args(argv)
  root, out = pathlib.Path(args.root), pathlib.Path(args.out)
  try:
    runs, problems = load_runs(root, args.loss, analyze.N_CHOICES[args.n])
  except FitError as e:
    print(f"sparsity_report: error: {e}", file=sys.stderr)
    return 2
  if not runs:
    print(f"sparsity_report: error: no done run under {root}", file=sys.stderr)
    return 2
  out.mkdir(parents=True, exist_ok=True)
  configs = configurations(runs)
  noise = seed_noise(configs)
  best = {conv: best_at_budgets(configs, key, args.budget_tol, noise["sigma"])
          for conv, (key, _, _) in CONVENTIONS.items()}
  fits = run_fits(root, out, args)
  images = []
  if not args.no_plots:
    plot(configs, out / "loss_vs_flops.png")
    images.append(("Loss vs training FLOPs (dense-equivalent, sparse)", "loss_vs_flops.png"))
  results = {"root": str(root), "n_field": analyze.N_CHOICES[args.n], "loss_field": args.loss,
             "seed_noise": noise, "best_at_budget": best,
             "wins": {conv: wins(rows) for conv, rows in best.items()},
             "fits": fits, "runs": runs, "problems": problems}
  (out / "results.json").write_text(json.dumps(analyze.to_json(results), indent=1) + "\n")
  (out / "REPORT.md").write_text(render(root, runs, configs, problems, noise, best, fits,
                                        images))
  print(f"sparsity_report: wrote {out}/REPORT.md, results.json"
        + (", loss_vs_flops.png" if images else "") + f" and {out}/fits/")
  return 0


if __name__ == "__main__":
  sys.exit(main())
