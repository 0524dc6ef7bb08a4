"""Running a sweep's runs elsewhere than one after another in this process: N local processes
at a time, SLURM (sbatch arrays or submitit) and TPU-pod commands. ``python -m sparsejax.sweep``
(sparsejax/sweep.py) parses the flags and calls these; the semantics are in its docstring.

Every mode trains a run as ``python -m sparsejax.sweep FILE --root ROOT --only NAME <--arg ...>``,
so skip / resume / records are exactly those of a sequential run.
"""

from __future__ import annotations

import collections
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

from sparsejax.configs_loader import REPO_ROOT
from sparsejax.sweep import (LOG, RECORD, SLURM_TEMPLATE, SMOOTH_EVALS, Planned, SweepError,
                             _literal, load_sweep, plan, read_record, unfinished)

def arg_flags(args: dict | None) -> list[str]:
  """``--arg key=value`` flags that give runs() these keyword arguments again."""
  out = []
  for key, value in (args or {}).items():
    text = value if isinstance(value, str) and _literal(value) == value else repr(value)
    out += ["--arg", f"{key}={text}"]
  return out


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


def child_command(sweep_file, root, name: str, args: dict | None = None,
                  python: str | None = None, extra: list[str] = ()) -> list[str]:
  return [python or sys.executable, "-m", "sparsejax.sweep", str(sweep_file), "--root",
          str(root), "--only", name, *arg_flags(args), *extra]


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


# ----------------------------------------------------------------------------- clusters

def _fill(template: str, values: dict[str, str]) -> str:
  out = []
  for line in template.splitlines():
    stripped = line.strip()
    if stripped.startswith("{{") and stripped.endswith("}}") and values.get(stripped[2:-2]) == "":
      continue  # a placeholder line with nothing to put there
    for key, value in values.items():
      line = line.replace("{{" + key + "}}", value)
    if "{{" in line:
      raise SweepError(f"{SLURM_TEMPLATE}: unknown placeholder in {line!r}")
    out.append(line)
  return "\n".join(out) + "\n"


def emit_slurm(pending: list[Planned], sweep_file, root, out: str | os.PathLike,
               args: dict | None = None, slurm: dict | None = None, max_concurrent: int = 16,
               python: str | None = None, extra: list[str] = ()) -> pathlib.Path | None:
  """Write OUT/runs.txt (one pending run per line) and OUT/sweep.sbatch (a job array, one task
  per line; ``slurm`` items become ``#SBATCH --KEY=VALUE``). Returns the script, or None if
  nothing is pending. Paths in the script are absolute; it cd's to this repository."""
  if not pending:
    return None
  if max_concurrent < 1:
    raise SweepError(f"--max_concurrent {max_concurrent}: must be at least 1")
  out = pathlib.Path(out).resolve()
  (out / "logs").mkdir(parents=True, exist_ok=True)
  runs_txt = out / "runs.txt"
  runs_txt.write_text("".join(p.name + "\n" for p in pending))
  q = shlex.quote
  select = f'"$(sed -n "$((SLURM_ARRAY_TASK_ID+1))p" {q(str(runs_txt))})"'
  command = " ".join([q(python or sys.executable), "-m", "sparsejax.sweep",
                      q(str(pathlib.Path(sweep_file).resolve())), "--root",
                      q(str(pathlib.Path(root).resolve())), "--only", select,
                      *map(q, arg_flags(args)), *map(q, extra)])
  values = {"job_name": f"sweep-{pathlib.Path(sweep_file).stem}",
            "last_index": str(len(pending) - 1), "max_concurrent": str(max_concurrent),
            "log_dir": str(out / "logs"),
            "sbatch_options": "\n".join(f"#SBATCH --{k}={v}" for k, v in (slurm or {}).items()),
            "repo": q(str(REPO_ROOT)), "command": command}
  script = out / "sweep.sbatch"
  script.write_text(_fill(SLURM_TEMPLATE.read_text(), values))
  return script


