"""The devices of a compile target and the compiler context they need, on a host without them.

TPU: ``jax.experimental.topologies.get_topology_desc(platform="tpu", ...)`` with the slice's
topology from sparsejax/parallel/targets.toml; several slices carry ``slice_index`` (the mesh's
dcn axis groups by it). Needs libtpu (``pip install "jax[tpu]==<jax version>"``).

GPU: ``get_topology_desc(platform="cuda", target_config=<GpuTargetConfigProto text>,
topology="1x<nodes>x<gpus>")``; each node is a process (``process_index``), as in a real run with
one process per node. Needs the CUDA PJRT plugin (``jax-cuda13-plugin`` and
``jax-cuda13-pjrt``, ``--no-deps``: no CUDA libraries) and ``JAX_PLATFORMS=cpu``. The proto
texts live in kernels_pallas/_targets/ (kernels_pallas._aot); a chip of the same die (H200)
overrides the memory size, bandwidth and name there.

``compiling_for(target, devices)`` is the context to build, trace and compile in: the layers'
device-dependent choices resolve for the target (sparsejax.parallel.hardware), and on a GPU
target JAX's cuDNN attention checks are answered for it (the cuDNN version the CUDA plugin
requires at least, the target's compute capability: on a CPU host they would fail with "cuDNN is
not detected"); Pallas Triton kernels lower for compile-only GPU devices only inside
``jax.set_mesh``, so the GPU context sets the mesh too.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import re

import jax
from jax.experimental import topologies

from kernels_pallas import _aot
from sparsejax.parallel import hardware
from sparsejax.parallel.targets import Chip, Target

TPU_INSTALL = f'pip install "jax[tpu]=={jax.__version__}"'
GPU_INSTALL = (f"pip install --no-deps jax-cuda13-plugin=={jax.__version__} "
               f"jax-cuda13-pjrt=={jax.__version__}")
# The oldest cuDNN the CUDA plugin accepts when its requirement cannot be read.
_FALLBACK_CUDNN = 91200


def environment_ok(platform: str) -> bool:
  """Whether this Python can compile for ``platform`` ("tpu": libtpu; "gpu": the plugin)."""
  if platform == "tpu":
    return importlib.util.find_spec("libtpu") is not None
  return _aot.plugin_available()


def check_environment(target: Target) -> None:
  """One-line RuntimeError naming what to install when this Python cannot compile for target."""
  if environment_ok(target.platform):
    return
  how = TPU_INSTALL if target.platform == "tpu" else GPU_INSTALL
  raise RuntimeError(f"compiling for {target.name} needs the {target.platform.upper()} compiler "
                     f"in this environment: {how} (see docs/compile_check.md)")


def gpu_target_config(chip: Chip) -> str:
  """The chip's GpuTargetConfigProto text: the base file with the chip's overrides applied."""
  text = _aot.target_config(chip.gpu_target_config)
  overrides = {r"device_memory_size: \d+": chip.gpu_device_memory_bytes and
               f"device_memory_size: {chip.gpu_device_memory_bytes}",
               r"memory_bandwidth: \d+": chip.gpu_memory_bandwidth and
               f"memory_bandwidth: {chip.gpu_memory_bandwidth}",
               r'device_description_str: "[^"]*"': chip.gpu_device_description and
               f'device_description_str: "{chip.gpu_device_description}"'}
  for pattern, value in overrides.items():
    if value:
      text, n = re.subn(pattern, value, text)
      if n != 1:
        raise ValueError(f"kernels_pallas/_targets/{chip.gpu_target_config}.txtpb: expected "
                         f"one {pattern!r} field to override for {chip.name}")
  return text


def target_devices(target: Target) -> list:
  """The target's compile-only devices (nothing is allocated on them)."""
  check_environment(target)
  chip = target.chip
  if target.platform == "tpu":
    # Off a TPU VM libtpu looks for these and prints errors when they are missing; they do not
    # change what is compiled (the topology below is explicit).
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.name)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # libtpu takes /tmp/libtpu_lockfile so that one process owns a TPU; a compile-only process
    # owns none, and two compile checks at once (pytest -n 2) must not abort each other.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    wrap = list(target.wrap) + [False] * (3 - len(target.wrap))
    topo = topologies.get_topology_desc(
        platform="tpu", topology_name=f"{chip.topology_prefix}:{target.topology}",
        chip_config_name=chip.chip_config, chips_per_host_bounds=_host_bounds(chip, target),
        num_slices=target.num_slices, wrap=wrap)
  else:
    topo = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(chip),
                                        topology=target.topology)
  devices = list(topo.devices)
  if len(devices) != target.num_devices:
    raise ValueError(f"--target {target.name}: the topology gave {len(devices)} devices, "
                     f"expected {target.num_devices}")
  return devices


