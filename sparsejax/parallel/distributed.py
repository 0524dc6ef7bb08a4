"""Multi-process runtime: start-up from the environment, preemption agreement, a step watchdog.

sparsejax runs on JAX's own multi-controller runtime: every process runs the same program on its
local devices, ``jax.distributed`` connects them and collectives cross process boundaries. This
module launches nothing (see launch/); it turns a launcher's environment into that runtime.

``initialize_from_env()`` is the first thing ``python -m sparsejax.train`` / ``sparsejax.eval``
do, before anything touches a device. It reads:

  JAX_COORDINATOR_ADDRESS=host:port  process 0's address (it hosts the coordination service)
  SPARSEJAX_NUM_PROCESSES=N          together with the address and SPARSEJAX_PROCESS_ID=i
  SPARSEJAX_PROCESS_ID=i             (0 <= i < N): jax.distributed.initialize(address, N, i)
  SPARSEJAX_DISTRIBUTED=auto         jax.distributed.initialize() with jax's cluster detection
                                     (SLURM, TPU pods, Open MPI, ...); explicit values above win
  SPARSEJAX_LOCAL_DEVICES=k          CPU only: this process exposes k fake CPU devices
  SPARSEJAX_INIT_TIMEOUT_S=300       start-up: how long processes wait for all N to connect
  SPARSEJAX_HEARTBEAT_TIMEOUT_S=100  jax's coordination service considers a process dead after
                                     this long without heartbeats (its host gone)

None of them set (or SPARSEJAX_DISTRIBUTED=off): one process, jax untouched. Under
jax.distributed the CPU collectives use gloo (``jax_cpu_collectives_implementation``), also with
N = 1: its all-reduce sums in another order than XLA's in-process collectives (measured: tiny
model losses differ by up to one float32 ulp), while 1 x 8 and 2 x 4 devices under gloo agree
bitwise (tests/test_multiprocess.py).

Faults the runtime covers:
  * preemption: SIGTERM to any one process is caught by jax's preemption notifier (installed by
    ``jax.distributed.initialize``); the coordination service agrees on one step (the fastest
    process's step + 1) and ``preemption_reached(step)`` turns true at that step on every
    process, so all save the same checkpoint. Do not install a Python SIGTERM handler in a
    distributed process: it would replace jax's and only the signalled process would stop.
  * a dead process: its peers fail in their next collective (measured on CPU: gloo aborts the
    survivor at once on the closed connection) or, where a transport would wait, the
    coordination service notices the missing heartbeats (above).
  * a live but stuck process (deadlock, hung filesystem) keeps heartbeating while its peers
    wait inside a collective forever: ``StepWatchdog`` exits every process whose loop made no
    progress for ``timeout_s`` (exit code 75, EX_TEMPFAIL: "retry"), so the job ends and a
    launcher can restart it from the last committed checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import threading
import time
from typing import Mapping

_log = logging.getLogger("sparsejax")

ADDRESS = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES = "SPARSEJAX_NUM_PROCESSES"
PROCESS_ID = "SPARSEJAX_PROCESS_ID"
MODE = "SPARSEJAX_DISTRIBUTED"
LOCAL_DEVICES = "SPARSEJAX_LOCAL_DEVICES"
INIT_TIMEOUT = "SPARSEJAX_INIT_TIMEOUT_S"
HEARTBEAT_TIMEOUT = "SPARSEJAX_HEARTBEAT_TIMEOUT_S"

WATCHDOG_EXIT_CODE = 75  # EX_TEMPFAIL: a launcher may restart the job from its last checkpoint
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


class DistributedEnvError(ValueError):
  """The multi-process environment is incomplete or malformed (one line: what to set)."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the environment asks for. mode: "single" (no jax.distributed), "explicit" or "auto"."""
  mode: str
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_devices: int | None = None
  init_timeout_s: int = 300
  heartbeat_timeout_s: int = 100


def _int(env: Mapping[str, str], name: str, minimum: int) -> int | None:
  raw = env.get(name, "").strip()
  if not raw:
    return None
  try:
    value = int(raw)
  except ValueError:
    raise DistributedEnvError(f"{name}={raw!r} is not an integer") from None
  if value < minimum:
    raise DistributedEnvError(f"{name}={value} must be >= {minimum}")
  return value


