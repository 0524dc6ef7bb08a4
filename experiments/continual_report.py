"""Report of the continual-learning experiment (experiments/continual.py): reads every run's
ROOT/<run>/continual_eval.json and writes REPORT.md, results.json, curves.json and the plots.

  python experiments/continual_report.py --root /work/runs/continual \
      --out experiments/results/continual [--target 0.5]

Definitions (chance = 1/16, the relation's candidate values):
  learned_B              acc@1 on fact set B's training question templates (EVAL_ITEMS
                         questions, the same for every checkpoint);
  forgot_A               (acc_A(pretrained) - acc_A(checkpoint)) / (acc_A(pretrained) - chance),
                         acc_A on A's training templates: the fraction of the pretrained model's
                         above-chance recall of A that is lost (0 = none, 1 = back to chance);
                         curves.json also has the plain relative drop (forgot_A_relative);
  background_loss_delta  val-split loss (nats per byte token) of the checkpoint minus the
                         pretrained model's, on the same windows.
Each fine-tuning run is a curve through its checkpoints, starting at the pretrained model
(step 0). The comparison at EQUAL accuracy on B: the target T is the highest multiple of 0.05
that every mode reaches (or --target); on each run the first crossing of T is interpolated
linearly between the two checkpoints around it, and each mode's point is its learning rate with
the least forgetting at T (results.json: {"<mode>": {"learned_B", "forgot_A",
"background_loss_delta"}}; which run and step in curves.json["at_target"]).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import continual  # noqa: E402  pylint: disable=wrong-import-position

CHANCE = 1.0 / 16
COLOURS = {"full": "tab:red", "lora": "tab:orange", "memory_values": "tab:blue",
           "sparse_memory": "tab:green"}
PAPER = {"full": 0.89, "lora": 0.71, "sparse_memory": 0.11}  # NaturalQuestions F1 drop


def _load(root: pathlib.Path, name: str) -> dict[int, dict]:
  path = root / name / "continual_eval.json"
  if not path.exists():
    return {}
  return {int(k): v for k, v in json.loads(path.read_text())["steps"].items()}


def point(ev: dict, pre: dict, step: int) -> dict:
  a_pre, a = pre["A"]["train_acc"], ev["A"]["train_acc"]
  return {"step": step, "learned_B": ev["B"]["train_acc"],
          "acc_A": a,
          "forgot_A": (a_pre - a) / (a_pre - CHANCE), "forgot_A_relative": (a_pre - a) / a_pre,
          "background_loss_delta": ev["background"]["loss"] - pre["background"]["loss"]}


def at_target(curve: list[dict], target: float) -> dict | None:
  """The run's first crossing of learned_B = target, interpolated; None if never reached."""
  for prev, cur in zip(curve, curve[1:]):
    if cur["learned_B"] >= target > prev["learned_B"]:
      w = (target - prev["learned_B"]) / (cur["learned_B"] - prev["learned_B"])
      keys = ("step", "forgot_A", "forgot_A_relative", "background_loss_delta", "acc_A")
      return {"learned_B": target, **{k: prev[k] + w * (cur[k] - prev[k]) for k in keys}}
  return None


def collect(root: pathlib.Path) -> tuple[dict, list[dict]]:
  pre_evals = _load(root, continual.PRETRAIN_NAME)
  if not pre_evals:
    raise SystemExit(f"no {root / continual.PRETRAIN_NAME}/continual_eval.json: run "
                     "`python experiments/continual.py --root ROOT` first")
  pre = pre_evals[max(pre_evals)]
  runs = []
  for name, mode, variant, lr, _ in continual.finetune_runs():
    evals = _load(root, name)
    if not evals:
      continue
    steps = [s for s in sorted(evals) if s in continual.EVAL_STEPS]
    curve = [point(pre, pre, 0)] + [point(evals[s], pre, s) for s in steps]
    done = root / name / "done.json"
    wall = json.loads(done.read_text())["wall_s"] if done.exists() else None
    runs.append({"name": name, "mode": mode, "variant": variant, "lr": lr, "curve": curve,
                 "wall_s": wall})
  return pre, runs


def choose_target(runs: list[dict]) -> float:
  best = {}
  for run in runs:
    best[run["mode"]] = max(best.get(run["mode"], 0.0), max(p["learned_B"] for p in run["curve"]))
  return math.floor(min(best.values()) * 20 + 1e-9) / 20


def compare(runs: list[dict], target: float) -> dict[str, dict]:
  out = {}
  for run in runs:
    hit = at_target(run["curve"], target)
    if hit is None:
      continue
    mode = run["mode"]
    if mode not in out or hit["forgot_A"] < out[mode]["forgot_A"]:
      out[mode] = {**hit, "run": run["name"], "variant": run["variant"], "lr": run["lr"]}
  return out


