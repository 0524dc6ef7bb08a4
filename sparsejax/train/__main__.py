"""python -m sparsejax.train --config configs/dense.py:<preset> --workdir DIR [--config.a.b=v]

Several processes: start the same command once per process with the environment of
sparsejax.parallel.distributed (JAX_COORDINATOR_ADDRESS, SPARSEJAX_NUM_PROCESSES,
SPARSEJAX_PROCESS_ID, or SPARSEJAX_DISTRIBUTED=auto on a cluster jax detects). Only process 0
prints the summary line.
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from sparsejax.cli_common import flags_parser, one_line_errors, setup_logging

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and preset, e.g. configs/dense.py:tiny", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs); re-use to resume")
_ALLOW_DATA_CHANGE = flags.DEFINE_bool(
    "allow_data_change", False, "Resume although config.data.global_batch_size / seq_len, "
    "config.train.seed or the dataset changed since the checkpoint (the run continues in the "
    "new data stream past the sequences already consumed)")
_STEP_TIMEOUT = flags.DEFINE_float(
    "step_timeout_s", None, "Watchdog: exit (code 75) when a step makes no progress for this "
    "many seconds (compiling, saving and the first eval get max(this, 600)); default 1800 with "
    "several processes, off with one; 0: off")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  setup_logging()
  with one_line_errors("sparsejax.train"):
    # defers jax: --help and bad flags answer without loading it, and jax.distributed is
    # initialised before anything can touch a device
    from sparsejax.parallel.distributed import initialize_from_env  # defers jax (see above)
    initialize_from_env()
    import jax
    from sparsejax.configure import validate  # defers jax (see above)
    from sparsejax.train.loop import train_and_evaluate  # defers jax (see above)
    cfg = validate(_CONFIG.value)
    result = train_and_evaluate(cfg, _WORKDIR.value, allow_data_change=_ALLOW_DATA_CHANGE.value,
                                step_timeout_s=_STEP_TIMEOUT.value)
    summary = {"workdir": str(result.workdir), "step": result.step,
               "preempted": result.preempted,
               "train_loss": result.last_metrics.get("loss"),
               "eval": result.eval_metrics}
    if jax.process_index() == 0:
      print(json.dumps(summary))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=flags_parser("sparsejax.train"))
