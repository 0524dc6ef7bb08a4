"""Measuring a run's train step on this machine: XLA's FLOP count of the compiled step and the
achieved throughput (for the sweep's records and its dry-run time estimate).

The step is built exactly as sparsejax.train.loop builds it (same shardings, donation and
activation-sharding context, ``train.step.jit_train_step``), from shapes alone for the FLOP count
and on random tokens for the timing. scaling imports train; train never imports scaling.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from sparsejax.config import Config
from sparsejax.configure import replace
from sparsejax.layers import registry
from sparsejax.parallel import mesh as mesh_lib
from sparsejax.parallel import sharding as shd
from sparsejax.train import step as steplib
from sparsejax.train.optim import make_optimizer
from sparsejax.train.state import abstract_state, init_state, model_spec

def _step_program(cfg: Config, devices, vocab: int):
  """The jitted train step as train_and_evaluate builds it, and what calling it needs."""
  devices = list(devices) if devices is not None else jax.devices()
  mesh = mesh_lib.make_mesh(cfg.mesh, devices)
  rules = registry.logical_rules(cfg.mesh)
  spec = model_spec(cfg, vocab)
  optimizer = make_optimizer(cfg)
  target, shardings = abstract_state(spec, mesh, optimizer)
  batch_sh = shd.batch_sharding(mesh, rules)
  with shd.activation_sharding(mesh, rules):
    fn = steplib.jit_train_step(spec.graphdef, cfg, optimizer, shardings, batch_sh)
  return fn, spec, mesh, rules, optimizer, target, batch_sh


def xla_step_flops(cfg: Config, devices=None, vocab: int = 257) -> float:
  """XLA's cost analysis of the compiled train step (see XLA_FLOPS_CONVENTION), per device,
  compiled from shapes alone (no weights). Gradient accumulation is set to 1: XLA counts a scan
  body once, not times its trip count, and one full-batch step does the same arithmetic. The
  backend (LLVM) optimisation level is 0, which halves CPU compile time and leaves the count,
  taken from the optimised HLO, unchanged."""
  cfg = replace(cfg, **{"train.grad_accum_steps": 1})
  fn, _, mesh, rules, _, target, batch_sh = _step_program(cfg, devices, vocab)
  shape = (cfg.data.global_batch_size, cfg.data.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sh)
           for k in ("inputs", "targets")}
  with shd.activation_sharding(mesh, rules):
    return steplib.compiled_flops(fn, target, batch,
                              compiler_options={"xla_backend_optimization_level": 0})


def time_step(cfg: Config, devices=None, vocab: int = 257, steps: int = 3) -> float:
  """Seconds per train step on `devices`: compile, one warm-up step, then the mean of `steps`
  timed steps on random tokens."""
  fn, spec, mesh, rules, optimizer, _, batch_sh = _step_program(cfg, devices, vocab)
  state, _ = init_state(spec, mesh, optimizer)
  tokens = jax.random.randint(jax.random.key(0), (cfg.data.global_batch_size,
                                                  cfg.data.seq_len + 1), 0, vocab)
  batch = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, batch_sh)
  with shd.activation_sharding(mesh, rules):
    state, metrics = fn(state, batch)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
      state, metrics = fn(state, batch)
    jax.block_until_ready(metrics)
  return (time.perf_counter() - t0) / steps


def calibrate(planned: list, devices=None, steps: int = 3, log=print
              ) -> dict[str, float]:
  """Achieved TFLOP/s (analytic FLOPs / measured step time) of each family's first run on this
  machine's devices: {family: TFLOP/s}."""
  first: dict = {}  # family -> its first sparsejax.sweep.Planned
  for p in planned:
    first.setdefault(p.family, p)
  out = {}
  for family, p in first.items():
    step_s = time_step(p.cfg, devices, int(p.info["vocab_size"]), steps)
    out[family] = p.info["flops_per_token"] * p.tokens_per_step / step_s / 1e12
    log(f"calibrated {family} on {p.name}: {1000 * step_s:.1f} ms/step, "
        f"{out[family]:.3g} TFLOP/s achieved ({steps} steps after compile)")
  return out
