"""The layer-family registry: config strings -> family records (sparsejax/layers/family.py).

A new family is one file that ends with ``FAMILY = Family(...)`` plus its module in the
``FAMILY_MODULES`` line below. Constructors take ``(cfg, layer_idx, *, rngs, shared)`` and return
an ``nnx.Module`` whose ``__call__(x_BxTxD, positions_BxT)`` (attention) or ``__call__(x_BxTxD)``
(ffn) returns an array of the same shape as ``x``.

``shared`` is one dict per model: a family that shares a module across layers (the memory
layers' value pool) creates it once (``shared[name] = ...`` if absent) and keeps a reference;
NNX stores a shared module once.

Reporting from inside a layer with ``sparsejax.layers.common.sow(self, name, value)`` (collected
by the train / eval steps' ``nnx.capture``; a no-op in a plain ``model(tokens)`` call):
  * ``"aux_loss"``: a scalar added to the training loss;
  * any other scalar name: logged as a metric ``sown/<path>``;
  * a vector: logged as a TensorBoard histogram (plus its max/mean and min/mean ratios);
  * a name starting with ``usage``: a count vector, summed over an eval window by the evaluator,
    which reports the fraction of entries touched and the KL from uniform (key usage); for
    ``usage_neurons`` (dense FFN with a sparse activation) also ``dead_fraction``, the share of
    hidden units that never fired over the window;
  * ``update__buffer_x``: added to the sibling parameter ``buffer_x`` after the optimizer step
    (``buffer_*`` parameters are frozen for the optimizer).
"""

from __future__ import annotations

import contextlib
from typing import Any

from sparsejax.errors import ConfigError
from sparsejax.layers import attention, block_sparse, ffn, memory, moe, peer
from sparsejax.layers.family import Family, ParamGroup
from sparsejax.parallel import sharding

FAMILY_MODULES = (attention, ffn, moe, peer, memory, block_sparse)

ATTENTION: dict[str, Family] = {}
FFN: dict[str, Family] = {}


def _table(kind: str) -> dict[str, Family]:
  return ATTENTION if kind == "attention" else FFN


def register(family: Family) -> Family:
  """Add a family; its config section, rules and optimizer groups become known everywhere."""
  table = _table(family.kind)
  if family.name in table:
    raise ValueError(f"duplicate {family.kind} family {family.name!r}")
  if family.section is not None:
    name, cls = family.section
    owner = sections().get(name)
    if owner is not None and owner is not cls:
      raise ValueError(f"config section {name!r} is already declared by another family")
  known = logical_rule_defaults()
  for axis, target in family.rules:
    if axis in known and known[axis] != target:
      raise ValueError(f"family {family.name!r}: logical axis rule {axis!r} -> {target!r} "
                       f"conflicts with {known[axis]!r}")
  table[family.name] = family
  return family


def unregister(family: Family) -> None:
  _table(family.kind).pop(family.name, None)


@contextlib.contextmanager
def registered(family: Family):
  """A family registered for the duration of a ``with`` block (tests, notebooks)."""
  register(family)
  try:
    yield family
  finally:
    unregister(family)


def all_families() -> list[Family]:
  return [*ATTENTION.values(), *FFN.values()]


def sections() -> dict[str, type]:
  """Config section name -> dataclass, over every registered family."""
  return {f.section[0]: f.section[1] for f in all_families() if f.section is not None}


def logical_rule_defaults() -> dict[str, Any]:
  """The core rule table plus every family's rules (before presets and config.mesh.rules)."""
  rules = dict(sharding.DEFAULT_RULES)
  for f in all_families():
    rules.update(f.rules)
  return rules


def logical_rules(mesh_cfg) -> dict[str, Any]:
  """The rule table a run uses: core, families, the mesh preset's, then config.mesh.rules."""
  return sharding.rules_of(mesh_cfg, logical_rule_defaults())


def param_groups() -> list[ParamGroup]:
  """Every family's optimizer groups (all of them, used or not, so that the optimizer state has
  the same structure for every model: checkpoints stay comparable)."""
  return [g for f in all_families() for g in f.param_groups]


def layer_families(cfg) -> list[tuple[Family, Family]]:
  """(attention family, ffn family) of each layer."""
  return [(ATTENTION[a], FFN[f]) for a, f in cfg.layer_types()]


def families_in_use(cfg) -> list[Family]:
  seen: dict[tuple[str, str], Family] = {}
  for pair in layer_families(cfg):
    for f in pair:
      seen.setdefault((f.kind, f.name), f)
  return list(seen.values())


def check(cfg) -> None:
  """Every layer type names a registered family; each family in use checks its options."""
  for section, table in (("attention", ATTENTION), ("ffn", FFN)):
    sec = getattr(cfg, section)
    names = [(f"config.{section}.type", sec.type)]
    names += [(f"config.{section}.pattern", n) for n in sec.pattern]
    if section == "ffn":
      names += [("config.ffn.overrides", n) for _, n in cfg.layer_types()]
    for key, name in names:
      if name not in table:
        raise ConfigError(f"{key}: unknown {section} type {name!r}; registered: "
                          f"{', '.join(sorted(table))}")
  for family in families_in_use(cfg):
    if family.check is not None:
      family.check(cfg)


def resume_sections(cfg) -> tuple[str, ...]:
  """Sections whose parameter-shaping fields must match a checkpoint to resume it."""
  out = ["model", "attention", "ffn", "sparsity"]  # sparsity: the masks in the optimizer state
  for family in families_in_use(cfg):
    out += [s for s in family.shapes if s not in out]
  return tuple(out)


for _module in FAMILY_MODULES:
  register(_module.FAMILY)
