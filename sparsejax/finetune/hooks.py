"""What the optimizer (sparsejax/train/optim.py), the train step (sparsejax/train/step.py) and
the eval / export paths call for ``config.finetune.mode``. Every hook is the identity in mode
"full", so a plain run traces exactly the same step as before the modes existed.

  optimizer  ``trainable_labels``: memory modes label every leaf but the value tables "frozen"
             (no Adam state, zero update); ``lora_optimizer`` / ``wrap_optimizer``: the LoRA
             and sparse-memory wrappers (outermost; weight sparsity is refused with them)
  step       ``forward_params`` (LoRA: the merged weights), ``filter_sown`` / ``update_args``
             (sparse_memory: the memory layers' per-slot counts go to the optimizer instead of
             the metrics), ``buffer_updates`` (non-full modes freeze buffers too), ``metrics``
  eval       ``inference_params`` / ``jitted_inference_params`` (LoRA: W + s A B; otherwise
             weight sparsity's), ``needs_opt_state`` (whether those weights need the optimizer
             state: restore the whole train state, not only the params)
  state      ``opt_shardings``: LoRA adapters (and their moments) sharded by logical axes
"""

from __future__ import annotations

import jax
import optax

from sparsejax.config import Config
from sparsejax.finetune import lora, sparse_memory
from sparsejax.finetune.lora import LoraState, lora_optimizer
from sparsejax.finetune.sparse_memory import SparseMemoryState
from sparsejax.finetune.targets import counts_key, memory_layers, memory_tables
from sparsejax.sparsity import hooks as sparsity

MEMORY_MODES = ("memory_values", "sparse_memory")
FROZEN = "frozen"

__all__ = ["lora_optimizer", "trainable_labels", "wrap_optimizer", "forward_state",
           "forward_params", "filter_sown", "update_args", "buffer_updates", "metrics",
           "inference_params", "jitted_inference_params", "needs_opt_state", "opt_shardings"]


def trainable_labels(cfg: Config, labels):
  """The optimizer's label function; memory modes: "frozen" for all but the value tables."""
  if cfg.finetune.mode not in MEMORY_MODES:
    return labels

  def relabel(params):
    tables = memory_tables(cfg, params)

    def one(path, label):
      keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
      return label if keys in tables else FROZEN
    return jax.tree_util.tree_map_with_path(one, labels(params))
  return relabel


def wrap_optimizer(cfg: Config, tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """sparse_memory: the TF-IDF row-selection wrapper around ``tx``; other modes: ``tx``."""
  if cfg.finetune.mode == "sparse_memory":
    return sparse_memory.sparse_memory_optimizer(cfg, tx)
  return tx


def forward_state(opt_state) -> LoraState | None:
  """The optimizer state the forward pass needs (LoRA's adapters), else None."""
  return opt_state if isinstance(opt_state, LoraState) else None


def forward_params(cfg: Config, params: dict, opt_state) -> dict:
  """The weights the train step's forward pass sees (differentiated with respect to
  ``params``)."""
  state = forward_state(opt_state)
  return params if state is None else lora.merged(cfg, params, state.adapters)


def _is_usage(name: str) -> bool:
  return name.rsplit("/", 1)[-1].startswith("usage")


def filter_sown(cfg: Config, sown: dict) -> dict:
  """Sown values the step keeps: no ``usage*`` count vectors (eval-only), except the memory
  layers' slot counts in mode sparse_memory (``update_args`` hands them to the optimizer)."""
  keep = ({counts_key(i) for i in memory_layers(cfg)} if cfg.finetune.mode == "sparse_memory"
          else set())
  return {k: v for k, v in sown.items() if k in keep or not _is_usage(k)}


def update_args(cfg: Config, sown: dict) -> tuple[dict, dict]:
  """(extra keyword arguments of the optimizer update, the sown metrics without them)."""
  if cfg.finetune.mode != "sparse_memory":
    return {}, sown
  counts = {k: v for k, v in sown.items() if _is_usage(k)}
  return {"slot_counts": counts}, {k: v for k, v in sown.items() if k not in counts}


def buffer_updates(cfg: Config, updates: dict) -> dict:
  """Sown buffer updates applied after the step: none outside mode full (frozen base)."""
  return updates if cfg.finetune.mode == "full" else {}


def metrics(opt_state) -> dict[str, jax.Array]:
  if isinstance(opt_state, SparseMemoryState):
    return {"finetune/rows_accessed": opt_state.rows_accessed,
            "finetune/rows_updated": opt_state.rows_updated}
  return {}


def needs_opt_state(cfg: Config) -> bool:
  """Whether the weights to evaluate / export need the optimizer state (LoRA adapters, weight
  sparsity's masks)."""
  return cfg.finetune.mode == "lora" or cfg.sparsity.method != "none"


def inference_params(cfg: Config, params: dict, opt_state, step=None) -> dict:
  """The weights to evaluate or export a train state with."""
  state = forward_state(opt_state)
  if state is not None:
    return lora.merged(cfg, params, state.adapters)
  return sparsity.inference_params(cfg, params, opt_state, step)


def jitted_inference_params(cfg: Config, shardings):
  """``inference_params`` compiled once onto the params' shardings: (params, opt_state, step)
  -> params (the identity when ``needs_opt_state`` is False)."""
  if cfg.finetune.mode != "lora":
    return sparsity.jitted_inference_params(cfg, shardings)

  def run(params, opt_state, step):
    del step
    return inference_params(cfg, params, opt_state)
  return jax.jit(run, out_shardings=shardings)


def opt_shardings(cfg: Config, opt_sh, abstract_params: dict, logical_axes: dict, mesh):
  """The optimizer state's shardings with LoRA adapters (and their Adam moments) sharded by
  their weight's logical axes; unchanged for other modes."""
  if cfg.finetune.mode != "lora" or not isinstance(opt_sh, LoraState):
    return opt_sh
  return lora.opt_shardings(cfg, opt_sh, abstract_params, logical_axes, mesh)
