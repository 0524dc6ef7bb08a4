r"""Mixture-of-Experts decoder (token-choice top-k, SwiGLU experts; see sparsejax/layers/moe.py).

Same shapes as configs/dense.py; every FFN is "moe" (mix with --config.ffn.pattern=dense,moe or
--config.ffn.first_k_dense=1). Presets (``--config configs/moe.py:<preset>``):

  tiny   dense tiny dims (d=64, L=2), 8 experts of d_ff=192, top-2, capacity factor 1.25,
         float32 compute: CPU tests.
         python -m sparsejax.train --config configs/moe.py:tiny --workdir runs/moe-tiny \
             --config.train.steps=60
         Measured on 2 CPU cores, 60 steps (as tests/test_moe.py), vs dense tiny run the same way:
           moe-tiny   640k params, 198k active, 1.23 MFLOP/token, ~34 ms/step, val loss 3.47
           dense-tiny 123k params, 123k active, 0.79 MFLOP/token, ~17 ms/step, val loss 3.46
         (top-2 of 8 full-size experts: 2x the dense FFN FLOPs; no gain at 60 steps.)
  125m   dense 125m shape (d=768, L=12); fine-grained (Krajewski et al. 2024): base 16 experts
         of d_ff=2048, top-1, at granularity 4 -> 64 experts of width 512, top-4: active expert
         hidden 4*512 = 2048 = dense d_ff, so active FLOPs match dense 125m (+ a 768x64 router
         per layer); ~8x the FFN parameters. (num_experts / top_k / d_expert are the G=1 values;
         the layer multiplies E and k by G.)
  350m   dense 350m shape (d=1024, L=24); DeepSeekMoE-style: 64 experts of d_expert=688, 1 shared
         expert of 688 + top-3 routed: active 4*688 = 2752 = dense d_ff. Written at granularity 1
         with an explicit d_expert: shared experts keep the G=1 width under granularity, so a
         shared expert one quarter of a base expert cannot be written as G=4.
         python -m sparsejax.train --config configs/moe.py:125m --workdir runs/moe-125m
         Totals: 125m 960M params / 111M active; 350m 3.4B / 339M active (dense: 110M, 337M).
         Not yet measured on GPU. GPU presets: bf16 compute, capacity dispatch (ragged_dot is
         slow on GPU at jax 0.11), load-balance 0.01, router z-loss 1e-3.
         Add --config.mesh.expert=<n> for expert parallelism on n devices (n | the layer's
         routed experts, num_experts * granularity).
  mixtral_8x7b
         Mixtral-8x7B shape (Jiang et al. 2024, arXiv 2401.04088, Table 1; Mixtral-8x7B-v0.1
         config.json): configs/dense.py:8b's d=4096, L=32, H=32, 8 KV heads, with 8 experts of
         d_ff=14336 per layer, top-2 (renormalised), vocabulary 32000 (untied), RoPE theta 1e6:
         46.7B parameters and 12.9B active per token as published (sparsejax.info: 46.70B,
         12.75B active + the 0.13B input embedding the paper counts). Sequence 4096 (the model's
         context is 32768; its training length is not published), remat="full",
         model.loss_chunk=1024, scanned layers (as dense 8b). Capacity dispatch (factor 1.25): expert parallelism
         (mesh.preset=fsdp_ep) needs it, and dropless ragged_dot is slow on GPU at jax 0.11.
  qwen_moe_a2.7b
         Qwen1.5-MoE-A2.7B shape (Qwen1.5-MoE-A2.7B config.json and model card): d=2048, L=24,
         H=16 (MHA), q/k/v biases, 60 experts of 1408, top-4 (not renormalised), a shared
         expert of 5632 = 4 x 1408 behind a sigmoid gate, vocabulary 151936 (untied), RoPE theta
         1e6: 14.3B parameters and 2.7B active as published (sparsejax.info: 14.32B, 2.38B
         active + the 0.31B input embedding the model card counts). Sequence 4096, remat="full",
         model.loss_chunk=1024, capacity dispatch as mixtral_8x7b.
         python -m sparsejax.compile_check --config configs/moe.py:mixtral_8x7b --target v5p-256 \
             --config.mesh.preset=fsdp_ep --find_max_batch

Options: --config.moe.router=noisy_token_choice | expert_choice (non-causal!) | hash
(MultiHash: --config.moe.num_hashes=h --config.moe.top_k=h, hash_type=balanced),
--config.moe.granularity=G (E*G experts of width / G, top k*G), --config.moe.bias_balancing=True,
--config.moe.dispatch=dropless, --config.moe.score_fn=sigmoid, --config.moe.num_shared_experts=1
(all fields: MoEConfig in sparsejax/layers/moe.py).
"""

import pathlib

import ml_collections

from sparsejax.configure import load_config_dict, with_defaults

_DENSE = pathlib.Path(__file__).with_name("dense.py")

_MOE = {
    # preset: (num_experts, granularity, top_k, num_shared_experts, d_expert): base (G=1) values
    "tiny": (8, 1, 2, 0, 0),
    "125m": (16, 4, 1, 0, 0),    # the layer: 64 experts of 2048 / 4 = 512, top-4
    "350m": (64, 1, 3, 1, 688),  # 64 experts of 688, top-3 + 1 shared of 688
}


# Published MoE shapes (docstring): dense base preset, then overrides of the model / attention /
# data sections and config.moe. Both: remat "full", chunked loss, the GPU presets' MoE settings.
_PUBLISHED = {
    "mixtral_8x7b": ("8b", dict(vocab_size=32000), dict(rope_theta=1e6),
                     dict(num_experts=8, top_k=2, d_expert=14336)),
    "qwen_moe_a2.7b": ("1.3b", dict(vocab_size=151936, num_heads=16, num_kv_heads=16,
                                    tie_embeddings=False, remat="full", loss_chunk=1024,
                                    scan_layers=True),
                       dict(rope_theta=1e6, qkv_bias=True),
                       dict(num_experts=60, top_k=4, d_expert=1408, num_shared_experts=4,
                            shared_expert_gate=True, renormalize=False)),
}


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  if preset in _PUBLISHED:
    return _published(preset)
  if preset not in _MOE:
    raise ValueError(f"configs/moe.py: unknown preset {preset!r}; choose one of "
                     f"{', '.join([*_MOE, *_PUBLISHED])}")
  c = load_config_dict(f"{_DENSE}:{preset}")
  e, g, k, s, f = _MOE[preset]
  c.ffn.type = "moe"
  c.moe.update(num_experts=e, granularity=g, top_k=k, num_shared_experts=s, d_expert=f)
  c.name = f"moe-{preset}"
  return with_defaults(c)


def _published(preset: str) -> ml_collections.ConfigDict:
  base, model, attention, moe = _PUBLISHED[preset]
  c = load_config_dict(f"{_DENSE}:{base}")
  c.model.update(**model)
  c.attention.update(**attention)
  c.data.update(seq_len=4096, global_batch_size=1024)
  c.ffn.type = "moe"
  c.moe.update(**moe)
  c.name = f"moe-{preset}"
  return with_defaults(c)
