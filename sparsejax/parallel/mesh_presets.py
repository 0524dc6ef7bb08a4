"""Mesh presets, the DCN (multi-slice) axis, and golden sharding dumps.

``--config.mesh.preset=<name>`` picks the axis sizes (and a few rule overrides) instead of
setting ``config.mesh.{data,fsdp,expert,tensor}`` by hand. Validation (sparsejax/config.py)
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

Rules every preset starts from (sharding.DEFAULT_RULES + the families' register_rules):
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

Golden dumps: ``tests/golden/sharding/<preset>.json`` holds, for a 125m-wide model of each family
(2 layers; memory with layer 1 a Memory+ layer) on 8 devices, every parameter's shape and
PartitionSpec. tests/test_mesh_presets.py recomputes them and fails when a rule change moves any
parameter, naming each one and flagging tensors >= 1M elements that became fully replicated.
Regenerate after an intended change (then review the diff):

    python -m sparsejax.parallel.mesh_presets --write-golden
    python -m sparsejax.parallel.mesh_presets --check           # compare only
    python -m sparsejax.parallel.mesh_presets --show configs/moe.py:125m --preset fsdp_ep \\
        --devices 64                                            # any config's sharding table
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import pathlib
import sys
from typing import Any, Sequence

import numpy as np

from sparsejax.config import ConfigError, MeshConfig
from sparsejax.parallel.sharding import MESH_AXES

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
    from jax.experimental import mesh_utils
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


# ---- golden sharding dumps ----

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN_DIR = REPO_ROOT / "tests" / "golden" / "sharding"
GOLDEN_DEVICES = 8
GOLDEN_VOCAB = 32768
LARGE = 1_000_000  # elements: a tensor this big must not silently become replicated
GOLDEN_MODELS: dict[str, tuple[str, dict]] = {  # family: (config, overrides); 125m widths
    "dense": ("configs/dense.py:125m", {"model.num_layers": 2}),
    "moe": ("configs/moe.py:125m", {"model.num_layers": 2}),
    "peer": ("configs/peer.py:125m", {"model.num_layers": 2}),
    "memory": ("configs/memory.py:125m", {"model.num_layers": 2, "ffn.overrides": ("1:memory",)}),
}
GOLDEN_MESH: dict[str, dict] = {"multislice": {"mesh.dcn": 2}}  # 2 simulated slices of 4


def spec_to_json(spec) -> list:
  return [list(e) if isinstance(e, tuple) else e for e in spec]


def param_table(cfg, num_devices: int, vocab_size: int, granules: int = 1) -> dict:
  """{"mesh": axis sizes, "params": {path: {"shape", "spec"}}} of `cfg` on `num_devices`
  devices, from abstract shapes only (nothing materialised, no devices needed)."""
  import jax
  from sparsejax.train.state import model_spec, param_shardings

  shape = mesh_shape(cfg.mesh, num_devices, granules)
  mesh = jax.sharding.AbstractMesh(tuple(shape.values()), tuple(shape),
                                   axis_types=(jax.sharding.AxisType.Auto,) * len(shape))
  spec = model_spec(cfg, vocab_size)
  shardings = param_shardings(spec, mesh)
  params = {}
  for (path, x), sh in zip(jax.tree_util.tree_leaves_with_path(spec.abstract_params),
                           jax.tree.leaves(shardings)):
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    params[name] = {"shape": list(x.shape), "spec": spec_to_json(sh.spec)}
  return {"mesh": shape, "params": params}


def golden_config(family: str, preset: str, rules: Sequence = ()):
  from sparsejax.configs_loader import load_config
  path, overrides = GOLDEN_MODELS[family]
  return load_config(path, **{**overrides, "mesh.preset": preset, **GOLDEN_MESH.get(preset, {}),
                              **({"mesh.rules": tuple(rules)} if rules else {})})


def golden_dump(preset: str, rules: Sequence = ()) -> dict:
  """The golden file's content for `preset` (`rules`: extra config.mesh.rules, for tests)."""
  out: dict = {"preset": preset, "devices": GOLDEN_DEVICES, "vocab_size": GOLDEN_VOCAB,
               "mesh": None, "families": {}}
  for family, (path, overrides) in GOLDEN_MODELS.items():
    table = param_table(golden_config(family, preset, rules), GOLDEN_DEVICES, GOLDEN_VOCAB)
    out["mesh"] = table["mesh"]
    out["families"][family] = {"config": path, "overrides": {**overrides,
                               **GOLDEN_MESH.get(preset, {})}, "params": table["params"]}
  return out


