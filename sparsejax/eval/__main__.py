"""python -m sparsejax.eval --workdir DIR [--step N] [--data PATH] [--max_batches N] -> one JSON
line, with a progress bar on stderr while it runs.

``--task synthfacts [--max_items N] [--facts N --offset K]``: fact recall (acc@1, MRR) of a run
trained with ``config.data.synthfacts_facts`` (sparsejax/eval/synthfacts.py) instead of the loss:
its own facts, or the range ``[K, K + N)`` drawn with its seed (continual learning: a fine-tuned
run's earlier facts).

Reads the multi-process environment like ``python -m sparsejax.train`` (see
sparsejax.parallel.distributed); with several processes all evaluate, process 0 prints.
"""

from __future__ import annotations

import json

from absl import app, flags

from sparsejax.cli_common import flags_parser, one_line_errors, setup_logging

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding checkpoints/")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest committed)")
_DATA = flags.DEFINE_string("data", None, "Text file, folder, .jsonl or prepared dataset "
                            "(default: the training dataset's val split)")
_MAX_BATCHES = flags.DEFINE_integer(
    "max_batches", None, "Evaluate this many batches spread over the split instead of all of "
    "it (a large --data folder can take many minutes; the result says 'batches' of "
    "'split_batches')")
_BATCH = flags.DEFINE_integer("batch_size", None, "Sequences per eval batch (default: training's; "
                              "synthfacts: 256 question x candidate rows)")
_TASK = flags.DEFINE_enum("task", "loss", ["loss", "synthfacts"], "loss: loss / ppl / bits per "
                          "byte; synthfacts: fact recall of a run trained with synthetic facts")
_MAX_ITEMS = flags.DEFINE_integer("max_items", 256, "synthfacts: questions per template set "
                                  "(held-out, training), drawn with a fixed seed")
_FACTS = flags.DEFINE_integer("facts", None, "synthfacts: how many facts to ask about (default: "
                              "the run's config.data.synthfacts_facts)")
_OFFSET = flags.DEFINE_integer("offset", None, "synthfacts: the first fact's index (default: the "
                               "run's config.data.synthfacts_offset)")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  setup_logging()
  with one_line_errors("sparsejax.eval"):
    # defers jax: --help and bad flags answer without loading it, and jax.distributed is
    # initialised before anything can touch a device
    from sparsejax.parallel.distributed import initialize_from_env  # defers jax (see above)
    initialize_from_env()
    import jax
    if _TASK.value == "synthfacts":
      from sparsejax.eval import synthfacts  # defers jax (see above)
      result = synthfacts.evaluate(_WORKDIR.value, step=_STEP.value, max_items=_MAX_ITEMS.value,
                                   batch_size=_BATCH.value, facts=_FACTS.value,
                                   offset=_OFFSET.value)
    else:
      from sparsejax.eval.checkpoint import evaluate  # defers jax (see above)
      result = evaluate(_WORKDIR.value, step=_STEP.value, data=_DATA.value,
                        max_batches=_MAX_BATCHES.value, batch_size=_BATCH.value, progress=True)
    if jax.process_index() == 0:
      print(json.dumps(result))


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main, flags_parser=flags_parser("sparsejax.eval"))
