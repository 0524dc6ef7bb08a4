"""Golden sharding dumps: ``tests/golden/sharding/<preset>.json`` holds, for a 125m-wide model of
each family (2 layers; memory with layer 1 a Memory+ layer) on 8 devices, every parameter's shape
and PartitionSpec. tests/test_mesh_presets.py recomputes them and fails when a rule change moves
any parameter, naming each one and flagging tensors >= 1M elements that became fully replicated.
Regenerate after an intended change (then review the diff):

    python tests/sharding_golden.py --write-golden
    python tests/sharding_golden.py --check            # compare only

(Any config's sharding table: ``python -m sparsejax.info --config ... --sharding --devices 64``.)
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
from typing import Sequence

if __name__ == "__main__":  # run as a script from the repository root
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from sparsejax.configure import load_config  # noqa: E402
from sparsejax.info import sharding_table  # noqa: E402
from sparsejax.parallel.mesh import PRESETS  # noqa: E402


GOLDEN_DIR = pathlib.Path(__file__).resolve().parent / "golden" / "sharding"
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


def golden_config(family: str, preset: str, rules: Sequence = ()):
  path, overrides = GOLDEN_MODELS[family]
  return load_config(path, **{**overrides, "mesh.preset": preset, **GOLDEN_MESH.get(preset, {}),
                              **({"mesh.rules": tuple(rules)} if rules else {})})


def golden_dump(preset: str, rules: Sequence = ()) -> dict:
  """The golden file's content for `preset` (`rules`: extra config.mesh.rules, for tests)."""
  out: dict = {"preset": preset, "devices": GOLDEN_DEVICES, "vocab_size": GOLDEN_VOCAB,
               "mesh": None, "families": {}}
  for family, (path, overrides) in GOLDEN_MODELS.items():
    table = sharding_table(golden_config(family, preset, rules), GOLDEN_DEVICES, GOLDEN_VOCAB)
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
            "`python tests/sharding_golden.py --write-golden`")
  diffs = compare(json.loads(path.read_text()), current or golden_dump(preset))
  if not diffs:
    return ""
  return (f"sharding of preset {preset!r} differs from {path.name} ({len(diffs)} changes; if "
          "intended, regenerate with `python tests/sharding_golden.py "
          "--write-golden` and review the diff):\n  " + "\n  ".join(diffs))


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python tests/sharding_golden.py",
                                   description=__doc__.split("\n")[0])
  act = parser.add_mutually_exclusive_group(required=True)
  act.add_argument("--write-golden", action="store_true", help="write tests/golden/sharding/*")
  act.add_argument("--check", action="store_true", help="compare with tests/golden/sharding/*")
  parser.add_argument("--dir", default=str(GOLDEN_DIR), help="golden directory")
  args = parser.parse_args(argv)
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
