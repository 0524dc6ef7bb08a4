"""Small shared pieces: parameter creation with logical axes, RMSNorm, RoPE, dtype lookup."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def sow(module: nnx.Module, name: str, value) -> None:
  """Report ``value`` under ``name`` to an enclosing ``nnx.capture(nnx.Intermediate)`` (the train
  and eval steps); a no-op outside one, so a plain ``model(tokens)`` call stores nothing."""
  module.sow(nnx.Intermediate, name, value, capture_noop=True)


def param(rngs: nnx.Rngs, shape: tuple[int, ...], logical_axes: tuple[str | None, ...],
          *, std: float, dtype=jnp.float32) -> nnx.Param:
  """A normally initialised parameter (truncated at 3 std) carrying its logical axis names."""
  init = jax.nn.initializers.truncated_normal(stddev=std, dtype=dtype)
  return nnx.Param(init(rngs.params(), shape), logical_axes=tuple(logical_axes))


class RMSNorm(nnx.Module):
  """y = x / rms(x) * scale, computed in float32, returned in the input dtype."""

  def __init__(self, dim: int, *, eps: float, logical_axis: str = "norm",
               param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(logical_axis,))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (rotate-half convention), angles computed in float32."""
  h = x_BxTxNxH.shape[-1]
  inv_freq_F = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  angles_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_F
  sin, cos = jnp.sin(angles_BxTxF)[:, :, None, :], jnp.cos(angles_BxTxF)[:, :, None, :]
  x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)
