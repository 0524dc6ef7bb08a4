"""Tokenizes a corpus into a self-contained, memory-mappable dataset folder.

Layout of a prepared dataset (format ``sparsejax.tokens/v1``)::

  out_dir/metadata.json        tokenizer spec, dtype, per-split shards/counts
  out_dir/{split}-00000.bin    raw little-endian token ids (uint16 or uint32)
  out_dir/tokenizer.json|.model  copy of the tokenizer file (non-byte only)

Each split is one token stream: every document's ids followed by one
``eos_id``. ``num_bytes`` counts the UTF-8 bytes of the documents' text (the
eos tokens carry none), so ``num_bytes / num_tokens`` is bytes per token.

The folder is built in ``out_dir.tmp-<pid>`` and renamed into place, with
``metadata.json`` written last; a folder without a valid ``metadata.json`` is
never a dataset.

CLI: ``python -m sparsejax.data.prepare [--input PATH ...] [--out DIR]
[--tokenizer byte|bpe|bpe:N|file.json|file.model] [--val_fraction 0.02]
[--jsonl_field text] [--overwrite]``.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import shutil
import sys
import time
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from sparsejax.data import corpus
from sparsejax.data import tokenizers as toks

FORMAT = "sparsejax.tokens/v1"
METADATA = "metadata.json"
_BATCH_CHARS = 1 << 22  # text characters encoded per encode_batch call


def read_metadata(path: str | os.PathLike) -> dict | None:
  """The metadata of a prepared dataset folder, or None if it is not one."""
  meta_path = pathlib.Path(path) / METADATA
  try:
    meta = json.loads(meta_path.read_text())
  except (OSError, ValueError):
    return None
  valid = isinstance(meta, dict) and meta.get("format") == FORMAT
  return meta if valid else None


def tokenizer_slug(tokenizer: str = "byte", vocab_size: int = 8192) -> str:
  """Short folder-name form of a tokenizer spec: byte, bpe8192, hf-<stem>."""
  bpe_vocab = toks.parse_bpe_vocab(tokenizer, vocab_size)
  if tokenizer == "byte":
    return "byte"
  if bpe_vocab is not None:
    return f"bpe{bpe_vocab}"
  path = pathlib.Path(tokenizer)
  if path.suffix not in (".json", ".model") or not path.is_file():
    toks.get_tokenizer(tokenizer)  # raises the unknown-spec / missing error
  kind = "hf" if path.suffix == ".json" else "sp"
  return f"{kind}-{path.stem}-{toks.file_sha256(path)[:8]}"


def data_root() -> pathlib.Path:
  """``$SPARSEJAX_DATA_DIR`` (default ``~/.cache/sparsejax/datasets``): prepared datasets."""
  return pathlib.Path(os.environ.get("SPARSEJAX_DATA_DIR")
                      or "~/.cache/sparsejax/datasets").expanduser()


def default_dataset_dir(tokenizer: str = "byte",
                        vocab_size: int = 8192) -> pathlib.Path:
  """:func:`data_root` joined with ``stdlib-py{major}{minor}-{tokenizer slug}``."""
  major, minor = sys.version_info[:2]
  return data_root() / f"stdlib-py{major}{minor}-{tokenizer_slug(tokenizer, vocab_size)}"


def ensure_default_dataset(tokenizer: str = "byte",
                           vocab_size: int = 8192) -> pathlib.Path:
  """Prepares the default stdlib corpus (if absent) and returns its folder."""
  return prepare(None, default_dataset_dir(tokenizer, vocab_size),
                 tokenizer=tokenizer, vocab_size=vocab_size)


# --------------------------------------------------------------------------
# Documents with their split.

SplitDocs = Callable[[], Iterator[tuple[str, str]]]  # yields (split, text)


def _split_documents(inputs: Sequence[str] | None, val_fraction: float,
                     jsonl_field: str,
                     single_split: str | None) -> tuple[SplitDocs, str]:
  """Returns a re-iterable document source and a description of it."""
  if inputs is None:
    root = corpus.stdlib_root()
    files = corpus.default_corpus_files()

    def default_docs():
      for path in files:
        rel = path.relative_to(root).as_posix()
        split = single_split or corpus.split_of(rel, val_fraction)
        yield split, corpus.read_text(path)
    return default_docs, (f"python{sys.version_info[0]}."
                          f"{sys.version_info[1]} stdlib *.py at {root} "
                          f"({len(files)} files)")

  inputs = [str(i) for i in inputs]
  description = "inputs: " + ", ".join(inputs)
  if (single_split is None and len(inputs) == 1 and val_fraction > 0
      and pathlib.Path(inputs[0]).expanduser().is_file()):
    first_two = list(itertools.islice(
        corpus.iter_documents(inputs, jsonl_field), 2))
    if len(first_two) == 1:
      # One document: its last val_fraction of characters become val.
      text = first_two[0][1]
      cut = round(len(text) * (1.0 - val_fraction))
      cut = min(max(cut, 1), len(text) - 1) if len(text) >= 2 else len(text)

      def single_doc():
        yield "train", text[:cut]
        if cut < len(text):
          yield "val", text[cut:]
      return single_doc, description + " (single document, tail -> val)"

  def user_docs():
    for doc_id, text in corpus.iter_documents(inputs, jsonl_field):
      yield single_split or corpus.split_of(doc_id, val_fraction), text
  return user_docs, description


def _text_batches(docs: Iterable[tuple[str, str]]
                  ) -> Iterator[list[tuple[str, str]]]:
  batch, chars = [], 0
  for split, text in docs:
    batch.append((split, text))
    chars += len(text)
    if chars >= _BATCH_CHARS:
      yield batch
      batch, chars = [], 0
  if batch:
    yield batch


# --------------------------------------------------------------------------
# Writing.

class _SplitWriter:
  """Appends token arrays to ``{split}-NNNNN.bin`` shards of shard_tokens."""

  def __init__(self, folder: pathlib.Path, split: str, dtype: np.dtype,
               shard_tokens: int):
    self.folder, self.split, self.dtype = folder, split, dtype
    self.shard_tokens = shard_tokens
    self.shards: list[dict] = []
    self.num_bytes = self.num_docs = 0
    self._file = None

  def add(self, tokens: np.ndarray, num_bytes: int, num_docs: int) -> None:
    self.num_bytes += num_bytes
    self.num_docs += num_docs
    tokens = tokens.astype(self.dtype.newbyteorder("<"), copy=False)
    while tokens.size:
      if (self._file is None
          or self.shards[-1]["num_tokens"] >= self.shard_tokens):
        self._open_next()
      room = self.shard_tokens - self.shards[-1]["num_tokens"]
      piece, tokens = tokens[:room], tokens[room:]
      self._file.write(piece.tobytes())
      self.shards[-1]["num_tokens"] += int(piece.size)

  def _open_next(self) -> None:
    if self._file is not None:
      self._file.close()
    name = f"{self.split}-{len(self.shards):05d}.bin"
    self._file = open(self.folder / name, "wb")
    self.shards.append({"file": name, "num_tokens": 0})

  def close(self) -> dict:
    if self._file is not None:
      self._file.close()
    return {"shards": self.shards,
            "num_tokens": sum(s["num_tokens"] for s in self.shards),
            "num_bytes": self.num_bytes, "num_docs": self.num_docs}


def _with_eos(ids_list: list[np.ndarray], eos_id: int) -> np.ndarray:
  eos = np.array([eos_id], dtype=np.int64)
  return np.concatenate([p for ids in ids_list for p in (ids, eos)])


def _make_tokenizer(tokenizer: str | toks.Tokenizer, vocab_size: int,
                    docs: SplitDocs, work_dir: pathlib.Path) -> toks.Tokenizer:
  if isinstance(tokenizer, toks.Tokenizer):
    return tokenizer
  train_texts = (text for split, text in docs() if split != "val")
  return toks.get_tokenizer(tokenizer, train_texts=train_texts,
                            vocab_size=vocab_size, work_dir=work_dir)


def _request_key(tokenizer: str | toks.Tokenizer, vocab_size: int) -> str:
  """Canonical form of the requested tokenizer, stored in the metadata."""
  if isinstance(tokenizer, toks.Tokenizer):
    return json.dumps(tokenizer.spec(), sort_keys=True)
  bpe_vocab = toks.parse_bpe_vocab(tokenizer, vocab_size)
  if bpe_vocab is not None:
    return f"bpe:{bpe_vocab}"
  if tokenizer == "byte":
    return "byte"
  path = pathlib.Path(tokenizer)
  if not path.is_file():
    toks.get_tokenizer(tokenizer)  # raises the unknown-spec / missing error
  return f"{path.suffix[1:]}:{toks.file_sha256(path)}"


def _build(folder: pathlib.Path, docs: SplitDocs, source: str,
           tokenizer: str | toks.Tokenizer, vocab_size: int,
           shard_tokens: int, splits: Sequence[str], request: str) -> dict:
  tok = _make_tokenizer(tokenizer, vocab_size, docs, folder)
  if tok.path is not None and tok.path.resolve() != (
      folder / tok.file_name).resolve():
    shutil.copyfile(tok.path, folder / tok.file_name)
  dtype = np.dtype(np.uint16 if tok.vocab_size <= 65535 else np.uint32)
  writers = {s: _SplitWriter(folder, s, dtype, shard_tokens) for s in splits}
  bar = tqdm(desc=f"tokenizing ({tok.name})", unit="doc", mininterval=2.0, file=sys.stderr)
  for batch in _text_batches(docs()):
    bar.update(len(batch))
    bar.set_postfix(MB=f"{sum(w.num_bytes for w in writers.values()) / 1e6:.1f}")
    ids_list = tok.encode_batch([text for _, text in batch])
    for split, writer in writers.items():
      rows = [i for i, (s, _) in enumerate(batch) if s == split]
      if not rows:
        continue
      tokens = _with_eos([ids_list[i] for i in rows], tok.eos_id)
      if tokens.min() < 0 or tokens.max() >= tok.vocab_size:
        raise ValueError(f"tokenizer {tok.name} produced ids outside "
                         f"[0, {tok.vocab_size})")
      num_bytes = sum(len(batch[i][1].encode("utf-8", errors="replace"))
                      for i in rows)
      writer.add(tokens, num_bytes, len(rows))
  bar.close()
  if not any(w.num_docs for w in writers.values()):
    raise ValueError(f"no documents found in {source} (folders are scanned "
                     "for text files such as .txt .md .py .jsonl)")
  return {
      "format": FORMAT, "tokenizer": tok.spec(), "tokenizer_request": request,
      "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
      "dtype": dtype.name, "source": source,
      "splits": {s: w.close() for s, w in writers.items()},
  }


def _install(tmp: pathlib.Path, out_dir: pathlib.Path, overwrite: bool) -> None:
  """Moves the finished ``tmp`` folder to ``out_dir`` (replacing it if
  ``overwrite``); a dataset that a concurrent prepare installed first wins."""
  old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
  if overwrite and out_dir.exists():
    os.replace(out_dir, old)
  try:
    os.replace(tmp, out_dir)
  except OSError:
    if read_metadata(out_dir) is None:
      raise
    shutil.rmtree(tmp, ignore_errors=True)  # someone else finished first
  shutil.rmtree(old, ignore_errors=True)


def prepare(inputs: list[str] | None, out_dir: str | os.PathLike, *,
            tokenizer: str | toks.Tokenizer = "byte", vocab_size: int = 8192,
            val_fraction: float = 0.02, jsonl_field: str = "text",
            shard_tokens: int = 2**26, overwrite: bool = False,
            single_split: str | None = None) -> pathlib.Path:
  """Tokenizes ``inputs`` (None: the stdlib corpus) into ``out_dir``.

  Documents go to "train"/"val" by ``corpus.split_of(doc_id, val_fraction)``,
  except that a single input file holding one document is cut by characters
  (its last ``val_fraction`` goes to val). With ``single_split`` every
  document goes to that one split (``val_fraction`` is ignored). BPE is
  trained on the non-val documents only. ``tokenizer`` may also be a
  ``Tokenizer`` instance. If ``out_dir`` already holds a dataset made with
  the same tokenizer request it is returned unchanged unless ``overwrite``.
  Returns ``out_dir``.
  """
  out_dir = pathlib.Path(out_dir).expanduser()
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
  if shard_tokens <= 0:
    raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
  if inputs is not None:
    corpus.check_inputs([str(i) for i in inputs])
  request = _request_key(tokenizer, vocab_size)
  if out_dir.exists() and not overwrite:
    meta = read_metadata(out_dir)
    if meta is not None:
      if meta.get("tokenizer_request") != request:
        raise ValueError(
            f"{out_dir} holds a dataset tokenized with "
            f"{meta.get('tokenizer_request')}, not {request}; pass "
            "--overwrite or choose another --out")
      return out_dir
    if not out_dir.is_dir() or any(out_dir.iterdir()):
      raise ValueError(f"{out_dir} exists but is not a prepared dataset (no "
                       "valid metadata.json); pass --overwrite to replace it")
  docs, source = _split_documents(inputs, val_fraction, jsonl_field,
                                  single_split)
  splits = [single_split] if single_split else ["train", "val"]
  tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  try:
    meta = _build(tmp, docs, source, tokenizer, vocab_size, shard_tokens,
                  splits, request)
    meta["val_fraction"] = 0.0 if single_split else val_fraction
    (tmp / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    _install(tmp, out_dir, overwrite)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


# --------------------------------------------------------------------------
# Command line.

def summary(path: str | os.PathLike) -> str:
  """One line: tokens per split, bytes/token, tokenizer and location."""
  meta = read_metadata(path)
  splits = meta["splits"]
  tokens = sum(s["num_tokens"] for s in splits.values())
  nbytes = sum(s["num_bytes"] for s in splits.values())
  counts = ", ".join(f"{name} {s['num_tokens']:,} tokens"
                     for name, s in splits.items())
  return (f"{counts}; {nbytes / max(tokens, 1):.3f} bytes/token; tokenizer "
          f"{meta['tokenizer']['kind']} (vocab {meta['vocab_size']}); "
          f"at {path}")


def run(inputs: Sequence[str] | None, out: str | None,
        tokenizer: str = "byte", vocab_size: int = 8192,
        val_fraction: float = 0.02, jsonl_field: str = "text",
        overwrite: bool = False) -> pathlib.Path:
  """The CLI body: prepares (or reuses) a dataset and prints one summary."""
  start = time.perf_counter()
  inputs = list(inputs) if inputs else None
  out_path = (pathlib.Path(out) if out else
              default_dataset_dir(tokenizer, vocab_size))
  path = prepare(inputs, out_path, tokenizer=tokenizer, vocab_size=vocab_size,
                 val_fraction=val_fraction, jsonl_field=jsonl_field,
                 overwrite=overwrite)
  print(f"prepared in {time.perf_counter() - start:.1f}s: {summary(path)}",
        flush=True)
  return path


def define_flags() -> None:
  """Defines this CLI's absl flags (call once, only from a CLI entry point)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_multi_string("input", None, "Text file, folder or .jsonl "
                            "(repeatable); omit for the stdlib corpus.")
  flags.DEFINE_string("out", None, "Output dataset folder (default: "
                      "$SPARSEJAX_DATA_DIR/stdlib-pyXY-<tokenizer>).")
  flags.DEFINE_string("tokenizer", "byte",
                      "byte | bpe | bpe:N | path/tokenizer.json | path.model")
  flags.DEFINE_integer("vocab_size", 8192,
                       "BPE vocab size for --tokenizer=bpe.")
  flags.DEFINE_float("val_fraction", 0.02, "Fraction of documents for val.")
  flags.DEFINE_string("jsonl_field", "text", "Text field of .jsonl records.")
  flags.DEFINE_bool("overwrite", False, "Rebuild even if --out is prepared.")


def main(argv: Sequence[str]) -> None:
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  try:
    run(f.input, f.out, tokenizer=f.tokenizer, vocab_size=f.vocab_size,
        val_fraction=f.val_fraction, jsonl_field=f.jsonl_field,
        overwrite=f.overwrite)
  except (OSError, ValueError) as e:
    sys.exit(f"prepare failed: {e}")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(main)