def submit_slurm(script: pathlib.Path) -> str:
  """``sbatch SCRIPT``; returns sbatch's reply (e.g. "Submitted batch job 123")."""
  if shutil.which("sbatch") is None:
    raise SweepError(f"--submit: sbatch is not on PATH; run this on a SLURM login node, or "
                     f"copy {script.parent} there and run `sbatch {script}`")
  done = subprocess.run(["sbatch", str(script)], capture_output=True, text=True)
  if done.returncode != 0:
    raise SweepError(f"sbatch {script} failed (exit {done.returncode}): "
                     f"{_tail(done.stderr or done.stdout)}")
  return done.stdout.strip()


def _tail(text: str) -> str:
  lines = [ln for ln in text.splitlines() if ln.strip()]
  return lines[-1] if lines else ""


def submit_submitit(pending: list[Planned], sweep_file, root, out: str | os.PathLike,
                    args: dict | None = None, slurm: dict | None = None,
                    max_concurrent: int = 16, python: str | None = None,
                    extra: list[str] = ()) -> list[tuple[str, str]]:
  """Submit one job per pending run as one array through submitit's AutoExecutor (Slurm where
  srun exists, else local processes); returns (name, job id). ``slurm["time"]`` (minutes) is
  required, as submitit's default limit is 5 minutes; other items are passed as ``slurm_<key>``
  (dashes -> underscores)."""
  try:
    import submitit
    import submitit.helpers
  except ImportError as e:
    raise SweepError("--emit submitit: submitit is not installed (optional); `pip install "
                     "submitit`, or use --emit slurm") from e
  slurm = dict(slurm or {})
  minutes = slurm.pop("time", None)
  if not isinstance(minutes, int) or minutes < 1:
    raise SweepError(f"--emit submitit: give --slurm.time=MINUTES (an integer, got {minutes!r}); "
                     f"submitit's default limit is 5 minutes")
  if not pending:
    return []
  out = pathlib.Path(out).resolve()
  executor = submitit.AutoExecutor(folder=str(out / "submitit" / "%j"))
  params = {"name": f"sweep-{pathlib.Path(sweep_file).stem}", "timeout_min": minutes,
            "slurm_array_parallelism": max_concurrent}
  params.update({"slurm_" + k.replace("-", "_"): v for k, v in slurm.items()})
  executor.update_parameters(**params)
  sweep_file = str(pathlib.Path(sweep_file).resolve())
  root = str(pathlib.Path(root).resolve())
  jobs = []
  with executor.batch():
    for p in pending:
      cmd = child_command(sweep_file, root, p.name, args, python, list(extra))
      jobs.append(executor.submit(submitit.helpers.CommandFunction(cmd, cwd=str(REPO_ROOT))))
  return [(p.name, str(j.job_id)) for p, j in zip(pending, jobs)]


def tpu_commands(pending: list[Planned], sweep_file, root, tpu_name: str, zone: str,
                 project: str | None = None, args: dict | None = None, repo: str | None = None,
                 python: str = "python", extra: list[str] = ()) -> list[str]:
  """One ``gcloud compute tpus tpu-vm ssh ... --worker=all`` command per pending run, to run one
  after another: every worker runs the same sweep process (``--distributed``). FILE and ROOT are
  used as given, relative to `repo` (default: this repository's path) on the workers."""
  out = []
  for p in pending:
    inner = shlex.join([python, "-m", "sparsejax.sweep", str(sweep_file), "--root", str(root),
                        "--only", p.name, "--distributed", *arg_flags(args), *extra])
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu_name, "--zone", zone]
    cmd += ["--project", project] if project else []
    cmd += ["--worker=all", "--command", f"cd {shlex.quote(repo or str(REPO_ROOT))} && {inner}"]
    out.append(shlex.join(cmd))
  return out
