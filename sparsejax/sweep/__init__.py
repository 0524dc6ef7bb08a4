"""Scaling-law sweeps: ``python -m sparsejax.sweep FILE --root ROOT ...`` (flags and semantics in
sparsejax/sweep/cli.py). Modules, each importing only those before it:

  planning  sweep files (runs(**args) -> [Run]), Run, Planned, load_sweep, plan, hashes, the
            dry-run table (not plan.py: the package re-exports the function plan)
  runner    sequential run_sweep with skip / resume, check_existing, unfinished, child_command
  parallel  --parallel N: one process per run, pinned CPU / GPU shares
  emit      --emit slurm | submitit | tpu
  cli       argument parsing and main(); __main__ runs it

Run records (ROOT/<name>/record.json) are read and written by sparsejax.scaling.records (no jax),
which the fit CLI (python -m sparsejax.scaling.analyze) reads without importing this package.
"""

from sparsejax.scaling.records import (FLOPS_CONVENTION, LOG, RECORD, SMOOTH_EVALS,
                                       XLA_FLOPS_CONVENTION, load_records, read_record,
                                       smoothed_eval_loss, write_record)
from sparsejax.sweep.cli import main
from sparsejax.sweep.emit import (SLURM_TEMPLATE, emit_slurm, submit_slurm, submit_submitit,
                                  tpu_commands)
from sparsejax.sweep.parallel import run_parallel, worker_slots
from sparsejax.sweep.planning import (Planned, Run, SweepError, arg_flags, config_hash,
                                      definition_hash, load_sweep, plan, table)
from sparsejax.sweep.runner import (check_existing, child_command, params_active_avg, run_sweep,
                                    unfinished)

__all__ = ["FLOPS_CONVENTION", "LOG", "RECORD", "SLURM_TEMPLATE", "SMOOTH_EVALS",
           "XLA_FLOPS_CONVENTION", "Planned", "Run", "SweepError", "arg_flags",
           "check_existing", "child_command", "config_hash", "definition_hash", "emit_slurm",
           "load_records", "load_sweep", "main", "params_active_avg", "plan", "read_record",
           "run_parallel", "run_sweep", "smoothed_eval_loss", "submit_slurm", "submit_submitit",
           "table", "tpu_commands", "unfinished", "worker_slots", "write_record"]
