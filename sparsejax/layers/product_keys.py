"""Product-key top-k retrieval (Lample et al. 2019), shared by PEER and the memory layers.

N = n² keys are never stored: key (i, j) is the concatenation of sub-key ``K1[i]`` and
``K2[j]``, so its score against a query q = [q1, q2] is ``q1·K1[i] + q2·K2[j]``. The exact top-k
over all N keys is found from the top-k of each half (the best k pairs can only use sub-keys that
are each within their half's top-k) by scoring the k×k candidate sums:

    s1 = q1 K1ᵀ, s2 = q2 K2ᵀ          [.., H, n] each (float32 accumulation)
    (a1, i1) = top_k(s1), (a2, i2) = top_k(s2)
    cand[a, b] = a1[a] + a2[b]        [.., H, k·k]
    (scores, c) = top_k(cand)          index = i1[c // k] · n + i2[c % k]

Cost per token and head: 2·n·(d_key/2) multiply-adds for the sub-key scores (what
``active_params_per_token`` counts as n·d_key "equivalent matmul parameters"), plus top-k's and
k² additions (ignored, like softmax elsewhere).

``impl="xla"`` is this pure-jnp version; ``"pallas"`` / ``"interpret"`` run the fused kernel of
kernels_pallas/product_key_topk (sub-key scores, both top-k's, the k×k combine and the optional
softmax in one program per token block and head, so no score ever round-trips to HBM), per batch
shard under an active mesh (sparsejax/layers/kernel_impl.py). The config value "pallas" is
resolved per backend by ``kernel_impl.resolve``.

Query BatchNorm (used by PKM and PEER) and its decorrelating extension live in
sparsejax/layers/query_center.py (``query_center`` = "whiten" | "batch" | "running" | "none";
running statistics in ``buffer_*`` parameters); ``query_norm`` = "rms" / "layer" normalise each
token's query on its own after that.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jax.sharding import PartitionSpec as P

from kernels_pallas.product_key_topk.ops import product_key_topk as fused
from sparsejax.errors import ConfigError
from sparsejax.layers import kernel_impl

# Logical axes of the product-key parameters (all replicated by default: sub-keys are small,
# n·d_key per head); part of the PEER and memory families' rules. Value tables / expert tables
# are column-sharded (see memory.py, peer.py).
RULES = (("pk_heads", None), ("pk_subkeys", None), ("pk_dim", None))


def isqrt_exact(n: int) -> int | None:
  """r with r*r == n, else None."""
  r = math.isqrt(n)
  return r if r * r == n else None


def subkey_scores(q_half: jax.Array, keys_half: jax.Array) -> jax.Array:
  """q_half [..., H, C] x keys_half [H or 1, n, C] -> [..., H, n] float32."""
  h = q_half.shape[-2]
  keys_half = jnp.broadcast_to(keys_half, (h,) + keys_half.shape[1:])
  return jnp.einsum("...hc,hnc->...hn", q_half, keys_half.astype(q_half.dtype),
                    preferred_element_type=jnp.float32)


def product_key_topk(q1: jax.Array, q2: jax.Array, keys1: jax.Array, keys2: jax.Array,
                     top_k: int, *, impl: str = "xla",
                     softmax: bool = False) -> tuple[jax.Array, jax.Array]:
  """Exact top-k over the n² product keys.

  Args:
    q1, q2: query halves [B, T, H, C].
    keys1, keys2: sub-key tables [H, n, C] (or [1, n, C]: shared by all heads).
    top_k: k <= n.
    impl: "xla" (this module's jnp version) | "pallas" | "interpret" (the fused kernel).
    softmax: return softmax weights over the k scores instead of the scores.
  Returns:
    (scores or weights [B, T, H, k] float32, scores descending; indices [B, T, H, k] int32 in
    [0, n²)).
  """
  n = keys1.shape[-2]
  if keys2.shape[-2] != n:
    raise ValueError(f"sub-key tables differ in size: {keys1.shape} vs {keys2.shape}")
  if not 0 < top_k <= n:
    raise ValueError(f"top_k={top_k} must be in [1, n={n}] (n = sqrt(number of keys))")
  if impl != "xla":
    return _kernel_topk(q1, q2, keys1, keys2, top_k, impl=impl, softmax=softmax)
  s1 = subkey_scores(q1, keys1)
  s2 = subkey_scores(q2, keys2)
  a1, i1 = jax.lax.top_k(s1, top_k)
  a2, i2 = jax.lax.top_k(s2, top_k)
  cand = (a1[..., :, None] + a2[..., None, :]).reshape(a1.shape[:-1] + (top_k * top_k,))
  scores, c = jax.lax.top_k(cand, top_k)
  rows = jnp.take_along_axis(i1, c // top_k, axis=-1)
  cols = jnp.take_along_axis(i2, c % top_k, axis=-1)
  if softmax:
    scores = jax.nn.softmax(scores, axis=-1)
  return scores, (rows * n + cols).astype(jnp.int32)


def _kernel_topk(q1, q2, keys1, keys2, top_k, *, impl, softmax):
  """The fused kernel, per batch shard when a mesh is active (sub-keys replicated)."""
  keys1, keys2 = keys1.astype(q1.dtype), keys2.astype(q2.dtype)
  bspec = P(kernel_impl.batch_axis(q1.shape[0]), None, None, None)
  fn = kernel_impl.per_shard(
      lambda a, b, c, d: fused(a, b, c, d, top_k, softmax=softmax, impl=impl),
      in_specs=(bspec, bspec, P(), P()), out_specs=(bspec, bspec))
  return fn(q1, q2, keys1, keys2)


def usage_counts(indices: jax.Array, num_keys: int) -> jax.Array:
  """How often each of the ``num_keys`` entries was selected: float32 [num_keys]."""
  flat = jax.lax.stop_gradient(indices).reshape(-1)
  return jnp.zeros((num_keys,), jnp.float32).at[flat].add(1.0)


def normalize(x: jax.Array, kind: str, eps: float, scale=None, bias=None) -> jax.Array:
  """Per-vector normalisation over the last axis in float32: "rms" | "layer" | "none"."""
  x32 = x.astype(jnp.float32)
  if kind == "none":
    return x32
  if kind == "layer":
    x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
  elif kind != "rms":
    raise ValueError(f"unknown normalisation {kind!r}")
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  if scale is not None:
    y = y * scale.astype(jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y


def check_product_key_section(prefix: str, *, num_keys: int, top_k: int, d_key: int,
                              num_heads: int) -> None:
  """One-line ConfigErrors for an impossible product-key section (``prefix`` = "config.peer")."""
  n = isqrt_exact(num_keys) if num_keys > 0 else None
  if n is None:
    raise ConfigError(f"{prefix}: {num_keys} keys is not a perfect square n*n (product keys need "
                      "N = n^2, e.g. 1024**2 = 1048576)")
  if not 0 < top_k <= n:
    raise ConfigError(f"{prefix}.top_k: {top_k} must be in [1, sqrt(N) = {n}]")
  if d_key <= 0 or d_key % 2:
    raise ConfigError(f"{prefix}.d_key: must be a positive even number (split in two halves), "
                      f"got {d_key}")
  if num_heads <= 0:
    raise ConfigError(f"{prefix}.num_heads: must be > 0, got {num_heads}")


def check_nonnegative(prefix: str, **values: float) -> None:
  """One-line ConfigError for the first negative optimizer knob (``prefix`` = "config.peer")."""
  for key, v in values.items():
    if not v >= 0:
      raise ConfigError(f"{prefix}.{key}: must be >= 0, got {v}")
