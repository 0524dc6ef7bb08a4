"""Orbax checkpoints with an explicit commit marker.

Layout of a workdir:
    checkpoints/<step>/{state,data,meta}/   Orbax CheckpointManager, composite items:
                                            state (train state pytree), data (grain iterator
                                            state, JSON), meta (config + dataset info, JSON)
    commits/<step>.json                     written only after the save has fully finished;
                                            holds a manifest (relative path -> size in bytes)

A step without a commit marker (torn: the process died mid-save) or whose files no longer match
its manifest (truncated / deleted files) is skipped with a warning and never restored; the
previous committed step is used instead. Saves are asynchronous; markers are written once Orbax
reports the save finished (checked at every step boundary and at exit).

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

from sparsejax.errors import CheckpointError

_log = logging.getLogger(__name__)


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
  def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
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

  # ---- saving ----
  def save(self, step: int, state, data_state: dict, meta: dict) -> None:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state),
                              meta=ocp.args.JsonSave(meta))
    self.mngr.save(step, args=args, force=True)
    self._pending.append(step)
    self.commit_finished()

  def commit_finished(self) -> None:
    """Write commit markers for saves that have fully finished (cheap; call every step)."""
    if not self._pending or self.mngr.is_saving_in_progress():
      return
    for step in self._pending:
      step_dir = self.root / str(step)
      if step_dir.is_dir() and jax.process_index() == 0:
        tmp = self.commits / f".{step}.json.tmp"
        tmp.write_text(json.dumps({"step": step, "files": _manifest(step_dir)}))
        os.replace(tmp, self.commits / f"{step}.json")
    self._pending.clear()

  def wait(self) -> None:
    self.mngr.wait_until_finished()
    self.commit_finished()

  def close(self) -> None:
    self.wait()
    self.mngr.close()

  def quarantine_after(self, step: int | None) -> None:
    """Move every step after `step` (torn or corrupt ones we are not resuming from) out of the
    way, into ``quarantine/``, so new saves of those step numbers can proceed. Nothing is
    deleted. With several processes all must call it (process 0 moves, all re-list)."""
    later = [s for s in self.mngr.all_steps() if step is None or s > step]
    if later and jax.process_index() == 0:
      qdir = self.workdir / "quarantine"
      qdir.mkdir(exist_ok=True)
      for s in later:
        dest = qdir / f"{s}-{time.strftime('%Y%m%d-%H%M%S')}"
        _log.warning("moving unusable checkpoint step %d to %s", s, dest)
        os.replace(self.root / str(s), dest)
        (self.commits / f"{s}.json").unlink(missing_ok=True)
    _barrier("quarantine")
    self.mngr.reload()

  def resume_step(self) -> int | None:
    """The latest committed step (process 0's view, shared with all processes: a file system
    seen at slightly different moments must not split the job), with later steps quarantined.
    Call on every process."""
    latest = self.latest_step()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      agreed = int(multihost_utils.broadcast_one_to_all(
          np.int32(-1 if latest is None else latest)))
      latest = None if agreed < 0 else agreed
    self.quarantine_after(latest)
    return latest

  # ---- restoring ----
  def _valid(self, step: int) -> bool:
    marker = self.commits / f"{step}.json"
    step_dir = self.root / str(step)
    if not marker.exists():
      _log.warning("checkpoint step %d in %s has no commit marker (torn or interrupted save); "
                   "ignoring it", step, self.root)
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

  def restore_meta(self, step: int) -> dict:
    out = self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return out["meta"]

  def restore_data(self, step: int) -> dict:
    """The data item alone (the data position), to check it before restoring the state."""
    out = self.mngr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
    return out["data"]
