"""PEER: Parameter Efficient Expert Retrieval ("Mixture of A Million Experts", He 2024).
Registry key ``ffn.type = "peer"`` (or a per-layer override such as ``"3:peer"``).

N = n² single-neuron experts, expert i = (u_i, v_i), both D-vectors. Each of h heads has its own
query projection W_q^h (D -> d_key, then a per-token RMS / Layer norm) and retrieves its top-k
experts among the N product keys (sparsejax.layers.product_keys; sub-keys per head, or shared by
all heads with ``peer.shared_keys``):

    y(x) = sum_h sum_{i in topk_h(x)} g_{h,i}(x) · act(u_i · x) · v_i
    g_h  = softmax over the head's k scores (paper) | sigmoid(scores) | relu(scores) (non-competing)

Tables: ``experts_in_NxD`` (u) and ``experts_out_NxD`` (v), logical axes
("peer_experts", "peer_dim"): rows replicated, columns over mesh "tensor" (as the memory values).
Sown: ``usage_experts`` (float32 [N] selection counts; the evaluator turns them into touched
fraction / KL from uniform).

Optimizer groups (sparsejax/train/optim.py), each at a multiple of the main lr schedule with the
main weight decay and clipping: sub-keys ("peer_keys", ``peer.key_lr_mult``), the query
projection with its norm scale / bias ("peer_queries", ``peer.query_lr_mult``) and the expert
tables ("peer_experts", ``peer.expert_lr_mult``; Memory Layers at Scale's PEER variant trains
them like memory values, at the values' lr).

Kernels (``peer.impl``, resolved by sparsejax/layers/kernel_impl.py): "xla" is jnp top-k and
take + einsum (materialises the [B, T, h, k, D] selected rows); "pallas" runs the fused
product-key top-k (+ softmax) kernel and the fused PEER expert kernel of kernels_pallas.

Cost convention (models/accounting.py units, "equivalent matmul parameters" per token):
  D·h·d_key (query projections) + h·n·d_key (two halves of n sub-keys of d_key/2, per head)
  + h·k·2·D (selected u and v rows) + h·d_key² (query whitening). Top-k / softmax / the k²
  candidate sums are not counted.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from kernels_pallas.gather_sum.ops import gather_dot, gather_sum, peer_ffn
from sparsejax.config import field
from sparsejax.layers import kernel_impl
from sparsejax.layers import product_keys as pk
from sparsejax.layers.common import DTYPES, param, sow
from sparsejax.layers.family import Family, LayerCost, ParamGroup, Prunable
from sparsejax.layers.query_center import QueryCenter, usage_scalars
from sparsejax.parallel.sharding import constrain


@dataclasses.dataclass(frozen=True)
class PEERConfig:
  """``config.peer``."""
  num_experts: int = field(1024 ** 2, shapes=True)  # N = n^2 single-neuron experts
  num_heads: int = field(8, shapes=True)  # h retrieval heads, each with its own query projection
  top_k: int = 16                # experts per head (k <= n)
  d_key: int = field(128, shapes=True)  # query / product-key dimension (split in two halves)
  shared_keys: bool = field(False, shapes=True)  # all heads score the same sub-keys
  # gates over a head's k scores: softmax (paper), sigmoid (independent, paper's alternative),
  # relu (non-competing)
  score: str = field("softmax", "softmax", "sigmoid", "relu")
  query_norm: str = field("rms", "rms", "layer", "none", shapes=True)  # per token, learned scale
  # RMS-normalise sub-key rows, half scores scaled by (d_key/2)^-1/2 (as memory's QK-norm);
  # on the tiny preset it raised expert usage after 300 steps from 51% to 59% (eval window)
  key_norm: bool = True
  activation: str = field("gelu", "gelu", "relu", "silu")
  # query centring and whitening against retrieval collapse (sparsejax/layers/query_center.py)
  query_center: str = field("whiten", "whiten", "batch", "running", "none", shapes=True)
  query_center_momentum: float = 0.9
  # optimizer groups (module docstring): multiples of the main lr schedule
  key_lr_mult: float = 1.0
  query_lr_mult: float = 1.0
  expert_lr_mult: float = 1.0
  # kernels: "xla" (jnp) | "pallas" (Triton kernels on GPU, interpret mode on CPU; on TPU the
  # Mosaic gather kernels, XLA top-k: sparsejax/layers/kernel_impl.py) | "interpret" (force
  # interpret mode) | "mosaic_interpret" (the TPU gather kernels in TPU interpret mode)
  impl: str = field("xla", "xla", "pallas", "interpret", "mosaic_interpret")

PEER_ACTIVATIONS = {"gelu": lambda x: jax.nn.gelu(x, approximate=True), "relu": jax.nn.relu,
                    "silu": jax.nn.silu}


def check(cfg) -> None:
  p = cfg.peer
  pk.check_product_key_section("config.peer", num_keys=p.num_experts, top_k=p.top_k,
                               d_key=p.d_key, num_heads=p.num_heads)
  pk.check_nonnegative("config.peer", key_lr_mult=p.key_lr_mult, query_lr_mult=p.query_lr_mult,
                       expert_lr_mult=p.expert_lr_mult)


class PEER(nnx.Module):

  def __init__(self, cfg, layer_idx: int, *, rngs: nnx.Rngs, shared: dict | None = None):
    p, d = cfg.peer, cfg.model.d_model
    std, pdt = cfg.model.init_std, DTYPES[cfg.model.param_dtype]
    self.num_experts, self.num_heads, self.top_k, self.d_key = (
        p.num_experts, p.num_heads, p.top_k, p.d_key)
    self.n = pk.isqrt_exact(p.num_experts)
    self.d_model = d
    self.param_bytes = jnp.dtype(pdt).itemsize
    self.score, self.query_norm, self.key_norm = p.score, p.query_norm, p.key_norm
    self.impl = kernel_impl.resolve(p.impl, "config.peer.impl", "topk")
    self.gather_impl = kernel_impl.resolve(p.impl, "config.peer.impl", "gather")
    self.activation = p.activation
    self.eps = cfg.model.norm_eps
    self.act = PEER_ACTIVATIONS[p.activation]
    self.dtype = DTYPES[cfg.model.compute_dtype]
    h, c = p.num_heads, p.d_key // 2
    hk = 1 if p.shared_keys else h
    self.w_query_DxHxK = param(rngs, (d, h, p.d_key), ("embed", "pk_heads", "pk_dim"), std=std,
                               dtype=pdt)
    self.qcenter = QueryCenter(p.query_center, h, p.d_key, momentum=p.query_center_momentum,
                               eps=cfg.model.norm_eps)
    self.query_scale_HxK = (None if p.query_norm == "none" else
                            nnx.Param(jnp.ones((h, p.d_key), pdt),
                                      logical_axes=("pk_heads", "pk_dim")))
    self.query_bias_HxK = (nnx.Param(jnp.zeros((h, p.d_key), pdt),
                                     logical_axes=("pk_heads", "pk_dim"))
                           if p.query_norm == "layer" else None)
    # Sub-keys [heads, half, n, d_key/2]; std c^-1/2 makes each half's score ~ N(0, 1) at init
    # for a unit-RMS query.
    self.subkeys_Gx2xSxC = param(rngs, (hk, 2, self.n, c),
                                 ("pk_heads", None, "pk_subkeys", "pk_dim"), std=c ** -0.5,
                                 dtype=pdt)
    out_std = std / (2 * cfg.model.num_layers) ** 0.5
    self.experts_in_NxD = param(rngs, (p.num_experts, d), ("peer_experts", "peer_dim"), std=std,
                                dtype=pdt)
    self.experts_out_NxD = param(rngs, (p.num_experts, d), ("peer_experts", "peer_dim"),
                                 std=out_std, dtype=pdt)

  # ---- retrieval (also used by tests) ----
  def queries(self, x_BxTxD: jax.Array, training: bool = False) -> jax.Array:
    """Centred, normalised queries [B, T, H, d_key] float32 (``training``: batch statistics
    for query_center="batch" / "whiten")."""
    q = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.w_query_DxHxK[...].astype(self.dtype),
                   preferred_element_type=jnp.float32)
    q = self.qcenter(q, training)
    scale = None if self.query_scale_HxK is None else self.query_scale_HxK[...]
    bias = None if self.query_bias_HxK is None else self.query_bias_HxK[...]
    return pk.normalize(q, self.query_norm, self.eps, scale, bias)

  def retrieve(self, x_BxTxD: jax.Array, *, softmax: bool = False, training: bool = False
               ) -> tuple[jax.Array, jax.Array]:
    """(scores [B, T, H, k] float32 — softmax weights with ``softmax`` —, expert indices
    [B, T, H, k] int32)."""
    q = self.queries(x_BxTxD, training)
    c = self.d_key // 2
    keys = self.subkeys_Gx2xSxC[...]
    k1, k2, q1, q2 = keys[:, 0], keys[:, 1], q[..., :c], q[..., c:]
    if self.key_norm:  # cosine-like half scores, as the memory layers' QK-norm
      k1, k2 = pk.normalize(k1, "rms", self.eps), pk.normalize(k2, "rms", self.eps)
      q1, q2 = q1 * c ** -0.5, q2 * c ** -0.5
    dt = self.dtype
    return pk.product_key_topk(q1.astype(dt), q2.astype(dt), k1.astype(dt), k2.astype(dt),
                               self.top_k, impl=self.impl, softmax=softmax)

  def gates(self, scores: jax.Array) -> jax.Array:
    if self.score == "softmax":
      return jax.nn.softmax(scores, axis=-1)
    return jax.nn.sigmoid(scores) if self.score == "sigmoid" else jax.nn.relu(scores)

  def __call__(self, x_BxTxD: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """``rng`` is given in training only: it selects batch statistics for query centring."""
    dt = self.dtype
    fused_softmax = self.score == "softmax"
    scores, idx_BxTxHxK = self.retrieve(x_BxTxD, softmax=fused_softmax,
                                        training=rng is not None)
    counts = pk.usage_counts(idx_BxTxHxK, self.num_experts)
    sow(self, "usage_experts", counts)
    for name, value in usage_scalars(counts).items():
      sow(self, name, value)
    g = scores if fused_softmax else self.gates(scores)
    if self.gather_impl != "xla":
      y = self._experts_kernel(x_BxTxD, idx_BxTxHxK, g).astype(dt)
      return constrain(y, ("act_batch", "act_length", "act_embed"))
    u = jnp.take(self.experts_in_NxD[...], idx_BxTxHxK, axis=0).astype(dt)   # [B,T,H,k,D]
    v = jnp.take(self.experts_out_NxD[...], idx_BxTxHxK, axis=0).astype(dt)
    hidden = self.act(jnp.einsum("btd,bthkd->bthk", x_BxTxD, u,
                                 preferred_element_type=jnp.float32))
    y = jnp.einsum("bthk,bthkd->btd", (g * hidden).astype(dt), v)
    return constrain(y, ("act_batch", "act_length", "act_embed"))

  def _experts_kernel(self, x_BxTxD, idx_BxTxHxK, g_BxTxHxK):
    """Selected experts with the kernels_pallas gather kernels, per batch shard. Unsplit
    expert columns: one fused kernel (gather u rows, dot, activation, gate, weighted gather-sum
    of v rows). Columns split over a mesh axis ("peer_dim" rule): partial dots per column
    shard, summed over the axis, then each shard's columns of the output."""
    b, t, h, k = idx_BxTxHxK.shape
    u, v = self.experts_in_NxD[...], self.experts_out_NxD[...]
    rows, cols = kernel_impl.batch_axis(b), kernel_impl.mesh_axis("peer_dim", u.shape[1])
    impl, act = self.gather_impl, self.act

    def local(x, u, v, idx, g):
      bb = x.shape[0]
      x2, idx2, g2 = (x.reshape(bb * t, -1).astype(u.dtype), idx.reshape(bb * t, h * k),
                      g.reshape(bb * t, h * k))
      if cols is None:
        y = peer_ffn(x2, u, v, idx2, g2, activation=self.activation, impl=impl)
      else:
        pre = jax.lax.psum(gather_dot(u, idx2, x2, impl=impl), cols)
        y = gather_sum(v, idx2, g2 * act(pre), impl=impl)
      return y.reshape(bb, t, -1)

    fn = kernel_impl.per_shard(
        local, in_specs=(P(rows, None, cols), P(None, cols), P(None, cols), P(rows), P(rows)),
        out_specs=P(rows, None, cols))
    return fn(x_BxTxD, u, v, idx_BxTxHxK, g_BxTxHxK.astype(jnp.float32))

  # ---- accounting (sparsejax/models/accounting.py) ----
  def active_params_per_token(self) -> int:
    h, d = self.num_heads, self.d_model
    whiten = h * self.d_key ** 2 if self.qcenter.mode == "whiten" else 0  # W applied per head
    return d * h * self.d_key + h * self.n * self.d_key + h * self.top_k * 2 * d + whiten

  def bytes_read_per_token(self) -> int:
    """Selected expert rows (u and v) read per token: h·k·2·D·bytes(param dtype)."""
    return self.num_heads * self.top_k * 2 * self.d_model * self.param_bytes


