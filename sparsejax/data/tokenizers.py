"""Tokenizers: raw UTF-8 bytes, HF `tokenizers` BPE, and SentencePiece.

Conventions shared by every tokenizer:

* ``encode(text)`` returns a 1-D ``np.int64`` array of token ids and never
  appends the end-of-sequence id; the data pipeline appends one ``eos_id``
  after each document itself.
* ``decode(ids)`` ignores ``eos_id`` (and other special tokens), so
  ``decode(encode(t)) == t`` for the byte tokenizer and byte-level BPE.
* ``vocab_size`` counts every id the tokenizer can emit, ``eos_id`` included;
  ids lie in ``[0, vocab_size)``.
* ``spec()`` is a JSON-serialisable dict stored in a dataset's metadata.
  Tokenizers backed by a file name that file *relative to the dataset
  folder* (``tokenizer.json`` / ``tokenizer.model``) plus its SHA-256, so two
  specs compare equal exactly when they tokenise identically.
  ``tokenizer_from_spec(spec, base_dir)`` rebuilds the tokenizer.
"""

from __future__ import annotations

import abc
import hashlib
import os
import pathlib
from typing import Iterable, Sequence

import numpy as np

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")
DEFAULT_EOS = "<|endoftext|>"
HF_FILE = "tokenizer.json"
SP_FILE = "tokenizer.model"


def file_sha256(path: str | os.PathLike) -> str:
  """Hex SHA-256 of a file's bytes."""
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


class Tokenizer(abc.ABC):
  """Base class. Subclasses set ``name``, ``vocab_size`` and ``eos_id``."""

  name: str
  vocab_size: int
  eos_id: int
  # The file that defines this tokenizer (None for the byte tokenizer); the
  # prepare step copies it into the dataset folder under ``file_name``.
  path: pathlib.Path | None = None
  file_name: str | None = None

  @abc.abstractmethod
  def encode(self, text: str) -> np.ndarray:
    """Token ids of `text` (no eos appended)."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids` (special tokens skipped)."""

  @abc.abstractmethod
  def spec(self) -> dict:
    """JSON-serialisable description that `tokenizer_from_spec` rebuilds this from."""

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Encodes each text; subclasses may override with a faster batch call."""
    return [self.encode(t) for t in texts]

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(name={self.name!r}, "
            f"vocab_size={self.vocab_size}, eos_id={self.eos_id})")


class ByteTokenizer(Tokenizer):
  """Ids 0..255 are the UTF-8 bytes of the text; ``eos_id = 256``.

  Text that cannot be UTF-8 encoded (lone surrogates) is encoded with
  ``errors="replace"``; decoding maps invalid byte sequences to U+FFFD.
  """

  name = "byte"
  vocab_size = 257
  eos_id = 256

  def encode(self, text: str) -> np.ndarray:
    data = text.encode("utf-8", errors="replace")
    return np.frombuffer(data, dtype=np.uint8).astype(np.int64)

  def decode(self, ids) -> str:
    ids_n = np.asarray(ids, dtype=np.int64).reshape(-1)
    ids_n = ids_n[(ids_n >= 0) & (ids_n < 256)]
    return ids_n.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def spec(self) -> dict:
    return {"kind": "byte", "vocab_size": self.vocab_size,
            "eos_id": self.eos_id}


class HFTokenizer(Tokenizer):
  """A Hugging Face ``tokenizers`` tokenizer loaded from ``tokenizer.json``.

  The eos token is the first of ``EOS_CANDIDATES`` present in the vocabulary
  (or ``eos_token`` when given); if none is present ``<|endoftext|>`` is added
  as a special token (the file itself is left unchanged, the spec records the
  token so that rebuilding adds it again). Encoding never adds the model's
  own special tokens (no ``[CLS]``/``<s>`` post-processing).
  """

  file_name = HF_FILE

  def __init__(self, path: str | os.PathLike, eos_token: str | None = None):
    # pylint: disable-next=import-outside-toplevel
    from tokenizers import Tokenizer as _HF
    self.path = pathlib.Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(f"tokenizer file not found: {self.path}")
    self._tok = _HF.from_file(str(self.path))
    if eos_token is None:
      eos_token = next((t for t in EOS_CANDIDATES
                        if self._tok.token_to_id(t) is not None), DEFAULT_EOS)
    if self._tok.token_to_id(eos_token) is None:
      self._tok.add_special_tokens([eos_token])
    self.eos_token = eos_token
    self.eos_id = int(self._tok.token_to_id(eos_token))
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    self.sha256 = file_sha256(self.path)
    self.name = f"hf:{self.path.name}"

  def encode(self, text: str) -> np.ndarray:
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return np.asarray(ids, dtype=np.int64)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    encodings = self._tok.encode_batch_fast(list(texts),
                                            add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

  def decode(self, ids) -> str:
    ids_list = [int(i) for i in np.asarray(ids).reshape(-1)]
    return self._tok.decode(ids_list, skip_special_tokens=True)

  def spec(self) -> dict:
    return {"kind": "hf", "file": self.file_name, "sha256": self.sha256,
            "eos_token": self.eos_token, "vocab_size": self.vocab_size,
            "eos_id": self.eos_id}


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece ``.model`` file.

  ``eos_id`` is the model's eos id; a model trained without eos
  (``eos_id() < 0``) gets ``eos_id = piece count`` and
  ``vocab_size = piece count + 1``.
  """

  file_name = SP_FILE

  def __init__(self, path: str | os.PathLike):
    import sentencepiece as spm  # pylint: disable=import-outside-toplevel
    self.path = pathlib.Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(f"tokenizer file not found: {self.path}")
    self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
    self._num_pieces = int(self._sp.get_piece_size())
    if self._sp.eos_id() >= 0:
      self.eos_id, self.vocab_size = int(self._sp.eos_id()), self._num_pieces
    else:
      self.eos_id, self.vocab_size = self._num_pieces, self._num_pieces + 1
    self.sha256 = file_sha256(self.path)
    self.name = f"sentencepiece:{self.path.name}"

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text, out_type=int), dtype=np.int64)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    ids_lists = self._sp.encode(list(texts), out_type=int)
    return [np.asarray(ids, dtype=np.int64) for ids in ids_lists]

  def decode(self, ids) -> str:
    ids_list = [int(i) for i in np.asarray(ids).reshape(-1)
                if 0 <= int(i) < self._num_pieces and int(i) != self.eos_id]
    return self._sp.decode(ids_list)

  def spec(self) -> dict:
    return {"kind": "sentencepiece", "file": self.file_name,
            "sha256": self.sha256, "vocab_size": self.vocab_size,
            "eos_id": self.eos_id}


