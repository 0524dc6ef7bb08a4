"""The collectives and custom calls of a compiled program, read from its optimised HLO text.

``analyse(text)["collectives"]`` counts every all-reduce, all-gather, reduce-scatter, all-to-all and
collective-permute (plain, async ``-start`` form, inside fusions or loop bodies; ``-done`` halves
are not counted again) and their bytes, per device and per step:

  * a collective inside a while loop counts once per iteration: the loop's multiplicity is the
    trip count XLA records (``known_trip_count``), times the multiplicity of what calls it;
    loops without a recorded count are counted once and reported in ``unknown_trip_counts``;
  * bytes are the larger side of the collective on one device: the sum of the operands or of
    the results, whichever is larger (all-gather: the gathered result; reduce-scatter: the
    operand before scattering; all-reduce, all-to-all, collective-permute: either). Combined
    collectives (one op over a tuple of buffers) count once with the bytes of all buffers;
  * XLA:TPU's reduce-scatter is a fusion of all-reduce + dynamic-slice (a computation named
    ``all-reduce-scatter*``): it counts as a reduce-scatter.
"""

from __future__ import annotations

import collections
import math
import re

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_EXTRA = ("ragged-all-to-all", "collective-broadcast")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16, "s4": 0.5, "u4": 0.5, "s2": 0.25, "u2": 0.25}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]+m[0-9]+[a-z0-9]*)?)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLEE = re.compile(r"\b(body|calls|to_apply|condition)=%?([\w.\-]+)"
                     r"|\bbranch_computations=\{([^}]*)\}")
# XLA:TPU writes a reduce-scatter as a custom fusion of all-reduce + dynamic-slice calling a
# computation of this name.
_TPU_REDUCE_SCATTER = "all-reduce-scatter"
_FORWARDING = ("copy", "bitcast", "copy-done", "copy-start", "convert")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')


def _array_bytes(type_text: str) -> float:
  total = 0.0
  for dtype, dims in _ARRAY.findall(type_text):
    size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 0)
    total += size * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _balanced(text: str, start: int) -> int:
  """Index just past the bracket group opening at text[start]."""
  depth = 0
  for i in range(start, len(text)):
    c = text[i]
    if c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
      if depth == 0:
        return i + 1
  return len(text)


def _top_level(type_text: str) -> list[str]:
  """The top-level elements of a tuple type "(a, (b, c), d)" (the type itself if no tuple)."""
  text = re.sub(r"/\*.*?\*/", "", type_text).strip()
  if not text.startswith("("):
    return [text]
  parts, depth, cur = [], 0, []
  for c in text[1:-1]:
    if c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
    if c == "," and depth == 0:
      parts.append("".join(cur).strip())
      cur = []
    else:
      cur.append(c)
  if "".join(cur).strip():
    parts.append("".join(cur).strip())
  return parts


def _split_instruction(rhs: str) -> tuple[str, str, str, str] | None:
  """(result type, opcode, operands, attributes) of the right-hand side of an instruction."""
  rhs = rhs.strip()
  end = _balanced(rhs, 0) if rhs.startswith("(") else rhs.find(" ")
  if end <= 0:
    return None
  type_text, rest = rhs[:end], rhs[end:].lstrip()
  paren = rest.find("(")
  if paren <= 0:
    return None
  opcode = rest[:paren].strip()
  close = _balanced(rest, paren)
  return type_text, opcode, rest[paren + 1:close - 1], rest[close:]


def _parse(text: str):
  """computations {name: [(name, type, opcode, operands, attrs)]}, shapes {name: type},
  entry name."""
  comps: dict[str, list] = {}
  shapes: dict[str, str] = {}
  entry, current = None, None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header and not line.startswith(" "):
      current = header.group(1)
      comps[current] = []
      if line.startswith("ENTRY"):
        entry = current
      for pname, ptype in re.findall(r"([\w.\-]+):\s*((?:\([^)]*\)|[^,()]+(?:\{[^}]*\})?))",
                                     header.group(2)):
        shapes[pname] = ptype
      continue
    if current is None or line.strip() == "}":
      continue
    m = _INSTR.match(line)
    parts = _split_instruction(m.group(2)) if m else None
    if parts:
      shapes[m.group(1)] = parts[0]
      comps[current].append((m.group(1), *parts))
  return comps, shapes, entry


def _int_constant(instr, by_name=None) -> int | None:
  """The integer an instruction holds: a constant, possibly behind copies / bitcasts."""
  for _ in range(8):
    if instr is None or instr[2] not in _FORWARDING or by_name is None:
      break
    names = _operand_names(instr[3])
    instr = by_name.get(names[0]) if len(names) == 1 else None
  if instr is None or instr[2] != "constant":
    return None
  try:
    return int(instr[3].strip())
  except ValueError:
    return None


