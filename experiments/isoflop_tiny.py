"""IsoFLOP sweep of the tiny presets: for each family (dense, moe, peer, memory), each FLOP
budget and each model width, train for budget / (FLOPs per token x tokens per step) steps.

  python -m sparsejax.sweep experiments/isoflop_tiny.py --root runs/isoflop_tiny --dry_run
  python -m sparsejax.sweep experiments/isoflop_tiny.py --root runs/isoflop_tiny
  python -m sparsejax.sweep experiments/isoflop_tiny.py --root runs/isoflop_tiny \
      --arg budgets=2 --arg sizes=2      # a smaller grid

FLOPs are analytic (6N + attention, sparsejax.scaling.flops). Budgets are BASE_BUDGET x
BUDGET_FACTOR**i; widths are 32, 48, 64, ... (d_model; 4 heads, 2 KV heads, so heads divide every
width). Steps are at least warmup + 1 (the config requires warmup < steps). The default grid
(3 budgets x 3 widths x 4 families = 36 runs, ~1.6e12 FLOPs in all) is sized to finish within
30 minutes on 2 CPU cores: spot checks (taskset -c 0,1) took 10 s for peer-d32-b0 (102 steps)
and 8.5 s for moe-d64-b1 (47 steps), compilation included; the full grid was not timed.
"""

from sparsejax.configs_loader import load_config
from sparsejax.info import describe
from sparsejax.sweep import Run

FAMILIES = ("dense", "moe", "peer", "memory")
BASE_BUDGET = 1e10       # training FLOPs of the smallest budget
BUDGET_FACTOR = 3.0
COMMON = {"train.eval_every_steps": 0, "train.checkpoint_every_steps": 0,
          "train.progress_bar": False, "train.log_every_steps": 10}


def widths(sizes: int) -> list[int]:
  return [32 + 16 * i for i in range(sizes)]


def runs(budgets: int = 3, sizes: int = 3) -> list[Run]:
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
