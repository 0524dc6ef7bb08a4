"""``python -m sparsejax.compile_check.fits`` (``make fits``): the fits table (docs/fits.md) — for
every row of fits_grid.ROWS (a config preset, its mesh preset, overrides) on every target of
fits_grid.TARGETS, the largest per-device batch whose train step fits, its peak memory,
collectives, roofline and compile time.

    python -m sparsejax.compile_check.fits [--only 'dense:1.3b/v5p-8,moe:*'] [--jobs 2]
        [--results benchmarks/results/fits.json] [--doc docs/fits.md] [--report_only]
        [--list] [--precheck_only] [--cap 64] [--tpu_compiler .tpu-compiler]
        [--gpu_compiler .gpu-compiler] [--compile_timeout_s 7200]

Per cell (row x target):
  * a pre-check without compiling (``plan``): the parameter, gradient and optimizer-state bytes
    per device from the state shardings on the target's mesh; when they alone exceed the
    device's limit (TPU: HBM, GPU: HBM x 0.75) the cell says so and nothing is compiled;
  * the search of sparsejax/compile_check/fits_search.py (b = 1, 2, the linear prediction,
    b + 1; secant / bisection steps when the prediction misses), each compile being
    ``python -m sparsejax.compile_check`` in the platform's compiler environment (found as
    tests/test_compile_check.py finds it: $SPARSEJAX_TPU_PYTHON / $SPARSEJAX_GPU_PYTHON, else
    .tpu-compiler / .gpu-compiler on PYTHONPATH, else this Python); its command is kept.
Every compile record is written to the results JSON at once, keyed by cell (row, target, mesh,
overrides, compiler versions, cap): a rerun skips finished cells and resumes a cell's search
from its compiles. Errors are recorded and retried on the next run. --jobs N runs N cells at a
time, each compile in its own process (an XLA compile is mostly single-threaded); one run at a
time writes into a results folder (a lock refuses a second). --precheck_only fills in the
cells whose state alone does not fit, without compiling.
docs/fits.md is written from the JSON alone (sparsejax/compile_check/fits_report.py).
"""

from __future__ import annotations

import os

if __name__ == "__main__" and not os.environ.get("JAX_PLATFORMS"):
  os.environ["JAX_PLATFORMS"] = "cpu"  # the pre-check is abstract; set before jax starts

import argparse
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import pathlib
import platform
import shlex
import subprocess
import sys
import threading
import time

import jax
import numpy as np
from tqdm import tqdm

from sparsejax.cli_common import EXPECTED_ERRORS, setup_logging
from sparsejax.compile_check import fits_report, fits_search, program
from sparsejax.compile_check.fits_grid import CAP, Cell, cli_value, command, select
from sparsejax.configure import load_config
from sparsejax.layers import registry
from sparsejax.models import accounting
from sparsejax.parallel import mesh as mesh_lib, sharding as shd, targets as targets_lib
from sparsejax.train.optim import make_optimizer
from sparsejax.train.state import model_spec, state_shardings

_COMPILERS = {"tpu": ("SPARSEJAX_TPU_PYTHON", "libtpu", "libtpu"),
              "gpu": ("SPARSEJAX_GPU_PYTHON", "jax_plugins", "jax-cuda13-plugin")}
_DROP_ENV = ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
_VERSIONS = ("import importlib.metadata as m, json, sys\nout = {}\n"
             "for d in sys.argv[1:]:\n  try: out[d] = m.version(d)\n"
             "  except m.PackageNotFoundError: pass\nprint(json.dumps(out))")
_log = logging.getLogger("sparsejax")


class CompileError(RuntimeError):
  """A compile that neither fitted nor ran out of memory (the command's one-line error)."""


# ---- compiler environments ------------------------------------------------------------------

def compiler_env(platform_: str, folder: str) -> tuple[str, dict] | None:
  """(python, env) that can compile for "tpu" / "gpu", or None: $SPARSEJAX_<TPU|GPU>_PYTHON,
  else ``folder`` (pip --target dir) on PYTHONPATH, else this Python if it has the compiler."""
  var, marker, _ = _COMPILERS[platform_]
  env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
  env["JAX_PLATFORMS"] = "cpu"  # (compile-check allows several libtpu processes: devices.py)
  if os.environ.get(var):
    return os.environ[var], env
  if (pathlib.Path(folder) / marker).is_dir():
    path = os.pathsep.join(filter(None, (folder, os.environ.get("PYTHONPATH"))))
    return sys.executable, {**env, "PYTHONPATH": path}
  probe = subprocess.run([sys.executable, "-c", f"import {marker}"], env=env,
                         capture_output=True)
  return (sys.executable, env) if probe.returncode == 0 else None


