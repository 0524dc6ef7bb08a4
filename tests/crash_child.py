"""Child process of tests/test_crash_safety.py: trains configs/dense.py:tiny (12 steps, a
checkpoint every 4, asynchronous saves, one CPU device) in WORKDIR and SIGKILLs itself at the
N-th time it reaches kill point POINT ("none": run to the end).

    python tests/crash_child.py WORKDIR POINT N

Kill points (each patches one function of the run; SIGKILL stops every thread at once):
  step         Checkpointer.commit_finished, called once per training step
  save         entering Checkpointer.save (nothing of this save written yet)
  orbax_async  right after Orbax's save call returned (its files are being written)
  finalize     Orbax's finalisation of a step directory, before it runs (every file written,
               the directory not yet renamed into place)
  marker       between Orbax's finalisation of a step and our commit marker
  marker_tmp   the marker's temporary file written, not yet renamed into place
  quarantine   a step directory moved to quarantine/, its marker not yet removed
  restore      entering the restore of a checkpoint on resume
  eval         the final eval (the last save in flight)
  close        waiting for the last save at exit
"""

from __future__ import annotations

import os
import pathlib
import signal
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STEPS, EVERY = 12, 4
OVERRIDES = {"train.steps": STEPS, "train.checkpoint_every_steps": EVERY,
             "train.log_every_steps": 1, "train.eval_every_steps": 0, "train.eval_batches": 1,
             "train.keep_checkpoints": 10, "train.async_checkpoint": True,
             "train.progress_bar": False, "mesh.data": 1}


def _die():
  sys.stdout.flush()
  sys.stderr.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def _arm(owner, name: str, n: int, *, after: bool = False):
  """Replace owner.name so that its n-th call SIGKILLs the process (before the original runs,
  or after it with ``after``)."""
  original = getattr(owner, name)
  calls = [0]

  def hit() -> bool:
    calls[0] += 1
    return calls[0] == n

  def wrapper(*a, **k):
    fire = hit()
    if fire and not after:
      _die()
    out = original(*a, **k)
    if fire:
      _die()
    return out
  setattr(owner, name, wrapper)


def arm(point: str, n: int) -> None:
  import orbax.checkpoint as ocp
  from orbax.checkpoint._src.path import atomicity  # the private module that renames steps

  from sparsejax.train import checkpoint as ck
  from sparsejax.train import loop

  if point == "step":
    _arm(ck.Checkpointer, "commit_finished", n)
  elif point == "save":
    _arm(ck.Checkpointer, "save", n)
  elif point == "orbax_async":
    _arm(ocp.CheckpointManager, "save", n, after=True)
  elif point == "finalize":  # the step directory's rename into place (not its items')
    real = atomicity.AtomicRenameTemporaryPath.finalize
    seen = [0]

    async def finalize(self, *a, **k):
      if self._final_path.name.isdigit():
        seen[0] += 1
        if seen[0] == n:
          _die()
      return await real(self, *a, **k)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
  elif point == "marker":
    _arm(ck.Checkpointer, "_write_marker", n)
  elif point == "marker_tmp":
    real = ck._atomic_write
    seen = [0]

    def write(path, text):
      seen[0] += 1
      if seen[0] == n:
        path.with_name(f".{path.name}.tmp").write_text(text)
        _die()
      real(path, text)
    ck._atomic_write = write
  elif point == "quarantine":
    _arm(ck, "_move", n, after=True)
  elif point == "restore":
    _arm(ck.Checkpointer, "restore", n)
  elif point == "eval":
    _arm(loop, "evaluate_params", n)
  elif point == "close":
    _arm(ck.Checkpointer, "close", n)
  elif point == "none":
    return
  else:
    raise SystemExit(f"unknown kill point {point!r}")


def main() -> None:
  workdir, point, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
  import jax
  if os.environ.get("SPARSEJAX_TEST_CACHE"):  # the suite's persistent compilation cache
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(os.environ["SPARSEJAX_TEST_CACHE"], "jax-compile"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

  from sparsejax.cli_common import setup_logging
  from sparsejax.configure import load_config
  from sparsejax.train.loop import train_and_evaluate
  setup_logging()
  arm(point, n)
  cfg = load_config("configs/dense.py:tiny", **OVERRIDES)
  result = train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])
  print(f"finished at step {result.step}", flush=True)


if __name__ == "__main__":
  main()
