"""Sweep files and their plan: a Python file defines ``runs(**args) -> list[Run]``;
``load_sweep`` imports it, ``plan`` validates every run into a Config with its accounting
(``Planned``; ``account``: counts at the true vocabulary; ``moe_fields``: the resolved MoE
granularity / experts / top_k the records carry), ``table`` is the --dry_run listing.

The config hash is the sha1 of the validated Config's JSON (``Config.to_json``). Run names are
``<family>-<sha1(base + sorted overrides)[:8]>`` unless a Run gives one; family is config.name.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.util
import json
import os
import pathlib
from typing import Any

from sparsejax.config import Config
from sparsejax.configure import load_config
from sparsejax.info import describe
from sparsejax.layers import registry
from sparsejax.scaling.records import FLOPS_CONVENTION


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
  info: dict                             # account(cfg): sparsejax.info.describe(cfg), true V

  @property
  def family(self) -> str:
    return self.cfg.name

  @property
  def run_id(self) -> str:
    return f"{self.name}@{self.config_hash[:12]}"

  @property
  def tokens_per_step(self) -> int:
    return self.cfg.data.global_batch_size * self.cfg.data.seq_len

  @property
  def tokens(self) -> int:
    return self.cfg.train.steps * self.tokens_per_step

  @property
  def total_flops(self) -> float:
    return self.info["flops_per_token"] * self.tokens


def config_hash(cfg: Config) -> str:
  return hashlib.sha1(cfg.to_json().encode()).hexdigest()


def definition_hash(base: str, overrides: dict) -> str:
  text = json.dumps({"base": base, "overrides": sorted(overrides.items())}, sort_keys=True,
                    default=repr)
  return hashlib.sha1(text.encode()).hexdigest()[:8]


def account(cfg: Config) -> dict:
  """``sparsejax.info.describe(cfg)``: counts with the output head at the true vocabulary
  (``info["vocab_size"]``; sparsejax.models.accounting)."""
  return describe(cfg)


def moe_fields(cfg: Config) -> dict:
  """``granularity``, ``num_experts`` and ``top_k``: the resolved Config's ``config.moe`` values
  (the base config's own or overridden: what the run trained with) when a layer uses the "moe"
  FFN family; None for each otherwise (no MoE layer: G does not apply)."""
  if not any(f.kind == "ffn" and f.name == "moe" for f in registry.families_in_use(cfg)):
    return {"granularity": None, "num_experts": None, "top_k": None}
  return {"granularity": cfg.moe.granularity, "num_experts": cfg.moe.num_experts,
          "top_k": cfg.moe.top_k}


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
  try:
    runs = list(module.runs(**args))
  except TypeError as e:
    raise SweepError(f"{path}: runs(**{args}): {e}") from e
  for r in runs:
    if not isinstance(r, Run):
      raise SweepError(f"{path}: runs() returned {r!r}, not a sparsejax.sweep.Run")
  return runs


def plan(runs: list[Run], only: str | None = None) -> list[Planned]:
  """Validate every run's Config (all before any training), check names are unique, and account
  for every run (or only the one named `only`)."""
  resolved, seen = [], {}
  for r in runs:
    try:
      cfg = load_config(r.base, **dict(r.overrides))
    except Exception as e:
      raise SweepError(f"run {r.name or r.base} {dict(r.overrides)}: {e}") from e
    name = r.name or f"{cfg.name}-{definition_hash(r.base, dict(r.overrides))}"
    if name in seen:
      raise SweepError(f"two runs are named {name!r}: {seen[name]} and {r}")
    seen[name] = r
    resolved.append((r, name, cfg))
  if only is not None:
    resolved = [x for x in resolved if x[1] == only]
    if not resolved:
      raise SweepError(f"--only {only}: no such run in the sweep")
  return [Planned(r, name, cfg, config_hash(cfg), account(cfg)) for r, name, cfg in resolved]


def _literal(text: str):
  """A ``--arg`` / ``--slurm.`` value as a Python literal where it parses as one, else the text."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def arg_flags(args: dict | None) -> list[str]:
  """``--arg key=value`` flags that give runs() these keyword arguments again."""
  out = []
  for key, value in (args or {}).items():
    text = value if isinstance(value, str) and _literal(value) == value else repr(value)
    out += ["--arg", f"{key}={text}"]
  return out


# ----------------------------------------------------------------------------- dry run

def _duration(seconds: float) -> str:
  if seconds < 90:
    return f"{seconds:.1f} s"
  if seconds < 90 * 60:
    return f"{seconds / 60:.1f} min"
  if seconds < 48 * 3600:
    return f"{seconds / 3600:.1f} h"
  return f"{seconds / 86400:.1f} d"


def _rate(tflops, family: str) -> float | None:
  return tflops.get(family) if isinstance(tflops, dict) else tflops


def table(planned: list[Planned], tflops: float | dict[str, float] | None = None) -> str:
  """The dry-run listing. `tflops`: achieved TFLOP/s (analytic convention) for an "est. time"
  column = total FLOPs / throughput, one number for every run or {family: number} (calibrate);
  None: no estimate."""
  header = ("name", "family", "params", "N total", "N non-emb", "FLOPs/token", "steps",
            "tokens", "total FLOPs") + (("est. time",) if tflops else ())
  rows = [header]
  for p in planned:
    row = (p.name, p.family, f"{p.info['params_total']:.3g}",
           f"{p.info['params_active_total']:.3g}",
           f"{p.info['params_active_non_embedding']:.3g}", f"{p.info['flops_per_token']:.3g}",
           str(p.cfg.train.steps), f"{p.tokens:.3g}", f"{p.total_flops:.3g}")
    if tflops:
      rate = _rate(tflops, p.family)
      row += (_duration(p.total_flops / (rate * 1e12)) if rate else "?",)
    rows.append(row)
  widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
  total = sum(p.total_flops for p in planned)
  lines.append(f"{len(planned)} runs, {total:.3g} FLOPs in all ({FLOPS_CONVENTION}); N total / "
               "non-emb: active matmul weights with / without the output head at the true "
               "vocabulary (sparsejax.models.accounting)")
  if not tflops:
    lines.append("est. time: pass --tflops X (achieved TFLOP/s) or --calibrate")
  else:
    known = [p.total_flops / (_rate(tflops, p.family) * 1e12) for p in planned
             if _rate(tflops, p.family)]
    lines.append(f"est. time {_duration(sum(known))} run one after another (train steps only: "
                 f"compile, startup, evals and checkpoints not included)" +
                 ("" if len(known) == len(planned) else
                  f" ({len(planned) - len(known)} runs without a throughput)"))
  return "\n".join(lines)
