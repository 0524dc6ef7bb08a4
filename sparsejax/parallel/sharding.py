"""Device mesh and the logical-axis rule table.

Every parameter carries logical axis names (``nnx.Param(..., logical_axes=("embed", "mlp"))``)
and key activations are constrained with ``constrain(x, ("act_batch", "act_length", ...))``.
The rule table maps each logical name to mesh axes; a rule is applied to a dimension only when
the dimension divides evenly, otherwise that dimension is replicated (and we say so once).

Mesh axes, outermost first: ``dcn`` (only when config.mesh.dcn > 1 or auto-detects several
slices: pure data parallel across TPU slices / GPU nodes), ``data`` (pure data parallel),
``fsdp`` (data parallel with parameters / optimizer state sharded), ``expert`` (expert
parallelism), ``tensor`` (Megatron-style tensor parallelism; innermost so it lands on the fastest
interconnect). Named presets of sizes and rule overrides (``config.mesh.preset``), the dcn device
grouping and ``make_mesh`` live in mesh.py; the layer families add rules for their own logical
names (their ``Family.rules``, collected by sparsejax.layers.registry).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sparsejax.errors import ConfigError
from sparsejax.parallel import mesh as mesh_lib


# Parameters use plain names; activations use act_* names so that the embed dimension of a
# weight can be FSDP-sharded while the embed dimension of an activation is not.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("act_batch", ("dcn", "data", "fsdp", "expert")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),  # the repeat axis of scanned layers' stacked parameters (models/scan.py)
)

_log = logging.getLogger(__name__)
_warned: set = set()


def rules_of(mesh_cfg, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
  """``defaults`` (DEFAULT_RULES plus the layer families' rules: see
  ``sparsejax.layers.registry.logical_rules``), then the preset's overrides, then
  config.mesh.rules."""
  rules = dict(DEFAULT_RULES if defaults is None else defaults)
  rules.update(mesh_lib.preset_rules(mesh_cfg))
  rules.update({k: v for k, v in mesh_cfg.rules})
  return rules


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: dict[str, Any]) -> P:
  """PartitionSpec for a tensor of `shape` whose dims carry `logical_axes`."""
  if len(logical_axes) != len(shape):
    raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical_axes, shape):
    if name is not None and name not in rules:
      raise ValueError(f"logical axis {name!r} has no rule; add it to config.mesh.rules "
                       f"(known: {', '.join(sorted(rules))})")
    target = rules.get(name) if name else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1 and a not in used)
    size = math.prod(mesh.shape[a] for a in axes)
    if axes and dim % size:
      key = (name, dim, axes)
      if key not in _warned:
        _warned.add(key)
        _log.warning("logical axis %s (size %d) is not divisible by mesh axes %s (size %d); "
                     "replicating it", name, dim, axes, size)
      axes = ()
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec)


# ---- activation constraints: active only while a (mesh, rules) context is set ----

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("sparsejax_mesh_rules", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: dict[str, Any]):
  """Within this context (around tracing), `constrain` applies sharding constraints."""
  token = _ACTIVE.set((mesh, rules))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active_mesh_rules() -> tuple[Mesh, dict[str, Any]] | None:
  """The (mesh, rules) of the enclosing `activation_sharding` context, or None: for layers that
  wrap a kernel in shard_map (custom calls are not split by the partitioner)."""
  return _ACTIVE.get()


def logical_spec(logical_axes: Sequence[str | None], shape: Sequence[int]) -> P | None:
  """PartitionSpec of an activation under the active context (None outside one)."""
  active = _ACTIVE.get()
  return None if active is None else logical_to_spec(logical_axes, shape, *active)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, logical_to_spec(logical_axes, x.shape, mesh, rules)))


def batch_sharding(mesh: Mesh, rules: dict[str, Any], ndim: int = 2) -> NamedSharding:
  """Sharding of a [batch, ...] input array: batch over the act_batch mesh axes."""
  target = rules.get("act_batch")
  axes = (target,) if isinstance(target, str) else tuple(target or ())
  axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
  return NamedSharding(mesh, P(axes if axes else None, *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh, rules: dict[str, Any]) -> int:
  """How many ways the batch dimension is split (the global batch must divide by this)."""
  spec = batch_sharding(mesh, rules).spec[0]
  axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
  return math.prod(mesh.shape[a] for a in axes)


def check_global_batch(global_batch_size: int, grad_accum_steps: int, mesh: Mesh,
                       rules: dict[str, Any]) -> None:
  """One-line ConfigError unless every micro-batch splits over the mesh's batch shards and the
  global batch over the processes."""
  micro = global_batch_size // grad_accum_steps
  shards = batch_shards(mesh, rules)
  if micro % shards:
    raise ConfigError(f"config.data.global_batch_size: micro-batch {micro} (global batch / "
                      f"grad_accum_steps) must divide by the {shards} batch shards of the mesh")
  if global_batch_size % jax.process_count():
    raise ConfigError(f"config.data.global_batch_size: must divide by the "
                      f"{jax.process_count()} processes")


def global_batch(local: dict, sharding: NamedSharding, global_batch_size: int) -> dict:
  """This process's rows of a global batch (host arrays) -> global jax arrays."""
  return {k: jax.make_array_from_process_local_data(
      sharding, v, (global_batch_size,) + v.shape[1:]) for k, v in local.items()}