def plot(runs: list[dict], targets: list[float], out: pathlib.Path) -> list[str]:
  """Per metric one figure, one panel per mode (shared axes): every run's curve from the
  pretrained model (step 0) through its checkpoints; dashed = a variant; dotted = the targets."""
  import matplotlib  # defers matplotlib: only the plots need it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # defers matplotlib (see above)
  files = []
  for key, label, fname in (("forgot_A", "forgot_A (share of A's above-chance recall lost)",
                             "learned_vs_forgot.png"),
                            ("background_loss_delta", "background (val) loss rise, nats",
                             "learned_vs_background.png")):
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True, sharey=True)
    for ax, mode in zip(axes.flat, continual.MODES):
      mine = [r for r in runs if r["mode"] == mode]
      for i, run in enumerate(mine):
        shade = plt.get_cmap("viridis")(0.85 * i / max(len(mine) - 1, 1))
        ax.plot([p["learned_B"] for p in run["curve"]], [p[key] for p in run["curve"]],
                "--o" if run["variant"] else "-o", ms=3, color=shade,
                label=run["name"][len(f"ft-{mode}-"):])
      for target in targets:
        ax.axvline(target, color="grey", ls=":", lw=1)
      ax.set_title(mode, color=COLOURS[mode])
      ax.legend(fontsize=7, loc="best")
      ax.grid(alpha=0.3)
    for ax in axes[1]:
      ax.set_xlabel("learned_B (acc@1 on B, training templates)")
    for ax in axes[:, 0]:
      ax.set_ylabel(label)
    fig.tight_layout()
    fig.savefig(out / fname, dpi=110)
    plt.close(fig)
    files.append(fname)
  return files


def _f(x: float, digits: int = 3) -> str:
  return f"{x:.{digits}f}"


def _target_table(best: dict, with_paper: bool) -> list[str]:
  lines = ["| mode | run (best at target) | step | forgot_A | forgot_A (relative) | "
           "background loss delta |" + (" paper (NQ forgetting) |" if with_paper else ""),
           "|---|---|---|---|---|---|" + ("---|" if with_paper else "")]
  for mode in continual.MODES:
    b = best.get(mode)
    paper = (f" {PAPER[mode]:.0%} |" if mode in PAPER else " - |") if with_paper else ""
    if b is None:
      lines.append(f"| {mode} | - | not reached | - | - | - |{paper}")
      continue
    lines.append(f"| {mode} | {b['run']} | {b['step']:.0f} | {_f(b['forgot_A'])} | "
                 f"{_f(b['forgot_A_relative'])} | {_f(b['background_loss_delta'], 4)} |{paper}")
  return lines


