"""Handing a sweep's unfinished runs to a cluster: a SLURM job array (``--emit slurm``, from
``launch/sweep_slurm.sbatch.tmpl``), submitit (``--emit submitit``) and TPU-pod commands
(``--emit tpu``). Every mode trains a run as ``python -m sparsejax.sweep FILE --root ROOT --only
NAME <--arg ...>`` (runner.child_command), so skip / resume / records are exactly those of a
sequential run. The semantics are in the docstring of sparsejax.sweep.cli.
"""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import subprocess
import sys

from sparsejax.configure import REPO_ROOT
from sparsejax.sweep.planning import Planned, SweepError, arg_flags
from sparsejax.sweep.runner import child_command

SLURM_TEMPLATE = REPO_ROOT / "launch" / "sweep_slurm.sbatch.tmpl"


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
    import submitit  # optional dependency
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
