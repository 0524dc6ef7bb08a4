"""Per-device starting block sizes for the block-sparse attention kernels.

``choose(device_kind, head_dim, seq_len)`` returns a ``BlockConfig`` (block_q, block_kv,
num_warps, num_stages) from a small table keyed by (device-kind substring, head_dim), falling
back to a per-device or global default.

THESE ENTRIES ARE STARTING POINTS, NOT MEASUREMENTS FROM THIS REPO: they follow the usual
Triton flash-attention settings for each GPU generation (128-row q tiles, 64-wide kv tiles,
8 warps at head_dim 128, 4 at 64) and have not been timed against this kernel. Measure them on
the target GPU with

    python benchmarks/attention.py --tune          # sweeps blocks x num_warps, fwd and fwd+bwd

which prints the best configuration per (sequence, mask) row and writes it into the JSON in
this table's format (``"tuned": {"block_q": .., "block_kv": .., "num_warps": .., ...}``), ready
to paste below. ``num_warps`` / ``num_stages`` of ``None`` leave the choice to the kernel.
"""

from __future__ import annotations

import dataclasses
from kernels_pallas._util import next_pow2 as _next_pow2


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  block_q: int
  block_kv: int
  num_warps: int | None = None
  num_stages: int | None = None

  def asdict(self) -> dict:
    return dataclasses.asdict(self)


# (device-kind substring, matched case-insensitively; head_dim) -> BlockConfig.
# Unmeasured starting points (see the module docstring); the first matching substring wins.
TABLE: dict[tuple[str, int], BlockConfig] = {
    ("H200", 64): BlockConfig(128, 64, num_warps=4, num_stages=3),
    ("H200", 128): BlockConfig(128, 64, num_warps=8, num_stages=3),
    ("H100", 64): BlockConfig(128, 64, num_warps=4, num_stages=3),
    ("H100", 128): BlockConfig(128, 64, num_warps=8, num_stages=3),
    ("A100", 64): BlockConfig(128, 64, num_warps=4, num_stages=3),
    ("A100", 128): BlockConfig(128, 64, num_warps=8, num_stages=2),
    # CPU / interpret: the jnp path gathers whole kv blocks; warps / stages are meaningless.
    ("cpu", 64): BlockConfig(64, 64),
    ("cpu", 128): BlockConfig(64, 64),
}

DEFAULT_GPU = BlockConfig(64, 64, num_warps=4, num_stages=2)
DEFAULT = BlockConfig(64, 64)
MIN_BLOCK = 16


def lookup(device_kind: str, head_dim: int) -> BlockConfig | None:
  """The table entry for this device and head_dim: the exact head_dim, else the device's entry
  with the nearest head_dim; None if no substring of the table matches ``device_kind``."""
  kind = (device_kind or "").lower()
  for sub in dict.fromkeys(s for s, _ in TABLE):
    if sub.lower() in kind:
      dims = [d for s, d in TABLE if s == sub]
      best = min(dims, key=lambda d: (abs(d - head_dim), d))
      return TABLE[(sub, best)]
  return None


def choose(device_kind: str, head_dim: int, seq_len: int) -> BlockConfig:
  """Block config for ``device_kind`` (``jax.devices()[0].device_kind``) and ``head_dim``, with
  blocks capped at the sequence length rounded up to a power of two (at least 16), so a short
  sequence is never padded to a block larger than itself needs."""
  cfg = lookup(device_kind, head_dim)
  if cfg is None:
    gpu_like = any(w in (device_kind or "").lower() for w in ("nvidia", "gpu", "tesla", "rtx"))
    cfg = DEFAULT_GPU if gpu_like else DEFAULT
  cap = max(MIN_BLOCK, _next_pow2(seq_len))
  return dataclasses.replace(cfg, block_q=min(cfg.block_q, cap),
                             block_kv=min(cfg.block_kv, cap))