def format_dump(dump: dict) -> str:
  """JSON with one parameter per line (readable diffs)."""
  lines = ["{"]
  for key in ("preset", "devices", "vocab_size", "mesh"):
    lines.append(f" {json.dumps(key)}: {json.dumps(dump[key])},")
  lines.append(' "families": {')
  fams = list(dump["families"].items())
  for i, (family, body) in enumerate(fams):
    lines.append(f"  {json.dumps(family)}: {{")
    lines.append(f"   \"config\": {json.dumps(body['config'])},")
    lines.append(f"   \"overrides\": {json.dumps(body['overrides'])},")
    lines.append('   "params": {')
    items = list(body["params"].items())
    for j, (name, entry) in enumerate(items):
      lines.append(f"    {json.dumps(name)}: {json.dumps(entry)}" + ("," if j < len(items) - 1
                                                                        else ""))
    lines.append("   }")
    lines.append("  }" + ("," if i < len(fams) - 1 else ""))
  lines += [" }", "}", ""]
  return "\n".join(lines)


def golden_path(preset: str, root: pathlib.Path = GOLDEN_DIR) -> pathlib.Path:
  return pathlib.Path(root) / f"{preset}.json"


def compare(golden: dict, current: dict, large: int = LARGE) -> list[str]:
  """One line per difference; tensors >= `large` elements that lost all sharding come first,
  as 'rule change silently replicates <family>:<param> (<n> params)'."""
  flagged, changed = [], []
  if golden.get("mesh") != current.get("mesh"):
    changed.append(f"mesh: {golden.get('mesh')} -> {current.get('mesh')}")
  fams = sorted(set(golden["families"]) | set(current["families"]))
  for family in fams:
    old = golden["families"].get(family, {}).get("params", {})
    new = current["families"].get(family, {}).get("params", {})
    for name in sorted(set(old) | set(new)):
      where = f"{family}:{name}"
      if name not in new:
        changed.append(f"{where}: removed (was {old[name]['spec']})")
      elif name not in old:
        changed.append(f"{where}: new parameter {new[name]['shape']} {new[name]['spec']}")
      elif old[name] != new[name]:
        was, now = old[name], new[name]
        n = math.prod(now["shape"])
        if (n >= large and any(was["spec"]) and not any(now["spec"])
            and was["shape"] == now["shape"]):
          flagged.append(f"rule change silently replicates {where} ({n} params): "
                         f"{was['spec']} -> {now['spec']}")
        elif was["shape"] == now["shape"]:
          changed.append(f"{where} {now['shape']}: {was['spec']} -> {now['spec']}")
        else:
          changed.append(f"{where}: {was['shape']} {was['spec']} -> {now['shape']} {now['spec']}")
  return flagged + changed


def check_golden(preset: str, current: dict | None = None,
                 root: pathlib.Path = GOLDEN_DIR) -> str:
  """'' when `preset`'s sharding matches its golden file, else the message listing the changes."""
  path = golden_path(preset, root)
  if not path.exists():
    return (f"{path} is missing; generate it with "
            "`python -m sparsejax.parallel.mesh_presets --write-golden`")
  diffs = compare(json.loads(path.read_text()), current or golden_dump(preset))
  if not diffs:
    return ""
  return (f"sharding of preset {preset!r} differs from {path.name} ({len(diffs)} changes; if "
          "intended, regenerate with `python -m sparsejax.parallel.mesh_presets "
          "--write-golden` and review the diff):\n  " + "\n  ".join(diffs))


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m sparsejax.parallel.mesh_presets",
                                   description=__doc__.split("\n")[0])
  act = parser.add_mutually_exclusive_group(required=True)
  act.add_argument("--write-golden", action="store_true", help="write tests/golden/sharding/*")
  act.add_argument("--check", action="store_true", help="compare with tests/golden/sharding/*")
  act.add_argument("--show", metavar="CONFIG", help="print the sharding of configs/<f>.py:<p>")
  parser.add_argument("--preset", default=None, help="--show: mesh preset (default: config's)")
  parser.add_argument("--devices", type=int, default=GOLDEN_DEVICES, help="--show: devices")
  parser.add_argument("--vocab_size", type=int, default=GOLDEN_VOCAB, help="--show: vocabulary")
  parser.add_argument("--dir", default=str(GOLDEN_DIR), help="golden directory")
  args = parser.parse_args(argv)
  from sparsejax.cli_common import one_line_errors
  with one_line_errors(parser.prog):
    return _run(args)


def _run(args) -> int:
  if args.show:
    from sparsejax.configs_loader import load_config
    cfg = load_config(args.show, **({"mesh.preset": args.preset} if args.preset is not None
                                    else {}))
    table = param_table(cfg, args.devices, args.vocab_size)
    print(json.dumps({"mesh": table["mesh"]}))
    for name, entry in table["params"].items():
      print(json.dumps({"param": name, **entry}))
    return 0
  failed = 0
  for preset in PRESETS:
    if args.write_golden:
      path = golden_path(preset, args.dir)
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(format_dump(golden_dump(preset)))
      print(f"wrote {path}")
    else:
      msg = check_golden(preset, root=pathlib.Path(args.dir))
      print(msg or f"{preset}: matches")
      failed += bool(msg)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