def versions(platform_: str, compiler: tuple[str, dict]) -> dict:
  """jax / jaxlib / the compiler plugin's versions in that environment (program.versions)."""
  python, env = compiler
  out = subprocess.run([python, "-c", _VERSIONS, "jax", "jaxlib", _COMPILERS[platform_][2]],
                       env=env, capture_output=True, text=True, check=True).stdout
  return json.loads(out)


def host() -> dict:
  return {"system": platform.system(), "machine": platform.machine(), "cpus": os.cpu_count(),
          "python": platform.python_version()}


# ---- the pre-check --------------------------------------------------------------------------

def _bytes_per_device(tree, shardings) -> int:
  return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def plan(cell: Cell, memory_fraction: float = program.DEFAULT_MEMORY_FRACTION) -> dict:
  """What the cell compiles and whether its state alone fits (abstract: no devices, no
  compile): the mesh, batch unit (global batch per sequence per device), parameter / gradient /
  optimizer-state bytes per device from the state shardings, the device's limit."""
  target = targets_lib.parse(cell.target)
  cfg = load_config(cell.row.config, **dict(cell.overrides))
  granules = target.num_slices if target.platform == "tpu" else int(target.topology.split("x")[1])
  shape = mesh_lib.mesh_shape(cfg.mesh, target.num_devices, granules)
  mesh = jax.sharding.AbstractMesh(tuple(shape.values()), tuple(shape),
                                   axis_types=(jax.sharding.AxisType.Auto,) * len(shape))
  vocab = program.default_vocab(cfg)
  spec = model_spec(cfg, vocab)
  optimizer = make_optimizer(cfg)
  sh = state_shardings(spec, mesh, optimizer)
  params = _bytes_per_device(spec.abstract_params, sh["params"])
  opt = _bytes_per_device(jax.eval_shape(optimizer.init, spec.abstract_params), sh["opt_state"])
  hbm = target.chip.hbm_bytes
  limit = hbm if target.platform == "tpu" else int(hbm * memory_fraction)
  counts = accounting.count(spec.abstract_model, cfg, vocab_size=vocab)
  return {"name": cfg.name, "platform": target.platform, "devices": target.num_devices,
          "mesh": shape, "seq_len": cfg.data.seq_len, "remat": cfg.model.remat,
          "params_total": counts.params_total, "vocab_size": vocab,
          "batch_unit": cfg.train.grad_accum_steps * shd.batch_shards(
              mesh, registry.logical_rules(cfg.mesh)),
          "state": {"params_bytes": params, "grads_bytes": params, "opt_state_bytes": opt,
                    "total_bytes": 2 * params + opt},
          "hbm_bytes": hbm, "limit_bytes": limit}


# ---- compiling one batch --------------------------------------------------------------------

def subprocess_compile(cell: Cell, cell_plan: dict, b: int, *, compilers: dict,
                       timeout_s: float) -> dict:
  """Compile ``cell`` at per-device batch ``b`` in its compiler environment; the record, with
  ``fits_run``: the command (PYTHONPATH as given), exit status and wall seconds."""
  python, env = compilers[cell_plan["platform"]]
  args = command(cell, b * cell_plan["batch_unit"])
  start = time.perf_counter()
  try:
    proc = subprocess.run([python, *args], env=env, capture_output=True, text=True,
                          timeout=timeout_s)
  except subprocess.TimeoutExpired:
    raise CompileError(f"b={b}: compile timed out after {timeout_s:.0f} s") from None
  if proc.returncode not in (0, 2) or not proc.stdout.strip():
    lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
    raise CompileError(f"b={b}: {lines[-1]}")
  rec = json.loads(proc.stdout)
  prefix = f"PYTHONPATH={env['PYTHONPATH']} " if "PYTHONPATH" in env else ""
  rec["fits_run"] = {"command": prefix + shlex.join(["python", *args]),
                     "exit": proc.returncode, "wall_s": round(time.perf_counter() - start, 1)}
  return rec


# ---- the results file and one cell ----------------------------------------------------------

