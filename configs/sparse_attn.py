r"""Block-sparse attention: dense transformers whose attention layers visit only the blocks of a
mask spec (``config.attention.mask``, see kernels_pallas/block_sparse_attention/masks/).

Presets (``--config configs/sparse_attn.py:<preset>``):

  tiny        dense tiny (2 layers, d=64, seq 64) alternating a local layer (causal & window 16,
              blocks 16) with a dense global layer; float32; CPU tests.
              python -m sparsejax.train --config configs/sparse_attn.py:tiny --workdir runs/sa-tiny
  8k-window   125m shape at sequence 8192: every layer causal & sliding window 1024, blocks 128.
  8k-local-global
              125m shape at 8192, local (window 1024) and global (causal) layers alternating.
  32k-window  125m shape at 32768, causal & window 1024 in every layer (density ~0.03).
  32k-bigbird 125m shape at 32768, causal BigBird: window 1024 + 64 global tokens + 3 random
              key blocks of 128 per query block, seeded per layer and head.
  32k-strided 125m shape at 32768, Sparse Transformer strided (stride 128, local 128).
              The long presets lower the global batch to 16 sequences (0.5M tokens at 32k).

Any field can be overridden: --config.attention.mask='causal&window:512' ...
"""

import pathlib

from sparsejax.configure import load_config_dict, with_defaults

_DENSE = pathlib.Path(__file__).with_name("dense.py")

_LONG = {  # name: (seq_len, global batch, attention pattern, mask)
    "8k-window": (8192, 64, ("block_sparse",), "causal&window:1024"),
    "8k-local-global": (8192, 64, ("block_sparse", "dense"), "causal&window:1024"),
    "32k-window": (32768, 16, ("block_sparse",), "causal&window:1024"),
    "32k-bigbird": (32768, 16, ("block_sparse",), "bigbird:1024:64:3:128:seed=0"),
    "32k-strided": (32768, 16, ("block_sparse",), "strided:128:128"),
}


def get_config(preset: str = "tiny"):
  if preset == "tiny":
    c = load_config_dict(f"{_DENSE}:tiny")
    c.attention.update(pattern=("block_sparse", "dense"), mask="causal&window:16", block_q=16,
                       block_kv=16)
  elif preset in _LONG:
    seq, batch, pattern, mask = _LONG[preset]
    c = load_config_dict(f"{_DENSE}:125m")
    c.data.update(seq_len=seq, global_batch_size=batch)
    c.attention.update(pattern=pattern, mask=mask, block_q=128, block_kv=128)
  else:
    raise ValueError(f"configs/sparse_attn.py: unknown preset {preset!r}; choose one of tiny, "
                     f"{', '.join(_LONG)}")
  c.name = f"sparse_attn-{preset}"
  return with_defaults(c)
