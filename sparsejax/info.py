"""``python -m sparsejax.info --config configs/<family>.py:<preset> [--config.a.b=v]``: analytic
parameter / FLOP / bytes accounting of a config as one JSON line, without building weights
(the model is traced abstractly with nnx.eval_shape)."""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and preset",
                                          lock_config=True)
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "Vocabulary size (0: the config's, else 257 for "
                              "byte-level / 32768 for BPE presets)")


def _runs(names: list[str]) -> str:
  """["a", "a", "b"] -> "0-1:a 2:b" (attention/ffn type per layer range)."""
  out, start = [], 0
  for i in range(1, len(names) + 1):
    if i == len(names) or names[i] != names[start]:
      span = f"{start}-{i - 1}" if i - 1 > start else f"{start}"
      out.append(f"{span}:{names[start]}")
      start = i
  return " ".join(out)


def describe(cfg, vocab_size: int = 0) -> dict:
  from sparsejax.scaling import flops
  from sparsejax.train.state import model_spec
  vocab = vocab_size or cfg.model.vocab_size or (257 if cfg.data.tokenizer == "byte" else
                                                 int(cfg.data.tokenizer.split(":")[-1])
                                                 if ":" in cfg.data.tokenizer else 8192)
  counts = flops.count(model_spec(cfg, vocab).abstract_model, cfg)
  return {"name": cfg.name, "vocab_size": vocab, "padded_vocab": cfg.padded_vocab(vocab),
          "layers": _runs([f"{a}/{f}" for a, f in cfg.layer_types()]),
          "seq_len": cfg.data.seq_len,
          **{k: float(v) for k, v in counts.as_metrics().items()},
          "flops_convention": "6*active matmul params + causal attention 6*T*H*Dh per layer"}


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from sparsejax.cli_common import one_line_errors
  with one_line_errors("sparsejax.info"):
    from sparsejax.config import from_config_dict
    print(json.dumps(describe(from_config_dict(_CONFIG.value), _VOCAB.value)))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  from sparsejax.cli_common import flags_parser
  app.run(main, flags_parser=flags_parser("sparsejax.info"))
