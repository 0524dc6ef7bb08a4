"""Small helpers shared by the kernel packages (jax and numpy only)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def next_pow2(x: int) -> int:
  """The smallest power of two >= x (1 for x <= 1)."""
  return 1 << max(0, int(x) - 1).bit_length()


def is_pow2(x) -> bool:
  """True for a positive integer (Python or numpy) power of two."""
  return isinstance(x, (int, np.integer)) and x > 0 and (x & (x - 1)) == 0


def dot_f32(a, b, *, trans_a=False, trans_b=False):
  """f32-accumulating block matmul; f32 inputs at full precision (no TF32) for parity."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)
