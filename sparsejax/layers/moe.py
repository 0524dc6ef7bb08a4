"""Mixture-of-Experts feed-forward, registry key "moe" (options: ``config.moe``).

    y = sum_{k} gate_k(x) * SwiGLU_{e_k}(x) + SwiGLU_shared(x)

``num_experts`` E, ``top_k`` k, ``d_expert`` (0: ``d_ff``) and ``num_shared_experts`` describe the
granularity-1 ("base") model. Fine-grained experts (Krajewski et al. 2024, DeepSeekMoE's
segmentation), granularity G: every base expert is cut into G experts of width d_expert / G, the
layer routes over E*G of them and a token picks k*G, so the expert parameters (total and active)
equal the G=1 model's; only the router grows to d_model x E*G. Shared experts are always on and
keep their G=1 width: S shared experts are one SwiGLU of hidden size S * d_expert (the sum of S
SwiGLUs is exactly that); ``shared_expert_gate`` (Qwen2-MoE) multiplies their output by
sigmoid(x . w_Dx1). ``sizes(cfg)`` gives the (experts, per token, width) the layer runs; the
section, ``sizes`` and ``check`` live in sparsejax/layers/moe_config.py.
Routed experts are stored stacked: ``w_gate_ExDxF`` / ``w_up_ExDxF`` / ``w_down_ExFxD`` with
E, F the effective values and logical axes ("experts", "embed", "expert_mlp").

Routers (``config.moe.router``, math in sparsejax/layers/routers.py, float32):
  * ``token_choice``: top-k over softmax / sigmoid scores, optional renormalisation of the gates;
  * ``noisy_token_choice`` (Shazeer 2017): logits + softplus(x W_noise) * N(0, 1) with the
    per-step, per-layer ``rng`` the train step passes (W_noise zero-initialised); no noise when
    ``rng`` is None (evaluation);
  * ``expert_choice`` (Zhou 2022): each expert takes its top-C tokens of a sequence,
    C = ceil(capacity_factor * T * k / E) (k*G / E*G = k / E: the same C per expert at any G, so
    E*G experts of width / G do the G=1 work). NOT CAUSAL: whether an earlier token is picked
    depends on later tokens' scores — fine for encoders, leaks the future in a decoder (a warning
    is emitted at construction; tests/test_moe.py demonstrates the leak);
  * ``hash`` (Roller 2021): a fixed token-id -> expert table (random, or balanced by token
    frequency with greedy bin packing), one row per hash function. MultiHash layer (``num_hashes``
    h, = top_k): Roller et al. split each expert's FFN into h segments of its hidden units and
    let hash j pick the expert whose j-th segment the token uses; the segments' hidden units are
    concatenated, v = relu([A^1_{k_1} x, ..., A^h_{k_h} x]), y = [B^1_{k_1}, ..., B^h_{k_h}] v,
    k_j = hash_j(token): the compute of ONE expert. Here (SwiGLU experts) segment j of expert e
    is routed expert e*h + j, of width d_expert / h; a token goes to its h segment experts with
    gate 1, which sums the segments' outputs through their own w_down rows = the concatenation.
    The dispatch paths below apply unchanged (routers.hash_routing). granularity must be 1.
    Uses the token ids the Transformer passes as ``tokens_BxT`` (ids modulo the table size).
  * aux-loss-free balancing (DeepSeek-V3, ``bias_balancing``): a per-expert bias added to the
    scores for selection only, kept in the frozen parameter ``buffer_expert_bias_E`` and moved
    after every step by the sown ``update__buffer_expert_bias_E`` = rate * sign(mean(f) - f)
    (with gradient accumulation: the mean of the micro-batches' updates).

Dispatch (``config.moe.dispatch``) for token-choice / hash routing:
  * ``capacity``: each sequence is a dispatch group; expert e holds at most
    C = min(T, ceil(capacity_factor * T * k / E)) of the group's assignments. Slots are given in
    token order (token t's k choices before token t+1's), so a token never loses its slot to a
    later token: capacity dispatch is causal, and sequences do not compete with each other.
    Tokens are scattered into ``G x E x C x D`` buffers (index scatter / gather, not one-hot
    einsums: a one-hot dispatch costs T*E*C*D FLOPs per group, as much as the experts
    themselves at fine granularity), experts run as one batched einsum, overflow is dropped
    (the residual carries the token) and the dropped fraction is sown.
  * ``dropless``: assignments sorted by expert, grouped matmuls, unsorted and combined.
    ``config.moe.impl="xla"``: ``jax.lax.ragged_dot`` (the reference; ~11 TFLOP/s on an H200 at
    jax 0.11); ``"pallas"``: the grouped-matmul kernel of kernels_pallas/grouped_matmul (GPU;
    interpret mode on CPU; ragged_dot on TPU), run per batch shard under a mesh with the expert
    hidden dimension split over the "expert_mlp" mesh axis.

Expert parallelism: with ``config.mesh.expert > 1`` and an active activation-sharding context,
capacity buffers are exchanged with ``jax.lax.all_to_all`` over the ``expert`` mesh axis inside
``jax.shard_map``; each device runs only its E / expert local experts.

Losses (formulas in routers.py), scaled by their ``config.moe`` coefficients and sown together as
``aux_loss``: Switch load balance ``E * sum_e f_e P_e`` over the tokens of one call (micro-batch
scope), router z-loss, Shazeer importance / load CV^2. Sown metrics per layer: each loss
(unscaled), ``expert_load`` (vector f_e), ``load_max_over_mean``, ``dropped_fraction``,
``router_entropy``.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from sparsejax.layers import kernel_impl, routers
from sparsejax.layers.common import DTYPES, param, sow
from sparsejax.layers.ffn import ACTIVATIONS
from sparsejax.layers.family import Family, LayerCost, Prunable
from sparsejax.layers.moe_config import MoEConfig, base_width, check, sizes
from sparsejax.layers.moe_dispatch import (capacity, capacity_local, dropless, dropless_sharded,
                                           ep_mesh, expert_choice_local)
from sparsejax.parallel.sharding import constrain


class MoE(nnx.Module):
  """Routed SwiGLU experts + shared experts; see the module docstring."""

  def __init__(self, cfg, layer_idx: int, *, rngs: nnx.Rngs, shared: dict | None = None):
    m = cfg.moe
    (e, k, f), d = sizes(cfg), cfg.model.d_model  # effective values (granularity / MultiHash)
    std, pdt = cfg.model.init_std, DTYPES[cfg.model.param_dtype]
    out_std = std / (2 * cfg.model.num_layers) ** 0.5
    self.num_experts, self.top_k, self.d_model, self.d_expert = e, k, d, f
    self.router = m.router
    self.score_fn, self.renormalize, self.dispatch = m.score_fn, m.renormalize, m.dispatch
    self.capacity_factor = m.capacity_factor
    self.coef = (("load_balance_loss", m.load_balance_loss), ("router_z_loss", m.router_z_loss),
                 ("importance_loss", m.importance_loss), ("load_loss", m.load_loss))  # static
    self.bias_rate = m.bias_update_rate
    self.router_DxE = (None if m.router == "hash" else
                       param(rngs, (d, e), ("embed", None), std=std, dtype=jnp.float32))
    self.noise_DxE = (nnx.Param(jnp.zeros((d, e), jnp.float32), logical_axes=("embed", None))
                      if m.router == "noisy_token_choice" else None)  # Shazeer: zero init
    # DeepSeek-V3 selection bias: a frozen buffer_* Param (no optimizer update, gradient
    # stopped), moved only by the sown update__buffer_expert_bias_E after each step.
    self.buffer_expert_bias_E = (nnx.Param(jnp.zeros((e,), jnp.float32), logical_axes=(None,))
                          if m.bias_balancing else None)
    self.w_gate_ExDxF = param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), std=std,
                              dtype=pdt)
    self.w_up_ExDxF = param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), std=std,
                            dtype=pdt)
    self.w_down_ExFxD = param(rngs, (e, f, d), ("experts", "expert_mlp", "embed"), std=out_std,
                              dtype=pdt)
    s = m.num_shared_experts * base_width(cfg)  # shared experts keep the G=1 width
    if s:
      self.shared_gate_DxS = param(rngs, (d, s), ("embed", "mlp"), std=std, dtype=pdt)
      self.shared_up_DxS = param(rngs, (d, s), ("embed", "mlp"), std=std, dtype=pdt)
      self.shared_down_SxD = param(rngs, (s, d), ("mlp", "embed"), std=out_std, dtype=pdt)
    else:
      self.shared_gate_DxS = self.shared_up_DxS = self.shared_down_SxD = None
    self.shared_expert_gate_Dx1 = (param(rngs, (d, 1), ("embed", None), std=std, dtype=pdt)
                                   if m.shared_expert_gate else None)
    if m.router == "hash":
      vocab = m.hash_vocab_size or cfg.model.vocab_size or 65536
      self.hash_key = (m.hash_type, vocab, m.num_experts, m.num_hashes, m.hash_seed + layer_idx,
                       m.hash_frequencies)  # rows: hashes over the E full experts
      routers.hash_table(*self.hash_key)  # build (and cache) now: errors surface at init
    else:
      self.hash_key = None
    if m.router == "expert_choice":
      warnings.warn("config.moe.router='expert_choice' is not causal: a token's experts depend "
                    "on later tokens of its sequence (leaks the future in a decoder LM)",
                    stacklevel=2)
    self.act = ACTIVATIONS[cfg.ffn.activation]
    self.dtype = DTYPES[cfg.model.compute_dtype]
    self.impl = kernel_impl.resolve(m.impl, "config.moe.impl", "gmm")

  # ---- accounting (sparsejax/models/accounting.py) ----
  def experts_per_token(self, seq_len: int) -> float:
    if self.router == "expert_choice":  # E * C slots shared by T tokens
      c = capacity(self.capacity_factor, seq_len, self.top_k, self.num_experts)
      return self.num_experts * c / seq_len
    return float(self.top_k)

  def active_params_per_token(self, seq_len: int) -> int:
    """Matmul weights touched per token: router (+ noise projection) + routed experts + shared.
    Capacity padding (empty slots still multiplied) is not counted."""
    d, f = self.d_model, self.d_expert
    router = 0 if self.router_DxE is None else d * self.num_experts
    router += 0 if self.noise_DxE is None else d * self.num_experts
    shared = 0 if self.shared_gate_DxS is None else 3 * self.shared_gate_DxS.shape[1] * d
    shared += 0 if self.shared_expert_gate_Dx1 is None else d
    return int(router + self.experts_per_token(seq_len) * 3 * d * f + shared)

  def summary(self, seq_len: int) -> dict:
    """The sizes granularity / MultiHash make of the config (``sparsejax info``)."""
    shared = 0 if self.shared_gate_DxS is None else self.shared_gate_DxS.shape[1]
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(self, nnx.Param)))
    return {"routed_experts": self.num_experts,
            "experts_per_token": self.experts_per_token(seq_len),
            "expert_width": self.d_expert, "shared_width": shared,
            "layer_params_total": total,
            "layer_params_active": self.active_params_per_token(seq_len)}

  # ---- routing ----
  def route(self, x32_NxD, tokens_N=None, rng=None):
    """Token-choice / hash routing -> (Routing, extra unscaled losses)."""
    losses = {}
    if self.router == "hash":
      if tokens_N is None:
        raise ValueError("hash routing needs the token ids: call the MoE layer with tokens_BxT=")
      return routers.hash_routing(tokens_N, routers.hash_table(*self.hash_key)), losses
    logits = x32_NxD @ self.router_DxE[...].astype(jnp.float32)
    clean = logits
    if self.noise_DxE is not None and rng is not None:
      noise_logits = x32_NxD @ self.noise_DxE[...].astype(jnp.float32)
      logits, sigma = routers.noisy_logits(clean, noise_logits, rng)
      if dict(self.coef)["load_loss"]:
        losses["load_loss"] = routers.cv_squared(
            routers.smooth_load(clean, logits, sigma, self.top_k))
    bias = None if self.buffer_expert_bias_E is None else self.buffer_expert_bias_E[...]
    r = routers.token_choice(logits, self.top_k, score_fn=self.score_fn,
                             renormalize=self.renormalize, bias_E=bias)
    if dict(self.coef)["importance_loss"]:
      losses["importance_loss"] = routers.importance_loss(r, self.num_experts)
    return r, losses

  def _run(self, local_fn, x_BxTxD, *routes):
    """local_fn(x, *routes, wg, wu, wd, axis_name=...) directly, or under shard_map (EP)."""
    ws = (self.w_gate_ExDxF[...], self.w_up_ExDxF[...], self.w_down_ExFxD[...])
    ep = ep_mesh(self.num_experts, x_BxTxD.shape[0])
    if ep is None:
      return local_fn(x_BxTxD, *routes, *ws, axis_name=None)
    mesh, batch_axes = ep
    act_spec = P(batch_axes, None, None)
    w_spec = P("expert", None, None)
    fn = jax.shard_map(lambda *a: local_fn(*a, axis_name="expert"), mesh=mesh,
                       in_specs=(act_spec,) * (1 + len(routes)) + (w_spec,) * 3,
                       out_specs=act_spec)
    return fn(x_BxTxD, *routes, *ws)

  def __call__(self, x_BxTxD: jax.Array, tokens_BxT: jax.Array | None = None, *,
               rng: jax.Array | None = None) -> jax.Array:
    b, t, d = x_BxTxD.shape
    e, dt = self.num_experts, self.dtype
    x32_NxD = x_BxTxD.reshape(b * t, d).astype(jnp.float32)
    metrics, losses = {}, {}
    if self.router == "expert_choice":
      cap = capacity(self.capacity_factor, t, self.top_k, e)
      logits_BxTxE = (x32_NxD @ self.router_DxE[...].astype(jnp.float32)).reshape(b, t, e)
      tok, gate, s_BxTxE = routers.expert_choice(logits_BxTxE, cap, self.score_fn)
      y = self._run(lambda *a, axis_name: expert_choice_local(
          *a, act=self.act, dt=dt, axis_name=axis_name), x_BxTxD, tok, gate)
      picked_BxT = jax.vmap(lambda tk: jnp.zeros((t,), jnp.int32).at[tk.reshape(-1)].add(1))(tok)
      metrics["dropped_fraction"] = jnp.mean((picked_BxT == 0).astype(jnp.float32))
      probs = s_BxTxE.reshape(b * t, e)
      probs = probs / jnp.sum(probs, -1, keepdims=True)
      logits = logits_BxTxE.reshape(b * t, e)
      load_E = jnp.full((e,), 1.0 / e, jnp.float32)
    else:
      tokens_N = None if tokens_BxT is None else tokens_BxT.reshape(-1)
      r, losses = self.route(x32_NxD, tokens_N, rng)
      k = r.expert_NxK.shape[-1]
      if self.dispatch == "dropless":
        run = dropless if self.impl == "xla" else dropless_sharded
        y = run(x_BxTxD.reshape(b * t, d), r.expert_NxK, r.gate_NxK, self.w_gate_ExDxF[...],
                self.w_up_ExDxF[...], self.w_down_ExFxD[...], num_experts=e, act=self.act,
                dt=dt, impl=self.impl).reshape(b, t, d)
        metrics["dropped_fraction"] = jnp.zeros((), jnp.float32)
      else:
        cap = capacity(self.capacity_factor, t, k, e)
        expert_BxTxK = r.expert_NxK.reshape(b, t, k)
        # slot of each assignment within its expert, in token order (causal, see docstring)
        onehot = jax.nn.one_hot(expert_BxTxK.reshape(b, t * k), e, dtype=jnp.int32)
        pos = jnp.cumsum(onehot, axis=1) - 1
        slot_BxTxK = jnp.take_along_axis(pos, expert_BxTxK.reshape(b, t * k, 1), axis=-1
                                         ).reshape(b, t, k)
        y = self._run(lambda *a, axis_name: capacity_local(
            *a, num_experts=e, cap=cap, act=self.act, dt=dt, axis_name=axis_name),
            x_BxTxD, expert_BxTxK, slot_BxTxK, r.gate_NxK.reshape(b, t, k))
        metrics["dropped_fraction"] = jnp.mean((slot_BxTxK >= cap).astype(jnp.float32))
      load_E = routers.load_fraction(r.expert_NxK, e)
      probs, logits = r.probs_NxE, r.logits_NxE
      if probs is not None:
        losses["load_balance_loss"] = routers.load_balance_loss(r, e)
    if logits is not None:
      losses["router_z_loss"] = routers.z_loss(logits)
      metrics["router_entropy"] = routers.entropy(probs)
    y = y.astype(dt)
    if self.shared_gate_DxS is not None:
      xs = x_BxTxD.astype(dt)
      h = self.act(jnp.einsum("btd,ds->bts", xs, self.shared_gate_DxS[...].astype(dt))) * \
          jnp.einsum("btd,ds->bts", xs, self.shared_up_DxS[...].astype(dt))
      h = constrain(h, ("act_batch", "act_length", "act_mlp"))
      ys = jnp.einsum("bts,sd->btd", h, self.shared_down_SxD[...].astype(dt))
      if self.shared_expert_gate_Dx1 is not None:
        ys = ys * jax.nn.sigmoid(xs @ self.shared_expert_gate_Dx1[...].astype(dt))
      y = y + ys
    aux = jnp.zeros((), jnp.float32)
    for name, value in losses.items():
      aux = aux + dict(self.coef)[name] * value
      sow(self, name, value)
    sow(self, "aux_loss", aux)
    sow(self, "expert_load", load_E)
    sow(self, "load_max_over_mean", jnp.max(load_E) * e)
    if self.buffer_expert_bias_E is not None:
      bias = self.buffer_expert_bias_E[...]
      sow(self, "update__buffer_expert_bias_E",
          routers.update_expert_bias(bias, load_E, self.bias_rate) - bias)
    for name, value in metrics.items():
      sow(self, name, value)
    return y.astype(x_BxTxD.dtype)


def cost(layer: MoE, seq_len: int) -> LayerCost:
  return LayerCost(active_params=layer.active_params_per_token(seq_len))


def _routed_share(module) -> float:
  """The fraction of the routed experts' weights one token uses (expert choice: on average)."""
  return module.top_k / module.num_experts


FAMILY = Family("moe", "ffn", MoE, section=("moe", MoEConfig), check=check,
                rules=(("experts", "expert"), ("expert_mlp", "tensor")), cost=cost,
                shapes=("model", "ffn", "moe"), prunable=(
                    *(Prunable(n, 1, _routed_share) for n in
                      ("w_gate_ExDxF", "w_up_ExDxF", "w_down_ExFxD")),
                    Prunable("shared_gate_DxS", 0), Prunable("shared_up_DxS", 0),
                    Prunable("shared_down_SxD", 0)))
