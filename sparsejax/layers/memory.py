"""Product-key memory layers: PKM (Lample et al. 2019) and Memory+ ("Memory Layers at Scale",
Berges et al. 2024). Registry key ``ffn.type = "memory"``, typically on chosen layers only:
``ffn.overrides=("1:memory",)``.

Per layer, each of H heads has its own query projection W_q^h (D -> d_key) and its own two sets
of n = sqrt(N) sub-keys; it retrieves its top-k slots among the N product keys
(sparsejax.layers.product_keys) and reads the softmax-weighted sum of their value rows. Heads'
reads are summed (all heads share one value table):

    mem(x) = sum_h sum_{i in topk_h(x)} softmax_h(s)_i · V[i]          V = values_NxD  [N, D]
    PKM:     y = mem(x)
    Memory+: y = W_o( silu(x W_1) ⊙ mem(x) )      W_1, W_o: D x D   (memory.memory_plus)
    gate:    y = sigmoid(x · w_g) · y             per-token scalar gate (memory.gate)

QK-norm (memory.qk_norm) as implemented here: each query half is RMS-normalised with a learned
per-head scale, each sub-key row is RMS-normalised (no parameters), and the half-scores are
divided by sqrt(d_key/2), i.e. s = (q̂1·k̂1 + q̂2·k̂2) / sqrt(d_key/2). Without it the raw
projections are scored. Before either, queries are centred / whitened (``memory.query_center``,
sparsejax/layers/query_center.py: PKM's query BatchNorm and its decorrelating extension).

Optimizer groups (sparsejax/train/optim.py): the value table ``values_NxD`` ("memory_values")
trains at ``memory.value_lr`` with its own clip and ``memory.value_weight_decay``: constant
(``memory.value_lr_schedule="constant"``, the default, as PKM's separate value optimizer), or
``"main"``: the main lr schedule's shape (warmup, decay) scaled to that peak, as Memory Layers
at Scale's code does (values at 10x the main lr under the same LambdaLR schedule, with the
global weight decay). The sub-keys ("memory_keys") and the query projection with its QK-norm
scale ("memory_queries") train at ``memory.key_lr_mult`` / ``memory.query_lr_mult`` times the
main schedule, with the main weight decay and clipping. With ``memory.shared_values``
(default) one ``MemoryValues`` module is created in the model's ``shared`` dict and referenced by
every memory layer (keys and query projections stay per layer). Logical axes
("mem_slots", "mem_dim") -> rows replicated, columns over mesh "tensor": each device holds all
N rows and D/M columns, so a lookup is local and only the [B, T, D] output is split by column.
Sown: ``usage_slots`` (float32 [N] selection counts).

Kernels (``memory.impl``, resolved by sparsejax/layers/kernel_impl.py): "xla" is jnp top-k and
take + einsum; "pallas" runs the fused product-key top-k + softmax kernel and the weighted
gather-sum kernel (deterministic sorted reverse-index table gradient) of kernels_pallas.

Cost convention (models/accounting.py units, per token): D·H·d_key (queries) + H·n·d_key (sub-key
scores) + H·k·D (value rows) + 2·D² (Memory+) + D (gate) + H·d_key² (query whitening).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from kernels_pallas.gather_sum.ops import gather_sum
from sparsejax.config import field
from sparsejax.layers import kernel_impl
from sparsejax.layers import product_keys as pk
from sparsejax.layers.common import DTYPES, param, sow
from sparsejax.layers.family import Family, LayerCost, ParamGroup, Prunable
from sparsejax.layers.query_center import QueryCenter, usage_scalars
from sparsejax.parallel.sharding import constrain


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
  """``config.memory``."""
  num_slots: int = field(1024 ** 2, shapes=True)  # N = n^2 value rows
  num_heads: int = field(4, shapes=True)  # own query projection + own sub-keys, shared values
  top_k: int = 32                # slots per head (k <= n)
  d_key: int = field(512, shapes=True)
  memory_plus: bool = field(True, shapes=True)  # W_o(silu(x W_1) * mem(x)) (Memory Layers at Scale)
  gate: bool = field(False, shapes=True)  # per-token scalar gate sigmoid(x·w_g) on the output
  qk_norm: bool = field(True, shapes=True)  # RMS-normalise query halves and sub-key rows
  shared_values: bool = field(True, shapes=True)  # one value table for all memory layers
  # query centring and whitening against retrieval collapse (sparsejax/layers/query_center.py)
  query_center: str = field("whiten", "whiten", "batch", "running", "none", shapes=True)
  query_center_momentum: float = 0.9
  # optimizer groups (module docstring): the values' lr, constant ("constant") or the peak of
  # the main schedule's shape ("main"), their own clip and weight decay; multipliers of the
  # main schedule for the sub-keys and the query projection (+ its QK-norm scale). Defaults
  # measured on the tiny presets (experiments/results/retrieval_usage/REPORT.md): a constant
  # value lr beat the main schedule at the same peak (eval loss -0.06 / -0.02 at 32² / 128²
  # slots) and tied with the schedule at a 3x peak; value weight decay 0.1 and key / query
  # multipliers of 3 gave no consistent gain.
  value_lr: float = 1e-3
  value_lr_schedule: str = field("constant", "constant", "main")
  value_grad_clip: float = 1.0
  value_weight_decay: float = 0.0
  key_lr_mult: float = 1.0
  query_lr_mult: float = 1.0
  # kernels: "xla" (jnp) | "pallas" (Triton kernels on GPU, interpret mode on CPU; on TPU the
  # Mosaic gather kernels, XLA top-k: sparsejax/layers/kernel_impl.py) | "interpret" (force
  # interpret mode) | "mosaic_interpret" (the TPU gather kernels in TPU interpret mode)
  impl: str = field("xla", "xla", "pallas", "interpret", "mosaic_interpret")

SHARED_KEY = "memory_values"


def check(cfg) -> None:
  m = cfg.memory
  pk.check_product_key_section("config.memory", num_keys=m.num_slots, top_k=m.top_k,
                               d_key=m.d_key, num_heads=m.num_heads)
  pk.check_nonnegative("config.memory", value_lr=m.value_lr, value_grad_clip=m.value_grad_clip,
                       value_weight_decay=m.value_weight_decay, key_lr_mult=m.key_lr_mult,
                       query_lr_mult=m.query_lr_mult)


class MemoryValues(nnx.Module):
  """The value table [N, D]; init N(0, 1/D) as in PKM."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d, pdt = cfg.model.d_model, DTYPES[cfg.model.param_dtype]
    self.values_NxD = param(rngs, (cfg.memory.num_slots, d), ("mem_slots", "mem_dim"),
                            std=d ** -0.5, dtype=pdt)


