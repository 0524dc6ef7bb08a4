"""Deviceless ahead-of-time compilation for GPU and TPU targets: compile a jitted function for an
H100, a TPU v5e or a v5p on a host without one and report the compiler's verdict.

GPU: needs the CUDA PJRT plugin next to jax (``jax-cuda13-plugin`` and ``jax-cuda13-pjrt`` of
jax's version, installed with ``--no-deps``: no CUDA libraries are needed) and
``JAX_PLATFORMS=cpu`` set before jax starts, so that jax does not look for a GPU to run on.
``jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=<text>)`` turns a
``GpuTargetConfigProto`` (``_targets/<target>.txtpb``) into devices to compile for; the Pallas
Triton lowering accepts them only inside ``jax.set_mesh`` of a mesh over those devices.
Compiling runs XLA's whole GPU pipeline, Triton included (Triton IR -> LLVM -> PTX -> cubin via
the plugin's own ptx compiler), so a kernel that would not compile on the GPU fails here with
the same message. Nothing executes and nothing is autotuned (XLA also notes that it falls back
to a slower sort without CUB scratch data: do not read timings into these compiles).

TPU: needs libtpu (``pip install --no-deps libtpu`` of the version ``jax[tpu]`` pins) and
``JAX_PLATFORMS=cpu``. ``get_topology_desc(platform="tpu", ...)`` of a one-chip slice
(``TPU_CHIPS``) gives the device; libtpu's XLA:TPU compiler then runs in full, and each Pallas
TPU kernel goes through Mosaic to TPU code inside it (a ``tpu_custom_call`` in the optimised
HLO), so a block shape Mosaic cannot tile or a kernel whose buffers overflow VMEM fails here as
it would on the chip.

    from kernels_pallas import _aot
    res = _aot.compile_for_gpu(fn, (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), ...))
    res.ok, res.seconds, res.kernels, res.cubins, res.message
    res = _aot.compile_for_tpu(fn, args, chip="v5p")        # kernels = Mosaic custom calls

``fn``'s arguments are ``ShapeDtypeStruct`` pytrees (placed replicated on the target device);
integer / static values go into ``fn`` itself (a closure or ``functools.partial``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import pathlib
import time

import jax

TARGET_DIR = pathlib.Path(__file__).with_name("_targets")
TARGETS = tuple(sorted(p.stem for p in TARGET_DIR.glob("*.txtpb")))
PLUGIN_PACKAGES = "jax-cuda13-plugin jax-cuda13-pjrt"
TRITON_CALL = "__gpu$xla.gpu.triton"
# A cubin begins with the ELF magic, ELFCLASS64, little-endian, ELF version 1 and OS/ABI 0x41
# (what CUDA 12 / 13's ptxas writes); the executable stores it after that header compressed, so
# only these leading bytes are matched.
_CUBIN_MAGIC = b"\x7fELF\x02\x01\x01\x41"


@dataclasses.dataclass(frozen=True)
class CompileResult:
  """One compile: ``ok`` when XLA returned an executable; ``kernels`` counts the Pallas kernels
  in the optimised HLO (GPU: Triton custom calls, TPU: Mosaic ``tpu_custom_call``s), which shows
  the kernel path really was taken; ``cubins`` the cubin images in a GPU executable (XLA links
  its own fusions and the Triton kernels into one or, when it splits a large module, a few);
  ``executable_bytes`` the serialised GPU executable; ``message`` the compiler's error (first
  meaningful line, '' when ok); ``target`` what it was compiled for ("h100", "v5e", ...).
  ``seconds`` is tracing, lowering and compiling; ``lower_seconds`` the tracing and lowering
  part (host work such as building splash attention's mask tables happens there)."""
  ok: bool
  seconds: float
  target: str = ""
  kernels: int = 0
  cubins: int = 0
  executable_bytes: int = 0
  message: str = ""
  lower_seconds: float = 0.0

  @property
  def triton_kernels(self) -> int:
    """``kernels`` of a GPU compile (the name the GPU tables use)."""
    return self.kernels

  def asdict(self) -> dict:
    return dataclasses.asdict(self)


def plugin_available() -> bool:
  """Whether the CUDA PJRT plugin is importable (the GPU compiler environment)."""
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda13") is not None
  except ModuleNotFoundError:   # no jax_plugins namespace package at all
    return False


def target_config(target: str = "h100") -> str:
  """The ``GpuTargetConfigProto`` text of ``target`` (a file stem in ``_targets/``)."""
  path = TARGET_DIR / f"{target}.txtpb"
  if not path.is_file():
    raise ValueError(f"unknown GPU target {target!r}; known: {', '.join(TARGETS)} (add "
                     f"{path.name} to {TARGET_DIR})")
  return path.read_text()


@functools.cache
def gpu_mesh(target: str = "h100", topology: str = "1x1x1",
             axis_names: tuple[str, ...] = ("x",)) -> jax.sharding.Mesh:
  """A mesh over the devices of ``topology`` (slices x hosts x GPUs) of ``target``; its devices
  are compile-only. ``axis_names`` name a 1-D mesh over all of them."""
  if not plugin_available():
    raise RuntimeError(f"the CUDA PJRT plugin is not installed; pip install --no-deps "
                       f"{PLUGIN_PACKAGES} (version {jax.__version__}) to compile for a GPU")
  from jax.experimental import topologies  # defers the topology API to the first GPU compile
  topo = topologies.get_topology_desc(platform="cuda", target_config=target_config(target),
                                      topology=topology)
  return jax.sharding.Mesh(topo.devices, axis_names)


def _place(args, mesh: jax.sharding.Mesh):
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), args)


