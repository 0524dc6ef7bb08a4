"""Training a sweep's runs one after another in this process, with skip / resume, and the
record.json each run leaves; ``child_command`` is the command line that trains one run this way,
which every other mode (--parallel N, SLURM, submitit, TPU) runs.

In every mode
  * ``ROOT/<name>/record.json`` with status "done" and the same config hash -> skipped;
  * a workdir without a done record (interrupted, "failed", "incomplete") -> resumed from its
    checkpoints;
  * a record whose config hash differs from the current definition -> error (the name now means
    another experiment: use a new --root or delete that run's directory).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

import jax

from sparsejax.scaling.measure import xla_step_flops
from sparsejax.sparsity import summary
from sparsejax.train.loop import train_and_evaluate
from sparsejax.train.state import model_spec
from sparsejax.sweep.planning import Planned, Run, SweepError, arg_flags, moe_fields, plan
from sparsejax.scaling.records import (FLOPS_CONVENTION, RECORD, SMOOTH_EVALS,
                                     XLA_FLOPS_CONVENTION, last_metrics_with, read_record,
                                     smoothed_eval_loss, write_record)


def check_existing(planned: list[Planned], root: str | os.PathLike) -> dict[str, dict]:
  """The records already under ROOT for these runs, by name; SweepError if one is malformed or
  was made by another definition of the same name (checked before anything trains)."""
  root, existing = pathlib.Path(root), {}
  for p in planned:
    path = root / p.name / RECORD
    if not path.exists():
      continue
    try:
      rec = read_record(path)
    except ValueError as e:
      raise SweepError(f"{path}: {e}; delete it (the run resumes from its checkpoints)") from e
    if rec["config_hash"] != p.config_hash:
      raise SweepError(
          f"{path}: run {p.name!r} was recorded with config hash {rec['config_hash']}, but its "
          f"definition now gives {p.config_hash}; use a new --root or delete {root / p.name}")
    existing[p.name] = rec
  return existing


def unfinished(planned: list[Planned], root: str | os.PathLike) -> list[Planned]:
  """The runs without a done record (after check_existing)."""
  existing = check_existing(planned, root)
  return [p for p in planned if existing.get(p.name, {}).get("status") != "done"]


def params_active_avg(p: Planned) -> float:
  """Time-average over the run's steps of the active parameters per token. The count is a
  function of the Config alone and no Config field varies it with the step (MoE top_k and
  capacity, PEER / memory heads and top-k, the layer pattern are fixed for a run), so every step
  has ``params_active_per_token`` and this is that value; a schedule that changes it would average
  its per-step counts here. Nominal: tokens dropped by MoE capacity are not subtracted."""
  return float(p.info["params_active_per_token"])


def _base_record(p: Planned) -> dict:
  """The record's keys known before training (sparsejax.scaling.records lists them all): both N
  counts at the true vocabulary (sparsejax.models.accounting) and the resolved Config's MoE
  granularity / experts / top_k (``planning.moe_fields``)."""
  return {"name": p.name, "run_id": p.run_id, "config_hash": p.config_hash, "family": p.family,
          "base": p.run.base, "overrides": dict(p.run.overrides), "seed": p.cfg.train.seed,
          "params_total": p.info["params_total"],
          "params_active_per_token": p.info["params_active_per_token"],
          "params_active_total": p.info["params_active_total"],
          "params_active_non_embedding": p.info["params_active_non_embedding"],
          "vocab_size": int(p.info["vocab_size"]), "vocab_rows": int(p.info["vocab_rows"]),
          "params_active_avg": params_active_avg(p), **moe_fields(p.cfg),
          "flops_per_token": p.info["flops_per_token"], "steps": p.cfg.train.steps,
          "tokens": p.tokens, "total_flops": p.total_flops, "flops_convention": FLOPS_CONVENTION}


def child_command(sweep_file, root, name: str, args: dict | None = None,
                  python: str | None = None, extra: list[str] = ()) -> list[str]:
  """``python -m sparsejax.sweep FILE --root ROOT --only NAME <--arg ...>``: one run, trained by
  run_sweep in its own process."""
  return [python or sys.executable, "-m", "sparsejax.sweep", str(sweep_file), "--root",
          str(root), "--only", name, *arg_flags(args), *extra]


def run_sweep(runs: list[Run], root: str | os.PathLike, devices: list | None = None,
              only: str | None = None, log=print, smooth_evals: int = SMOOTH_EVALS
              ) -> list[tuple[str, str]]:
  """Train every run (or only the one named `only`) in ROOT/<name>/; returns (name, status)
  with status "skipped" (done already), "done" or "incomplete" (stopped early). A run that
  raises gets a "failed" record (with its error) and the exception propagates."""
  planned = plan(runs, only=only)
  root = pathlib.Path(root)
  existing = check_existing(planned, root)
  writes = jax.process_index() == 0
  statuses = []
  for i, p in enumerate(planned):
    if existing.get(p.name, {}).get("status") == "done":
      log(f"[{i + 1}/{len(planned)}] {p.name}: done already, skipped")
      statuses.append((p.name, "skipped"))
      continue
    workdir = root / p.name
    log(f"[{i + 1}/{len(planned)}] {p.name}: "
        f"{'resuming' if (workdir / 'checkpoints').exists() else 'training'} "
        f"({p.cfg.train.steps} steps, {p.total_flops:.3g} FLOPs)")
    workdir.mkdir(parents=True, exist_ok=True)
    rec = _base_record(p)
    t0 = time.perf_counter()
    if writes:
      write_record(workdir, {**rec, "status": "running"})
    try:
      result = train_and_evaluate(p.cfg, workdir, devices=devices)
    except Exception as e:
      if writes:
        error = (f"{type(e).__name__}: {e}".splitlines() or [""])[0][:500]
        write_record(workdir, {**rec, "status": "failed", "error": error})
      raise
    ok = result.step == p.cfg.train.steps and not result.preempted
    ev = result.eval_metrics or {}
    rec.update(status="done" if ok else "incomplete", final_step=result.step,
               eval_loss=ev.get("loss"), eval_bits_per_byte=ev.get("bits_per_byte"))
    if writes:
      xla = result.xla_flops_per_step if p.cfg.train.grad_accum_steps == 1 else None
      if xla is None and ok:  # no step ran in this call, or accumulation (see xla_step_flops)
        vocab = json.loads((workdir / "run_info.json").read_text())["vocab_size"]
        xla = xla_step_flops(p.cfg, devices, vocab)
      ndev = len(devices) if devices is not None else jax.device_count()
      smoothed, smoothed_steps = smoothed_eval_loss(workdir, smooth_evals)
      rec.update(eval_loss_smoothed=smoothed, eval_loss_smoothed_steps=smoothed_steps,
                 eval_loss_smoothing=f"mean of the last {smooth_evals} eval/loss in "
                                     f"metrics.jsonl",
                 xla_flops_per_step=xla, xla_flops_devices=ndev,
                 xla_flops_total=None if xla is None else xla * ndev * p.cfg.train.steps,
                 xla_flops_convention=XLA_FLOPS_CONVENTION, wall_s=time.perf_counter() - t0)
      rec["sparsity_method"] = p.cfg.sparsity.method
      if p.cfg.sparsity.method != "none":  # weight-sparse: counts from the last logged metrics
        rec.update(summary.record_fields(
            p.cfg, model_spec(p.cfg, int(p.info["vocab_rows"])),
            last_metrics_with(workdir, "sparsity/weight_sparsity"), rec["flops_per_token"],
            rec["tokens"]))
      write_record(workdir, rec)
    else:
      rec["wall_s"] = time.perf_counter() - t0
    statuses.append((p.name, rec["status"]))
    log(f"  {p.name}: {rec['status']} step {result.step}, eval loss {rec['eval_loss']}, "
        f"{rec['wall_s']:.1f} s")
  return statuses
