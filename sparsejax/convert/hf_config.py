"""Hugging Face ``config.json`` <-> sparsejax ``Config``, both ways, for the decoder families the
model options cover (checked against transformers 5.x modeling code):

  llama      LlamaForCausalLM    dense GQA + RoPE + SwiGLU (no biases)
  mistral    MistralForCausalLM  + ``sliding_window`` on every layer
  qwen2      Qwen2ForCausalLM    + q / k / v biases (``attention.qkv_bias``), per-layer sliding
                                 window (``use_sliding_window`` / ``layer_types``)
  qwen3      Qwen3ForCausalLM    + QK-norm (``attention.qk_norm``), no biases
  mixtral    MixtralForCausalLM  MoE: softmax over all experts, top-k, renormalised
  qwen2_moe  Qwen2MoeForCausalLM MoE + shared expert with a sigmoid gate
                                 (``moe.shared_expert_gate``), ``norm_topk_prob`` ->
                                 ``moe.renormalize``, dense layers from ``mlp_only_layers`` /
                                 ``decoder_sparse_step`` -> ``ffn.pattern``

Conventions. HF's sliding window W lets a query see keys ``q - W < kv <= q`` (transformers'
``sliding_window_overlay``): that is the block-sparse mask ``causal&window:{W-1}`` on the windowed
layers (``attention.type`` / ``attention.pattern`` ``block_sparse``). The vocabulary is exact
(``model.vocab_multiple_of=1``); MoE layers dispatch dropless so nothing is dropped. A field this
mapping does not implement (``rope_scaling``, an ``o_proj`` bias, ...) is refused with one
``ConfigError`` line naming it; fields that only matter for training in HF (dropout, router
jitter) are ignored.
"""

from __future__ import annotations

from typing import Any

from kernels_pallas.block_sparse_attention.masks import parse_mask
from kernels_pallas.block_sparse_attention.masks.base import And
from kernels_pallas.block_sparse_attention.masks.primitives import Causal, SlidingWindow
from sparsejax import configure
from sparsejax.config import Config
from sparsejax.errors import ConfigError
from sparsejax.layers import moe_config

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
MOE_ARCHS = ("mixtral", "qwen2_moe")
_DEFAULT_THETA = {"mixtral": 1e6}  # rope_theta when config.json has none (else 10000)
# HF hidden_act -> config.ffn.activation with the same formula act(gate) * up
_ACT_FROM_HF = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu",
                "gelu_new": "geglu", "relu": "relu", "relu2": "relu2"}
_ACT_TO_HF = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh", "relu": "relu", "relu2": "relu2"}


def arch_of(hf: dict) -> str:
  """The model_type of a config.json (or of its ``architectures`` entry); one line if unknown."""
  by_class = {v: k for k, v in ARCHITECTURES.items()}
  kind = hf.get("model_type") or by_class.get((hf.get("architectures") or [""])[0], "")
  if kind not in ARCHITECTURES:
    raise ConfigError(f"config.json: model_type {kind!r} is not supported; convertible: "
                      f"{', '.join(ARCHITECTURES)}")
  return kind


def _refuse(arch: str, key: str, value, why: str) -> ConfigError:
  return ConfigError(f"{arch} config.json: {key}={value!r} is not supported ({why})")


def _rope_theta(hf: dict, arch: str) -> float:
  """rope_parameters (5.x) or legacy rope_theta / rope_scaling; only plain RoPE is implemented."""
  if hf.get("rope_scaling"):
    raise _refuse(arch, "rope_scaling", hf["rope_scaling"], "only plain RoPE is implemented")
  params = hf.get("rope_parameters") or {}
  if params and all(isinstance(v, dict) for v in params.values()):  # per layer type
    kinds = {(v.get("rope_type", "default"), v.get("rope_theta")) for v in params.values()}
    if len(kinds) != 1:
      raise _refuse(arch, "rope_parameters", params, "per-layer-type RoPE must be one setting")
    params = next(iter(params.values()))
  if params.get("rope_type", "default") != "default":
    raise _refuse(arch, "rope_parameters.rope_type", params["rope_type"],
                  "only plain RoPE is implemented")
  partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial not in (None, 1, 1.0):
    raise _refuse(arch, "partial_rotary_factor", partial, "RoPE rotates the whole head")
  theta = params.get("rope_theta", hf.get("rope_theta"))
  return float(_DEFAULT_THETA.get(arch, 1e4) if theta is None else theta)


