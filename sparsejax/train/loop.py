"""``train_and_evaluate(cfg, workdir)``: the whole training run, importable and resumable.

Re-running on the same workdir resumes from the latest committed checkpoint (model, optimizer,
step, RNG and the data position), so a resumed run is bitwise identical on CPU to an
uninterrupted one. SIGTERM saves a checkpoint at the next step boundary and returns cleanly.

Several processes (``jax.distributed``, see sparsejax.parallel.distributed) run this same
function: each reads its rows of every global batch, all take part in every step, eval and save;
process 0 alone writes logs, metrics and commit markers. The data position is the index of the
next global batch, so a checkpoint resumes on any process count and mesh with the batches an
uninterrupted run would have seen; a data config that changed since the checkpoint (batch size,
sequence length, seed, dataset) fails unless ``allow_data_change``. SIGTERM to any one process
stops all of them at one agreed step, after one checkpoint. A watchdog (``step_timeout_s``) ends
every process whose loop stops making progress, so one stuck host cannot hang the job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import time

import jax
import numpy as np

from sparsejax import data as sdata
from sparsejax.config import Config, ConfigError
from sparsejax.parallel import distributed as dist
from sparsejax.parallel import sharding as shd
from sparsejax.scaling import flops
from sparsejax.train import step as steplib
from sparsejax.train.checkpoint import Checkpointer
from sparsejax.train.metrics import MetricWriter
from sparsejax.train.optim import make_optimizer
from sparsejax.train.state import abstract_state, init_state, model_spec

_log = logging.getLogger("sparsejax")


class TrainingDiverged(RuntimeError):
  """Too many non-finite steps in a row; the workdir keeps its last good checkpoint."""


@dataclasses.dataclass
class RunResult:
  workdir: pathlib.Path
  step: int
  last_metrics: dict
  eval_metrics: dict | None
  preempted: bool
  xla_flops_per_step: float | None = None  # XLA's count for the step, per device; None: no step


# With several processes and no explicit step_timeout_s, a step that makes no progress for this
# long ends every process (see distributed.StepWatchdog); one process runs without a watchdog.
DEFAULT_MULTIPROCESS_STEP_TIMEOUT_S = 1800.0


def resolve_dataset(cfg: Config) -> pathlib.Path:
  if cfg.data.path:
    path = pathlib.Path(cfg.data.path).expanduser()
    if not (path / "metadata.json").exists():
      raise FileNotFoundError(
          f"config.data.path: {path} is not a prepared dataset (no metadata.json); run "
          f"`python -m sparsejax.data.prepare --input <text files> --out {path}` first")
    return path
  return sdata.ensure_default_dataset(cfg.data.tokenizer)


def _check_workdir_config(workdir: pathlib.Path, cfg: Config) -> None:
  """Refuse to resume a workdir whose model differs: its checkpoints would not fit."""
  saved_path = workdir / "config.json"
  if not saved_path.exists():
    return
  saved = json.loads(saved_path.read_text())
  now = cfg.to_dict()
  for section in ("model", "attention", "ffn"):
    for key, value in now[section].items():
      old = saved.get(section, {}).get(key)
      if isinstance(old, list):
        old = tuple(tuple(v) if isinstance(v, list) else v for v in old)
      if old != value:
        raise ConfigError(f"config.{section}.{key}: {value!r} differs from {old!r} in the run "
                          f"already in {workdir}; use a new --workdir or the same config")


def _write_atomic(path: pathlib.Path, text: str) -> None:
  """Other processes may read it meanwhile (config.json at their start): never half-written."""
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


DATA_POSITION_FORMAT = "sparsejax.data-position/v1"
_DATA_KEYS = {"global_batch_size": "config.data.global_batch_size",
              "seq_len": "config.data.seq_len", "seed": "config.train.seed",
              "dataset": "the training dataset (metadata fingerprint)"}


def dataset_fingerprint(ds: sdata.TokenDataset) -> str:
  """Identity of a prepared train split for resume checks: tokenizer, dtype, shard names and
  token counts (not a content hash: re-preparing different text of identical size passes)."""
  meta = ds.metadata
  key = {k: meta.get(k) for k in ("format", "tokenizer", "vocab_size", "eos_id", "dtype")}
  key["train"] = meta["splits"]["train"]
  return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _data_position(cfg: Config, fingerprint: str, next_batch: int) -> dict:
  """The checkpoint's data item: the next global batch index and what it indexes into."""
  return {"format": DATA_POSITION_FORMAT, "next_batch": int(next_batch),
          "global_batch_size": cfg.data.global_batch_size, "seq_len": cfg.data.seq_len,
          "seed": cfg.train.seed, "dataset": fingerprint}


