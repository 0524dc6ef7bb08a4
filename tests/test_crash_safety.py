"""A hard kill costs at most the steps since the last finished save (docs/crash_safety.md).

Each case SIGKILLs the training process (tests/crash_child.py) at named points of the training and
saving cycle, one point per launch, then relaunches it until it finishes. After every kill the
relaunch must resume from the newest step Orbax had finalised on disk (never an older one), and
the finished run must equal an uninterrupted one bitwise (parameters and logged losses).
A failing save (disk full) stops with one line, or warns and keeps training, and never touches
the committed checkpoints."""

import errno
import json
import logging
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from sparsejax.configure import load_config
from sparsejax.errors import CheckpointError
from sparsejax.train import loop as looplib
from sparsejax.train.checkpoint import Checkpointer
from sparsejax.train.state import abstract_state, model_spec
from sparsejax.parallel.mesh import make_mesh

import crash_child

REPO = pathlib.Path(__file__).resolve().parent.parent
CHILD = pathlib.Path(crash_child.__file__)
ENV = {**os.environ, "XLA_FLAGS": os.environ["SPARSEJAX_TEST_XLA_FLAGS"], "JAX_PLATFORMS": "cpu",
       "SPARSEJAX_TEST_CACHE": os.environ.get("SPARSEJAX_TEST_CACHE", str(REPO / ".cache"))}


def launch(workdir, point="none", n=1) -> tuple[int, str]:
  proc = subprocess.run([sys.executable, str(CHILD), str(workdir), point, str(n)], cwd=REPO,
                        env=ENV, capture_output=True, text=True, timeout=600)
  return proc.returncode, proc.stdout + proc.stderr


def finalized(workdir) -> list[int]:
  root = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in root.iterdir()
                if p.name.isdigit() and (p / "commit_success.txt").exists()) if root.is_dir() else []


def resumed_from(log: str) -> int | None:
  m = re.search(r"resumed from checkpoint step (\d+)", log)
  return int(m.group(1)) if m else None


