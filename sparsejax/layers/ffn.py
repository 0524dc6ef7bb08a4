"""Dense gated feed-forward, registry key "dense": h = act(x W_gate) * (x W_up), y = h W_down.

``config.ffn.activation`` picks the gated activation (``gated``):
  * "swiglu" silu(gate) * up, "geglu" gelu(gate) * up (dense: almost no exact zeros);
  * "relu"   ReGLU, relu(gate) * up;
  * "relu2"  relu(gate)^2 * up (Primer's squared ReLU, gated);
  * "drelu"  relu(gate) * relu(up) (Turbo Sparse's dReLU: both branches sparse).
``config.ffn.activation_topk = k > 0`` then keeps, per token, the k entries of h with the
largest |h| (ties: the lower index) and zeros the rest; the mask is a stop-gradient constant, so
the loss gradient reaches only the kept units (that of a dropped unit's gate / up is exactly 0).
k = F is the dense layer exactly.

With a sparse activation (relu / relu2 / drelu, or k > 0) the layer sows ``act_nonzero`` (the
fraction of non-zero entries of h in the batch: train metric ``sown/<layer>/act_nonzero``) and
``usage_neurons`` (per hidden unit, how many tokens it fired on), which the evaluator sums over
its window into ``<layer>/dead_fraction`` (units that never fired) next to key usage. The MoE
experts share the element-wise gate table ``ACTIVATIONS`` (not dReLU, nor top-k)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.errors import ConfigError
from sparsejax.layers.common import DTYPES, param, sow
from sparsejax.layers.family import Family, LayerCost, Prunable
from sparsejax.parallel.sharding import constrain

# act(gate) of act(gate) * up, element-wise (shared with the MoE experts, sparsejax/layers/moe.py)
ACTIVATIONS = {"swiglu": jax.nn.silu, "geglu": lambda x: jax.nn.gelu(x, approximate=True),
               "relu": jax.nn.relu, "relu2": lambda x: jnp.square(jax.nn.relu(x))}
SPARSE_ACTIVATIONS = ("relu", "relu2", "drelu")
NEURON_USAGE = "usage_neurons"  # sown count vector; eval/core.py derives dead_fraction from it


def gated(name: str, gate: jax.Array, up: jax.Array) -> jax.Array:
  """h of the gated activation ``name`` (see the module docstring)."""
  if name == "drelu":
    return jax.nn.relu(gate) * jax.nn.relu(up)
  return ACTIVATIONS[name](gate) * up


def topk_mask(h_NxF: jax.Array, k: int) -> jax.Array:
  """1 at the k entries of largest |h| along the last axis (ties: lower index first, as
  ``lax.top_k``), 0 elsewhere; no gradient flows through the selection."""
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(jnp.abs(h_NxF)), k)
  mask = jnp.put_along_axis(jnp.zeros(h_NxF.shape, h_NxF.dtype), idx,
                            jnp.ones(idx.shape, h_NxF.dtype), axis=-1, inplace=False)
  return jax.lax.stop_gradient(mask)


def check_activation(cfg) -> None:
  """``config.ffn.activation`` / ``activation_topk`` against the model (run by validate for
  every config: the MoE experts read the activation too)."""
  f, k = cfg.d_ff, cfg.ffn.activation_topk
  if not 0 <= k <= f:
    raise ConfigError(f"config.ffn.activation_topk={k} must be in [0, d_ff={f}] (0 = off): the "
                      "hidden units kept per token in dense FFN layers")
  kinds = {ffn_type for _, ffn_type in cfg.layer_types()}
  if k and "dense" not in kinds:
    raise ConfigError(f"config.ffn.activation_topk={k} applies to dense FFN layers and this "
                      "model has none: set it to 0")
  if cfg.ffn.activation == "drelu" and "moe" in kinds:
    raise ConfigError("config.ffn.activation='drelu' is for dense FFN layers only (MoE experts "
                      "compute act(gate) * up): use relu or relu2 with MoE layers")


class GatedFFN(nnx.Module):
  """y = gated(activation, x W_gate, x W_up) W_down, hidden size F = cfg.d_ff (optionally only
  the top-k hidden units per token)."""

  def __init__(self, cfg, layer_idx: int, *, rngs: nnx.Rngs, shared: dict | None = None):
    d, f = cfg.model.d_model, cfg.d_ff
    std, pdt = cfg.model.init_std, DTYPES[cfg.model.param_dtype]
    out_std = std / (2 * cfg.model.num_layers) ** 0.5
    self.w_gate_DxF = param(rngs, (d, f), ("embed", "mlp"), std=std, dtype=pdt)
    self.w_up_DxF = param(rngs, (d, f), ("embed", "mlp"), std=std, dtype=pdt)
    self.w_down_FxD = param(rngs, (f, d), ("mlp", "embed"), std=out_std, dtype=pdt)
    self.activation = cfg.ffn.activation
    self.topk = cfg.ffn.activation_topk
    self.sparse = self.activation in SPARSE_ACTIVATIONS or self.topk > 0
    self.dtype = DTYPES[cfg.model.compute_dtype]

  def hidden(self, x_BxTxD: jax.Array) -> jax.Array:
    """h_BxTxF, the input of the down projection (top-k applied)."""
    dt = self.dtype
    gate = jnp.einsum("btd,df->btf", x_BxTxD, self.w_gate_DxF[...].astype(dt))
    up = jnp.einsum("btd,df->btf", x_BxTxD, self.w_up_DxF[...].astype(dt))
    h_BxTxF = gated(self.activation, gate, up)
    if self.topk:
      h_BxTxF = h_BxTxF * topk_mask(h_BxTxF, self.topk)
    return constrain(h_BxTxF, ("act_batch", "act_length", "act_mlp"))

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    h_BxTxF = self.hidden(x_BxTxD)
    if self.sparse:
      fired_BxTxF = jax.lax.stop_gradient(h_BxTxF) != 0
      sow(self, "act_nonzero", jnp.mean(fired_BxTxF, dtype=jnp.float32))
      sow(self, NEURON_USAGE, jnp.sum(fired_BxTxF, axis=(0, 1), dtype=jnp.float32))
    return jnp.einsum("btf,fd->btd", h_BxTxF, self.w_down_FxD[...].astype(self.dtype))

  # ---- accounting (sparsejax/models/accounting.py) ----
  def skippable_flops_per_token(self) -> float:
    """Training FLOPs per token a top-k-aware kernel need not execute: everything but the gate /
    up forward touches only k of the F hidden units, 14·D·(F − k) (accounting docstring)."""
    d, f = self.w_down_FxD.shape[1], self.w_down_FxD.shape[0]
    return 14.0 * d * (f - self.topk) if self.topk else 0.0


def cost(layer: GatedFFN, seq_len: int) -> LayerCost:
  """Every weight active (the default); top-k's skippable training FLOPs."""
  del seq_len
  return LayerCost(skippable_flops=layer.skippable_flops_per_token())


FAMILY = Family("dense", "ffn", GatedFFN, cost=cost, shapes=("model", "ffn"),
                prunable=(Prunable("w_gate_DxF", 0), Prunable("w_up_DxF", 0),
                          Prunable("w_down_FxD", 0)))
