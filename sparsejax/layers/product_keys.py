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

``impl="xla"`` is this pure-jnp version; ``"pallas"`` is reserved for the fused kernel
(kernels_pallas) and is refused by the config checks until it lands.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sparsejax.parallel.sharding import register_rules

# Logical axes of the product-key parameters (all replicated by default: sub-keys are small,
# n·d_key per head). Value tables / expert tables are column-sharded (see memory.py, peer.py).
register_rules(pk_heads=None, pk_subkeys=None, pk_dim=None)


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
                     top_k: int, *, impl: str = "xla") -> tuple[jax.Array, jax.Array]:
  """Exact top-k over the n² product keys.

  Args:
    q1, q2: query halves [..., H, C].
    keys1, keys2: sub-key tables [H, n, C] (or [1, n, C]: shared by all heads).
    top_k: k <= n.
  Returns:
    (scores [..., H, k] float32, descending; indices [..., H, k] int32 in [0, n²)).
  """
  if impl != "xla":
    raise ValueError(f"product-key impl {impl!r}: only 'xla' exists until the Pallas "
                     "product-key kernel lands; set config.peer.impl / config.memory.impl='xla'")
  n = keys1.shape[-2]
  if keys2.shape[-2] != n:
    raise ValueError(f"sub-key tables differ in size: {keys1.shape} vs {keys2.shape}")
  if not 0 < top_k <= n:
    raise ValueError(f"top_k={top_k} must be in [1, n={n}] (n = sqrt(number of keys))")
  s1 = subkey_scores(q1, keys1)
  s2 = subkey_scores(q2, keys2)
  a1, i1 = jax.lax.top_k(s1, top_k)
  a2, i2 = jax.lax.top_k(s2, top_k)
  cand = (a1[..., :, None] + a2[..., None, :]).reshape(a1.shape[:-1] + (top_k * top_k,))
  scores, c = jax.lax.top_k(cand, top_k)
  rows = jnp.take_along_axis(i1, c // top_k, axis=-1)
  cols = jnp.take_along_axis(i2, c % top_k, axis=-1)
  return scores, (rows * n + cols).astype(jnp.int32)


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
                              num_heads: int, impl: str) -> None:
  """One-line ConfigErrors for an impossible product-key section (``prefix`` = "config.peer")."""
  from sparsejax.config import ConfigError  # late: config imports the schema, not the layers
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
  if impl != "xla":
    raise ConfigError(f"{prefix}.impl: {impl!r} is not available yet; use 'xla'")
