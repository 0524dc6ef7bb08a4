"""TPU pods: request a slice (queued resource), set up every worker, train, restart on
preemption, tear down. Every gcloud command is built by a pure function and ``--dry_run``
prints them all without running any.

    python launch/tpu_pod.py up --name sj --zone us-west4-a --spot \\
        --accelerator_type v5litepod-16 --runtime_version v2-alpha-tpuv5-lite \\
        --config configs/dense.py:350m --workdir /mnt/shared/runs/350m \\
        [--project P] [--repo URL_OR_CHECKOUT] [--max_restarts 3] [--keep] [--dry_run] \\
        [-- --config.train.steps=20000 ...]

Subcommands: ``up`` (all of the below, with restarts and teardown), ``create``, ``wait``,
``setup``, ``run`` (once, no restart), ``down`` (the teardown: delete the queued resource).

- create: ``gcloud compute tpus queued-resources create NAME --node-id NODE ...`` on-demand by
  default, ``--spot`` or ``--reserved``.
- wait: poll ``queued-resources describe`` until the state is ACTIVE.
- setup, on every worker (``gcloud compute tpus tpu-vm ssh NODE --worker=all``): the code —
  ``--repo`` a git URL (cloned, ``--ref`` checked out) or a local checkout (default: this one;
  its tracked and untracked-but-not-ignored files are packed, copied with ``tpu-vm scp`` and
  unpacked) — then a Python 3.12 venv (uv) with ``pip install -e .[tpu] -c constraints.txt``.
- run, on every worker at once: ``SPARSEJAX_DISTRIBUTED=auto python -m sparsejax.train
  --config ... --workdir ...``; jax finds the pod's workers itself. Each worker's log streams
  back through ssh, every line prefixed with the worker's host name.
- preemption: when the run ends non-zero, the queued resource and node are described; SUSPENDED
  / FAILED / gone, or a PREEMPTED / TERMINATED node, means preempted: delete, re-create, set up
  and run the same command again, at most ``--max_restarts`` times. The trainer resumes from the
  last checkpoint in ``--workdir``, which must therefore outlive the VMs: a path every worker
  sees (a gcsfuse-mounted bucket, Filestore / NFS). Exit status 75 (the trainer's step watchdog:
  a worker stopped making progress) on a healthy slice: run again on the same slice (counted
  too). Any other failure on a healthy slice is not retried.
- teardown: ``up`` deletes the queued resource when it ends (success, failure or Ctrl-C) unless
  ``--keep``.

Multislice (``--node-count``, a DCN data axis across slices) is not handled here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Callable, Sequence

REPO = pathlib.Path(__file__).resolve().parent.parent
ACTIVE = "ACTIVE"
QR_LOST = ("SUSPENDING", "SUSPENDED", "FAILED", "DELETING", "")  # "": not found
NODE_LOST = ("PREEMPTED", "TERMINATED", "STOPPING", "STOPPED", "")
REMOTE_ARCHIVE = "sparsejax.tgz"
# The trainer's watchdog exit status (sparsejax.parallel.distributed.WATCHDOG_EXIT_CODE): a
# process stopped making progress; run again in place.
WATCHDOG_EXIT = 75
UV_INSTALL = "https://astral.sh/uv/install.sh"


class PodError(RuntimeError):
  """A step failed in a way a restart cannot fix; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Pod:
  name: str                               # queued resource id
  zone: str
  project: str | None = None
  node_id: str | None = None              # default: the queued resource's name
  accelerator_type: str = "v5litepod-16"
  runtime_version: str = "v2-alpha-tpuv5-lite"
  tier: str = "on-demand"                 # "on-demand" | "spot" | "reserved"

  @property
  def node(self) -> str:
    return self.node_id or self.name


@dataclasses.dataclass(frozen=True)
class Code:
  repo: str = str(REPO)                   # git URL, or a local checkout to pack and copy
  ref: str | None = None                  # git URL only: branch, tag or commit
  remote_dir: str = "sparsejax"           # on the workers, relative to the home directory
  python_version: str = "3.12"

  @property
  def local(self) -> bool:
    return os.path.isdir(self.repo)


