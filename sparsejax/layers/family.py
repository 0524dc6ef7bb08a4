"""The layer-family record: everything the rest of the system needs to know about a family.

Each family file (sparsejax/layers/<family>.py) ends with one ``FAMILY = Family(...)`` (or a
tuple of them when one file registers several names), and ``sparsejax/layers/registry.py`` lists
the family modules. Nothing outside the family file knows its options:

  * ``name`` / ``kind``: the config string (``ffn.type="moe"``, ``attention.type=...``);
  * ``build``: ``(cfg, layer_idx, *, rngs, shared) -> nnx.Module``;
  * ``section``: ``(name, dataclass)`` of its config section (``config.moe``), with schema
    defaults; ``--config.<name>.<key>`` overrides work once the family is registered;
  * ``check``: ``check(cfg)`` raises a one-line ConfigError; run when a layer uses the family;
  * ``rules``: logical axis name -> mesh axes, for the names its parameters introduce;
  * ``param_groups``: optimizer groups for leaves whose name starts with a prefix;
  * ``cost``: ``cost(module, seq_len) -> LayerCost`` for the FLOP / bytes accounting
    (absent: every matmul weight is active, attention is dense causal);
  * ``shapes``: the config sections whose ``shapes=True`` fields shape its parameters (compared
    field by field when a checkpoint is resumed).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class LayerCost:
  """Per-token forward accounting of one layer (conventions: sparsejax/models/accounting.py)."""
  active_params: float | None = None     # matmul weights touched; None: all 2-D+ weights
  attention_flops: float | None = None   # scores + values; None: dense causal 2*T*H*Dh
  table_bytes: float = 0.0               # table rows gathered (memory values, PEER experts)


@dataclasses.dataclass(frozen=True)
class ParamGroup:
  """Leaves whose name starts with ``prefix`` form optimizer group ``name`` with AdamW
  hyper-parameters ``hyper(cfg) -> {"lr", "grad_clip", "weight_decay"}`` (constant lr)."""
  name: str
  prefix: str
  hyper: Callable[[Any], dict]


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  kind: str                                      # "attention" | "ffn"
  build: Callable
  section: tuple[str, type] | None = None
  check: Callable[[Any], None] | None = None
  rules: tuple[tuple[str, Any], ...] = ()
  param_groups: tuple[ParamGroup, ...] = ()
  cost: Callable[[Any, int], LayerCost] | None = None
  shapes: tuple[str, ...] = ("model",)

  def __post_init__(self):
    if self.kind not in ("attention", "ffn"):
      raise ValueError(f"family {self.name!r}: kind must be 'attention' or 'ffn'")