def _trip_count(operands: str, attrs: str, comps, by_name) -> int | None:
  """A while loop's iterations: XLA's ``known_trip_count``, else read off a loop whose
  condition is ``counter < N`` with the counter's start a constant in the init tuple (what
  lax.scan / fori_loop become when the backend drops the annotation, as XLA:TPU does)."""
  found = _TRIP.search(attrs)
  if found:
    return int(found.group(1))
  cond = re.search(r"\bcondition=%?([\w.\-]+)", attrs)
  instrs = comps.get(cond.group(1), []) if cond else []
  if not instrs or instrs[-1][2] != "compare" or "direction=LT" not in instrs[-1][4]:
    return None
  local = {i[0]: i for i in instrs}
  counter, bound = (local.get(n) for n in _operand_names(instrs[-1][3])[:2])
  limit = _int_constant(bound)
  index = re.search(r"index=(\d+)", counter[4]) if counter and counter[2] == "get-tuple-element" \
      else None
  init = by_name.get((_operand_names(operands) or [""])[0])
  if limit is None or index is None or init is None or init[2] != "tuple":
    return None
  elements = _operand_names(init[3])
  start = _int_constant(by_name.get(elements[int(index.group(1))]), by_name) \
      if int(index.group(1)) < len(elements) else None
  return None if start is None else max(limit - start, 0)


def _multiplicities(comps, entry) -> tuple[dict[str, float], int]:
  """How many times each computation runs per call of the entry; loops without a known trip
  count (counted once)."""
  callers: dict[str, list] = collections.defaultdict(list)  # callee -> [(caller, factor)]
  by_name = {i[0]: i for instrs in comps.values() for i in instrs}
  unknown = 0
  for name, instrs in comps.items():
    for _, _, opcode, operands, attrs in instrs:
      trips = 1
      if opcode == "while":
        found = _trip_count(operands, attrs, comps, by_name)
        trips = 1 if found is None else found
        unknown += found is None
      for key, callee, branches in _CALLEE.findall(attrs):
        for target in [callee] if callee else re.findall(r"%?([\w.\-]+)", branches):
          if target in comps:
            callers[target].append((name, trips if key == "body" else 1))
  memo: dict[str, float] = {}

  def mult(comp: str, seen=()) -> float:
    if comp == entry:
      return 1.0
    if comp not in memo:
      memo[comp] = sum(mult(c, seen + (comp,)) * f for c, f in callers.get(comp, ())
                       if c not in seen)
    return memo[comp]
  return {c: mult(c) for c in comps}, unknown


def _operand_names(operands: str) -> list[str]:
  return re.findall(r"%([\w.\-]+)", operands)


def analyse(text: str) -> dict:
  """{"collectives": {"by_kind": {kind: {"count", "bytes"}}, "total_count", "total_bytes",
  "unknown_trip_counts"}, "custom_calls": {target: count}} for one step of the program (per
  device). Custom calls are the library and kernel calls XLA did not generate itself (cuDNN
  attention, Pallas / Triton / Mosaic kernels, ...)."""
  comps, shapes, entry = _parse(text)
  mult, unknown = _multiplicities(comps, entry)
  by_kind = {k: {"count": 0, "bytes": 0.0} for k in KINDS}
  custom: collections.Counter = collections.Counter()
  for comp, instrs in comps.items():
    times = mult.get(comp, 0.0)
    if not times:
      continue
    for _, type_text, opcode, operands, attrs in instrs:
      if opcode == "custom-call":
        called = re.search(r'custom_call_target="([^"]+)"', attrs)
        custom[called.group(1) if called else "?"] += int(times)
        continue
      kind = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
      if kind not in KINDS + _EXTRA:
        continue
      if kind == "all-reduce" and comp.startswith(_TPU_REDUCE_SCATTER):
        kind = "reduce-scatter"
      elements = _top_level(type_text)
      if opcode.endswith("-start") and len(elements) > 1:
        operand_bytes = _array_bytes(elements[0])
        result_bytes = sum(_array_bytes(e) for e in elements[1:] if "[]" not in e)
      else:
        operand_bytes = sum(_array_bytes(shapes.get(n, "")) for n in _operand_names(operands))
        result_bytes = _array_bytes(type_text)
      entry_ = by_kind.setdefault(kind, {"count": 0, "bytes": 0.0})
      entry_["count"] += int(times)
      entry_["bytes"] += times * max(operand_bytes, result_bytes)
  for v in by_kind.values():
    v["bytes"] = int(v["bytes"])
  return {"collectives": {"by_kind": by_kind,
                          "total_count": sum(v["count"] for v in by_kind.values()),
                          "total_bytes": sum(v["bytes"] for v in by_kind.values()),
                          "unknown_trip_counts": unknown},
          "custom_calls": dict(sorted(custom.items()))}
