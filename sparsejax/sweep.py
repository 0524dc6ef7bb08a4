"""Sweeps: a Python file defines ``runs(**args) -> list[Run]``; this module validates and lists
them, trains them here (one or N at a time) or hands them to a cluster, one workdir per run, and
leaves a ``record.json`` per run.

  python -m sparsejax.sweep FILE --root ROOT --dry_run [--tflops X | --calibrate]
  python -m sparsejax.sweep FILE --root ROOT [--arg budgets=2 --arg sizes=3] [--only NAME]
      [--parallel N] [--smooth_evals K]
  python -m sparsejax.sweep FILE --root ROOT --emit slurm --out DIR [--submit]
      [--slurm.partition=gpu --slurm.gpus-per-task=1 --slurm.time=04:00:00 --slurm.account=A]
      [--max_concurrent 8] [--python PATH]
  python -m sparsejax.sweep FILE --root ROOT --emit submitit --out DIR [--slurm.KEY=VALUE ...]
  python -m sparsejax.sweep FILE --root ROOT --emit tpu --tpu-name NAME --zone Z [--project P]
      [--tpu_repo DIR]

Each run trains in ``ROOT/<name>/`` via ``sparsejax.train.loop.train_and_evaluate``; in every mode
  * ``ROOT/<name>/record.json`` with status "done" and the same config hash -> skipped;
  * a workdir without a done record (interrupted, "failed", "incomplete") -> resumed from its
    checkpoints;
  * a record whose config hash differs from the current definition -> error (the name now means
    another experiment: use a new --root or delete that run's directory).
The config hash is the sha1 of the validated Config's JSON (``Config.to_json``). Run names are
``<family>-<sha1(base + sorted overrides)[:8]>`` unless a Run gives one; family is config.name.

--dry_run lists runs, parameters, FLOPs and, given a throughput, the estimated time
(total FLOPs / throughput): ``--tflops X`` (achieved TFLOP/s, analytic convention) or
``--calibrate`` (compile and time 3 train steps of each family's first run on this machine's
devices, with random tokens; the figure is applied to every run of the family).

--parallel N trains N runs at a time, each in its own process
(``python -m sparsejax.sweep FILE --root ROOT --only NAME <same --arg's>``) logging to
``ROOT/<name>/sweep.log``; a failed run is reported with its log path and the others go on; the
exit status is nonzero if any run did not finish. With N > 1 each process is pinned (``--cpus``,
``os.sched_setaffinity``, where the OS has it; no taskset needed) to its share of this process's
CPUs, so XLA sizes its thread pool to that share instead of N pools of every core; no XLA_FLAGS are
set. On a machine with NVIDIA GPUs (``CUDA_VISIBLE_DEVICES`` or ``nvidia-smi -L``) each process
also gets its share of the GPUs; on a TPU host use --parallel 1. Measured on a shared 2-core box
(load ~4.5 from other jobs), 2 dense-tiny runs of 300 steps, warm compile cache, 4 repeats: one
at a time 18.5-24.6 s, --parallel 2 pinned 13.0-17.5 s, unpinned 14.3-19.7 s.

The N-at-a-time and cluster modes live in sparsejax/sweep_launch.py, the step measurements
(XLA FLOPs, --calibrate) in sparsejax/scaling/measure.py.

--emit slurm writes ``DIR/runs.txt`` (the unfinished runs) and ``DIR/sweep.sbatch``, one array
task per run (``launch/sweep_slurm.sbatch.tmpl``; ``--slurm.KEY=VALUE`` -> ``#SBATCH
--KEY=VALUE``); ``--submit`` runs sbatch on it. ``--emit submitit`` submits the same commands
through submitit's AutoExecutor (optional dependency; one array job; ``--slurm.time`` in minutes
is required, other ``--slurm.KEY=VALUE`` -> ``slurm_KEY``). ``--emit tpu`` prints one
``gcloud compute tpus tpu-vm ssh NAME --worker=all --command 'cd REPO && python -m sparsejax.sweep
... --only RUN --distributed'`` per unfinished run, to run one after another on the pod; ROOT must
then be on storage every worker sees (records are written by process 0 only).

FLOPs: ``total_flops`` is analytic (6N + causal attention, sparsejax.scaling.flops); the loop also
records XLA's cost analysis of its compiled step (per device; XLA_FLOPS_CONVENTION). On the tiny
CPU presets XLA counts 1.12x (dense), 1.30x (moe), 1.26x (peer), 1.15x (memory) the analytic
figure: dense causal attention, MoE capacity padding and dispatch, key scoring, and elementwise
work (tests/test_sweep.py::test_xla_flops_agree_with_analytic). ``xla_flops_total`` sums devices,
so work every device repeats (a replicated optimizer update) counts once per device: 8-way data
parallel dense-tiny gives 1.08x the one-device figure.

Record keys (``ROOT/<name>/record.json``; ``load_records`` reads them all):
  name, run_id (name@config_hash[:12]), config_hash, family, base, overrides, seed, status
  ("running", "done", "incomplete" or "failed" with ``error``), steps, final_step, tokens,
  params_total, params_active_per_token, params_active_avg (see ``params_active_avg``),
  flops_per_token, total_flops, flops_convention (analytic, sparsejax.scaling.flops),
  xla_flops_per_step, xla_flops_devices, xla_flops_total (= per step x devices x steps),
  xla_flops_convention (XLA_FLOPS_CONVENTION),
  eval_loss (final), eval_loss_smoothed, eval_loss_smoothed_steps, eval_loss_smoothing (see
  ``smoothed_eval_loss``), eval_bits_per_byte, wall_s.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import importlib.util
import json
import os
import pathlib
import sys
import time
from typing import Any

from sparsejax.config import Config
from sparsejax.configs_loader import REPO_ROOT, load_config

RECORD = "record.json"
LOG = "sweep.log"
FLOPS_CONVENTION = "6N+attention (sparsejax.scaling.flops)"
XLA_FLOPS_CONVENTION = (
    "XLA cost_analysis of the compiled train step (gradient accumulation 1), per device: includes "
    "remat recomputation, masked attention entries computed densely, MoE capacity padding and "
    "dispatch, norms, softmax, loss and the optimizer update; excludes transcendentals (counted "
    "apart by XLA), gathers / scatters (0 FLOPs) and custom calls (cuDNN, Pallas kernels)")
SMOOTH_EVALS = 3
SLURM_TEMPLATE = REPO_ROOT / "launch" / "sweep_slurm.sbatch.tmpl"
_RECORD_KEYS = ("name", "config_hash", "family", "base", "overrides", "status")


class SweepError(RuntimeError):
  pass


@dataclasses.dataclass(frozen=True)
class Run:
  base: str                              # config spec, e.g. "configs/dense.py:tiny"
  overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # dotted keys
  name: str | None = None                # None: <family>-<short hash of base + overrides>


@dataclasses.dataclass
class Planned:
  """A Run resolved into a validated Config and its accounting."""
  run: Run
  name: str
  cfg: Config
  config_hash: str
  info: dict                             # sparsejax.info.describe(cfg)

  @property
  def family(self) -> str:
    return self.cfg.name

  @property
  def run_id(self) -> str:
    return f"{self.name}@{self.config_hash[:12]}"

  @property
  def tokens_per_step(self) -> int:
    return self.cfg.data.global_batch_size * self.cfg.data.seq_len

  @property
  def tokens(self) -> int:
    return self.cfg.train.steps * self.tokens_per_step

  @property
  def total_flops(self) -> float:
    return self.info["flops_per_token"] * self.tokens


def config_hash(cfg: Config) -> str:
  return hashlib.sha1(cfg.to_json().encode()).hexdigest()


def definition_hash(base: str, overrides: dict) -> str:
  text = json.dumps({"base": base, "overrides": sorted(overrides.items())}, sort_keys=True,
                    default=repr)
  return hashlib.sha1(text.encode()).hexdigest()[:8]


def load_sweep(path: str | os.PathLike, **args) -> list[Run]:
  """Import a sweep file and call its ``runs(**args)``."""
  p = pathlib.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"sweep file {path} not found")
  spec = importlib.util.spec_from_file_location(f"sparsejax_sweep_{p.stem}", p)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, "runs", None)):
    raise SweepError(f"{path}: defines no runs(**args) function")
  try:
    runs = list(module.runs(**args))
  except TypeError as e:
    raise SweepError(f"{path}: runs(**{args}): {e}") from e
  for r in runs:
    if not isinstance(r, Run):
      raise SweepError(f"{path}: runs() returned {r!r}, not a sparsejax.sweep.Run")
  return runs


def plan(runs: list[Run], only: str | None = None) -> list[Planned]:
  """Validate every run's Config (all before any training), check names are unique, and account
  for every run (or only the one named `only`)."""
  from sparsejax.info import describe
  resolved, seen = [], {}
  for r in runs:
    try:
      cfg = load_config(r.base, **dict(r.overrides))
    except Exception as e:
      raise SweepError(f"run {r.name or r.base} {dict(r.overrides)}: {e}") from e
    name = r.name or f"{cfg.name}-{definition_hash(r.base, dict(r.overrides))}"
    if name in seen:
      raise SweepError(f"two runs are named {name!r}: {seen[name]} and {r}")
    seen[name] = r
    resolved.append((r, name, cfg))
  if only is not None:
    resolved = [x for x in resolved if x[1] == only]
    if not resolved:
      raise SweepError(f"--only {only}: no such run in the sweep")
  return [Planned(r, name, cfg, config_hash(cfg), describe(cfg)) for r, name, cfg in resolved]


def _duration(seconds: float) -> str:
  if seconds < 90:
    return f"{seconds:.1f} s"
  if seconds < 90 * 60:
    return f"{seconds / 60:.1f} min"
  if seconds < 48 * 3600:
    return f"{seconds / 3600:.1f} h"
  return f"{seconds / 86400:.1f} d"


def _rate(tflops, family: str) -> float | None:
  return tflops.get(family) if isinstance(tflops, dict) else tflops


def table(planned: list[Planned], tflops: float | dict[str, float] | None = None) -> str:
  """The dry-run listing. `tflops`: achieved TFLOP/s (analytic convention) for an "est. time"
  column = total FLOPs / throughput, one number for every run or {family: number} (calibrate);
  None: no estimate."""
  header = ("name", "family", "params", "active", "FLOPs/token", "steps", "tokens",
            "total FLOPs") + (("est. time",) if tflops else ())
  rows = [header]
  for p in planned:
    row = (p.name, p.family, f"{p.info['params_total']:.3g}",
           f"{p.info['params_active_per_token']:.3g}", f"{p.info['flops_per_token']:.3g}",
           str(p.cfg.train.steps), f"{p.tokens:.3g}", f"{p.total_flops:.3g}")
    if tflops:
      rate = _rate(tflops, p.family)
      row += (_duration(p.total_flops / (rate * 1e12)) if rate else "?",)
    rows.append(row)
  widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
  total = sum(p.total_flops for p in planned)
  lines.append(f"{len(planned)} runs, {total:.3g} FLOPs in all ({FLOPS_CONVENTION})")
  if not tflops:
    lines.append("est. time: pass --tflops X (achieved TFLOP/s) or --calibrate")
  else:
    known = [p.total_flops / (_rate(tflops, p.family) * 1e12) for p in planned
             if _rate(tflops, p.family)]
    lines.append(f"est. time {_duration(sum(known))} run one after another (train steps only: "
                 f"compile, startup, evals and checkpoints not included)" +
                 ("" if len(known) == len(planned) else
                  f" ({len(planned) - len(known)} runs without a throughput)"))
  return "\n".join(lines)


def read_record(path: pathlib.Path) -> dict:
  """A record.json, checked; raises ValueError with the reason if malformed or partial."""
  try:
    rec = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"unreadable JSON: {e}") from e
  if not isinstance(rec, dict):
    raise ValueError(f"not a JSON object: {type(rec).__name__}")
  missing = [k for k in _RECORD_KEYS if k not in rec]
  if missing:
    raise ValueError(f"missing keys {missing}")
  return rec


def load_records(root: str | os.PathLike) -> tuple[list[dict], list[tuple[str, str]]]:
  """All ``ROOT/*/record.json``: (records, problems); problems are (file, reason) pairs."""
  records, problems = [], []
  for path in sorted(pathlib.Path(root).glob(f"*/{RECORD}")):
    try:
      records.append(read_record(path))
    except ValueError as e:
      problems.append((str(path), str(e)))
  return records, problems


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


