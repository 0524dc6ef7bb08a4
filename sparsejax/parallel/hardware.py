"""What hardware the model is built for: peak FLOP/s per device kind (for MFU) and the target
platform that device-dependent layer choices read.

Layers that pick an implementation by device (attention ``impl="auto"`` -> cuDNN on GPUs, the
block-sparse tuning table and its cuDNN dispatch, ``"pallas"`` -> ``"interpret"`` on CPUs) ask
``backend()`` / ``device_kind()`` here instead of ``jax.devices()``. By default these describe
the first local device, as before; inside ``target(backend, device_kind)`` they describe the
devices a program is being compiled for (``sparsejax compile-check`` builds a TPU or GPU step on
a CPU host this way). The setting is a context variable, so it must surround both the model
build (``model_spec``) and the tracing (``lower``).

Backend names are jax's: "cpu", "gpu" (CUDA / ROCm), "tpu".
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax

from sparsejax.parallel import targets


@dataclasses.dataclass(frozen=True)
class Platform:
  backend: str       # "cpu" | "gpu" | "tpu"
  device_kind: str   # jax Device.device_kind, e.g. "TPU v5 lite", "NVIDIA H100 80GB HBM3"


_TARGET: contextvars.ContextVar[Platform | None] = contextvars.ContextVar(
    "sparsejax_target_platform", default=None)
_GPU_NAMES = ("gpu", "cuda", "rocm")


def _normalise(backend: str) -> str:
  return "gpu" if backend.lower() in _GPU_NAMES else backend.lower()


def current() -> Platform:
  """The target set by ``target(...)``, else the first local device."""
  chosen = _TARGET.get()
  if chosen is not None:
    return chosen
  device = jax.devices()[0]
  return Platform(_normalise(device.platform), device.device_kind)


def backend() -> str:
  return current().backend


def device_kind() -> str:
  return current().device_kind


@contextlib.contextmanager
def target(backend_name: str, kind: str):
  """Within this context, layers build and trace for ``backend_name`` / ``kind``."""
  token = _TARGET.set(Platform(_normalise(backend_name), kind))
  try:
    yield
  finally:
    _TARGET.reset(token)


# Dense bf16 peak FLOP/s per device kind substring (targets.toml), for MFU. Override with
# config.train.peak_tflops_per_device.
PEAK_TFLOPS = targets.peak_table()


def peak_tflops(device_kind: str, override: float = 0.0) -> float | None:
  """Peak dense bf16 TFLOP/s for a jax device kind; None if unknown (then MFU is not logged)."""
  if override > 0:
    return override
  chip = targets.chip_for_kind(device_kind)
  return None if chip is None else chip.peak_bf16_tflops
