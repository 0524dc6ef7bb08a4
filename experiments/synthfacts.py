"""Fact recall at equal active FLOPs: dense, memory, PEER and MoE tiny models trained on the
embedded corpus with synthetic facts mixed in (sparsejax/data/synthfacts.py), for a growing
number of facts, several seeds each; the recall eval and report are in
experiments/synthfacts_report.py.

  python -m sparsejax.sweep experiments/synthfacts.py --root runs/synthfacts --dry_run
  python -m sparsejax.sweep experiments/synthfacts.py --root runs/synthfacts --parallel 2
  python experiments/synthfacts_report.py --root runs/synthfacts \
      --out experiments/results/synthfacts
  python -m sparsejax.sweep experiments/synthfacts.py --root runs/pilot \
      --arg facts=16, --arg seeds=1                      # the pilot
  python experiments/synthfacts.py                     # the FLOP-matching table only

Design. Every run of a fact count and seed reads the same token stream (same data settings
and ``train.seed``; the facts are drawn with ``synthfacts_seed=0`` for every seed, so the mixed
dataset is built once per fact count, ~12 s, cached under $SPARSEJAX_DATA_DIR, ~120 MB each);
the seeds vary the initialisation and the batch order. ``FRACTION`` of the training tokens are
fact sentences (one per document, a random training paraphrase each), so a run sees about
``steps x 512 x FRACTION / 29.4`` fact sentences (29.4 tokens per fact document on average at
byte level, eos included): at 1000 steps ~8.7k, i.e. ~540 renderings per fact at 16 facts, ~180
at 48 and ~68 at 128. The families are matched to dense-tiny's training FLOPs per token
(sparsejax.info) by choosing, per family, the closest of a few settings of its knobs
(:data:`FIXED`, :data:`KNOBS`); ``python experiments/synthfacts.py`` prints the table and every
run's FLOPs per token are in its record.json. Background loss: the final eval on 32 batches
spread over the corpus val split (the same windows for every run; the val split holds no
facts).

Budget (measured 2026-12-07 on the shared 2-core machine, load average 4-5 from other jobs, so
an upper bound): the pilot (``--arg facts=16, --arg seeds=1``, 4 runs, --parallel 2) took 3 min
58 s; per 1000-step run dense 79 s, moe 77 s, memory 119 s, peer 141 s wall (steps 45 / 58 / 78
/ 120 ms under that load; 23 / 30 / 36 / 49 ms pinned to one core in a quieter minute), and the
report's recall eval 8-25 s per run. The full grid (4 families x 3 fact counts x 3 seeds = 36
runs) is nine pilots: ~36 min at that load, ~20 min estimated on two free cores, plus ~3 min
for the report (2 eval workers). Fewer steps (``--arg steps=800``) cut it proportionally.
"""

from __future__ import annotations

import functools
import math
import sys

from sparsejax.configure import load_config
from sparsejax.errors import ConfigError
from sparsejax.info import describe
from sparsejax.sweep import Run

FAMILIES = ("dense", "memory", "peer", "moe")
FACTS = (16, 48, 128)      # default fact counts (entities x relations)
FRACTION = 0.5             # fraction of training tokens that are fact text
STEPS = 1000
TOLERANCE = 0.05           # largest allowed |flops / dense flops - 1|
COMMON = {"data.synthfacts_fraction": FRACTION, "data.synthfacts_seed": 0,
          "train.eval_every_steps": 0, "train.checkpoint_every_steps": 0,
          "train.eval_batches": 32, "train.log_every_steps": 50, "train.progress_bar": False,
          "optim.warmup_steps": 30}
# Fixed per family (capacity and retrieval width), then the closest in FLOPs per token of the
# KNOBS settings. Memory (one Memory+ layer, layer 1, as configs/memory.py:tiny) gets a 128²-row
# value table (1.05M parameters) and PEER (every layer) 64² experts per layer (2 x 2 x 4096 x 64
# = 1.05M), against dense-tiny's 98k non-embedding parameters. Their FLOPs are matched through
# d_key (the query projection, a dense matmul: cheap on CPU) rather than more heads x top-k
# (gathers and scatters: 2-4x slower steps on CPU at 128² rows).
FIXED = {"dense": {},
         "memory": {"memory.num_slots": 128 ** 2, "memory.num_heads": 2, "memory.top_k": 8},
         "peer": {"peer.num_experts": 64 ** 2, "peer.num_heads": 2, "peer.top_k": 8},
         "moe": {}}
KNOBS = {
    "dense": [{}],
    "memory": [{"memory.d_key": k} for k in (64, 96, 32, 128)],
    "peer": [{"peer.d_key": k} for k in (128, 96, 80, 192, 64)],
    # one dense FFN's worth of active experts (+ the router): granularity g with top-1 (the
    # layer multiplies E and k by g) or, if granularity does not scale k, top-g
    "moe": [{"moe.granularity": g, "moe.top_k": k} for g in (2, 4) for k in (1, g)],
}


def flops(family: str, overrides: dict) -> float:
  """Training FLOPs per token (sparsejax.info); inf for a setting the config rejects."""
  try:
    cfg = load_config(f"configs/{family}.py:tiny", **{**COMMON, **overrides,
                                                      "train.steps": STEPS})
  except ConfigError:
    return math.inf
  return describe(cfg)["flops_per_token"]


@functools.lru_cache(maxsize=None)
def matched() -> dict[str, tuple[dict, float]]:
  """Per family: the overrides whose FLOPs per token are closest to dense-tiny's, and the
  ratio; raises if one is off by more than TOLERANCE."""
  target = flops("dense", {})
  out = {}
  for family in FAMILIES:
    options = [{**FIXED[family], **knob} for knob in KNOBS[family]]
    best = min(options, key=lambda o: abs(flops(family, o) / target - 1))
    ratio = flops(family, best) / target
    if abs(ratio - 1) > TOLERANCE:
      raise ValueError(f"experiments/synthfacts.py: no {family} setting within {TOLERANCE:.0%} "
                       f"of dense-tiny's FLOPs per token (best {best}: {ratio:.3f}x); extend "
                       "KNOBS")
    out[family] = (best, ratio)
  return out


def runs(facts=FACTS, seeds: int = 3, steps: int = STEPS, families=FAMILIES) -> list[Run]:
  facts = (facts,) if isinstance(facts, int) else tuple(facts)
  families = (families,) if isinstance(families, str) else tuple(families)
  out = []
  for family in families:
    knobs, _ = matched()[family]
    for n in facts:
      for seed in range(int(seeds)):
        over = {**COMMON, **knobs, "data.synthfacts_facts": int(n), "train.seed": seed,
                "train.steps": int(steps)}
        out.append(Run(f"configs/{family}.py:tiny", over, name=f"{family}-f{n}-s{seed}"))
  return out


def table() -> str:
  target = flops("dense", {})
  lines = ["| family | settings | FLOPs/token | vs dense |", "|---|---|---|---|"]
  for family, (knobs, ratio) in matched().items():
    shown = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in knobs.items()) or "preset"
    lines.append(f"| {family} | {shown} | {ratio * target:,.0f} | {ratio:.3f}x |")
  return "\n".join(lines)


if __name__ == "__main__":
  print(table())
  sys.exit(0)
