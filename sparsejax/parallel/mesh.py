"""The device mesh: presets of axis sizes, the DCN (multi-slice) axis, device placement.

``--config.mesh.preset=<name>`` picks the axis sizes (and a few rule overrides) instead of
setting ``config.mesh.{data,fsdp,expert,tensor}`` by hand. Validation (sparsejax/configure.py)
resolves the preset into those fields, so everything downstream (``make_mesh``, the MoE
expert-parallel checks, checkpoints' config.json) sees the sizes actually used; resolving again
is a no-op. ``preset=""`` (the default) keeps the explicit sizes as before.

  preset      dcn  data  fsdp  expert  tensor  rule overrides          what is sharded how
  ----------  ---  ----  ----  ------  ------  ----------------------  ----------------------------
  dp          1    -1    1     1       1       -                       parameters replicated; batch
                                                                       over all devices
  fsdp        1    1     -1    1       1       -                       the embed dimension of every
                                                                       weight over all devices
                                                                       (ZeRO-3); batch likewise
  fsdp_tp     1    1     -1    1       T       -                       + Megatron: heads, mlp, vocab
                                                                       over T devices; batch over
                                                                       fsdp only
  fsdp_ep     1    1     -1    E       1       embed: (fsdp, expert)   experts over E devices; every
                                                                       embed dim over fsdp x expert
                                                                       (the expert axis is a data
                                                                       axis for non-expert weights)
  multislice  D    1     -1    1       1       -                       HSDP: fsdp within a slice,
                                                                       replicas across D slices;
                                                                       batch over dcn x fsdp

  T = config.mesh.tensor if > 1, else 4.  E = config.mesh.expert if > 1, else 4.
  D = config.mesh.dcn if > 1, else 0 = one per slice (TPU) or per process (GPU / CPU).

Why 4: it divides the head counts (4, 12, 16, 32) and expert counts (8, 64) of every configs/
preset, and stays inside one host (4 TPU chips per v4 / v5p host, 4 or 8 GPUs per node), where
tensor / expert collectives belong. The defaults do not depend on the device count, so one config
gives the same per-axis layout on any cluster (only the -1 axis grows).
A preset owns its axes: setting one to another value (e.g. ``preset=fsdp`` with ``mesh.data=2``)
is an error; use ``preset=""`` and explicit sizes (``mesh.dcn`` included) for anything else.

Rules every preset starts from (sharding.DEFAULT_RULES + the families' Family.rules):
act_batch -> (dcn, data, fsdp, expert); embed -> fsdp; vocab, q_heads, kv_heads, mlp -> tensor;
experts -> expert; expert_mlp -> tensor; PEER / memory tables: rows replicated, columns over
tensor (lookups stay local; so they are split only under fsdp_tp), product-key sub-keys
replicated. A size-1 axis drops out of every spec; user ``config.mesh.rules`` override preset
rules, which override the defaults.

DCN axis. ``config.mesh.dcn`` > 1 (or 0 = auto) adds an outermost ``dcn`` mesh axis: pure data
parallelism over the slow network between TPU slices or GPU nodes; parameters are never sharded
over it. Devices are grouped into ``dcn`` slices of equal size:
  * TPU with ``dcn`` = number of slices (device.slice_index), or any platform with ``dcn`` =
    number of processes: ``jax.experimental.mesh_utils.create_hybrid_device_mesh`` (per slice a
    topology-aware ``create_device_mesh``);
  * otherwise devices are ordered by (slice or process, id) and cut into ``dcn`` contiguous
    groups, which must not split a slice / process unless each holds several groups. One
    process with several devices (the CPU tests: 8 fake devices, ``mesh.dcn=2``) is simulated
    as ``dcn`` slices. With one process per GPU, set ``mesh.dcn`` = number of nodes.
  The dcn axis exists only when its size is > 1, so single-slice meshes are unchanged.

Golden sharding dumps of every preset live in tests/golden/sharding/ (tests/sharding_golden.py
writes and checks them); ``python -m sparsejax.info --config ... --sharding --devices 64``
prints any config's parameter shardings.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from sparsejax.config import MeshConfig
from sparsejax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "tensor")  # within a slice; "dcn" goes before them
DCN_AXIS = "dcn"
DEFAULT_TENSOR = 4
DEFAULT_EXPERT = 4
DCN_AUTO = 0
_CHOSEN = "chosen"  # size taken from config.mesh.<axis> when set, else the default below
_CHOSEN_DEFAULT = {"tensor": DEFAULT_TENSOR, "expert": DEFAULT_EXPERT, DCN_AXIS: DCN_AUTO}


@dataclasses.dataclass(frozen=True)
class Preset:
  sizes: dict[str, int | str]            # mesh field -> size (-1: the rest) or _CHOSEN
  rules: tuple[tuple[str, Any], ...] = ()  # logical-axis rule overrides


PRESETS: dict[str, Preset] = {
    "dp": Preset({DCN_AXIS: 1, "data": -1, "fsdp": 1, "expert": 1, "tensor": 1}),
    "fsdp": Preset({DCN_AXIS: 1, "data": 1, "fsdp": -1, "expert": 1, "tensor": 1}),
    "fsdp_tp": Preset({DCN_AXIS: 1, "data": 1, "fsdp": -1, "expert": 1, "tensor": _CHOSEN}),
    "fsdp_ep": Preset({DCN_AXIS: 1, "data": 1, "fsdp": -1, "expert": _CHOSEN, "tensor": 1},
                      rules=(("embed", ("fsdp", "expert")),)),
    "multislice": Preset({DCN_AXIS: _CHOSEN, "data": 1, "fsdp": -1, "expert": 1, "tensor": 1}),
}


def _preset(name: str) -> Preset:
  if name not in PRESETS:
    raise ConfigError(f"config.mesh.preset: {name!r} is not a preset; choose one of "
                      f"'' (explicit sizes), {', '.join(PRESETS)}")
  return PRESETS[name]


def resolve(mesh_cfg: MeshConfig) -> MeshConfig:
  """The MeshConfig with the preset's sizes written into the axis fields (idempotent)."""
  if mesh_cfg.dcn < 0:
    raise ConfigError(f"config.mesh.dcn: must be >= 1 (slices), or 0 for one per slice / "
                      f"process; got {mesh_cfg.dcn}")
  if not mesh_cfg.preset:
    return mesh_cfg
  preset, defaults = _preset(mesh_cfg.preset), MeshConfig()
  sizes = {}
  for axis, target in preset.sizes.items():
    given = getattr(mesh_cfg, axis)
    if target == _CHOSEN:
      if axis == DCN_AXIS:
        sizes[axis] = given if given > 1 else DCN_AUTO
      elif given < 1:
        raise ConfigError(f"config.mesh.{axis}: preset {mesh_cfg.preset!r} needs a fixed size "
                          f"(> 1; 1 = default {_CHOSEN_DEFAULT[axis]}), got {given}")
      else:
        sizes[axis] = given if given > 1 else _CHOSEN_DEFAULT[axis]
    elif given in (target, getattr(defaults, axis)):
      sizes[axis] = target
    else:
      raise ConfigError(f"config.mesh.{axis}: preset {mesh_cfg.preset!r} fixes it to {target}, "
                        f"got {given}; drop the override, or set config.mesh.preset='' and "
                        "give every size")
  return dataclasses.replace(mesh_cfg, **sizes)


