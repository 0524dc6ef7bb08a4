"""N processes on this machine, wired together exactly like the hosts of a cluster.

    python launch/local_multiprocess.py --num_processes 2 --devices_per_process 4 \\
        -- python -m sparsejax.train --config configs/dense.py:tiny --workdir runs/mp

Process i of N gets the multi-process environment (docs/launch.md) on top of this one:

    JAX_COORDINATOR_ADDRESS=localhost:PORT   process 0 hosts the coordinator (--port, default: free)
    SPARSEJAX_NUM_PROCESSES=N  SPARSEJAX_PROCESS_ID=i
    SPARSEJAX_LOCAL_DEVICES=k                with --devices_per_process k (k fake CPU devices)
    CUDA_VISIBLE_DEVICES=...                 with --gpus_per_process g (this machine's GPUs, split)

so the program calls ``jax.distributed.initialize`` as it would on a cluster: the tests run the
multi-host code path on one CPU this way.

- Output: every child's stdout and stderr, line by line, prefixed ``[p<i>]``, on stdout.
- Pids: on stderr, and in PID_DIR/pids.json (``--pid_dir``, else the command's ``--workdir``):
  ``{"launcher": pid, "coordinator": "localhost:PORT", "pids": [pid of process 0, ...]}``.
- SIGTERM or Ctrl-C to the launcher: SIGTERM to every child (the trainer saves a checkpoint at its
  next step and exits); a second Ctrl-C kills them. The command should ``exec`` the trainer (no
  shell wrapper), so that SIGTERM reaches it.
- A child that exits with a non-zero status: the others get ``--grace`` seconds to end on their
  own, then SIGTERM, then ``--grace`` seconds later SIGKILL (a peer blocked in a collective never
  reaches the step boundary where SIGTERM is honoured). The exit status is the failed child's
  (128 + N if signal N killed it), and stderr names the process.
- ``--timeout S``: after S seconds every child gets SIGTERM, and SIGKILL ``--grace`` seconds
  later; exit status 124 (a watchdog for a hung host).
- ``--dry_run``: print each process's environment and command, start nothing.

Importable (standard library only): ``launch(cmd, num_processes, devices_per_process, ...)``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence, TextIO

NAME = "local_multiprocess"
TIMEOUT_STATUS = 124


class LaunchError(ValueError):
  """A bad request (flags, command); the message says what to change."""


def free_port(host: str = "localhost") -> int:
  """A TCP port free on `host` right now (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1" if host == "localhost" else host, 0))
    return s.getsockname()[1]


def process_envs(num_processes: int, devices_per_process: int | None = None, *,
                 port: int, host: str = "localhost", gpus_per_process: int | None = None,
                 visible_gpus: Sequence[str] | None = None) -> list[dict[str, str]]:
  """The environment additions of each process, in process order. `visible_gpus`: the GPU ids
  to split (default: $CUDA_VISIBLE_DEVICES, else 0..N*g-1)."""
  if num_processes < 1:
    raise LaunchError(f"--num_processes {num_processes}: must be at least 1")
  if devices_per_process is not None and devices_per_process < 1:
    raise LaunchError(f"--devices_per_process {devices_per_process}: must be at least 1")
  if gpus_per_process is not None and gpus_per_process < 1:
    raise LaunchError(f"--gpus_per_process {gpus_per_process}: must be at least 1")
  if devices_per_process and gpus_per_process:
    raise LaunchError("--devices_per_process (fake CPU devices) and --gpus_per_process (GPUs) "
                      "exclude each other; give one")
  gpus: list[str] = []
  if gpus_per_process:
    if visible_gpus is None:
      visible = os.environ.get("CUDA_VISIBLE_DEVICES")
      visible_gpus = ([g.strip() for g in visible.split(",") if g.strip()] if visible
                      else [str(i) for i in range(num_processes * gpus_per_process)])
    gpus = list(visible_gpus)
    if len(gpus) < num_processes * gpus_per_process:
      raise LaunchError(f"--num_processes {num_processes} x --gpus_per_process "
                        f"{gpus_per_process} needs {num_processes * gpus_per_process} GPUs; "
                        f"CUDA_VISIBLE_DEVICES has {len(gpus)} ({','.join(gpus)})")
  envs = []
  for i in range(num_processes):
    env = {"JAX_COORDINATOR_ADDRESS": f"{host}:{port}",
           "SPARSEJAX_NUM_PROCESSES": str(num_processes), "SPARSEJAX_PROCESS_ID": str(i)}
    if devices_per_process:
      env["SPARSEJAX_LOCAL_DEVICES"] = str(devices_per_process)
    if gpus_per_process:
      env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[i * gpus_per_process:(i + 1) * gpus_per_process])
    envs.append(env)
  return envs