def losses(workdir) -> list:
  rows = [json.loads(x) for x in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def final_params(workdir):
  cfg = load_config("configs/dense.py:tiny", **crash_child.OVERRIDES)
  ckpt = Checkpointer(workdir)
  target, _ = abstract_state(model_spec(cfg, 257), make_mesh(cfg.mesh, jax.devices()[:1]))
  state, data, _ = ckpt.restore(ckpt.latest_step(), target)
  ckpt.close()
  return jax.tree.map(np.asarray, state["params"]), data


@pytest.fixture(scope="module")
def reference(tmp_path_factory, default_dataset):
  workdir = tmp_path_factory.mktemp("crash_reference")
  rc, log = launch(workdir)
  assert rc == 0, log
  return workdir, losses(workdir), *final_params(workdir)


def run_with_kills(workdir, kills: list[tuple[str, int]]) -> list[str]:
  logs = []
  for point, n in kills:
    before = finalized(workdir)
    rc, log = launch(workdir, point, n)
    assert rc == -9, f"kill point {point}:{n} was not reached (exit {rc}):\n{log[-3000:]}"
    logs.append(log)
    start = resumed_from(log)  # None also when killed before it could say (restore)
    assert start is None or start == before[-1], (point, n, before, log[-3000:])
    assert set(before) <= set(finalized(workdir)), (point, n, "a finished save was lost")
  before = finalized(workdir)
  rc, log = launch(workdir)
  assert rc == 0, log[-3000:]
  assert resumed_from(log) == (before[-1] if before else None), (before, log[-3000:])
  return logs + [log]


def assert_matches_reference(workdir, reference):
  _, ref_losses, ref_params, ref_data = reference
  assert losses(workdir) == ref_losses  # bit-identical float losses, every step
  params, data = final_params(workdir)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_array_equal(a, b)
  assert data == ref_data


# 12 kill points in two chains (points and counts: tests/crash_child.py), plus 4 in the two
# tests below; every point of the cycle is hit at least once. Each kill is followed by a relaunch
# that must resume from the newest finalised step (checked by run_with_kills before the next
# kill), and each chain ends bitwise equal to the uninterrupted run. Step-count kills race with
# the asynchronous saves; the checks hold either way.
CASES = {
    # The save cycle. Nothing finalised yet: killed while Orbax writes step 4 (its save call
    # returned), then before step 4's finalisation; then between step 4's finalisation and its
    # marker (the next launch adopts 4), with step 8's marker half written (its temporary file:
    # the next launch adopts 8), before a later save's finalisation (12; resumes from 8) and on
    # entering a save (12 again).
    "save-cycle": [("orbax_async", 1), ("finalize", 1), ("marker", 1), ("marker_tmp", 2),
                   ("finalize", 1), ("save", 1)],
    # Mid-training before any save; step 4 finalised without its marker, then killed while the
    # next launch restores it; mid-training with the step-8 save possibly in flight; in the
    # final eval (the last save in flight); in the exit wait.
    "train-restore-exit": [("step", 3), ("marker", 1), ("restore", 1), ("step", 6),
                           ("eval", 1), ("close", 1)],
}
ADOPTED = {"save-cycle": {3: 4, 4: 8}, "train-restore-exit": {2: 4}}  # launch -> adopted step


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_kill_resumes_from_latest_finished_save(case, tmp_path, reference):
  logs = run_with_kills(tmp_path / "run", CASES[case])
  assert_matches_reference(tmp_path / "run", reference)
  for launch, step in ADOPTED[case].items():
    assert f"adopting checkpoint step {step}" in logs[launch], (launch, logs[launch][-3000:])


def test_repro_kill_after_finalised_saves_keeps_them(tmp_path, reference):
  """The reported failure: steps 4 and 8 finalised by Orbax, no commit marker written (the old
  code wrote markers only while no save was in flight). Killed right after the save of step 12
  started (Orbax had waited for step 8 to finish), every marker removed -> resume from 8."""
  workdir = tmp_path / "run"
  rc, _ = launch(workdir, "orbax_async", 3)
  assert rc == -9
  for marker in (workdir / "commits").glob("*.json"):
    marker.unlink()
  assert finalized(workdir) == [4, 8]
  rc, log = launch(workdir)
  assert rc == 0 and resumed_from(log) == 8, log[-3000:]
  assert "adopting checkpoint step 8" in log and "moving unusable checkpoint" not in log
  assert_matches_reference(workdir, reference)


def test_corrupt_step_is_quarantined_even_if_killed_while_moving_it(tmp_path, reference):
  """Step 8 committed, then truncated on disk: the relaunch resumes from 4 and moves 8 to
  quarantine/; killed between the move and the marker's removal, the next relaunch drops the
  stale marker and still resumes from 4."""
  workdir = tmp_path / "run"
  rc, _ = launch(workdir, "orbax_async", 3)  # steps 4 and 8 finished, 8 possibly unmarked
  assert rc == -9
  rc, _ = launch(workdir, "save", 1)  # adopts 8, dies at the next save
  assert rc == -9 and (workdir / "commits" / "8.json").exists()
  victim = max((p for p in (workdir / "checkpoints" / "8").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
  rc, log = launch(workdir, "quarantine", 1)
  assert rc == -9 and "corrupt" in log
  assert (workdir / "commits" / "8.json").exists() and not (workdir / "checkpoints" / "8").exists()
  rc, log = launch(workdir)
  assert rc == 0 and resumed_from(log) == 4, log[-3000:]
  assert_matches_reference(workdir, reference)


# ---- a failing save ----

def _cfg(**over):
  return load_config("configs/dense.py:tiny", **{**crash_child.OVERRIDES,
                                                  "train.async_checkpoint": False, **over})


def _fail_second_save(monkeypatch):
  real = Checkpointer.save
  calls = [0]

  def save(self, step, *a, **k):
    calls[0] += 1
    if calls[0] == 2:
      real_mngr_save = self.mngr.save

      def full(*a2, **k2):
        raise OSError(errno.ENOSPC, "No space left on device")
      self.mngr.save = full
      try:
        return real(self, step, *a, **k)
      finally:
        self.mngr.save = real_mngr_save
    return real(self, step, *a, **k)
  monkeypatch.setattr(Checkpointer, "save", save)


def test_disk_full_stops_with_one_line_and_keeps_checkpoints(tmp_path, monkeypatch,
                                                             default_dataset):
  _fail_second_save(monkeypatch)
  with pytest.raises(CheckpointError) as e:
    looplib.train_and_evaluate(_cfg(), tmp_path, devices=jax.devices()[:1])
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith("checkpoint save of step 8 failed: OSError: [Errno 28] No space left")
  assert "committed steps [4] are intact" in msg
  assert Checkpointer(tmp_path).committed_steps() == [4]
  monkeypatch.undo()
  result = looplib.train_and_evaluate(_cfg(), tmp_path, devices=jax.devices()[:1])
  assert result.step == crash_child.STEPS


def test_disk_full_warn_policy_keeps_training(tmp_path, monkeypatch, default_dataset, caplog):
  _fail_second_save(monkeypatch)
  with caplog.at_level(logging.ERROR):
    result = looplib.train_and_evaluate(_cfg(**{"train.on_save_error": "warn"}), tmp_path,
                                        devices=jax.devices()[:1])
  assert result.step == crash_child.STEPS
  assert "config.train.on_save_error='warn': training continues" in caplog.text
  assert Checkpointer(tmp_path).committed_steps() == [4, 12]
