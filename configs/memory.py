r"""Memory layers: a dense transformer with product-key memory (Memory+) FFNs in chosen layers,
one value pool shared by all memory layers ("Memory Layers at Scale"; PKM with memory_plus=False).

Presets (``--config configs/memory.py:<preset>``):

  tiny   dense tiny (2 layers, d=64), layer 1's FFN a Memory+ layer: N = 32² slots, 2 heads,
         k=8, d_key 32, QK-norm, float32 compute. CPU tests.
         python -m sparsejax.train --config configs/memory.py:tiny --workdir runs/memory-tiny
  125m   configs/dense.py:125m with the FFNs of layers 3, 6 and 9 replaced by Memory+ layers
         sharing one 1024² x 768 value pool (0.8B memory parameters), 4 heads, k=32,
         d_key 512; values trained with their own constant lr; queries whitened per head
         (memory.query_center="whiten", 4 x 512² per token). Training FLOPs per token 797M vs
         dense-125m 774M (+3%); 919M total parameters, 113.9M active per token.
         python -m sparsejax.train --config configs/memory.py:125m --workdir runs/memory-125m
  350m, 760m, 1.3b
         the dense shape of the same name with Memory+ in layers 6, 12 and 18 sharing one
         1024² x d_model pool, same memory settings. Training FLOPs per token vs dense
         (sparsejax.info): 350m 0.98x (1.40B total / 331M active params), 1.3b 0.96x
         (3.37B / 1.22B); the three memory layers replace three FFNs, so they cost a little less.
  8b     the largest base model of Memory Layers at Scale (Berges et al. 2024, arXiv 2412.09764:
         Llama-3-8B with Memory+): configs/dense.py:8b with Memory+ in 3 equally spaced layers
         (8, 16, 24) sharing one value pool of N = 4096² = 16.8M slots x 4096 (4096³ = 68.7B
         value parameters, "64B" in the paper's binary units), 4 heads, k=32, d_key 1024
         (d_model / 4): 76.4B total parameters, 7.2B active per token.
  1.3b_64m
         the paper's largest memory (its "128B memory parameters"): configs/memory.py:1.3b with
         N = 8192² = 67.1M slots x 2048 (137B value parameters; 138.7B in all).
         The value pool's rows are on every device (mem_slots -> no mesh axis, mem_dim ->
         tensor), so neither state fits one device's HBM. --config.mesh.rules="(('mem_dim',
         'fsdp'),)" shards the pool's columns over fsdp (the state then fits v5p-256 and
         v5e-256), but the compiled step all-gathers the whole pool (measured on memory tiny,
         v5p-8): these sizes need a sharded lookup (docs/fits.md).

Any field can be overridden: --config.ffn.overrides=4:memory,8:memory --config.memory.top_k=16
"""

import pathlib

from sparsejax.configure import load_config_dict, with_defaults

_DENSE = pathlib.Path(__file__).with_name("dense.py")
# Memory+ layers at about L/4, L/2 and 3L/4 of each dense shape (one shared value pool).
_LAYERS = {"125m": (3, 6, 9), "350m": (6, 12, 18), "760m": (6, 12, 18), "1.3b": (6, 12, 18)}


def get_config(preset: str = "tiny"):
  if preset == "tiny":
    c = load_config_dict(f"{_DENSE}:tiny")
    c.ffn.overrides = ("1:memory",)
    c.memory.update(num_slots=32 ** 2, num_heads=2, top_k=8, d_key=32, value_lr=3e-3)
  elif preset in _LAYERS:
    c = load_config_dict(f"{_DENSE}:{preset}")
    c.ffn.overrides = tuple(f"{i}:memory" for i in _LAYERS[preset])
    # the MemoryConfig defaults: N = 1024^2 slots, 4 heads, k=32, d_key 512, Memory+, QK-norm
  elif preset == "8b":
    c = load_config_dict(f"{_DENSE}:8b")
    c.ffn.overrides = ("8:memory", "16:memory", "24:memory")
    c.memory.update(num_slots=4096 ** 2, d_key=1024)
  elif preset == "1.3b_64m":
    c = load_config_dict(f"{_DENSE}:1.3b")
    c.ffn.overrides = tuple(f"{i}:memory" for i in _LAYERS["1.3b"])
    c.memory.num_slots = 8192 ** 2
  else:
    raise ValueError(f"configs/memory.py: unknown preset {preset!r}; choose one of tiny, "
                     f"{', '.join(_LAYERS)}, 8b, 1.3b_64m")
  c.name = f"memory-{preset}"
  return with_defaults(c)
