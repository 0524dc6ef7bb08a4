"""``--parallel N``: a sweep's unfinished runs N at a time, each in its own ``python -m
sparsejax.sweep FILE --root ROOT --only NAME <--arg ...>`` process (runner.child_command), so
skip / resume / records are exactly those of a sequential run. The semantics are in the
docstring of sparsejax.sweep.cli.
"""

from __future__ import annotations

import collections
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import threading
import time

from sparsejax.sweep.planning import SweepError, load_sweep, plan
from sparsejax.scaling.records import LOG, RECORD, SMOOTH_EVALS, read_record
from sparsejax.sweep.runner import child_command, unfinished


def _gpu_ids() -> list[str]:
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    return [g for g in visible.split(",") if g.strip()]
  if shutil.which("nvidia-smi"):
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU")]
  return []


def worker_slots(n: int, cpus: list[int] | None = None, gpus: list[str] | None = None
                 ) -> list[tuple[list[int] | None, dict[str, str]]]:
  """For N processes: each one's CPU set (None: unpinned) and environment additions. CPUs are
  split into N equal contiguous shares (round robin if N > CPUs); GPUs likewise, N <= GPUs. One
  process keeps everything."""
  if n < 1:
    raise SweepError(f"--parallel {n}: must be at least 1")
  if n == 1:
    return [(None, {})]
  if cpus is None and hasattr(os, "sched_getaffinity"):
    cpus = sorted(os.sched_getaffinity(0))
  gpus = _gpu_ids() if gpus is None else gpus
  if gpus and n > len(gpus):
    raise SweepError(f"--parallel {n}: only {len(gpus)} GPUs ({','.join(gpus)}); use at most "
                     f"--parallel {len(gpus)}")
  slots = []
  for i in range(n):
    share = None
    if cpus:
      k = max(len(cpus) // n, 1)
      share = cpus[i * k:(i + 1) * k] if len(cpus) >= n else [cpus[i % len(cpus)]]
    env = {}
    if gpus:
      k = len(gpus) // n
      env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[i * k:(i + 1) * k])
    slots.append((share, env))
  return slots


def _last_line(path: pathlib.Path) -> str:
  try:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
  except OSError:
    return ""
  return lines[-1][-300:] if lines else ""


def run_parallel(sweep_file: str | os.PathLike, root: str | os.PathLike, n: int,
                 args: dict | None = None, only: str | None = None, log=print,
                 smooth_evals: int = SMOOTH_EVALS, slots=None) -> list[tuple[str, str]]:
  """Train the unfinished runs N at a time, each in its own ``python -m sparsejax.sweep ...
  --only NAME`` process logging to ROOT/<name>/sweep.log. Returns (name, status) in sweep order:
  "skipped", "done", "incomplete" or "failed" (nonzero exit without an incomplete record). On
  Ctrl-C or SIGTERM the running processes get SIGTERM (each saves a checkpoint and stops at its
  next step) and are waited for; re-running resumes them. `slots`: worker_slots(n) by default."""
  planned = plan(load_sweep(sweep_file, **(args or {})), only=only)
  root = pathlib.Path(root)
  todo = collections.deque(unfinished(planned, root))
  statuses = {p.name: "skipped" for p in planned}
  pending = {p.name for p in todo}
  for i, p in enumerate(planned):
    if p.name not in pending:
      log(f"[{i + 1}/{len(planned)}] {p.name}: done already, skipped")
  index = {p.name: i + 1 for i, p in enumerate(planned)}
  free = collections.deque(worker_slots(n) if slots is None else slots)
  running = []  # (planned, process, slot, log path, log file, t0)
  extra = [] if smooth_evals == SMOOTH_EVALS else ["--smooth_evals", str(smooth_evals)]
  previous = None
  if threading.current_thread() is threading.main_thread():
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
  try:
    while todo or running:
      while todo and free:
        p, slot = todo.popleft(), free.popleft()
        cpus, env = slot
        workdir = root / p.name
        workdir.mkdir(parents=True, exist_ok=True)
        cmd = child_command(sweep_file, root, p.name, args,
                            extra=extra + (["--cpus", ",".join(map(str, cpus))] if cpus else []))
        log_path = workdir / LOG
        f = log_path.open("a")
        f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        f.flush()
        # Own session: Ctrl-C reaches only this process, which stops the runs with SIGTERM
        # (the signal the train loop checkpoints on).
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **env})
        log(f"[{index[p.name]}/{len(planned)}] {p.name}: started "
            f"({p.cfg.train.steps} steps, {p.total_flops:.3g} FLOPs"
            f"{', cpus ' + ','.join(map(str, cpus)) if cpus else ''}"
            f"{', gpus ' + env['CUDA_VISIBLE_DEVICES'] if 'CUDA_VISIBLE_DEVICES' in env else ''}"
            f"); log {log_path}")
        running.append((p, proc, slot, log_path, f, time.perf_counter()))
      time.sleep(0.1)
      for entry in list(running):
        p, proc, slot, log_path, f, t0 = entry
        rc = proc.poll()
        if rc is None:
          continue
        f.close()
        running.remove(entry)
        free.append(slot)
        try:
          status = read_record(root / p.name / RECORD)["status"]
        except (OSError, ValueError):
          status = None
        if rc == 0 and status == "done":
          statuses[p.name] = "done"
          log(f"  {p.name}: done in {time.perf_counter() - t0:.1f} s")
        elif status == "incomplete":
          statuses[p.name] = "incomplete"
          log(f"  {p.name}: incomplete (stopped early); re-run to resume; log {log_path}")
        else:
          statuses[p.name] = "failed"
          log(f"  {p.name}: FAILED (exit {rc}): {_last_line(log_path)}; log {log_path}")
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
    for p, proc, *_ in running:
      proc.terminate()  # SIGTERM: the run saves a checkpoint at its next step and exits
      log(f"  {p.name}: stopping (SIGTERM); re-run to resume")
    for p, proc, _, _, f, _ in running:
      try:
        proc.wait(timeout=300)
      except subprocess.TimeoutExpired:
        proc.kill()
      f.close()
  return [(p.name, statuses[p.name]) for p in planned]


def _raise_interrupt(signum, frame):
  raise KeyboardInterrupt(f"signal {signum}")
