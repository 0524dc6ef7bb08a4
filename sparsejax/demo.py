"""The README's main job: prepare the embedded corpus, pretrain the small dense model on CPU,
evaluate it, and say where everything is.

    python -m sparsejax.demo --workdir runs/default [--config configs/dense.py:small]
"""

from __future__ import annotations

import json
import time

from absl import app, flags

from sparsejax.cli_common import flags_parser, one_line_errors, setup_logging
from sparsejax.configure import load_config
from sparsejax.data import ensure_default_dataset
from sparsejax.data.prepare import summary
from sparsejax.eval.checkpoint import evaluate
from sparsejax.train.loop import train_and_evaluate

_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Run directory")
_CONFIG = flags.DEFINE_string("config", "configs/dense.py:small", "Config file:preset")


def main(argv) -> None:
  del argv
  setup_logging()
  with one_line_errors("sparsejax.demo"):
    t0 = time.perf_counter()
    cfg = load_config(_CONFIG.value)
    dataset = ensure_default_dataset(cfg.data.tokenizer)
    print(f"[1/3] data: {summary(dataset)}", flush=True)
    t1 = time.perf_counter()
    result = train_and_evaluate(cfg, _WORKDIR.value)
    t2 = time.perf_counter()
    print(f"[2/3] trained {cfg.name} to step {result.step} in {t2 - t1:.0f} s "
          f"(train loss {result.last_metrics.get('loss', float('nan')):.3f})", flush=True)
    ev = evaluate(result.workdir, progress=True)
    print(f"[3/3] eval: {json.dumps(ev)}")
    wd = result.workdir.resolve()
    print(f"\nworkdir      {wd}\n"
          f"checkpoints  {wd / 'checkpoints'}\n"
          f"metrics      {wd / 'metrics.jsonl'}\n"
          f"tensorboard  tensorboard --logdir {wd / 'tensorboard'}\n"
          f"config       {wd / 'config.json'}\n"
          f"total time   {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  app.run(main, flags_parser=flags_parser("sparsejax.demo"))
