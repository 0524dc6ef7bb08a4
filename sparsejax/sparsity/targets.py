"""Which weights ``config.sparsity`` prunes, and the checks that need the mesh.

A target is a parameter under ``blocks/<i>/attn`` or ``blocks/<i>/ffn`` whose leaf name is one
of the layer family's ``Family.prunable`` entries (sparsejax/layers/family.py), in a layer whose
kind ("attention" / "ffn") or family name is listed in ``config.sparsity.targets``. Embeddings,
the head, norms, routers, product keys, memory value rows and PEER expert rows are never targets.
"""

from __future__ import annotations

import dataclasses
import math

import jax

from sparsejax.config import Config
from sparsejax.errors import ConfigError
from sparsejax.layers import registry
from sparsejax.sparsity import masks

_KIND_KEY = {"attention": "attn", "ffn": "ffn"}


@dataclasses.dataclass(frozen=True)
class Target:
  path: tuple            # key path in the pure params dict, e.g. ("blocks", 0, "ffn", "w_up_DxF")
  name: str              # "blocks/0/ffn/w_up_DxF" (metric names)
  shape: tuple[int, ...]
  axis: int              # contraction axis: N:M groups and block rows run along it
  active: float          # share of its weights one token uses (MoE experts: k / E)
  family: str            # "<kind>:<family name>"

  @property
  def size(self) -> int:
    return math.prod(self.shape)


def _key(k):
  return getattr(k, "key", getattr(k, "idx", k))


def parse_block(text: str) -> tuple[int, int]:
  """``config.sparsity.block`` as (rows, columns); one-line ConfigError when malformed."""
  try:
    return masks.parse_block(text)
  except ValueError:
    raise ConfigError(f"config.sparsity.block: {text!r} is not 'RxC' with positive R, C (e.g. "
                      "'1x1', '1x4', '16x16')") from None


def find_targets(cfg: Config, abstract_params: dict, abstract_model=None) -> list[Target]:
  """The targeted leaves in params order. ``abstract_model`` (the nnx module, e.g.
  ``ModelSpec.abstract_model``) gives each family's per-token active share; without it 1."""
  wanted = set(cfg.sparsity.targets)  # names checked by configure.validate
  layers = registry.layer_families(cfg)
  out = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
    keys = tuple(_key(k) for k in path)
    if len(keys) < 4 or keys[0] != "blocks":
      continue
    i, sub = int(keys[1]), keys[2]
    for fam in layers[i]:
      if _KIND_KEY[fam.kind] != sub or not ({fam.kind, fam.name} & wanted):
        continue
      spec = next((p for p in fam.prunable if p.leaf == keys[-1]), None)
      if spec is None:
        continue
      active = 1.0
      if spec.active is not None and abstract_model is not None:
        active = float(spec.active(getattr(abstract_model.blocks[i], sub)))
      out.append(Target(keys, "/".join(map(str, keys)), tuple(leaf.shape), spec.axis, active,
                        f"{fam.kind}:{fam.name}"))
  return out


def check_targets(cfg: Config, targets: list[Target]) -> None:
  """Config errors that need the model's shapes: nothing to prune, N:M group or block sizes
  that do not divide the weight."""
  s = cfg.sparsity
  if not targets:
    raise ConfigError(f"config.sparsity.targets: {list(s.targets)} selects no prunable weight in "
                      "this model; name a layer kind (attention, ffn) or a family it uses")
  if s.method == "nm":
    if not 0 < s.n < s.m:
      raise ConfigError(f"config.sparsity.n: need 0 < n < m, got n={s.n}, m={s.m}")
    for t in targets:
      if t.shape[t.axis] % s.m:
        raise ConfigError(f"config.sparsity.m: {t.name} has {t.shape[t.axis]} weights along its "
                          f"contraction axis {t.axis}, not a multiple of m={s.m}; change m or "
                          "leave this layer out of config.sparsity.targets")
  else:
    r, c = parse_block(s.block)
    for t in targets:
      other = masks.other_axis(len(t.shape), t.axis)
      if t.shape[t.axis] % r or t.shape[other] % c:
        raise ConfigError(f"config.sparsity.block: {s.block} does not tile {t.name} "
                          f"{t.shape} (rows along axis {t.axis}, columns along axis {other})")


def check_shards(cfg: Config, targets: list[Target], shardings: dict, mesh) -> None:
  """N:M groups must not straddle a shard boundary: the contraction axis of every target must
  split into shards holding a multiple of m weights (one line naming the parameter and axis)."""
  if cfg.sparsity.method != "nm":
    return
  m = cfg.sparsity.m
  for t in targets:
    sh = shardings
    for k in t.path:
      sh = sh[k]
    spec = tuple(sh.spec) + (None,) * (len(t.shape) - len(sh.spec))
    axes = spec[t.axis]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    parts = math.prod(mesh.shape[a] for a in axes)
    if parts > 1 and (t.shape[t.axis] // parts) % m:
      raise ConfigError(
          f"config.sparsity.m: {t.name} axis {t.axis} ({t.shape[t.axis]} weights) is split "
          f"over mesh axes {axes} into shards of {t.shape[t.axis] // parts}, not a multiple of "
          f"m={m}: an N:M group would straddle a shard boundary; change m or the mesh")


# ---- nested-dict paths (param trees are plain nested dicts) ----
def at_path(tree, path):
  """``tree[path[0]][path[1]]...``."""
  for k in path:
    tree = tree[k]
  return tree


def nested(paths, values) -> dict:
  """A nested dict holding ``values`` at ``paths`` (same order)."""
  out: dict = {}
  for path, v in zip(paths, values):
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out
