r"""Continual learning on the synthetic-fact benchmark (Lin et al. 2025, "Continual Learning via
Sparse Memory Finetuning"): a memory model pretrained on background text + fact set A is
fine-tuned on a disjoint fact set B with each of config.finetune.mode = full | lora |
memory_values | sparse_memory at a few learning rates; every fine-tuning checkpoint is scored
on B (learned), on A (forgotten) and on the background text (val loss). The report, with the
comparison at equal accuracy on B, is experiments/continual_report.py.

  python experiments/continual.py --root /work/runs/continual          # every stage, resumable
  python experiments/continual.py --root /work/runs/continual --dry_run  # the commands only
  python experiments/continual.py --root /work/runs/continual --stage pretrain
  python experiments/continual_report.py --root /work/runs/continual \
      --out experiments/results/continual --notes experiments/results/continual/discussion.md

Stages (each skips what is finished, so a rerun continues where a killed one stopped):
  pretrain    configs/memory.py:tiny with one 128²-slot Memory+ layer (as experiments/synthfacts.py)
              on the embedded byte corpus with fact set A = facts [0, N_A) mixed in at FRACTION_A;
  background  the background slot statistics of the pretrained run over its own training
              batches (python -m sparsejax.finetune.background), read by sparse_memory;
  finetune    from the pretrained parameters (config.train.init_from, fresh optimizer) on fact
              set B = facts [N_A, N_A + N_B) (config.data.synthfacts_offset = N_A) mixed into
              the same corpus at FRACTION_B, so the stream is mostly B facts plus background
              text; one run per (mode, variant, lr) of SWEEP, a checkpoint every CKPT_EVERY
              steps;
  eval        every fine-tuning checkpoint and the pretrained one: acc@1 / MRR on A and B
              (EVAL_ITEMS questions per set on the training templates, the same ones for every
              checkpoint, sparsejax/eval/synthfacts.py; the held-out templates are left out to
              save time) and the loss on EVAL_BATCHES x EVAL_ROWS val windows (the same for
              every checkpoint; the val split holds no facts), cached with these settings in
              ROOT/<run>/continual_eval.json.

Commands run as child processes (`python -m sparsejax.train ...`), their output in
ROOT/<run>/train.log; a run is finished when ROOT/<run>/done.json exists. One seed
(train.seed = 0, synthfacts_seed = 0).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import subprocess
import sys
import time

from tqdm import tqdm

REPO = pathlib.Path(__file__).resolve().parent.parent
BASE = "configs/memory.py:tiny"
N_A, N_B = 64, 64          # facts per set (multiples of the 8 relations: whole entities)
FRACTION_A, FRACTION_B = 0.5, 0.8
PRETRAIN_STEPS = 2000
FINETUNE_STEPS = 400
CKPT_EVERY = 50
EVAL_STEPS = tuple(range(CKPT_EVERY, FINETUNE_STEPS + 1, CKPT_EVERY))  # every checkpoint
EVAL_ITEMS = 128  # questions per fact set (training templates, the same ones every time)
EVAL_BATCHES, EVAL_ROWS = 8, 64  # background loss: 8 x 64 val windows (32k tokens)
BACKGROUND_BATCHES = 200
MODEL = {"memory.num_slots": 128 ** 2, "memory.num_heads": 2, "memory.top_k": 8,
         "memory.d_key": 64}
COMMON = {"data.synthfacts_seed": 0, "train.seed": 0, "train.eval_batches": 32,
          "train.eval_every_steps": 0, "train.log_every_steps": 20, "train.progress_bar": False}
PRETRAIN = {**MODEL, **COMMON, "data.synthfacts_facts": N_A,
            "data.synthfacts_fraction": FRACTION_A, "train.steps": PRETRAIN_STEPS,
            "train.checkpoint_every_steps": 500, "optim.warmup_steps": 30}
FINETUNE = {**COMMON, "data.synthfacts_facts": N_B, "data.synthfacts_offset": N_A,
            "data.synthfacts_fraction": FRACTION_B, "train.steps": FINETUNE_STEPS,
            "train.checkpoint_every_steps": CKPT_EVERY,
            "train.keep_checkpoints": FINETUNE_STEPS // CKPT_EVERY + 1,
            "optim.schedule": "constant", "optim.warmup_steps": 10}
# (mode, variant tag, the variant's fields, the learning rates swept: optim.lr and the memory
# value group's memory.value_lr alike, as in pretraining; the memory modes train only the values).
# LoRA (rank 8, alpha 16) on its default targets adapts the attention, the dense FFN and the
# memory layer's query / Memory+ projections; variant "attn_dense" leaves the memory layer out.
SWEEP = (
    ("full", "", {}, (3e-4, 1e-3, 3e-3)),
    ("lora", "", {}, (1e-3, 3e-3, 1e-2)),
    ("lora", "attn_dense", {"finetune.lora_targets": ("attention", "dense")}, (3e-4, 1e-3, 3e-3)),
    ("memory_values", "", {}, (1e-3, 3e-3, 1e-2, 3e-2)),
    ("sparse_memory", "", {"finetune.top_t": 500}, (0.01, 0.1, 0.3, 1.0)),
    ("sparse_memory", "t2000", {"finetune.top_t": 2000}, (0.03, 0.1)),
)
MODES = tuple(dict.fromkeys(mode for mode, *_ in SWEEP))
PRETRAIN_NAME = "pretrain"


def run_name(mode: str, variant: str, lr: float) -> str:
  return f"ft-{mode}{'-' + variant if variant else ''}-lr{lr:g}"


def finetune_runs() -> list[tuple[str, str, str, float, dict]]:
  """(name, mode, variant, lr, overrides) of every fine-tuning run."""
  out = []
  for mode, variant, fields, lrs in SWEEP:
    for lr in lrs:
      out.append((run_name(mode, variant, lr), mode, variant, lr,
                  {**FINETUNE, "finetune.mode": mode, **fields, "optim.lr": lr,
                   "memory.value_lr": lr}))
  return out


def _flags(overrides: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def train_command(root: pathlib.Path, name: str) -> list[str]:
  workdir = root / name
  if name == PRETRAIN_NAME:
    return [sys.executable, "-m", "sparsejax.train", "--config", BASE, "--workdir", str(workdir),
            *_flags(PRETRAIN)]
  overrides = {n: o for n, _, _, _, o in finetune_runs()}[name]
  source = root / PRETRAIN_NAME
  return [sys.executable, "-m", "sparsejax.train", "--config", BASE, "--workdir", str(workdir),
          *_flags({**MODEL, **overrides, "train.init_from": str(source)})]


def background_command(root: pathlib.Path) -> list[str]:
  return [sys.executable, "-m", "sparsejax.finetune.background", "--workdir",
          str(root / PRETRAIN_NAME), "--batches", str(BACKGROUND_BATCHES)]


def _run(cmd: list[str], log: pathlib.Path, what: str) -> None:
  """Run a child process with its output appended to ``log``; one line on failure."""
  log.parent.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  with open(log, "a") as f:
    f.write(f"$ {shlex.join(cmd)}\n")
    f.flush()
    rc = subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
  if rc:
    raise SystemExit(f"experiments/continual.py: {what} failed (exit {rc}); see {log}")
  tqdm.write(f"{what}: {time.perf_counter() - t0:.0f} s")


def train(root: pathlib.Path, name: str) -> None:
  done = root / name / "done.json"
  if done.exists():
    return
  t0 = time.perf_counter()
  _run(train_command(root, name), root / name / "train.log", f"train {name}")
  done.write_text(json.dumps({"wall_s": time.perf_counter() - t0}) + "\n")


def background(root: pathlib.Path) -> None:
  if (root / PRETRAIN_NAME / "memory_background.npz").exists():
    return
  _run(background_command(root), root / PRETRAIN_NAME / "background.log", "background statistics")


def committed_steps(workdir: pathlib.Path) -> list[int]:
  from sparsejax.train.checkpoint import Checkpointer  # defers jax (eval stage only)
  return Checkpointer(workdir, async_save=False).committed_steps()


def _evaluator(r):
  """(score_fn, rows, loss_fn) for a restored checkpoint, compiled once: they read ``r.params``
  when called, so the other checkpoints of the run reuse them by swapping ``r.params``."""
  import jax  # defers jax (eval stage only)
  from sparsejax.eval import core, synthfacts as esf  # defers jax (eval stage only)
  from sparsejax.parallel import sharding as shd  # defers jax (eval stage only)
  score_fn, rows = esf.make_scorer(r)
  batch_sh = shd.batch_sharding(r.mesh, r.rules)
  step_fn = jax.jit(core.make_eval_step(r.spec.graphdef), in_shardings=(r.param_shardings,
                                                                        batch_sh))

  def loss_fn(batches, bytes_per_token):
    with shd.activation_sharding(r.mesh, r.rules):
      out = core.evaluate_params(step_fn, r.params, batches, batch_sh, bytes_per_token)
    return {k: out[k] for k in ("loss", "bits_per_byte", "tokens")}
  return score_fn, rows, loss_fn


def evaluate_run(root: pathlib.Path, name: str, bar) -> dict[str, dict]:
  """Every committed checkpoint of a run: recall of A and B and the background loss, cached in
  ROOT/<name>/continual_eval.json (a step already there is not evaluated again)."""
  from sparsejax import data as sdata  # defers jax (eval stage only)
  from sparsejax.data import synthfacts as sf  # defers jax (eval stage only)
  from sparsejax.eval import synthfacts as esf  # defers jax (eval stage only)
  from sparsejax.eval.checkpoint import restore  # defers jax (eval stage only)
  workdir = root / name
  cache = workdir / "continual_eval.json"
  settings = {"items": EVAL_ITEMS, "batches": EVAL_BATCHES, "rows": EVAL_ROWS, "n_a": N_A,
              "n_b": N_B}
  saved = json.loads(cache.read_text()) if cache.exists() else {}
  results = saved.get("steps", {}) if saved.get("settings") == settings else {}
  steps = committed_steps(workdir)
  # the pretrained model: its last step; a fine-tuning run: EVAL_STEPS
  steps = steps[-1:] if name == PRETRAIN_NAME else [s for s in steps if s in EVAL_STEPS]
  todo = [s for s in steps if str(s) not in results]
  bar.total += len(todo)
  bar.refresh()
  r = evaluator = None
  sets = {"A": sf.make_facts(N_A, PRETRAIN["data.synthfacts_seed"]),
          "B": sf.make_facts(N_B, PRETRAIN["data.synthfacts_seed"], offset=N_A)}
  for step in todo:
    t0 = time.perf_counter()
    new = restore(workdir, step)
    if evaluator is None:
      r, evaluator = new, _evaluator(new)
      data_dir = pathlib.Path(r.meta["dataset"])
      tokenizer = sdata.TokenDataset(data_dir, "train").tokenizer
      batches = sdata.make_eval_batches(data_dir, seq_len=r.cfg.data.seq_len,
                                        batch_size=EVAL_ROWS, max_batches=EVAL_BATCHES)
      bytes_per_token = sdata.TokenDataset(data_dir, "val").bytes_per_token
    r.params = new.params
    score_fn, rows, loss_fn = evaluator
    out = {name_: esf.recall(score_fn, facts, tokenizer, r.cfg.data.seq_len, rows,
                             max_items=EVAL_ITEMS, templates=("train",))
           for name_, facts in sets.items()}
    out["background"] = loss_fn(batches, bytes_per_token)
    out["eval_s"] = time.perf_counter() - t0
    results[str(step)] = out
    cache.write_text(json.dumps({"settings": settings, "steps": results}, indent=1,
                                sort_keys=True) + "\n")
    bar.set_postfix(run=name, step=step, A=f"{out['A']['train_acc']:.2f}",
                    B=f"{out['B']['train_acc']:.2f}")
    bar.update(1)
  return results


def evaluate_all(root: pathlib.Path, names: list[str], wait: bool = False) -> None:
  """Evaluate the finished runs among ``names``; ``wait``: keep polling until every one of them
  is finished and evaluated (beside a running finetune stage)."""
  evaluated: set[str] = set()
  with tqdm(total=0, desc="eval checkpoints", unit="ckpt") as bar:
    while True:
      for name in names:
        if name not in evaluated and (root / name / "done.json").exists():
          evaluate_run(root, name, bar)
          evaluated.add(name)
      if not wait or len(evaluated) == len(names):
        return
      time.sleep(20)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--root", required=True, type=pathlib.Path)
  parser.add_argument("--stage", choices=("all", "pretrain", "background", "finetune", "eval"),
                      default="all")
  parser.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
  parser.add_argument("--dry_run", action="store_true", help="print the commands only")
  parser.add_argument("--wait", action="store_true", help="eval stage: evaluate runs as they "
                      "finish until all are done (beside a running finetune stage)")
  a = parser.parse_args(argv)
  root = a.root.resolve()
  names = [n for n, mode, _, _, _ in finetune_runs() if mode in a.modes]
  if a.dry_run:
    for cmd in ([train_command(root, PRETRAIN_NAME), background_command(root)] +
                [train_command(root, n) for n in names]):
      print(shlex.join(cmd))
    return 0
  stages = ("pretrain", "background", "finetune", "eval") if a.stage == "all" else (a.stage,)
  if "pretrain" in stages:
    train(root, PRETRAIN_NAME)
  if "background" in stages:
    background(root)
  if "finetune" in stages:
    for name in tqdm(names, desc="fine-tuning runs", unit="run"):
      tqdm.write(f"fine-tuning {name}")
      train(root, name)
  if "eval" in stages:
    evaluate_all(root, [PRETRAIN_NAME] + names, wait=a.wait)
  return 0


if __name__ == "__main__":
  sys.exit(main())
