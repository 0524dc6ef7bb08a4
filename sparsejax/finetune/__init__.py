"""Finetuning modes (``config.finetune``): full, LoRA adapters, memory value tables only, and
sparse memory finetuning with TF-IDF slot selection (Lin et al. 2025).

targets.py        which leaves a mode touches: LoRA matrices (input / output axes), memory value
                  tables and the memory layers reading each
lora.py           adapters in the optimizer state: init (B = 0), merge, adapter gradients, the
                  optax wrapper, adapter shardings
sparse_memory.py  TF-IDF scores and top-t row selection, the background statistics file, the
                  optax wrapper masking value-row gradients and updates
hooks.py          what the train step, the optimizer and the eval paths call
background.py     ``python -m sparsejax.finetune.background``: a run's slot-access document
                  frequencies over N batches (above sparsejax.train; the rest sits below it)
"""
