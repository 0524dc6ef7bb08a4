"""Metric sinks: ``metrics.jsonl`` (one JSON object per logged step), tensorboardX event files
under ``tensorboard/``. Only process 0 writes."""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib

import jax
import numpy as np

_log = logging.getLogger("sparsejax")


def derived_metrics(last: dict, *, tokens_per_s: float, step_ms: float, flops_per_token: float,
                    peak_flops: float, bytes_per_token: float) -> dict:
  """Throughput, MFU (when the peak is known), perplexity and bits per byte of a logged step."""
  out = {"tokens_per_s": tokens_per_s, "step_ms": step_ms, "flops_per_token": flops_per_token,
         "perplexity": float(np.exp(min(last["ce_loss"], 700.0))),
         "bits_per_byte": last["ce_loss"] / np.log(2) / bytes_per_token}
  if peak_flops:
    out["mfu"] = flops_per_token * tokens_per_s / peak_flops
  return out


def warn_low_usage(last: dict, floor: float, warned: set, step: int) -> None:
  """Warn once per layer when its per-step touched fraction of slots / experts is below floor."""
  for name, value in last.items():
    if name.endswith("/touched_fraction") and value < floor and name not in warned:
      warned.add(name)
      _log.warning("step %d: %s = %.3f < config.train.min_touched_fraction=%g: retrieval is "
                   "collapsing onto a few slots / experts", step, name, value, floor)


def write_atomic(path: pathlib.Path, text: str) -> None:
  """Other processes may read it meanwhile (config.json at their start): never half-written."""
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


class MetricWriter:
  def __init__(self, workdir: str | os.PathLike, *, enabled: bool | None = None):
    self.workdir = pathlib.Path(workdir)
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.jsonl = self.workdir / "metrics.jsonl"
    self.tb_dir = self.workdir / "tensorboard"
    self._tb = None

  @property
  def tb(self):
    if self._tb is None and self.enabled:
      from tensorboardX import SummaryWriter  # imported only where used
      self._tb = SummaryWriter(str(self.tb_dir), flush_secs=10)
    return self._tb

  def truncate_after(self, step: int) -> None:
    """Drop records logged after `step` (they belong to a run that is being resumed from it),
    so a resumed metrics.jsonl reads like an uninterrupted one. Rewritten atomically."""
    if not self.enabled or not self.jsonl.exists():
      return
    kept = []
    for line in self.jsonl.read_text().splitlines():
      try:
        if json.loads(line).get("step", 0) <= step:
          kept.append(line)
      except json.JSONDecodeError:
        continue  # a line torn by a crash mid-write
    tmp = self.jsonl.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    os.replace(tmp, self.jsonl)

  def write(self, step: int, scalars: dict[str, float], *, prefix: str = "") -> None:
    if not self.enabled:
      return
    record = {"step": int(step)}
    for k, v in scalars.items():
      v = float(v)
      record[prefix + k] = v if math.isfinite(v) else str(v)
    with self.jsonl.open("a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in scalars.items():
      self.tb.add_scalar(prefix + k, float(v), int(step))

  def histogram(self, step: int, name: str, values) -> None:
    if self.enabled:
      self.tb.add_histogram(name, np.asarray(values), int(step))

  def text(self, step: int, name: str, value: str) -> None:
    if self.enabled:
      self.tb.add_text(name, value, int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def host_metrics(metrics: dict) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Split device metrics into scalars and vectors (vectors -> histograms + max/mean and
  min/mean, e.g. the most and least loaded expert against the average)."""
  scalars, vectors = {}, {}
  for k, v in jax.device_get(metrics).items():
    v = np.asarray(v)
    if v.ndim == 0:
      scalars[k] = float(v)
    else:
      vectors[k] = v
      mean = max(float(v.mean()), 1e-12)
      scalars[f"{k}/max_over_mean"] = float(v.max() / mean)
      scalars[f"{k}/min_over_mean"] = float(v.min() / mean)
  return scalars, vectors
