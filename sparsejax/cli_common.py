"""Shared CLI plumbing: logging set-up and one-line errors for expected failures."""

from __future__ import annotations

import ast
import contextlib
import logging
import sys

from absl import flags
from absl import logging as absl_logging

from sparsejax.errors import CheckpointError, ConfigError

EXPECTED_ERRORS = (ConfigError, FileNotFoundError, CheckpointError, ValueError, RuntimeError)


class _StderrHandler(logging.StreamHandler):
  """Writes to whatever ``sys.stderr`` is when a record is emitted, not the stream of the first
  call: commands run in-process (tests, notebooks) may have swapped and closed that one."""

  def __init__(self):
    super().__init__(sys.stderr)

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, value) -> None:
    del value


def setup_logging(level: int = logging.INFO) -> None:
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax / jax chatter
  root = logging.getLogger("sparsejax")
  if not root.handlers:
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                           "%H:%M:%S"))
    root.addHandler(handler)
  root.setLevel(level)
  root.propagate = False


@contextlib.contextmanager
def one_line_errors(prog: str):
  """Expected failures print `prog: error: <one line>` and exit 2; bugs keep their traceback."""
  try:
    yield
  except EXPECTED_ERRORS as e:
    if type(e).__module__.startswith(("jax", "jaxlib", "flax", "orbax")):
      raise
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"{prog}: error: {type(e).__name__}: {msg}", file=sys.stderr)
    sys.exit(2)


def flags_parser(prog: str):
  """An absl `flags_parser` that turns bad flags / config overrides into one line, exit 2.
  (ml_collections raises AttributeError/KeyError for an unknown `--config.a.b`, which absl
  would otherwise print as a traceback.)"""
  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
      text = str(e.args[0]) if e.args else str(e)
      if text[:1] in "'\"":  # a repr()'d KeyError message nested in another error
        try:
          text = str(ast.literal_eval(text))
        except (ValueError, SyntaxError):
          pass
      msg = " ".join(line.strip() for line in text.splitlines() if line.strip())
      print(f"{prog}: error: bad flag: {msg or type(e).__name__}", file=sys.stderr)
      sys.exit(2)
  return parse
