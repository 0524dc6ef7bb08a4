"""Block-sparse attention (registry: "block_sparse"): the dense layer's projections, RoPE and
QK-norm, with the attention core restricted to ``config.attention.mask``.

The mask spec string (``"causal&window:1024"``, ``"bigbird:..."``, see
kernels_pallas.block_sparse_attention.masks.parse_mask) compiles to a block layout for the
sequence length seen at trace time (cached), bound to this layer's index so seeded masks
(BigBird random blocks) differ per layer and head. The kernel is chosen by
``config.attention.sparse_impl``: Pallas on GPU, the pure-jnp block-sparse path elsewhere,
``interpret`` runs the Pallas kernels on CPU ("auto": splash on TPU, Pallas on GPU when Triton
takes the block sizes, else the jnp path).

``attention.block_q`` / ``block_kv`` of 0 mean "auto": the block sizes (and the Triton
num_warps / num_stages) come from ``kernels_pallas.block_sparse_attention.tuning.choose`` for
the current device, head_dim and sequence length. On a GPU, causal bands that are dense enough
(``dense_dispatch``) go to cuDNN's fused attention instead of the block-sparse kernel. "Current
device" and "GPU" mean the target platform (sparsejax.parallel.hardware: the local device unless
a compile target is set).
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from kernels_pallas.block_sparse_attention.layout import compile_layout
from kernels_pallas.block_sparse_attention import splash, tuning
from kernels_pallas.block_sparse_attention.masks import Mask, parse_mask
from kernels_pallas.block_sparse_attention.ops import block_sparse_attention, triton_supports
from sparsejax.errors import ConfigError
from sparsejax.layers import kernel_impl
from sparsejax.layers.attention import PRUNABLE, DenseAttention, matmul_params
from sparsejax.layers.family import Family, LayerCost
from sparsejax.parallel import hardware
from sparsejax.parallel.sharding import active_mesh_rules, logical_spec

# Band limits at or beyond this magnitude stand for +-infinity (masks use 1 << 62).
_UNBOUNDED = 1 << 61
# Above this layout density a causal window is cheaper through cuDNN's dense kernel (TARGETS:
# at density > 0.5 never slower than 1.1x cuDNN; dispatching to it is fine).
DENSE_DISPATCH_DENSITY = 0.5


def dense_dispatch(mask: Mask | str, density: float, platform: str,
                   dtype=None) -> dict | None:
  """kwargs for ``jax.nn.dot_product_attention`` when this mask is better served by cuDNN's
  fused kernel, else None. Pure (no device queries), so it is testable on CPU.

  Yes on ``platform == "gpu"`` for a causal band ``lo <= kv - q <= 0``: plain causal (``lo``
  unbounded) at any density, a causal window only when ``density > 0.5``. cuDNN takes fp16 /
  bf16 only: a given ``dtype`` outside those gives None."""
  if platform != "gpu":
    return None
  if dtype is not None and jax.numpy.dtype(dtype) not in (jax.numpy.float16,
                                                          jax.numpy.bfloat16):
    return None
  mask = parse_mask(mask) if isinstance(mask, str) else mask
  band = mask.band
  if band is None or band[1] != 0:
    return None
  lo = band[0]
  kwargs = {"is_causal": True, "implementation": "cudnn"}
  if lo <= -_UNBOUNDED:
    return kwargs
  if lo > 0 or density <= DENSE_DISPATCH_DENSITY:
    return None
  kwargs["local_window_size"] = (int(-lo), 0)
  return kwargs


class BlockSparseAttention(DenseAttention):

  def __init__(self, cfg, layer_idx: int, *, rngs: nnx.Rngs, shared: dict | None = None):
    super().__init__(cfg, layer_idx, rngs=rngs, shared=shared)
    self.mask = parse_mask(cfg.attention.mask)  # parsed (and checked) once, at validation
    # the layer binds only seeded masks (BigBird's random blocks); others keep 0 so that identical
    # layers stay identical (one scan body under config.model.scan_layers)
    self.layer_idx = layer_idx if self.mask.for_layer(layer_idx) != self.mask.for_layer(0) else 0
    self.block_q, self.block_kv = cfg.attention.block_q, cfg.attention.block_kv  # 0 = auto
    self.sparse_impl = cfg.attention.sparse_impl
    self.num_heads, self.head_dim = cfg.model.num_heads, cfg.head_dim
    self.layout_heads = self.num_heads if self.mask.head_dependent else 1

  def block_config(self, seq_len: int) -> tuning.BlockConfig:
    """Block sizes and Triton launch parameters for ``seq_len``. A block of 0 in the config is
    taken from ``tuning.choose`` for the current device; explicit blocks are clipped to the
    sequence and keep the tuned num_warps / num_stages only when they equal the tuned blocks."""
    tuned = tuning.choose(hardware.device_kind(), self.head_dim, seq_len)
    bq = tuned.block_q if self.block_q == 0 else min(self.block_q, seq_len)
    bkv = tuned.block_kv if self.block_kv == 0 else min(self.block_kv, seq_len)
    if self.resolved_impl(bq, bkv) == "splash":
      # splash on a TPU takes blocks of whole 128-lane multiples (kv always, q in the backward);
      # the bridge pads the sequence up to them
      return tuning.BlockConfig(*splash.tpu_blocks(bq, bkv))
    if (bq, bkv) != (tuned.block_q, tuned.block_kv):
      return tuning.BlockConfig(bq, bkv)
    return tuned

  def resolved_impl(self, block_q: int, block_kv: int) -> str:
    """``sparse_impl`` with "auto" resolved for the target backend: "splash" on TPU, "pallas"
    on GPU when Triton takes the tiles, else "xla"."""
    if self.sparse_impl != "auto":
      return self.sparse_impl
    backend = hardware.backend()
    if backend == "tpu":
      return "splash"
    gpu_ok = backend == "gpu" and triton_supports(self.head_dim, block_q, block_kv)
    return "pallas" if gpu_ok else "xla"

  def layout(self, seq_len: int):
    bc = self.block_config(seq_len)
    return compile_layout(self.mask, seq_len, seq_len, bc.block_q, bc.block_kv,
                          num_heads=self.layout_heads, layer=self.layer_idx)

  def attention_flops_per_token(self, seq_len: int) -> float:
    """Forward FLOPs per token of scores and values over the visible elements only."""
    return 4.0 * seq_len * self.layout(seq_len).density * self.num_heads * self.head_dim

  def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array) -> jax.Array:
    q, k, v = self.project_qkv(x_BxTxD, positions_BxT)
    bc = self.block_config(q.shape[1])
    layout = self.layout(q.shape[1])
    dense = dense_dispatch(layout.mask, layout.density, hardware.backend(), q.dtype)
    if dense is not None:
      # Dense-enough causal band: cuDNN's fused kernel is the faster path (TARGETS: at density
      # > 0.5 never slower than 1.1x cuDNN).
      return self.project_out(jax.nn.dot_product_attention(q, k, v, **dense))
    impl = self.resolved_impl(layout.block_q, layout.block_kv)
    attend = functools.partial(block_sparse_attention, layout=layout, impl=impl,
                               num_warps=bc.num_warps, num_stages=bc.num_stages)
    active = active_mesh_rules()
    if active is not None and impl != "xla":
      # A Pallas kernel is a custom call the partitioner cannot split: run it per batch shard.
      spec = logical_spec(("act_batch", None, None, None), q.shape)
      attend = kernel_impl.per_shard(attend, in_specs=(spec, spec, spec), out_specs=spec)
    return self.project_out(attend(q, k, v))


def check(cfg) -> None:
  """The mask spec parses (one line naming config.attention.mask otherwise) and the block sizes
  are sane; runs at validation, before any dataset or workdir is touched."""
  a = cfg.attention
  try:
    parse_mask(a.mask)
  except (ValueError, TypeError, KeyError) as e:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(f"config.attention.mask: {a.mask!r} is not a valid mask spec: {msg}") from e
  for key in ("block_q", "block_kv"):
    if getattr(a, key) < 0:
      raise ConfigError(f"config.attention.{key}: must be >= 0 (0: tuned per device), "
                        f"got {getattr(a, key)}")


def cost(layer: BlockSparseAttention, seq_len: int) -> LayerCost:
  return LayerCost(active_params=matmul_params(layer),
                   attention_flops=layer.attention_flops_per_token(seq_len))


FAMILY = Family("block_sparse", "attention", BlockSparseAttention, check=check, cost=cost,
                shapes=("model", "attention"), prunable=PRUNABLE)
