"""Weight-sparsity sweep of the tiny dense model (issue 13): at a fixed training FLOP budget,
how sparse should the weights be?

  python -m sparsejax.sweep experiments/sparsity_tiny.py --root runs/sparsity_tiny --dry_run
  python -m sparsejax.sweep experiments/sparsity_tiny.py --root runs/sparsity_tiny --parallel 2
  python experiments/sparsity_report.py --root runs/sparsity_tiny \
      --out experiments/results/sparsity_tiny

Grid: sparsity levels x model widths x training lengths on the default corpus (the stdlib's
source, byte tokens). Levels: dense ("gmp" at sparsity 0: the same run as dense, bitwise, but it
records weight_sparsity 0 so the Frantar law sees it), GMP to 0.5 / 0.75 / 0.875 (cubic over
[0.25 T, 0.75 T], every 10 steps, uniform over the targets) and 2:4 (SR-STE, lambda 2e-4, from
step 0). Targets: every attention and FFN projection (embeddings / head stay dense). Widths
d_model 32 / 48 / 64 (4 heads, 2 KV heads); lengths 300 / 900 steps of 16 x 256 tokens.

Run 2026-12-07 on the 2-core machine shared with other jobs: 30 runs, 2,582 s of run wall time
in all (under 25 min at --parallel 2; the longest run 129 s); report and fits ~1 min. Report in
experiments/results/sparsity_tiny/. One seed per configuration. At this scale:
  * at equal dense-equivalent training FLOPs (what the CPU / GPU actually executes today, masks
    being applied to dense matmuls) the dense model is best at 4 of 5 budgets, by 0.011-0.050
    nats; 2:4 wins one budget (d48, 300 steps) by 0.011;
  * at equal sparse FLOPs (only non-zero weights counted: what a sparse kernel could reach)
    GMP 0.75 / 0.875 are best at 6 of 7 budgets, by 0.002-0.069 nats; 2:4 (S=0.5) is better than
    GMP 0.5 at 4 of 6 sizes/lengths;
  * Frantar et al.'s law fits the 30 points better than the average-parameter law (RMSE in log L
    0.0126 vs 0.0162), but with only two training lengths both fits leave B / beta unidentified
    (beta ~1.7, huge B): the D term needs more lengths before its exponents mean anything.
"""

from sparsejax.sweep import Run

BASE = "configs/dense.py:tiny"
COMMON = {"train.eval_every_steps": 100, "train.checkpoint_every_steps": 0,
          "train.progress_bar": False, "train.log_every_steps": 10,
          "sparsity.update_every": 10}
LEVELS = {
    "s0": {"sparsity.method": "gmp", "sparsity.sparsity": 0.0},
    "s50": {"sparsity.method": "gmp", "sparsity.sparsity": 0.5},
    "s75": {"sparsity.method": "gmp", "sparsity.sparsity": 0.75},
    "s875": {"sparsity.method": "gmp", "sparsity.sparsity": 0.875},
    "nm24": {"sparsity.method": "nm", "sparsity.n": 2, "sparsity.m": 4},
}


def runs(widths: str = "32,48,64", steps: str = "300,900", levels: str = ",".join(LEVELS)
         ) -> list[Run]:
  out = []
  for d in (int(w) for w in str(widths).split(",")):
    shape = {"model.d_model": d, "model.num_heads": 4, "model.num_kv_heads": 2}
    for t in (int(s) for s in str(steps).split(",")):
      for name in str(levels).split(","):
        out.append(Run(BASE, {**shape, **COMMON, **LEVELS[name], "train.steps": t},
                       name=f"{name}-d{d}-t{t}"))
  return out
