"""IsoFLOP sweep of the tiny presets: for each family (dense, moe, peer, memory), each FLOP
budget and each model width, train for budget / (FLOPs per token x tokens per step) steps.

  python -m sparsejax.sweep experiments/isoflop_tiny.py --root runs/isoflop_tiny --dry_run \
      --calibrate
  python -m sparsejax.sweep experiments/isoflop_tiny.py --root runs/isoflop_tiny --parallel 2
  python -m sparsejax.scaling.analyze --root runs/isoflop_tiny \
      --out experiments/results/isoflop_tiny
  python -m sparsejax.sweep experiments/isoflop_tiny.py --root runs/isoflop_tiny \
      --arg budgets=2 --arg sizes=3      # a smaller grid

FLOPs are analytic (6N + attention, sparsejax.models.accounting). Budgets are BASE_BUDGET x
BUDGET_FACTOR**i (1.5e10, 4.5e10, 1.35e11, 4.05e11); widths are 16, 32, 48, 64 (d_model; 4 heads,
2 KV heads, so heads divide every width). Steps are at least warmup + 1 (the config requires
warmup < steps). The default grid is 4 budgets x 4 widths x 4 families = 64 runs, 9.6e12 FLOPs in
all, from 23 steps (moe-d64-b0) to 8,306 (dense-d16-b3).

Re-run 2026-12-07 after issue 12 (query whitening for memory / PEER, N with the head at the
true vocabulary, total-FLOPs budgets), on the 2-core machine shared with other jobs (so wall
times are upper bounds): 64 runs, 4624 s of run wall time in all at --parallel 2 (dense and moe
in ~20 min, memory and peer in ~25 min); the fit and report ~2.5 min (100 bootstrap resamples per
family, one BLAS thread). The report is committed in experiments/results/isoflop_tiny/
(REPORT.md, fits.json, plots). At this scale approach 3 still cannot separate E from the other
terms (E ~ 0, flagged); the approach-2 minima move to larger N as the budget grows. At the
largest budget (4.05e11 total FLOPs) the parabola minima are PEER 1.75, memory 1.80, dense 1.84,
MoE 1.86 nats.
"""

from sparsejax.configure import load_config
from sparsejax.info import describe
from sparsejax.sweep import Run

FAMILIES = ("dense", "moe", "peer", "memory")
BASE_BUDGET = 1.5e10       # training FLOPs of the smallest budget
BUDGET_FACTOR = 3.0
COMMON = {"train.eval_every_steps": 0, "train.checkpoint_every_steps": 0,
          "train.progress_bar": False, "train.log_every_steps": 10}


def widths(sizes: int) -> list[int]:
  return [16 * (i + 1) for i in range(sizes)]


def runs(budgets: int = 4, sizes: int = 4) -> list[Run]:
  out = []
  for family in FAMILIES:
    base = f"configs/{family}.py:tiny"
    for d_model in widths(int(sizes)):
      shape = {"model.d_model": d_model, "model.num_heads": 4, "model.num_kv_heads": 2}
      cfg = load_config(base, **shape, **COMMON)
      per_step = describe(cfg)["flops_per_token"] * cfg.data.global_batch_size * cfg.data.seq_len
      for i in range(int(budgets)):
        budget = BASE_BUDGET * BUDGET_FACTOR ** i
        steps = max(int(budget // per_step), 1, cfg.optim.warmup_steps + 1)
        out.append(Run(base, {**shape, **COMMON, "train.steps": steps},
                       name=f"{family}-d{d_model}-b{i}"))
  return out