@dataclasses.dataclass(frozen=True)
class Job:
  config: str
  workdir: str
  overrides: tuple[str, ...] = ()
  env: tuple[tuple[str, str], ...] = ()   # more environment for the trainer


# ----------------------------------------------------------------------------- commands

def _scope(pod: Pod) -> list[str]:
  return ["--zone", pod.zone] + (["--project", pod.project] if pod.project else [])


def create_command(pod: Pod) -> list[str]:
  if pod.tier not in ("on-demand", "spot", "reserved"):
    raise PodError(f"tier {pod.tier!r}: use on-demand (default), --spot or --reserved")
  cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", pod.name,
         "--node-id", pod.node, "--accelerator-type", pod.accelerator_type,
         "--runtime-version", pod.runtime_version, *_scope(pod)]
  return cmd + {"on-demand": [], "spot": ["--spot"], "reserved": ["--reserved"]}[pod.tier]


def describe_command(pod: Pod) -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources", "describe", pod.name, *_scope(pod),
          "--format", "value(state.state)"]


def node_state_command(pod: Pod) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "describe", pod.node, *_scope(pod),
          "--format", "value(state)"]


def delete_command(pod: Pod) -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources", "delete", pod.name, *_scope(pod),
          "--force", "--quiet"]


def ssh_command(pod: Pod, remote: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", pod.node, *_scope(pod), "--worker=all",
          "--command", remote]


def scp_command(pod: Pod, local: str, remote: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{pod.node}:{remote}",
          *_scope(pod), "--worker=all"]


def pack_command(checkout: str, archive: str) -> list[str]:
  """Tar this checkout's tracked and untracked-but-not-ignored files (no .venv, no runs/)."""
  q = shlex.quote
  return ["bash", "-c", f"git -C {q(checkout)} ls-files -z -co --exclude-standard | "
                        f"tar -C {q(checkout)} --null -T - -czf {q(archive)}"]


def install_script(code: Code) -> str:
  """Remote shell: a uv-managed Python venv in REMOTE_DIR/.venv with sparsejax[tpu] (pinned)."""
  return (f"(command -v uv >/dev/null 2>&1 || curl -LsSf {UV_INSTALL} | sh) && "
          f'export PATH="$HOME/.local/bin:$PATH" && cd {shlex.quote(code.remote_dir)} && '
          f"uv venv -q --allow-existing --python {shlex.quote(code.python_version)} .venv && "
          f"uv pip install -q --python .venv/bin/python -e '.[tpu]' -c constraints.txt")


def setup_steps(pod: Pod, code: Code, archive: str) -> list[tuple[str, list[str]]]:
  """(what, command) to put the code on every worker and install it."""
  d = shlex.quote(code.remote_dir)
  if code.local:
    return [("pack this checkout", pack_command(code.repo, archive)),
            ("copy it to every worker", scp_command(pod, archive, REMOTE_ARCHIVE)),
            ("unpack and install on every worker",
             ssh_command(pod, f"set -e; mkdir -p {d}; tar -xzf {REMOTE_ARCHIVE} -C {d}; "
                              f"{install_script(code)}"))]
  ref = shlex.quote(code.ref or "HEAD")
  fetch = (f"set -e; [ -d {d}/.git ] || git clone -q {shlex.quote(code.repo)} {d}; "
           f"git -C {d} fetch -q origin {ref}; git -C {d} checkout -q FETCH_HEAD; ")
  return [("clone or update the repository and install on every worker",
           ssh_command(pod, fetch + install_script(code)))]


def train_script(code: Code, job: Job) -> str:
  """Remote shell: the trainer with jax's TPU-pod auto-detection, lines prefixed by host."""
  env = {"SPARSEJAX_DISTRIBUTED": "auto", "PYTHONUNBUFFERED": "1", **dict(job.env)}
  assigns = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
  cmd = shlex.join([".venv/bin/python", "-m", "sparsejax.train", "--config", job.config,
                    "--workdir", job.workdir, *job.overrides])
  return (f"set -o pipefail; cd {shlex.quote(code.remote_dir)} && {assigns} {cmd} 2>&1 | "
          f'sed -u "s/^/[$(hostname)] /"')


