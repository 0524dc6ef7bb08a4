"""Background slot-access statistics for sparse memory finetuning (sparsejax/finetune/
sparse_memory.py): run a trained memory model over N batches and count, per value table, in how
many batches each row was selected (its document frequency).

    python -m sparsejax.finetune.background --workdir PRETRAIN_RUN [--step N] [--data PATH]
        [--batches 100] [--batch_size B] [--out FILE]

writes FILE (default PRETRAIN_RUN/memory_background.npz, where ``config.finetune.background=""``
with ``config.train.init_from=PRETRAIN_RUN`` finds it). The batches are, by default, the run's own
training stream from its first batch (same dataset, sequence length, seed and global batch size);
``--data`` takes a text file, folder, .jsonl or prepared dataset instead (a prepared dataset's
val split when it has one). The forward pass runs in training mode (batch statistics for query
centring), as the finetune step does. A batch accesses a row when any memory layer reading the
table selects it for any token: the layers sharing one value pool add up.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
from absl import app, flags
from tqdm import tqdm

from sparsejax import data as sdata
from sparsejax.cli_common import flags_parser, one_line_errors, setup_logging
from sparsejax.finetune.sparse_memory import BACKGROUND_FILE, save_background
from sparsejax.finetune.targets import counts_key, memory_tables, path_name
from sparsejax.models.forward import forward_sums
from sparsejax.parallel import sharding as shd
from sparsejax.parallel.distributed import initialize_from_env
from sparsejax.train.init_from import restore_params

DEFAULT_BATCHES = 100


def _batches(r, data: str | None, batch_size: int, workdir: pathlib.Path):
  train_dir = pathlib.Path(r.meta["dataset"])
  if data is None:
    dataset_dir, split = train_dir, "train"
  else:
    tokenizer = sdata.TokenDataset(train_dir, "train").tokenizer
    dataset_dir, split = sdata.resolve_eval_data(data, tokenizer, workdir / "eval_data")
  return dataset_dir, split, sdata.make_train_iterator(
      dataset_dir, seq_len=r.cfg.data.seq_len, global_batch_size=batch_size,
      seed=r.cfg.train.seed, split=split)


def compute(workdir: str | pathlib.Path, *, step: int | None = None, data: str | None = None,
            batches: int = DEFAULT_BATCHES, batch_size: int | None = None,
            out: str | pathlib.Path | None = None, devices: list | None = None,
            progress: bool = True) -> pathlib.Path:
  """Write the background statistics of run ``workdir`` (see the module docstring); returns
  the file's path."""
  if batches < 1:
    raise ValueError(f"--batches must be >= 1, got {batches}")
  workdir = pathlib.Path(workdir)
  r = restore_params(workdir, step, devices)
  tables = memory_tables(r.cfg, r.spec.abstract_params)
  bs = batch_size or r.cfg.data.global_batch_size
  shd.check_global_batch(bs, 1, r.mesh, r.rules)
  dataset_dir, split, it = _batches(r, data, bs, workdir)
  batch_sh = shd.batch_sharding(r.mesh, r.rules)
  rng = jax.random.key(r.cfg.train.seed + 1)  # a key selects training-mode retrieval

  def accessed(params, batch):
    _, _, sown, _ = forward_sums(r.spec.graphdef, params, batch, 0.0, rng)
    return {path_name(t): sum(sown[counts_key(i)] for i in layers) > 0
            for t, layers in tables.items()}

  df = {path_name(t): np.zeros(_rows(r.spec.abstract_params, t), np.int64) for t in tables}
  with shd.activation_sharding(r.mesh, r.rules):
    fn = jax.jit(accessed, in_shardings=(r.param_shardings, batch_sh))
    bar = tqdm(range(batches), desc="background batches", unit="batch", disable=not progress)
    for _ in bar:
      hit = jax.device_get(fn(r.params, shd.global_batch(next(it), batch_sh, bs)))
      for name, rows in hit.items():
        df[name] += rows
  out = pathlib.Path(out) if out else workdir / BACKGROUND_FILE
  meta = {"workdir": str(workdir), "step": r.step, "data": str(dataset_dir), "split": split,
          "batches": batches, "batch_size": bs, "seq_len": r.cfg.data.seq_len,
          "tables": {path_name(t): list(layers) for t, layers in tables.items()}}
  if jax.process_index() == 0:
    save_background(out, batches, df, meta)
  return out


def _rows(abstract_params, path) -> int:
  for k in path:
    abstract_params = abstract_params[k]
  return abstract_params.shape[0]


def define_flags() -> None:
  """Defines this CLI's absl flags (call once, only from a CLI entry point)."""
  flags.DEFINE_string("workdir", None, "Trained run (e.g. the pretraining run a sparse_memory "
                      "finetune starts from)")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest committed)")
  flags.DEFINE_string("data", None, "Text file, folder, .jsonl or prepared dataset (default: "
                      "the run's own training stream)")
  flags.DEFINE_integer("batches", DEFAULT_BATCHES, "Background batches |B|")
  flags.DEFINE_integer("batch_size", None, "Sequences per batch (default: the run's global "
                       "batch size)")
  flags.DEFINE_string("out", None, f"Output .npz (default: WORKDIR/{BACKGROUND_FILE})")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  setup_logging()
  f = flags.FLAGS
  with one_line_errors("sparsejax.finetune.background"):
    initialize_from_env()  # before anything touches a device
    out = compute(f.workdir, step=f.step, data=f.data, batches=f.batches,
                  batch_size=f.batch_size, out=f.out)
    if jax.process_index() == 0:
      print(json.dumps({"out": str(out), "batches": f.batches}))


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(main, flags_parser=flags_parser("sparsejax.finetune.background"))
