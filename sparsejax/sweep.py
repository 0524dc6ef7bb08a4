"""Sweeps: a Python file defines ``runs(**args) -> list[Run]``; this module validates, lists and
runs them, one workdir per run, with a ``record.json`` per finished run.

  python -m sparsejax.sweep experiments/isoflop_tiny.py --root runs/isoflop_tiny [--dry_run]
      [--arg budgets=2 --arg sizes=3] [--only NAME]

Each run trains in ``ROOT/<name>/`` via ``sparsejax.train.loop.train_and_evaluate``:
  * ``ROOT/<name>/record.json`` with status "done" and the same config hash -> skipped;
  * a workdir without a done record (interrupted) -> resumed from its checkpoints;
  * a record whose config hash differs from the current definition -> error (the name now means
    another experiment: use a new --root or delete that run's directory).
The config hash is the sha1 of the validated Config's JSON (``Config.to_json``). Run names are
``<family>-<sha1(base + sorted overrides)[:8]>`` unless a Run gives one; family is config.name.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import importlib.util
import json
import os
import pathlib
import sys
import time
from typing import Any

from sparsejax.config import Config
from sparsejax.configs_loader import load_config

RECORD = "record.json"
FLOPS_CONVENTION = "6N+attention (sparsejax.scaling.flops)"
_RECORD_KEYS = ("name", "config_hash", "family", "base", "overrides", "status")


class SweepError(RuntimeError):
  pass


@dataclasses.dataclass(frozen=True)
class Run:
  base: str                              # config spec, e.g. "configs/dense.py:tiny"
  overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # dotted keys
  name: str | None = None                # None: <family>-<short hash of base + overrides>


@dataclasses.dataclass
class Planned:
  """A Run resolved into a validated Config and its accounting."""
  run: Run
  name: str
  cfg: Config
  config_hash: str
  info: dict                             # sparsejax.info.describe(cfg)

  @property
  def family(self) -> str:
    return self.cfg.name

  @property
  def tokens(self) -> int:
    return self.cfg.train.steps * self.cfg.data.global_batch_size * self.cfg.data.seq_len

  @property
  def total_flops(self) -> float:
    return self.info["flops_per_token"] * self.tokens


def config_hash(cfg: Config) -> str:
  return hashlib.sha1(cfg.to_json().encode()).hexdigest()


def definition_hash(base: str, overrides: dict) -> str:
  text = json.dumps({"base": base, "overrides": sorted(overrides.items())}, sort_keys=True,
                    default=repr)
  return hashlib.sha1(text.encode()).hexdigest()[:8]


def load_sweep(path: str | os.PathLike, **args) -> list[Run]:
  """Import a sweep file and call its ``runs(**args)``."""
  p = pathlib.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"sweep file {path} not found")
  spec = importlib.util.spec_from_file_location(f"sparsejax_sweep_{p.stem}", p)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, "runs", None)):
    raise SweepError(f"{path}: defines no runs(**args) function")
  runs = list(module.runs(**args))
  for r in runs:
    if not isinstance(r, Run):
      raise SweepError(f"{path}: runs() returned {r!r}, not a sparsejax.sweep.Run")
  return runs


def plan(runs: list[Run]) -> list[Planned]:
  """Validate every run's Config (all before any training) and check names are unique."""
  from sparsejax.info import describe
  out, seen = [], {}
  for r in runs:
    try:
      cfg = load_config(r.base, **dict(r.overrides))
    except Exception as e:
      raise SweepError(f"run {r.name or r.base} {dict(r.overrides)}: {e}") from e
    name = r.name or f"{cfg.name}-{definition_hash(r.base, dict(r.overrides))}"
    if name in seen:
      raise SweepError(f"two runs are named {name!r}: {seen[name]} and {r}")
    seen[name] = r
    out.append(Planned(r, name, cfg, config_hash(cfg), describe(cfg)))
  return out


def table(planned: list[Planned]) -> str:
  header = ("name", "family", "params", "active", "FLOPs/token", "steps", "tokens",
            "total FLOPs")
  rows = [header] + [
      (p.name, p.family, f"{p.info['params_total']:.3g}",
       f"{p.info['params_active_per_token']:.3g}", f"{p.info['flops_per_token']:.3g}",
       str(p.cfg.train.steps), f"{p.tokens:.3g}", f"{p.total_flops:.3g}") for p in planned]
  widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
  total = sum(p.total_flops for p in planned)
  lines.append(f"{len(planned)} runs, {total:.3g} FLOPs in all ({FLOPS_CONVENTION})")
  return "\n".join(lines)


def read_record(path: pathlib.Path) -> dict:
  """A record.json, checked; raises ValueError with the reason if malformed or partial."""
  try:
    rec = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"unreadable JSON: {e}") from e
  if not isinstance(rec, dict):
    raise ValueError(f"not a JSON object: {type(rec).__name__}")
  missing = [k for k in _RECORD_KEYS if k not in rec]
  if missing:
    raise ValueError(f"missing keys {missing}")
  return rec


