"""Report of the synthetic-fact sweep (experiments/synthfacts.py): runs the fact-recall eval
(sparsejax/eval/synthfacts.py, the same as ``python -m sparsejax.eval --task synthfacts``) on
every finished run under --root and writes REPORT.md, results.json and recall_vs_facts.png.

  python experiments/synthfacts_report.py --root runs/synthfacts \
      --out experiments/results/synthfacts [--max_items 256] [--workers 2]

Each run's eval result is cached in ROOT/<name>/synthfacts.json (keyed by its checkpoint step
and --max_items), so a rerun only evaluates new runs. results.json holds, for the largest fact
count, per family: {"acc_mean", "acc_ci95": [lo, hi], "n_seeds", "facts", "flops_per_token"}
with acc = accuracy@1 on the HELD-OUT question templates and acc_ci95 a Student-t 95% interval
of the mean over seeds (null with one seed). Background loss = the runs' final eval loss on the
corpus val split (32 batches spread over it, identical windows for every run).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import pathlib
import sys
import time

import numpy as np
from scipy import stats

FAMILIES = ("dense", "memory", "peer", "moe")
METRICS = ("heldout_acc", "heldout_mrr", "train_acc", "train_mrr", "background_loss")


def finished_runs(root: pathlib.Path) -> list[dict]:
  """The done records under root whose run trained with synthetic facts."""
  out = []
  for path in sorted(root.glob("*/record.json")):
    rec = json.loads(path.read_text())
    facts = rec.get("overrides", {}).get("data.synthfacts_facts", 0)
    if rec.get("status") == "done" and facts:
      out.append({**rec, "workdir": path.parent, "facts": int(facts),
                  "short": rec["name"].split("-")[0]})
  return out


def recall(run: dict, max_items: int) -> dict:
  """The run's fact-recall result, from its cache or evaluated now."""
  cache = run["workdir"] / "synthfacts.json"
  if cache.exists():
    cached = json.loads(cache.read_text())
    if cached.get("step") == run["final_step"] and cached.get("max_items") == max_items:
      return cached
  from sparsejax.eval import synthfacts  # defers jax: a report from the caches never loads it
  t0 = time.perf_counter()
  result = {**synthfacts.evaluate(run["workdir"], step=run["final_step"], max_items=max_items),
            "max_items": max_items}
  result["eval_s"] = time.perf_counter() - t0
  cache.write_text(json.dumps(result, indent=1) + "\n")
  return result


def mean_ci(values: list[float]) -> tuple[float, list[float] | None]:
  """Mean and Student-t 95% interval of the mean (None with fewer than two values)."""
  x = np.asarray(values, np.float64)
  if len(x) < 2:
    return float(x.mean()), None
  half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
  return float(x.mean()), [float(x.mean() - half), float(x.mean() + half)]


def aggregate(runs: list[dict]) -> dict:
  """{(family, facts): {metric: (mean, ci), "n_seeds", "flops_per_token", "steps"}}."""
  groups: dict[tuple[str, int], list[dict]] = {}
  for run in runs:
    groups.setdefault((run["short"], run["facts"]), []).append(run)
  out = {}
  for key, members in sorted(groups.items()):
    row = {m: mean_ci([r[m] for r in members]) for m in METRICS}
    row.update(n_seeds=len(members), flops_per_token=members[0]["flops_per_token"],
               steps=members[0]["steps"], params_total=members[0]["params_total"])
    out[key] = row
  return out


