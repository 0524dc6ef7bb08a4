"""Does product-key retrieval stay alive, and which settings help it? Memory and PEER tiny
presets (and a 128²-slot memory) trained on the embedded corpus, 300 steps, under variants of
query centring / whitening and of the optimizer groups (memory values on a constant lr vs the
main schedule, value weight decay, key / query / expert lr multipliers). At the end, over the
eval window: touched fraction of slots / experts, KL(usage || uniform), the uniform bound
1 - exp(-L/N) for the window's L lookups over N slots, the touched fraction of sub-key rows /
columns (a slot is touched only if its row and its column sub-keys are), and from the final
checkpoint's queries (``key_probe``): the slots the same queries touch with random sub-keys
and the queries' effective rank; the eval loss.

    python experiments/retrieval_usage.py [--steps 300] [--only memory-128² ...] \
        [--variants base "values wd 0.1" ...] [--out experiments/results/retrieval_usage]

Updates ``results.json`` (rows of the same --steps are replaced, others kept) and rewrites the
tables of ``REPORT.md`` from it (between its ``<!-- tables -->`` / ``<!-- /tables -->`` markers;
the hand-written analysis around them is kept) in --out.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.configure import load_config
from sparsejax.data import position
from sparsejax.eval import core as eval_core
from sparsejax.eval.checkpoint import restore
from sparsejax.layers import product_keys as pk
from sparsejax.train.loop import train_and_evaluate

PRESETS = {
    "memory-32²": ("configs/memory.py:tiny", {}),
    "memory-128²": ("configs/memory.py:tiny", {"memory.num_slots": 128 ** 2}),
    "peer-32²": ("configs/peer.py:tiny", {}),
}
# Variants per family, each one change from BASE (spelled out, so a row means the same whatever
# the schema defaults are): query centring / whitening, the memory values' lr schedule and
# weight decay, lr multipliers of keys / queries / PEER experts.
BASE = {
    "memory": {"query_center": "whiten", "value_lr_schedule": "main", "value_weight_decay": 0.0,
               "key_lr_mult": 1.0, "query_lr_mult": 1.0},
    "peer": {"query_center": "whiten", "key_lr_mult": 1.0, "query_lr_mult": 1.0,
             "expert_lr_mult": 1.0},
}
OPTIONS = {
    "memory": {
        "batch centring": {"query_center": "batch"},
        "base": {},
        "values constant lr (PKM)": {"value_lr_schedule": "constant"},
        "values lr x3": {"value_lr": 9e-3},  # the preset's 3e-3 -> 9e-3, on the main schedule
        "values wd 0.1": {"value_weight_decay": 0.1},
        "keys x3": {"key_lr_mult": 3.0},
        "queries x3": {"query_lr_mult": 3.0},
    },
    "peer": {
        "batch centring": {"query_center": "batch"},
        "base": {},
        "experts x3": {"expert_lr_mult": 3.0},
    },
}
# the 128²-slot memory: the variants that bear on its slots' usage
OPTIONS_128 = {k: OPTIONS["memory"][k] for k in ("batch centring", "base",
                                                 "values constant lr (PKM)", "values lr x3",
                                                 "values wd 0.1")}


def options(preset: str) -> dict:
  return OPTIONS_128 if preset == "memory-128²" else OPTIONS[preset.split("-")[0]]


class _Counts:
  """Keeps the eval window's raw usage count vectors (eval_core.usage_summary sees each)."""

  def __init__(self):
    self.last: list[np.ndarray] = []
    self.real = eval_core.usage_summary

  def __call__(self, counts):
    self.last.append(np.asarray(counts, np.float64))
    return self.real(counts)


def window_stats(counts: np.ndarray, lookups: float) -> dict:
  """Usage of one layer's count vector over the eval window, with the uniform bound and the
  sub-key rows / columns touched (slot i·n + j uses row sub-key i and column sub-key j)."""
  n_slots = counts.size
  n = math.isqrt(n_slots)
  grid = counts.reshape(n, n)
  p = counts / max(counts.sum(), 1.0)
  touched = float(np.mean(counts > 0))
  return {"touched": touched,
          "kl": float(np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-300) * n_slots), 0.0))),
          "kl_if_even": float(-math.log(touched)) if touched else float("inf"),
          "uniform_bound": 1.0 - math.exp(-lookups / n_slots),
          "rows": float(np.mean(grid.sum(1) > 0)), "cols": float(np.mean(grid.sum(0) > 0))}


