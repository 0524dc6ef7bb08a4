"""``parse_mask``: config strings such as ``"causal&window:1024"`` or
``"heads(causal,bigbird:256:64:3:128)"`` to ``Mask`` objects (grammar in ``MASK_FORMS``).
"""

from __future__ import annotations

import functools
import re

from kernels_pallas.block_sparse_attention.masks.base import And, Mask, Or, _flatten
from kernels_pallas.block_sparse_attention.masks.bigbird import BigBird
from kernels_pallas.block_sparse_attention.masks.functions import PerHead
from kernels_pallas.block_sparse_attention.masks.patterns import Dilated, Fixed, PrefixLM, Strided
from kernels_pallas.block_sparse_attention.masks.primitives import Causal, Full, SlidingWindow


MASK_FORMS = ("full", "causal", "window:LEFT[:RIGHT]", "strided:STRIDE:LOCAL",
              "fixed:BLOCK:NUM_SUMMARY", "bigbird:WINDOW:GLOBAL:RANDOM:BLOCK[:seed=S][:layer=L]",
              "prefix:LEN", "dilated:WINDOW:DILATION", "heads(M,M,...)",
              "combined with & | ~ and parentheses, e.g. causal&window:1024")

_TERMS = {  # name -> (constructor, number of positional ints (min, max))
    "full": (Full, 0, 0), "causal": (Causal, 0, 0), "window": (SlidingWindow, 1, 2),
    "strided": (Strided, 2, 2), "fixed": (Fixed, 2, 2), "bigbird": (BigBird, 4, 4),
    "prefix": (PrefixLM, 1, 1), "dilated": (Dilated, 2, 2),
}


def _bad(spec: str, why: str) -> ValueError:
  return ValueError(f"bad mask spec {spec!r} ({why}); forms: " + ", ".join(MASK_FORMS))


def parse_mask(spec: str) -> Mask:
  """Parse a config string (see ``MASK_FORMS``); ``&`` binds tighter than ``|``.
  ``str(mask)`` of a parseable mask round-trips. A ``Mask`` is returned as is.

  Each distinct string is parsed once (masks are frozen and hashable, so the cached object is
  shared): ``parse_mask(s) is parse_mask(s)``. Bad specs are not cached and raise every time."""
  if isinstance(spec, Mask):
    return spec
  if not isinstance(spec, str):
    raise _bad(str(spec), "not a string")
  return _parse_str(spec)


@functools.lru_cache(maxsize=None)
def _parse_str(spec: str) -> Mask:
  """The uncached parser behind ``parse_mask`` (``spec`` is a str)."""
  tokens = re.findall(r"[A-Za-z_][\w]*(?::[\w=\-]+)*|[&|~(),]|\S", spec.replace(" ", ""))
  pos = 0

  def peek():
    return tokens[pos] if pos < len(tokens) else None

  def take():
    nonlocal pos
    pos += 1
    return tokens[pos - 1]

  def expr():
    parts = [conj()]
    while peek() == "|":
      take()
      parts.append(conj())
    return parts[0] if len(parts) == 1 else Or(_flatten(Or, parts))

  def conj():
    parts = [unary()]
    while peek() == "&":
      take()
      parts.append(unary())
    return parts[0] if len(parts) == 1 else And(_flatten(And, parts))

  def unary():
    if peek() == "~":
      take()
      return ~unary()
    tok = take() if peek() is not None else None
    if tok is None:
      raise _bad(spec, "unexpected end")
    if tok == "(":
      m = expr()
      if peek() != ")":
        raise _bad(spec, "missing ')'")
      take()
      return m
    if tok == "heads":
      if peek() != "(":
        raise _bad(spec, "heads needs '('")
      take()
      ms = [expr()]
      while peek() == ",":
        take()
        ms.append(expr())
      if peek() != ")":
        raise _bad(spec, "missing ')'")
      take()
      return PerHead(tuple(ms))
    return term(tok)

  def term(tok):
    name, *args = tok.split(":")
    if name not in _TERMS:
      raise _bad(spec, f"unknown term {name!r}")
    cls, lo, hi = _TERMS[name]
    pos_args, kw = [], {}
    for a in args:
      k, eq, v = a.partition("=")
      try:
        if eq:
          if name != "bigbird" or k not in ("seed", "layer"):
            raise _bad(spec, f"unknown option {k!r} for {name}")
          kw[k] = int(v)
        else:
          if kw:
            raise _bad(spec, "positional value after an option")
          pos_args.append(int(a))
      except ValueError as e:
        if "forms:" in str(e):
          raise
        raise _bad(spec, f"{a!r} is not an integer") from None
    if not lo <= len(pos_args) <= hi:
      raise _bad(spec, f"{name} takes {lo if lo == hi else f'{lo}-{hi}'} integers")
    try:
      return cls(*pos_args, **kw)
    except ValueError as e:
      raise _bad(spec, str(e)) from None

  m = expr()
  if pos != len(tokens):
    raise _bad(spec, f"unexpected {tokens[pos]!r}")
  return m
