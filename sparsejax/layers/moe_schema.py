"""Config section ``config.moe`` (pure dataclass; validated by sparsejax.config).

Owned by the MoE layer family (sparsejax/layers/moe.py, routers in sparsejax/layers/routers.py);
cross-field checks are registered there with ``@registry.register_check``.
"""

from __future__ import annotations

import dataclasses


def _choices(*allowed: str, **kw):
  return dataclasses.field(metadata={"choices": allowed}, **kw)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  num_experts: int = 8
  top_k: int = 2                 # experts per token (token choice); hash: = num_hashes
  granularity: int = 1           # fine-grained experts: d_expert = d_ff // granularity
  d_expert: int = 0              # 0: derived from granularity
  num_shared_experts: int = 0    # always-on experts of size d_expert, summed with the routed ones
  router: str = _choices("token_choice", "noisy_token_choice", "expert_choice", "hash",
                         default="token_choice")
  score_fn: str = _choices("softmax", "sigmoid", default="softmax")
  renormalize: bool = True       # renormalise the top-k gates to sum to 1
  hash_type: str = _choices("random", "balanced", default="random")
  num_hashes: int = 1            # multi-hash: experts chosen by num_hashes hash functions
  hash_seed: int = 0             # random hash table seed (+ layer index)
  hash_vocab_size: int = 0       # table rows (ids taken modulo); 0: model.vocab_size or 65536
  hash_frequencies: str = ""     # balanced: .npy of per-token-id counts; "" = uniform
  dispatch: str = _choices("capacity", "dropless", default="capacity")
  capacity_factor: float = 1.25  # capacity per expert and sequence: ceil(cf * seq * k / E)
  load_balance_loss: float = 0.01
  load_balance_scope: str = _choices("micro_batch", "global_batch", default="micro_batch")
  router_z_loss: float = 1e-3
  importance_loss: float = 0.0   # Shazeer 2017 CV^2 of the summed gates
  load_loss: float = 0.0         # Shazeer 2017 smooth load CV^2 (needs noisy_token_choice)
  bias_balancing: bool = False   # DeepSeek-V3 aux-loss-free selection bias (token choice)
  bias_update_rate: float = 1e-3
  # dropless grouped matmuls: "xla" (jax.lax.ragged_dot) | "pallas" (kernels_pallas grouped
  # matmul on GPU, interpret mode on CPU, ragged_dot on TPU) | "interpret"
  impl: str = _choices("xla", "pallas", "interpret", default="xla")
