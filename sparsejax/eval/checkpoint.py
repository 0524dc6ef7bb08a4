"""Evaluate a checkpoint: ``evaluate(workdir, step=None, data=None)`` -> loss / ppl / bpb;
``restore(workdir, step)`` for other evaluations (sparsejax/eval/synthfacts.py).

The checkpoint's own config (stored in its ``meta`` item) rebuilds the model. The restore target
is laid out on the *current* devices: the saved mesh when it fits the device count, otherwise
FSDP over all devices, so a checkpoint saved on 8 devices evaluates on 1 (and vice versa).
"""

from __future__ import annotations

import pathlib

import jax

from sparsejax import data as sdata
from sparsejax.eval.core import evaluate_params, make_eval_step
from sparsejax.parallel import sharding as shd
from sparsejax.train.init_from import Restored, restore_params


def restore(workdir: str | pathlib.Path, step: int | None = None,
            devices: list | None = None) -> Restored:
  """Restore checkpoint `step` (default: the latest committed) of a run for evaluation: its
  parameters (a weight-sparse run's masked weights) on `devices`, mesh fitted to them."""
  return restore_params(workdir, step, devices)


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
