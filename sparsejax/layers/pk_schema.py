"""Config sections ``config.peer`` and ``config.memory`` (pure dataclasses) for the product-key
families (sparsejax/layers/peer.py, sparsejax/layers/memory.py). Cross-field checks (N a perfect
square, top_k <= sqrt(N), even d_key, ...) are registered by the layer modules and only run when a
layer of that family is used.

Query BatchNorm (used by PKM and PEER) is not offered: it mixes tokens of a batch (so a causal LM
would see other rows' and future positions' statistics) and needs running statistics, which are
not parameters (only ``nnx.Param`` may hold model state here). ``query_norm`` = "rms" / "layer"
normalise each token's query on its own.
"""

from __future__ import annotations

import dataclasses


def _choices(*allowed: str, **kw):
  return dataclasses.field(metadata={"choices": allowed}, **kw)


@dataclasses.dataclass(frozen=True)
class PEERConfig:
  num_experts: int = 1024 ** 2   # N = n^2 single-neuron experts (n sub-keys per half)
  num_heads: int = 8             # h retrieval heads, each with its own query projection
  top_k: int = 16                # experts per head (k <= n)
  d_key: int = 128               # query / product-key dimension (split in two halves)
  shared_keys: bool = False      # True: all heads score the same sub-keys (else one set per head)
  score: str = _choices("softmax", "relu", default="softmax")  # gates over a head's k scores
  query_norm: str = _choices("rms", "layer", "none", default="rms")  # per token, learned scale
  activation: str = _choices("gelu", "relu", "silu", default="gelu")
  # kernels: "xla" (jnp) | "pallas" (fused Pallas kernels on GPU, interpret mode on CPU, XLA on
  # TPU: sparsejax/layers/kernel_impl.py) | "interpret" (force interpret mode)
  impl: str = _choices("xla", "pallas", "interpret", default="xla")


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
  num_slots: int = 1024 ** 2     # N = n^2 value rows
  num_heads: int = 4             # heads: own query projection + own sub-keys, shared values
  top_k: int = 32                # slots per head (k <= n)
  d_key: int = 512
  memory_plus: bool = True       # W_o(silu(x W_1) * mem(x)) (Memory Layers at Scale)
  gate: bool = False             # per-token scalar gate sigmoid(x·w_g) on the memory output
  qk_norm: bool = True           # RMS-normalise query halves (learned scale) and sub-key rows
  shared_values: bool = True     # one value table for all memory layers of the model
  value_lr: float = 1e-3         # values' own optimizer group (constant lr)
  value_grad_clip: float = 1.0
  value_weight_decay: float = 0.0
  # kernels: "xla" (jnp) | "pallas" (fused Pallas kernels on GPU, interpret mode on CPU, XLA on
  # TPU: sparsejax/layers/kernel_impl.py) | "interpret" (force interpret mode)
  impl: str = _choices("xla", "pallas", "interpret", default="xla")
