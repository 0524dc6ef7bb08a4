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
