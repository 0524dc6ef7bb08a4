"""The tokenizer a converted model carries, both ways.

Import copies the HF folder's ``tokenizer.json`` (or SentencePiece ``tokenizer.model``) into the
workdir, and the converted config's ``data.tokenizer`` points at that copy, so the embedded corpus
is tokenised with it when the workdir trains or evaluates. Export copies the run's tokenizer file
from its prepared dataset; a byte-tokenizer run gets an equivalent ``tokenizer.json``
(``byte_tokenizer``: byte-level BPE with no merges whose ids are the UTF-8 byte values and
``<|endoftext|>`` = 256, the same ids as ``ByteTokenizer`` for any text that does not spell the
eos token literally). A ``tokenizer_config.json`` names the eos token for transformers.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil

from sparsejax.data import tokenizers as toks
from sparsejax.data.prepare import read_metadata

_log = logging.getLogger("sparsejax")
TOKENIZER_FILES = (toks.HF_FILE, toks.SP_FILE)


def find(folder: pathlib.Path) -> pathlib.Path:
  """The tokenizer file of a HF model folder (tokenizer.json preferred), or one line."""
  for name in TOKENIZER_FILES:
    if (folder / name).is_file():
      return folder / name
  raise FileNotFoundError(f"{folder} has no {' or '.join(TOKENIZER_FILES)}: the converted "
                          "workdir needs the model's tokenizer to prepare its data")


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer emits)."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
  table, extra = {b: chr(b) for b in keep}, 0
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def byte_tokenizer(path: pathlib.Path) -> pathlib.Path:
  """Write a tokenizer.json with ``ByteTokenizer``'s ids (module docstring)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # defers tokenizers
  table = _bytes_to_unicode()
  tok = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([toks.DEFAULT_EOS])
  tok.save(str(path))
  return path


def export(dataset_dir: str | pathlib.Path, out: pathlib.Path) -> int | None:
  """Write the run's tokenizer into ``out``; returns its eos id (None: no tokenizer written)."""
  meta = read_metadata(dataset_dir)
  if meta is None:
    _log.warning("the run's dataset %s is gone: no tokenizer exported", dataset_dir)
    return None
  spec = meta["tokenizer"]
  tok = toks.tokenizer_from_spec(spec, dataset_dir)
  if spec["kind"] == "byte":
    byte_tokenizer(out / toks.HF_FILE)
  else:
    shutil.copyfile(pathlib.Path(dataset_dir) / spec["file"], out / spec["file"])
  if spec["kind"] == "sentencepiece":
    _log.warning("copied the run's SentencePiece %s without a tokenizer.json: name its "
                 "tokenizer class (e.g. LlamaTokenizer) when loading it in transformers",
                 spec["file"])
    return int(tok.eos_id)
  eos = getattr(tok, "eos_token", toks.DEFAULT_EOS)
  (out / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos,
       "model_max_length": 1 << 30}, indent=2) + "\n")
  return int(tok.eos_id)
