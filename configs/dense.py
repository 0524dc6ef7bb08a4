r"""Dense decoder-only transformer (Llama-style: RoPE, RMSNorm, GQA, SwiGLU).

Presets (``--config configs/dense.py:<preset>``):

  tiny   2 layers, d=64: CPU tests, ~10 ms per step.
  small  4 layers, d=256, seq 256: the README's demo on the embedded stdlib corpus (byte-level).
         python -m sparsejax.train --config configs/dense.py:small --workdir runs/small
         Measured on 2 CPU cores (float32 compute): ~1.1 s/step, 300 steps in 5.5 min;
         train loss 5.6 -> ~1.6 nats/byte; full val split bits-per-byte 2.42.
  125m   GPT-3 Small shape  (d=768,  L=12, H=12)
  350m   GPT-3 Medium shape (d=1024, L=24, H=16)
  760m   GPT-3 Large shape  (d=1536, L=24, H=16)
  1.3b   GPT-3 XL shape     (d=2048, L=24, H=32)
         The GPU presets use sequence 2048, global batch 256 (0.5M tokens), bf16 compute with
         fp32 params, BPE 32768 on the embedded corpus unless --config.data.path is given.
         On one GPU add --config.train.grad_accum_steps=<k> to fit memory.
  8b     Llama-3-8B shape (Llama 3 paper, arXiv 2407.21783, Table 3; Meta-Llama-3-8B
         config.json): d=4096, L=32, H=32, 8 KV heads, SwiGLU d_ff=14336, vocabulary 128256
         (untied), RoPE theta 500000, RMSNorm eps 1e-5: 8.03B parameters as published.
         Sequence 8192, the paper's pre-training length (attention's share of the FLOPs and the
         activation memory are those of the real run); global batch 512 x 8192 = 4M tokens.
         remat="full" (per layer only the block input is kept for the backward pass) and
         model.loss_chunk=1024 (the [B, T, 128256] float32 logits would be 4 GiB per sequence).
         model.scan_layers=True: in a layer loop XLA keeps every layer's all-gathered (FSDP)
         weights from the forward to the backward pass; 70b on v5p-256 (fsdp 128, 1 x 8192
         tokens per chip) needs 158.5 GiB of temporaries looped and fits at 60.8 GiB scanned.
  70b    Llama-3-70B shape (same sources): d=8192, L=80, H=64, 8 KV heads, d_ff=28672, the same
         vocabulary, RoPE, sequence and settings: 70.6B parameters as published.
         python -m sparsejax.compile_check --config configs/dense.py:8b --target v5p-256 \
             --config.mesh.preset=fsdp --find_max_batch

Any field can be overridden: --config.model.num_layers=8 --config.optim.lr=1e-3 ...
"""

import ml_collections

from sparsejax.configure import with_defaults

_SHAPES = {
    # name: (d_model, num_layers, num_heads, num_kv_heads, lr)
    "125m": (768, 12, 12, 12, 6e-4),
    "350m": (1024, 24, 16, 16, 3e-4),
    "760m": (1536, 24, 16, 16, 2.5e-4),
    "1.3b": (2048, 24, 32, 32, 2e-4),
}
# Published shapes (docstring): name -> model fields, d_ff, lr (Llama 3 paper: peak 3e-4 for 8B,
# 1.5e-4 for 70B). Sequence, vocabulary, RoPE and norm settings are common to both (_LLAMA3).
_PUBLISHED = {
    "8b": (dict(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8), 14336, 3e-4),
    "70b": (dict(d_model=8192, num_layers=80, num_heads=64, num_kv_heads=8), 28672, 1.5e-4),
}
_LLAMA3 = dict(vocab_size=128256, tie_embeddings=False, norm_eps=1e-5, remat="full",
               loss_chunk=1024, scan_layers=True)


def base() -> ml_collections.ConfigDict:
  """The schema defaults (sparsejax/config/schema.py): d=256, 4 layers, 4 heads, byte-level
  data at seq 256, AdamW 3e-3 cosine, 300 steps."""
  return with_defaults({"name": "dense"})


def get_config(preset: str = "small") -> ml_collections.ConfigDict:
  c = base()
  if preset in ("tiny", "small"):
    c.model.compute_dtype = "float32"  # CPU presets: XLA:CPU emulates bf16 matmuls slowly
  if preset == "tiny":
    c.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2)
    c.data.update(seq_len=64, global_batch_size=8)
    c.optim.update(warmup_steps=2)
    c.train.update(steps=20, log_every_steps=5, eval_every_steps=10, eval_batches=2,
                   checkpoint_every_steps=10, progress_bar=False)
  elif preset == "small":
    pass
  elif preset in _SHAPES:
    d, layers, heads, kv, lr = _SHAPES[preset]
    c.model.update(d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                   remat="dots_no_batch")
    c.data.update(tokenizer="bpe:32768", seq_len=2048, global_batch_size=256)
    c.optim.update(lr=lr, warmup_steps=2000)
    c.train.update(steps=100_000, log_every_steps=50, eval_every_steps=2000, eval_batches=20,
                   checkpoint_every_steps=2000)
  elif preset in _PUBLISHED:
    shape, d_ff, lr = _PUBLISHED[preset]
    c.model.update(**shape, **_LLAMA3)
    c.ffn.d_ff = d_ff
    c.attention.rope_theta = 500000.0
    c.data.update(tokenizer="bpe:32768", seq_len=8192, global_batch_size=512)
    c.optim.update(lr=lr, warmup_steps=2000)
    c.train.update(steps=100_000, log_every_steps=50, eval_every_steps=2000, eval_batches=20,
                   checkpoint_every_steps=2000)
  else:
    raise ValueError(f"configs/dense.py: unknown preset {preset!r}; choose one of tiny, small, "
                     f"{', '.join([*_SHAPES, *_PUBLISHED])}")
  c.name = f"dense-{preset}"
  return c
