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
  * ``param_groups``: optimizer groups for its layers' leaves whose name starts with a prefix
    (lr as a multiple of the main schedule, weight decay, clipping);
  * ``cost``: ``cost(module, seq_len) -> LayerCost`` for the FLOP / bytes accounting
    (absent: every matmul weight is active, attention is dense causal);
  * ``shapes``: the config sections whose ``shapes=True`` fields shape its parameters (compared
    field by field when a checkpoint is resumed);
  * ``prunable``: the matmul weights weight sparsity may prune (``config.sparsity``,
    sparsejax/sparsity/), each with its contraction axis (N:M groups run along it) and the
    fraction of its weights one token uses (FLOP accounting of pruned weights).
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
  skippable_flops: float = 0.0           # TRAINING FLOPs a structure-aware kernel need not run
                                         # (FFN activation top-k; accounting docstring)


@dataclasses.dataclass(frozen=True)
class ParamGroup:
  """Leaves whose name starts with ``prefix`` (a string or a tuple of strings), in a layer the
  declaring family built, form optimizer group ``name``: its own AdamW (sparsejax/train/optim.py)
  with hyper-parameters ``hyper(cfg) -> dict`` of
    * the lr, one of: ``"lr_mult"`` (the main schedule times this: same warmup and decay, peak
      ``lr_mult * optim.lr``), ``"peak_lr"`` (the main schedule's shape with this peak) or
      ``"lr"`` (a constant, or an optax schedule of its own);
    * ``"weight_decay"`` (absent: ``optim.weight_decay``); norm scales, biases and vectors are
      never decayed, in any group (``optim.decay_mask``);
    * ``"grad_clip"``: absent or None: clipped with the default group (one global norm over
      them); a number: the group's own global-norm clip (0: none)."""
  name: str
  prefix: str | tuple[str, ...]
  hyper: Callable[[Any], dict]


@dataclasses.dataclass(frozen=True)
class Prunable:
  """A weight ``leaf`` (the parameter's name in the layer) that weight sparsity may prune: N:M
  groups and block rows run along ``axis``, its contraction (input) axis; ``active(module)`` is
  the fraction of its weights one token passes through (MoE experts: routed per token / experts;
  None: all of them)."""
  leaf: str
  axis: int
  active: Callable[[Any], float] | None = None


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
  prunable: tuple[Prunable, ...] = ()

  def __post_init__(self):
    if self.kind not in ("attention", "ffn"):
      raise ValueError(f"family {self.name!r}: kind must be 'attention' or 'ffn'")
