"""Dense gated feed-forward (SwiGLU / GeGLU), registry key "dense"."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.layers.common import DTYPES, param
from sparsejax.layers.family import Family, Prunable
from sparsejax.parallel.sharding import constrain

ACTIVATIONS = {"swiglu": jax.nn.silu, "geglu": lambda x: jax.nn.gelu(x, approximate=True)}


class GatedFFN(nnx.Module):
  """y = (act(x W_gate) * (x W_up)) W_down, hidden size F = cfg.d_ff."""

  def __init__(self, cfg, layer_idx: int, *, rngs: nnx.Rngs, shared: dict | None = None):
    d, f = cfg.model.d_model, cfg.d_ff
    std, pdt = cfg.model.init_std, DTYPES[cfg.model.param_dtype]
    out_std = std / (2 * cfg.model.num_layers) ** 0.5
    self.w_gate_DxF = param(rngs, (d, f), ("embed", "mlp"), std=std, dtype=pdt)
    self.w_up_DxF = param(rngs, (d, f), ("embed", "mlp"), std=std, dtype=pdt)
    self.w_down_FxD = param(rngs, (f, d), ("mlp", "embed"), std=out_std, dtype=pdt)
    self.act = ACTIVATIONS[cfg.ffn.activation]
    self.dtype = DTYPES[cfg.model.compute_dtype]

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    dt = self.dtype
    gate = jnp.einsum("btd,df->btf", x_BxTxD, self.w_gate_DxF[...].astype(dt))
    up = jnp.einsum("btd,df->btf", x_BxTxD, self.w_up_DxF[...].astype(dt))
    h_BxTxF = constrain(self.act(gate) * up, ("act_batch", "act_length", "act_mlp"))
    return jnp.einsum("btf,fd->btd", h_BxTxF, self.w_down_FxD[...].astype(dt))


FAMILY = Family("dense", "ffn", GatedFFN, shapes=("model", "ffn"),
                prunable=(Prunable("w_gate_DxF", 0), Prunable("w_up_DxF", 0),
                          Prunable("w_down_FxD", 0)))