def resume_batch(saved: dict, now: dict, step: int, where: str,
                 allow_data_change: bool = False) -> int:
  """First global batch to read after restoring `step`, whose data item is `saved`, under the
  current data position `now` (same keys). Independent of process counts. A changed batch
  size / sequence length / seed / dataset raises a one-line ConfigError unless
  `allow_data_change`: then the new stream is entered past the sequences already consumed
  (rounded up to whole batches; with another order or dataset, some may repeat). A changed
  grad_accum_steps needs nothing: global_batch_size counts sequences per optimizer step, so
  the batch of a step does not depend on how it is split into micro-batches."""
  if saved.get("format") != DATA_POSITION_FORMAT:
    if "next_index" in saved:  # older checkpoints: a one-process grain iterator state
      return int(saved["next_index"])
    raise ConfigError(f"checkpoint step {step} in {where}: unknown data state {sorted(saved)}; "
                      "use a new --workdir")
  changed = [k for k in _DATA_KEYS if saved.get(k) != now[k]]
  if not changed:
    return int(saved["next_batch"])
  consumed = int(saved["next_batch"]) * int(saved["global_batch_size"])
  what = "; ".join(f"{_DATA_KEYS[k]}: {now[k]!r} now, {saved.get(k)!r} at step {step}"
                   for k in changed)
  if not allow_data_change:
    raise ConfigError(f"{what} (checkpoint in {where}): the run cannot continue on the batches "
                      "it would have seen; restore the old value, use a new --workdir, or pass "
                      "--allow_data_change to continue in the new data stream past the "
                      f"{consumed} sequences already consumed")
  first = -(-consumed // now["global_batch_size"])
  _log.warning("data changed since step %d (%s); allow_data_change: continuing at global batch "
               "%d of the new stream", step, what, first)
  return first


def _global_batch(local: dict[str, np.ndarray], sharding, global_batch_size: int) -> dict:
  return {k: jax.make_array_from_process_local_data(
      sharding, v, (global_batch_size,) + v.shape[1:]) for k, v in local.items()}


def _host_metrics(metrics: dict) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Split device metrics into scalars and vectors (vectors -> histograms + max/mean)."""
  scalars, vectors = {}, {}
  for k, v in jax.device_get(metrics).items():
    v = np.asarray(v)
    if v.ndim == 0:
      scalars[k] = float(v)
    else:
      vectors[k] = v
      scalars[f"{k}/max_over_mean"] = float(v.max() / max(float(v.mean()), 1e-12))
  return scalars, vectors


def evaluate_params(eval_fn, params, batches, sharding, bytes_per_token: float,
                    on_batch=None) -> dict:
  """Run the jitted eval step over host batches and reduce to loss / ppl / bits-per-byte, plus
  key usage (touched fraction, KL from uniform) for every sown ``usage*`` count vector.
  Every process passes the same full batches. ``on_batch(i)`` after each (a watchdog beat)."""
  totals = {"ce_sum": 0.0, "count": 0.0, "correct": 0.0}
  usage: dict[str, np.ndarray] = {}
  for i, batch in enumerate(batches):
    sums = jax.device_get(eval_fn(params, _global_batch(batch, sharding, len(batch["inputs"]))))
    if on_batch is not None:
      on_batch(i)
    for k in totals:
      totals[k] += float(sums[k])
    for k, v in sums["usage"].items():
      usage[k] = usage.get(k, 0) + np.asarray(v, np.float64)
  result = steplib.summarize_eval(totals, bytes_per_token)
  for k, counts in usage.items():
    for name, value in steplib.usage_summary(counts).items():
      result[f"{k}/{name}"] = value
  return result


def train_and_evaluate(cfg: Config, workdir: str | pathlib.Path,
                       devices: list | None = None, *, allow_data_change: bool = False,
                       step_timeout_s: float | None = None) -> RunResult:
  """Train `cfg` in `workdir` (resuming if it holds checkpoints) on `devices` (default: all).

  allow_data_change: resume although the data config changed since the checkpoint (see
  resume_batch). step_timeout_s: watchdog limit per step (None: DEFAULT_MULTIPROCESS_STEP_
  TIMEOUT_S with several processes, off with one; 0: off)."""
  workdir = pathlib.Path(workdir)
  _check_workdir_config(workdir, cfg)
  dataset_dir = resolve_dataset(cfg)  # bad inputs fail before anything is written
  workdir.mkdir(parents=True, exist_ok=True)
  train_ds = sdata.TokenDataset(dataset_dir, "train")
  vocab = train_ds.vocab_size
  if cfg.model.vocab_size and cfg.model.vocab_size < vocab:
    raise ConfigError(f"config.model.vocab_size: {cfg.model.vocab_size} is smaller than the "
                      f"dataset's vocabulary ({vocab}); set it to 0 to use the dataset's")
  vocab = max(vocab, cfg.model.vocab_size)

  devices = list(devices) if devices is not None else jax.devices()
  mesh = shd.make_mesh(cfg.mesh, devices)
  rules = shd.rules_of(cfg.mesh)
  micro = cfg.data.global_batch_size // cfg.train.grad_accum_steps
  shards = shd.batch_shards(mesh, rules)
  if micro % shards:
    raise ConfigError(f"config.data.global_batch_size: micro-batch {micro} (global batch / "
                      f"grad_accum_steps) must divide by the {shards} batch shards of the mesh")
  if cfg.data.global_batch_size % jax.process_count():
    raise ConfigError(f"config.data.global_batch_size: must divide by the "
                      f"{jax.process_count()} processes")
  if step_timeout_s is None:
    step_timeout_s = DEFAULT_MULTIPROCESS_STEP_TIMEOUT_S if jax.process_count() > 1 else 0.0

  spec = model_spec(cfg, vocab)
  optimizer = make_optimizer(cfg)
  ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints,
                      async_save=cfg.train.async_checkpoint)
  writer = MetricWriter(workdir)
  counts = flops.count(spec.abstract_model, cfg)
  peak = flops.peak_tflops(devices[0].device_kind, cfg.train.peak_tflops_per_device)
  tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
  fingerprint = dataset_fingerprint(train_ds)
  meta = {"config": cfg.to_dict(), "dataset": str(dataset_dir), "vocab_size": vocab,
          "process_count": jax.process_count(), "devices": len(devices),
          "mesh": dict(mesh.shape)}

  watchdog = dist.StepWatchdog(step_timeout_s, keep_on_error=jax.process_count() > 1)
  with watchdog:
    latest = ckpt.resume_step()
    next_batch = 0
    if latest is not None:
      next_batch = resume_batch(ckpt.restore_data(latest), _data_position(cfg, fingerprint, 0),
                                latest, str(ckpt.root), allow_data_change)
      target, shardings = abstract_state(spec, mesh, optimizer)
      state, _, saved_meta = ckpt.restore(latest, target)
      writer.truncate_after(latest)
      _log.info("resumed from checkpoint step %d in %s (saved by %s process(es), mesh %s)",
                latest, ckpt.root, saved_meta.get("process_count", 1), saved_meta.get("mesh"))
    else:
      state, shardings = init_state(spec, mesh, optimizer)
    start = int(jax.device_get(state["step"]))
    it = sdata.make_train_iterator(dataset_dir, seq_len=cfg.data.seq_len,
                                   global_batch_size=cfg.data.global_batch_size,
                                   seed=cfg.train.seed, start_batch=next_batch)

    if jax.process_index() == 0:
      _write_atomic(workdir / "config.json", cfg.to_json())
      info = {"dataset": str(dataset_dir), "vocab_size": vocab, "devices": len(devices),
              "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape),
              "processes": jax.process_count(), "tokens_per_step": tokens_per_step,
              "peak_tflops_per_device": peak, **counts.as_metrics()}
      _write_atomic(workdir / "run_info.json", json.dumps(info, indent=1))
      _log.info("model: %s", json.dumps(info))
    if start == 0:
      writer.write(0, counts.as_metrics(), prefix="model/")

    batch_sh = shd.batch_sharding(mesh, rules)
    with shd.activation_sharding(mesh, rules):
      train_fn = steplib.jit_train_step(spec.graphdef, cfg, optimizer, shardings, batch_sh)
      eval_fn = jax.jit(steplib.make_eval_step(spec.graphdef),
                        in_shardings=(shardings["params"], batch_sh))
    val_batches = _val_batches(dataset_dir, cfg)
    val_bpt = sdata.TokenDataset(dataset_dir, "val").bytes_per_token if val_batches else 1.0

    def save(step_no):
      watchdog.beat(f"checkpoint save at step {step_no}", slow=True)
      ckpt.save(step_no, state, _data_position(cfg, fingerprint, next_batch), meta)
      watchdog.beat(f"checkpoint save at step {step_no}")

    eval_compiled = False

    def run_eval(step_no):
      nonlocal eval_compiled
      if not val_batches:
        return None
      # The first eval compiles the eval step: a slow interval for the watchdog.
      watchdog.beat(f"eval at step {step_no}", slow=not eval_compiled)
      eval_compiled = True
      with shd.activation_sharding(mesh, rules):
        result = evaluate_params(eval_fn, state["params"], val_batches, batch_sh, val_bpt,
                                 on_batch=lambda i: watchdog.beat(
                                     f"eval batch {i + 1} at step {step_no}"))
      writer.write(step_no, {k: v for k, v in result.items()}, prefix="eval/")
      if jax.process_index() == 0:
        _log.info("eval step %d: %s", step_no, json.dumps(result))
      return result

    bar = None
    if cfg.train.progress_bar and jax.process_index() == 0:
      from tqdm import tqdm
      bar = tqdm(total=cfg.train.steps, initial=start, desc="train", unit="step",
                 mininterval=2.0)

    last, eval_result, preempted, xla_flops = {}, None, False, None
    t_window, steps_window = time.perf_counter(), 0
    prev = None
    with dist.Preemption() as preemption, shd.activation_sharding(mesh, rules):
      for step_no in range(start, cfg.train.steps):
        batch = _global_batch(next(it), batch_sh, cfg.data.global_batch_size)
        next_batch += 1
        if xla_flops is None:  # compiles the step once: the call below reuses the executable
          xla_flops = xla_flops_per_step(train_fn, state, batch)
          if jax.process_index() == 0:
            info["xla_flops_per_step"] = xla_flops
            _write_atomic(workdir / "run_info.json", json.dumps(info, indent=1))
        state, metrics = train_fn(state, batch)
        done = step_no + 1
        # Check the previous step's finiteness while this one runs (one step of lag, no stall).
        if prev is not None:
          _check_finite(prev, cfg, ckpt)
          watchdog.beat(f"step {done - 1}")  # that step's results reached the host
        prev = metrics
        steps_window += 1
        if done % cfg.train.log_every_steps == 0 or done == cfg.train.steps:
          last, vectors = _host_metrics(metrics)
          watchdog.beat(f"step {done}")
          for name, values in vectors.items():
            writer.histogram(done, name, values)
          dt = time.perf_counter() - t_window
          last["tokens_per_s"] = tokens_per_step * steps_window / dt
          last["step_ms"] = 1000.0 * dt / steps_window
          last["flops_per_token"] = counts.flops_per_token
          if peak:
            last["mfu"] = (counts.flops_per_token * last["tokens_per_s"]
                           / (peak * 1e12 * len(devices)))
          last["perplexity"] = float(np.exp(min(last["ce_loss"], 700.0)))
          last["bits_per_byte"] = last["ce_loss"] / np.log(2) / train_ds.bytes_per_token
          writer.write(done, last)
          if bar is not None:
            bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
          t_window, steps_window = time.perf_counter(), 0
        if bar is not None:
          bar.update(1)
        if cfg.train.eval_every_steps and done % cfg.train.eval_every_steps == 0 \
            and done != cfg.train.steps:
          eval_result = run_eval(done)
        ckpt.commit_finished()
        stop = preemption.reached(done)
        slot_end = done == cfg.train.stop_at_step
        if stop or slot_end or done == cfg.train.steps or (
            cfg.train.checkpoint_every_steps and done % cfg.train.checkpoint_every_steps == 0):
          _check_finite(metrics, cfg, ckpt)
          save(done)
        if stop:
          preempted = True
          _log.warning("stopped at step %d by SIGTERM%s; checkpoint saved; re-run the same "
                       "command to resume", done,
                       " (agreed by all processes)" if preemption.synced else "")
          break
        if slot_end:
          _log.info("stopped at config.train.stop_at_step=%d; re-run to continue", done)
          break
      if prev is not None:
        _check_finite(prev, cfg, ckpt)
    if bar is not None:
      bar.close()
    final_step = int(jax.device_get(state["step"]))
    if not preempted and final_step == cfg.train.steps:
      eval_result = run_eval(final_step)
    watchdog.beat("waiting for the last checkpoint save", slow=True)
    ckpt.close()
  writer.close()
  return RunResult(workdir, final_step, last, eval_result, preempted, xla_flops)


def xla_flops_per_step(jitted, *args, compiler_options: dict | None = None) -> float:
  """FLOPs of one call of `jitted` on `args` by XLA's cost analysis of the compiled program, per
  device. A loop body (lax.scan, e.g. gradient accumulation) is counted once per unrolled copy,
  not times its trip count."""
  cost = jitted.lower(*args).compile(compiler_options).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def _val_batches(dataset_dir, cfg: Config):
  try:
    return sdata.make_eval_batches(dataset_dir, seq_len=cfg.data.seq_len,
                                   batch_size=cfg.data.global_batch_size,
                                   max_batches=cfg.train.eval_batches)
  except ValueError as e:  # val split shorter than one window
    _log.warning("no periodic eval: %s", e)
    return []


def _check_finite(metrics, cfg: Config, ckpt: Checkpointer) -> None:
  in_a_row = int(jax.device_get(metrics["nonfinite_in_a_row"]))
  if in_a_row >= cfg.train.max_nonfinite_in_a_row:
    ckpt.wait()
    raise TrainingDiverged(
        f"{in_a_row} consecutive steps had a non-finite loss or gradient (updates were skipped); "
        f"last committed checkpoint: step {ckpt.latest_step()}; lower config.optim.lr, raise "
        f"config.optim.warmup_steps or check the data, then re-run to resume")
