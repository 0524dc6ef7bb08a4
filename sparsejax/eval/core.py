"""Evaluation over batches: the eval step (loss sums plus the layers' ``usage*`` count vectors),
its reduction to loss / perplexity / bits-per-byte / key usage (and, for sparse FFN activations,
the fraction of hidden units that never fired in the window), and ``evaluate_params`` that runs
it over host batches (used by the training loop's periodic eval and by checkpoint evaluation,
sparsejax/eval/checkpoint.py)."""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from sparsejax import data as sdata
from sparsejax.layers.ffn import NEURON_USAGE
from sparsejax.models.forward import forward_sums
from sparsejax.parallel.sharding import global_batch

_log = logging.getLogger("sparsejax")


def make_eval_step(graphdef):
  """Sums for loss / accuracy plus every sown ``usage*`` count vector (key usage)."""
  def eval_step(params, batch):
    sums, _, sown, _ = forward_sums(graphdef, params, batch, 0.0)
    usage = {k: v for k, v in sown.items() if k.rsplit("/", 1)[-1].startswith("usage")}
    return {**{k: sums[k] for k in ("ce_sum", "count", "correct")}, "usage": usage}
  return eval_step


def usage_summary(counts) -> dict[str, float]:
  """Fraction of entries touched and KL(usage || uniform) in nats, for one count vector."""
  counts = jnp.asarray(counts, jnp.float32)
  total = jnp.maximum(counts.sum(), 1.0)
  p = counts / total
  kl = jnp.sum(jnp.where(p > 0, p * jnp.log(p * counts.size), 0.0))
  return {"touched_fraction": float(jnp.mean(counts > 0)), "kl_from_uniform": float(kl)}


def summarize_eval(sums: dict[str, float], bytes_per_token: float) -> dict[str, float]:
  """Token-mean loss (nats), perplexity and bits per UTF-8 byte of the evaluated text."""
  loss = sums["ce_sum"] / max(sums["count"], 1.0)
  return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
          "bits_per_byte": loss / math.log(2) / bytes_per_token,
          "accuracy": sums["correct"] / max(sums["count"], 1.0), "tokens": sums["count"]}


def evaluate_params(eval_fn, params, batches, sharding, bytes_per_token: float,
                    on_batch=None, progress: bool = False) -> dict:
  """Run the jitted eval step over host batches and reduce to loss / ppl / bits-per-byte, plus
  key usage (touched fraction, KL from uniform) for every sown ``usage*`` count vector, and
  ``<layer>/dead_fraction`` (units with a zero count over the window) for FFN ``usage_neurons``.
  Every process passes the same full batches. ``on_batch(i)`` after each (a watchdog beat);
  ``progress``: a tqdm bar (batches, tokens so far, time left) on process 0."""
  totals = {"ce_sum": 0.0, "count": 0.0, "correct": 0.0}
  usage: dict[str, np.ndarray] = {}
  bar = (tqdm(total=len(batches), desc="eval", unit="batch", mininterval=2.0)
         if progress and jax.process_index() == 0 else None)
  for i, batch in enumerate(batches):
    sums = jax.device_get(eval_fn(params, global_batch(batch, sharding, len(batch["inputs"]))))
    if on_batch is not None:
      on_batch(i)
    for k in totals:
      totals[k] += float(sums[k])
    for k, v in sums["usage"].items():
      usage[k] = usage.get(k, 0) + np.asarray(v, np.float64)
    if bar is not None:
      bar.set_postfix(tokens=f"{totals['count']:.0f}",
                      loss=f"{totals['ce_sum'] / max(totals['count'], 1.0):.3f}")
      bar.update(1)
  if bar is not None:
    bar.close()
  result = summarize_eval(totals, bytes_per_token)
  for k, counts in usage.items():
    for name, value in usage_summary(counts).items():
      result[f"{k}/{name}"] = value
    layer, _, leaf = k.rpartition("/")
    if leaf == NEURON_USAGE:  # sparse FFN activations: hidden units that never fired
      result[f"{layer}/dead_fraction"] = float(np.mean(counts == 0))
  return result


def validation_subset(dataset_dir, cfg) -> tuple[list, float, int]:
  """The training loop's periodic eval set: ``cfg.train.eval_batches`` batches spread over the
  val split, its bytes per token, and how many batches the whole split has; ([], 1.0, 0) when
  the split is shorter than one window."""
  kw = dict(seq_len=cfg.data.seq_len, batch_size=cfg.data.global_batch_size)
  try:
    batches = sdata.make_eval_batches(dataset_dir, max_batches=cfg.train.eval_batches, **kw)
  except ValueError as e:
    _log.warning("no periodic eval: %s", e)
    return [], 1.0, 0
  bpt = sdata.TokenDataset(dataset_dir, "val").bytes_per_token
  return batches, bpt, sdata.num_eval_batches(dataset_dir, **kw)