def report(pre: dict, runs: list[dict], targets: list[tuple[float, dict]],
           plots: list[str]) -> str:
  c = continual
  lines = [
      "# Continual learning: sparse memory finetuning vs full, LoRA and memory-values finetuning",
      "",
      "Lin et al. 2025 (\"Continual Learning via Sparse Memory Finetuning\") on the synthetic-fact "
      "benchmark: a memory model learns fact set A in pretraining, then each finetuning mode "
      "teaches it a disjoint fact set B; how much of A and of the background text does it "
      "forget for the same accuracy on B?",
      "",
      "## Commands",
      "",
      "```",
      "python experiments/continual.py --root /work/runs/continual",
      "python experiments/continual_report.py --root /work/runs/continual "
      "--out experiments/results/continual --notes experiments/results/continual/discussion.md",
      "```",
      "",
      "The first command runs every stage (pretraining, background statistics, finetuning, "
      "checkpoint evaluation) and skips finished work; the second writes this report, "
      "results.json (each mode at the common target), curves.json (every run's curve, the "
      "pretrained model's evaluation, the points at every target) and the plots.",
      "",
      "## Setup",
      "",
      f"- Model: `{c.BASE}` with " + ", ".join(f"{k}={v}" for k, v in c.MODEL.items()) + ".",
      f"- Pretraining: {c.PRETRAIN_STEPS} steps (8 x 64 byte tokens) on the embedded corpus with "
      f"fact set A = facts [0, {c.N_A}) at fraction {c.FRACTION_A} (lr 3e-3 cosine).",
      f"- Finetuning: {c.FINETUNE_STEPS} steps from the pretrained parameters "
      f"(config.train.init_from, fresh AdamW, constant lr after 10 warm-up steps) on B = facts "
      f"[{c.N_A}, {c.N_A + c.N_B}) (data.synthfacts_offset={c.N_A}) at fraction {c.FRACTION_B}: "
      "the stream is mostly B fact sentences plus background text from the same corpus; a "
      f"checkpoint every {c.CKPT_EVERY} steps.",
      f"- Background statistics for sparse_memory: {c.BACKGROUND_BATCHES} batches of the "
      "pretraining data through the pretrained model.",
      "- Sweep (lr = optim.lr and memory.value_lr; the memory modes train only the values, at "
      "memory.value_lr, constant): " + "; ".join(
          f"{m}{' ' + v if v else ''} lr {', '.join(f'{x:g}' for x in lrs)}"
          + (f" ({', '.join(f'{k}={val}' for k, val in f.items())})" if f else "")
          for m, v, f, lrs in c.SWEEP) + ".",
      f"- Evaluation of every checkpoint: acc@1 on the same {c.EVAL_ITEMS} training-template "
      "questions of A and of B (every candidate value of the relation ranked by log-probability, "
      f"chance {_f(CHANCE, 4)}) and the loss on {c.EVAL_BATCHES} x {c.EVAL_ROWS} val windows "
      "of the corpus (no facts). learned_B = acc@1 on B; forgot_A = (acc_A(pretrained) - "
      "acc_A) / (acc_A(pretrained) - chance), the share of A's above-chance recall lost (the "
      "plain relative drop is forgot_A (relative)); background loss delta = val loss minus the "
      "pretrained model's (nats per byte token).",
      "- One seed (train.seed 0, synthfacts_seed 0).",
      "",
      "## Pretrained model",
      "",
      f"- acc@1 on A (training templates): {_f(pre['A']['train_acc'])} (chance "
      f"{_f(CHANCE, 4)}); on B (never seen): {_f(pre['B']['train_acc'])}.",
      f"- background (val) loss: {_f(pre['background']['loss'], 4)} nats per byte token.",
      "",
      "## At equal accuracy on B",
      "",
      f"Target learned_B = {targets[0][0]:.2f} (the common target, results.json); per mode the run "
      "(variant, learning rate) with the least forgetting there, interpolated between its "
      "checkpoints.",
      "",
      *_target_table(targets[0][1], with_paper=True),
  ]
  for target, best in targets[1:]:
    lines += ["", f"At learned_B = {target:.2f} (the modes that reach it):", "",
              *_target_table(best, with_paper=False)]
  head = " | ".join(f"forgot_A / loss delta at {t:.2f}" for t, _ in targets)
  lines += ["", "Every run at the targets (- : not reached within the run):", "",
            f"| run | {head} |", "|---" * (1 + len(targets)) + "|"]
  for run in runs:
    cells = []
    for target, _ in targets:
      hit = at_target(run["curve"], target)
      cells.append("-" if hit is None else
                   f"{_f(hit['forgot_A'])} / {_f(hit['background_loss_delta'], 3)}")
    lines.append(f"| {run['name']} | {' | '.join(cells)} |")
  lines += ["", *[f"![{p}]({p})" for p in plots], "", "## Every run", "",
            "| run | best learned_B (step) | final learned_B | final forgot_A | "
            "final background loss delta | wall s |", "|---|---|---|---|---|---|"]
  for run in runs:
    top = max(run["curve"], key=lambda p: p["learned_B"])
    last = run["curve"][-1]
    wall = f"{run['wall_s']:.0f}" if run["wall_s"] is not None else "-"
    lines.append(f"| {run['name']} | {_f(top['learned_B'])} ({top['step']}) | "
                 f"{_f(last['learned_B'])} | {_f(last['forgot_A'])} | "
                 f"{_f(last['background_loss_delta'], 4)} | {wall} |")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--root", required=True, type=pathlib.Path)
  parser.add_argument("--out", required=True, type=pathlib.Path)
  parser.add_argument("--target", type=float, default=None,
                      help="learned_B at which the modes are compared (default: see the docstring)")
  parser.add_argument("--also", type=float, nargs="*", default=[0.3],
                      help="higher learned_B targets shown for the modes that reach them")
  parser.add_argument("--notes", type=pathlib.Path, default=None,
                      help="markdown appended to REPORT.md (the discussion)")
  a = parser.parse_args(argv)
  pre, runs = collect(a.root)
  if not runs:
    raise SystemExit(f"no evaluated fine-tuning runs under {a.root}")
  target = a.target if a.target is not None else choose_target(runs)
  targets = [(t, compare(runs, t)) for t in [target, *(x for x in a.also if x > target)]]
  best = targets[0][1]
  a.out.mkdir(parents=True, exist_ok=True)
  plots = plot(runs, [t for t, _ in targets], a.out)
  keys = ("learned_B", "forgot_A", "background_loss_delta")
  (a.out / "results.json").write_text(json.dumps(
      {m: {k: b[k] for k in keys} for m, b in best.items()}, indent=1) + "\n")
  (a.out / "curves.json").write_text(json.dumps(
      {"target": target, "chance": CHANCE, "pretrained": pre, "at_target": best,
       "at_other_targets": {f"{t:.2f}": b for t, b in targets[1:]}, "runs": runs},
      indent=1) + "\n")
  text = report(pre, runs, targets, plots)
  if a.notes is not None:
    text += "\n" + a.notes.read_text()
  (a.out / "REPORT.md").write_text(text)
  print(f"wrote {a.out}/REPORT.md (target {target:.2f}; modes at target: {sorted(best)})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
