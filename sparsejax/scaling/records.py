"""A sweep's ``ROOT/<name>/record.json`` files: reading, writing, the smoothed eval loss, and the
constants they share. Standard library only (no jax, flax, optax, nor a module that imports
them), so ``python -m sparsejax.scaling.analyze`` reads records without loading the training
stack.

Record keys (written by sparsejax.sweep.runner; ``load_records`` reads them all):
  name, run_id (name@config_hash[:12]), config_hash, family, base, overrides, seed, status
  ("running", "done", "incomplete" or "failed" with ``error``), steps, final_step, tokens,
  params_total (stored weights, padded vocabulary rows included),
  params_active_total (Chinchilla-style N: active matmul weights, output head at the true
  vocabulary), params_active_non_embedding (Kaplan-style N: the same without the head),
  params_active_per_token (active matmul weights, head at the padded rows: the N of records
  written before the two above; sparsejax.models.accounting), vocab_size (true), vocab_rows
  (padded), params_active_avg (see ``sparsejax.sweep.runner.params_active_avg``), granularity,
  num_experts, top_k (the resolved Config's ``config.moe`` values when a layer is MoE, None
  otherwise), flops_per_token, total_flops, flops_convention
  (analytic, sparsejax.models.accounting), xla_flops_per_step, xla_flops_devices, xla_flops_total
  (= per step x devices x steps), xla_flops_convention (XLA_FLOPS_CONVENTION), eval_loss
  (final), eval_loss_smoothed, eval_loss_smoothed_steps, eval_loss_smoothing (see
  ``smoothed_eval_loss``), eval_bits_per_byte, wall_s.

Weight sparsity (issue 13; ``SPARSITY_KEYS``, absent from older records):
  sparsity_method  config.sparsity.method ("none" for ordinary runs; a sparsity sweep's dense
                   baseline is "gmp" at sparsity 0);
  weight_sparsity  the final fraction of pruned weights among the TARGETED weights, in [0, 1),
                   written only when sparsity_method != "none" (0.0 for that dense baseline). It
                   marks a weight-sparse run: the Frantar et al. and average-parameter laws are
                   fitted on those only (MoE / memory / PEER conditional computation is not
                   weight sparsity; such runs never write it);
  params_pruned_final, params_pruned_mean
                   pruned weights at the end / averaged over all training steps, each weighted by
                   the share of it one token uses (MoE experts k/E): ``params_active_total -
                   params_pruned_final`` is the non-zero N (Frantar's N) and ``params_active_total
                   - params_pruned_mean`` the average N̄ ("The Journey Matters", 2024); the same
                   subtraction holds for params_active_non_embedding (pruned weights are never in
                   the head). 0 or absent for ordinary runs;
  flops_per_token_sparse, total_flops_sparse
                   training FLOPs per token counting only the non-zero weights (at the end), and
                   that x tokens; flops_per_token / total_flops stay dense-equivalent.

Only ``_RECORD_KEYS`` are required: records written before a key existed still load (``NEW_KEYS``
and ``SPARSITY_KEYS`` say since when; the fit CLI notes which records lack them). Where present,
``NUMBER_KEYS`` must be numbers or null, ``STRING_KEYS`` strings or null.
"""

from __future__ import annotations

import json
import os
import pathlib

RECORD = "record.json"
LOG = "sweep.log"
FLOPS_CONVENTION = "6N+attention (sparsejax.models.accounting)"
XLA_FLOPS_CONVENTION = (
    "XLA cost_analysis of the compiled train step (gradient accumulation 1), per device: includes "
    "remat recomputation, masked attention entries computed densely, MoE capacity padding and "
    "dispatch, norms, softmax, loss and the optimizer update; excludes transcendentals (counted "
    "apart by XLA), gathers / scatters (0 FLOPs) and custom calls (cuDNN, Pallas kernels)")
SMOOTH_EVALS = 3
_RECORD_KEYS = ("name", "config_hash", "family", "base", "overrides", "status")
# Keys added with issue 12 part 5 (N at the true vocabulary, granularity from the resolved
# Config); older records lack them.
NEW_KEYS = ("params_active_total", "params_active_non_embedding", "vocab_size", "vocab_rows",
            "granularity", "num_experts", "top_k")
# Keys added with issue 13 (weight sparsity); older records lack them.
SPARSITY_KEYS = ("sparsity_method", "weight_sparsity", "params_pruned_final", "params_pruned_mean",
                 "flops_per_token_sparse", "total_flops_sparse")
NUMBER_KEYS = ("params_total", "params_active_per_token", "params_active_total",
               "params_active_non_embedding", "granularity", "num_experts", "top_k",
               "weight_sparsity", "params_pruned_final", "params_pruned_mean",
               "flops_per_token_sparse", "total_flops_sparse")
STRING_KEYS = ("sparsity_method",)


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
  for k in NUMBER_KEYS:
    v = rec.get(k)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
      raise ValueError(f"{k} is {v!r}, not a number or null")
  for k in STRING_KEYS:
    v = rec.get(k)
    if v is not None and not isinstance(v, str):
      raise ValueError(f"{k} is {v!r}, not a string or null")
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


def write_record(workdir: pathlib.Path, rec: dict) -> None:
  """Write ``WORKDIR/record.json`` atomically (a temporary file, then a rename)."""
  tmp = workdir / (RECORD + ".tmp")
  tmp.write_text(json.dumps(rec, indent=1, sort_keys=True))
  os.replace(tmp, workdir / RECORD)


def metrics_records(workdir: str | os.PathLike) -> list[dict]:
  """The records of ``WORKDIR/metrics.jsonl`` in order ([] without the file; a line torn by a
  crash is skipped)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  out = []
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out


def last_metrics_with(workdir: str | os.PathLike, key: str) -> dict:
  """The last ``metrics.jsonl`` record that holds ``key`` ({} without one)."""
  return next((r for r in reversed(metrics_records(workdir)) if key in r), {})


def smoothed_eval_loss(workdir: str | os.PathLike, k: int = SMOOTH_EVALS
                       ) -> tuple[float | None, list[int]]:
  """Mean of the eval losses at the last `k` eval points of ``metrics.jsonl`` (the final eval
  included) and their steps; (None, []) if there was no eval. Eval points come from
  ``config.train.eval_every_steps`` plus the final eval: with only the final one this is the
  final loss. k > 1 lowers the noise of a single eval set at the price of a bias towards the
  earlier (higher) losses while the loss still falls; k = 1 is the final eval loss."""
  evals: dict[int, float] = {}
  for rec in metrics_records(workdir):
    if "eval/loss" in rec:
      evals[int(rec["step"])] = float(rec["eval/loss"])  # a re-run's eval replaces the old
  steps = sorted(evals)[-max(int(k), 1):]
  if not steps:
    return None, []
  return sum(evals[s] for s in steps) / len(steps), steps
