"""Weight sparsity through the whole run: the masks live in the optimizer state, so a run
stopped mid-schedule and resumed from its Orbax checkpoint is bitwise the uninterrupted one; the
sweep record gets the sparse counts; ``sparsejax sparsity`` reports a checkpoint's densities and
N:M pattern (exit 1 when a pattern is broken)."""

import json

import jax
import numpy as np
import pytest

from sparsejax.configure import load_config
from sparsejax.eval import sparsity_check
from sparsejax.scaling.records import last_metrics_with
from sparsejax.sparsity import masks, summary
from sparsejax.train import loop as looplib
from sparsejax.train.state import model_spec

BASE = {"train.steps": 12, "train.checkpoint_every_steps": 6, "train.log_every_steps": 3,
        "train.eval_every_steps": 0, "train.progress_bar": False, "model.d_model": 32,
        "data.seq_len": 64, "data.global_batch_size": 4, "optim.warmup_steps": 2}
GMP = {"sparsity.method": "gmp", "sparsity.sparsity": 0.75, "sparsity.update_every": 2}


def _cfg(**over):
  return load_config("configs/dense.py:tiny", **{**BASE, **over})


def _losses(workdir):
  return [r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
          if "loss" in r]


@pytest.mark.slow
def test_gmp_resume_mid_schedule_is_bitwise_and_the_checkpoint_reports_it(tmp_path,
                                                                          default_dataset):
  one = jax.devices()[:1]
  full = looplib.train_and_evaluate(_cfg(**GMP), tmp_path / "full", devices=one)
  looplib.train_and_evaluate(_cfg(**GMP, **{"train.stop_at_step": 6}), tmp_path / "cut",
                             devices=one)   # stops between pruning steps 3..9
  cut = looplib.train_and_evaluate(_cfg(**GMP), tmp_path / "cut", devices=one)
  assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")
  a = sparsity_check.report(str(tmp_path / "full"))
  b = sparsity_check.report(str(tmp_path / "cut"))
  assert a == {**b, "workdir": a["workdir"]}
  assert a["method"] == "gmp" and a["weight_sparsity"] == pytest.approx(0.75, abs=1e-3)
  dense = {k: v for k, v in a["params"].items() if not v.get("target")}
  assert all(v["density"] > 0.99 for v in dense.values())          # embeddings, norms
  assert a["params_nonzero"] == a["params_total"] - (a["targets_total"] - a["targets_nonzero"])
  # the sweep record's sparse counts from the logged metrics
  cfg = _cfg(**GMP)
  rec = summary.record_fields(cfg, model_spec(cfg, 257), last_metrics_with(
      tmp_path / "full", "sparsity/weight_sparsity"), flops_per_token=1e6, tokens=1e5)
  pruned = a["targets_total"] - a["targets_nonzero"]
  assert rec["params_pruned_final"] == pruned
  assert rec["weight_sparsity"] == pytest.approx(0.75, abs=1e-3)
  # cubic over [3, 9] every 2 steps: the mean over 12 steps is well below the final count
  assert 0.3 * pruned < rec["params_pruned_mean"] < 0.7 * pruned
  assert rec["flops_per_token_sparse"] == 1e6 - 6 * pruned
  assert full.step == cut.step == 12


def test_sparsity_command_checks_the_nm_pattern(tmp_path, default_dataset, capsys):
  cfg = _cfg(**{"sparsity.method": "nm", "train.steps": 3, "train.checkpoint_every_steps": 3})
  looplib.train_and_evaluate(cfg, tmp_path, devices=jax.devices()[:1])
  assert sparsity_check.main(["--workdir", str(tmp_path)]) == 0
  rep = json.loads(capsys.readouterr().out)
  assert rep["pattern"] == "2:4" and rep["nm_ok"] is True
  targets = {k: v for k, v in rep["params"].items() if v.get("target")}
  assert len(targets) == 14 and all(v["nm_ok"] and v["density"] == 0.5 for v in targets.values())
  # the pattern check fails on a weight that breaks it (the checker, not the training)
  assert not bool(masks.nm_satisfied(np.ones((8, 4), np.float32), 2, 4, 0))
  assert sparsity_check.main(["--workdir", str(tmp_path / "missing")]) == 2
