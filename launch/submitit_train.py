"""Submit sparsejax training to SLURM through submitit: one task per GPU (or per node).

    python launch/submitit_train.py --nodes 2 --gpus_per_node 8 --partition gpu --time 240 \\
        [--per_node] [--folder runs/submitit] [--account A] [--qos Q] [--dry_run] \\
        -- --config configs/dense.py:1.3b --workdir /shared/runs/1.3b [--config.a.b=v ...]

The arguments after ``--`` go to ``python -m sparsejax.train``. submitit (optional dependency:
``pip install submitit``) writes the sbatch script, submits it and, in every task, calls a
``TrainTask`` that runs the trainer as a child process with ``SPARSEJAX_DISTRIBUTED=auto``
(jax's SLURM auto-detection) and ``JAX_LOCAL_DEVICE_IDS`` (which of the GPUs the task sees it
drives: jax's own default, GPU number SLURM_LOCALID, is wrong for one process per node).

Time limit and preemption: submitit has SLURM send USR2 ``--signal_delay_s`` before the limit.
On task 0 submitit calls ``TrainTask.checkpoint()``, which sends SIGTERM to the trainer, waits
for it to save its checkpoint and exit (the trainer makes every process stop at the same step),
and returns a fresh TrainTask that submitit requeues; the requeued job resumes from that
checkpoint. The trainer child ignores USR2 (SLURM sends it to every process of the step, and
its default action would kill the trainer before it saves). A SIGTERM from SLURM on
preemption reaches the trainer directly. A trainer that ends with status 75 (its step watchdog:
some process stopped making progress) is started again in place, at most ``--max_restarts``
times; any other non-zero status fails the job.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Sequence

REPO = pathlib.Path(__file__).resolve().parent.parent
# The trainer's watchdog exit status (sparsejax.parallel.distributed.WATCHDOG_EXIT_CODE).
WATCHDOG_EXIT = 75


class SubmitError(ValueError):
  """A bad request or a missing dependency; the message says what to do."""


def local_device_ids(visible: str | None, gpus_per_task: int, local_rank: int) -> str | None:
  """JAX_LOCAL_DEVICE_IDS for one task: the indices, among the GPUs it sees
  (CUDA_VISIBLE_DEVICES), of the `gpus_per_task` it drives; None when unknown (no
  CUDA_VISIBLE_DEVICES: jax's default). A task that sees exactly its share drives all of it,
  one that sees the whole node drives the `local_rank`-th share."""
  if not visible or not visible.strip():
    return None
  seen = [g for g in visible.split(",") if g.strip()]
  first = 0 if len(seen) == gpus_per_task else local_rank * gpus_per_task
  if first + gpus_per_task > len(seen):
    raise SubmitError(f"task with local rank {local_rank} sees GPUs {visible} but should drive "
                      f"{gpus_per_task} starting at {first}; --gpus_per_node must match the "
                      f"nodes' GPUs")
  return ",".join(str(i) for i in range(first, first + gpus_per_task))


def task_env(environ: dict[str, str], gpus_per_task: int) -> dict[str, str]:
  """The trainer's environment in one task: `environ` plus the distributed settings."""
  env = {**environ, "SPARSEJAX_DISTRIBUTED": "auto", "PYTHONUNBUFFERED": "1"}
  if "JAX_LOCAL_DEVICE_IDS" not in environ:
    ids = local_device_ids(environ.get("CUDA_VISIBLE_DEVICES"), gpus_per_task,
                           int(environ.get("SLURM_LOCALID", "0")))
    if ids is not None:
      env["JAX_LOCAL_DEVICE_IDS"] = ids
  return env


def _ignore_usr2() -> None:
  signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # SIG_IGN survives exec


class TrainTask:
  """The callable submitit runs in every task; ``checkpoint()`` is submitit's preemption /
  time-limit hook (task 0 only). A trainer that exits with WATCHDOG_EXIT (its step watchdog: a
  process stopped making progress) is started again, at most `max_restarts` times."""

  def __init__(self, cmd: Sequence[str], cwd: str, gpus_per_task: int,
               stop_timeout_s: float = 110.0, max_restarts: int = 3):
    self.cmd, self.cwd, self.gpus_per_task = list(cmd), cwd, gpus_per_task
    self.stop_timeout_s, self.max_restarts = stop_timeout_s, max_restarts
    self._proc: subprocess.Popen | None = None
    self._stopping = False

  def __getstate__(self):  # pickled by submitit: the running child is not part of the task
    return {k: v for k, v in self.__dict__.items() if k not in ("_proc", "_stopping")}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._proc, self._stopping = None, False

  def _run_once(self) -> int:
    proc = subprocess.Popen(self.cmd, cwd=self.cwd,
                            env=task_env(dict(os.environ), self.gpus_per_task),
                            preexec_fn=_ignore_usr2)
    self._proc = proc
    # Reaped by a helper thread; this (main) thread only sleeps, so checkpoint(), which runs
    # as a signal handler on top of it, never contends with a wait() for Popen's lock.
    threading.Thread(target=proc.wait, daemon=True).start()
    while proc.returncode is None:
      time.sleep(0.2)
    return proc.returncode

  def __call__(self) -> int:
    restarts = 0
    while True:
      rc = self._run_once()
      if rc != WATCHDOG_EXIT or self._stopping or restarts >= self.max_restarts:
        break
      restarts += 1
      print(f"submitit_train: watchdog exit {rc}: starting the trainer again "
            f"({restarts}/{self.max_restarts}); it resumes from the last checkpoint",
            file=sys.stderr, flush=True)
    if rc != 0:
      raise RuntimeError(f"{shlex.join(self.cmd)} exited with status {rc}")
    return 0

  def checkpoint(self, *args, **kwargs):
    """SIGTERM to the trainer, wait for its checkpoint, and hand submitit a fresh task to
    requeue (it resumes from that checkpoint)."""
    self._stopping = True
    proc = self._proc
    if proc is not None and proc.returncode is None:
      try:
        os.kill(proc.pid, signal.SIGTERM)
      except ProcessLookupError:
        pass
      deadline = time.monotonic() + self.stop_timeout_s
      while proc.returncode is None and time.monotonic() < deadline:
        time.sleep(0.2)
    import submitit.helpers
    return submitit.helpers.DelayedSubmission(
        TrainTask(self.cmd, self.cwd, self.gpus_per_task, self.stop_timeout_s,
                  self.max_restarts))


def executor_parameters(*, nodes: int, gpus_per_node: int, per_node: bool, time_min: int,
                        partition: str | None = None, name: str = "sparsejax",
                        cpus_per_task: int | None = None, mem_gb: int | None = None,
                        account: str | None = None, qos: str | None = None,
                        constraint: str | None = None, signal_delay_s: int = 120,
                        slurm: dict[str, str] | None = None) -> dict:
  """``AutoExecutor.update_parameters(**this)``."""
  for flag, value in (("--nodes", nodes), ("--gpus_per_node", gpus_per_node),
                      ("--time", time_min), ("--signal_delay_s", signal_delay_s)):
    if value < 1:
      raise SubmitError(f"{flag} {value}: must be at least 1")
  tasks = 1 if per_node else gpus_per_node
  params = {"name": name, "nodes": nodes, "tasks_per_node": tasks,
            "gpus_per_node": gpus_per_node,
            "cpus_per_task": cpus_per_task or (8 if not per_node else 8 * gpus_per_node),
            "timeout_min": time_min, "slurm_signal_delay_s": signal_delay_s}
  optional = {"mem_gb": mem_gb, "slurm_partition": partition, "slurm_account": account,
              "slurm_qos": qos, "slurm_constraint": constraint}
  params.update({k: v for k, v in optional.items() if v is not None})
  if slurm:
    params["slurm_additional_parameters"] = dict(slurm)
  return params


def _import_submitit():
  try:
    import submitit
    import submitit.helpers  # noqa: F401
  except ImportError as e:
    raise SubmitError("submitit is not installed (optional): `pip install submitit`, or submit "
                      "launch/slurm_train.sbatch with sbatch") from e
  return submitit


def submit(params: dict, folder: str, task: TrainTask, max_requeues: int):
  """Submit `task` with these parameters; returns submitit's job."""
  submitit = _import_submitit()
  executor = submitit.AutoExecutor(folder=folder, slurm_max_num_timeout=max_requeues)
  executor.update_parameters(**params)
  return executor.submit(task)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  train_args: list[str] = []
  if "--" in argv:
    cut = argv.index("--")
    argv, train_args = argv[:cut], argv[cut + 1:]
  ap = argparse.ArgumentParser(prog="python launch/submitit_train.py",
                               description="Submit sparsejax training to SLURM via submitit.")
  ap.add_argument("--nodes", type=int, required=True)
  ap.add_argument("--gpus_per_node", type=int, required=True)
  ap.add_argument("--per_node", action="store_true",
                  help="one process per node driving all its GPUs (default: one per GPU)")
  ap.add_argument("--partition", default=None)
  ap.add_argument("--time", type=int, required=True, help="time limit in minutes")
  ap.add_argument("--name", default="sparsejax")
  ap.add_argument("--folder", default="runs/submitit/%j", help="submitit's logs and pickles")
  ap.add_argument("--account", default=None)
  ap.add_argument("--qos", default=None)
  ap.add_argument("--constraint", default=None)
  ap.add_argument("--cpus_per_task", type=int, default=None, help="default: 8 per GPU")
  ap.add_argument("--mem_gb", type=int, default=None)
  ap.add_argument("--signal_delay_s", type=int, default=120,
                  help="seconds before the time limit at which the checkpoint is requested")
  ap.add_argument("--max_requeues", type=int, default=20,
                  help="how many time-limit requeues submitit allows")
  ap.add_argument("--max_restarts", type=int, default=3,
                  help="how often a task starts its trainer again after a watchdog exit (75)")
  ap.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                  help="any other sbatch option (repeatable), e.g. --slurm exclusive=")
  ap.add_argument("--python", default=sys.executable, help="the trainer's interpreter")
  ap.add_argument("--dry_run", "--dry-run", action="store_true",
                  help="print the job parameters and each task's command; submit nothing")
  a = ap.parse_args(argv)
  try:
    def given(flag):
      return any(t == flag or t.startswith(flag + "=") for t in train_args)
    if not (given("--config") and given("--workdir")):
      raise SubmitError("give the trainer's arguments after --: -- --config configs/dense.py:tiny "
                        "--workdir /shared/runs/x")
    slurm = {}
    for item in a.slurm:
      if "=" not in item:
        raise SubmitError(f"--slurm {item}: expected KEY=VALUE")
      key, value = item.split("=", 1)
      slurm[key.replace("-", "_")] = value
    params = executor_parameters(
        nodes=a.nodes, gpus_per_node=a.gpus_per_node, per_node=a.per_node, time_min=a.time,
        partition=a.partition, name=a.name, cpus_per_task=a.cpus_per_task, mem_gb=a.mem_gb,
        account=a.account, qos=a.qos, constraint=a.constraint, signal_delay_s=a.signal_delay_s,
        slurm=slurm)
    gpus_per_task = a.gpus_per_node if a.per_node else 1
    cmd = [a.python, "-m", "sparsejax.train", *train_args]
    task = TrainTask(cmd, str(REPO), gpus_per_task, stop_timeout_s=max(a.signal_delay_s - 10, 1),
                     max_restarts=a.max_restarts)
    if a.dry_run:
      print(f"folder: {a.folder}")
      print(f"parameters: {json.dumps(params, sort_keys=True)}")
      print(f"each of the {a.nodes * params['tasks_per_node']} tasks runs, in {REPO}: "
            f"SPARSEJAX_DISTRIBUTED=auto {shlex.join(cmd)}")
      return 0
    job = submit(params, a.folder, task, a.max_requeues)
    print(f"submitted job {job.job_id}; logs in {a.folder.replace('%j', str(job.job_id))}")
    return 0
  except SubmitError as e:
    print(f"submitit_train: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
