"""Reading prepared token datasets: windows, train iterators, eval batches.

A prepared dataset (see ``sparsejax.data.prepare``) holds one token stream
per split. Training examples are fixed, non-overlapping windows of
``seq_len + 1`` tokens taken with stride ``seq_len``: window ``i`` covers
tokens ``[i * seq_len, i * seq_len + seq_len + 1)``, so ``inputs`` are its
first ``seq_len`` tokens and ``targets`` the next-token shift of them.
Windows ignore document boundaries (documents are separated by ``eos_id``).
All arrays handed out are ``int32``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any

import numpy as np

from sparsejax.data import tokenizers as toks
from sparsejax.data.prepare import FORMAT, METADATA, prepare, read_metadata

_PREPARE_HINT = "run `python -m sparsejax.data.prepare --out {path}`"


class TokenDataset:
  """One split of a prepared dataset folder, read through ``np.memmap``.

  Attributes: ``metadata`` (the parsed metadata.json), ``vocab_size``,
  ``eos_id``, ``num_tokens``, ``num_bytes`` (UTF-8 bytes of the split's
  text), ``bytes_per_token`` (nan for an empty split), ``tokenizer``.
  """

  def __init__(self, path: str | os.PathLike, split: str = "train"):
    self.path, self.split = pathlib.Path(path).expanduser(), split
    hint = _PREPARE_HINT.format(path=self.path)
    if not self.path.is_dir():
      raise FileNotFoundError(f"dataset folder not found: {self.path}; {hint}")
    meta_file = self.path / METADATA
    if not meta_file.is_file():
      raise FileNotFoundError(
          f"{self.path} has no {METADATA} (not a prepared dataset, or an "
          f"interrupted prepare); {hint} --overwrite")
    try:
      meta = json.loads(meta_file.read_text())
    except ValueError as e:
      raise ValueError(f"{meta_file} is not valid JSON ({e}); {hint} "
                       "--overwrite") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
      raise ValueError(f"{meta_file} is not format {FORMAT!r}; {hint} "
                       "--overwrite")
    if split not in meta["splits"]:
      raise ValueError(f"split {split!r} not in {self.path} (it has: "
                       f"{', '.join(meta['splits'])})")
    self.metadata = meta
    self.vocab_size, self.eos_id = int(meta["vocab_size"]), int(meta["eos_id"])
    self.dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    info = meta["splits"][split]
    self.num_tokens, self.num_bytes = int(info["num_tokens"]), int(
        info["num_bytes"])
    self.bytes_per_token = (self.num_bytes / self.num_tokens
                            if self.num_tokens else float("nan"))
    self._shards = [(self.path / s["file"], int(s["num_tokens"]))
                    for s in info["shards"] if s["num_tokens"] > 0]
    for file, count in self._shards:
      expected = count * self.dtype.itemsize
      if not file.is_file():
        raise FileNotFoundError(f"shard missing: {file}; {hint} --overwrite")
      if file.stat().st_size != expected:
        raise ValueError(f"shard {file} is truncated or corrupt: "
                         f"{file.stat().st_size} bytes, expected {expected}; "
                         f"{hint} --overwrite")
    counts = [count for _, count in self._shards]
    self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    self._maps: list[np.memmap] | None = None
    self._tokenizer: toks.Tokenizer | None = None

  @property
  def tokenizer(self) -> toks.Tokenizer:
    if self._tokenizer is None:
      self._tokenizer = toks.tokenizer_from_spec(self.metadata["tokenizer"],
                                                 self.path)
    return self._tokenizer

  def _memmaps(self) -> list[np.memmap]:
    if self._maps is None:
      self._maps = [np.memmap(file, dtype=self.dtype, mode="r", shape=(count,))
                    for file, count in self._shards]
    return self._maps

  def window(self, start: int, length: int) -> np.ndarray:
    """Tokens ``[start, start + length)`` of the split as ``int32[length]``."""
    if start < 0 or length < 0 or start + length > self.num_tokens:
      raise IndexError(f"window [{start}, {start + length}) outside split "
                       f"{self.split!r} of {self.num_tokens} tokens")
    out = np.empty((length,), dtype=np.int32)
    maps, pos, filled = self._memmaps(), start, 0
    shard = int(np.searchsorted(self._starts, start, side="right")) - 1
    while filled < length:
      offset = pos - self._starts[shard]
      take = min(length - filled, len(maps[shard]) - offset)
      out[filled:filled + take] = maps[shard][offset:offset + take]
      filled, pos, shard = filled + take, pos + take, shard + 1
    return out

  def __getstate__(self) -> dict:
    # Memmaps and tokenizers are reopened lazily after unpickling.
    return {**self.__dict__, "_maps": None, "_tokenizer": None}


class WindowSource:
  """Random-access source of ``int32[seq_len + 1]`` windows (grain-compatible).

  ``len(self) == (num_tokens - 1) // seq_len``; a last partial window is
  dropped.
  """

  def __init__(self, dataset: TokenDataset | str | os.PathLike, seq_len: int,
               split: str = "train"):
    if not isinstance(dataset, TokenDataset):
      dataset = TokenDataset(dataset, split)
    if seq_len < 1:
      raise ValueError(f"seq_len must be positive, got {seq_len}")
    self.dataset, self.seq_len = dataset, seq_len
    if dataset.num_tokens < seq_len + 1:
      raise ValueError(
          f"split {dataset.split!r} of {dataset.path} has "
          f"{dataset.num_tokens} tokens; seq_len={seq_len} needs at least "
          f"{seq_len + 1}")
    self._len = (dataset.num_tokens - 1) // seq_len

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> np.ndarray:
    index = int(index)
    if not 0 <= index < self._len:
      raise IndexError(f"window {index} out of range [0, {self._len})")
    return self.dataset.window(index * self.seq_len, self.seq_len + 1)

  def __repr__(self) -> str:
    return (f"WindowSource({self.dataset.path}, split={self.dataset.split!r},"
            f" seq_len={self.seq_len}, windows={self._len})")


def to_inputs_targets(windows: np.ndarray) -> dict[str, np.ndarray]:
  """Windows ``int32[B, seq_len + 1]`` -> ``inputs``/``targets``
  ``int32[B, seq_len]`` (contiguous copies)."""
  return {"inputs": np.ascontiguousarray(windows[:, :-1]),
          "targets": np.ascontiguousarray(windows[:, 1:])}


def make_train_iterator(path: str | os.PathLike, *, seq_len: int,
                        global_batch_size: int, seed: int,
                        split: str = "train", process_index: int | None = None,
                        process_count: int | None = None, shuffle: bool = True,
                        read_options: Any = None, start_batch: int = 0):
  """An endless, checkpointable grain iterator of this process's batches.

  The window stream is ``windows`` shuffled with ``seed`` (reshuffled each
  epoch) and repeated forever. Global batch ``b`` is stream elements
  ``[b * G, (b + 1) * G)`` (``G = global_batch_size``); process ``p`` of
  ``P`` gets rows ``[p * L, (p + 1) * L)`` of it (``L = G // P``) and reads
  only those windows. Yields ``{"inputs", "targets"}: int32[L, seq_len]``.
  ``get_state()`` is a JSON-serialisable dict; ``set_state`` resumes
  bit-identically. ``read_options`` (a ``grain.ReadOptions``) defaults to 2
  reader threads with a prefetch buffer of 4 batches.

  ``start_batch=b`` starts at global batch ``b`` (random access, nothing is
  read to get there): a run resumed after ``b`` steps on any process count
  sees exactly the batches an uninterrupted run would.
  """
  import grain  # pylint: disable=import-outside-toplevel
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    if process_index is None:
      process_index = jax.process_index()
    if process_count is None:
      process_count = jax.process_count()
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not a positive "
                     f"multiple of process_count={process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in "
                     f"[0, {process_count})")
  local_batch = global_batch_size // process_count
  ds = grain.MapDataset.source(WindowSource(path, seq_len, split))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat()
  # Chunks of L consecutive windows; chunk b * P + p is process p's part of
  # global batch b, so slicing [p::P] selects exactly this process's rows.
  ds = ds.batch(local_batch)[process_index::process_count]
  ds = ds.map(to_inputs_targets)
  if read_options is None:
    read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
  it = iter(ds.to_iter_dataset(read_options))
  if start_batch:
    if start_batch < 0:
      raise ValueError(f"start_batch={start_batch} must be >= 0")
    # The state of an iterator over a MapDataset is the index of the next element; element b
    # of this process's dataset is its part of global batch b.
    state = it.get_state()
    if set(state) != {"next_index"}:
      raise RuntimeError(f"unexpected grain iterator state {state}; make_train_iterator "
                         "needs updating for this grain version")
    it.set_state({"next_index": int(start_batch)})
  return it


def num_eval_batches(path: str | os.PathLike, *, seq_len: int, batch_size: int,
                     split: str = "val") -> int:
  """Batches of ``batch_size`` windows that cover ``split`` once (the last one padded)."""
  return -(-len(WindowSource(path, seq_len, split)) // batch_size)


def make_eval_batches(path: str | os.PathLike, *, seq_len: int,
                      batch_size: int, split: str = "val",
                      max_batches: int | None = None) -> list[dict]:
  """Unshuffled windows of ``split``, in batches: all of them, or ``max_batches`` batches
  spread evenly over the split (so that a subset estimates the whole split, not its start).

  Every window appears at most once. Each batch has ``inputs``/``targets``
  ``int32[batch_size, seq_len]`` and ``weights`` ``float32[batch_size, seq_len]``: ones for
  real windows, zeros for the padding rows that fill a last partial batch.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  source = WindowSource(path, seq_len, split)
  num_windows = len(source)
  total = -(-num_windows // batch_size)
  chosen = range(total)
  if max_batches is not None and max_batches < total:
    chosen = sorted({int(round(x)) for x in np.linspace(0, total - 1, max(max_batches, 1))})
  batches = []
  for b in chosen:
    start = b * batch_size
    rows = min(batch_size, num_windows - start)
    windows = np.zeros((batch_size, seq_len + 1), dtype=np.int32)
    windows[:rows] = source.dataset.window(start * seq_len,
                                           rows * seq_len + 1)[
                                               _window_index(rows, seq_len)]
    weights = np.zeros((batch_size, seq_len), dtype=np.float32)
    weights[:rows] = 1.0
    batches.append({**to_inputs_targets(windows), "weights": weights})
  return batches


def _window_index(rows: int, seq_len: int) -> np.ndarray:
  """Gather index turning a run of ``rows * seq_len + 1`` tokens into
  ``[rows, seq_len + 1]`` overlapping-by-one windows."""
  return np.arange(rows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]


def _fingerprint(path: pathlib.Path, spec: dict) -> str:
  """SHA-1 over the absolute path, every file's (name, size, mtime) and the
  tokenizer spec."""
  entries = []
  files = ([path] if path.is_file() else
           sorted(p for p in path.rglob("*") if p.is_file()))
  for file in files:
    st = file.stat()
    entries.append([str(file), st.st_size, st.st_mtime_ns])
  blob = json.dumps([str(path.resolve()), entries, spec], sort_keys=True)
  return hashlib.sha1(blob.encode("utf-8")).hexdigest()


def resolve_eval_data(path: str | os.PathLike, tokenizer: toks.Tokenizer | dict,
                      cache_dir: str | os.PathLike,
                      base_dir: str | os.PathLike | None = None
                      ) -> tuple[pathlib.Path, str]:
  """Maps ``--data PATH`` of an evaluation to ``(dataset_dir, split)``.

  ``tokenizer`` is the model's tokenizer, or its spec dict plus the
  ``base_dir`` holding its file. A prepared dataset is used as is (its "val"
  split if non-empty, else "train", else its first non-empty split) after
  checking that its tokenizer spec equals the model's. A text file, folder
  or .jsonl is tokenized whole into the single split "eval" of a dataset
  cached under ``cache_dir/<name>-<sha1 of path, mtimes, tokenizer>``.
  """
  path = pathlib.Path(path).expanduser()
  is_tok = isinstance(tokenizer, toks.Tokenizer)
  spec = tokenizer.spec() if is_tok else tokenizer
  meta = read_metadata(path) if path.is_dir() else None
  if meta is None and (path / METADATA).is_file():
    raise ValueError(f"{path / METADATA} is not a valid {FORMAT} metadata "
                     "file; re-run `python -m sparsejax.data.prepare "
                     f"--out {path} --overwrite`")
  if meta is not None:
    if meta["tokenizer"] != spec:
      raise ValueError(f"tokenizer mismatch: dataset {path} uses "
                       f"{meta['tokenizer']}, the model uses {spec}")
    nonempty = [s for s, info in meta["splits"].items() if info["num_tokens"]]
    for split in ("val", "train", *nonempty):
      if split in nonempty:
        return path, split
    raise ValueError(f"dataset {path} has no tokens in any split")
  if not path.exists():
    raise FileNotFoundError(f"eval data not found: {path} (pass a prepared "
                            "dataset folder, a text file, a folder or .jsonl)")
  if not is_tok:
    tokenizer = toks.tokenizer_from_spec(spec, base_dir)
  out = pathlib.Path(cache_dir).expanduser() / (
      f"{path.name}-{_fingerprint(path, spec)[:16]}")
  prepare([str(path)], out, tokenizer=tokenizer, single_split="eval")
  return out, "eval"