def fmt(mean: float, ci) -> str:
  return f"{mean:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def plot(agg: dict, chance: float, path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  panels = (("heldout_acc", "acc@1, held-out question templates"),
            ("train_acc", "acc@1, training templates"),
            ("background_loss", "background loss (corpus val, nats/byte)"))
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for ax, (metric, title) in zip(axes, panels):
    for family in FAMILIES:
      keys = sorted(k for k in agg if k[0] == family)
      if not keys:
        continue
      x = [k[1] for k in keys]
      y = [agg[k][metric][0] for k in keys]
      err = [[y[i] - (agg[k][metric][1] or [y[i]])[0] for i, k in enumerate(keys)],
             [(agg[k][metric][1] or [0, y[i]])[1] - y[i] for i, k in enumerate(keys)]]
      ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=family)
    if metric != "background_loss":
      ax.axhline(chance, color="gray", linestyle=":", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("facts")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def report(runs: list[dict], agg: dict, chance: float, root: pathlib.Path, args) -> str:
  largest = max(k[1] for k in agg)
  steps = sorted({r["steps"] for r in runs})
  lines = ["# Fact recall at equal active FLOPs (synthetic facts)", "",
           f"`python -m sparsejax.sweep experiments/synthfacts.py --root {root} --parallel 2` then "
           f"`python experiments/synthfacts_report.py --root {root} --out {args.out}`.", "",
           f"{len(runs)} runs; steps {steps}, 8 x 64 byte tokens per step; fact fraction "
           f"{runs[0]['overrides'].get('data.synthfacts_fraction')} of training tokens. Recall: "
           f"every one of the relation's {round(1 / chance)} candidate values ranked by "
           "log-probability of ' value.' after the question (chance "
           f"{chance:.4f}); up to {args.max_items} questions per template set. Intervals: "
           "Student-t 95% over seeds.", "",
           "## Active FLOPs per token (sparsejax.info, training)", "",
           "| family | FLOPs/token | vs dense | params (total) |", "|---|---|---|---|"]
  dense_flops = next((v["flops_per_token"] for k, v in agg.items() if k[0] == "dense"), None)
  for family in FAMILIES:
    row = next((v for k, v in agg.items() if k[0] == family), None)
    if row:
      ratio = f"{row['flops_per_token'] / dense_flops:.3f}x" if dense_flops else "?"
      lines.append(f"| {family} | {row['flops_per_token']:,.0f} | {ratio} | "
                   f"{row['params_total']:,.0f} |")
  lines += ["", "## Recall and background loss", "",
            "| facts | family | seeds | acc@1 held-out | MRR held-out | acc@1 train templates | "
            "MRR train templates | background loss |", "|---" * 8 + "|"]
  for (family, facts), row in sorted(agg.items(), key=lambda kv: (kv[0][1],
                                                                  FAMILIES.index(kv[0][0]))):
    lines.append(f"| {facts} | {family} | {row['n_seeds']} | " +
                 " | ".join(fmt(*row[m]) for m in METRICS) + " |")
  lines += ["", f"## Largest fact count ({largest}): memory vs dense", ""]
  mem, den = agg.get(("memory", largest)), agg.get(("dense", largest))
  if mem and den:
    for metric, better in (("heldout_acc", "higher"), ("train_acc", "higher"),
                           ("background_loss", "lower")):
      diff = mem[metric][0] - den[metric][0]
      a, b = mem[metric][1], den[metric][1]
      intervals = ("no intervals (one seed)" if a is None or b is None else
                   "intervals overlap" if a[0] <= b[1] and b[0] <= a[1] else
                   "intervals do not overlap")
      lines.append(f"- {metric}: memory {fmt(*mem[metric])} vs dense {fmt(*den[metric])} "
                   f"(difference {diff:+.3f}; {better} is better; {intervals})")
  lines += ["", "## Runs", "", "| run | step | acc@1 held-out | acc@1 train | background loss |",
            "|---|---|---|---|---|"]
  for r in runs:
    lines.append(f"| {r['name']} | {r['final_step']} | {r['heldout_acc']:.3f} | "
                 f"{r['train_acc']:.3f} | {r['background_loss']:.4f} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", required=True)
  parser.add_argument("--out", default="experiments/results/synthfacts")
  parser.add_argument("--max_items", type=int, default=256)
  parser.add_argument("--workers", type=int, default=2, help="evaluation processes")
  args = parser.parse_args(argv)
  root, out = pathlib.Path(args.root), pathlib.Path(args.out)
  runs = finished_runs(root)
  if not runs:
    sys.exit(f"no finished synthfacts runs under {root}")
  chance = None
  with concurrent.futures.ProcessPoolExecutor(
      args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
    results = list(pool.map(recall, runs, [args.max_items] * len(runs)))
  for i, (run, result) in enumerate(zip(runs, results)):
    chance = result["chance"]
    run.update(heldout_acc=result["heldout_acc"], heldout_mrr=result["heldout_mrr"],
               train_acc=result["train_acc"], train_mrr=result["train_mrr"],
               background_loss=run["eval_loss"])
    print(f"[{i + 1}/{len(runs)}] {run['name']}: held-out acc {result['heldout_acc']:.3f}, "
          f"train acc {result['train_acc']:.3f}, background loss {run['eval_loss']:.4f}",
          flush=True)
  agg = aggregate(runs)
  out.mkdir(parents=True, exist_ok=True)
  largest = max(k[1] for k in agg)
  results = {family: {"acc_mean": row["heldout_acc"][0], "acc_ci95": row["heldout_acc"][1],
                      "n_seeds": row["n_seeds"], "facts": facts,
                      "flops_per_token": row["flops_per_token"]}
             for (family, facts), row in agg.items() if facts == largest}
  (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
  plot(agg, chance, out / "recall_vs_facts.png")
  (out / "REPORT.md").write_text(report(runs, agg, chance, root, args))
  print(f"wrote {out}/REPORT.md, results.json, recall_vs_facts.png")


if __name__ == "__main__":
  main()
