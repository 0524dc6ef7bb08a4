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

The sequential runner lives in sparsejax/sweep/runner.py, the N-at-a-time mode in
sparsejax/sweep/parallel.py, the cluster modes in sparsejax/sweep/emit.py, the records in
sparsejax/scaling/records.py and the step measurements (XLA FLOPs, --calibrate) in
sparsejax/scaling/measure.py.

--emit slurm writes ``DIR/runs.txt`` (the unfinished runs) and ``DIR/sweep.sbatch``, one array
task per run (``launch/sweep_slurm.sbatch.tmpl``; ``--slurm.KEY=VALUE`` -> ``#SBATCH
--KEY=VALUE``); ``--submit`` runs sbatch on it. ``--emit submitit`` submits the same commands
through submitit's AutoExecutor (optional dependency; one array job; ``--slurm.time`` in minutes
is required, other ``--slurm.KEY=VALUE`` -> ``slurm_KEY``). ``--emit tpu`` prints one
``gcloud compute tpus tpu-vm ssh NAME --worker=all --command 'cd REPO && python -m sparsejax.sweep
... --only RUN --distributed'`` per unfinished run, to run one after another on the pod; ROOT must
then be on storage every worker sees (records are written by process 0 only).

FLOPs: ``total_flops`` is analytic (6N + causal attention, sparsejax.models.accounting); the loop also
records XLA's cost analysis of its compiled step (per device; XLA_FLOPS_CONVENTION). On the tiny
CPU presets XLA counts 1.12x (dense), 1.30x (moe), 1.26x (peer), 1.15x (memory) the analytic
figure: dense causal attention, MoE capacity padding and dispatch, key scoring, and elementwise
work (tests/test_sweep.py::test_xla_flops_agree_with_analytic). ``xla_flops_total`` sums devices,
so work every device repeats (a replicated optimizer update) counts once per device: 8-way data
parallel dense-tiny gives 1.08x the one-device figure.

Record keys (``ROOT/<name>/record.json``; ``load_records`` reads them all; the full list with
their meaning is in sparsejax/scaling/records.py):
  name, run_id (name@config_hash[:12]), config_hash, family, base, overrides, seed, status
  ("running", "done", "incomplete" or "failed" with ``error``), steps, final_step, tokens,
  params_total, params_active_total and params_active_non_embedding (the two N of the fits, head
  at the true vocabulary), params_active_per_token (head at the padded rows), vocab_size,
  vocab_rows, params_active_avg (see ``params_active_avg``), granularity, num_experts, top_k
  (the resolved Config's config.moe values; None without an MoE layer), flops_per_token,
  total_flops, flops_convention (analytic, sparsejax.models.accounting),
  xla_flops_per_step, xla_flops_devices, xla_flops_total (= per step x devices x steps),
  xla_flops_convention (XLA_FLOPS_CONVENTION),
  eval_loss (final), eval_loss_smoothed, eval_loss_smoothed_steps, eval_loss_smoothing (see
  ``smoothed_eval_loss``), eval_bits_per_byte, wall_s.
"""

from __future__ import annotations

import argparse
import os
import sys

from sparsejax.scaling.measure import calibrate
from sparsejax.sweep.emit import emit_slurm, submit_slurm, submit_submitit, tpu_commands
from sparsejax.sweep.parallel import run_parallel
from sparsejax.sweep.planning import SweepError, _literal, load_sweep, plan, table
from sparsejax.scaling.records import SMOOTH_EVALS
from sparsejax.sweep.runner import run_sweep, unfinished


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
    if a.dry_run:
      planned = plan(runs, only=a.only)
      if a.calibrate:
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
        script = emit_slurm(pending, a.sweep, a.root, a.out, args, slurm, a.max_concurrent,
                            a.python, extra)
        print(f"wrote {script} and {script.parent / 'runs.txt'} ({len(pending)} runs)")
        if a.submit:
          print(submit_slurm(script))
        else:
          print(f"submit with: sbatch {script}")
      elif a.emit == "submitit":
        for name, job in submit_submitit(pending, a.sweep, a.root, a.out, args,
                                         {k: _literal(v) for k, v in slurm.items()},
                                         a.max_concurrent, a.python, extra):
          print(f"{name}: job {job}")
      else:
        print("\n".join(tpu_commands(pending, a.sweep, a.root, a.tpu_name, a.zone, a.project,
                                     args, a.tpu_repo, a.python or "python", extra)))
      return 0
    if a.parallel > 1:
      statuses = run_parallel(a.sweep, a.root, a.parallel, args, a.only,
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