class Results:
  """benchmarks/results/fits.json: {"format": 1, "cells": {key: entry}}. Cells run in threads of
  this one process: every change goes through ``update`` (under the lock, then an atomic write),
  so the file always holds whole compiles."""

  def __init__(self, path: str | pathlib.Path):
    self.path = pathlib.Path(path)
    self.data = (json.loads(self.path.read_text()) if self.path.exists()
                 else {"format": 1, "cells": {}})
    self.lock = threading.Lock()

  def entry(self, key: str, new: dict) -> dict:
    """The entry of ``key``, created as ``new`` if absent."""
    with self.lock:
      return self.data["cells"].setdefault(key, new)

  def update(self, entry: dict, **fields) -> None:
    with self.lock:
      entry.update(fields)
      self.path.parent.mkdir(parents=True, exist_ok=True)
      tmp = self.path.with_suffix(".json.tmp")
      tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")
      os.replace(tmp, self.path)


DONE = ("done", "state_exceeds_limit")


def _now() -> str:
  return time.strftime("%Y-%m-%d %H:%M:%S")


# Revisions of how the step is built for a config, where the config itself did not change: a cell
# compiled before one gets a new key (it is compiled again).
SCANNED_STEP_REVISION = "stacked-storage"  # scanned layers' params stored stacked (models/scan.py)


def config_digest(cell: Cell) -> str:
  """12 hex digits of the resolved config's JSON (a preset edited since gets a new cell) and,
  for scanned-layer configs, of ``SCANNED_STEP_REVISION``."""
  cfg = load_config(cell.row.config, **dict(cell.overrides))
  text = cfg.to_json() + (SCANNED_STEP_REVISION if cfg.model.scan_layers else "")
  return hashlib.sha1(text.encode()).hexdigest()[:12]


def prepare(cell: Cell, results: Results, versions_: dict, *, cap: int = CAP,
            plan_fn=plan) -> dict:
  """The cell's entry in ``results`` (created if new) with its pre-check ``plan``; a cell whose
  state alone exceeds the limit is finished here, without a compile."""
  entry = results.entry(cell.key(versions_, cap, config_digest(cell)), {
      "id": cell.row.id, "config": cell.row.config, "target": cell.target,
      "overrides": [[k, cli_value(v)] for k, v in cell.overrides], "cap": cap,
      "versions": versions_, "trials": {}})
  if entry.get("status") in DONE:
    return entry
  cell_plan = entry.get("plan") or plan_fn(cell)
  if cell_plan["state"]["total_bytes"] > cell_plan["limit_bytes"]:
    results.update(entry, plan=cell_plan, status="state_exceeds_limit", host=host(),
                   finished=_now())
  else:
    results.update(entry, plan=cell_plan)
  return entry


def run_cell(cell: Cell, entry: dict, results: Results, compile_fn, *, cap: int = CAP,
             log=None) -> dict:
  """Finish a prepared cell: the batch search (fits_search), each compile stored in the entry's
  ``trials`` as it finishes, so an interrupted search resumes from them.
  ``compile_fn(cell, plan, b)`` -> compile-check record, or raises CompileError."""
  if entry.get("status") in DONE:
    return entry
  results.update(entry, status="running", host=host(), started=_now(), error=None)

  def run(b: int) -> dict:
    if str(b) not in entry["trials"]:
      rec = compile_fn(cell, entry["plan"], b)
      results.update(entry, trials={**entry["trials"], str(b): rec})
      if log:
        log(cell, b, rec)
    return entry["trials"][str(b)]

  try:
    results.update(entry, search=fits_search.search(run, cap), status="done", finished=_now())
  except CompileError as e:
    results.update(entry, status="error", error=str(e), finished=_now())
  return entry


def _log_compile(cell: Cell, b: int, rec: dict) -> None:
  mem = rec["memory"]
  tqdm.write(f"{cell.row.id} on {cell.target}, {b} sequences per device: "
             f"{'fits' if rec['fits'] else 'does NOT fit'}, "
             f"{mem.get('peak_bytes', 0) / 2 ** 30:.2f} of {mem['limit_bytes'] / 2 ** 30:.2f} "
             f"GiB, compile {rec['compile_s']:.0f} s", file=sys.stderr)


