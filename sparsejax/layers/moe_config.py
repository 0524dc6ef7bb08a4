"""``config.moe`` (``MoEConfig``), the sizes it implies (``sizes``: what the layer runs under
granularity / MultiHash) and its validation (``check``, run by sparsejax.configure.validate when
a layer is "moe"). The layer itself and its FAMILY record are in sparsejax/layers/moe.py."""

from __future__ import annotations

import dataclasses

from sparsejax.config import ConfigError, field


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """``config.moe``."""
  num_experts: int = field(8, shapes=True)  # base (G=1) routed experts; the layer has E * G
  top_k: int = 2                 # base experts per token (token choice; hash: = num_hashes)
  granularity: int = field(1, shapes=True)  # G: E*G experts of width d_expert/G, top k*G
  d_expert: int = field(0, shapes=True)     # base (G=1) expert width; 0: d_ff
  num_shared_experts: int = field(0, shapes=True)  # always-on experts of the base width
  # Qwen2-MoE: the shared experts' output times sigmoid(x . w), w a learned D-vector
  # (``shared_expert_gate_Dx1``); needs num_shared_experts > 0
  shared_expert_gate: bool = field(False, shapes=True)
  router: str = field("token_choice", "token_choice", "noisy_token_choice", "expert_choice",
                      "hash", shapes=True)
  score_fn: str = field("softmax", "softmax", "sigmoid")
  renormalize: bool = True       # renormalise the top-k gates to sum to 1
  hash_type: str = field("random", "random", "balanced")
  num_hashes: int = field(1, shapes=True)  # MultiHash: h hashes pick one expert's h segments
  hash_seed: int = 0             # random hash table seed (+ layer index)
  hash_vocab_size: int = 0       # table rows (ids taken modulo); 0: model.vocab_size or 65536
  hash_frequencies: str = ""     # balanced: .npy of per-token-id counts; "" = uniform
  dispatch: str = field("capacity", "capacity", "dropless")
  capacity_factor: float = 1.25  # capacity per expert and sequence: ceil(cf * seq * k / E)
  load_balance_loss: float = 0.01
  load_balance_scope: str = field("micro_batch", "micro_batch", "global_batch")
  router_z_loss: float = 1e-3
  importance_loss: float = 0.0   # Shazeer 2017 CV^2 of the summed gates
  load_loss: float = 0.0         # Shazeer 2017 smooth load CV^2 (needs noisy_token_choice)
  bias_balancing: bool = field(False, shapes=True)  # DeepSeek-V3 aux-loss-free selection bias
  bias_update_rate: float = 1e-3
  # dropless grouped matmuls: "xla" (jax.lax.ragged_dot) | "pallas" (kernels_pallas grouped
  # matmul: Triton on GPU, Mosaic on TPU, Triton interpret mode on CPU) | "interpret" |
  # "mosaic_interpret" (the TPU kernel in TPU interpret mode)
  impl: str = field("xla", "xla", "pallas", "interpret", "mosaic_interpret")


def base_width(cfg) -> int:
  """Hidden width of a granularity-1 expert (and of each shared expert)."""
  return cfg.moe.d_expert or cfg.d_ff


def sizes(cfg) -> tuple[int, int, int]:
  """(routed experts, routed experts per token, their width) the layer runs: granularity G gives
  E*G experts of width base / G, top k*G; MultiHash (h hashes) E*h segments of width base / h,
  h per token. Every E / k / width used by the layer, its dispatch and its cost comes from here."""
  m, f = cfg.moe, base_width(cfg)
  split, k = (m.num_hashes, m.num_hashes) if m.router == "hash" else (m.granularity,
                                                                      m.top_k * m.granularity)
  return m.num_experts * split, k, f // split


