"""docs/fits.md from benchmarks/results/fits.json (sparsejax/compile_check/fits.py writes the
JSON): one table per target, a headline, the versions and host the compiles ran with. Every number
in the document is a field of the JSON or computed here from fields of one cell (``summarize``),
so the table can be traced back and regenerated (``--report_only``) without compiling.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

from sparsejax.parallel import targets as targets_lib

GIB = 2 ** 30
_SHORT = {"all-gather": "AG", "reduce-scatter": "RS", "all-reduce": "AR", "all-to-all": "A2A",
          "collective-permute": "CP"}
# Hardware FLOPs / model FLOPs: remat="full" recomputes each block's forward pass in the
# backward (8N instead of 6N per token); "dots" / "dots_no_batch" keep the matmul outputs.
REMAT_FLOPS = {"full": 4 / 3}


@dataclasses.dataclass
class Report:
  text: str
  headline: list[str]


def latest(data: dict) -> dict[tuple[str, str], dict]:
  """(row id, target) -> its most recently started entry (older keys: other versions / caps)."""
  out: dict[tuple[str, str], dict] = {}
  for entry in data["cells"].values():
    k = (entry["id"], entry["target"])
    stamp = entry.get("finished") or entry.get("started") or ""
    if k not in out or stamp >= (out[k].get("finished") or out[k].get("started") or ""):
      out[k] = entry
  return out


def summarize(entry: dict) -> dict:
  """The numbers of one cell's table row, from its entry: the record of the largest fitting
  batch (or of b = 1 when none fits), the pre-check, and the search."""
  plan = entry.get("plan", {})
  out = {"status": entry.get("status", "not run"), "name": plan.get("name", entry["id"]),
         "params_total": plan.get("params_total"), "seq_len": plan.get("seq_len"),
         "remat": plan.get("remat"), "mesh": plan.get("mesh", {}), "error": entry.get("error"),
         "state_bytes": plan.get("state", {}).get("total_bytes"),
         "limit_bytes": plan.get("limit_bytes")}
  if out["status"] != "done":
    fitting = [int(b) for b, t in entry.get("trials", {}).items() if t.get("fits")]
    if fitting:  # an interrupted search: what it had shown so far
      rec = entry["trials"][str(max(fitting))]
      out.update(at_least=max(fitting), peak_bytes=rec["memory"].get("peak_bytes"),
                 tried=len(entry["trials"]))
    return out
  trials, search = entry["trials"], entry["search"]
  b = search["max_per_device_batch"]
  rec = trials[str(b or 1)]
  mem, coll = rec["memory"], rec.get("collectives", {})  # none when nothing fits (OOM)
  out.update(per_device_batch=b, capped=search["capped"], method=search["method"],
             global_batch=rec["global_batch"], tokens_per_step=rec["global_batch"] * rec["seq_len"],
             peak_bytes=mem.get("peak_bytes"), hbm_bytes=mem["hbm_bytes"],
             compile_s=rec["compile_s"], compiles=len(trials),
             compile_s_total=round(sum(r["compile_s"] for r in trials.values()), 1))
  if not b:
    return out
  out["peak_fraction_of_hbm"] = mem["peak_fraction_of_hbm"]
  out["collectives"] = {k: v for k, v in coll["by_kind"].items() if v["count"]}
  model_s = rec["roofline_s"]
  ici = rec["target"]["ici_gbytes_per_s"] * 1e9
  comm_s = coll["total_bytes"] / ici if ici else 0.0
  bound_s = max(model_s * REMAT_FLOPS.get(rec["remat"], 1.0), comm_s)
  out.update(roofline_s=model_s, comm_s=comm_s, step_bound_s=bound_s,
             mfu_bound=model_s / bound_s if bound_s else 0.0)
  return out


def _params(n) -> str:
  if n is None:
    return "–"
  return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _gib(n) -> str:
  return "?" if n is None else f"{n / GIB:.2f} GiB"


def _mesh(mesh: dict) -> str:
  if not mesh:
    return "–"
  return " ".join(f"{k} {v}" for k, v in mesh.items() if v > 1) or "1 device"


def _collectives(by_kind: dict) -> str:
  return ", ".join(f"{_SHORT.get(k, k)} {v['count']} ({_gib(v['bytes'])})"
                   for k, v in by_kind.items()) or "none"


def _seconds(s: float) -> str:
  return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.1f} s"


def row(entry_id: str, s: dict) -> str:
  """One markdown table row (columns: see HEADER)."""
  first = [entry_id, _params(s["params_total"]), _mesh(s["mesh"]), str(s["seq_len"] or "–"),
           str(s["remat"] or "–")]
  status = s["status"]
  if status == "state_exceeds_limit":
    rest = [f"state alone {_gib(s['state_bytes'])} > {_gib(s['limit_bytes'])}: not compiled"]
  elif status == "error":
    rest = [f"error: {s['error']}"]
  elif status != "done" and s.get("at_least"):
    rest = [f">= {s['at_least']} (search interrupted after {s['tried']} compiles; "
            f"peak {_gib(s['peak_bytes'])} at {s['at_least']})"]
  elif status != "done":
    rest = ["not compiled yet" + (" (interrupted)" if status == "running" else "")]
  elif not s["per_device_batch"]:
    rest = [f"1 sequence per device does not fit: peak {_gib(s['peak_bytes'])}"]
  else:
    batch = f"{s['per_device_batch']}" + (" (cap)" if s["capped"] else "")
    rest = [batch, str(s["global_batch"]), str(s["tokens_per_step"]), _gib(s["peak_bytes"]),
            f"{100 * s['peak_fraction_of_hbm']:.1f}%", _collectives(s["collectives"]),
            f"{_seconds(s['roofline_s'])} (comm {_seconds(s['comm_s'])})",
            f"{100 * s['mfu_bound']:.0f}%",
            f"{s['compile_s']:.0f} s ({s['compiles']}: {s['compile_s_total']:.0f} s)"]
  if len(rest) == 1:
    rest += [""] * 8
  return "| " + " | ".join(first + rest) + " |"


HEADER = ("| row | params | mesh | seq | remat | batch / device | global batch | tokens / step "
          "| peak / device | % HBM | collectives / step / device | roofline step (comm) | MFU bound "
          "| compile (compiles: total) |\n|" + "---|" * 14)

NOTES = """\
What the columns mean:
- **batch / device**: the largest per-device batch b (sequences per batch shard; no gradient
  accumulation) whose train step fits, searched up to a cap of {cap} ("(cap)": b = {cap} fits,
  more was not tried). The search compiles b = 1 and 2, predicts b from peak memory linear in b,
  compiles the prediction and b + 1 (which must not fit), and brackets the answer with secant /
  bisection steps when the prediction misses (sparsejax/compile_check/fits_search.py).
  global batch = b x the mesh's batch shards; tokens / step = global batch x seq.
