"""Hugging Face import / export (python -m sparsejax.convert): config and tensor maps,
lazy safetensors reading, tokenizer carry-over."""