def command_lines(cmd: Sequence[str], envs: list[dict[str, str]]) -> list[str]:
  """One shell line per process: ``K=V ... cmd`` (what --dry_run prints)."""
  return [shlex.join([f"{k}={v}" for k, v in env.items()] + list(cmd)) for env in envs]


def workdir_of(cmd: Sequence[str]) -> str | None:
  """The value of ``--workdir X`` / ``--workdir=X`` in a command, if any."""
  for i, arg in enumerate(cmd):
    if arg == "--workdir" and i + 1 < len(cmd):
      return cmd[i + 1]
    if arg.startswith("--workdir="):
      return arg.split("=", 1)[1]
  return None


def exit_status(returncode: int) -> int:
  """A child's return code as a shell exit status (killed by signal N -> 128 + N)."""
  return returncode if returncode >= 0 else 128 - returncode


class _Job:
  """The running children: output pumps, signal forwarding, failure and timeout handling."""

  def __init__(self, cmd, envs, *, base_env, timeout, grace, pid_dir, coordinator, out, err):
    self.cmd, self.envs, self.base_env = list(cmd), envs, base_env
    self.timeout, self.grace, self.pid_dir, self.coordinator = timeout, grace, pid_dir, coordinator
    self.out, self.err = out, err
    self.procs: list[subprocess.Popen] = []
    self.pumps: list[threading.Thread] = []
    self.lock = threading.Lock()
    self.signals: list[int] = []
    self.interrupts = 0

  def say(self, message: str) -> None:
    with self.lock:
      self.err.write(f"{NAME}: {message}\n")
      self.err.flush()

  def _pump(self, i: int, stream) -> None:
    prefix = f"[p{i}] "
    for raw in iter(stream.readline, b""):
      line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
      with self.lock:
        self.out.write(prefix + line + "\n")
        self.out.flush()
    stream.close()

  def _on_signal(self, signum, frame) -> None:
    self.signals.append(signum)

  def _live(self) -> list[tuple[int, subprocess.Popen]]:
    return [(i, p) for i, p in enumerate(self.procs) if p.poll() is None]

  def _terminate(self) -> None:
    for _, p in self._live():
      try:
        p.send_signal(signal.SIGTERM)
      except ProcessLookupError:
        pass

  def _kill(self) -> None:
    for _, p in self._live():
      try:
        os.killpg(p.pid, signal.SIGKILL)  # its own session: the whole group, helpers included
      except (ProcessLookupError, PermissionError):
        p.kill()

  def _write_pids(self) -> None:
    if self.pid_dir is None:
      return
    d = pathlib.Path(self.pid_dir)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".pids.json.{os.getpid()}"
    tmp.write_text(json.dumps({"launcher": os.getpid(), "coordinator": self.coordinator,
                               "pids": [p.pid for p in self.procs]}) + "\n")
    tmp.replace(d / "pids.json")

  def run(self) -> int:
    handlers = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        handlers[sig] = signal.signal(sig, self._on_signal)
    try:
      for i, extra in enumerate(self.envs):
        try:
          # Own session: a Ctrl-C in the terminal reaches only the launcher, which decides.
          p = subprocess.Popen(self.cmd, env={**self.base_env, "PYTHONUNBUFFERED": "1", **extra},
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
          self.say(f"cannot start process {i}: {self.cmd[0]}: {e.strerror or e}")
          return 127
        self.procs.append(p)
        pump = threading.Thread(target=self._pump, args=(i, p.stdout), daemon=True)
        pump.start()
        self.pumps.append(pump)
        self.say(f"process {i}/{len(self.envs)}: pid {p.pid}")
      self._write_pids()
      return self._supervise()
    finally:
      for sig, previous in handlers.items():
        signal.signal(sig, previous)
      self._kill()  # nothing outlives the launcher (normally nothing is left here)
      for p in self.procs:
        p.wait()
      for pump in self.pumps:
        pump.join(timeout=5)

  def _supervise(self) -> int:
    start = time.monotonic()
    failed: tuple[int, int] | None = None  # (process, return code) of the first failure
    term_at = kill_at = None               # when to send SIGTERM / SIGKILL to what is left
    timed_out = False
    while True:
      codes = [p.poll() for p in self.procs]
      if all(c is not None for c in codes):
        break
      now = time.monotonic()
      while self.signals:
        signum = self.signals.pop(0)
        if signum == signal.SIGINT:
          self.interrupts += 1
        if signum == signal.SIGINT and self.interrupts > 1:
          self.say("second interrupt: killing every process")
          self._kill()
        else:
          self.say(f"received {signal.Signals(signum).name}: sent SIGTERM to every process "
                   f"(the trainer saves a checkpoint at its next step); Ctrl-C again to kill")
          self._terminate()
      if failed is None and not timed_out:
        for i, c in enumerate(codes):
          if c not in (None, 0):
            failed = (i, c)
            term_at = min(term_at or float("inf"), now + self.grace)
            self.say(f"process {i} (pid {self.procs[i].pid}) exited with status "
                     f"{exit_status(c)}; stopping the others in {self.grace:g} s unless they end")
            break
      if self.timeout and not timed_out and now - start >= self.timeout:
        timed_out = True
        term_at = now
        self.say(f"timeout: still running after --timeout {self.timeout:g} s (a hung host?); "
                 f"sending SIGTERM to every process, SIGKILL in {self.grace:g} s")
      if term_at is not None and now >= term_at:
        term_at = None
        self._terminate()
        kill_at = now + self.grace
      if kill_at is not None and now >= kill_at:
        kill_at = None
        still = [i for i, _ in self._live()]
        if still:
          self.say(f"process(es) {', '.join(map(str, still))} ignored SIGTERM; SIGKILL")
          self._kill()
      time.sleep(0.02)
    codes = [p.returncode for p in self.procs]
    if timed_out:
      self.say(f"exit {TIMEOUT_STATUS}: the job exceeded --timeout {self.timeout:g} s")
      return TIMEOUT_STATUS
    if failed is None:
      failed = next(((i, c) for i, c in enumerate(codes) if c), None)
    if failed is not None:
      i, c = failed
      self.say(f"exit {exit_status(c)}: process {i} failed (status {exit_status(c)}); "
               f"see its [p{i}] lines above")
      return exit_status(c)
    return 0


def launch(cmd: Sequence[str], num_processes: int, devices_per_process: int | None = None, *,
           gpus_per_process: int | None = None, port: int | None = None,
           host: str = "localhost", timeout: float | None = None, grace: float = 10.0,
           pid_dir: str | os.PathLike | None = None, dry_run: bool = False,
           env: dict[str, str] | None = None, out: TextIO | None = None,
           err: TextIO | None = None) -> int:
  """Run `cmd` as `num_processes` cooperating processes; returns the exit status (module
  docstring). `env`: the base environment (default: this process's); `out` / `err`: where the
  prefixed child output / the launcher's messages go (default: stdout / stderr)."""
  cmd = list(cmd)
  if not cmd:
    raise LaunchError("no command: put it after --, e.g. -- python -m sparsejax.train "
                      "--config configs/dense.py:tiny --workdir runs/mp")
  if timeout is not None and timeout <= 0:
    raise LaunchError(f"--timeout {timeout}: must be positive (seconds)")
  if grace < 0:
    raise LaunchError(f"--grace {grace}: must be >= 0 (seconds)")
  out = sys.stdout if out is None else out
  err = sys.stderr if err is None else err
  port = free_port(host) if port is None else port
  envs = process_envs(num_processes, devices_per_process, port=port, host=host,
                      gpus_per_process=gpus_per_process)
  if dry_run:
    for line in command_lines(cmd, envs):
      out.write(line + "\n")
    out.flush()
    return 0
  if pid_dir is None:
    pid_dir = workdir_of(cmd)
  job = _Job(cmd, envs, base_env=dict(os.environ if env is None else env), timeout=timeout,
             grace=grace, pid_dir=pid_dir, coordinator=f"{host}:{port}", out=out, err=err)
  return job.run()


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  cmd = []
  if "--" in argv:
    cut = argv.index("--")
    argv, cmd = argv[:cut], argv[cut + 1:]
  ap = argparse.ArgumentParser(
      prog="python launch/local_multiprocess.py",
      description="Start N cooperating processes on this machine (a coordinator on localhost).",
      epilog="example: python launch/local_multiprocess.py --num_processes 2 "
             "--devices_per_process 4 -- python -m sparsejax.train "
             "--config configs/dense.py:tiny --workdir runs/mp")
  ap.add_argument("--num_processes", type=int, required=True)
  ap.add_argument("--devices_per_process", type=int, default=None,
                  help="fake CPU devices per process (SPARSEJAX_LOCAL_DEVICES)")
  ap.add_argument("--gpus_per_process", type=int, default=None,
                  help="GPUs per process (CUDA_VISIBLE_DEVICES split among the processes)")
  ap.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
  ap.add_argument("--host", default="localhost", help="coordinator host name")
  ap.add_argument("--timeout", type=float, default=None,
                  help="seconds; then stop every process and exit 124")
  ap.add_argument("--grace", type=float, default=10.0,
                  help="seconds between a failure and SIGTERM, and between SIGTERM and SIGKILL")
  ap.add_argument("--pid_dir", default=None,
                  help="where to write pids.json (default: the command's --workdir)")
  ap.add_argument("--dry_run", "--dry-run", action="store_true",
                  help="print each process's environment and command; start nothing")
  a = ap.parse_args(argv)
  try:
    return launch(cmd, a.num_processes, a.devices_per_process,
                  gpus_per_process=a.gpus_per_process, port=a.port, host=a.host,
                  timeout=a.timeout, grace=a.grace, pid_dir=a.pid_dir, dry_run=a.dry_run)
  except LaunchError as e:
    print(f"{NAME}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