class MemoryLayer(nnx.Module):

  def __init__(self, cfg, layer_idx: int, *, rngs: nnx.Rngs, shared: dict | None = None):
    m, d = cfg.memory, cfg.model.d_model
    std, pdt = cfg.model.init_std, DTYPES[cfg.model.param_dtype]
    self.num_slots, self.num_heads, self.top_k, self.d_key = (
        m.num_slots, m.num_heads, m.top_k, m.d_key)
    self.n = pk.isqrt_exact(m.num_slots)
    self.d_model = d
    self.param_bytes = jnp.dtype(pdt).itemsize
    self.qk_norm, self.eps = m.qk_norm, cfg.model.norm_eps
    self.impl = kernel_impl.resolve(m.impl, "config.memory.impl", "topk")
    self.gather_impl = kernel_impl.resolve(m.impl, "config.memory.impl", "gather")
    self.dtype = DTYPES[cfg.model.compute_dtype]
    h, c = m.num_heads, m.d_key // 2
    self.w_query_DxHxK = param(rngs, (d, h, m.d_key), ("embed", "pk_heads", "pk_dim"), std=std,
                               dtype=pdt)
    self.query_scale_HxK = (nnx.Param(jnp.ones((h, m.d_key), pdt),
                                      logical_axes=("pk_heads", "pk_dim")) if m.qk_norm else None)
    self.qcenter = QueryCenter(m.query_center, h, m.d_key, momentum=m.query_center_momentum,
                               eps=cfg.model.norm_eps)
    self.subkeys_Hx2xSxC = param(rngs, (h, 2, self.n, c),
                                 ("pk_heads", None, "pk_subkeys", "pk_dim"), std=c ** -0.5,
                                 dtype=pdt)
    if m.shared_values:
      if shared is None:
        raise ValueError("memory.shared_values needs the model's `shared` dict")
      if SHARED_KEY not in shared:
        shared[SHARED_KEY] = MemoryValues(cfg, rngs=rngs)
      self.values = shared[SHARED_KEY]
    else:
      self.values = MemoryValues(cfg, rngs=rngs)
    self.memory_plus = m.memory_plus
    if m.memory_plus:
      out_std = std / (2 * cfg.model.num_layers) ** 0.5
      self.w_in_DxD = param(rngs, (d, d), ("embed", "mlp"), std=std, dtype=pdt)
      self.w_out_DxD = param(rngs, (d, d), ("mlp", "embed"), std=out_std, dtype=pdt)
    else:
      self.w_in_DxD = self.w_out_DxD = None
    self.w_gate_D = (param(rngs, (d,), ("embed",), std=std, dtype=pdt) if m.gate else None)

  # ---- retrieval (also used by tests) ----
  def half_queries_and_keys(self, x_BxTxD: jax.Array, training: bool = False):
    """(q1, q2 [B, T, H, C], k1, k2 [H, n, C]) after centring, QK-norm and score scaling,
    float32 (``training``: batch statistics for query_center="batch" / "whiten")."""
    c = self.d_key // 2
    q = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.w_query_DxHxK[...].astype(self.dtype),
                   preferred_element_type=jnp.float32)
    q = self.qcenter(q, training)
    keys = self.subkeys_Hx2xSxC[...].astype(jnp.float32)
    k1, k2 = keys[:, 0], keys[:, 1]
    q1, q2 = q[..., :c], q[..., c:]
    if self.qk_norm:
      scale = self.query_scale_HxK[...]
      q1 = pk.normalize(q1, "rms", self.eps, scale[:, :c]) * c ** -0.5
      q2 = pk.normalize(q2, "rms", self.eps, scale[:, c:]) * c ** -0.5
      k1, k2 = pk.normalize(k1, "rms", self.eps), pk.normalize(k2, "rms", self.eps)
    return q1, q2, k1, k2

  def retrieve(self, x_BxTxD: jax.Array, *, softmax: bool = False, training: bool = False
               ) -> tuple[jax.Array, jax.Array]:
    """(scores [B, T, H, k] float32 — softmax weights with ``softmax`` —, slot indices
    [B, T, H, k] int32)."""
    dt = self.dtype
    q1, q2, k1, k2 = self.half_queries_and_keys(x_BxTxD, training)
    return pk.product_key_topk(q1.astype(dt), q2.astype(dt), k1.astype(dt), k2.astype(dt),
                               self.top_k, impl=self.impl, softmax=softmax)

  def read(self, weights_BxTxHxK: jax.Array, idx_BxTxHxK: jax.Array) -> jax.Array:
    """sum_h sum_k w · V[idx]: [B, T, D] in the compute dtype."""
    table = self.values.values_NxD[...]
    if self.gather_impl != "xla":
      return self._read_kernel(table, weights_BxTxHxK, idx_BxTxHxK).astype(self.dtype)
    rows = jnp.take(table, idx_BxTxHxK, axis=0).astype(self.dtype)
    rows = constrain(rows, ("act_batch", "act_length", None, None, "act_mem_dim"))
    out = jnp.einsum("bthk,bthkd->btd", weights_BxTxHxK.astype(self.dtype), rows)
    return constrain(out, ("act_batch", "act_length", "act_mem_dim"))

  def _read_kernel(self, table_NxD, w_BxTxHxK, idx_BxTxHxK):
    """The weighted gather-sum kernel over the table as stored (no full-table cast), per batch
    shard and per column shard of the values (their columns follow the "mem_dim" rule)."""
    b, t, h, k = idx_BxTxHxK.shape
    rows, cols = kernel_impl.batch_axis(b), kernel_impl.mesh_axis("mem_dim", table_NxD.shape[1])

    def local(table, w, idx):
      bb = idx.shape[0]
      out = gather_sum(table, idx.reshape(bb * t, h * k), w.reshape(bb * t, h * k),
                       impl=self.gather_impl)
      return out.reshape(bb, t, -1)

    fn = kernel_impl.per_shard(local, in_specs=(P(None, cols), P(rows), P(rows)),
                               out_specs=P(rows, None, cols))
    return fn(table_NxD, w_BxTxHxK.astype(jnp.float32), idx_BxTxHxK)

  def output(self, x_BxTxD: jax.Array, mem_BxTxD: jax.Array) -> jax.Array:
    dt = self.dtype
    y = mem_BxTxD
    if self.memory_plus:
      gate = jax.nn.silu(jnp.einsum("btd,de->bte", x_BxTxD, self.w_in_DxD[...].astype(dt)))
      y = jnp.einsum("bte,ed->btd", gate * y, self.w_out_DxD[...].astype(dt))
    if self.w_gate_D is not None:
      g = jax.nn.sigmoid(jnp.einsum("btd,d->bt", x_BxTxD, self.w_gate_D[...].astype(dt),
                                    preferred_element_type=jnp.float32))
      y = y * g[..., None].astype(dt)
    return y

  def __call__(self, x_BxTxD: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """``rng`` is given in training only (the train step's per-layer key): it selects batch
    statistics for query centring."""
    weights, idx = self.retrieve(x_BxTxD, softmax=True, training=rng is not None)
    counts = pk.usage_counts(idx, self.num_slots)
    sow(self, "usage_slots", counts)
    for name, value in usage_scalars(counts).items():
      sow(self, name, value)
    mem = self.read(weights, idx)
    y = self.output(x_BxTxD, mem)
    return constrain(y, ("act_batch", "act_length", "act_embed"))

  # ---- accounting (sparsejax/models/accounting.py) ----
  def active_params_per_token(self) -> int:
    h, d = self.num_heads, self.d_model
    n = d * h * self.d_key + h * self.n * self.d_key + h * self.top_k * d
    if self.memory_plus:
      n += 2 * d * d
    if self.w_gate_D is not None:
      n += d
    if self.qcenter.mode == "whiten":
      n += h * self.d_key ** 2  # the whitening matrix applied to each head's query
    return n

  def bytes_read_per_token(self) -> int:
    """Selected value rows read per token: H·k·D·bytes(param dtype)."""
    return self.num_heads * self.top_k * self.d_model * self.param_bytes


def cost(layer: MemoryLayer, seq_len: int) -> LayerCost:
  return LayerCost(active_params=layer.active_params_per_token(),
                   table_bytes=layer.bytes_read_per_token())


def _value_hyper(cfg) -> dict:
  m = cfg.memory
  lr = {"peak_lr": m.value_lr} if m.value_lr_schedule == "main" else {"lr": m.value_lr}
  return {**lr, "grad_clip": m.value_grad_clip, "weight_decay": m.value_weight_decay}


FAMILY = Family(
    "memory", "ffn", MemoryLayer, section=("memory", MemoryConfig), check=check,
    rules=(*pk.RULES, ("mem_slots", None), ("mem_dim", "tensor"), ("act_mem_dim", "tensor")),
    # value tables (values_*): own lr (constant, or the peak of the main schedule), clip and
    # weight decay; sub-keys and query projection (+ QK-norm scale): multiples of the main one
    param_groups=(ParamGroup("memory_values", "values_", _value_hyper),
                  ParamGroup("memory_keys", "subkeys_",
                             lambda cfg: {"lr_mult": cfg.memory.key_lr_mult}),
                  ParamGroup("memory_queries", ("w_query_", "query_"),
                             lambda cfg: {"lr_mult": cfg.memory.query_lr_mult})),
    cost=cost, shapes=("model", "memory"),
    # query projection and the Memory+ input / output projections (value rows are looked up)
    prunable=(Prunable("w_query_DxHxK", 0), Prunable("w_in_DxD", 0), Prunable("w_out_DxD", 0)))


def brute_force_reference(layer: MemoryLayer, x_BxTxD: jax.Array) -> jax.Array:
  """All N keys scored explicitly (concatenated sub-key pairs), top-k per head over all N,
  dense [N] weights times the whole value table: O(N) per token, for tests."""
  q1, q2, k1, k2 = layer.half_queries_and_keys(x_BxTxD)
  h, n, c = k1.shape
  full_HxNx2C = jnp.concatenate([jnp.repeat(k1, n, axis=1), jnp.tile(k2, (1, n, 1))], axis=-1)
  s = jnp.einsum("bthk,hnk->bthn", jnp.concatenate([q1, q2], -1), full_HxNx2C)
  top, idx = jax.lax.top_k(s, layer.top_k)
  w = jnp.put_along_axis(jnp.zeros(s.shape, jnp.float32), idx, jax.nn.softmax(top, -1), axis=-1,
                         inplace=False).sum(axis=2)
  mem = jnp.einsum("btn,nd->btd", w, layer.values.values_NxD[...].astype(jnp.float32))
  return layer.output(x_BxTxD, mem.astype(layer.dtype))
