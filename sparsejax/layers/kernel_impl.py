"""Choosing and placing the Pallas kernels behind ``config.{memory,peer,moe}.impl``.

``impl`` in a config is what the user asks for; ``resolve`` turns it into what the kernel ops of
kernels_pallas run on this backend, per kernel (``kernel``: "gather" = gather_sum / gather_dot /
peer_ffn, "gmm" = grouped_matmul, "topk" = product_key_topk):

    config              GPU        CPU            TPU
    "xla"               "xla"      "xla"          "xla"
    "pallas"            "pallas"   "interpret"    "mosaic" (gather, gmm); "xla" (topk, warned once)
    "mosaic_interpret"  the TPU (Mosaic) kernels in Pallas TPU interpret mode where a kernel has
                        one (gather, gmm), else "xla": how the CPU suite checks the TPU path

"pallas" means the Triton kernels on a GPU and the Mosaic TPU kernels on a TPU; "interpret" runs
the Triton kernels with ``interpret=True``: slow, but it is how the CPU test suite checks a
``pallas`` model against its ``xla`` twin. A config may also say "interpret" explicitly (tests,
debugging on a GPU machine). The backend is the compile target's under ``sparsejax
compile-check`` (sparsejax.parallel.hardware).

A ``pallas_call`` is a custom call the SPMD partitioner cannot split, so inside an
``activation_sharding`` context the layers run their kernels per shard with ``per_shard``
(``jax.shard_map`` over the active mesh).
"""

from __future__ import annotations

import logging

import jax

from sparsejax.parallel import hardware, sharding

IMPLS = ("xla", "pallas", "interpret", "mosaic_interpret")
TPU_KERNELS = ("gather", "gmm")  # kernels with a Mosaic TPU version (kernels_pallas */tpu_kernel.py)
KERNELS = TPU_KERNELS + ("topk",)

_log = logging.getLogger(__name__)
_warned: set = set()


def resolve(impl: str, where: str, kernel: str) -> str:
  """The kernel-op impl of ``kernel`` for config value ``impl`` on the target backend
  (sparsejax.parallel.hardware; the default backend unless a compile target is set; ``where``
  names the config key in messages, e.g. "config.memory.impl")."""
  if impl not in IMPLS:
    raise ValueError(f"{where}: unknown impl {impl!r}; choose one of {IMPLS}")
  if kernel not in KERNELS:
    raise ValueError(f"kernel_impl.resolve: unknown kernel {kernel!r}; one of {KERNELS}")
  if impl == "mosaic_interpret":
    return impl if kernel in TPU_KERNELS else "xla"
  if impl != "pallas":
    return impl
  backend = hardware.backend()
  if backend == "gpu":
    return "pallas"
  if backend == "cpu":
    return "interpret"
  if kernel in TPU_KERNELS:
    return "mosaic"
  if (where, kernel, backend) not in _warned:
    _warned.add((where, kernel, backend))
    _log.warning("%s='pallas': the %s kernel has no %s version; using the XLA path there",
                 where, kernel, backend)
  return "xla"


def mesh_axis(logical_name: str, dim: int) -> str | tuple | None:
  """Mesh axis (or axes) that the active rules give a dimension of size ``dim`` named
  ``logical_name`` (None outside an ``activation_sharding`` context, for unsharded names, and
  when ``dim`` does not divide the axes, which then stays replicated as ``constrain`` does)."""
  spec = sharding.logical_spec((logical_name,), (dim,))
  return None if spec is None else spec[0]


def batch_axis(batch: int) -> str | tuple | None:
  """Mesh axes of the leading batch dimension of an activation with ``batch`` rows."""
  return mesh_axis("act_batch", batch)


def per_shard(fn, in_specs, out_specs):
  """``fn`` under ``jax.shard_map`` over the active mesh, or ``fn`` itself outside a mesh
  context. Cotangents of inputs that are replicated over an axis are summed over it by
  shard_map's transpose (partial dot products of column shards, for instance)."""
  active = sharding.active_mesh_rules()
  if active is None:
    return fn
  mesh, _ = active
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