def _write_record(workdir: pathlib.Path, rec: dict) -> None:
  tmp = workdir / (RECORD + ".tmp")
  tmp.write_text(json.dumps(rec, indent=1, sort_keys=True))
  os.replace(tmp, workdir / RECORD)


def params_active_avg(p: Planned) -> float:
  """Time-average over the run's steps of the active parameters per token. The count is a
  function of the Config alone and no Config field varies it with the step (MoE top_k and
  capacity, PEER / memory heads and top-k, the layer pattern are fixed for a run), so every step
  has ``params_active_per_token`` and this is that value; a schedule that changes it would average
  its per-step counts here. Nominal: tokens dropped by MoE capacity are not subtracted."""
  return float(p.info["params_active_per_token"])


def smoothed_eval_loss(workdir: str | os.PathLike, k: int = SMOOTH_EVALS
                       ) -> tuple[float | None, list[int]]:
  """Mean of the eval losses at the last `k` eval points of ``metrics.jsonl`` (the final eval
  included) and their steps; (None, []) if there was no eval. Eval points come from
  ``config.train.eval_every_steps`` plus the final eval: with only the final one this is the
  final loss. k > 1 lowers the noise of a single eval set at the price of a bias towards the
  earlier (higher) losses while the loss still falls; k = 1 is the final eval loss."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  evals: dict[int, float] = {}
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue
      if "eval/loss" in rec:
        evals[int(rec["step"])] = float(rec["eval/loss"])  # a re-run's eval replaces the old
  steps = sorted(evals)[-max(int(k), 1):]
  if not steps:
    return None, []
  return sum(evals[s] for s in steps) / len(steps), steps


def _base_record(p: Planned) -> dict:
  return {"name": p.name, "run_id": p.run_id, "config_hash": p.config_hash, "family": p.family,
          "base": p.run.base, "overrides": dict(p.run.overrides), "seed": p.cfg.train.seed,
          "params_total": p.info["params_total"],
          "params_active_per_token": p.info["params_active_per_token"],
          "params_active_avg": params_active_avg(p),
          "flops_per_token": p.info["flops_per_token"], "steps": p.cfg.train.steps,
          "tokens": p.tokens, "total_flops": p.total_flops, "flops_convention": FLOPS_CONVENTION}


# ----------------------------------------------------------------------------- sequential runs

def run_sweep(runs: list[Run], root: str | os.PathLike, devices: list | None = None,
              only: str | None = None, log=print, smooth_evals: int = SMOOTH_EVALS
              ) -> list[tuple[str, str]]:
  """Train every run (or only the one named `only`) in ROOT/<name>/; returns (name, status)
  with status "skipped" (done already), "done" or "incomplete" (stopped early). A run that
  raises gets a "failed" record (with its error) and the exception propagates."""
  import jax

  from sparsejax.train.loop import train_and_evaluate
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
      _write_record(workdir, {**rec, "status": "running"})
    try:
      result = train_and_evaluate(p.cfg, workdir, devices=devices)
    except Exception as e:
      if writes:
        error = (f"{type(e).__name__}: {e}".splitlines() or [""])[0][:500]
        _write_record(workdir, {**rec, "status": "failed", "error": error})
      raise
    ok = result.step == p.cfg.train.steps and not result.preempted
    ev = result.eval_metrics or {}
    rec.update(status="done" if ok else "incomplete", final_step=result.step,
               eval_loss=ev.get("loss"), eval_bits_per_byte=ev.get("bits_per_byte"))
    if writes:
      xla = result.xla_flops_per_step if p.cfg.train.grad_accum_steps == 1 else None
      if xla is None and ok:  # no step ran in this call, or accumulation (see xla_step_flops)
        vocab = json.loads((workdir / "run_info.json").read_text())["vocab_size"]
        from sparsejax.scaling.measure import xla_step_flops
        xla = xla_step_flops(p.cfg, devices, vocab)
      ndev = len(devices) if devices is not None else jax.device_count()
      smoothed, smoothed_steps = smoothed_eval_loss(workdir, smooth_evals)
      rec.update(eval_loss_smoothed=smoothed, eval_loss_smoothed_steps=smoothed_steps,
                 eval_loss_smoothing=f"mean of the last {smooth_evals} eval/loss in "
                                     f"metrics.jsonl",
                 xla_flops_per_step=xla, xla_flops_devices=ndev,
                 xla_flops_total=None if xla is None else xla * ndev * p.cfg.train.steps,
                 xla_flops_convention=XLA_FLOPS_CONVENTION, wall_s=time.perf_counter() - t0)
      _write_record(workdir, rec)
    else:
      rec["wall_s"] = time.perf_counter() - t0
    statuses.append((p.name, rec["status"]))
    log(f"  {p.name}: {rec['status']} step {result.step}, eval loss {rec['eval_loss']}, "
        f"{rec['wall_s']:.1f} s")
  return statuses


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text



# ----------------------------------------------------------------------------- command line

def _parse_args(entries: list[str]) -> dict:
  out = {}
  for e in entries:
    key, sep, value = e.partition("=")
    if not sep or not key:
      raise SweepError(f"--arg {e!r}: expected key=value")
    out[key] = _literal(value)
  return out


def _split_slurm(argv: list[str]) -> tuple[dict, list[str]]:
  """Pull ``--slurm.KEY=VALUE`` flags out of argv."""
  slurm, rest = {}, []
  for a in argv:
    if a.startswith("--slurm."):
      key, sep, value = a[len("--slurm."):].partition("=")
      if not sep or not key:
        raise SweepError(f"{a}: expected --slurm.KEY=VALUE, e.g. --slurm.partition=gpu")
      slurm[key] = value
    else:
      rest.append(a)
  return slurm, rest


def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m sparsejax.sweep", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("sweep", help="sweep file defining runs(**args) -> list[Run]")
  ap.add_argument("--root", required=True, help="directory holding one workdir per run")
  ap.add_argument("--arg", action="append", default=[], help="key=value passed to runs()")
  ap.add_argument("--dry_run", action="store_true", help="validate and list runs, train nothing")
  ap.add_argument("--tflops", type=float, default=None,
                  help="dry run: achieved TFLOP/s for the estimated-time column")
  ap.add_argument("--calibrate", action="store_true",
                  help="dry run: measure TFLOP/s on 3 steps of each family's first run")
  ap.add_argument("--only", default=None, help="run only the run with this name")
  ap.add_argument("--parallel", type=int, default=1, help="train N runs at a time (processes)")
  ap.add_argument("--smooth_evals", type=int, default=SMOOTH_EVALS,
                  help="eval_loss_smoothed = mean of the last K eval losses")
  ap.add_argument("--emit", choices=("slurm", "submitit", "tpu"), default=None,
                  help="hand the unfinished runs to a cluster instead of training here")
  ap.add_argument("--out", default=None, help="--emit slurm/submitit: directory for scripts")
  ap.add_argument("--submit", action="store_true", help="--emit slurm: run sbatch on the script")
  ap.add_argument("--max_concurrent", type=int, default=16,
                  help="--emit slurm/submitit: array tasks running at once")
  ap.add_argument("--python", default=None,
                  help="interpreter in emitted commands (default: this one; tpu: python)")
  ap.add_argument("--tpu_name", "--tpu-name", default=None, help="--emit tpu: TPU VM name")
  ap.add_argument("--zone", default=None, help="--emit tpu: its zone")
  ap.add_argument("--project", default=None, help="--emit tpu: its GCP project")
  ap.add_argument("--tpu_repo", default=None,
                  help="--emit tpu: this repository's path on the workers (default: the local one)")
  ap.add_argument("--distributed", action="store_true",
                  help="call jax.distributed.initialize() first (multi-host, e.g. TPU pods)")
  ap.add_argument("--cpus", default=None, help="pin this process to these CPUs (e.g. 0,1)")
  return ap


def _check_flags(a, slurm: dict) -> None:
  if a.emit and (a.dry_run or a.parallel != 1):
    raise SweepError("--emit: not with --dry_run or --parallel (the cluster runs the runs)")
  if (a.tflops is not None or a.calibrate) and not a.dry_run:
    raise SweepError("--tflops / --calibrate: only with --dry_run")
  if a.tflops is not None and a.tflops <= 0:
    raise SweepError(f"--tflops {a.tflops}: must be positive")
  if a.dry_run and a.parallel != 1:
    raise SweepError("--parallel: not with --dry_run")
  if a.emit in ("slurm", "submitit") and not a.out:
    raise SweepError(f"--emit {a.emit}: needs --out DIR for its scripts and logs")
  if slurm and a.emit not in ("slurm", "submitit"):
    raise SweepError("--slurm.KEY=VALUE: only with --emit slurm or --emit submitit")
  if a.submit and a.emit != "slurm":
    raise SweepError("--submit: only with --emit slurm (--emit submitit submits itself)")
  if a.emit == "tpu" and not (a.tpu_name and a.zone):
    raise SweepError("--emit tpu: needs --tpu-name NAME and --zone ZONE")
  if a.smooth_evals < 1:
    raise SweepError(f"--smooth_evals {a.smooth_evals}: must be at least 1")


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    slurm, argv = _split_slurm(argv)
  except SweepError as e:
    print(f"sparsejax.sweep: error: {e}", file=sys.stderr)
    return 2
  a = _parser().parse_args(argv)
  try:
    _check_flags(a, slurm)
    if a.cpus:  # before JAX creates its thread pools
      if not hasattr(os, "sched_setaffinity"):
        raise SweepError("--cpus: this OS cannot pin a process (no os.sched_setaffinity)")
      os.sched_setaffinity(0, {int(c) for c in a.cpus.split(",")})
    import jax
    if a.emit or a.parallel > 1:  # this process only plans: leave the accelerators to the runs
      jax.config.update("jax_platforms", "cpu")
    if a.distributed:
      jax.distributed.initialize()
    args = _parse_args(a.arg)
    runs = load_sweep(a.sweep, **args)
    extra = [] if a.smooth_evals == SMOOTH_EVALS else ["--smooth_evals", str(a.smooth_evals)]
    from sparsejax import sweep_launch as launch
    if a.dry_run:
      planned = plan(runs, only=a.only)
      if a.calibrate:
        from sparsejax.scaling.measure import calibrate
        tflops = calibrate(planned)
      else:
        tflops = a.tflops
      print(table(planned, tflops))
      return 0
    if a.emit:
      pending = unfinished(plan(runs, only=a.only), a.root)
      if not pending:
        print(f"every run is done already in {a.root}: nothing to {a.emit}")
        return 0
      if a.emit == "slurm":
        script = launch.emit_slurm(pending, a.sweep, a.root, a.out, args, slurm, a.max_concurrent,
                            a.python, extra)
        print(f"wrote {script} and {script.parent / 'runs.txt'} ({len(pending)} runs)")
        if a.submit:
          print(launch.submit_slurm(script))
        else:
          print(f"submit with: sbatch {script}")
      elif a.emit == "submitit":
        for name, job in launch.submit_submitit(pending, a.sweep, a.root, a.out, args,
                                         {k: _literal(v) for k, v in slurm.items()},
                                         a.max_concurrent, a.python, extra):
          print(f"{name}: job {job}")
      else:
        print("\n".join(launch.tpu_commands(pending, a.sweep, a.root, a.tpu_name, a.zone, a.project,
                                     args, a.tpu_repo, a.python or "python", extra)))
      return 0
    if a.parallel > 1:
      statuses = launch.run_parallel(a.sweep, a.root, a.parallel, args, a.only,
                              smooth_evals=a.smooth_evals)
    else:
      statuses = run_sweep(runs, a.root, only=a.only, smooth_evals=a.smooth_evals)
  except (SweepError, FileNotFoundError, ValueError) as e:
    print(f"sparsejax.sweep: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("sparsejax.sweep: interrupted; re-run the same command to resume", file=sys.stderr)
    return 130
  done = sum(s in ("done", "skipped") for _, s in statuses)
  failed = [n for n, s in statuses if s == "failed"]
  print(f"{done}/{len(statuses)} runs done in {a.root}" +
        (f"; failed: {', '.join(failed)}" if failed else ""))
  return 0 if done == len(statuses) else 1


if __name__ == "__main__":
  # Run the importable module's main, so sweep files' `from sparsejax.sweep import Run` is the
  # same class as the one checked here (not a copy in __main__).
  from sparsejax import sweep as _sweep
  sys.exit(_sweep.main())