# ---- the command ----------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m sparsejax.compile_check.fits",
                               description="The fits table: docs/fits.md from "
                               "benchmarks/results/fits.json (module docstring).")
  ap.add_argument("--only", default="", help="comma-separated globs over '<row id>/<target>', "
                  "e.g. 'dense:1.3b/v5p-8,moe:*'")
  ap.add_argument("--jobs", type=int, default=1, help="cells compiled at a time")
  ap.add_argument("--cap", type=int, default=CAP, help="largest per-device batch tried")
  ap.add_argument("--results", default="benchmarks/results/fits.json")
  ap.add_argument("--doc", default="docs/fits.md")
  ap.add_argument("--tpu_compiler", default=".tpu-compiler")
  ap.add_argument("--gpu_compiler", default=".gpu-compiler")
  ap.add_argument("--compile_timeout_s", type=float, default=7200.0,
                  help="a compile running longer is an error (retried by the next run)")
  ap.add_argument("--report_only", action="store_true", help="only rewrite --doc from the JSON")
  ap.add_argument("--precheck_only", action="store_true",
                  help="only the pre-check of every selected cell (no compile)")
  ap.add_argument("--list", action="store_true", help="list the selected cells and stop")
  return ap


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  setup_logging()
  results = Results(args.results)
  chosen = select([p for p in args.only.split(",") if p.strip()])
  if args.list:
    for c in chosen:
      print(f"{c.row.id}/{c.target}: --config {c.row.config} " + " ".join(
          shlex.quote(f"--config.{k}={cli_value(v)}") for k, v in c.overrides))
    return 0
  if not chosen:
    print(f"fits: error: --only {args.only!r} matches no cell (see --list)", file=sys.stderr)
    return 1
  failed = 0
  if not args.report_only:
    try:
      with _only_writer(results.path):
        failed = _run(chosen, results, args)
    except (*EXPECTED_ERRORS, subprocess.CalledProcessError) as e:
      print(f"fits: error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
      return 1
  doc = fits_report.write(results.data, [(c.row.id, c.target) for c in select([])],
                          args.doc, results_path=args.results, cap=args.cap)
  print("\n".join(doc.headline))
  return 1 if failed else 0


@contextlib.contextmanager
def _only_writer(path: pathlib.Path):
  """An exclusive lock on the results file's folder (the file itself is replaced on every
  write): a second run would overwrite this one's cells."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd = os.open(path.parent, os.O_RDONLY)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise RuntimeError(f"another fits run is writing into {path.parent}; wait for it or "
                         "pass --results in another folder") from None
    yield
  finally:
    os.close(fd)


def _run(chosen: list[Cell], results: Results, args) -> int:
  folders = {"tpu": args.tpu_compiler, "gpu": args.gpu_compiler}
  platforms = sorted({targets_lib.parse(c.target).platform for c in chosen})
  compilers, vers = {}, {}
  for p in platforms:
    compilers[p] = compiler_env(p, folders[p])
    if compilers[p] is None:
      raise RuntimeError(f"no {p.upper()} compiler environment: set {_COMPILERS[p][0]} or "
                         f"run make {folders[p]}/.installed (docs/compile_check.md)")
    vers[p] = versions(p, compilers[p])
  entries = []
  for c in tqdm(chosen, desc="pre-check", file=sys.stderr, disable=len(chosen) < 2):
    entries.append((c, prepare(c, results, vers[targets_lib.parse(c.target).platform],
                               cap=args.cap)))
  todo = [(c, e) for c, e in entries if e.get("status") not in DONE]
  _log.info("%d cells selected, %d to compile", len(chosen), len(todo))
  if args.precheck_only:
    return 0
  compile_fn = lambda c, p, b: subprocess_compile(c, p, b, compilers=compilers,  # noqa: E731
                                                  timeout_s=args.compile_timeout_s)
  with tqdm(total=len(todo), desc="cells", file=sys.stderr) as bar, \
      concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
    futures = [pool.submit(run_cell, c, e, results, compile_fn, cap=args.cap, log=_log_compile)
               for c, e in todo]
    for f in concurrent.futures.as_completed(futures):
      entry = f.result()
      bar.update()
      if entry["status"] == "error":
        tqdm.write(f"{entry['id']} on {entry['target']}: error: {entry['error']}",
                   file=sys.stderr)
  return sum(e["status"] == "error" for _, e in entries)


if __name__ == "__main__":
  sys.exit(main())
