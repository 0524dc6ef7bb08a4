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


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  if preset not in _MOE:
    raise ValueError(f"configs/moe.py: unknown preset {preset!r}; choose one of "
                     f"{', '.join(_MOE)}")
  c = load_config_dict(f"{_DENSE}:{preset}")
  e, g, k, s, f = _MOE[preset]
  c.ffn.type = "moe"
  c.moe.update(num_experts=e, granularity=g, top_k=k, num_shared_experts=s, d_expert=f)
  c.name = f"moe-{preset}"
  return with_defaults(c)
