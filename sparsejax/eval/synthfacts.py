"""Fact recall of a run trained with synthetic facts (``config.data.synthfacts_facts`` > 0):
``python -m sparsejax.eval --workdir DIR --task synthfacts [--facts N --offset K]``.

The facts are regenerated from the run's config (sparsejax/data/synthfacts.py): its own range
``[synthfacts_offset, synthfacts_offset + synthfacts_facts)`` unless another range is asked for
(a fine-tuned run's earlier facts, a pretrained run's facts still to come). For each
question (a fact rendered with a template, up to the value) every candidate value of the
fact's relation is scored by the summed log-probability of the continuation ``" " + value +
"."`` after ``[eos] + prompt`` (the eos matches how fact documents start in the training
stream; the "." terminator keeps a short value from being favoured over a longer one). The
gold value's rank among the candidates gives accuracy@1 and the mean reciprocal rank; ties
count against the gold. Reported on the HELD-OUT question templates (never in the training
text: "generalised to a new question form") and, separately, on the TRAINING templates
("stored the fact"), each on up to ``max_items`` questions drawn with a fixed seed; chance
is 1 / candidates.

Scoring is batched: every (question, candidate) is one row ``[eos] + prompt + continuation``
padded to ``config.data.seq_len`` (as training sequences: MoE capacity is per sequence; weights
1 on the continuation's targets), and one jitted forward pass scores ``batch_size`` rows.
"""

from __future__ import annotations

import pathlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax import data as sdata
from sparsejax.data import synthfacts as sf
from sparsejax.eval.checkpoint import restore
from sparsejax.errors import ConfigError
from sparsejax.models.forward import token_losses
from sparsejax.parallel import sharding as shd
from sparsejax.train.init_from import Restored

DEFAULT_MAX_ITEMS = 256   # questions per template set (held-out, training)
DEFAULT_BATCH_ROWS = 256  # (question, candidate) rows per forward pass
ITEMS_SEED = 1234         # which questions are drawn when there are more than max_items

ScoreFn = Callable[[dict], np.ndarray]  # batch {inputs, targets, weights}: [B, T] -> scores [B]


def rank_metrics(scores_IxC: np.ndarray, gold_I: np.ndarray) -> dict[str, float]:
  """Accuracy@1 and MRR of the gold candidates; a candidate scoring the same as the gold
  counts as ranked above it."""
  scores_IxC = np.asarray(scores_IxC, np.float64)
  gold_I = np.asarray(gold_I)
  gold_score = scores_IxC[np.arange(len(gold_I)), gold_I]
  others = np.ones_like(scores_IxC, bool)
  others[np.arange(len(gold_I)), gold_I] = False
  rank_I = 1 + np.sum((scores_IxC >= gold_score[:, None]) & others, axis=1)
  return {"acc": float(np.mean(rank_I == 1)), "mrr": float(np.mean(1.0 / rank_I)),
          "items": int(len(gold_I))}


def encode_rows(items: Sequence[sf.EvalItem], tokenizer, seq_len: int) -> dict[str, np.ndarray]:
  """One row per (item, candidate), item-major: ``inputs`` / ``targets`` ``int32[R, seq_len]``
  and ``weights`` ``float32[R, seq_len]`` (1 on the continuation's targets; eos padding after
  it). Rows are as long as training sequences because a layer's behaviour may depend on the
  length: MoE expert capacity is per sequence (a shorter row would drop differently)."""
  eos = tokenizer.eos_id
  rows = []
  for item in items:
    prompt = tokenizer.encode(item.prompt)
    for value in item.candidates:
      full = tokenizer.encode(f"{item.prompt} {value}.")
      if len(full) > len(prompt) and np.array_equal(full[:len(prompt)], prompt):
        cont = full[len(prompt):]
      else:  # a tokenizer that merges across the prompt / value boundary
        cont = tokenizer.encode(f" {value}.")
      rows.append((np.concatenate([[eos], prompt, cont]), len(cont)))
  longest = max(len(seq) - 1 for seq, _ in rows)
  if longest > seq_len:
    raise ValueError(f"a question + candidate needs {longest} positions, more than the model's "
                     f"config.data.seq_len {seq_len}")
  out = {"inputs": np.full((len(rows), seq_len), eos, np.int32),
         "targets": np.full((len(rows), seq_len), eos, np.int32),
         "weights": np.zeros((len(rows), seq_len), np.float32)}
  for r, (seq, n) in enumerate(rows):
    t = len(seq) - 1
    out["inputs"][r, :t] = seq[:-1]
    out["targets"][r, :t] = seq[1:]
    out["weights"][r, t - n:t] = 1.0
  return out