def count_cubins(compiled) -> tuple[int, int]:
  """(cubin images, serialised bytes) of a compiled GPU executable."""
  from jax.experimental import serialize_executable  # defers pickling support to its first use
  payload, _, _ = serialize_executable.serialize(compiled)
  return payload.count(_CUBIN_MAGIC), len(payload)


def short_message(exc: BaseException, limit: int = 400) -> str:
  """The line of a compiler exception that says what is wrong: the first one with 'error:'
  (an MLIR / Triton diagnostic), else the first non-empty line; at most ``limit`` characters."""
  lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
  pick = next((ln for ln in lines if "error:" in ln), lines[0] if lines else type(exc).__name__)
  if pick != (lines[0] if lines else "") and lines:
    pick = f"{lines[0][:120]} | {pick}"
  return f"{type(exc).__name__}: {pick}"[:limit]


def compile_for_gpu(fn, args, *, target: str = "h100", topology: str = "1x1x1"
                    ) -> CompileResult:
  """Compile ``jax.jit(fn)(*args)`` for ``target`` without a GPU; never raises on a compiler
  error (it is the result's ``message``)."""
  mesh = gpu_mesh(target, topology)
  start = time.perf_counter()
  try:
    with jax.set_mesh(mesh):
      compiled = jax.jit(fn).lower(*_place(tuple(args), mesh)).compile()
  except Exception as exc:  # the compiler's verdict is the result, whatever raised it
    return CompileResult(False, time.perf_counter() - start, target,
                         message=short_message(exc))
  seconds = time.perf_counter() - start
  cubins, size = count_cubins(compiled)
  return CompileResult(True, seconds, target, count_custom_calls(compiled, TRITON_CALL), cubins,
                       size)


def count_custom_calls(compiled, target: str) -> int:
  """Custom calls to ``target`` in the optimised HLO of a compiled executable."""
  return compiled.as_text().count(f'custom_call_target="{target}"')


# ---- TPU --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TpuChip:
  """One chip of a TPU generation as ``get_topology_desc`` builds it: the topology name of a
  one-chip slice, the chip config ("megacore": two TensorCores as one device) and the
  accelerator type libtpu is told it runs on (off a TPU VM it asks; the answer changes nothing
  that is compiled, the topology is explicit)."""
  topology: str
  chip_config: str
  accelerator_type: str


# The values sparsejax/parallel/targets.toml holds for these chips (kernels_pallas does not import
# sparsejax), each as a single chip: chips_per_host_bounds (1, 1, 1).
TPU_CHIPS = {
    "v4": TpuChip("v4:1x1x1", "megacore", "v4-8"),
    "v5e": TpuChip("v5e:1x1", "default", "v5litepod-1"),
    "v5p": TpuChip("v5:1x1x1", "megacore", "v5p-8"),
    "v6e": TpuChip("v6e:1x1", "default", "v6e-1"),
}
TPU_PACKAGE = "libtpu"
MOSAIC_CALL = "tpu_custom_call"


def libtpu_available() -> bool:
  """Whether libtpu (the TPU compiler) is importable."""
  return importlib.util.find_spec("libtpu") is not None


@functools.cache
def tpu_device(chip: str = "v5e"):
  """The compile-only device of one ``chip`` (a key of ``TPU_CHIPS``)."""
  if chip not in TPU_CHIPS:
    raise ValueError(f"unknown TPU chip {chip!r}; known: {', '.join(TPU_CHIPS)} (add it to "
                     "kernels_pallas._aot.TPU_CHIPS)")
  if not libtpu_available():
    raise RuntimeError(f"libtpu is not installed; pip install --no-deps {TPU_PACKAGE} (the "
                       f"version jax[tpu]=={jax.__version__} pins) to compile for a TPU")
  spec = TPU_CHIPS[chip]
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", spec.accelerator_type)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  from jax.experimental import topologies  # defers the topology API to the first TPU compile
  topo = topologies.get_topology_desc(platform="tpu", topology_name=spec.topology,
                                      chip_config_name=spec.chip_config,
                                      chips_per_host_bounds=(1, 1, 1), num_slices=1,
                                      wrap=[False, False, False])
  (device,) = topo.devices
  return device


def compile_for_tpu(fn, args, *, chip: str = "v5e") -> CompileResult:
  """Compile ``jax.jit(fn)(*args)`` for one TPU ``chip`` without a TPU; never raises on a
  compiler error (it is the result's ``message``). ``kernels`` counts Mosaic custom calls.

  Traced and compiled under ``jax.set_mesh`` of a one-device mesh: Pallas TPU lowering rules
  that ask for the chip (``jax._src.tpu_info.get_tpu_info``, e.g. ``sign``) read the device
  kind from the current mesh, else from the default device, the host's CPU."""
  mesh = jax.sharding.Mesh([tpu_device(chip)], ("x",))
  start = lowered_at = time.perf_counter()
  try:
    with jax.set_mesh(mesh):
      lowered = jax.jit(fn).lower(*_place(tuple(args), mesh))
      lowered_at = time.perf_counter()
      compiled = lowered.compile()
  except Exception as exc:  # the compiler's verdict is the result, whatever raised it
    return CompileResult(False, time.perf_counter() - start, chip, message=short_message(exc),
                         lower_seconds=lowered_at - start)
  return CompileResult(True, time.perf_counter() - start, chip,
                       count_custom_calls(compiled, MOSAIC_CALL),
                       lower_seconds=lowered_at - start)
