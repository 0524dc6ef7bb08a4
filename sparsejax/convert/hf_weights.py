"""Tensor maps between Hugging Face checkpoints and sparsejax parameters, both ways.

A ``Rule`` ties one sparsejax leaf (``"blocks/0/attn/wq_DxHxK"``) to its HF tensor(s) and a
layout ``kind`` (HF ``nn.Linear`` weights are [out, in]; ours are [in, ..., out]):

  same    identical (embedding, norm scales)
  t       2-D transpose (lm_head, router, shared-expert gate, dense MLP projections)
  in      ours [D, N, Dh]   <-> HF [N*Dh, D]    (q / k / v projections)
  out     ours [H, Dh, D]   <-> HF [D, H*Dh]    (o projection)
  bias    ours [N, Dh]      <-> HF [N*Dh]       (q / k / v biases)
  experts ours [E, a, b]    <-> E HF tensors [b, a], one per expert (the layout transformers
                                5.x's save_pretrained writes: ``experts.J.w1.weight`` ...)
  fused   ours [E, a, b]    <- HF [E, b', a] rows [lo, hi) (``experts.gate_up_proj`` [E, 2F, D]
                                and ``experts.down_proj`` [E, D, F]: the layout 5.x modules hold
                                in memory; import only)
  absent  no parameter      <-> HF zeros of ``shape`` (Qwen2-MoE without shared experts still has
                                a 0-wide shared MLP and its gate; optional on import)

Import reads every leaf lazily (``st_io.Lazy``: a device's slice only); export turns host numpy
arrays into HF tensors exactly (transposes and reshapes, no arithmetic), except a shared expert
without sparsejax's sigmoid gate, which exports to Qwen2-MoE as gate weights 0 (sigmoid = 1/2)
and twice its down projection — exact in floating point.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import jax
import numpy as np

from sparsejax.config import Config
from sparsejax.convert.st_io import Lazy, Reader
from sparsejax.layers.moe_config import sizes

# transformers < 4.38 stored RoPE tables as buffers; nothing in them is a weight
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Rule:
  path: str                 # sparsejax leaf, "/"-joined
  names: tuple[str, ...]    # HF tensor(s): one, or one per expert ("experts")
  kind: str
  rows: tuple[int, int] | None = None  # "fused": the HF row range of this leaf
  shape: tuple[int, ...] = ()           # "absent": the HF tensor's shape


def _attention(cfg: Config, i: int) -> list[Rule]:
  p, o = f"model.layers.{i}.self_attn.", f"blocks/{i}/attn/"
  rules = [Rule(o + "wq_DxHxK", (p + "q_proj.weight",), "in"),
           Rule(o + "wk_DxKxH", (p + "k_proj.weight",), "in"),
           Rule(o + "wv_DxKxH", (p + "v_proj.weight",), "in"),
           Rule(o + "wo_HxKxD", (p + "o_proj.weight",), "out")]
  if cfg.attention.qkv_bias:
    rules += [Rule(o + "q_bias_HxK", (p + "q_proj.bias",), "bias"),
              Rule(o + "k_bias_KxH", (p + "k_proj.bias",), "bias"),
              Rule(o + "v_bias_KxH", (p + "v_proj.bias",), "bias")]
  if cfg.attention.qk_norm:
    rules += [Rule(o + "q_norm/scale", (p + "q_norm.weight",), "same"),
              Rule(o + "k_norm/scale", (p + "k_norm.weight",), "same")]
  return rules


def _dense_mlp(prefix: str, ours: str, gate: str, up: str, down: str) -> list[Rule]:
  return [Rule(ours + gate, (prefix + "gate_proj.weight",), "t"),
          Rule(ours + up, (prefix + "up_proj.weight",), "t"),
          Rule(ours + down, (prefix + "down_proj.weight",), "t")]


def _moe(cfg: Config, arch: str, i: int, num_experts: int, width: int,
         names: set[str] | None) -> list[Rule]:
  """MoE rules of layer i; ``names`` (import) picks the layout present in the checkpoint."""
  layer, o = f"model.layers.{i}.", f"blocks/{i}/ffn/"
  moe = "mlp."
  if arch == "mixtral" and (names is None or f"{layer}block_sparse_moe.gate.weight" in names):
    moe = "block_sparse_moe."
  p = layer + moe
  rules = [Rule(o + "router_DxE", (p + "gate.weight",), "t")]
  if names is not None and p + "experts.gate_up_proj" in names:
    fused = p + "experts.gate_up_proj", p + "experts.down_proj"
    rules += [Rule(o + "w_gate_ExDxF", fused[:1], "fused", (0, width)),
              Rule(o + "w_up_ExDxF", fused[:1], "fused", (width, 2 * width)),
              Rule(o + "w_down_ExFxD", fused[1:], "fused", None)]
  else:
    keys = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for leaf, key in zip(("w_gate_ExDxF", "w_up_ExDxF", "w_down_ExFxD"), keys):
      rules.append(Rule(o + leaf, tuple(f"{p}experts.{j}.{key}.weight"
                                        for j in range(num_experts)), "experts"))
  if cfg.moe.num_shared_experts:
    rules += _dense_mlp(p + "shared_expert.", o, "shared_gate_DxS", "shared_up_DxS",
                        "shared_down_SxD")
    rules.append(Rule(o + "shared_expert_gate_Dx1", (p + "shared_expert_gate.weight",), "t"))
  elif arch == "qwen2_moe":
    d = cfg.model.d_model
    rules += [Rule("", (f"{p}shared_expert.{k}_proj.weight",), "absent", shape=s)
              for k, s in (("gate", (0, d)), ("up", (0, d)), ("down", (d, 0)))]
    rules.append(Rule("", (p + "shared_expert_gate.weight",), "absent", shape=(1, d)))
  return rules


def rules(cfg: Config, arch: str, num_experts: int = 0, width: int = 0,
          names: set[str] | None = None) -> list[Rule]:
  """Every tensor of the model, in HF order (embedding, layers, norm, head)."""
  out = [Rule("embed_VxD", ("model.embed_tokens.weight",), "same")]
  for i, (_, ffn) in enumerate(cfg.layer_types()):
    o = f"blocks/{i}/"
    out.append(Rule(o + "attn_norm/scale", (f"model.layers.{i}.input_layernorm.weight",), "same"))
    out += _attention(cfg, i)
    out.append(Rule(o + "ffn_norm/scale",
                    (f"model.layers.{i}.post_attention_layernorm.weight",), "same"))
    if ffn == "moe":
      out += _moe(cfg, arch, i, num_experts, width, names)
    else:
      out += _dense_mlp(f"model.layers.{i}.mlp.", o + "ffn/", "w_gate_DxF", "w_up_DxF",
                        "w_down_FxD")
  out.append(Rule("final_norm/scale", ("model.norm.weight",), "same"))
  if not cfg.model.tie_embeddings:
    out.append(Rule("head_DxV", ("lm_head.weight",), "t"))
  return out


# ---------------------------------------------------------------------------------------------
# import


def _hf_shape(rule: Rule, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The HF tensor shape a leaf of ``shape`` needs (per expert for "experts")."""
  k = rule.kind
  if k == "same":
    return shape
  if k == "t":
    return shape[::-1]
  if k == "experts":
    return (shape[2], shape[1])
  if k == "in":
    return (shape[1] * shape[2], shape[0])
  if k == "out":
    return (shape[2], shape[0] * shape[1])
  return (shape[0] * shape[1],)  # bias