def _windows(hf: dict, arch: str, n: int) -> tuple[list[bool], int]:
  """(windowed per layer, HF window W) from sliding_window / use_sliding_window / layer_types."""
  if arch in ("mistral", "mixtral"):
    w = hf.get("sliding_window")
    return [bool(w)] * n, int(w or 0)
  w = hf.get("sliding_window") if hf.get("use_sliding_window") else None
  types = hf.get("layer_types")
  if types is None:  # transformers' default when config.json predates layer_types
    start = hf.get("max_window_layers", 28)
    if arch == "qwen2_moe":
      types = ["sliding_attention" if (i + 1) % 2 and i < start and w else "full_attention"
               for i in range(n)]
    else:
      types = ["sliding_attention" if w and i >= start else "full_attention" for i in range(n)]
  if len(types) != n or set(types) - {"full_attention", "sliding_attention"}:
    raise _refuse(arch, "layer_types", types, "full_attention / sliding_attention per layer")
  windowed = [t == "sliding_attention" for t in types]
  if any(windowed) and not w:
    raise _refuse(arch, "layer_types", types, "sliding layers need use_sliding_window and "
                  "sliding_window > 0")
  return windowed, int(w or 0)


def _moe_section(hf: dict, arch: str, n: int) -> tuple[dict, dict]:
  """(the ffn section, the moe section) of a Mixtral / Qwen2-MoE config."""
  if arch == "mixtral":
    e, k, f = hf["num_local_experts"], hf["num_experts_per_tok"], hf["intermediate_size"]
    moe_layers = list(range(n))
    moe = {"renormalize": True}
  else:
    e, k, f = hf["num_experts"], hf["num_experts_per_tok"], hf["moe_intermediate_size"]
    step, only = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
    moe_layers = [i for i in range(n) if i not in only and e > 0 and (i + 1) % step == 0]
    shared = hf.get("shared_expert_intermediate_size", 0)
    if shared % f:
      raise _refuse(arch, "shared_expert_intermediate_size", shared,
                    f"shared experts here are whole experts: a multiple of "
                    f"moe_intermediate_size={f}")
    moe = {"renormalize": bool(hf.get("norm_topk_prob", False)),
           "num_shared_experts": shared // f, "shared_expert_gate": shared > 0}
  # Switch load balance E * sum_e f_e P_e is the same loss form as HF's
  # load_balancing_loss_func, but HF counts top-k slots per token (K x our f_e) and pools f and
  # P over all layers into one loss, where we sum one loss per layer: uniform routing gives
  # coef * K in HF and coef_ours * L here, so coef_ours = coef * K / L (exact per layer when
  # every layer routes alike).
  coef = float(hf.get("router_aux_loss_coef", 0.0)) * k / max(len(moe_layers), 1)
  moe.update(num_experts=e, top_k=k, d_expert=f, dispatch="dropless", impl="xla",
             load_balance_loss=coef, router_z_loss=0.0)
  kinds = tuple("moe" if i in moe_layers else "dense" for i in range(n))
  ffn = {"type": "moe"} if all(x == "moe" for x in kinds) else (
      {"type": "dense"} if not moe_layers else {"pattern": kinds})
  return ffn, moe


def config_from_hf(hf: dict, *, compute_dtype: str = "float32",
                   data: dict | None = None) -> Config:
  """The validated sparsejax Config of a HF config.json dict (``data``: the data section)."""
  arch = arch_of(hf)
  n, d, heads = hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"]
  act = hf.get("hidden_act", "silu")
  if act not in _ACT_FROM_HF:
    raise _refuse(arch, "hidden_act", act, f"gated activations with an exact equivalent: "
                  f"{', '.join(_ACT_FROM_HF)}")
  if hf.get("mlp_bias"):
    raise _refuse(arch, "mlp_bias", True, "the MLP has no biases here")
  if hf.get("attention_bias"):
    raise _refuse(arch, "attention_bias", True, "it includes an o_proj bias; only q / k / v "
                  "biases (Qwen2) are implemented")
  qkv_bias = arch == "qwen2" or (arch == "qwen2_moe" and hf.get("qkv_bias", True))
  windowed, w = _windows(hf, arch, n)
  attention: dict[str, Any] = {"rope_theta": _rope_theta(hf, arch), "qk_norm": arch == "qwen3",
                               "qkv_bias": bool(qkv_bias)}
  if any(windowed):
    attention["mask"] = f"causal&window:{w - 1}"
    if all(windowed):
      attention["type"] = "block_sparse"
    else:
      attention["pattern"] = tuple("block_sparse" if x else "dense" for x in windowed)
  model = {"vocab_size": hf["vocab_size"], "vocab_multiple_of": 1, "d_model": d,
           "num_layers": n, "num_heads": heads,
           "num_kv_heads": hf.get("num_key_value_heads") or heads,
           "head_dim": hf.get("head_dim") or d // heads,
           "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
           "norm_eps": float(hf.get("rms_norm_eps", 1e-6)), "param_dtype": "float32",
           "compute_dtype": compute_dtype, "z_loss": 0.0}
  sections: dict[str, Any] = {"name": f"hf-{arch}", "model": model, "attention": attention,
                              "ffn": {"activation": _ACT_FROM_HF[act],
                                      "d_ff": hf["intermediate_size"]}}
  if arch in MOE_ARCHS:
    ffn, sections["moe"] = _moe_section(hf, arch, n)
    sections["ffn"].update(ffn)
  if data:
    sections["data"] = dict(data)
  return configure.validate(sections)


# ---------------------------------------------------------------------------------------------
# export


def window_of(cfg: Config) -> int | None:
  """HF sliding window W of the block-sparse layers' mask: ``causal&window:L`` -> L + 1, plain
  ``causal`` -> None (full attention); any other mask has no HF equivalent (one line)."""
  mask = parse_mask(cfg.attention.mask)
  parts = mask.masks if isinstance(mask, And) else (mask,)
  if not all(isinstance(p, Causal) or (isinstance(p, SlidingWindow) and p.right == 0)
             for p in parts):
    raise ConfigError(f"config.attention.mask={cfg.attention.mask!r}: block-sparse attention "
                      "has no Hugging Face equivalent (only a causal sliding window exports)")
  lefts = [p.left for p in parts if isinstance(p, SlidingWindow)]
  return min(lefts) + 1 if lefts else None


def _check_exportable(cfg: Config) -> None:
  for attn, ffn in cfg.layer_types():
    if attn not in ("dense", "block_sparse") or ffn not in ("dense", "moe"):
      kind = attn if attn not in ("dense", "block_sparse") else ffn
      raise ConfigError(f"layer type {kind!r} has no Hugging Face equivalent (memory / PEER / "
                        "other families do not export); dense, sliding-window and MoE do")
  if cfg.ffn.activation not in _ACT_TO_HF or cfg.ffn.activation_topk:
    raise ConfigError(f"config.ffn.activation={cfg.ffn.activation!r} (activation_topk="
                      f"{cfg.ffn.activation_topk}) has no Hugging Face equivalent")
  if cfg.attention.qk_norm and cfg.attention.qkv_bias:
    raise ConfigError("qk_norm with qkv_bias has no Hugging Face equivalent (Qwen3's "
                      "attention_bias also biases o_proj)")


def _moe_arch(cfg: Config, kinds: list[str]) -> str:
  m = cfg.moe
  if m.router not in ("token_choice", "noisy_token_choice") or m.score_fn != "softmax" \
      or m.bias_balancing:
    raise ConfigError(f"config.moe: router={m.router!r} score_fn={m.score_fn!r} bias_balancing="
                      f"{m.bias_balancing} has no Hugging Face equivalent (softmax token "
                      "choice exports; noisy_token_choice as its noise-free inference router)")
  if cfg.attention.qk_norm:
    raise ConfigError("qk_norm MoE models have no exporter (Mixtral / Qwen2-MoE have no QK-norm)")
  plain = (all(k == "moe" for k in kinds) and not m.num_shared_experts and m.renormalize
           and not cfg.attention.qkv_bias)
  return "mixtral" if plain else "qwen2_moe"


def hf_from_config(cfg: Config, vocab_rows: int, eos_id: int | None = None) -> dict:
  """The HF config.json dict of a validated Config whose embedding has ``vocab_rows`` rows; one
  ``ConfigError`` line when the model has no HF equivalent."""
  _check_exportable(cfg)
  types = cfg.layer_types()
  windowed = [a == "block_sparse" for a, _ in types]
  w = window_of(cfg) if any(windowed) else None
  windowed = [x and w is not None for x in windowed]
  kinds = [f for _, f in types]
  if "moe" in kinds:
    arch = _moe_arch(cfg, kinds)
  elif cfg.attention.qk_norm:
    arch = "qwen3"
  elif cfg.attention.qkv_bias:
    arch = "qwen2"
  else:
    arch = "mistral" if any(windowed) else "llama"
  if arch in ("mistral", "mixtral") and any(windowed) and not all(windowed):
    raise ConfigError(f"a sliding window on some layers only ({windowed}) has no {arch} "
                      "equivalent; window every layer, or add qkv_bias / qk_norm (Qwen2 / Qwen3 "
                      "take per-layer windows)")
  m = cfg.model
  hf: dict[str, Any] = {
      "architectures": [ARCHITECTURES[arch]], "model_type": arch, "vocab_size": vocab_rows,
      "hidden_size": m.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": m.num_layers,
      "num_attention_heads": m.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": _ACT_TO_HF[cfg.ffn.activation],
      "rms_norm_eps": m.norm_eps, "tie_word_embeddings": m.tie_embeddings,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.attention.rope_theta},
      "max_position_embeddings": cfg.data.seq_len, "attention_dropout": 0.0,
      "dtype": m.param_dtype, "use_cache": True, "eos_token_id": eos_id}
  if arch in ("llama", "qwen3"):
    hf.update(attention_bias=False)
  if arch == "llama":
    hf.update(mlp_bias=False)
  if arch in ("mistral", "mixtral"):
    hf["sliding_window"] = w if any(windowed) else None
  if arch in ("qwen2", "qwen3", "qwen2_moe"):
    unused = 0 if arch == "qwen2_moe" else None  # what transformers writes for "no window"
    hf.update(use_sliding_window=any(windowed), sliding_window=w if any(windowed) else unused,
              max_window_layers=m.num_layers,
              layer_types=["sliding_attention" if x else "full_attention" for x in windowed])
  if arch in MOE_ARCHS:
    e, k, f = moe_config.sizes(cfg)
    n_moe = kinds.count("moe")
    hf.update(num_experts_per_tok=k, output_router_logits=False,
              router_aux_loss_coef=cfg.moe.load_balance_loss * n_moe / k)  # see _moe_section
    if arch == "mixtral":
      hf.update(num_local_experts=e, intermediate_size=f, router_jitter_noise=0.0)
    else:
      hf.update(num_experts=e, moe_intermediate_size=f, norm_topk_prob=cfg.moe.renormalize,
                shared_expert_intermediate_size=(cfg.moe.num_shared_experts
                                                 * moe_config.base_width(cfg)),
                decoder_sparse_step=1, qkv_bias=cfg.attention.qkv_bias,
                mlp_only_layers=[i for i, kind in enumerate(kinds) if kind == "dense"])
  return hf