def run_command(pod: Pod, code: Code, job: Job) -> list[str]:
  return ssh_command(pod, train_script(code, job))


def plan_up(pod: Pod, code: Code, job: Job, archive: str, max_restarts: int,
            keep: bool) -> list[tuple[str, list[str]]]:
  """What ``up`` runs, in order, when nothing goes wrong (the --dry_run listing)."""
  steps = [("request the slice (queued resource)", create_command(pod)),
           ("wait until its state is ACTIVE (polled)", describe_command(pod)),
           *setup_steps(pod, code, archive),
           ("train on every worker; their logs stream here", run_command(pod, code, job)),
           (f"if the run fails: preempted when the queued resource is {'/'.join(QR_LOST[:-1])} "
            f"or gone, or the node is {'/'.join(NODE_LOST[:-1])}: then delete, re-create, set "
            f"up and train again (resuming); exit {WATCHDOG_EXIT} (watchdog) on a healthy slice: "
            f"train again in place; at most {max_restarts} times", node_state_command(pod))]
  if not keep:
    steps.append(("tear down", delete_command(pod)))
  return steps


# ----------------------------------------------------------------------------- running

class Gcloud:
  """Runs the commands (tests substitute a fake with the same two methods)."""

  def __init__(self, log: Callable[[str], None]):
    self.log = log

  def run(self, cmd: list[str]) -> int:
    """Run with output streaming to ours; the exit status."""
    self.log("+ " + shlex.join(cmd))
    return subprocess.run(cmd).returncode

  def query(self, cmd: list[str]) -> str:
    """A describe: its one-line answer, "" when the resource does not exist."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode == 0:
      return done.stdout.strip()
    if "NOT_FOUND" in done.stderr or "not found" in done.stderr.lower():
      return ""
    last = [ln for ln in done.stderr.splitlines() if ln.strip()]
    raise PodError(f"{shlex.join(cmd)} failed (exit {done.returncode}): "
                   f"{last[-1] if last else 'no message'}")


def _log(message: str) -> None:
  print(f"tpu_pod: {message}", file=sys.stderr, flush=True)


def wait_active(pod: Pod, gcloud, poll_s: float = 30.0, timeout_s: float = 0.0,
                sleep=time.sleep, log=_log) -> str:
  """Poll until ACTIVE; returns ACTIVE, or the lost state (SUSPENDED, FAILED, "" ...) that makes
  waiting pointless. `timeout_s` 0: wait as long as it takes (spot capacity can take hours)."""
  start, last = time.monotonic(), None
  while True:
    state = gcloud.query(describe_command(pod))
    if state != last:
      log(f"queued resource {pod.name}: {state or 'not found'}")
      last = state
    if state == ACTIVE or state in QR_LOST:
      return state
    if timeout_s and time.monotonic() - start >= timeout_s:
      raise PodError(f"queued resource {pod.name} is still {state} after {timeout_s:g} s; "
                     f"wait longer (--wait_timeout_min 0: no limit) or pick another zone / tier")
    sleep(poll_s)


def preemption_cause(pod: Pod, gcloud) -> str | None:
  """Why the slice is unusable ("queued resource SUSPENDED", "node PREEMPTED", ...), or None."""
  state = gcloud.query(describe_command(pod))
  if state != ACTIVE:
    return f"queued resource {state or 'gone'}"
  node = gcloud.query(node_state_command(pod))
  if node in NODE_LOST:
    return f"node {node or 'gone'}"
  return None


def _create(pod: Pod, gcloud) -> None:
  rc = gcloud.run(create_command(pod))
  if rc:
    raise PodError(f"creating queued resource {pod.name} failed (exit {rc}); see gcloud's "
                   f"message above (quota, zone, accelerator type / runtime version)")


def run_setup(pod: Pod, code: Code, archive: str, gcloud) -> int:
  for what, cmd in setup_steps(pod, code, archive):
    rc = gcloud.run(cmd)
    if rc:
      _log(f"setup step failed (exit {rc}): {what}")
      return rc
  return 0


def up(pod: Pod, code: Code, job: Job, gcloud, *, archive: str, max_restarts: int = 3,
       keep: bool = False, poll_s: float = 30.0, wait_timeout_s: float = 0.0,
       sleep=time.sleep, log=_log) -> int:
  """create -> wait -> setup -> run; on preemption delete and start over (bounded); teardown."""
  restarts = 0
  try:
    state = gcloud.query(describe_command(pod))
    if state == "":
      _create(pod, gcloud)
    elif state in QR_LOST:
      log(f"queued resource {pod.name} exists but is {state}: re-creating it")
      gcloud.run(delete_command(pod))
      _create(pod, gcloud)
    else:
      log(f"queued resource {pod.name} exists ({state}): using it")
    set_up = False  # whether the workers of the current slice have the code
    while True:
      state = wait_active(pod, gcloud, poll_s, wait_timeout_s, sleep, log)
      cause = None if state == ACTIVE else f"queued resource {state or 'gone'}"
      in_place = False
      if cause is None:
        rc = 0 if set_up else run_setup(pod, code, archive, gcloud)
        if rc == 0:
          set_up = True
          rc = gcloud.run(run_command(pod, code, job))
          if rc == 0:
            log(f"training finished on every worker; results in {job.workdir}")
            return 0
        cause = preemption_cause(pod, gcloud)
        if cause is None and rc == WATCHDOG_EXIT and set_up:
          cause, in_place = f"the trainer's watchdog ended the run (exit {rc})", True
        if cause is None:
          log(f"failed (exit {rc}) on a healthy slice, so not restarting: fix the cause and run "
              f"the same command again (training resumes from {job.workdir})")
          return rc
      restarts += 1
      if restarts > max_restarts:
        log(f"{cause}; giving up after {max_restarts} restarts (--max_restarts)")
        return 1
      if in_place:
        log(f"{cause}: restart {restarts}/{max_restarts}: running again on the same slice; "
            f"training resumes from the last checkpoint in {job.workdir}")
        continue
      log(f"{cause}: restart {restarts}/{max_restarts}: deleting and re-creating {pod.name}; "
          f"training resumes from the last checkpoint in {job.workdir}")
      set_up = False
      gcloud.run(delete_command(pod))
      _create(pod, gcloud)
  finally:
    if keep:
      log(f"--keep: queued resource {pod.name} left running; delete it with "
          f"`python launch/tpu_pod.py down --name {pod.name} --zone {pod.zone}"
          f"{' --project ' + pod.project if pod.project else ''}`")
    else:
      log(f"tearing down {pod.name}")
      gcloud.run(delete_command(pod))


# ----------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--name", required=True, help="queued resource id")
  common.add_argument("--zone", required=True)
  common.add_argument("--project", default=None, help="default: gcloud's configured project")
  common.add_argument("--node_id", default=None, help="TPU node id (default: --name)")
  common.add_argument("--dry_run", "--dry-run", action="store_true",
                      help="print every command; run none")
  create = argparse.ArgumentParser(add_help=False)
  create.add_argument("--accelerator_type", default="v5litepod-16")
  create.add_argument("--runtime_version", default="v2-alpha-tpuv5-lite")
  tier = create.add_mutually_exclusive_group()
  tier.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
  tier.add_argument("--reserved", action="store_true", help="from your reservation")
  wait = argparse.ArgumentParser(add_help=False)
  wait.add_argument("--poll_s", type=float, default=30.0)
  wait.add_argument("--wait_timeout_min", type=float, default=0.0, help="0: no limit")
  setup = argparse.ArgumentParser(add_help=False)
  setup.add_argument("--repo", default=str(REPO),
                     help="git URL, or a local checkout to copy (default: this checkout)")
  setup.add_argument("--ref", default=None, help="git URL only: branch, tag or commit")
  setup.add_argument("--remote_dir", default="sparsejax", help="on the workers, under $HOME")
  setup.add_argument("--python_version", default="3.12")
  setup.add_argument("--archive", default=None,
                     help="local tarball path (default: <tmp>/sparsejax-<name>.tgz)")
  run = argparse.ArgumentParser(add_help=False)
  run.add_argument("--config", required=True, help="e.g. configs/dense.py:350m")
  run.add_argument("--workdir", required=True,
                   help="checkpoints; must outlive the VMs and be the same path on every worker")
  run.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="more environment for the trainer (repeatable)")
  ap = argparse.ArgumentParser(prog="python launch/tpu_pod.py",
                               description="Run sparsejax on a Cloud TPU pod slice.")
  sub = ap.add_subparsers(dest="command", required=True)
  sub.add_parser("create", parents=[common, create], help="request the queued resource")
  sub.add_parser("wait", parents=[common, wait], help="wait until it is ACTIVE")
  sub.add_parser("setup", parents=[common, setup], help="code + venv on every worker")
  sub.add_parser("run", parents=[common, setup, run], help="train once on every worker")
  u = sub.add_parser("up", parents=[common, create, wait, setup, run],
                     help="create, wait, setup, run, restart on preemption, tear down")
  u.add_argument("--max_restarts", type=int, default=3)
  u.add_argument("--keep", action="store_true", help="do not delete the slice at the end")
  sub.add_parser("down", parents=[common], help="delete the queued resource (teardown)")
  return ap


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides: list[str] = []
  if "--" in argv:
    cut = argv.index("--")
    argv, overrides = argv[:cut], argv[cut + 1:]
  a = _parser().parse_args(argv)
  try:
    pod = Pod(a.name, a.zone, a.project, a.node_id,
              **({"accelerator_type": a.accelerator_type, "runtime_version": a.runtime_version,
                  "tier": "spot" if a.spot else "reserved" if a.reserved else "on-demand"}
                 if hasattr(a, "spot") else {}))
    code = Code(a.repo, a.ref, a.remote_dir, a.python_version) if hasattr(a, "repo") else Code()
    if hasattr(a, "repo") and not code.local and "://" not in code.repo and "@" not in code.repo:
      raise PodError(f"--repo {code.repo}: neither a local directory nor a git URL")
    if overrides and a.command not in ("run", "up"):
      raise PodError(f"arguments after -- are trainer overrides; `{a.command}` takes none")
    job = None
    if hasattr(a, "config"):
      env = []
      for item in a.env:
        if "=" not in item:
          raise PodError(f"--env {item}: expected KEY=VALUE")
        env.append(tuple(item.split("=", 1)))
      job = Job(a.config, a.workdir, tuple(overrides), tuple(env))
    archive = getattr(a, "archive", None) or os.path.join(tempfile.gettempdir(),
                                                          f"sparsejax-{a.name}.tgz")
    if a.command == "up" and a.max_restarts < 0:
      raise PodError(f"--max_restarts {a.max_restarts}: must be >= 0")
    steps = {"create": lambda: [("request the slice", create_command(pod))],
             "wait": lambda: [("poll until ACTIVE", describe_command(pod))],
             "setup": lambda: setup_steps(pod, code, archive),
             "run": lambda: [("train on every worker", run_command(pod, code, job))],
             "up": lambda: plan_up(pod, code, job, archive, a.max_restarts, a.keep),
             "down": lambda: [("tear down", delete_command(pod))]}[a.command]()
    if a.dry_run:
      for what, cmd in steps:
        print(f"# {what}")
        print(shlex.join(cmd))
      return 0
    gcloud = Gcloud(_log)
    if a.command == "up":
      return up(pod, code, job, gcloud, archive=archive, max_restarts=a.max_restarts,
                keep=a.keep, poll_s=a.poll_s, wait_timeout_s=a.wait_timeout_min * 60)
    if a.command == "wait":
      state = wait_active(pod, gcloud, a.poll_s, a.wait_timeout_min * 60)
      return 0 if state == ACTIVE else 1
    if a.command == "setup":
      return run_setup(pod, code, archive, gcloud)
    if a.command == "create":
      _create(pod, gcloud)
      return 0
    return gcloud.run(steps[0][1])
  except PodError as e:
    print(f"tpu_pod: error: {e}", file=sys.stderr)
    return 2
  except FileNotFoundError as e:  # gcloud (or git / tar) not installed
    print(f"tpu_pod: error: {e.filename or e}: not found; install the Google Cloud SDK "
          f"(gcloud) and run `gcloud auth login`, or use --dry_run", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