def parse_env(env: Mapping[str, str] | None = None) -> Plan:
  """The Plan for `env` (default os.environ); DistributedEnvError for a half-specified one."""
  env = os.environ if env is None else env
  mode = env.get(MODE, "").strip().lower()
  if mode not in ("", "auto", "off"):
    raise DistributedEnvError(f"{MODE}={env[MODE]!r}: use 'auto' (jax detects the cluster) or "
                              f"'off', or unset it and set {NUM_PROCESSES} / {PROCESS_ID}")
  address = env.get(ADDRESS, "").strip() or None
  count = _int(env, NUM_PROCESSES, 1)
  pid = _int(env, PROCESS_ID, 0)
  local = _int(env, LOCAL_DEVICES, 1)
  timeouts = dict(init_timeout_s=_int(env, INIT_TIMEOUT, 1) or 300,
                  heartbeat_timeout_s=_int(env, HEARTBEAT_TIMEOUT, 1) or 100)
  if address is not None and not re.fullmatch(r"\S+:\d+", address):
    raise DistributedEnvError(f"{ADDRESS}={address!r} must be host:port, e.g. localhost:12355")
  if mode == "off":
    return Plan("single", local_devices=local, **timeouts)
  if mode == "auto":
    if count is not None and pid is not None and pid >= count:
      raise DistributedEnvError(f"{PROCESS_ID}={pid} must be < {NUM_PROCESSES}={count}")
    return Plan("auto", address, count, pid, local, **timeouts)
  given = {ADDRESS: address, NUM_PROCESSES: count, PROCESS_ID: pid}
  if all(v is None for v in given.values()):
    return Plan("single", local_devices=local, **timeouts)
  missing = [k for k, v in given.items() if v is None]
  if missing:
    have = ", ".join(k for k, v in given.items() if v is not None)
    raise DistributedEnvError(f"{have} set but {' and '.join(missing)} not: set all three "
                              f"({ADDRESS}, {NUM_PROCESSES}, {PROCESS_ID}) or "
                              f"{MODE}=auto to let jax detect the cluster")
  if pid >= count:
    raise DistributedEnvError(f"{PROCESS_ID}={pid} must be < {NUM_PROCESSES}={count}")
  return Plan("explicit", address, count, pid, local, **timeouts)


def _apply_local_devices(k: int, env: Mapping[str, str]) -> None:
  """Expose k fake CPU devices. XLA reads XLA_FLAGS when jax creates its CPU backend, which is
  at the first device use, not at import: setting it here works after `import jax`."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  platforms = (env.get("JAX_PLATFORMS") or jax.config.jax_platforms or "").strip()
  if platforms and "cpu" not in platforms.split(","):
    raise DistributedEnvError(f"{LOCAL_DEVICES} makes fake CPU devices but JAX_PLATFORMS="
                              f"{platforms!r}; unset one of them")
  if xla_bridge.backends_are_initialized():
    have = jax.local_device_count()
    if have != k or jax.default_backend() != "cpu":
      raise RuntimeError(f"{LOCAL_DEVICES}={k} came too late: jax already initialised "
                         f"{have} {jax.default_backend()} devices; call initialize_from_env() "
                         "before anything touches a device")
    return
  flags = re.sub(rf"{_DEVICE_COUNT_FLAG}=\S*", "", os.environ.get("XLA_FLAGS", "")).split()
  os.environ["XLA_FLAGS"] = " ".join(flags + [f"{_DEVICE_COUNT_FLAG}={k}"])
  if not platforms:
    jax.config.update("jax_platforms", "cpu")


def initialize_from_env(env: Mapping[str, str] | None = None) -> Plan:
  """Set up this process as the environment asks (see the module docstring) and return the
  Plan. Idempotent: a second call after jax.distributed is up changes nothing."""
  import jax  # pylint: disable=import-outside-toplevel
  env = os.environ if env is None else env
  plan = parse_env(env)
  if plan.local_devices is not None:
    _apply_local_devices(plan.local_devices, env)
  if plan.mode == "single" or jax.distributed.is_initialized():
    return plan
  # CPU processes need a cross-process collectives implementation, chosen before the backend
  # exists; it only affects the CPU backend (harmless on GPU / TPU hosts). Set for one process
  # too: the same collectives (same reduction order) make N = 1 and N > 1 runs bitwise equal.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  given = dict(coordinator_address=plan.coordinator, num_processes=plan.num_processes,
               process_id=plan.process_id)  # auto: jax detects whatever is None
  jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None},
                             initialization_timeout=plan.init_timeout_s,
                             heartbeat_timeout_seconds=plan.heartbeat_timeout_s)
  _log.info("process %d of %d: %d local / %d global %s devices", jax.process_index(),
            jax.process_count(), jax.local_device_count(), jax.device_count(),
            jax.default_backend())
  return dataclasses.replace(plan, num_processes=jax.process_count(),
                             process_id=jax.process_index())


# ---- preemption --------------------------------------------------------------------------------

def preemption_sync_active() -> bool:
  """True when jax's preemption service watches SIGTERM for this process (jax.distributed is
  up with the service enabled); no Python SIGTERM handler may be installed then."""
  import jax  # pylint: disable=import-outside-toplevel
  return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


def preemption_reached(step: int) -> bool:
  """Call once per step on every process with the step number (increasing by one); true on all
  processes at the same step once any of them got SIGTERM."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return multihost_utils.reached_preemption_sync_point(step)


