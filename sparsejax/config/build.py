"""Validation machinery of the leaf config: ConfigDict / dict -> frozen dataclasses, the core
cross-field checks, defaults, and the resume comparison. Pure Python (no jax, no layers): the
registered family sections are passed in by ``sparsejax.configure``, which sits above layers/.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from typing import Any, Mapping

from sparsejax.config.schema import CORE_SECTIONS, Config, parse_overrides
from sparsejax.errors import ConfigError


def _type_name(tp) -> str:
  return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str):
  """Coerce a config value to the annotated type or raise a one-line ConfigError."""
  origin = typing.get_origin(tp)
  if tp is Any:
    return _freeze(value)
  if tp is bool:
    if isinstance(value, bool):
      return value
    raise ConfigError(f"{key}: expected bool, got {value!r}")
  if tp is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    if isinstance(value, float) and value.is_integer():
      return int(value)
    raise ConfigError(f"{key}: expected int, got {value!r}")
  if tp is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    raise ConfigError(f"{key}: expected float, got {value!r}")
  if tp is str:
    if isinstance(value, str):
      return value
    raise ConfigError(f"{key}: expected str, got {value!r}")
  if origin is tuple:
    if isinstance(value, str):
      value = tuple(v.strip() for v in value.split(",") if v.strip())
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{key}: expected a tuple, got {value!r}")
    args = typing.get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if len(args) != len(value):
      raise ConfigError(f"{key}: expected {len(args)} items, got {value!r}")
    return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
  if origin in (types.UnionType, typing.Union):
    for a in typing.get_args(tp):
      if a is type(None) and value is None:
        return None
      try:
        return _coerce(value, a, key)
      except ConfigError:
        continue
    raise ConfigError(f"{key}: {value!r} matches none of {typing.get_args(tp)}")
  raise ConfigError(f"{key}: unsupported schema type {_type_name(tp)}")


def _freeze(value):
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


def _build(cls, raw: dict, prefix: str):
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in raw.items():
    dotted = f"{prefix}.{key}"
    if key not in fields:
      allowed = ", ".join(sorted(fields))
      raise ConfigError(f"{dotted}: unknown key; allowed keys of {prefix}: {allowed}")
    tp = hints[key]
    if dataclasses.is_dataclass(tp):
      if hasattr(value, "to_dict"):  # an ml_collections.ConfigDict
        value = value.to_dict()
      if not isinstance(value, dict):
        raise ConfigError(f"{dotted}: expected a section (dict), got {value!r}")
      kwargs[key] = _build(tp, value, dotted)
      continue
    coerced = _coerce(value, tp, dotted)
    allowed = fields[key].metadata.get("choices")
    if allowed and coerced not in allowed:
      raise ConfigError(f"{dotted}: {coerced!r} is not allowed; choose one of {', '.join(allowed)}")
    kwargs[key] = coerced
  return cls(**kwargs)



def build_config(raw: Mapping, family_sections: Mapping[str, type]) -> Config:
  """Typed, coerced Config from a plain dict; unknown keys and sections are one-line errors.
  ``family_sections``: section name -> dataclass of every registered family."""
  raw = dict(raw.to_dict() if hasattr(raw, "to_dict") else raw)
  known = {**CORE_SECTIONS, **family_sections}
  core, families = {}, {}
  for key, value in raw.items():
    if key == "name":
      core["name"] = _coerce(value, str, "config.name")
      continue
    if key not in known:
      allowed = ", ".join(sorted([*known, "name"]))
      raise ConfigError(f"config.{key}: unknown key; allowed keys of config: {allowed}")
    if hasattr(value, "to_dict"):
      value = value.to_dict()
    if not isinstance(value, dict):
      raise ConfigError(f"config.{key}: expected a section (dict), got {value!r}")
    section = _build(known[key], value, f"config.{key}")
    (core if key in CORE_SECTIONS else families)[key] = section
  for key, cls in family_sections.items():
    families.setdefault(key, cls())
  return Config(**core, families=tuple(sorted(families.items())))


def defaults_dict(raw: Mapping, family_sections: Mapping[str, type]) -> dict:
  """``raw`` with every core and family section present and every field filled with its schema
  default where ``raw`` leaves it out (so that any ``--config.<section>.<key>`` override has a
  key to land on). Keys of ``raw`` win; unknown keys stay and fail validation as usual."""
  out = dict(raw.to_dict() if hasattr(raw, "to_dict") else raw)
  for name, cls in {**CORE_SECTIONS, **family_sections}.items():
    section = dict(out.get(name) or {})
    for f in dataclasses.fields(cls):
      if f.name not in section:
        value = getattr(cls(), f.name)
        section[f.name] = tuple(value) if isinstance(value, list) else value
    out[name] = section
  out.setdefault("name", Config().name)
  return out


def with_overrides(raw: dict, dotted: Mapping[str, Any]) -> dict:
  """A copy of ``raw`` with dotted keys set: {"model.d_model": 64}."""
  raw = copy.deepcopy(raw)
  for key, value in dotted.items():
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
      if p not in node or not isinstance(node[p], dict):
        raise ConfigError(f"config.{key}: unknown section {p!r}")
      node = node[p]
    node[parts[-1]] = value
  return raw


def _canonical(value):
  if isinstance(value, (list, tuple)):
    return tuple(_canonical(v) for v in value)
  return value


def resume_changes(saved: Mapping, cfg: Config, sections: tuple[str, ...]
                   ) -> tuple[list[str], list[str]]:
  """Compare a checkpoint's config dict ``saved`` with ``cfg`` over ``sections``.
  Returns (parameter-shaping changes, other changes), each a list of one-line descriptions
  ``config.<section>.<key>: <old> in the checkpoint, <new> now``."""
  shaping, other = [], []
  now = cfg.to_dict()
  for name in sections:
    section = getattr(cfg, name)
    for f in dataclasses.fields(section):
      new = now[name][f.name]
      old_section = saved.get(name) or {}
      # a field (or section) added since the checkpoint was written: its default applied there
      old = _canonical(old_section[f.name] if f.name in old_section else f.default)
      if old == _canonical(new):
        continue
      line = f"config.{name}.{f.name}: {old!r} in the checkpoint, {_canonical(new)!r} now"
      (shaping if f.metadata.get("shapes") else other).append(line)
  return shaping, other


def core_checks(cfg: Config) -> None:
  """Cross-field checks of the core sections: impossible combinations fail here, not deep
  inside a jit. (Layer-type names, family sections and the mesh preset are checked by
  ``sparsejax.configure.validate``.)"""
  m = cfg.model
  positive = {"config.model.d_model": m.d_model, "config.model.num_layers": m.num_layers,
              "config.model.num_heads": m.num_heads, "config.data.seq_len": cfg.data.seq_len,
              "config.data.global_batch_size": cfg.data.global_batch_size,
              "config.train.steps": cfg.train.steps,
              "config.train.grad_accum_steps": cfg.train.grad_accum_steps,
              "config.train.log_every_steps": cfg.train.log_every_steps,
              "config.model.vocab_multiple_of": m.vocab_multiple_of,
              "config.ffn.multiple_of": cfg.ffn.multiple_of}
  for key, value in positive.items():
    if value <= 0:
      raise ConfigError(f"{key}: must be > 0, got {value}")
  non_negative = {"config.model.head_dim": m.head_dim, "config.model.num_kv_heads":
                  m.num_kv_heads, "config.model.vocab_size": m.vocab_size,
                  "config.ffn.d_ff": cfg.ffn.d_ff, "config.optim.warmup_steps":
                  cfg.optim.warmup_steps, "config.train.stop_at_step": cfg.train.stop_at_step,
                  "config.train.checkpoint_every_steps": cfg.train.checkpoint_every_steps,
                  "config.train.eval_every_steps": cfg.train.eval_every_steps}
  for key, value in non_negative.items():
    if value < 0:
      raise ConfigError(f"{key}: must be >= 0 (0 = derive / off), got {value}")
  if not m.head_dim and m.d_model % m.num_heads:
    raise ConfigError(f"config.model.num_heads: {m.num_heads} does not divide d_model "
                      f"{m.d_model}; set config.model.head_dim explicitly")
  if cfg.num_kv_heads <= 0 or m.num_heads % cfg.num_kv_heads:
    raise ConfigError(f"config.model.num_kv_heads: {m.num_kv_heads} must divide num_heads "
                      f"{m.num_heads}")
  if cfg.head_dim % 2:
    raise ConfigError(f"config.model.head_dim: RoPE needs an even head_dim, got {cfg.head_dim}")
  for section in ("attention", "ffn"):
    sec = getattr(cfg, section)
    if sec.pattern and m.num_layers % len(sec.pattern):
      raise ConfigError(f"config.{section}.pattern: length {len(sec.pattern)} must divide "
                        f"num_layers {m.num_layers}")
  for layer, _ in parse_overrides(cfg.ffn.overrides):
    if layer >= m.num_layers:
      raise ConfigError(f"config.ffn.overrides: layer {layer} does not exist "
                        f"(num_layers {m.num_layers})")
  if m.loss_chunk < 0 or (m.loss_chunk and cfg.data.seq_len % m.loss_chunk):
    raise ConfigError(f"config.model.loss_chunk: {m.loss_chunk} must be 0 (off) or a positive "
                      f"divisor of data.seq_len {cfg.data.seq_len}")
  if not 0 <= cfg.ffn.first_k_dense <= m.num_layers:
    raise ConfigError(f"config.ffn.first_k_dense: must be in [0, num_layers={m.num_layers}]")
  if cfg.data.global_batch_size % cfg.train.grad_accum_steps:
    raise ConfigError(f"config.train.grad_accum_steps: {cfg.train.grad_accum_steps} must divide "
                      f"global_batch_size {cfg.data.global_batch_size}")
  if cfg.optim.warmup_steps >= cfg.train.steps and cfg.optim.schedule != "constant":
    raise ConfigError(f"config.optim.warmup_steps: {cfg.optim.warmup_steps} must be < "
                      f"train.steps {cfg.train.steps}")
  if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
    raise ConfigError(f"config.optim.min_lr_ratio: must be in [0, 1], got {cfg.optim.min_lr_ratio}")
  if not 0.0 < cfg.optim.wsd_decay_fraction <= 1.0:
    raise ConfigError("config.optim.wsd_decay_fraction: must be in (0, 1]")
  _sparsity_checks(cfg.sparsity)
  sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.expert, cfg.mesh.tensor]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"config.mesh: axis sizes {sizes} (data, fsdp, expert, tensor) must be "
                      "positive, with at most one -1")
  for i, rule in enumerate(cfg.mesh.rules):
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ConfigError(f"config.mesh.rules[{i}]: expected (logical_name, mesh_axes), got {rule!r}")


def _sparsity_checks(s) -> None:
  """config.sparsity ranges (shapes and the mesh are checked by sparsejax/sparsity/targets.py)."""
  unit = {"sparsity": (s.sparsity, 0.0, 1.0, "[0, 1)"), "drop_fraction": (s.drop_fraction, 0.0,
          1.0, "[0, 1]"), "momentum_beta": (s.momentum_beta, 0.0, 1.0, "[0, 1)"),
          "start_fraction": (s.start_fraction, 0.0, 1.0, "[0, 1]"),
          "end_fraction": (s.end_fraction, 0.0, 1.0, "[0, 1]"),
          "dense_fraction": (s.dense_fraction, 0.0, 1.0, "[0, 1)")}
  for key, (value, lo, hi, text) in unit.items():
    if not lo <= value <= hi or (text.endswith(")") and value >= hi):
      raise ConfigError(f"config.sparsity.{key}: must be in {text}, got {value}")
  if s.method == "none":
    return
  if s.method == "nm" and not 0 < s.n < s.m:
    raise ConfigError(f"config.sparsity.n: need 0 < n < m, got n={s.n}, m={s.m}")
  if s.update_every < 1:
    raise ConfigError(f"config.sparsity.update_every: must be >= 1, got {s.update_every}")
  if s.method == "gmp" and s.end_fraction < s.start_fraction:
    raise ConfigError(f"config.sparsity.end_fraction: {s.end_fraction} is before start_fraction "
                      f"{s.start_fraction}")
  if s.nm_lambda < 0:
    raise ConfigError(f"config.sparsity.nm_lambda: must be >= 0, got {s.nm_lambda}")