def _effective_rank(x: np.ndarray) -> float:
  """Participation ratio (sum λ)² / sum λ² of the covariance of rows ``x`` [tokens, C]: C for
  queries spread evenly over all directions, 1 for queries along one line."""
  lam = np.linalg.eigvalsh(np.cov(x.astype(np.float64), rowvar=False))
  return float(lam.sum() ** 2 / np.sum(lam ** 2))


def key_probe(workdir: pathlib.Path, cfg, layers: int) -> dict:
  """The trained model's queries over the eval window (eager forward of the final checkpoint,
  recording every product-key top-k call): slots touched with the trained sub-keys and with
  random sub-keys of the same row norm scored by the same queries (the usage those queries
  allow when the keys spread them evenly), and distinct top-k sets per head (how many
  different lookups the window's queries make)."""
  r = restore(workdir, devices=jax.devices()[:1])
  # per layer (an eager loop: the recorder reads concrete queries, which a scan would trace)
  model = nnx.merge(nnx.split(r.spec.abstract_model)[0], r.spec.to_canonical(r.params))
  batches = eval_core.validation_subset(position.resolve_dataset(cfg), cfg)[0]
  calls, real = [], pk.product_key_topk

  def recording(q1, q2, k1, k2, top_k, **kw):
    calls.append((np.asarray(q1), np.asarray(q2), np.asarray(k1), np.asarray(k2)))
    return real(q1, q2, k1, k2, top_k, **kw)
  pk.product_key_topk = recording
  try:
    for b in batches:
      model(jnp.asarray(b["inputs"]))
  finally:
    pk.product_key_topk = real
  top_k = (cfg.memory if any(f == "memory" for _, f in cfg.layer_types()) else cfg.peer).top_k
  out = {"trained_keys": [], "random_keys": [], "distinct_sets": [], "rank": []}
  rng = np.random.default_rng(0)
  for layer in range(layers):
    mine = calls[layer::layers]
    q1 = np.concatenate([c[0].reshape(-1, *c[0].shape[2:]) for c in mine])  # [tokens, H, C]
    q2 = np.concatenate([c[1].reshape(-1, *c[1].shape[2:]) for c in mine])
    k1, k2 = mine[0][2], mine[0][3]
    n = k1.shape[-2]

    def touched(a, b):
      _, idx = real(jnp.asarray(q1[None]), jnp.asarray(q2[None]), jnp.asarray(a),
                    jnp.asarray(b), top_k)
      return np.asarray(idx[0]), float(np.unique(np.asarray(idx)).size / n ** 2)

    def rand_like(k):
      x = rng.standard_normal(k.shape)
      norm = np.linalg.norm(k, axis=-1, keepdims=True).mean()
      return (x / np.linalg.norm(x, axis=-1, keepdims=True) * norm).astype(k.dtype)
    idx, t_trained = touched(k1, k2)
    out["trained_keys"].append(t_trained)
    out["random_keys"].append(touched(rand_like(k1), rand_like(k2))[1])
    out["distinct_sets"].append(sum(len({tuple(sorted(row)) for row in idx[:, h]})
                                    for h in range(idx.shape[1])))
    out["rank"].append(np.mean([_effective_rank(q[:, h]) for q in (q1, q2)
                                for h in range(q1.shape[1])]))
  return {k: sum(v) / len(v) for k, v in out.items()}


