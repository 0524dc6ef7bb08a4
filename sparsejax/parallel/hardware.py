"""Peak dense bf16 FLOP/s per device kind, for model-FLOPs utilisation (MFU)."""

from __future__ import annotations


# Dense bf16 peak FLOP/s per device, for MFU. Override with config.train.peak_tflops_per_device.
PEAK_TFLOPS = {
    "h200": 989.0, "h100": 989.0, "gh200": 989.0, "a100": 312.0, "l4": 121.0, "b200": 2250.0,
    "tpu v4": 275.0, "tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v5p": 459.0, "tpu v5": 459.0,
    "tpu v6 lite": 918.0, "tpu v6e": 918.0,
}


def peak_tflops(device_kind: str, override: float = 0.0) -> float | None:
  """Peak dense bf16 TFLOP/s for a jax device kind; None if unknown (then MFU is not logged)."""
  if override > 0:
    return override
  kind = device_kind.lower()
  for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
    if key in kind:
      return PEAK_TFLOPS[key]
  return None
