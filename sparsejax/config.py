"""Config schema: an ml_collections ConfigDict is validated once, at the boundary, into frozen
dataclasses. Everything downstream reads typed fields, never the raw dict.

Errors are one line that names the dotted key and what is allowed, e.g.
``config.model.d_modle: unknown key; allowed keys of config.model: d_model, num_layers, ...``.

New layer families add a registry entry (see ``sparsejax.layers.registry``) and, if they need
options, a section dataclass here plus a field on ``Config``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

import ml_collections

# Family sections live next to their layers' schema (pure dataclasses, no jax imports).
from sparsejax.layers.moe_schema import MoEConfig
from sparsejax.layers.pk_schema import MemoryConfig, PEERConfig


class ConfigError(ValueError):
  """A config value is unknown, mistyped or inconsistent. The message is one line."""


def _choices(*allowed: str, **kw):
  return dataclasses.field(metadata={"choices": allowed}, **kw)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder-only transformer shape. Zeros mean "derive" (documented per field)."""
  vocab_size: int = 0            # 0: from the dataset's metadata
  vocab_multiple_of: int = 128   # embedding rows padded up to a multiple (sharding, MXU tiles)
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 0          # 0: = num_heads (MHA); < num_heads: grouped-query attention
  head_dim: int = 0              # 0: d_model // num_heads
  tie_embeddings: bool = True
  norm_eps: float = 1e-6
  init_std: float = 0.02         # embeddings and input projections; output projections / sqrt(2L)
  param_dtype: str = _choices("float32", "bfloat16", default="float32")
  compute_dtype: str = _choices("bfloat16", "float32", default="bfloat16")
  remat: str = _choices("none", "full", "dots", "dots_no_batch", default="none")
  z_loss: float = 0.0            # coefficient of mean(logsumexp(logits)^2)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Attention per layer: ``type`` for all layers, or ``pattern`` cycled over layers."""
  type: str = "dense"            # registry key, see sparsejax.layers.registry.ATTENTION
  pattern: tuple[str, ...] = ()  # e.g. ("dense", "dense", "block_sparse"); len divides num_layers
  rope_theta: float = 10000.0
  qk_norm: bool = False
  # jax.nn.dot_product_attention backend; auto = cudnn on GPU with 16-bit compute, else xla
  impl: str = _choices("auto", "xla", "cudnn", default="auto")
  # block_sparse layers: mask spec (kernels_pallas.block_sparse_attention.masks.parse_mask),
  # block sizes and kernel backend (auto = Pallas on GPU, the jnp block-sparse path elsewhere)
  mask: str = "causal"
  block_q: int = 128
  block_kv: int = 128
  sparse_impl: str = _choices("auto", "pallas", "interpret", "xla", "splash", default="auto")