def _fetch(reader: Reader, rule: Rule, shape: tuple[int, ...]):
  """bounds (one (start, stop) per sparsejax axis) -> that slice, read from the HF tensor(s)."""
  name, k = rule.names[0], rule.kind
  if k == "same":
    return lambda b: reader.read(name, tuple(slice(*x) for x in b))
  if k == "t":
    return lambda b: reader.read(name, (slice(*b[1]), slice(*b[0]))).T
  if k == "in":  # ours [D, N, Dh] from HF [N*Dh, D]
    dh = shape[2]

    def read_in(b):
      (d0, d1), (n0, n1), (k0, k1) = b
      x = reader.read(name, (slice(n0 * dh, n1 * dh), slice(d0, d1)))
      return x.reshape(n1 - n0, dh, d1 - d0)[:, k0:k1, :].transpose(2, 0, 1)
    return read_in
  if k == "out":  # ours [H, Dh, D] from HF [D, H*Dh]
    dh = shape[1]

    def read_out(b):
      (n0, n1), (k0, k1), (d0, d1) = b
      x = reader.read(name, (slice(d0, d1), slice(n0 * dh, n1 * dh)))
      return x.reshape(d1 - d0, n1 - n0, dh)[:, :, k0:k1].transpose(1, 2, 0)
    return read_out
  if k == "bias":
    dh = shape[1]
    return lambda b: reader.read(name, (slice(b[0][0] * dh, b[0][1] * dh),)).reshape(
        b[0][1] - b[0][0], dh)[:, b[1][0]:b[1][1]]
  if k == "experts":
    return lambda b: np.stack([reader.read(rule.names[e], (slice(*b[2]), slice(*b[1]))).T
                               for e in range(*b[0])])
  lo = rule.rows[0] if rule.rows else 0  # fused: HF [E, rows, a] -> ours [E, a, rows]
  return lambda b: reader.read(name, (slice(*b[0]), slice(lo + b[2][0], lo + b[2][1]),
                                      slice(*b[1]))).transpose(0, 2, 1)


