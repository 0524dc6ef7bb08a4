"""What a weight-sparse run adds to its sweep record (sparsejax/scaling/records.py), from the
run's last logged ``sparsity/*`` metrics (sparsejax/sparsity/hooks.py ``metrics``; the sweep
runner reads them with ``records.last_metrics_with``).

Pruned counts are weighted by the share of each weight one token uses (MoE experts: k / E;
``Family.prunable``), so ``params_active_total - params_pruned_final`` is the non-zero N and
``params_active_total - params_pruned_mean`` the average N̄ over training. Sparse training FLOPs
drop 6 per pruned active weight per token (the convention of sparsejax/models/accounting.py).
"""

from __future__ import annotations

from sparsejax.config import Config
from sparsejax.sparsity.targets import find_targets


def record_fields(cfg: Config, spec, metrics: dict, flops_per_token: float,
                  tokens: float) -> dict:
  """A weight-sparse run's ``sparsity_method``, ``weight_sparsity`` (final, over the targets),
  ``params_pruned_final`` / ``params_pruned_mean`` (active-share weighted),
  ``flops_per_token_sparse`` and ``total_flops_sparse``. ``spec``: the run's ModelSpec."""
  method = cfg.sparsity.method
  targets = find_targets(cfg, spec.abstract_params, spec.abstract_model)
  missing = [t.name for t in targets if f"sparsity/density/{t.name}" not in metrics]
  if missing:
    raise ValueError(f"no logged sparsity metrics for {missing[0]} (metrics.jsonl lacks them)")
  # logged densities are float32 ratios of integers: recover the pruned counts exactly
  pruned = [t.size - round(metrics[f"sparsity/density/{t.name}"] * t.size) for t in targets]
  final = sum(t.active * p for t, p in zip(targets, pruned))
  mean = sum(t.active * metrics[f"sparsity/pruned_mean/{t.name}"] for t in targets)
  sparse_fpt = flops_per_token - 6.0 * final
  return {"sparsity_method": method,
          "weight_sparsity": sum(pruned) / sum(t.size for t in targets),
          "params_pruned_final": final, "params_pruned_mean": mean,
          "flops_per_token_sparse": sparse_fpt, "total_flops_sparse": sparse_fpt * tokens}