def preset_rules(mesh_cfg: MeshConfig) -> dict[str, Any]:
  """The preset's rule overrides (empty without a preset)."""
  return dict(_preset(mesh_cfg.preset).rules) if mesh_cfg.preset else {}


# ---- axis sizes and device placement ----

def _granule_key(devices: Sequence[Any]) -> str:
  """What a slice is: TPU slices when devices carry slice_index, else processes."""
  return ("slice_index" if devices and getattr(devices[0], "platform", "") == "tpu"
          and hasattr(devices[0], "slice_index") else "process_index")


def num_granules(devices: Sequence[Any]) -> int:
  key = _granule_key(devices)
  return len({getattr(d, key) for d in devices})


def mesh_shape(mesh_cfg: MeshConfig, num_devices: int, granules: int = 1) -> dict[str, int]:
  """Axis name -> size on `num_devices` devices forming `granules` slices / processes: the -1
  axis filled, dcn=0 set to `granules`; ``dcn`` first and only when > 1."""
  m = resolve(mesh_cfg)
  dcn = m.dcn or granules
  if dcn < 1 or num_devices % dcn:
    raise ValueError(f"config.mesh.dcn: {dcn} slices do not divide the {num_devices} available "
                     "devices; set config.mesh.dcn to a divisor (0: one per slice / process)")
  n = num_devices // dcn
  where = f"the {n} devices of each of {dcn} slices" if dcn > 1 else f"the {n} available devices"
  sizes = [m.data, m.fsdp, m.expert, m.tensor]
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n % fixed:
      raise ValueError(f"config.mesh: fixed axis sizes multiply to {fixed}, which does not "
                       f"divide {where}; change config.mesh.*")
    sizes[sizes.index(-1)] = n // fixed
  if math.prod(sizes) != n:
    raise ValueError(f"config.mesh: axis sizes {dict(zip(MESH_AXES, sizes))} use "
                     f"{math.prod(sizes)} devices but {where} are available; set one axis to -1")
  shape = dict(zip(MESH_AXES, sizes))
  return {DCN_AXIS: dcn, **shape} if dcn > 1 else shape


