"""Deviceless ahead-of-time compilation for a GPU target: compile a jitted function for an H100
on a host without a GPU and report the compiler's verdict.

Needs the CUDA PJRT plugin next to jax (``jax-cuda13-plugin`` and ``jax-cuda13-pjrt`` of jax's
version, installed with ``--no-deps``: no CUDA libraries are needed) and ``JAX_PLATFORMS=cpu``
set before jax starts, so that jax does not look for a GPU to run on.
``jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=<text>)`` turns a
``GpuTargetConfigProto`` (``_targets/<target>.txtpb``) into devices to compile for; the Pallas
Triton lowering accepts them only inside ``jax.set_mesh`` of a mesh over those devices.
Compiling runs XLA's whole GPU pipeline, Triton included (Triton IR -> LLVM -> PTX -> cubin via
the plugin's own ptx compiler), so a kernel that would not compile on the GPU fails here with
the same message. Nothing executes and nothing is autotuned (XLA also notes that it falls back
to a slower sort without CUB scratch data: do not read timings into these compiles).

    from kernels_pallas import _aot
    res = _aot.compile_for_gpu(fn, (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), ...))
    res.ok, res.seconds, res.triton_kernels, res.cubins, res.message

``fn``'s arguments are ``ShapeDtypeStruct`` pytrees (placed replicated on the target device);
integer / static values go into ``fn`` itself (a closure or ``functools.partial``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import pathlib
import re
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
  """One compile: ``ok`` when XLA returned an executable; ``triton_kernels`` counts the Pallas
  Triton custom calls in the optimised HLO, ``cubins`` the cubin images in the serialised
  executable (XLA links its own fusions and the Triton kernels into one or, when it splits a
  large module, a few), ``message`` the compiler's error (first meaningful line, '' when ok)."""
  ok: bool
  seconds: float
  triton_kernels: int = 0
  cubins: int = 0
  executable_bytes: int = 0
  message: str = ""

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
    return CompileResult(False, time.perf_counter() - start, message=short_message(exc))
  seconds = time.perf_counter() - start
  kernels = len(re.findall(re.escape(f'custom_call_target="{TRITON_CALL}"'), compiled.as_text()))
  cubins, size = count_cubins(compiled)
  return CompileResult(True, seconds, kernels, cubins, size)
