"""python -m sparsejax.train --config configs/dense.py:<preset> --workdir DIR [--config.a.b=v]"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and preset, e.g. configs/dense.py:tiny", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs); re-use to resume")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from sparsejax.cli_common import one_line_errors, setup_logging
  setup_logging()
  with one_line_errors("sparsejax.train"):
    from sparsejax.config import from_config_dict
    from sparsejax.train.loop import train_and_evaluate
    cfg = from_config_dict(_CONFIG.value)
    result = train_and_evaluate(cfg, _WORKDIR.value)
    summary = {"workdir": str(result.workdir), "step": result.step,
               "preempted": result.preempted,
               "train_loss": result.last_metrics.get("loss"),
               "eval": result.eval_metrics}
    print(json.dumps(summary))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  from sparsejax.cli_common import flags_parser
  app.run(main, flags_parser=flags_parser("sparsejax.train"))
