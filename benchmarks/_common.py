"""Shared helpers for the kernel benchmarks: timing (jax and torch CUDA), tables, JSON output.

Only jax and numpy are imported here (torch lazily), so the kernel benchmarks run on the GPU
image with nothing carried.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

import jax  # noqa: E402


def time_jax_ms(fn, *args, reps: int = 10, warmup: int = 2) -> float:
  """Median wall time of ``fn(*args)`` in ms (``fn`` jitted by the caller), after warmup calls
  that also absorb compilation."""
  for _ in range(max(warmup, 1)):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(max(reps, 1)):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t) * 1000)
  return statistics.median(times)


def time_torch_ms(fn, *, reps: int = 10, warmup: int = 2) -> float:
  """Median CUDA-event time of ``fn()`` in ms (torch on a CUDA device)."""
  import torch
  for _ in range(max(warmup, 1)):
    fn()
  torch.cuda.synchronize()
  times = []
  for _ in range(max(reps, 1)):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(end))
  return statistics.median(times)


def torch_cuda():
  """The torch module when torch with a CUDA device is importable, else (None, reason)."""
  try:
    import torch
  except ImportError:
    return None, "torch not importable"
  if not torch.cuda.is_available():
    return None, "no CUDA device"
  return torch, ""


def platform() -> str:
  return jax.devices()[0].platform


def device_kind() -> str:
  return jax.devices()[0].device_kind


def print_table(rows: list[dict], columns: list[str]) -> None:
  """Fixed-width table of ``rows`` restricted to ``columns`` (missing cells print '-')."""
  def cell(v):
    if v is None:
      return "-"
    if isinstance(v, float):
      return f"{v:.4g}"
    return str(v)
  cells = [[cell(r.get(c)) for c in columns] for r in rows]
  widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
  print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
  for row in cells:
    print("  ".join(v.ljust(w) for v, w in zip(row, widths)), flush=True)


def write_json(name: str, tag: str, payload: dict, path: str = "") -> pathlib.Path:
  """Write ``payload`` (plus device / date metadata) to ``path`` or
  benchmarks/results/<name>-<platform>-<tag or date>.json; returns the path."""
  out = dict(payload)
  out.setdefault("device_kind", device_kind())
  out.setdefault("platform", platform())
  out.setdefault("jax_version", jax.__version__)
  out.setdefault("date", f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%MZ}")
  target = pathlib.Path(path) if path else (
      REPO / "benchmarks" / "results" /
      f"{name}-{platform()}-{tag or f'{datetime.date.today():%Y%m%d}'}.json")
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_text(json.dumps(out, indent=1))
  return target
