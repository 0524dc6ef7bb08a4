"""Which parameters a finetune mode touches (resolved on the abstract params of a model).

LoRA targets: the matrices weight sparsity may prune (``Family.prunable``: attention q / k / v /
o, FFN and MoE expert projections, memory / PEER query and Memory+ projections) of the layers
whose kind ("attention" / "ffn") or family name is in ``config.finetune.lora_targets``, or whose
leaf name is listed there itself. A weight's leading ``experts`` axes get one adapter per expert
(batch axes); its input axes run from there to the Prunable contraction axis (inclusive), the
rest are its output axes: wq_DxHxK -> in (D), out (H, K); wo_HxKxD -> in (H, K), out (D);
w_up_ExDxF -> per expert, in (D), out (F).

Memory value tables: the ``values_*`` leaves of the memory layers. With a shared value pool
(memory.shared_values) NNX stores the one table under the first memory layer, and every memory
layer reads it: the layers reading each table are listed with it.
"""

from __future__ import annotations

import dataclasses
import math

import jax

from sparsejax.config import Config
from sparsejax.errors import ConfigError
from sparsejax.layers import registry
from sparsejax.sparsity.targets import at_path

_KIND_KEY = {"attention": "attn", "ffn": "ffn"}
BATCH_AXES = ("experts",)
VALUES_PREFIX = "values_"
MEMORY_FAMILY = "memory"


def key_of(k):
  return getattr(k, "key", getattr(k, "idx", k))


def path_name(path: tuple) -> str:
  return "/".join(map(str, path))


@dataclasses.dataclass(frozen=True)
class LoraTarget:
  path: tuple            # ("blocks", 0, "attn", "wq_DxHxK")
  shape: tuple[int, ...]
  batch: int             # leading axes with one adapter each (MoE experts)
  split: int             # axes [batch, split) are the input, [split, ndim) the output
  axes: tuple            # the weight's logical axes (None when unknown)

  @property
  def name(self) -> str:
    return path_name(self.path)

  def sizes(self) -> tuple[int, int, int]:
    """(adapters, fan_in, fan_out): the weight seen as [adapters, in, out]."""
    s = self.shape
    return (math.prod(s[:self.batch]), math.prod(s[self.batch:self.split]),
            math.prod(s[self.split:]))

  def a_shape(self, rank: int) -> tuple[int, ...]:
    return (*self.shape[:self.split], rank)

  def b_shape(self, rank: int) -> tuple[int, ...]:
    return (*self.shape[:self.batch], rank, *self.shape[self.split:])

  def a_axes(self) -> tuple:
    return (*self.axes[:self.split], None)

  def b_axes(self) -> tuple:
    return (*self.axes[:self.batch], None, *self.axes[self.split:])


def find_lora_targets(cfg: Config, abstract_params: dict, logical_axes: dict | None = None
                      ) -> list[LoraTarget]:
  """The LoRA targets in params order (one-line ConfigError when there are none)."""
  wanted = set(cfg.finetune.lora_targets)
  layers = registry.layer_families(cfg)
  out = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
    keys = tuple(key_of(k) for k in path)
    if len(keys) != 4 or keys[0] != "blocks":
      continue
    for fam in layers[int(keys[1])]:
      if _KIND_KEY[fam.kind] != keys[2]:
        continue
      spec = next((p for p in fam.prunable if p.leaf == keys[3]), None)
      if spec is None or not ({fam.kind, fam.name, keys[3]} & wanted):
        continue
      axes = (tuple(at_path(logical_axes, keys)) if logical_axes is not None
              else (None,) * len(leaf.shape))
      batch = 0
      while batch < len(axes) and axes[batch] in BATCH_AXES:
        batch += 1
      out.append(LoraTarget(keys, tuple(leaf.shape), batch, spec.axis + 1, axes))
  if not out:
    raise ConfigError(f"config.finetune.lora_targets: {list(cfg.finetune.lora_targets)} selects "
                      "no matrix of this model; name a layer kind (attention, ffn), a family it "
                      "uses or a weight such as wq_DxHxK / w_up_DxF")
  return out


def memory_layers(cfg: Config) -> list[int]:
  return [i for i, (_, f) in enumerate(registry.layer_families(cfg)) if f.name == MEMORY_FAMILY]


def memory_tables(cfg: Config, abstract_params: dict) -> dict[tuple, tuple[int, ...]]:
  """Value table path -> the memory layers reading it (params order)."""
  layers = memory_layers(cfg)
  own: dict[int, tuple] = {}
  for path, _ in jax.tree_util.tree_leaves_with_path(abstract_params):
    keys = tuple(key_of(k) for k in path)
    if (len(keys) > 3 and keys[0] == "blocks" and keys[2] == "ffn" and int(keys[1]) in layers
        and str(keys[-1]).startswith(VALUES_PREFIX)):
      own[int(keys[1])] = keys
  if not layers or not own:
    raise ConfigError(f"config.finetune.mode: {cfg.finetune.mode!r} trains memory value tables "
                      "but this model has no memory layer; add one (e.g. "
                      "--config.ffn.overrides=1:memory) or use mode full / lora")
  tables: dict[tuple, list[int]] = {p: [] for p in own.values()}
  for i in layers:
    if i in own:
      tables[own[i]].append(i)
    elif len(own) == 1:  # the shared pool, stored under the first memory layer
      tables[next(iter(own.values()))].append(i)
    else:
      raise ConfigError(f"memory layer {i} has no value table of its own and the model holds "
                        f"{len(own)}; cannot tell which one it reads")
  return {p: tuple(v) for p, v in tables.items()}


def counts_key(layer: int) -> str:
  """The sown name of memory layer ``layer``'s per-slot selection counts."""
  return f"blocks/{layer}/ffn/usage_slots"