def _host_bounds(chip: Chip, target: Target) -> tuple[int, ...]:
  """A host's chip bounds, capped at the slice's own dimensions (a v5e-1 or v5e-4 slice is
  smaller than the 2x2 chips a v5e host holds; libtpu needs the bounds to divide the topology)."""
  dims = [int(d) for d in target.topology.split("x")] + [1] * 3
  return tuple(min(b, d) for b, d in zip(chip.chips_per_host_bounds, dims))


def _compute_capability(chip: Chip) -> tuple[int, int]:
  found = re.search(r"cuda_compute_capability\s*\{\s*major:\s*(\d+)\s*minor:\s*(\d+)",
                    gpu_target_config(chip))
  if not found:
    raise ValueError(f"kernels_pallas/_targets/{chip.gpu_target_config}.txtpb has no "
                     "cuda_compute_capability")
  return int(found.group(1)), int(found.group(2))


def plugin_cudnn_version() -> int:
  """The oldest cuDNN the installed CUDA plugin accepts (its nvidia-cudnn requirement, e.g.
  ">=9.12.0.46" -> 91200), as cuDNN's integer version."""
  for dist in ("jax-cuda13-plugin", "jax-cuda12-plugin"):
    try:
      requires = importlib.metadata.requires(dist) or []
    except importlib.metadata.PackageNotFoundError:
      continue
    for req in requires:
      found = re.search(r"nvidia-cudnn[\w-]*.*?>=\s*(\d+)\.(\d+)", req)
      if found:
        return int(found.group(1)) * 10000 + int(found.group(2)) * 100
  return _FALLBACK_CUDNN


@contextlib.contextmanager
def _cudnn_answers(capability: tuple[int, int], version: int):
  """JAX's cuDNN attention asks the local GPU for its cuDNN version and compute capability;
  answer for the target instead (jax 0.11 keeps these checks in fused_attention_stablehlo)."""
  # defers jax's private cuDNN module to GPU targets
  from jax._src.cudnn import fused_attention_stablehlo as fa
  parse = lambda c: tuple(int(x) for x in c.split("."))
  answers = {"check_cudnn_version": lambda: version,
             "check_compute_capability": lambda c: capability >= parse(c),
             "is_cuda_compute_capability_equal": lambda c: capability == parse(c)}
  missing = [name for name in answers if not hasattr(fa, name)]
  if missing:
    raise RuntimeError(f"jax {jax.__version__}: jax._src.cudnn.fused_attention_stablehlo has no "
                       f"{', '.join(missing)}; update sparsejax/compile_check/devices.py")
  saved = {name: getattr(fa, name) for name in answers}
  try:
    for name, fn in answers.items():
      setattr(fa, name, fn)
    yield
  finally:
    for name, fn in saved.items():
      setattr(fa, name, fn)


@contextlib.contextmanager
def compiling_for(target: Target, devices: list):
  """Build, trace and compile for ``target`` inside this context (module docstring)."""
  with contextlib.ExitStack() as stack:
    stack.enter_context(hardware.target(target.platform, devices[0].device_kind))
    if target.platform == "gpu":
      stack.enter_context(_cudnn_answers(_compute_capability(target.chip),
                                         plugin_cudnn_version()))
    yield


@contextlib.contextmanager
def mesh_context(target: Target, mesh):
  """``jax.set_mesh(mesh)`` on GPU targets (Pallas Triton lowering), nothing on TPUs."""
  if target.platform != "gpu":
    yield
    return
  with jax.set_mesh(mesh):
    yield