def load_records(root: str | os.PathLike) -> tuple[list[dict], list[tuple[str, str]]]:
  """All ``ROOT/*/record.json``: (records, problems); problems are (file, reason) pairs."""
  records, problems = [], []
  for path in sorted(pathlib.Path(root).glob(f"*/{RECORD}")):
    try:
      records.append(read_record(path))
    except ValueError as e:
      problems.append((str(path), str(e)))
  return records, problems


def _write_record(workdir: pathlib.Path, rec: dict) -> None:
  tmp = workdir / (RECORD + ".tmp")
  tmp.write_text(json.dumps(rec, indent=1, sort_keys=True))
  os.replace(tmp, workdir / RECORD)


def _base_record(p: Planned) -> dict:
  return {"name": p.name, "config_hash": p.config_hash, "family": p.family, "base": p.run.base,
          "overrides": dict(p.run.overrides), "seed": p.cfg.train.seed,
          "params_total": p.info["params_total"],
          "params_active_per_token": p.info["params_active_per_token"],
          "flops_per_token": p.info["flops_per_token"], "steps": p.cfg.train.steps,
          "tokens": p.tokens, "total_flops": p.total_flops, "flops_convention": FLOPS_CONVENTION}


def run_sweep(runs: list[Run], root: str | os.PathLike, devices: list | None = None,
              only: str | None = None, log=print) -> list[tuple[str, str]]:
  """Train every run (or only the one named `only`) in ROOT/<name>/; returns (name, status)
  with status "skipped" (done already), "done" or "incomplete" (stopped early)."""
  from sparsejax.train.loop import train_and_evaluate
  planned = plan(runs)
  if only is not None:
    planned = [p for p in planned if p.name == only]
    if not planned:
      raise SweepError(f"--only {only}: no such run in the sweep")
  root = pathlib.Path(root)
  # Check every existing record before training anything.
  existing = {}
  for p in planned:
    path = root / p.name / RECORD
    if not path.exists():
      continue
    try:
      rec = read_record(path)
    except ValueError as e:
      raise SweepError(f"{path}: {e}; delete it (the run resumes from its checkpoints)") from e
    if rec["config_hash"] != p.config_hash:
      raise SweepError(
          f"{path}: run {p.name!r} was recorded with config hash {rec['config_hash']}, but its "
          f"definition now gives {p.config_hash}; use a new --root or delete {root / p.name}")
    existing[p.name] = rec
  statuses = []
  for i, p in enumerate(planned):
    if existing.get(p.name, {}).get("status") == "done":
      log(f"[{i + 1}/{len(planned)}] {p.name}: done already, skipped")
      statuses.append((p.name, "skipped"))
      continue
    workdir = root / p.name
    log(f"[{i + 1}/{len(planned)}] {p.name}: {'resuming' if workdir.exists() else 'training'} "
        f"({p.cfg.train.steps} steps, {p.total_flops:.3g} FLOPs)")
    workdir.mkdir(parents=True, exist_ok=True)
    rec = _base_record(p)
    t0 = time.perf_counter()
    _write_record(workdir, {**rec, "status": "running"})
    result = train_and_evaluate(p.cfg, workdir, devices=devices)
    ok = result.step == p.cfg.train.steps and not result.preempted
    ev = result.eval_metrics or {}
    rec.update(status="done" if ok else "incomplete", final_step=result.step,
               eval_loss=ev.get("loss"), eval_bits_per_byte=ev.get("bits_per_byte"),
               wall_s=time.perf_counter() - t0)
    _write_record(workdir, rec)
    statuses.append((p.name, rec["status"]))
    log(f"  {p.name}: {rec['status']} step {result.step}, eval loss {rec['eval_loss']}, "
        f"{rec['wall_s']:.1f} s")
  return statuses


def _parse_args(entries: list[str]) -> dict:
  out = {}
  for e in entries:
    key, sep, value = e.partition("=")
    if not sep or not key:
      raise SweepError(f"--arg {e!r}: expected key=value")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m sparsejax.sweep", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("sweep", help="sweep file defining runs(**args) -> list[Run]")
  ap.add_argument("--root", required=True, help="directory holding one workdir per run")
  ap.add_argument("--arg", action="append", default=[], help="key=value passed to runs()")
  ap.add_argument("--dry_run", action="store_true", help="validate and list runs, train nothing")
  ap.add_argument("--only", default=None, help="run only the run with this name")
  a = ap.parse_args(argv)
  try:
    runs = load_sweep(a.sweep, **_parse_args(a.arg))
    if a.dry_run:
      planned = plan(runs)
      if a.only is not None:
        planned = [p for p in planned if p.name == a.only]
      print(table(planned))
      return 0
    statuses = run_sweep(runs, a.root, only=a.only)
  except (SweepError, FileNotFoundError, ValueError) as e:
    print(f"sparsejax.sweep: error: {e}", file=sys.stderr)
    return 2
  done = sum(s != "incomplete" for _, s in statuses)
  print(f"{done}/{len(statuses)} runs done in {a.root}")
  return 0 if done == len(statuses) else 1


if __name__ == "__main__":
  # Run the importable module's main, so sweep files' `from sparsejax.sweep import Run` is the
  # same class as the one checked here (not a copy in __main__).
  from sparsejax import sweep as _sweep
  sys.exit(_sweep.main())