class Preemption:
  """``reached(step)``, asked once per step on every process: save and stop now?

  jax.distributed up: jax's preemption notifier catches SIGTERM on whichever process gets it
  and the processes agree on a step (``preemption_reached``). One plain process: a SIGTERM
  handler (main thread only) sets a flag, honoured at the next step.
  """

  def __init__(self):
    self.synced = preemption_sync_active()
    self.raised = False
    self._previous = None

  def __enter__(self) -> Preemption:
    if not self.synced and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    self.raised = True
    _log.warning("SIGTERM received: will save a checkpoint and stop at the next step")

  def reached(self, step: int) -> bool:
    return preemption_reached(step) if self.synced else self.raised

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# ---- watchdog ----------------------------------------------------------------------------------

class StepWatchdog:
  """Ends the process when the training loop stops making progress.

  ``beat(label)`` after every unit of progress (a finished step, an eval batch); if no beat
  arrives within ``timeout_s`` a daemon thread logs which process stalled after what and calls
  ``os._exit(WATCHDOG_EXIT_CODE)``. A process blocked in a collective cannot be reached by
  exceptions or signal handlers (those run on the main thread); this thread still runs.
  Slow phases get ``slow_timeout_s`` (default max(timeout_s, 600)): the time until the first beat
  (restore, compiling the step) and any interval opened with ``beat(label, slow=True)`` (a
  checkpoint save, compiling eval). ``timeout_s <= 0``: off.

  ``keep_on_error`` (several processes): an exception leaving the ``with`` block does not stop
  the watch; the process then gets ``timeout_s`` more to exit. A process whose peer failed
  would otherwise wait in jax's exit-time shutdown barrier for the dead peer's heartbeats.
  """

  def __init__(self, timeout_s: float, *, slow_timeout_s: float | None = None,
               keep_on_error: bool = False, exit_fn=os._exit):
    self.timeout_s = float(timeout_s)
    self.keep_on_error = keep_on_error
    self.slow_timeout_s = max(self.timeout_s, 600.0 if slow_timeout_s is None
                              else float(slow_timeout_s))
    self._exit = exit_fn
    self._label, self._limit = "start-up (restore, compiling the first step)", 0.0
    self._last = time.monotonic()
    self._lock = threading.Lock()  # (label, limit, last) change together
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._where = "this process"

  def __enter__(self) -> StepWatchdog:
    if self.timeout_s > 0:
      import jax  # pylint: disable=import-outside-toplevel
      # Asked here, on the main thread: the watch thread must not call into jax (a backend
      # lookup from it can fail while the main thread is failing).
      self._where = f"process {jax.process_index()} of {jax.process_count()}"
      self._limit, self._last = self.slow_timeout_s, time.monotonic()
      self._thread = threading.Thread(target=self._watch, name="sparsejax-watchdog",
                                      daemon=True)
      self._thread.start()
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is not None and self.keep_on_error and self._thread is not None:
      self.beat(f"{self._label}, then {exc_type.__name__} (exiting)")
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join()

  def beat(self, label: str, *, slow: bool = False) -> None:
    """Progress made (`label` says what); the next beat is due within timeout_s (or
    slow_timeout_s when `slow`)."""
    with self._lock:
      self._label = label
      self._limit = self.slow_timeout_s if slow else self.timeout_s
      self._last = time.monotonic()

  def _watch(self) -> None:
    poll = min(1.0, self.timeout_s / 4)
    while not self._stop.wait(poll):
      with self._lock:
        idle, limit, label = time.monotonic() - self._last, self._limit, self._label
      if idle > limit:
        try:  # reaches stderr even with no handler configured (logging.lastResort)
          _log.error("watchdog: %s made no progress for %.0f s (limit %.0f s) after %s; a host "
                     "is stuck or a collective is waiting for one. Exiting with code %d; the "
                     "last committed checkpoint is intact: re-run to resume", self._where, idle,
                     limit, label, WATCHDOG_EXIT_CODE)
        finally:
          self._exit(WATCHDOG_EXIT_CODE)
        return