- **peak / device**, **% HBM**: TPU: arguments + outputs - donated + temporaries of the compiled
  step (XLA's CompiledMemoryStats); the verdict is the TPU compiler's own (a step over HBM fails
  with RESOURCE_EXHAUSTED). GPU: XLA's peak_memory_in_bytes; XLA does not check GPU memory, so a
  step fits when the peak is at most 0.75 x HBM (XLA_PYTHON_CLIENT_MEM_FRACTION's default; see
  program.verdict): GPU rows never exceed 75%. % of the HBM in parallel/targets.toml.
- **state alone ... not compiled**: parameters + gradients + optimizer state per device, from the
  state shardings on the target's mesh, already exceed the limit (HBM; GPU: HBM x 0.75).
- **collectives**: count (bytes) per step per device in the compiled step: AG all-gather, RS
  reduce-scatter, AR all-reduce, A2A all-to-all, CP collective-permute (compile_check/hlo.py).
- **roofline step**: analytic model FLOPs per device per step (6 x active params + causal
  attention per token) / the chip's peak bf16 FLOP/s; **comm**: the collective bytes / the ICI
  (NVLink) bandwidth per chip in parallel/targets.toml (bidirectional). **MFU bound** = roofline /
  max(roofline x remat factor, comm), remat factor 4/3 for remat="full" (the forward pass
  recomputed), else 1: perfect overlap, no HBM-bandwidth or kernel losses, so an upper bound,
  not a prediction.
- **compile**: XLA compile seconds of the reported batch, then the number of compiles the cell
  took and their total, on the host below (shared CPU cores: compare within one run only).
"""


def _versions(entries: list[dict]) -> list[str]:
  seen = []
  for e in entries:
    v = ", ".join(f"{k} {x}" for k, x in sorted(e.get("versions", {}).items()))
    where = targets_lib.parse(e["target"]).platform.upper()
    if v and f"{where}: {v}" not in seen:
      seen.append(f"{where}: {v}")
  return sorted(seen) or ["(no compiles yet)"]


def _hosts(entries: list[dict]) -> list[str]:
  seen = []
  for e in entries:
    h = e.get("host")
    if h:
      text = f"{h['system']} {h['machine']}, {h['cpus']} CPUs, Python {h['python']}"
      if text not in seen:
        seen.append(text)
  return seen or ["(none yet)"]


def headline(cells: list[tuple[str, str]], found: dict) -> list[str]:
  """Per target, the largest model (total parameters) with a fitting batch."""
  lines = []
  for target in dict.fromkeys(t for _, t in cells):
    best, mine = None, [c for c in cells if c[1] == target]
    status = [found[c].get("status") if c in found else None for c in mine]
    counted = (f"{status.count('done')} of {len(mine)} cells compiled, "
               f"{status.count('state_exceeds_limit')} ruled out by the state pre-check")
    for c in mine:
      s = summarize(found[c]) if c in found else None
      if s and s["status"] == "done" and s["per_device_batch"] and (
          best is None or s["params_total"] > best[1]["params_total"]):
        best = (c[0], s)
    partial = [(c[0], summarize(found[c])) for c in mine if c in found]
    partial = max(((cid, p) for cid, p in partial if p.get("at_least") and p["params_total"]
                   and (best is None or p["params_total"] > best[1]["params_total"])),
                  key=lambda cp: cp[1]["params_total"], default=None)
    if partial:  # a larger model whose search was interrupted after fitting batches
      cid, p = partial
      lines.append(f"- {target}: **{cid}** ({_params(p['params_total'])} parameters) fits at "
                   f">= {p['at_least']} x {p['seq_len']} tokens per device, peak "
                   f"{_gib(p['peak_bytes'])} (search interrupted); {counted}")
      continue
    if best is None:
      lines.append(f"- {target}: none fits yet ({counted})")
      continue
    cid, s = best
    lines.append(f"- {target}: **{cid}** ({_params(s['params_total'])} parameters) at "
                 f"{s['per_device_batch']} x {s['seq_len']} tokens per device (global batch "
                 f"{s['global_batch']}, {s['tokens_per_step']} tokens per step), peak "
                 f"{_gib(s['peak_bytes'])} ({100 * s['peak_fraction_of_hbm']:.1f}% of HBM); "
                 f"{counted}")
  return lines


def render(data: dict, cells: list[tuple[str, str]], *, results_path: str, cap: int) -> Report:
  found = latest(data)
  entries = [found[c] for c in cells if c in found]
  head = headline(cells, found)
  stamps = sorted(e["finished"] for e in entries if e.get("finished"))
  out = [
      "# Fits: the largest batch per model and target",
      "",
      f"Generated from `{results_path}` by `python -m sparsejax.compile_check.fits` on "
      f"{time.strftime('%Y-%m-%d')} (cells finished "
      f"{stamps[0] + ' to ' + stamps[-1] if stamps else 'never'}). Do not edit: regenerate with",
      "",
      "```",
      "make fits                                        # every cell not yet in the JSON",
      "python -m sparsejax.compile_check.fits --only 'dense:8b/*,moe:*/v5p-256' --jobs 2",
      "python -m sparsejax.compile_check.fits --report_only   # this file from the JSON only",
      "```",
      "",
      "The grid (rows, meshes, overrides, targets) is sparsejax/compile_check/fits_grid.py; a "
      "cell's compile commands are in the JSON (`trials.<b>.fits_run.command`).",
      "",
      "Compiled with: " + "; ".join(_versions(entries)) + ".",
      "Host: " + "; ".join(_hosts(entries)) + ".",
      "",
      "## Headline: the largest model that fits, per target",
      "",
      *head,
      "",
      NOTES.format(cap=cap),
  ]
  for target in dict.fromkeys(t for _, t in cells):
    tgt = targets_lib.parse(target)
    chip = tgt.chip
    out += [f"## {target}: {tgt.num_devices} x {chip.name} ({chip.hbm_bytes / GIB:.1f} GiB "
            f"HBM, {chip.peak_bf16_tflops:g} TFLOP/s bf16, ICI {chip.ici_gbytes_per_s:g} GB/s)",
            "", HEADER]
    for cid, t in cells:
      if t == target:
        entry = found.get((cid, t), {"id": cid, "target": t})
        out.append(row(cid, summarize(entry)))
    out.append("")
  return Report("\n".join(out), head)


def write(data: dict, cells: list[tuple[str, str]], path: str | pathlib.Path, *,
          results_path: str, cap: int) -> Report:
  """Render and write the document; returns it (the command prints the headline)."""
  report = render(data, cells, results_path=results_path, cap=cap)
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(path).write_text(report.text)
  return report
