"""Orbax checkpoints with an explicit commit marker.

Layout of a workdir:
    checkpoints/<step>/{state,data,meta}/   Orbax CheckpointManager, composite items:
                                            state (train state pytree), data (grain iterator
                                            state, JSON), meta (config + dataset info, JSON)
    commits/<step>.json                     written only after the save has fully finished;
                                            holds a manifest (relative path -> size in bytes)

Orbax says when a step's save has finished: it finalises the step directory (writes its
``commit_success.txt``; on file systems with atomic rename, renames it into place) only after every
file of that step is written. A step gets its marker as soon as Orbax has finalised it, whatever
later saves are doing (checked at every step boundary, after each save and at exit), and a
relaunch adopts a finalised step whose marker the killed process did not get to write. So a hard
kill costs at most the steps since the last finished save (docs/crash_safety.md lists every
window). A step that Orbax never finalised (the process died mid-save) is moved to
``quarantine/``; a marked step whose files no longer match its manifest (truncated / deleted
files) is skipped with a warning and never restored, and the previous committed step is used.

Several processes (jax.distributed): every process calls ``save`` (each writes its own shards;
Orbax's finalize waits at a barrier for all of them before the step directory appears) and
``restore`` (each reads what its devices need, so a checkpoint restores onto any process count
and mesh); only process 0 writes commit markers, moves steps to quarantine and writes JSON items.
``resume_step()`` makes every process resume from process 0's choice of step.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import utils as ocp_utils

from sparsejax.errors import CheckpointError

_log = logging.getLogger(__name__)


def _atomic_write(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def _move(src: pathlib.Path, dst: pathlib.Path) -> None:
  os.replace(src, dst)


def _manifest(step_dir: pathlib.Path) -> dict[str, int]:
  return {str(p.relative_to(step_dir)): p.stat().st_size
          for p in sorted(step_dir.rglob("*")) if p.is_file()}


class _Manager(ocp.CheckpointManager):
  """Orbax's manager minus its own preemption-sync calls: it asks ``reached_preemption(step)``
  from the save-finalize thread (process 0 only) with the step of an earlier save, which
  overwrites the step jax's sync protocol reports for this process. Reported late, the agreed
  stop step can be one this process has already passed, and it would never stop. The training
  loop asks once per step instead (sparsejax.parallel.distributed.preemption_reached)."""

  def reached_preemption(self, step: int) -> bool:
    return False


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(f"sparsejax:{name}")


class Checkpointer:
  def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = True,
               on_error: str = "stop"):
    self.workdir = pathlib.Path(workdir)
    self.root = self.workdir / "checkpoints"
    self.commits = self.workdir / "commits"
    self.commits.mkdir(parents=True, exist_ok=True)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self.mngr = _Manager(self.root.absolute(), options=options,
                         item_names=("state", "data", "meta"))
    self._pending: list[int] = []
    self.on_error = on_error  # "stop": a failed save raises CheckpointError; "warn": logged

  # ---- saving ----
  def save(self, step: int, state, data_state: dict, meta: dict) -> None:
    """Start an (asynchronous) save of ``step``. Orbax first waits for the previous save to
    finish, so every earlier pending step is final (or failed) when this returns."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state),
                              meta=ocp.args.JsonSave(meta))
    for attempt in (0, 1):
      try:
        self.mngr.save(step, args=args, force=True)
      except Exception as e:  # the previous save's error surfaces here, or this save's own
        self._save_failed(step, e)  # raises unless on_error == "warn"
        if attempt == 0 and not self.mngr.is_saving_in_progress():
          continue  # warn: the error was the previous save's; try this step once more
      else:
        self._pending.append(step)
      break
    self.commit_finished()

  def _save_failed(self, step: int, error: Exception) -> None:
    """``step``: the save being started (or waited for); the failed one is the oldest pending
    step Orbax never finalised, else ``step`` itself."""
    failed = next((s for s in self._pending if not self.finalized(s)), step)
    self.commit_finished()
    committed = self.committed_steps()
    last = committed[-1] if committed else None
    msg = (f"checkpoint save of step {failed} failed: {type(error).__name__}: "
           f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}; committed "
           f"steps {committed} are intact (the last, {last}, is where a re-run resumes)")
    self._pending = [s for s in self._pending if self.finalized(s)]
    if self.on_error == "warn":
      _log.error("%s; config.train.on_save_error='warn': training continues", msg)
      return
    raise CheckpointError(msg + "; free space or fix the storage, then re-run the same "
                          "command (or set config.train.on_save_error=warn to keep training)"
                          ) from error

  def finalized(self, step: int) -> bool:
    """Orbax has finished writing ``step`` (its directory is final and complete)."""
    step_dir = self.root / str(step)
    return step_dir.is_dir() and bool(ocp_utils.is_checkpoint_finalized(step_dir))

  def _write_marker(self, step: int) -> None:
    if jax.process_index() != 0:
      return
    _atomic_write(self.commits / f"{step}.json",
                  json.dumps({"step": step, "files": _manifest(self.root / str(step))}))

  def commit_finished(self) -> None:
    """Write the commit marker of every pending step Orbax has finalised, whatever later saves
    are doing (cheap; call every step)."""
    still = []
    for step in self._pending:
      if self.finalized(step):
        self._write_marker(step)
      else:
        still.append(step)
    self._pending = still

  def wait(self) -> None:
    try:
      self.mngr.wait_until_finished()
    except Exception as e:  # an asynchronous save failed
      self._save_failed(self._pending[-1] if self._pending else -1, e)
    self.commit_finished()
    if self._pending and not self.mngr.is_saving_in_progress():
      # Orbax logged the failure and never finalised these steps
      self._save_failed(self._pending[-1], RuntimeError("the save did not finalise; see the "
                                                        "Orbax error in the log"))

  def close(self) -> None:
    self.wait()
    self.mngr.close()

  def _step_dirs(self) -> list[int]:
    """Every step directory, finalised or not."""
    if not self.root.is_dir():
      return []
    return sorted(int(p.name) for p in self.root.iterdir() if p.name.isdigit() and p.is_dir())

  def quarantine(self, steps: list[int]) -> None:
    """Move ``steps`` out of the way into ``quarantine/`` so new saves of those step numbers
    can proceed. Nothing is deleted. With several processes all must call it (process 0 moves,
    all re-list)."""
    if steps and jax.process_index() == 0:
      qdir = self.workdir / "quarantine"
      qdir.mkdir(exist_ok=True)
      for s in steps:
        dest = qdir / f"{s}-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9}"
        _log.warning("moving unusable checkpoint step %d to %s", s, dest)
        _move(self.root / str(s), dest)
        # a kill between the two leaves a marker without its step: dropped by adopt_finalized
        (self.commits / f"{s}.json").unlink(missing_ok=True)
    _barrier("quarantine")
    self.mngr.reload()

  def adopt_finalized(self) -> None:
    """Write the missing marker of every step Orbax finalised (a process killed between the
    end of a save and its marker). Only for the run's own restart: nothing else is saving."""
    if jax.process_index() != 0:
      return
    steps = set(self._step_dirs())
    for marker in self.commits.glob("*.json"):
      if marker.stem.isdigit() and int(marker.stem) not in steps:
        marker.unlink()  # its step was quarantined (the process died before this unlink)
    for step in sorted(steps):
      if self.finalized(step) and not (self.commits / f"{step}.json").exists():
        _log.warning("adopting checkpoint step %d: its save finished but its commit marker "
                     "was not written (the process died in between)", step)
        self._write_marker(step)

  def resume_step(self) -> int | None:
    """The latest committed step (process 0's view, shared with all processes: a file system
    seen at slightly different moments must not split the job), after adopting finalised
    steps without a marker; unfinalised steps and steps after the chosen one are quarantined.
    Call on every process."""
    self.adopt_finalized()
    latest = self.latest_step()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      agreed = int(multihost_utils.broadcast_one_to_all(
          np.int32(-1 if latest is None else latest)))
      latest = None if agreed < 0 else agreed
    self.quarantine([s for s in self._step_dirs()
                     if not self.finalized(s) or (latest is None or s > latest)])
    return latest

  # ---- restoring ----
  def _valid(self, step: int) -> bool:
    marker = self.commits / f"{step}.json"
    step_dir = self.root / str(step)
    if not marker.exists():
      _log.warning("checkpoint step %d in %s has no commit marker (its save has not finished, "
                   "or was interrupted); ignoring it", step, self.root)
      return False
    try:
      expected = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
      _log.warning("commit marker %s is unreadable (%s); ignoring step %d", marker, e, step)
      return False
    actual = _manifest(step_dir) if step_dir.is_dir() else {}
    bad = [f for f, size in expected.items() if actual.get(f) != size]
    if bad:
      _log.warning("checkpoint step %d is corrupt (%d files missing or resized, e.g. %s); "
                   "ignoring it", step, len(bad), bad[0])
      return False
    return True

  def committed_steps(self) -> list[int]:
    steps = sorted(set(self.mngr.all_steps()))
    return [s for s in steps if self._valid(s)]

  def latest_step(self) -> int | None:
    steps = self.committed_steps()
    return steps[-1] if steps else None

  def restore(self, step: int, abstract_state) -> tuple[Any, dict, dict]:
    if not self._valid(step):
      raise CheckpointError(f"checkpoint step {step} in {self.root} is not committed or is "
                            f"corrupt; committed steps: {self.committed_steps()}")
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
    out = self.mngr.restore(step, args=args)
    return out["state"], out["data"], out["meta"]

  def restore_params(self, step: int, abstract_params) -> Any:
    """Only ``state["params"]`` of ``step`` (the optimizer state is never read), laid out as
    ``abstract_params`` (ShapeDtypeStructs with shardings) say: a run started from another
    run's weights (config.train.init_from), upcycling, export."""
    if not self._valid(step):
      raise CheckpointError(f"checkpoint step {step} in {self.root} is not committed or is "
                            f"corrupt; committed steps: {self.committed_steps()}")
    item = {"params": abstract_params}
    args = ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)
    return self.mngr.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]

  def restore_meta(self, step: int) -> dict:
    out = self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return out["meta"]

  def restore_data(self, step: int) -> dict:
    """The data item alone (the data position), to check it before restoring the state."""
    out = self.mngr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
    return out["data"]
