"""Config files in, a validated ``Config`` out: the one place that knows both the leaf schema
(sparsejax.config) and the registered layer families (sparsejax.layers.registry).

    validate(raw)          ConfigDict / dict (e.g. a checkpoint's config.json) -> Config:
                           core + family sections built and coerced, the mesh preset resolved,
                           core checks, layer-type names, every used family's check (MoE
                           top_k <= num_experts, product keys a perfect square, the attention
                           mask spec parsed, ...). Every failure is one ConfigError line.
    with_defaults(raw)     every section and field present (config files return this), so any
                           ``--config.<section>.<key>`` override lands on a key
    replace(cfg, **dotted) a re-validated copy: replace(cfg, **{"model.d_model": 64})
    check_resume(saved, cfg)  may a run saved with config dict ``saved`` resume under ``cfg``?
    load_config_dict(spec) ``"configs/dense.py:tiny"`` -> the file's get_config("tiny")
    load_config(spec, **dotted)  the two above, validated
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import pathlib

import ml_collections

from sparsejax import config as schema
from sparsejax.config import Config, ConfigError
from sparsejax.data import synthfacts
from sparsejax.layers import ffn, registry
from sparsejax.parallel import mesh as mesh_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
_log = logging.getLogger("sparsejax")


def validate(raw: ml_collections.ConfigDict | dict) -> Config:
  """Validate a ConfigDict (or plain dict) into a Config; see the module docstring."""
  cfg = schema.build_config(raw, registry.sections())
  cfg = dataclasses.replace(cfg, mesh=mesh_lib.resolve(cfg.mesh))  # before the family checks
  schema.core_checks(cfg)
  registry.check(cfg)
  _check_sparsity_targets(cfg)
  _check_finetune(cfg)
  _check_scan_layers(cfg)
  ffn.check_activation(cfg)  # config.ffn.activation(_topk): read by dense and MoE layers
  if cfg.data.synthfacts_facts or cfg.data.synthfacts_offset:
    synthfacts.check(cfg.data.synthfacts_facts, cfg.data.synthfacts_fraction,
                     cfg.data.synthfacts_seed, cfg.data.synthfacts_offset)
  return cfg


def with_defaults(raw: ml_collections.ConfigDict | dict) -> ml_collections.ConfigDict:
  """``raw`` with every core and family section and field present (schema defaults where
  ``raw`` leaves them out). Keys of ``raw`` win; unknown keys stay and fail validation."""
  return ml_collections.ConfigDict(schema.defaults_dict(raw, registry.sections()))


def replace(cfg: Config, **dotted) -> Config:
  """A re-validated copy with dotted overrides."""
  return validate(schema.with_overrides(cfg.to_dict(), dotted))


def _check_sparsity_targets(cfg: Config) -> None:
  known = {"attention", "ffn", *registry.ATTENTION, *registry.FFN}
  bad = [t for t in cfg.sparsity.targets if t not in known]
  if bad:
    raise ConfigError(f"config.sparsity.targets: unknown entry {bad[0]!r}; use a layer kind "
                      f"(attention, ffn) or a family name ({', '.join(sorted(known))})")


def _check_scan_layers(cfg: Config) -> None:
  """Weight sparsity, LoRA and sparse_memory address weights per layer (``blocks/<i>``); the
  scanned layers' parameters are stored stacked (``scan/<start>/<j>``)."""
  if not cfg.model.scan_layers:
    return
  what = ("config.sparsity.method=" + repr(cfg.sparsity.method) if cfg.sparsity.method != "none"
          else "config.finetune.mode=" + repr(cfg.finetune.mode)
          if cfg.finetune.mode in ("lora", "sparse_memory") else None)
  if what:
    raise ConfigError(f"config.model.scan_layers: {what} needs the parameters stored per layer; "
                      "set model.scan_layers=False for this run (checkpoints convert both ways)")