def _check_fused(reader: Reader, rule: Rule, shape: tuple[int, ...]) -> None:
  got = reader.shape(rule.names[0])
  e, a, b = shape
  want = (e, 2 * b, a) if rule.rows else (e, b, a)
  if got != want:
    raise ValueError(f"HF tensor {rule.names[0]} has shape {got}; the config implies {want}")


def import_tree(reader: Reader, cfg: Config, arch: str, abstract_params: dict) -> dict:
  """Lazy views of the HF tensors in ``abstract_params``' structure (for
  ``init_from.host_to_device``); one line naming the first tensor that is missing, misshaped or
  left over (a field this mapping does not implement)."""
  flat = {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(x.shape)
          for p, x in jax.tree_util.tree_leaves_with_path(abstract_params)}
  moe_shape = next((s for k, s in flat.items() if k.endswith("ffn/w_gate_ExDxF")), (0, 0, 0))
  names = reader.names()
  views, used = {}, set()
  for rule in rules(cfg, arch, moe_shape[0], moe_shape[2], names):
    if rule.kind == "absent":
      used.update(rule.names)
      continue
    if rule.path not in flat:
      raise ValueError(f"no sparsejax parameter {rule.path} for HF {rule.names[0]}")
    shape = flat[rule.path]
    for name in rule.names:
      if name not in names:
        raise ValueError(f"HF checkpoint has no tensor {name} (needed for {rule.path})")
    if rule.kind == "fused":
      _check_fused(reader, rule, shape)
    else:
      want = _hf_shape(rule, shape)
      for name in rule.names:
        if reader.shape(name) != want:
          raise ValueError(f"HF tensor {name} has shape {reader.shape(name)}; the config "
                           f"implies {want} for {rule.path}")
    used.update(rule.names)
    views[rule.path] = Lazy(shape, reader.dtype(rule.names[0]), _fetch(reader, rule, shape))
  extra = sorted(n for n in names - used if not n.endswith(_IGNORED_SUFFIXES)
                 and not (cfg.model.tie_embeddings and n == "lm_head.weight"))
  if extra:
    raise ValueError(f"HF tensor {extra[0]} has no sparsejax parameter ({len(extra)} unmapped; "
                     "its config field is not implemented by the converter)")
  missing = sorted(set(flat) - set(views))
  if missing:
    raise ValueError(f"sparsejax parameter {missing[0]} has no HF tensor")
  return jax.tree_util.tree_map_with_path(
      lambda p, _: views[jax.tree_util.keystr(p, simple=True, separator="/")], abstract_params)


# ---------------------------------------------------------------------------------------------
# export


def _to_hf(rule: Rule, x: np.ndarray) -> list[np.ndarray]:
  k = rule.kind
  if k == "same":
    return [x]
  if k == "t":
    return [x.T]
  if k == "in":
    return [x.reshape(x.shape[0], -1).T]
  if k == "out":
    return [x.reshape(-1, x.shape[2]).T]
  if k == "bias":
    return [x.reshape(-1)]
  if k == "experts":
    return [x[e].T for e in range(x.shape[0])]
  raise ValueError(f"rule kind {k!r} is import-only")


def check_all_mapped(cfg: Config, arch: str, paths) -> None:
  """Every sparsejax parameter has an HF tensor, except training-only ones (the noisy router's
  noise projection: its inference router is the plain one); one line otherwise."""
  e, _, w = sizes(cfg) if "moe" in [f for _, f in cfg.layer_types()] else (0, 0, 0)
  mapped = {r.path for r in rules(cfg, arch, e, w)}
  left = sorted(p for p in paths if p not in mapped and not p.endswith("/noise_DxE"))
  if left:
    raise ValueError(f"parameter {left[0]} has no {arch} tensor ({len(left)} unmapped): this "
                     "model has no exact Hugging Face equivalent")


def export_tensors(cfg: Config, arch: str, get) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, array) for every tensor; ``get(path)`` returns one sparsejax leaf as numpy (so
  only one leaf at a time need be on the host). A shared expert without sparsejax's gate gets
  Qwen2-MoE's gate as zeros and twice the down projection (module docstring)."""
  e, _, w = sizes(cfg) if "moe" in [f for _, f in cfg.layer_types()] else (0, 0, 0)
  for rule in rules(cfg, arch, e, w):
    if rule.kind == "absent":
      yield rule.names[0], np.zeros(rule.shape, np.float32)
      continue
    leaf = rule.path.rsplit("/", 1)[-1]
    if leaf == "shared_expert_gate_Dx1" and not cfg.moe.shared_expert_gate:
      down = get(rule.path.replace(leaf, "shared_down_SxD"))
      yield rule.names[0], np.zeros((1, down.shape[1]), down.dtype)
      continue
    x = np.asarray(get(rule.path))
    if leaf == "shared_down_SxD" and not cfg.moe.shared_expert_gate:
      x = x * np.asarray(2, x.dtype)
    for name, t in zip(rule.names, _to_hf(rule, x)):
      yield name, np.ascontiguousarray(t)
