"""The core config sections and ``Config`` (frozen dataclasses; imports no jax).

Schema defaults are the single source of defaults: preset files (configs/*.py) set only what
differs. A field's metadata says whether it is one of a fixed set of strings (``choices``) and
whether it shapes the model's parameters (``shapes``: compared on resume, see
``config.build.resume_changes``).

Layer families (sparsejax/layers/<family>.py) add their own sections (``config.moe``,
``config.peer``, ...): ``Config.families`` holds them, and ``cfg.moe`` reads one like a field.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from sparsejax.errors import ConfigError


def field(default: Any, *choices: str, shapes: bool = False):
  """A dataclass field with schema metadata: ``choices`` (allowed strings) and ``shapes`` (a
  change alters parameter shapes, so a checkpoint cannot be resumed under it)."""
  return dataclasses.field(default=default, metadata={"choices": choices, "shapes": shapes})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder-only transformer shape. Zeros mean "derive" (documented per field)."""
  vocab_size: int = field(0, shapes=True)          # 0: from the dataset's metadata
  vocab_multiple_of: int = field(128, shapes=True)  # embedding rows padded up to a multiple
  d_model: int = field(256, shapes=True)
  num_layers: int = field(4, shapes=True)
  num_heads: int = field(4, shapes=True)
  num_kv_heads: int = field(0, shapes=True)  # 0: = num_heads (MHA); fewer: grouped-query
  head_dim: int = field(0, shapes=True)      # 0: d_model // num_heads
  tie_embeddings: bool = field(True, shapes=True)
  norm_eps: float = 1e-6
  init_std: float = 0.02         # embeddings and input projections; output projections / sqrt(2L)
  param_dtype: str = field("float32", "float32", "bfloat16", shapes=True)
  compute_dtype: str = field("bfloat16", "bfloat16", "float32")
  remat: str = field("none", "none", "full", "dots", "dots_no_batch")
  # runs of identical blocks execute as one lax.scan over parameters stored stacked
  # (scan/<start>/<j>; checkpoints convert when it is switched on resume): compile time flat in
  # depth, and under FSDP at scale it is what fits, as XLA frees each layer's gathered weights
  # (measured: sparsejax/models/scan.py, docs/compile_check.md)
  scan_layers: bool = False
  z_loss: float = 1e-4           # coefficient of mean(logsumexp(logits)^2)
  # > 0: the head and loss run over sequence chunks of this length (must divide data.seq_len),
  # each recomputed in the backward pass, so [B, T, V] float32 logits never exist; 0: at once
  loss_chunk: int = 0


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Attention per layer: ``type`` for all layers, or ``pattern`` cycled over layers."""
  type: str = field("dense", shapes=True)  # a registered attention family
  pattern: tuple[str, ...] = field((), shapes=True)  # e.g. ("dense", "block_sparse")
  rope_theta: float = 10000.0
  qk_norm: bool = field(False, shapes=True)
  # q / k / v projection biases (Qwen2; zero-initialised, never weight-decayed)
  qkv_bias: bool = field(False, shapes=True)
  # jax.nn.dot_product_attention backend; auto = cudnn on GPU with 16-bit compute, else xla
  impl: str = field("auto", "auto", "xla", "cudnn")
  # block_sparse layers (sparsejax/layers/block_sparse.py): mask spec, validated and parsed once
  # at validation; block sizes (0: tuned per device) and kernel backend
  mask: str = "causal"
  block_q: int = 128
  block_kv: int = 128
  sparse_impl: str = field("auto", "auto", "pallas", "interpret", "xla", "splash")


@dataclasses.dataclass(frozen=True)
class FFNConfig:
  """Feed-forward per layer: ``type`` for all layers, or ``pattern`` cycled over layers, then
  ``first_k_dense`` and per-layer ``overrides`` (e.g. ("4:memory", "8:memory"))."""
  type: str = field("dense", shapes=True)  # a registered ffn family
  pattern: tuple[str, ...] = field((), shapes=True)  # e.g. ("dense", "moe")
  first_k_dense: int = field(0, shapes=True)  # the first k layers use "dense"
  overrides: tuple[str, ...] = field((), shapes=True)  # "<layer>:<type>" entries, applied last
  d_ff: int = field(0, shapes=True)  # 0: 8/3 * d_model rounded up to multiple_of (SwiGLU)
  multiple_of: int = field(64, shapes=True)
  # gated activation (sparsejax/layers/ffn.py): relu / relu2 / drelu make h exactly sparse
  activation: str = field("swiglu", "swiglu", "geglu", "relu", "relu2", "drelu")
  activation_topk: int = field(0)  # k > 0: keep the k largest |h| per token in dense FFN layers


@dataclasses.dataclass(frozen=True)
class DataConfig:
  path: str = ""                 # prepared token dataset dir; "" = embedded stdlib corpus
  tokenizer: str = "byte"        # only used to prepare the embedded corpus when path == ""
  seq_len: int = 256
  global_batch_size: int = 16    # sequences per optimizer step, across all devices and hosts
  # Synthetic facts mixed into the training split (a fact-recall benchmark, see
  # sparsejax/data/synthfacts.py; evaluated by `python -m sparsejax.eval --task synthfacts`).
  # Off (0) changes nothing; on, training reads a cached copy of the dataset whose train split
  # also holds fact sentences (val split unchanged), and the resume guard sees the change.
  synthfacts_facts: int = 0      # (entity, relation) facts; 0 = off
  synthfacts_fraction: float = 0.4  # fraction of training tokens that are fact text, in (0, 1)
  synthfacts_seed: int = 0       # draws the facts and their training renderings
  # the facts [offset, offset + synthfacts_facts): K > 0 continues the K-fact set with new
  # entities and the same candidate values (disjoint sets for continual learning)
  synthfacts_offset: int = 0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 3e-3
  schedule: str = field("cosine", "cosine", "linear", "wsd", "constant")
  warmup_steps: int = 30
  min_lr_ratio: float = 0.1      # final lr / peak lr for cosine, linear and wsd
  wsd_decay_fraction: float = 0.2  # fraction of steps spent in the final decay (wsd)
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1      # decoupled (AdamW); never on norms or biases (ndim < 2)
  decay_embeddings: bool = True
  grad_clip: float = 1.0         # global norm; 0 disables


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 300
  seed: int = 0
  grad_accum_steps: int = 1      # micro-batches per step, accumulated inside the jitted step
  log_every_steps: int = 10
  eval_every_steps: int = 100    # 0: only at the end
  eval_batches: int = 8
  checkpoint_every_steps: int = 100
  keep_checkpoints: int = 3
  async_checkpoint: bool = True
  # a checkpoint save that fails (disk full, storage error): "stop" the run with one line (the
  # committed checkpoints are intact), or "warn" and keep training (the next save tries again)
  on_save_error: str = field("stop", "stop", "warn")
  max_nonfinite_in_a_row: int = 5
  stop_at_step: int = 0          # >0: save and stop at this step (a time slot); schedule unchanged
  peak_tflops_per_device: float = 0.0  # 0: looked up from the device kind (for MFU)
  # warn (once per layer) when a retrieval layer's per-step touched fraction of slots / experts
  # falls below this: a collapsing memory / PEER layer; 0 disables
  min_touched_fraction: float = 0.05
  progress_bar: bool = True
  # "WORKDIR[:STEP]": a new run starts from that run's parameters (latest committed step unless
  # given) with a fresh optimizer, schedule and data stream (sparsejax/train/init_from.py);
  # ignored once this run has a checkpoint of its own
  init_from: str = ""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes (one may be -1: all remaining devices) and logical -> mesh axis rules.
  ``preset`` (dp, fsdp, fsdp_tp, fsdp_ep, multislice; sparsejax/parallel/mesh.py) sets the
  sizes at validation; "" keeps them as given."""
  preset: str = ""
  data: int = -1
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1
  dcn: int = 1                   # slices joined by DCN / the node network (outermost axis, pure
                                 # data parallel); 0: one per TPU slice or per process
  rules: tuple[tuple[str, Any], ...] = ()  # overrides of the logical-axis rule table


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
  """Weight sparsity during training (sparsejax/sparsity/): one ``method`` over the matmul
  weights of the ``targets`` (layer kinds "attention" / "ffn" or family names, e.g. "moe";
  which leaves a family offers, and their contraction axis, is its ``Family.prunable``).
  "none" changes nothing. Methods:
    * "nm": N:M along the contraction axis, recomputed from the dense weights every step
      (SR-STE: backward adds ``nm_lambda * (1 - M) * W``; ``nm_decay="after_clip"`` adds it to the
      clipped gradients instead, the 2:4-pretraining variant); the last ``dense_fraction`` of
      the steps trains dense;
    * "gmp": gradual magnitude pruning, cubic from 0 at ``start_fraction`` to ``sparsity`` at
      ``end_fraction`` of the steps, updated every ``update_every`` steps; "oneshot": all of it
      at ``start_fraction``; "random": a static random mask from step 0;
    * "rigl" / "set" / "momentum": dynamic sparse training from a random mask at ``sparsity``:
      every ``update_every`` steps until ``end_fraction``, drop ``drop_fraction/2 * (1 + cos(pi
      t / T_end))`` of each layer's active weights by magnitude and grow as many by |gradient|
      (RigL), at random (SET) or by |momentum| with layer budgets by mean momentum (sparse
      momentum).
  ``distribution``: per-layer densities "uniform" or "erk"; ``block``: "RxC" prunes whole
  blocks (R along the contraction axis, C along the last other axis)."""
  method: str = field("none", "none", "nm", "gmp", "oneshot", "random", "rigl", "set",
                      "momentum", shapes=True)
  targets: tuple[str, ...] = field(("attention", "ffn"), shapes=True)
  sparsity: float = 0.5          # final fraction of pruned weights in the targets
  distribution: str = field("uniform", "uniform", "erk")
  block: str = "1x1"
  n: int = 2                     # nm: keep n of every m consecutive weights
  m: int = 4
  nm_lambda: float = 2e-4        # SR-STE decay of the pruned weights; 0 = plain STE
  nm_decay: str = field("backward", "backward", "after_clip")
  dense_fraction: float = 0.0    # nm: train dense for this last fraction of the steps
  start_fraction: float = 0.25   # gmp: t0; oneshot: the pruning step
  end_fraction: float = 0.75     # gmp: t1; rigl / set / momentum: T_end
  update_every: int = 100        # gmp: delta t; dst: delta T
  drop_fraction: float = 0.3     # dst: alpha
  momentum_beta: float = 0.9     # momentum: the EMA of gradients that ranks growth


