"""Where a run is in its data: the dataset a config names, its fingerprint, and the data position
saved with every checkpoint (the next global batch index and what it indexes into), from which a
resumed run continues on any process count with the batches an uninterrupted run would see."""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib

from sparsejax.data import synthfacts
from sparsejax.data.dataset import TokenDataset
from sparsejax.data.prepare import ensure_default_dataset
from sparsejax.errors import ConfigError

_log = logging.getLogger("sparsejax")

DATA_POSITION_FORMAT = "sparsejax.data-position/v1"
_DATA_KEYS = {"global_batch_size": "config.data.global_batch_size",
              "seq_len": "config.data.seq_len", "seed": "config.train.seed",
              "dataset": "the training dataset (metadata fingerprint)"}


def resolve_dataset(cfg) -> pathlib.Path:
  """The prepared dataset of ``cfg.data`` (the embedded corpus, prepared on first use, when
  ``data.path`` is empty); a one-line FileNotFoundError when the path holds no dataset. With
  ``data.synthfacts_facts`` > 0: that dataset with the synthetic facts ``[synthfacts_offset,
  synthfacts_offset + synthfacts_facts)`` mixed into its train split (built and cached on first
  use, sparsejax/data/synthfacts.py)."""
  d = cfg.data
  synthfacts.check(d.synthfacts_facts, d.synthfacts_fraction, d.synthfacts_seed,
                   d.synthfacts_offset)
  if d.path:
    path = pathlib.Path(d.path).expanduser()
    if not (path / "metadata.json").exists():
      raise FileNotFoundError(
          f"config.data.path: {path} is not a prepared dataset (no metadata.json); run "
          f"`python -m sparsejax.data.prepare --input <text files> --out {path}` first")
  else:
    path = ensure_default_dataset(d.tokenizer)
  if not d.synthfacts_facts:
    return path
  return synthfacts.mixed_dataset(path, d.synthfacts_facts, d.synthfacts_fraction,
                                  d.synthfacts_seed, offset=d.synthfacts_offset)


def dataset_fingerprint(ds: TokenDataset) -> str:
  """Identity of a prepared train split for resume checks: tokenizer, dtype, shard names and
  token counts, and the synthetic-fact settings of a mixed dataset (not a content hash:
  re-preparing different text of identical size passes)."""
  meta = ds.metadata
  key = {k: meta.get(k) for k in ("format", "tokenizer", "vocab_size", "eos_id", "dtype")}
  key["train"] = meta["splits"]["train"]
  if "synthfacts" in meta:  # absent without facts: those fingerprints are unchanged
    key["synthfacts"] = meta["synthfacts"]["settings"]
  return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def data_position(cfg, fingerprint: str, next_batch: int) -> dict:
  """The checkpoint's data item: the next global batch index and what it indexes into."""
  return {"format": DATA_POSITION_FORMAT, "next_batch": int(next_batch),
          "global_batch_size": cfg.data.global_batch_size, "seq_len": cfg.data.seq_len,
          "seed": cfg.train.seed, "dataset": fingerprint}


def resume_batch(saved: dict, now: dict, step: int, where: str,
                 allow_data_change: bool = False) -> int:
  """First global batch to read after restoring `step`, whose data item is `saved`, under the
  current data position `now` (same keys). Independent of process counts. A changed batch
  size / sequence length / seed / dataset raises a one-line ConfigError unless
  `allow_data_change`: then the new stream is entered past the sequences already consumed
  (rounded up to whole batches; with another order or dataset, some may repeat). A changed
  grad_accum_steps needs nothing: global_batch_size counts sequences per optimizer step, so
  the batch of a step does not depend on how it is split into micro-batches."""
  if saved.get("format") != DATA_POSITION_FORMAT:
    if "next_index" in saved:  # older checkpoints: a one-process grain iterator state
      return int(saved["next_index"])
    raise ConfigError(f"checkpoint step {step} in {where}: unknown data state {sorted(saved)}; "
                      "use a new --workdir")
  changed = [k for k in _DATA_KEYS if saved.get(k) != now[k]]
  if not changed:
    return int(saved["next_batch"])
  consumed = int(saved["next_batch"]) * int(saved["global_batch_size"])
  what = "; ".join(f"{_DATA_KEYS[k]}: {now[k]!r} now, {saved.get(k)!r} at step {step}"
                   for k in changed)
  if not allow_data_change:
    raise ConfigError(f"{what} (checkpoint in {where}): the run cannot continue on the batches "
                      "it would have seen; restore the old value, use a new --workdir, or pass "
                      "--allow_data_change to continue in the new data stream past the "
                      f"{consumed} sequences already consumed")
  first = -(-consumed // now["global_batch_size"])
  _log.warning("data changed since step %d (%s); allow_data_change: continuing at global batch "
               "%d of the new stream", step, what, first)
  return first
