"""Sweeps: dry-run accounting, run + record, skip when done, resume when interrupted, a changed
definition under an old name, malformed records."""

import json
import pathlib

import jax
import pytest

from sparsejax import sweep
from sparsejax.configs_loader import load_config
from sparsejax.train.loop import train_and_evaluate

REPO = pathlib.Path(__file__).resolve().parent.parent

SWEEP = '''
from sparsejax.sweep import Run

def runs(steps=3, lr=3e-3):
  common = {{"train.steps": steps, "train.eval_every_steps": 0, "train.log_every_steps": 1,
            "train.checkpoint_every_steps": 0, "train.progress_bar": False,
            "train.async_checkpoint": False, "optim.lr": lr}}
  return [Run("configs/dense.py:tiny", {{**common, "train.seed": 0}}),
          Run("configs/dense.py:tiny", {{**common, "train.seed": 1}}, name="{name}")]
'''


@pytest.fixture
def sweep_file(tmp_path):
  p = tmp_path / "two.py"
  p.write_text(SWEEP.format(name="second"))
  return p


def test_dry_run_lists_every_run_with_flops(capsys):
  assert sweep.main([str(REPO / "experiments/isoflop_tiny.py"), "--root", "unused",
                     "--dry_run", "--arg", "budgets=2", "--arg", "sizes=2"]) == 0
  out = capsys.readouterr().out
  runs = sweep.load_sweep(REPO / "experiments/isoflop_tiny.py", budgets=2, sizes=2)
  assert len(runs) == 4 * 2 * 2
  for r in runs:
    assert r.name in out
  planned = sweep.plan(runs)
  for p in planned:
    assert p.info["flops_per_token"] > 0 and p.total_flops > 0
    assert p.tokens == p.cfg.train.steps * 8 * 64
  # iso-FLOP: within a family and budget, total FLOPs agree to within one step's worth
  by = {}
  for p in planned:
    by.setdefault((p.family, p.name[-2:]), []).append(p.total_flops)
  for flops in by.values():
    assert max(flops) / min(flops) < 1.2, flops


def test_default_names_are_deterministic(sweep_file):
  a = sweep.plan(sweep.load_sweep(sweep_file))
  b = sweep.plan(sweep.load_sweep(sweep_file))
  assert [p.name for p in a] == [p.name for p in b]
  assert a[0].name.startswith("dense-tiny-") and a[1].name == "second"
  assert a[0].config_hash != a[1].config_hash


def test_run_skip_resume_and_changed_definition(tmp_path, sweep_file, default_dataset):
  root = tmp_path / "root"
  devices = jax.devices()[:1]
  runs = sweep.load_sweep(sweep_file)
  first = sweep.plan(runs)[0].name

  # An interrupted run: the first run trained to step 2 only, no record.
  cfg = load_config(runs[0].base, **{**runs[0].overrides, "train.stop_at_step": 2})
  assert train_and_evaluate(cfg, root / first, devices=devices).step == 2

  statuses = sweep.run_sweep(runs, root, devices=devices)
  assert statuses == [(first, "done"), ("second", "done")]
  records, problems = sweep.load_records(root)
  assert problems == [] and len(records) == 2
  for rec in records:
    assert rec["status"] == "done" and rec["final_step"] == 3
    assert rec["tokens"] == 3 * 8 * 64 and rec["total_flops"] > 0
    assert rec["eval_loss"] > 0 and rec["eval_bits_per_byte"] > 0
    assert rec["flops_convention"] == "6N+attention (sparsejax.scaling.flops)"
    assert rec["family"] == "dense-tiny" and rec["wall_s"] > 0
  assert {r["seed"] for r in records} == {0, 1}
  # The interrupted run resumed from step 2 rather than restarting: one loss per step.
  lines = (root / first / "metrics.jsonl").read_text().splitlines()
  steps = [r["step"] for r in map(json.loads, lines) if "loss" in r]
  assert steps == [1, 2, 3]

  # Again: both skipped, records untouched.
  mtimes = [(root / n / "record.json").stat().st_mtime_ns for n in (first, "second")]
  assert sweep.run_sweep(runs, root, devices=devices) == [(first, "skipped"),
                                                          ("second", "skipped")]
  assert mtimes == [(root / n / "record.json").stat().st_mtime_ns for n in (first, "second")]

  # Same name, different definition: a clear error before anything trains.
  changed = sweep.load_sweep(sweep_file, lr=1e-3)
  with pytest.raises(sweep.SweepError, match="new --root or delete"):
    sweep.run_sweep(changed, root, devices=devices)


def test_load_records_reports_malformed(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "record.json").write_text('{"name": "a", "status": "do')
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "record.json").write_text('{"name": "b"}')
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "record.json").write_text(json.dumps(
      {"name": "c", "config_hash": "x", "family": "f", "base": "b", "overrides": {},
       "status": "done"}))
  records, problems = sweep.load_records(tmp_path)
  assert [r["name"] for r in records] == ["c"]
  reasons = dict(problems)
  assert "unreadable JSON" in reasons[str(tmp_path / "a" / "record.json")]
  assert "missing keys" in reasons[str(tmp_path / "b" / "record.json")]


def test_malformed_record_in_sweep_is_an_error(tmp_path, sweep_file):
  (tmp_path / "root" / "second").mkdir(parents=True)
  (tmp_path / "root" / "second" / "record.json").write_text("not json")
  with pytest.raises(sweep.SweepError, match="unreadable JSON"):
    sweep.run_sweep(sweep.load_sweep(sweep_file), tmp_path / "root",
                    devices=jax.devices()[:1])