def _check_finetune(cfg: Config) -> None:
  """config.finetune (sparsejax/finetune/): combinations that cannot work, one line each. Model
  shapes are checked when the optimizer meets the params (LoRA targets, value tables)."""
  f, mode = cfg.finetune, cfg.finetune.mode
  if mode == "full":
    return
  if cfg.sparsity.method != "none":
    raise ConfigError(f"config.finetune.mode: {mode!r} cannot be combined with weight sparsity "
                      f"(config.sparsity.method={cfg.sparsity.method!r}); use mode full or "
                      "sparsity.method none")
  if mode == "lora":
    known = {"attention", "ffn", *registry.ATTENTION, *registry.FFN,
             *(p.leaf for fam in registry.all_families() for p in fam.prunable)}
    bad = [t for t in f.lora_targets if t not in known]
    if bad or not f.lora_targets:
      what = f"{bad[0]!r} is unknown" if bad else "empty"
      raise ConfigError(f"config.finetune.lora_targets: {what}; name layer kinds (attention, "
                        "ffn), families or weights (e.g. wq_DxHxK, w_up_DxF)")
    used = [(fam, {fam.kind, fam.name} | {p.leaf for p in fam.prunable})
            for fam in registry.families_in_use(cfg)]
    if not any(fam.prunable and names & set(f.lora_targets) for fam, names in used):
      raise ConfigError(f"config.finetune.lora_targets: {list(f.lora_targets)} selects no "
                        "matrix of this model's layers; name a kind or family it uses")
    if f.lora_rank < 1 or f.lora_alpha <= 0:
      raise ConfigError(f"config.finetune.lora_rank / lora_alpha: need rank >= 1 and alpha > 0, "
                        f"got {f.lora_rank} / {f.lora_alpha}")
    return
  if not any(ffn_type == "memory" for _, ffn_type in cfg.layer_types()):
    raise ConfigError(f"config.finetune.mode: {mode!r} trains memory value tables but the model "
                      "has no memory layer; add one (e.g. --config.ffn.overrides=1:memory) or "
                      "use mode full / lora")
  if mode == "sparse_memory":
    if f.top_t < 1:
      raise ConfigError(f"config.finetune.top_t: must be >= 1, got {f.top_t}")
    if not f.background and not cfg.train.init_from:
      raise ConfigError("config.finetune.background: sparse_memory needs background access "
                        "statistics: set it to a file from `python -m sparsejax.finetune."
                        "background --workdir PRETRAIN_RUN`, or set config.train.init_from to "
                        "that run (its memory_background.npz is used)")


def check_resume(saved: dict, cfg: Config, where: str) -> None:
  """Refuse to resume a run (saved with config dict ``saved``, in ``where``) whose parameters
  would not fit: every parameter-shaping field of every section in use (the families' ``shapes``)
  is compared, and the first change is one ConfigError line naming its dotted key. Other changes
  (remat, learning rate, kernels, ...) are allowed and logged."""
  # finetune: its mode / LoRA fields shape the optimizer state (adapters, frozen groups)
  shaping, other = schema.resume_changes(saved, cfg, (*registry.resume_sections(cfg),
                                                      "finetune"))
  if shaping:
    raise ConfigError(f"{shaping[0]}: it shapes the parameters of the run in {where}; use a "
                      "new --workdir or the checkpoint's value")
  for line in other:
    _log.warning("resuming %s with a changed setting: %s", where, line)


def config_path(path: str) -> pathlib.Path:
  p = pathlib.Path(path)
  if not p.exists() and (REPO_ROOT / p).exists():
    p = REPO_ROOT / p
  if not p.exists():
    raise FileNotFoundError(f"config file {path} not found (relative to the current directory "
                            f"or {REPO_ROOT})")
  return p


def load_config_dict(spec: str) -> ml_collections.ConfigDict:
  """``"configs/dense.py:tiny"`` -> the file's ``get_config("tiny")`` (``get_config()`` without
  an argument). Config files use it to start from another file's preset."""
  path, _, arg = spec.partition(":")
  p = config_path(path)
  module_spec = importlib.util.spec_from_file_location(f"sparsejax_config_{p.stem}", p)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def load_config(spec: str, **overrides) -> Config:
  """Validated Config; overrides are dotted keys: load_config(..., **{"train.steps": 5})."""
  raw = load_config_dict(spec).to_dict()
  return validate(schema.with_overrides(raw, overrides) if overrides else raw)
