"""Registries keyed by config strings: ``config.attention.type`` / ``config.ffn.type``.

A new layer family is one file that decorates its constructor with ``@register_attention(name)``
or ``@register_ffn(name)``, plus one import line at the bottom of this module. Constructors take
``(cfg: Config, layer_idx: int, *, rngs: nnx.Rngs, shared: dict)`` and return an ``nnx.Module``
whose ``__call__(x_BxTxD, positions_BxT)`` (attention) or ``__call__(x_BxTxD)`` (ffn) returns an
array of the same shape as ``x``.

``shared`` is one dict per model: a family that shares a module across layers (the memory
layers' value pool) creates it once with ``shared.setdefault(name, ...)`` — or
``shared[name] = ...`` if absent — and keeps a reference; NNX stores a shared module once.

Reporting from inside a layer (collected with ``nnx.capture``):
  * ``self.sow(nnx.Intermediate, "aux_loss", scalar)``: added to the training loss;
  * any other scalar name: logged as a metric ``sown/<path>``;
  * a vector: logged as a TensorBoard histogram (plus its max/mean ratio as a scalar);
  * a name starting with ``usage``: a count vector, summed over an eval window by the evaluator,
    which reports the fraction of entries touched and the KL from uniform (key usage).
``CHECKS`` holds family validators ``check(cfg)`` run by ``config.from_config_dict``.
"""

from __future__ import annotations

from typing import Callable

ATTENTION: dict[str, Callable] = {}
FFN: dict[str, Callable] = {}
CHECKS: list[Callable] = []


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


def register_check(fn: Callable) -> Callable:
  """Decorator: `fn(cfg)` raises ConfigError for an impossible family config."""
  CHECKS.append(fn)
  return fn


# Layer families register themselves on import.
from sparsejax.layers import attention as _attention  # noqa: E402,F401
from sparsejax.layers import ffn as _ffn  # noqa: E402,F401
from sparsejax.layers import peer as _peer  # noqa: E402,F401
from sparsejax.layers import memory as _memory  # noqa: E402,F401
from sparsejax.layers import moe as _moe  # noqa
from sparsejax.layers import block_sparse as _block_sparse  # noqa: E402,F401