def score_items(score_fn: ScoreFn, items: Sequence[sf.EvalItem], tokenizer, seq_len: int,
                batch_rows: int) -> dict[str, float]:
  """Rank every item's candidates with ``score_fn`` (fixed-size batches, the last one padded
  with zero-weight rows) and return :func:`rank_metrics`."""
  if not items:
    return {"acc": float("nan"), "mrr": float("nan"), "items": 0}
  num_candidates = {len(item.candidates) for item in items}
  if len(num_candidates) != 1:
    raise ValueError(f"items have different candidate counts {sorted(num_candidates)}")
  rows = encode_rows(items, tokenizer, seq_len)
  total = len(rows["inputs"])
  scores = np.empty((total,), np.float64)
  for lo in range(0, total, batch_rows):
    n = min(batch_rows, total - lo)
    batch = {k: np.zeros((batch_rows,) + v.shape[1:], v.dtype) for k, v in rows.items()}
    for k, v in rows.items():
      batch[k][:n] = v[lo:lo + n]
    scores[lo:lo + n] = np.asarray(score_fn(batch), np.float64)[:n]
  scores_IxC = scores.reshape(len(items), num_candidates.pop())
  return rank_metrics(scores_IxC, np.array([item.gold for item in items]))


def make_score_step(graphdef):
  """(params, batch) -> per-row sum of the weighted targets' log-probabilities."""
  def score_step(params, batch):
    model = nnx.merge(graphdef, params)
    logits, _ = nnx.capture(model, nnx.Intermediate)(batch["inputs"])
    ce_BxT, _ = token_losses(logits, batch["targets"])
    return -jnp.sum(ce_BxT * batch["weights"], axis=-1)
  return score_step


def sample_items(items: list[sf.EvalItem], max_items: int | None) -> list[sf.EvalItem]:
  """Up to ``max_items`` items drawn without replacement (fixed seed), in their order."""
  if max_items is None or len(items) <= max_items:
    return items
  keep = np.sort(np.random.default_rng(ITEMS_SEED).choice(len(items), max_items, replace=False))
  return [items[i] for i in keep]


def make_scorer(r: Restored, batch_size: int | None = None) -> tuple[ScoreFn, int]:
  """(score_fn, rows per batch) for a restored checkpoint: one jitted :func:`make_score_step`
  on its mesh, rows rounded up to a multiple of the batch shards. The function reads
  ``r.params`` when called, so a caller may swap in another checkpoint of the same model."""
  shards = shd.batch_shards(r.mesh, r.rules)
  rows = batch_size or DEFAULT_BATCH_ROWS
  rows = -(-rows // shards) * shards
  batch_sh = shd.batch_sharding(r.mesh, r.rules)
  step_fn = jax.jit(make_score_step(r.spec.graphdef), in_shardings=(r.param_shardings, batch_sh))

  def score_fn(batch):
    with shd.activation_sharding(r.mesh, r.rules):
      return jax.device_get(step_fn(r.params, shd.global_batch(batch, batch_sh, rows)))
  return score_fn, rows


def recall(score_fn: ScoreFn, facts: sf.Facts, tokenizer, seq_len: int, rows: int,
           max_items: int | None = DEFAULT_MAX_ITEMS,
           templates: Sequence[str] = ("heldout", "train")) -> dict:
  """acc@1 / MRR / items of a fact set on the held-out (``heldout_*``) and / or training
  (``train_*``) question templates."""
  result = {}
  for name in templates:
    held_out = {"heldout": True, "train": False}[name]
    items = sample_items(sf.eval_items(facts, held_out=held_out), max_items)
    metrics = score_items(score_fn, items, tokenizer, seq_len, rows)
    result.update({f"{name}_{k}": v for k, v in metrics.items()})
  return result


def evaluate(workdir: str | pathlib.Path, *, step: int | None = None,
             max_items: int | None = DEFAULT_MAX_ITEMS, batch_size: int | None = None,
             devices: list | None = None, facts: int | None = None,
             offset: int | None = None) -> dict:
  """Fact recall of one checkpoint (see the module docstring): acc@1 / MRR on held-out and
  training templates, with chance = 1 / candidates. ``facts`` / ``offset``: the fact range
  ``[offset, offset + facts)`` to ask about, drawn with the run's ``synthfacts_seed`` (default:
  the run's own range; e.g. the facts a later fine-tuning taught, or those it may have made the
  model forget)."""
  r = restore(workdir, step, devices)
  d = r.cfg.data
  num = d.synthfacts_facts if facts is None else facts
  first = d.synthfacts_offset if offset is None else offset
  if not num:
    raise ConfigError(f"config.data.synthfacts_facts is 0 in {workdir}: the run was trained "
                      "without synthetic facts; pass --facts N [--offset K] to ask about a "
                      "fact range, use --task loss, or train with --config.data.synthfacts_facts=N")
  fact_set = sf.make_facts(num, d.synthfacts_seed, first)
  tokenizer = sdata.TokenDataset(pathlib.Path(r.meta["dataset"]), "train").tokenizer
  score_fn, rows = make_scorer(r, batch_size)
  return {"step": r.step, "task": "synthfacts", "facts": fact_set.num_facts, "offset": first,
          "candidates": sf.VALUES_PER_RELATION, "chance": 1.0 / sf.VALUES_PER_RELATION,
          **recall(score_fn, fact_set, tokenizer, d.seq_len, rows, max_items)}
