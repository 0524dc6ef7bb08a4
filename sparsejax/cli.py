"""``sparsejax <command> [flags]``: one console script over the module entry points.

    sparsejax train    --config configs/dense.py:tiny --workdir runs/t   (= python -m sparsejax.train)
    sparsejax eval     --workdir runs/t [--step N] [--data PATH]        (= python -m sparsejax.eval)
    sparsejax prepare  [--input PATH ...] [--out DIR] [--tokenizer ...] (= python -m sparsejax.data.prepare)
    sparsejax demo     [--workdir runs/default]                         (= python -m sparsejax.demo)
    sparsejax info     --config configs/dense.py:350m                   (= python -m sparsejax.info)
    sparsejax fit      --root runs/isoflop_tiny [--out DIR]             (= python -m sparsejax.scaling.analyze)
    sparsejax sparsity --workdir runs/t [--step N]   densities / N:M check of a checkpoint, JSON
    sparsejax background --workdir runs/m [--batches 100]  slot statistics for sparse_memory
    sparsejax convert  --from-hf DIR --out W | --to-hf W --out DIR [--step N]   Hugging Face
    sparsejax upcycle  --from W[:STEP] --config configs/moe.py:P --out W2 [--mode copy|granular]
    sparsejax compile-check --config F:P --target v5p-256|h100x8|...  AOT compile, HBM fit (JSON)
"""

from __future__ import annotations

import importlib
import sys

from absl import app, flags

from sparsejax.cli_common import flags_parser

COMMANDS = {
    "train": "sparsejax.train.__main__",
    "eval": "sparsejax.eval.__main__",
    "prepare": "sparsejax.data.prepare",
    "demo": "sparsejax.demo",
    "info": "sparsejax.info",
    "fit": "sparsejax.scaling.analyze",
    "sparsity": "sparsejax.eval.sparsity_check",
    "background": "sparsejax.finetune.background",
    "convert": "sparsejax.convert.__main__",
    "upcycle": "sparsejax.upcycle.__main__",
    "compile-check": "sparsejax.compile_check.__main__",
}
# Commands whose module parses its own arguments (argparse): main(argv) -> exit status.
ARGPARSE = {"fit", "sparsity", "convert", "upcycle", "compile-check"}
REQUIRED = {"train": ["config", "workdir"], "eval": ["workdir"], "info": ["config"],
            "background": ["workdir"]}


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    print(__doc__.strip(), file=sys.stderr)
    sys.exit(2 if len(argv) >= 2 and argv[1] not in ("-h", "--help") else 0)
  command = argv[1]
  module = importlib.import_module(COMMANDS[command])  # defines only this command's flags
  if command in ARGPARSE:
    sys.exit(module.main(argv[2:]))
  if hasattr(module, "define_flags"):
    module.define_flags()
  if REQUIRED.get(command):
    flags.mark_flags_as_required(REQUIRED[command])
  app.run(module.main, argv=[f"sparsejax {command}"] + argv[2:],
          flags_parser=flags_parser(f"sparsejax {command}"))


if __name__ == "__main__":
  main()