def cost(layer: PEER, seq_len: int) -> LayerCost:
  return LayerCost(active_params=layer.active_params_per_token(),
                   table_bytes=layer.bytes_read_per_token())


FAMILY = Family("peer", "ffn", PEER, section=("peer", PEERConfig), check=check,
                rules=(*pk.RULES, ("peer_experts", None), ("peer_dim", "tensor")),
                param_groups=(
                    ParamGroup("peer_keys", "subkeys_",
                               lambda cfg: {"lr_mult": cfg.peer.key_lr_mult}),
                    ParamGroup("peer_queries", ("w_query_", "query_"),
                               lambda cfg: {"lr_mult": cfg.peer.query_lr_mult}),
                    ParamGroup("peer_experts", "experts_",
                               lambda cfg: {"lr_mult": cfg.peer.expert_lr_mult})),
                cost=cost, shapes=("model", "peer"),
                # the query projection; expert rows are looked up, not multiplied through
                prunable=(Prunable("w_query_DxHxK", 0),))


def dense_reference(layer: PEER, x_BxTxD: jax.Array) -> jax.Array:
  """All N experts scored explicitly (full keys = concatenated sub-key pairs), top-k per head
  over all N, output from the dense [N] gate vector: O(N) per token, for tests."""
  keys = layer.subkeys_Gx2xSxC[...].astype(jnp.float32)
  hk, _, n, c = keys.shape
  q = layer.queries(x_BxTxD)
  if layer.key_norm:
    keys = pk.normalize(keys, "rms", layer.eps)
    q = q * c ** -0.5
  full_GxNxK = jnp.concatenate([jnp.repeat(keys[:, 0], n, axis=1),
                                jnp.tile(keys[:, 1], (1, n, 1))], axis=-1)
  full = jnp.broadcast_to(full_GxNxK, (layer.num_heads, n * n, 2 * c))
  s_BxTxHxN = jnp.einsum("bthk,hnk->bthn", q, full)
  top, idx = jax.lax.top_k(s_BxTxHxN, layer.top_k)
  g = layer.gates(top)
  dense_g = jnp.zeros(s_BxTxHxN.shape, jnp.float32)
  dense_g = jnp.put_along_axis(dense_g, idx, g, axis=-1, inplace=False).sum(axis=2)  # [B,T,N]
  hidden = layer.act(jnp.einsum("btd,nd->btn", x_BxTxD.astype(jnp.float32),
                                layer.experts_in_NxD[...].astype(jnp.float32)))
  v_NxD = layer.experts_out_NxD[...].astype(jnp.float32)
  return jnp.einsum("btn,nd->btd", dense_g * hidden, v_NxD)

