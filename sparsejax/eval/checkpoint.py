"""Evaluate a checkpoint: ``evaluate(workdir, step=None, data=None)`` -> loss / ppl / bpb;
``restore(workdir, step)`` for other evaluations (sparsejax/eval/synthfacts.py).

The checkpoint's own config (stored in its ``meta`` item) rebuilds the model. The restore target
is laid out on the *current* devices: the saved mesh when it fits the device count, otherwise
FSDP over all devices, so a checkpoint saved on 8 devices evaluates on 1 (and vice versa).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
from typing import Any

import jax

from sparsejax import data as sdata
from sparsejax.config import Config, MeshConfig
from sparsejax.configure import validate
from sparsejax.errors import CheckpointError
from sparsejax.eval.core import evaluate_params, make_eval_step
from sparsejax.layers import registry
from sparsejax.parallel import mesh as mesh_lib
from sparsejax.parallel import sharding as shd
from sparsejax.sparsity import hooks as sparsity
from sparsejax.train.checkpoint import Checkpointer
from sparsejax.train.state import abstract_state, model_spec

_log = logging.getLogger("sparsejax")


def _fit_mesh(mesh_cfg: MeshConfig, n: int) -> MeshConfig:
  sizes = [s for s in (mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.expert, mesh_cfg.tensor)]
  dcn = max(mesh_cfg.dcn, 1)  # 0 = one per slice / process: re-derived on this machine
  fixed = math.prod(s for s in sizes if s != -1) * dcn
  fits = n % fixed == 0 if -1 in sizes else math.prod(sizes) * dcn == n
  if fits:
    return mesh_cfg
  _log.info("saved mesh %s (dcn %d) does not fit %d devices; evaluating with FSDP over all "
            "devices", sizes, mesh_cfg.dcn, n)
  return MeshConfig(data=1, fsdp=-1, expert=1, tensor=1, dcn=1, rules=mesh_cfg.rules)


@dataclasses.dataclass
class Restored:
  """A committed checkpoint's parameters laid out on the current devices, with what evaluating
  them needs: the validated config (mesh fitted), meta item, model spec, mesh and shardings."""
  step: int
  cfg: Config
  meta: dict
  spec: Any
  params: Any
  mesh: Any
  rules: Any
  param_shardings: Any


def restore(workdir: str | pathlib.Path, step: int | None = None,
            devices: list | None = None) -> Restored:
  """Restore checkpoint `step` (default: the latest committed) of a run for evaluation."""
  devices = list(devices) if devices is not None else jax.devices()
  workdir = pathlib.Path(workdir)
  if not (workdir / "checkpoints").is_dir():
    raise FileNotFoundError(f"--workdir {workdir} has no checkpoints/; train first with "
                            "`python -m sparsejax.train --config ... --workdir DIR`")
  ckpt = Checkpointer(workdir, async_save=False)
  committed = ckpt.committed_steps()
  if not committed:
    raise CheckpointError(f"no committed checkpoint in {ckpt.root}")
  step = committed[-1] if step is None else step
  if step not in committed:
    raise CheckpointError(f"--step {step} is not a committed checkpoint in {ckpt.root}; "
                          f"available: {committed}")
  meta = ckpt.restore_meta(step)
  cfg = validate(meta["config"])
  cfg = dataclasses.replace(cfg, mesh=_fit_mesh(cfg.mesh, len(devices)))
  mesh = mesh_lib.make_mesh(cfg.mesh, devices)
  spec = model_spec(cfg, meta["vocab_size"])
  target, shardings = abstract_state(spec, mesh)
  state, _, _ = ckpt.restore(step, target)
  ckpt.close()
  params = state["params"]
  if cfg.sparsity.method != "none":  # the weights the sparse model computes with
    params = sparsity.jitted_inference_params(cfg, shardings["params"])(
        params, state["opt_state"], step)
  return Restored(step, cfg, meta, spec, params, mesh,
                  registry.logical_rules(cfg.mesh), shardings["params"])


def evaluate(workdir: str | pathlib.Path, *, step: int | None = None, data: str | None = None,
             max_batches: int | None = None, batch_size: int | None = None,
             devices: list | None = None, progress: bool = False) -> dict:
  """One checkpoint's loss / perplexity / bits-per-byte on `data` (default: val split): every
  window, or `max_batches` batches spread over it ("batches" of "split_batches" in the result).
  `progress`: a tqdm bar with tokens so far and time left."""
  devices = list(devices) if devices is not None else jax.devices()
  workdir = pathlib.Path(workdir)
  r = restore(workdir, step, devices)
  cfg, mesh, rules = r.cfg, r.mesh, r.rules
  train_dir = pathlib.Path(r.meta["dataset"])
  if data is None:
    dataset_dir, split = train_dir, "val"
  else:
    if not (train_dir / "metadata.json").exists():
      raise FileNotFoundError(f"the training dataset {train_dir} (its tokenizer) is gone; "
                              "re-run `python -m sparsejax.data.prepare` for it")
    tokenizer = sdata.TokenDataset(train_dir, "train").tokenizer
    dataset_dir, split = sdata.resolve_eval_data(data, tokenizer, workdir / "eval_data")
  ds = sdata.TokenDataset(dataset_dir, split)

  shards = shd.batch_shards(mesh, rules)
  bs = batch_size or cfg.data.global_batch_size
  bs = -(-bs // shards) * shards
  batches = sdata.make_eval_batches(dataset_dir, seq_len=cfg.data.seq_len, batch_size=bs,
                                    split=split, max_batches=max_batches)
  batch_sh = shd.batch_sharding(mesh, rules)
  with shd.activation_sharding(mesh, rules):
    eval_fn = jax.jit(make_eval_step(r.spec.graphdef),
                      in_shardings=(r.param_shardings, batch_sh))
    result = evaluate_params(eval_fn, r.params, batches, batch_sh, ds.bytes_per_token,
                             progress=progress)
  total = sdata.num_eval_batches(dataset_dir, seq_len=cfg.data.seq_len, batch_size=bs,
                                 split=split)
  return {"step": r.step, "data": str(dataset_dir), "split": split, **result,
          "batches": len(batches), "split_batches": total, "devices": len(devices)}
