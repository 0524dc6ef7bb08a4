"""Registries keyed by config strings: ``config.attention.type`` / ``config.ffn.type``.

A new layer family is one file that decorates its constructor with ``@register_attention(name)``
or ``@register_ffn(name)``, plus one import line at the bottom of this module. Constructors take
``(cfg: Config, layer_idx: int, *, rngs: nnx.Rngs)`` and return an ``nnx.Module`` whose
``__call__(x_BxTxD, positions_BxT)`` (attention) or ``__call__(x_BxTxD)`` (ffn) returns an array
of the same shape as ``x``. Auxiliary losses are reported with
``self.sow(nnx.Intermediate, "aux_loss", value)`` and are added to the training loss; other
sown values are logged as metrics.
"""

from __future__ import annotations

from typing import Callable

ATTENTION: dict[str, Callable] = {}
FFN: dict[str, Callable] = {}


def _register(table: dict, name: str):
  def deco(ctor):
    if name in table:
      raise ValueError(f"duplicate registry entry {name!r}")
    table[name] = ctor
    return ctor
  return deco


def register_attention(name: str):
  return _register(ATTENTION, name)


def register_ffn(name: str):
  return _register(FFN, name)


# Layer families register themselves on import.
from sparsejax.layers import attention as _attention  # noqa: E402,F401
from sparsejax.layers import ffn as _ffn  # noqa: E402,F401
