r"""PEER: a dense transformer whose FFNs are PEER layers ("Mixture of A Million Experts").

Presets (``--config configs/peer.py:<preset>``):

  tiny   dense tiny (2 layers, d=64) with PEER FFNs: N = 32² experts, h=2 heads, k=4, d_key 32,
         float32 compute. CPU tests.
         python -m sparsejax.train --config configs/peer.py:tiny --workdir runs/peer-tiny
  125m   GPT-3 Small width (d=768, H=12) with PEER in every layer and the paper's retrieval
         setting: N = 1024² experts, h=8 heads, k=16, d_key 128, heads share the product keys.
         A PEER layer costs fewer FLOPs than the SwiGLU FFN it replaces (see
         PEER.active_params_per_token), so the depth is chosen to match configs/dense.py:125m
         in training FLOPs per token at seq 2048 (python -m sparsejax.info, vocab 32768):
         17 layers -> 773 MFLOP/token vs dense-125m 774 (100%, query whitening included);
         27.5B total parameters (1.6B per PEER layer), 102.0M active per token.
         python -m sparsejax.train --config configs/peer.py:125m --workdir runs/peer-125m
  350m   dense-350m shape (d=1024, L=24), PEER in every layer, N = 1024², h=32, k=16:
         1.06x dense-350m training FLOPs per token; 51.8B total, 361M active parameters.
  760m   dense-760m shape (d=1536, L=24), N = 1024², h=32, k=64: 0.94x dense-760m FLOPs;
         77.7B total, 679M active parameters. (A 1.3b match would need h*k beyond the paper's
         regime at this depth; not provided.)

Any field can be overridden: --config.peer.top_k=8 --config.peer.score=relu ...
"""

import pathlib

from sparsejax.configure import load_config_dict, with_defaults

_DENSE = pathlib.Path(__file__).with_name("dense.py")


def get_config(preset: str = "tiny"):
  if preset == "tiny":
    c = load_config_dict(f"{_DENSE}:tiny")
    c.peer.update(num_experts=32 ** 2, num_heads=2, top_k=4, d_key=32)
  elif preset == "125m":
    c = load_config_dict(f"{_DENSE}:125m")
    c.model.num_layers = PAPER_LAYERS
    c.peer.update(num_experts=1024 ** 2, num_heads=8, top_k=16, d_key=128, shared_keys=True)
  elif preset in _WIDE:
    heads, top_k = _WIDE[preset]
    c = load_config_dict(f"{_DENSE}:{preset}")
    c.peer.update(num_experts=1024 ** 2, num_heads=heads, top_k=top_k, d_key=128,
                  shared_keys=True)
  else:
    raise ValueError(f"configs/peer.py: unknown preset {preset!r}; choose one of tiny, 125m, "
                     f"{', '.join(_WIDE)}")
  c.ffn.type = "peer"
  c.name = f"peer-{preset}"
  return with_defaults(c)


PAPER_LAYERS = 17  # see the docstring: matches dense-125m training FLOPs per token within 2%
# Wider shapes keep the dense depth and raise heads x top_k instead (searched over
# h in {8, 16, 32}, k in {16, 32, 64} with python -m sparsejax.info at seq 2048, vocab 32768).
_WIDE = {"350m": (32, 16), "760m": (32, 64)}
