"""A child process for tests/test_multiprocess.py: ``python -m sparsejax.train`` plus one
test-only fault. ``MP_CHILD_STALL=<process>:<step>`` makes that process's main thread hang (a
stuck host: a deadlock, a dead file system) when it logs that step; its peers then wait inside
the next step's collectives. The fault lives here, not in sparsejax: nothing in the package
reads MP_CHILD_STALL.

    MP_CHILD_STALL=1:3 python tests/mp_child.py --config ... --workdir ... [train flags]
"""

import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))


def install_stall(spec: str) -> None:
  process, step = (int(x) for x in spec.split(":"))
  import jax
  from sparsejax.train import metrics

  real_write = metrics.MetricWriter.write

  def write(self, step_no, scalars, *, prefix=""):
    if step_no == step and not prefix and jax.process_index() == process:
      print(f"mp_child: process {process} hangs at step {step}", file=sys.stderr, flush=True)
      time.sleep(3600)
    return real_write(self, step_no, scalars, prefix=prefix)

  metrics.MetricWriter.write = write


if __name__ == "__main__":
  if os.environ.get("MP_CHILD_STALL"):
    install_stall(os.environ["MP_CHILD_STALL"])
  from absl import app, flags

  from sparsejax.cli_common import flags_parser
  from sparsejax.train import __main__ as train_main
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(train_main.main, flags_parser=flags_parser("sparsejax.train"))