@dataclasses.dataclass(frozen=True)
class FFNConfig:
  """Feed-forward per layer: ``type`` for all layers, or ``pattern`` cycled over layers, then
  ``first_k_dense`` and per-layer ``overrides`` (e.g. ("4:memory", "8:memory"))."""
  type: str = "dense"            # registry key, see sparsejax.layers.registry.FFN
  pattern: tuple[str, ...] = ()  # e.g. ("dense", "moe"): MoE every other layer
  first_k_dense: int = 0         # the first k layers use "dense" whatever the pattern says
  overrides: tuple[str, ...] = ()  # "<layer>:<type>" entries, applied last
  d_ff: int = 0                  # 0: 8/3 * d_model rounded up to multiple_of (SwiGLU budget)
  multiple_of: int = 64
  activation: str = _choices("swiglu", "geglu", default="swiglu")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  path: str = ""                 # prepared token dataset dir; "" = embedded stdlib corpus
  tokenizer: str = "byte"        # only used to prepare the embedded corpus when path == ""
  seq_len: int = 256
  global_batch_size: int = 16    # sequences per optimizer step, across all devices and hosts


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 3e-3
  schedule: str = _choices("cosine", "linear", "wsd", "constant", default="cosine")
  warmup_steps: int = 50
  min_lr_ratio: float = 0.1      # final lr / peak lr for cosine, linear and wsd
  wsd_decay_fraction: float = 0.2  # fraction of steps spent in the final decay (wsd)
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1      # decoupled (AdamW); never on norms or biases (ndim < 2)
  decay_embeddings: bool = True
  grad_clip: float = 1.0         # global norm; 0 disables


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 200
  seed: int = 0
  grad_accum_steps: int = 1      # micro-batches per step, accumulated inside the jitted step
  log_every_steps: int = 10
  eval_every_steps: int = 100    # 0: only at the end
  eval_batches: int = 8
  checkpoint_every_steps: int = 100
  keep_checkpoints: int = 3
  async_checkpoint: bool = True
  max_nonfinite_in_a_row: int = 5
  stop_at_step: int = 0          # >0: save and stop at this step (a time slot); schedule unchanged
  peak_tflops_per_device: float = 0.0  # 0: looked up from the device kind (for MFU)
  progress_bar: bool = True


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes (one may be -1: all remaining devices) and logical -> mesh axis rules.
  ``preset`` (dp, fsdp, fsdp_tp, fsdp_ep, multislice; sparsejax/parallel/mesh_presets.py) sets
  the sizes at validation; "" keeps them as given."""
  preset: str = ""
  data: int = -1
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1
  dcn: int = 1                   # slices joined by DCN / the node network (outermost axis, pure
                                 # data parallel); 0: one per TPU slice or per process
  rules: tuple[tuple[str, Any], ...] = ()  # () = sparsejax.parallel.sharding.DEFAULT_RULES


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  moe: MoEConfig = MoEConfig()
  peer: PEERConfig = PEERConfig()
  memory: MemoryConfig = MemoryConfig()
  attention: AttentionConfig = AttentionConfig()
  ffn: FFNConfig = FFNConfig()
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()
  name: str = "dense"

  # ---- derived quantities (all shape logic in one place) ----
  @property
  def head_dim(self) -> int:
    return self.model.head_dim or self.model.d_model // self.model.num_heads

  @property
  def num_kv_heads(self) -> int:
    return self.model.num_kv_heads or self.model.num_heads

  @property
  def d_ff(self) -> int:
    if self.ffn.d_ff:
      return self.ffn.d_ff
    m = self.ffn.multiple_of
    return -(-int(8 * self.model.d_model / 3) // m) * m

  def padded_vocab(self, vocab_size: int | None = None) -> int:
    v = vocab_size or self.model.vocab_size
    m = self.model.vocab_multiple_of
    return -(-v // m) * m

  def layer_types(self) -> list[tuple[str, str]]:
    """(attention type, ffn type) for each layer."""
    n = self.model.num_layers
    attn = self.attention.pattern or (self.attention.type,)
    ffn = self.ffn.pattern or (self.ffn.type,)
    ffn_types = [("dense" if i < self.ffn.first_k_dense else ffn[i % len(ffn)])
                 for i in range(n)]
    for layer, name in _parse_overrides(self.ffn.overrides):
      ffn_types[layer] = name
    return [(attn[i % len(attn)], ffn_types[i]) for i in range(n)]

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1, sort_keys=True)


def _parse_overrides(entries: tuple[str, ...]) -> list[tuple[int, str]]:
  out = []
  for entry in entries:
    layer, sep, name = entry.partition(":")
    if not sep or not layer.strip().isdigit() or not name.strip():
      raise ConfigError(f"config.ffn.overrides: {entry!r} must look like '<layer>:<type>', "
                        "e.g. '4:memory'")
    out.append((int(layer), name.strip()))
  return out


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

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
      if isinstance(value, ml_collections.ConfigDict):
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


def _check(cfg: Config) -> None:
  """Cross-field checks: impossible combinations fail here, not deep inside a jit."""
  from sparsejax.layers import registry  # late import: registry imports layer modules

  m = cfg.model
  positive = {"config.model.d_model": m.d_model, "config.model.num_layers": m.num_layers,
              "config.model.num_heads": m.num_heads, "config.data.seq_len": cfg.data.seq_len,
              "config.data.global_batch_size": cfg.data.global_batch_size,
              "config.train.steps": cfg.train.steps,
              "config.train.grad_accum_steps": cfg.train.grad_accum_steps,
              "config.train.log_every_steps": cfg.train.log_every_steps,
              "config.model.vocab_multiple_of": m.vocab_multiple_of}
  for key, value in positive.items():
    if value <= 0:
      raise ConfigError(f"{key}: must be > 0, got {value}")
  non_negative = {"config.model.head_dim": m.head_dim, "config.model.num_kv_heads":
                  m.num_kv_heads, "config.model.vocab_size": m.vocab_size,
                  "config.ffn.d_ff": cfg.ffn.d_ff, "config.optim.warmup_steps":
                  cfg.optim.warmup_steps, "config.train.stop_at_step": cfg.train.stop_at_step}
  for key, value in non_negative.items():
    if value < 0:
      raise ConfigError(f"{key}: must be >= 0 (0 = derive / off), got {value}")
  if cfg.ffn.multiple_of <= 0:
    raise ConfigError(f"config.ffn.multiple_of: must be > 0, got {cfg.ffn.multiple_of}")
  if not m.head_dim and m.d_model % m.num_heads:
    raise ConfigError(f"config.model.num_heads: {m.num_heads} does not divide d_model "
                      f"{m.d_model}; set config.model.head_dim explicitly")
  if cfg.num_kv_heads <= 0 or m.num_heads % cfg.num_kv_heads:
    raise ConfigError(f"config.model.num_kv_heads: {m.num_kv_heads} must divide num_heads "
                      f"{m.num_heads}")
  if cfg.head_dim % 2:
    raise ConfigError(f"config.model.head_dim: RoPE needs an even head_dim, got {cfg.head_dim}")
  for section, reg in (("attention", registry.ATTENTION), ("ffn", registry.FFN)):
    sec = getattr(cfg, section)
    for key, names in ((f"config.{section}.type", (sec.type,)),
                       (f"config.{section}.pattern", sec.pattern)):
      for name in names:
        if name not in reg:
          raise ConfigError(f"{key}: unknown {section} type {name!r}; registered: "
                            f"{', '.join(sorted(reg))}")
    if section == "ffn":
      for layer, name in _parse_overrides(sec.overrides):
        if layer >= m.num_layers:
          raise ConfigError(f"config.ffn.overrides: layer {layer} does not exist "
                            f"(num_layers {m.num_layers})")
        if name not in reg:
          raise ConfigError(f"config.ffn.overrides: unknown ffn type {name!r}; registered: "
                            f"{', '.join(sorted(reg))}")
    if sec.pattern and m.num_layers % len(sec.pattern):
      raise ConfigError(f"config.{section}.pattern: length {len(sec.pattern)} must divide "
                        f"num_layers {m.num_layers}")
  if not 0 <= cfg.ffn.first_k_dense <= m.num_layers:
    raise ConfigError(f"config.ffn.first_k_dense: must be in [0, num_layers={m.num_layers}]")
  for check in registry.CHECKS:  # family-specific checks (e.g. MoE top_k <= num_experts)
    check(cfg)
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
  sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.expert, cfg.mesh.tensor]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"config.mesh: axis sizes {sizes} (data, fsdp, expert, tensor) must be "
                      "positive, with at most one -1")
  for i, rule in enumerate(cfg.mesh.rules):
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ConfigError(f"config.mesh.rules[{i}]: expected (logical_name, mesh_axes), got {rule!r}")
  if cfg.train.checkpoint_every_steps < 0 or cfg.train.eval_every_steps < 0:
    raise ConfigError("config.train: checkpoint_every_steps / eval_every_steps must be >= 0")


def from_config_dict(raw: ml_collections.ConfigDict | dict) -> Config:
  """Validate a ConfigDict (or plain dict, e.g. a checkpoint's config.json) into a Config."""
  if isinstance(raw, ml_collections.ConfigDict):
    raw = raw.to_dict()
  cfg = _build(Config, dict(raw), "config")
  from sparsejax.parallel import mesh_presets  # late import: it imports jax
  cfg = dataclasses.replace(cfg, mesh=mesh_presets.resolve(cfg.mesh))  # before the MoE checks
  _check(cfg)
  return cfg


def with_defaults(raw: ml_collections.ConfigDict | dict) -> ml_collections.ConfigDict:
  """``raw`` with every section of Config present and every field of each section filled with its
  default where ``raw`` leaves it out, so that any field can be overridden on the command line
  (``--config.train.stop_at_step=N`` needs the key to exist). Keys of ``raw`` win; unknown keys
  stay (and fail validation as usual). Config files return ``with_defaults(c)``."""
  if isinstance(raw, ml_collections.ConfigDict):
    raw = raw.to_dict()
  out = dict(raw)
  for f in dataclasses.fields(Config):
    default = getattr(Config(), f.name)
    if not dataclasses.is_dataclass(default):
      continue
    section = dict(out.get(f.name) or {})
    for g in dataclasses.fields(default):
      if g.name not in section:
        value = getattr(default, g.name)
        section[g.name] = tuple(value) if isinstance(value, list) else value
    out[f.name] = section
  return ml_collections.ConfigDict(out)


def to_config_dict(cfg: Config) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(cfg.to_dict())


def replace(cfg: Config, **dotted: Any) -> Config:
  """Return a re-validated copy with dotted overrides: replace(cfg, **{"model.d_model": 64})."""
  raw = cfg.to_dict()
  for key, value in dotted.items():
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
      if p not in node or not isinstance(node[p], dict):
        raise ConfigError(f"config.{key}: unknown section {p!r}")
      node = node[p]
    node[parts[-1]] = value
  return from_config_dict(raw)