def hybrid_device_array(shape: dict[str, int], devices: Sequence[Any]) -> np.ndarray:
  """Devices arranged as [dcn, data, fsdp, expert, tensor] (see the module docstring)."""
  dcn, inner = shape[DCN_AXIS], [shape[a] for a in MESH_AXES]
  key = _granule_key(devices)
  by_granule = collections.defaultdict(list)
  for d in devices:
    by_granule[getattr(d, key)].append(d)
  what = key.split("_")[0]
  whats = "processes" if what == "process" else "slices"
  counts = {len(v) for v in by_granule.values()}
  if len(by_granule) == dcn and len(counts) == 1:
    return mesh_utils.create_hybrid_device_mesh(
        [1] + inner, [dcn] + [1] * len(inner), devices,
        process_is_granule=key == "process_index")
  ordered = sorted(devices, key=lambda d: (getattr(d, key), d.id))
  per = len(ordered) // dcn
  groups = [{getattr(d, key) for d in ordered[g * per:(g + 1) * per]} for g in range(dcn)]
  in_groups = collections.Counter(k for ks in groups for k in ks)
  if not (all(len(ks) == 1 for ks in groups) or all(c == 1 for c in in_groups.values())):
    raise ValueError(f"config.mesh.dcn: {dcn} groups of {per} devices would split a {what} "
                     f"(devices per {what}: {sorted(counts)}); set config.mesh.dcn to a divisor "
                     f"or multiple of the {len(by_granule)} {whats} (0: one per {what})")
  return np.asarray(ordered, dtype=object).reshape([dcn] + inner)


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Build the ([dcn,] data, fsdp, expert, tensor) mesh; one size may be -1 (all remaining
  devices of a slice); a config.mesh.preset is resolved first.

  Without a dcn axis the devices are placed by ``jax.make_mesh`` whatever list is given (the
  local devices, a subset, or the compile-only devices of a target topology): on a TPU slice it
  maps the logical axes onto the physical torus, on GPUs it orders by device id, elsewhere it
  keeps the given order. So a mesh built from a target's devices (``sparsejax compile-check``)
  has the device order a real run on that slice gets."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_cfg, len(devices), num_granules(devices))
  names, sizes = tuple(shape), tuple(shape.values())
  auto = (jax.sharding.AxisType.Auto,) * len(names)
  if DCN_AXIS in shape:
    return Mesh(hybrid_device_array(shape, devices), names, axis_types=auto)
  slices = num_granules(devices) if _granule_key(devices) == "slice_index" else 1
  if slices > 1:
    raise ValueError(f"config.mesh: the {len(devices)} devices form {slices} TPU slices; add "
                     f"the dcn axis (config.mesh.preset=multislice, or config.mesh.dcn={slices})")
  try:
    return jax.make_mesh(sizes, names, axis_types=auto, devices=devices)
  except (ValueError, NotImplementedError, AssertionError) as e:
    why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    raise ValueError(f"config.mesh: axis sizes {shape} do not map onto the physical topology "
                     f"of these {len(devices)} {devices[0].device_kind} devices ({why}); "
                     "choose sizes that match the slice's torus dimensions") from e
