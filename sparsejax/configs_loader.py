"""Load ``configs/<family>.py:<preset>`` files outside absl (demo, benchmarks, tests, sweeps)."""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

from sparsejax.config import Config, from_config_dict, replace

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def config_path(path: str) -> pathlib.Path:
  p = pathlib.Path(path)
  if not p.exists() and (REPO_ROOT / p).exists():
    p = REPO_ROOT / p
  if not p.exists():
    raise FileNotFoundError(f"config file {path} not found (relative to the current directory "
                            f"or {REPO_ROOT})")
  return p


def load_config_dict(spec: str) -> ml_collections.ConfigDict:
  """``"configs/dense.py:tiny"`` -> the file's ``get_config("tiny")``."""
  path, _, arg = spec.partition(":")
  p = config_path(path)
  module_spec = importlib.util.spec_from_file_location(f"sparsejax_config_{p.stem}", p)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def load_config(spec: str, **overrides) -> Config:
  """Validated Config; overrides are dotted keys: load_config(..., **{"train.steps": 5})."""
  cfg = from_config_dict(load_config_dict(spec))
  return replace(cfg, **overrides) if overrides else cfg