CORE_SECTIONS: dict[str, type] = {
    "model": ModelConfig, "attention": AttentionConfig, "ffn": FFNConfig, "data": DataConfig,
    "optim": OptimConfig, "train": TrainConfig, "mesh": MeshConfig, "sparsity": SparsityConfig}


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  attention: AttentionConfig = AttentionConfig()
  ffn: FFNConfig = FFNConfig()
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()
  sparsity: SparsityConfig = SparsityConfig()
  # defined at the end of this file (sparsejax/finetune/); CORE_SECTIONS gains it there
  finetune: FinetuneConfig = dataclasses.field(default_factory=lambda: FinetuneConfig())
  name: str = "dense"
  # Family sections, sorted by name: (("memory", MemoryConfig(...)), ("moe", MoEConfig(...)), ..)
  families: tuple[tuple[str, Any], ...] = ()

  def __getattr__(self, name: str):
    """``cfg.moe``: a family section (only called when normal attribute lookup fails)."""
    if not name.startswith("_"):
      try:
        families = object.__getattribute__(self, "families")
      except AttributeError:
        families = ()
      for key, section in families:
        if key == name:
          return section
    raise AttributeError(f"Config has no section or field {name!r}")

  def with_sections(self, **sections) -> "Config":
    """A copy with whole sections replaced, core or family (like ``dataclasses.replace``; not
    re-validated: use ``sparsejax.configure.replace`` for dotted, validated overrides)."""
    core = {k: v for k, v in sections.items() if k in CORE_SECTIONS or k == "name"}
    families = dict(self.families)
    for k, v in sections.items():
      if k in core:
        continue
      if k not in families:
        raise ConfigError(f"config.{k}: no such section (registered: {', '.join(families)})")
      families[k] = v
    return dataclasses.replace(self, **core, families=tuple(sorted(families.items())))

  def sections(self) -> dict[str, Any]:
    """Every section by name, core first, then families."""
    out = {name: getattr(self, name) for name in CORE_SECTIONS}
    out.update(self.families)
    return out

  # ---- derived quantities (all shape logic in one place) ----
  @property
  def head_dim(self) -> int:
    return self.model.head_dim or self.model.d_model // self.model.num_heads

  @property
  def num_kv_heads(self) -> int:
    return self.model.num_kv_heads or self.model.num_heads

  @property
  def d_ff(self) -> int:
    if self.ffn.d_ff:
      return self.ffn.d_ff
    m = self.ffn.multiple_of
    return -(-int(8 * self.model.d_model / 3) // m) * m

  def padded_vocab(self, vocab_size: int | None = None) -> int:
    v = vocab_size or self.model.vocab_size
    m = self.model.vocab_multiple_of
    return -(-v // m) * m

  def layer_types(self) -> list[tuple[str, str]]:
    """(attention type, ffn type) for each layer."""
    n = self.model.num_layers
    attn = self.attention.pattern or (self.attention.type,)
    ffn = self.ffn.pattern or (self.ffn.type,)
    ffn_types = [("dense" if i < self.ffn.first_k_dense else ffn[i % len(ffn)])
                 for i in range(n)]
    for layer, name in parse_overrides(self.ffn.overrides):
      if layer < n:
        ffn_types[layer] = name
    return [(attn[i % len(attn)], ffn_types[i]) for i in range(n)]

  def to_dict(self) -> dict:
    out = {name: dataclasses.asdict(section) for name, section in self.sections().items()}
    out["name"] = self.name
    return out

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1, sort_keys=True)


def parse_overrides(entries: tuple[str, ...]) -> list[tuple[int, str]]:
  """``("4:memory",)`` -> ``[(4, "memory")]``, or a one-line ConfigError."""
  out = []
  for entry in entries:
    layer, sep, name = entry.partition(":")
    if not sep or not layer.strip().isdigit() or not name.strip():
      raise ConfigError(f"config.ffn.overrides: {entry!r} must look like '<layer>:<type>', "
                        "e.g. '4:memory'")
    out.append((int(layer), name.strip()))
  return out


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """``config.finetune``: which parameters a run trains (sparsejax/finetune/). With
  ``config.train.init_from`` it finetunes another run's weights; the modes work from scratch too.

  full           every parameter (the default; exactly the plain run)
  lora           rank-r adapters W + (alpha/r) A B on the matrices ``lora_targets`` names (layer
                 kinds attention / ffn, family names, or leaf names such as w_up_DxF); A ~ N(0,
                 1/fan_in), B = 0 (step 0 = the base model); base weights and buffers frozen;
                 adapters (and their AdamW state, main lr schedule) live in the optimizer state
  memory_values  only the memory value table(s) (memory.value_lr and its group's settings)
  sparse_memory  per batch only the ``top_t`` value rows this batch accessed with the highest
                 TF-IDF against ``background`` access statistics (Lin et al. 2025)
  """
  mode: str = field("full", "full", "lora", "memory_values", "sparse_memory", shapes=True)
  lora_rank: int = field(8, shapes=True)
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = field(("attention", "ffn"), shapes=True)
  top_t: int = 500               # sparse_memory: value rows updated per batch (per table)
  # sparse_memory: .npz from `python -m sparsejax.finetune.background`; "" = the
  # config.train.init_from run's WORKDIR/memory_background.npz
  background: str = ""


CORE_SECTIONS["finetune"] = FinetuneConfig
