"""Document sources: the embedded default corpus and user files/folders.

A *document* is a ``(doc_id, text)`` pair. ``doc_id`` is a stable string
(a relative path, or ``path:line`` for JSONL) used only to assign the
document to the train or val split with :func:`split_of`.

Folder policy: folders are walked recursively in sorted relative-path order;
hidden entries (name starting with ``.``) and ``__pycache__`` are skipped and
only files whose suffix is in :data:`TEXT_SUFFIXES` are read (``.jsonl``
files inside a folder are parsed line by line like top-level ones). A file
named explicitly is always read, whatever its suffix. All text is decoded as
UTF-8 with ``errors="replace"``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sysconfig
from typing import Iterator

JSONL_SUFFIXES = frozenset({".jsonl", ".json-lines", ".ndjson"})
TEXT_SUFFIXES = frozenset({
    ".txt", ".text", ".md", ".rst", ".org", ".adoc", ".tex", ".csv", ".tsv",
    ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".java", ".js",
    ".ts", ".go", ".rs", ".jl", ".lua", ".rb", ".sh", ".sql", ".html", ".htm",
    ".css", ".xml", ".json", ".yaml", ".yml", ".toml", ".ini", ".cfg",
}) | JSONL_SUFFIXES
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_root() -> pathlib.Path:
  """The running interpreter's standard-library folder."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files() -> list[pathlib.Path]:
  """All ``*.py`` files of the standard library, sorted by relative path.

  Third-party packages (``site-packages``/``dist-packages``) are excluded.
  """
  root = stdlib_root()
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
    files.extend(pathlib.Path(dirpath, f) for f in filenames
                 if f.endswith(".py"))
  return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_of(rel_path: str, val_fraction: float) -> str:
  """Returns ``"val"`` or ``"train"`` for a document id, deterministically.

  The first 8 bytes of SHA-1 of the UTF-8 id, read as a big-endian integer
  and divided by 2**64, give a uniform number u in [0, 1);
  ``u < val_fraction`` means ``"val"``.
  """
  digest = hashlib.sha1(rel_path.encode("utf-8")).digest()
  u = int.from_bytes(digest[:8], "big") / 2**64
  return "val" if u < val_fraction else "train"


def read_text(path: pathlib.Path) -> str:
  """A file's content decoded as UTF-8 with ``errors="replace"``."""
  return path.read_bytes().decode("utf-8", errors="replace")


def _valid_unicode(text: str) -> str:
  """Replaces lone surrogates (possible via JSON escapes) with "?"."""
  try:
    text.encode("utf-8")
    return text
  except UnicodeEncodeError:
    return text.encode("utf-8", errors="replace").decode("utf-8")


def _iter_jsonl(path: pathlib.Path, id_prefix: str,
                field: str) -> Iterator[tuple[str, str]]:
  with open(path, encoding="utf-8", errors="replace") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        record = None
      if not isinstance(record, dict) or not isinstance(record.get(field),
                                                        str):
        raise ValueError(f"{path}:{lineno}: expected a JSON object with a "
                         f"string field {field!r} (set --jsonl_field)")
      yield f"{id_prefix}:{lineno}", _valid_unicode(record[field])


def _iter_file(path: pathlib.Path, doc_id: str,
               field: str) -> Iterator[tuple[str, str]]:
  if path.suffix.lower() in JSONL_SUFFIXES:
    yield from _iter_jsonl(path, doc_id, field)
  else:
    yield doc_id, read_text(path)


def _folder_files(folder: pathlib.Path) -> list[pathlib.Path]:
  files = []
  for dirpath, dirnames, filenames in os.walk(folder):
    dirnames[:] = [d for d in dirnames
                   if not d.startswith(".") and d != "__pycache__"]
    for name in filenames:
      path = pathlib.Path(dirpath, name)
      if (not name.startswith(".") and path.suffix.lower() in TEXT_SUFFIXES
          and path.is_file()):
        files.append(path)
  return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def check_inputs(inputs: list[str]) -> None:
  """Raises ``FileNotFoundError`` naming the first missing input path."""
  for given in inputs:
    if not pathlib.Path(given).expanduser().exists():
      raise FileNotFoundError(
          f"input not found: {given} (pass an existing text file, folder or "
          ".jsonl file, or omit --input to use the default corpus)")


def iter_documents(inputs: list[str],
                   jsonl_field: str = "text") -> Iterator[tuple[str, str]]:
  """Yields ``(doc_id, text)`` for every document of ``inputs``, in order.

  * a ``.jsonl`` file: one document per non-blank line, ``record[jsonl_field]``
    (id ``name:line``); a bad line raises ``ValueError``;
  * any other file: the whole file is one document (id: its file name);
  * a folder: every text file below it (id: path relative to the folder).

  A missing path raises ``FileNotFoundError``.
  """
  for given in inputs:
    path = pathlib.Path(given).expanduser()
    if path.is_dir():
      for file in _folder_files(path):
        yield from _iter_file(file, file.relative_to(path).as_posix(),
                              jsonl_field)
    elif path.is_file():
      yield from _iter_file(path, path.name, jsonl_field)
    else:
      check_inputs([given])
      raise FileNotFoundError(f"input is not a file or folder: {given}")