def check(cfg) -> None:
  m = cfg.moe
  if m.num_experts < 1:
    raise ConfigError(f"config.moe.num_experts: must be >= 1, got {m.num_experts}")
  if not 1 <= m.top_k <= m.num_experts:
    raise ConfigError(f"config.moe.top_k: must be in [1, num_experts={m.num_experts}], "
                      f"got {m.top_k}")
  if m.d_expert < 0 or m.num_shared_experts < 0:
    raise ConfigError("config.moe.d_expert / num_shared_experts: must be >= 0")
  if m.shared_expert_gate and not m.num_shared_experts:
    raise ConfigError("config.moe.shared_expert_gate: gates the shared experts' output and "
                      "this model has none; set num_shared_experts >= 1 or the gate to False")
  f = base_width(cfg)
  if m.granularity < 1 or f % m.granularity:
    raise ConfigError(f"config.moe.granularity: must be >= 1 and divide the base expert width "
                      f"(d_expert or d_ff) {f}, got {m.granularity}")
  if not m.capacity_factor > 0:
    raise ConfigError(f"config.moe.capacity_factor: must be > 0, got {m.capacity_factor}")
  for key in ("load_balance_loss", "router_z_loss", "importance_loss", "load_loss",
              "bias_update_rate"):
    if getattr(m, key) < 0:
      raise ConfigError(f"config.moe.{key}: must be >= 0, got {getattr(m, key)}")
  if sizes(cfg)[1] == 1 and m.renormalize and m.router in ("token_choice", "noisy_token_choice"):
    raise ConfigError("config.moe.renormalize: with top_k=1 the renormalised gate is s/s = 1 "
                      "for every token, so the router gets no task gradient; set "
                      "config.moe.renormalize=False (Switch Transformer gates by the softmax "
                      "probability)")
  if m.load_loss and m.router != "noisy_token_choice":
    raise ConfigError("config.moe.load_loss: the smooth load loss needs "
                      "router='noisy_token_choice'; use load_balance_loss")
  if m.router == "hash":
    if not 1 <= m.num_hashes <= m.num_experts or m.top_k != m.num_hashes:
      raise ConfigError(f"config.moe.num_hashes: must be in [1, num_experts] and equal top_k "
                        f"(got num_hashes={m.num_hashes}, top_k={m.top_k})")
    if f % m.num_hashes:
      raise ConfigError(f"config.moe.num_hashes: MultiHash splits each expert into num_hashes "
                        f"segments; {m.num_hashes} must divide the expert width {f}")
    if m.granularity != 1:
      raise ConfigError("config.moe.granularity: not defined for router='hash' (MultiHash "
                        "segments experts by num_hashes instead); set granularity=1")
  if m.bias_balancing and m.router not in ("token_choice", "noisy_token_choice"):
    raise ConfigError("config.moe.bias_balancing: only for token-choice routers, got "
                      f"router={m.router!r}")
  if m.load_balance_scope == "global_batch" and cfg.train.grad_accum_steps > 1:
    raise ConfigError("config.moe.load_balance_scope: 'global_batch' with grad_accum_steps > 1 "
                      "needs the load over all micro-batches (not yet available); use "
                      "micro_batch (identical when grad_accum_steps == 1)")
  if m.impl != "xla" and m.dispatch != "dropless" and m.router != "expert_choice":
    raise ConfigError(f"config.moe.impl: {m.impl!r} is the grouped-matmul kernel of "
                      "dispatch='dropless'; capacity dispatch is a batched einsum, set impl='xla'")
  if m.impl != "xla" and m.router == "expert_choice":
    raise ConfigError(f"config.moe.impl: {m.impl!r} applies to dropless token-choice / hash "
                      "routing; expert_choice runs batched einsums, set impl='xla'")
  if cfg.mesh.expert > 1:
    e = sizes(cfg)[0]
    if e % cfg.mesh.expert:
      raise ConfigError(f"config.moe.num_experts: the layer's {e} routed experts (num_experts x "
                        f"granularity or num_hashes) must be divisible by "
                        f"mesh.expert={cfg.mesh.expert}")
    if m.dispatch != "capacity" and m.router != "expert_choice":
      raise ConfigError("config.moe.dispatch: expert parallelism (mesh.expert > 1) needs "
                        "dispatch='capacity'")