def run(preset: str, option: str, steps: int, workdir: pathlib.Path, counts: _Counts) -> dict:
  path, over = PRESETS[preset]
  family = preset.split("-")[0]
  knobs = {f"{family}.{k}": v for k, v in {**BASE[family], **options(preset)[option]}.items()}
  cfg = load_config(path, **{**over, **knobs, "train.steps": steps,
                             "train.log_every_steps": max(steps // 3, 1),
                             "train.eval_every_steps": 0, "train.checkpoint_every_steps": 0,
                             "train.eval_batches": 8, "train.progress_bar": False,
                             "mesh.data": 1})
  counts.last = []
  t0 = time.process_time()
  result = train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])
  fam = cfg.memory if preset.startswith("memory") else cfg.peer
  tokens = cfg.train.eval_batches * cfg.data.global_batch_size * cfg.data.seq_len
  layers = [window_stats(c, tokens * fam.num_heads * fam.top_k) for c in counts.last]
  mean = {k: sum(s[k] for s in layers) / len(layers) for k in layers[0]}
  probe = key_probe(workdir, cfg, len(layers))
  return {**mean, **{f"probe_{k}": v for k, v in probe.items()},
          "eval_loss": result.eval_metrics["loss"], "layers": len(layers),
          "lookups": tokens * fam.num_heads * fam.top_k, "cpu_s": time.process_time() - t0}


def report(results: dict, steps: int) -> str:
  lines = [f"`python experiments/retrieval_usage.py --steps {steps}` (CPU, 1 device, "
           "`train.eval_batches=8`). Over the final eval window (8 val batches x 8 x 64 tokens; "
           "mean over the family's retrieval layers): touched fraction of slots / experts, "
           "the uniform bound 1 - exp(-L/N) for its L lookups (tokens x heads x k) over N "
           "slots, KL(usage || uniform) in nats and log(1/touched) (the KL if the touched "
           "slots were used evenly), the fraction of row / column sub-keys touched (the slot "
           "fraction is at most rows x cols); with the final checkpoint's eval-window queries, "
           "the slots touched when random sub-keys (same row norm) replace the trained ones, "
           "and the queries' effective rank per half (participation ratio of the covariance, "
           "out of d_key / 2 = 16); the eval loss.", ""]
  for preset, rows in results.items():
    lines += [f"## {preset}", "",
              "| variant | touched | uniform bound | KL | log(1/touched) | rows | cols | "
              "random keys | query rank | eval loss |", "|---" * 10 + "|"]
    for option, r in rows.items():
      lines.append(f"| {option} | {100 * r['touched']:.1f}% | {100 * r['uniform_bound']:.1f}% "
                   f"| {r['kl']:.2f} | {r['kl_if_even']:.2f} | {100 * r['rows']:.1f}% | "
                   f"{100 * r['cols']:.1f}% | {100 * r['probe_random_keys']:.1f}% | "
                   f"{r['probe_rank']:.1f} | {r['eval_loss']:.3f} |")
    lines.append("")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--only", nargs="*", default=None, help="presets (default: all)")
  parser.add_argument("--variants", nargs="*", default=None, help="variants (default: all)")
  parser.add_argument("--out", default="experiments/results/retrieval_usage")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  counts = _Counts()
  eval_core.usage_summary = counts
  saved = out / "results.json"
  old = json.loads(saved.read_text()) if saved.exists() else {}
  results: dict = old.get("results", {}) if old.get("steps") == args.steps else {}
  try:
    with tempfile.TemporaryDirectory() as tmp:
      for preset in args.only or PRESETS:
        for option in options(preset):
          if args.variants is not None and option not in args.variants:
            continue
          r = run(preset, option, args.steps, pathlib.Path(tmp) / f"{preset}-{option}", counts)
          results.setdefault(preset, {})[option] = r
          print(preset, option, json.dumps(r), flush=True)
  finally:
    eval_core.usage_summary = counts.real
  order = {p: list(options(p)) for p in PRESETS}  # rows in the order of the variant tables
  results = {p: dict(sorted(results[p].items(), key=lambda kv: order[p].index(kv[0])
                            if kv[0] in order[p] else len(order[p])))
             for p in PRESETS if p in results}
  saved.write_text(json.dumps({"steps": args.steps, "results": results}, indent=1,
                              ensure_ascii=False) + "\n")
  tables = report(results, args.steps)
  path = out / "REPORT.md"
  old = path.read_text() if path.exists() else ""
  start, end = "<!-- tables -->", "<!-- /tables -->"
  if start in old and end in old:
    text = old[:old.index(start)] + f"{start}\n{tables}{end}" + old[old.index(end) + len(end):]
  else:
    text = f"{start}\n{tables}{end}\n"
  path.write_text(text)
  print(tables)


if __name__ == "__main__":
  main()
