"""python -m sparsejax.convert (= ``sparsejax convert``): Hugging Face import and export.

    sparsejax convert --from-hf HF_DIR --out WORKDIR [--compute_dtype bfloat16]
                      [--data_path PREPARED] [--set data.seq_len=512 ...]
    sparsejax convert --to-hf WORKDIR --out HF_DIR [--step N] [--max_shard_gb 5]

--from-hf writes a step-0 sparsejax run (checkpoint, config.json, the model's tokenizer) that
``python -m sparsejax.train --config configs/workdir.py:WORKDIR --workdir WORKDIR`` trains and
``python -m sparsejax.eval --workdir WORKDIR`` evaluates (sparsejax/convert/hf_import.py);
--to-hf writes config.json + safetensors + tokenizer that transformers loads
(sparsejax/convert/hf_export.py). Unsupported fields / layers fail with one line, exit 2.
"""

from __future__ import annotations

import argparse
import ast
import sys

from sparsejax.cli_common import one_line_errors, setup_logging


def _setting(text: str) -> tuple[str, object]:
  key, sep, value = text.partition("=")
  if not sep or not key:
    raise argparse.ArgumentTypeError(f"--set {text!r}: use KEY=VALUE, e.g. data.seq_len=512")
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="sparsejax convert", description=__doc__.splitlines()[0])
  way = p.add_mutually_exclusive_group(required=True)
  way.add_argument("--from-hf", "--from_hf", dest="from_hf", metavar="HF_DIR",
                   help="a Hugging Face model folder (config.json, *.safetensors, tokenizer)")
  way.add_argument("--to-hf", "--to_hf", dest="to_hf", metavar="WORKDIR",
                   help="a sparsejax run directory with a committed checkpoint")
  p.add_argument("--out", required=True, help="the new workdir / HF folder (must be empty)")
  p.add_argument("--step", type=int, default=None, help="--to-hf: checkpoint step (default: "
                 "latest committed)")
  p.add_argument("--compute_dtype", choices=("float32", "bfloat16"), default="float32",
                 help="--from-hf: the converted config's model.compute_dtype")
  p.add_argument("--data_path", default="", help="--from-hf: a dataset prepared with the "
                 "model's tokenizer (default: the embedded corpus, tokenised on first use)")
  p.add_argument("--set", dest="overrides", type=_setting, action="append", default=[],
                 metavar="KEY=VALUE", help="--from-hf: a config setting of the converted run "
                 "(repeatable), e.g. optim.lr=1e-4")
  p.add_argument("--max_shard_gb", type=float, default=5.0,
                 help="--to-hf: largest safetensors shard")
  args = p.parse_args(argv)
  setup_logging()
  with one_line_errors("sparsejax convert"):
    if args.from_hf:
      from sparsejax.convert.hf_import import import_hf  # defers jax (--help answers at once)
      out = import_hf(args.from_hf, args.out, compute_dtype=args.compute_dtype,
                      data_path=args.data_path, overrides=dict(args.overrides))
    else:
      from sparsejax.convert.hf_export import export_hf  # defers jax (--help answers at once)
      out = export_hf(args.to_hf, args.out, step=args.step,
                      max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
    print(out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
