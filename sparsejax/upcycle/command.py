"""``upcycle(source, cfg, out, options)``: read a dense run's parameters, map them onto ``cfg``'s
MoE model (sparsejax/upcycle/mapping.py), and write a committed step-0 checkpoint with a fresh
optimizer in ``out`` (sparsejax.train.loop.write_start_checkpoint), plus ``upcycle.json``: the
source, the options and, per layer, the chunk count, W_down scale, router and exactness.

Every check (config fields, vocabulary, layer types, exactness) runs before anything is read
from the source's parameters or written to ``out``. A weight-sparse source gives the weights it
computes with (masks applied: sparsejax.train.init_from.restore_params)."""

from __future__ import annotations

import json
import logging
import pathlib

import jax

from sparsejax import data as sdata
from sparsejax.config import Config
from sparsejax.configure import validate
from sparsejax.data import position
from sparsejax.train import init_from
from sparsejax.train.loop import write_start_checkpoint
from sparsejax.train.metrics import write_atomic
from sparsejax.upcycle import mapping
from sparsejax.upcycle.mapping import Options

_log = logging.getLogger("sparsejax")


def target_vocab(cfg: Config) -> int:
  """The vocabulary a run of ``cfg`` trains with (its dataset's, or config.model.vocab_size)."""
  ds = sdata.TokenDataset(position.resolve_dataset(cfg), "train")
  return max(ds.vocab_size, cfg.model.vocab_size)


def upcycle(source: str, cfg: Config, out: str | pathlib.Path, options: Options = Options(),
            devices: list | None = None) -> dict:
  """Write the upcycled step-0 run ``out`` of ``cfg`` from ``source`` ("WORKDIR[:STEP]");
  returns the summary also written to ``out/upcycle.json``."""
  ckpt, step, meta = init_from.open_source(source)
  ckpt.close()
  src_cfg = validate(meta["config"])
  vocab = target_vocab(cfg)
  mapping.check_compatible(src_cfg, meta["vocab_size"], cfg, vocab)
  plans = mapping.plan(src_cfg, cfg, options)
  for p in plans:
    if p.action == "upcycle":
      _log.info("layer %d: dense FFN -> MoE (%s mode, %d chunk(s), W_down x %g, %s router): %s",
                p.layer, options.mode, p.chunks, p.scale, "zero" if p.zero_router else "fresh",
                p.exact)
  _log.info("reading the parameters of %s step %d", ckpt.workdir, step)
  restored = init_from.restore_params(source, step, devices)

  built = {}

  def init_params(spec, shardings):
    _log.info("building the MoE parameters on the devices")
    built["params_target"] = mapping.param_counts(spec.abstract_params)
    return mapping.device_params(restored.spec.to_canonical(restored.params), spec.cfg,
                                 spec.vocab_size, plans, options, shardings, spec.to_train)

  _log.info("writing the step-0 checkpoint (fresh optimizer) to %s", out)
  workdir = write_start_checkpoint(cfg, out, init_params, devices)
  summary = {
      "source": str(ckpt.workdir), "source_step": step, "out": str(workdir),
      "options": {"mode": options.mode, "noise": options.noise,
                  "router_init": options.router_init, "seed": options.seed,
                  "allow_inexact": options.allow_inexact},
      "layers": [{"layer": p.layer, "action": p.action, "chunks": p.chunks, "scale": p.scale,
                  "router": "zero" if p.zero_router else "fresh", "exact": p.exact}
                 for p in plans],
      "params_source": mapping.param_counts(restored.params),
      "params_target": built["params_target"],
      "continue": f"python -m sparsejax.train --config configs/workdir.py:{workdir} "
                  f"--workdir {workdir}"}
  if jax.process_index() == 0:
    write_atomic(workdir / "upcycle.json", json.dumps(summary, indent=1))
  return summary
