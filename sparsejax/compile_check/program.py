"""Compile the real train step for a target and read the compiler's verdict.

The step is built as the trainer builds it (sparsejax.train.loop / scaling.measure): mesh from
config.mesh (presets included) over the target's devices with ``parallel.mesh.make_mesh``, the
families' logical rules, ``model_spec`` / ``abstract_state`` / the state shardings, the batch
sharding, ``jit_train_step`` (donation, gradient accumulation, remat as configured) traced inside
``activation_sharding``; it is lowered with ShapeDtypeStructs (nothing is allocated) and compiled.

Memory per device (``CompiledMemoryStats``): ``required_bytes`` = arguments + outputs - aliased
(donated) + all temporaries, an upper bound (temporaries not live at once are counted together);
``peak_bytes`` = XLA's ``peak_memory_in_bytes`` where the backend reports it, else
``required_bytes``. On TPU the peak is what the compiler checks: dense 70b on v5p-256 at
2 x 8192 tokens per chip compiles with a peak of 91.5 GiB under the 95.7 GiB available while
``required_bytes`` is 114 GiB.
Fits: on TPU the compiler's own check (a step that does not fit fails with RESOURCE_EXHAUSTED,
whose numbers are reported); on GPU, where XLA does not check, ``peak_bytes`` <= HBM x the client
memory fraction (``XLA_PYTHON_CLIENT_MEM_FRACTION``, 0.75 by default).

FLOPs: the analytic training FLOPs per step per device (sparsejax.models.accounting: 6 x active
params + causal attention per token; remat recomputation not counted) and the roofline time they
imply at the chip's peak bf16 rate; XLA's own count (``xla_flops_per_device``) counts a loop body
once (gradient accumulation, scanned layers), so it is a lower bound there.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import re
import time

import jax
import jax.numpy as jnp

from sparsejax.compile_check import devices as devlib, hlo
from sparsejax.config import Config
from sparsejax.configure import replace
from sparsejax.layers import registry
from sparsejax.models import accounting
from sparsejax.parallel import mesh as mesh_lib, sharding as shd
from sparsejax.parallel.targets import Target
from sparsejax.train import step as steplib
from sparsejax.train.optim import make_optimizer
from sparsejax.train.state import abstract_state, model_spec

DEFAULT_MEMORY_FRACTION = 0.75  # XLA_PYTHON_CLIENT_MEM_FRACTION's default
_OOM = re.compile(r"RESOURCE_EXHAUSTED")
_SIZE = re.compile(r"\(([\d.]+)([KMGT])\)")
_UNIT = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


@dataclasses.dataclass
class Built:
  """What compiling needs: the jitted step and its abstract arguments on the target mesh."""
  fn: object
  args: tuple
  mesh: object
  rules: dict
  counts: accounting.ModelCounts
  vocab: int


def build(cfg: Config, devices: list, vocab: int) -> Built:
  """The trainer's step for ``cfg`` on ``devices`` (call inside devices.compiling_for)."""
  mesh = mesh_lib.make_mesh(cfg.mesh, devices)
  rules = registry.logical_rules(cfg.mesh)
  shd.check_global_batch(cfg.data.global_batch_size, cfg.train.grad_accum_steps, mesh, rules)
  processes = len({d.process_index for d in devices})
  if cfg.data.global_batch_size % processes:
    raise ValueError(f"config.data.global_batch_size: {cfg.data.global_batch_size} must divide "
                     f"by the target's {processes} processes (hosts)")
  spec = model_spec(cfg, vocab)
  optimizer = make_optimizer(cfg)
  state, shardings = abstract_state(spec, mesh, optimizer)
  batch_sh = shd.batch_sharding(mesh, rules)
  shape = (cfg.data.global_batch_size, cfg.data.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sh)
           for k in ("inputs", "targets")}
  with shd.activation_sharding(mesh, rules):
    fn = steplib.jit_train_step(spec.graphdef, cfg, optimizer, shardings, batch_sh)
  counts = accounting.count(spec.abstract_model, cfg, vocab_size=vocab)
  return Built(fn, (state, batch), mesh, rules, counts, vocab)