def train_bpe(texts_iter: Iterable[str], vocab_size: int,
              out_path: str | os.PathLike) -> HFTokenizer:
  """Trains a byte-level BPE (HF ``tokenizers``) and saves it to ``out_path``.

  ``vocab_size`` includes the 256 byte symbols and the ``<|endoftext|>``
  special token (id 0). Training is deterministic for the same input texts.
  """
  # pylint: disable=import-outside-toplevel
  from tokenizers import Tokenizer as _HF
  from tokenizers import decoders, models, pre_tokenizers, trainers
  if vocab_size < 257:
    raise ValueError(f"BPE vocab_size must be at least 257 (256 bytes + "
                     f"<|endoftext|>), got {vocab_size}")
  tok = _HF(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, show_progress=False,
      special_tokens=[DEFAULT_EOS],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts_iter, trainer=trainer)
  out_path = pathlib.Path(out_path)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  tok.save(str(out_path))
  return HFTokenizer(out_path, eos_token=DEFAULT_EOS)


_SPEC_FORMS = ("'byte', 'bpe', 'bpe:<vocab_size>', a path to a tokenizer.json "
               "file (*.json), or a SentencePiece model (*.model)")


def parse_bpe_vocab(spec: str, default: int) -> int | None:
  """Returns the vocab size of a ``bpe``/``bpe:N`` spec, else None."""
  if spec == "bpe":
    return default
  if spec.startswith("bpe:") and spec[4:].isdigit():
    return int(spec[4:])
  return None


def get_tokenizer(spec: str, *, train_texts: Iterable[str] | None = None,
                  vocab_size: int = 8192,
                  work_dir: str | os.PathLike | None = None) -> Tokenizer:
  """Builds a tokenizer from a spec string (see ``_SPEC_FORMS``).

  ``bpe`` / ``bpe:N`` trains a BPE tokenizer on ``train_texts`` (an iterable
  of str) and saves ``tokenizer.json`` into ``work_dir``.
  """
  if spec == "byte":
    return ByteTokenizer()
  bpe_vocab = parse_bpe_vocab(spec, vocab_size)
  if bpe_vocab is not None:
    if train_texts is None or work_dir is None:
      raise ValueError(f"tokenizer {spec!r} needs train_texts and work_dir")
    return train_bpe(train_texts, bpe_vocab, pathlib.Path(work_dir) / HF_FILE)
  if spec.endswith(".json"):
    return HFTokenizer(spec)
  if spec.endswith(".model"):
    return SentencePieceTokenizer(spec)
  raise ValueError(f"unknown tokenizer spec {spec!r}; use {_SPEC_FORMS}")


def tokenizer_from_spec(spec: dict,
                        base_dir: str | os.PathLike | None) -> Tokenizer:
  """Rebuilds a tokenizer from ``Tokenizer.spec()`` and its dataset folder."""
  kind = spec.get("kind")
  if kind == "byte":
    return ByteTokenizer()
  if kind not in ("hf", "sentencepiece"):
    raise ValueError(f"unknown tokenizer kind {kind!r} in spec {spec}")
  if base_dir is None:
    raise ValueError(f"tokenizer spec {spec} needs the dataset folder")
  path = pathlib.Path(base_dir) / spec["file"]
  if kind == "hf":
    tok = HFTokenizer(path, eos_token=spec.get("eos_token"))
  else:
    tok = SentencePieceTokenizer(path)
  if spec.get("sha256") not in (None, tok.sha256):
    raise ValueError(f"{path} does not match its recorded SHA-256; the "
                     "dataset folder was modified, re-run prepare")
  return tok
