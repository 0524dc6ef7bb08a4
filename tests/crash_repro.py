"""Hard-kill reproduction (issue 16): train configs/dense.py:tiny (400 steps by default) with a
checkpoint every 4 steps, SIGKILL the process at a random moment 1-10 s after it has set up its run (the "model:" log
line; 6-16 s after launch on an idle 2-core machine), relaunch the same command; after each kill, print the steps Orbax had finalised on disk and the step the relaunch
resumed from. A run whose relaunch resumes from an older step than the newest finalised one
fails (exit 1).

    python tests/crash_repro.py [--kills 4] [--seed 0] [--steps 400] [--workdir /tmp/crash_repro]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
FLAGS = ["--config.train.checkpoint_every_steps=4", "--config.train.log_every_steps=4",
         "--config.train.eval_every_steps=0", "--config.train.keep_checkpoints=3"]


def finalized_steps(workdir: pathlib.Path) -> list[int]:
  root = workdir / "checkpoints"
  if not root.is_dir():
    return []
  return sorted(int(p.name) for p in root.iterdir()
                if p.name.isdigit() and (p / "commit_success.txt").exists())


def launch(workdir: pathlib.Path, log: pathlib.Path, steps: int) -> subprocess.Popen:
  cmd = [sys.executable, "-m", "sparsejax.train", "--config", "configs/dense.py:tiny",
         f"--workdir={workdir}", f"--config.train.steps={steps}", *FLAGS]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  return subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def resumed_from(log_text: str) -> int | None:
  m = re.search(r"resumed from checkpoint step (\d+)", log_text)
  return int(m.group(1)) if m else None


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--kills", type=int, default=4)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--steps", type=int, default=400,
                      help="long enough that no launch finishes before its kill")
  parser.add_argument("--workdir", default="/tmp/crash_repro")
  args = parser.parse_args(argv)
  rng = random.Random(args.seed)
  workdir = pathlib.Path(args.workdir)
  shutil.rmtree(workdir, ignore_errors=True)
  logs = workdir.parent / f"{workdir.name}-logs"
  shutil.rmtree(logs, ignore_errors=True)
  logs.mkdir(parents=True)
  failed = False
  on_disk = []
  for i in range(args.kills + 1):
    log = logs / f"launch{i}.log"
    proc = launch(workdir, log, args.steps)
    if i < args.kills:
      delay = rng.uniform(1.0, 10.0)
      while proc.poll() is None and "model:" not in log.read_text():
        time.sleep(0.1)
      try:
        proc.wait(timeout=delay)
      except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    else:
      proc.wait()
    text = log.read_text()
    start = resumed_from(text)
    quarantined = len(re.findall(r"moving unusable checkpoint step", text))
    expected = on_disk[-1] if on_disk else None
    ok = start == expected
    failed |= not ok
    on_disk = finalized_steps(workdir)
    what = "finished" if i == args.kills else f"SIGKILL {delay:.1f} s into training"
    print(f"launch {i}: resumed from {start} (newest finalised before it: {expected}), "
          f"{quarantined} step(s) quarantined; {what}; finalised on disk now: {on_disk}"
          + ("" if ok else "  <-- LOST FINISHED CHECKPOINTS"), flush=True)
    for line in text.splitlines():
      if "resumed from" in line or "no commit marker" in line or "moving unusable" in line \
          or "adopting" in line:
        print("    " + line.strip())
    time.sleep(0.2)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