def default_vocab(cfg: Config) -> int:
  """The vocabulary a run of ``cfg`` would get without a dataset (sparsejax.info's rule:
  config.model.vocab_size, else 257 for bytes, else the tokenizer's "bpe:<V>", else 8192)."""
  tok = cfg.data.tokenizer
  return cfg.model.vocab_size or (257 if tok == "byte" else
                                  int(tok.split(":")[-1]) if ":" in tok else 8192)


def _memory(compiled) -> dict:
  stats = compiled.memory_analysis()
  get = lambda name: int(getattr(stats, name, 0) or 0)
  out = {"argument_bytes": get("argument_size_in_bytes"),
         "output_bytes": get("output_size_in_bytes"),
         "alias_bytes": get("alias_size_in_bytes"),
         "temp_bytes": get("temp_size_in_bytes"),
         "generated_code_bytes": get("generated_code_size_in_bytes")}
  out["required_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                           + out["temp_bytes"])
  out["xla_peak_bytes"] = get("peak_memory_in_bytes")
  return out


def verdict(platform: str, memory: dict, hbm: int, memory_fraction: float) -> tuple[bool, str]:
  """(fits, how it was decided) for a step that compiled; completes ``memory`` with
  peak_bytes / hbm_bytes / limit_bytes (peak_bytes: XLA's peak, else the required sum). TPU: it
  compiled, so the compiler found it fits. GPU: peak_bytes against HBM x memory_fraction."""
  if platform == "tpu":
    memory.update(peak_bytes=memory["xla_peak_bytes"] or memory["required_bytes"],
                  hbm_bytes=hbm, limit_bytes=hbm)
    fits, how = True, "compiler (the TPU compiler rejects a step that exceeds HBM)"
  else:
    limit = int(hbm * memory_fraction)
    memory.update(peak_bytes=memory["xla_peak_bytes"] or memory["required_bytes"],
                  hbm_bytes=hbm, limit_bytes=limit, memory_fraction=memory_fraction)
    fits = memory["peak_bytes"] <= limit
    how = (f"peak_bytes <= HBM x {memory_fraction} (XLA does not check GPU memory; "
           "XLA_PYTHON_CLIENT_MEM_FRACTION is 0.75 unless set)")
  memory["peak_fraction_of_hbm"] = round(memory["peak_bytes"] / hbm, 4)
  return fits, how


def _oom_numbers(message: str) -> dict:
  """The sizes a RESOURCE_EXHAUSTED message names ("... (386.24G) exceeds available HBM
  (95.73G)") as bytes: {"required_bytes", "available_bytes"} when both are there."""
  sizes = [float(v) * _UNIT[u] for v, u in _SIZE.findall(message)]
  return ({"required_bytes": int(sizes[0]), "available_bytes": int(sizes[1])}
          if len(sizes) >= 2 else {})


def _per_device_batch(cfg: Config, built: Built) -> float:
  shards = shd.batch_shards(built.mesh, built.rules)
  return cfg.data.global_batch_size / cfg.train.grad_accum_steps / shards


def check(cfg: Config, target: Target, devices: list, *, vocab: int = 0,
          memory_fraction: float = DEFAULT_MEMORY_FRACTION) -> dict:
  """Compile ``cfg``'s train step for ``target`` (on its compile-only ``devices``) and return the
  compile-check record (sparsejax.compile_check.__main__ prints it)."""
  vocab = vocab or default_vocab(cfg)
  chip = target.chip
  hbm = chip.hbm_bytes
  with devlib.compiling_for(target, devices):
    t0 = time.perf_counter()
    built = build(cfg, devices, vocab)
    with shd.activation_sharding(built.mesh, built.rules), \
        devlib.mesh_context(target, built.mesh):
      lowered = built.fn.lower(*built.args)
      t1 = time.perf_counter()
      try:
        compiled, error = lowered.compile(), None
      except jax.errors.JaxRuntimeError as e:
        if target.platform != "tpu" or not _OOM.search(str(e)):
          raise
        compiled, error = None, str(e).strip().splitlines()[0]
    t2 = time.perf_counter()
  tokens = cfg.data.global_batch_size * cfg.data.seq_len
  flops = built.counts.flops_per_token * tokens / len(devices)
  record = {
      "config": cfg.name, "target": target.summary(), "device_kind": devices[0].device_kind,
      "mesh": dict(built.mesh.shape), "global_batch": cfg.data.global_batch_size,
      "grad_accum_steps": cfg.train.grad_accum_steps, "seq_len": cfg.data.seq_len,
      "per_device_batch": _per_device_batch(cfg, built), "vocab_size": vocab,
      "remat": cfg.model.remat, "compute_dtype": cfg.model.compute_dtype,
      "params_total": built.counts.params_total,
      "flops_per_step_per_device": flops,
      "flops_convention": "analytic training FLOPs (6 x active params + causal attention per "
                          "token, sparsejax.models.accounting); remat recomputation not counted",
      "roofline_s": flops / (chip.peak_bf16_tflops * 1e12),
      "lower_s": round(t1 - t0, 3), "compile_s": round(t2 - t1, 3),
      "versions": versions(target.platform)}
  if compiled is None:
    numbers = _oom_numbers(error)
    memory = {"hbm_bytes": hbm, "limit_bytes": numbers.get("available_bytes", hbm), **numbers}
    if "required_bytes" in numbers:
      memory["peak_bytes"] = numbers["required_bytes"]
    record.update(fits=False, fits_check="compiler (RESOURCE_EXHAUSTED)", compiler_error=error,
                  memory=memory)
    return record
  memory = _memory(compiled)
  fits, how = verdict(target.platform, memory, hbm, memory_fraction)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  record.update(fits=fits, fits_check=how, memory=memory, **hlo.analyse(compiled.as_text()),
                xla_flops_per_device=float((cost or {}).get("flops", 0.0)))
  if target.platform == "gpu":
    record["notes"] = ["deviceless GPU compile: no autotuning; without a GPU XLA has no CUB "
                       "sort scratch size and uses a slower fallback sort (do not read "
                       "timings into this compile)"]
  return record


def versions(platform: str) -> dict:
  """jax / jaxlib and the compiler plugin's version."""
  out = {"jax": jax.__version__}
  for dist in ("jaxlib", "libtpu" if platform == "tpu" else "jax-cuda13-plugin"):
    try:
      out[dist] = md.version(dist)
    except md.PackageNotFoundError:
      pass
  return out


def with_batch(cfg: Config, global_batch: int) -> Config:
  return replace(cfg, **{"data.global_batch_size": int(global_batch)})


def batch_unit(cfg: Config, target: Target, devices: list) -> int:
  """Global batch per unit of per-device batch: grad_accum_steps x the mesh's batch shards."""
  with devlib.compiling_for(target, devices):
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
  return cfg.train.grad_accum_steps * shd.batch_shards(mesh, registry.logical_rules(cfg.mesh))


def find_max_batch(cfg: Config, target: Target, devices: list, *, vocab: int = 0,
                   memory_fraction: float = DEFAULT_MEMORY_FRACTION, log=None,
                   limit: int = 1 << 16) -> dict:
  """The largest per-device batch b (global batch = b x batch_unit) whose step fits: doubling
  from 1 until one does not fit, then bisection. Returns the record of that batch with
  ``max_per_device_batch`` and ``tried`` ({b: fits}); ``fits`` false if b = 1 does not fit."""
  unit = batch_unit(cfg, target, devices)
  tried: dict[int, bool] = {}
  records: dict[int, dict] = {}

  def fits(b: int) -> bool:
    rec = check(with_batch(cfg, b * unit), target, devices, vocab=vocab,
                memory_fraction=memory_fraction)
    tried[b], records[b] = rec["fits"], rec
    if log:
      log(b, rec)
    return rec["fits"]

  lo, hi = 0, 1
  while hi <= limit and fits(hi):
    lo, hi = hi, hi * 2
  while lo and hi <= limit and hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  best = records[lo] if lo else records[1]
  return {**best, "max_per_device_batch": lo, "batch_unit": unit,
          "tried": {str(k): v for k, v in sorted(tried.items())}}
