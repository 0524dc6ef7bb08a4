"""``train_and_evaluate(cfg, workdir)``: the whole training run, importable and resumable.

It reads as setup (``_Run.__init__``: data, mesh, model, optimizer, checkpoint or fresh state,
jitted steps) -> the step loop (``_Run.train``) -> hooks after each step (logging, periodic eval,
checkpoint, preemption, a slot's end).

Re-running on the same workdir resumes from the latest committed checkpoint (model, optimizer,
step, RNG and the data position, sparsejax/data/position.py), so a resumed run is bitwise
identical on CPU to an uninterrupted one; a changed parameter-shaping config field fails with one
line naming it. SIGTERM saves a checkpoint at the next step boundary and returns cleanly.

Several processes (``jax.distributed``, see sparsejax.parallel.distributed) run this same
function: each reads its rows of every global batch, all take part in every step, eval and save;
process 0 alone writes logs, metrics and commit markers. SIGTERM to any one process stops all of
them at one agreed step, after one checkpoint. A watchdog (``step_timeout_s``) ends every process
whose loop stops making progress, so one stuck host cannot hang the job.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
import time

import jax
from tqdm import tqdm

from sparsejax import data as sdata
from sparsejax.config import Config
from sparsejax.configure import check_resume
from sparsejax.data import position
from sparsejax.errors import ConfigError
from sparsejax.eval.core import evaluate_params, make_eval_step, validation_subset
from sparsejax.layers import registry
from sparsejax.models import accounting
from sparsejax.parallel import distributed as dist
from sparsejax.parallel import hardware, mesh as mesh_lib, sharding as shd
from sparsejax.finetune import hooks as finetune
from sparsejax.train import step as steplib
from sparsejax.train.checkpoint import Checkpointer
from sparsejax.train.init_from import load_params, restore_state
from sparsejax.train.metrics import (MetricWriter, derived_metrics, host_metrics,
                                     warn_low_usage, write_atomic)
from sparsejax.train.optim import make_optimizer
from sparsejax.train.state import init_state, model_spec, state_shardings

_log = logging.getLogger("sparsejax")

# With several processes and no explicit step_timeout_s, a step that makes no progress for this
# long ends every process (see distributed.StepWatchdog); one process runs without a watchdog.
DEFAULT_MULTIPROCESS_STEP_TIMEOUT_S = 1800.0


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


class _Run:
  """One training run's state and hooks (see the module docstring)."""

  def __init__(self, cfg: Config, workdir: pathlib.Path, devices, allow_data_change: bool,
               step_timeout_s: float | None, init_params=None):
    self.cfg, self.workdir, self.init_params, self.allow_data_change = (
        cfg, workdir, init_params, allow_data_change)
    if (workdir / "config.json").exists():  # a run to resume: its parameters must fit
      check_resume(json.loads((workdir / "config.json").read_text()), cfg, str(workdir))
    self.dataset_dir = position.resolve_dataset(cfg)  # bad inputs fail before anything is written
    workdir.mkdir(parents=True, exist_ok=True)
    self.train_ds = sdata.TokenDataset(self.dataset_dir, "train")
    vocab = self.train_ds.vocab_size
    if cfg.model.vocab_size and cfg.model.vocab_size < vocab:
      raise ConfigError(f"config.model.vocab_size: {cfg.model.vocab_size} is smaller than the "
                        f"dataset's vocabulary ({vocab}); set it to 0 to use the dataset's")
    vocab = max(vocab, cfg.model.vocab_size)
    self.devices = list(devices) if devices is not None else jax.devices()
    self.mesh = mesh_lib.make_mesh(cfg.mesh, self.devices)
    self.rules = registry.logical_rules(cfg.mesh)
    shd.check_global_batch(cfg.data.global_batch_size, cfg.train.grad_accum_steps, self.mesh,
                           self.rules)
    if step_timeout_s is None:
      step_timeout_s = DEFAULT_MULTIPROCESS_STEP_TIMEOUT_S if jax.process_count() > 1 else 0.0
    self.spec = model_spec(cfg, vocab)
    self.optimizer = make_optimizer(cfg)
    self.ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints,
                             async_save=cfg.train.async_checkpoint,
                             on_error=cfg.train.on_save_error)
    self.writer = MetricWriter(workdir)
    self.counts = accounting.count(self.spec.abstract_model, cfg, vocab_size=vocab)
    self.peak = hardware.peak_tflops(self.devices[0].device_kind,
                                     cfg.train.peak_tflops_per_device)
    self.tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    self.fingerprint = position.dataset_fingerprint(self.train_ds)
    self.meta = {"config": cfg.to_dict(), "dataset": str(self.dataset_dir), "vocab_size": vocab,
                 "process_count": jax.process_count(), "devices": len(self.devices),
                 "mesh": dict(self.mesh.shape)}
    self.info = {"dataset": str(self.dataset_dir), "vocab_size": vocab,
                 "devices": len(self.devices), "device_kind": self.devices[0].device_kind,
                 "mesh": dict(self.mesh.shape), "processes": jax.process_count(),
                 "tokens_per_step": self.tokens_per_step, "peak_tflops_per_device": self.peak,
                 **self.counts.as_metrics()}
    self.watchdog = dist.StepWatchdog(step_timeout_s, keep_on_error=jax.process_count() > 1)
    self.is_chief = jax.process_index() == 0
    self.eval_compiled = False
    self.warned: set[str] = set()  # layers already reported for low retrieval usage

  # ---- setup inside the watchdog ----
  def restore_or_init(self) -> None:
    cfg, ckpt = self.cfg, self.ckpt
    latest = ckpt.resume_step()
    self.next_batch = 0
    if latest is not None:
      self.next_batch = position.resume_batch(
          ckpt.restore_data(latest), position.data_position(cfg, self.fingerprint, 0), latest,
          str(ckpt.root), self.allow_data_change)
      self.state, saved_meta, self.shardings = restore_state(ckpt, latest, self.spec, self.mesh,
                                                             self.optimizer)
      self.writer.truncate_after(latest)
      _log.info("resumed from checkpoint step %d in %s (saved by %s process(es), mesh %s)",
                latest, ckpt.root, saved_meta.get("process_count", 1), saved_meta.get("mesh"))
    else:  # random weights, or given / another run's (init_from), with a fresh optimizer
      given = self.init_params or (functools.partial(load_params, cfg.train.init_from)
                                   if cfg.train.init_from else None)
      self.state, self.shardings = init_state(self.spec, self.mesh, self.optimizer, params=(
          None if given is None else given(self.spec, state_shardings(
              self.spec, self.mesh, self.optimizer)["params"])))
      self.writer.truncate_after(-1)  # a run killed before its first save starts over
    self.start = int(jax.device_get(self.state["step"]))
    self.it = sdata.make_train_iterator(self.dataset_dir, seq_len=cfg.data.seq_len,
                                        global_batch_size=cfg.data.global_batch_size,
                                        seed=cfg.train.seed, start_batch=self.next_batch)
    if self.is_chief:
      write_atomic(self.workdir / "config.json", cfg.to_json())
      write_atomic(self.workdir / "run_info.json", json.dumps(self.info, indent=1))
      _log.info("model: %s", json.dumps(self.info))
    if self.start == 0:
      self.writer.write(0, self.counts.as_metrics(), prefix="model/")
    self.batch_sh = shd.batch_sharding(self.mesh, self.rules)
    with shd.activation_sharding(self.mesh, self.rules):
      self.train_fn = steplib.jit_train_step(self.spec.graphdef, cfg, self.optimizer,
                                             self.shardings, self.batch_sh)
      self.eval_fn = jax.jit(make_eval_step(self.spec.graphdef),
                             in_shardings=(self.shardings["params"], self.batch_sh))
    self.eval_params_fn = finetune.jitted_inference_params(cfg, self.shardings["params"])
    self.val_batches, self.val_bpt, self.val_total = validation_subset(self.dataset_dir, cfg)

  # ---- hooks ----
  def save(self, step_no: int) -> None:
    self.watchdog.beat(f"checkpoint save at step {step_no}", slow=True)
    self.ckpt.save(step_no, self.state,
                   position.data_position(self.cfg, self.fingerprint, self.next_batch), self.meta)
    self.watchdog.beat(f"checkpoint save at step {step_no}")

  def evaluate(self, step_no: int) -> dict | None:
    if not self.val_batches:
      return None
    # The first eval compiles the eval step: a slow interval for the watchdog.
    self.watchdog.beat(f"eval at step {step_no}", slow=not self.eval_compiled)
    self.eval_compiled = True
    with shd.activation_sharding(self.mesh, self.rules):
      params = self.eval_params_fn(self.state["params"], self.state["opt_state"],
                                   step_no)  # weight sparsity / LoRA: the weights it computes with
      result = evaluate_params(self.eval_fn, params, self.val_batches,
                               self.batch_sh, self.val_bpt,
                               on_batch=lambda i: self.watchdog.beat(
                                   f"eval batch {i + 1} at step {step_no}"))
    # A subset of the split unless eval_batches covers it: say which, in the log and metrics
    # (python -m sparsejax.eval evaluates the whole split by default).
    result = {**result, "batches": len(self.val_batches), "split_batches": self.val_total}
    self.writer.write(step_no, result, prefix="eval/")
    if self.is_chief:
      _log.info("eval step %d on %d of %d val batches (spread over the split): %s", step_no,
                len(self.val_batches), self.val_total, json.dumps(result))
    return result

  def log(self, done: int, metrics, window_s: float, window_steps: int) -> dict:
    last, vectors = host_metrics(metrics)
    self.watchdog.beat(f"step {done}")
    for name, values in vectors.items():
      self.writer.histogram(done, name, values)
    last.update(derived_metrics(
        last, tokens_per_s=self.tokens_per_step * window_steps / window_s,
        step_ms=1000.0 * window_s / window_steps, flops_per_token=self.counts.flops_per_token,
        peak_flops=(self.peak or 0.0) * 1e12 * len(self.devices),
        bytes_per_token=self.train_ds.bytes_per_token))
    self.writer.write(done, last)
    warn_low_usage(last, self.cfg.train.min_touched_fraction, self.warned, done)
    return last

  def check_finite(self, metrics) -> None:
    in_a_row = int(jax.device_get(metrics["nonfinite_in_a_row"]))
    if in_a_row >= self.cfg.train.max_nonfinite_in_a_row:
      self.ckpt.wait()
      raise TrainingDiverged(
          f"{in_a_row} consecutive steps had a non-finite loss or gradient (updates were "
          f"skipped); last committed checkpoint: step {self.ckpt.latest_step()}; lower "
          "config.optim.lr, raise config.optim.warmup_steps or check the data, then re-run to "
          "resume")

  # ---- the loop ----
  def train(self) -> RunResult:
    cfg, t = self.cfg, self.cfg.train
    bar = (tqdm(total=t.steps, initial=self.start, desc="train", unit="step", mininterval=2.0)
           if t.progress_bar and self.is_chief else None)
    last, eval_result, preempted, xla_flops, prev = {}, None, False, None, None
    t_window, steps_window = time.perf_counter(), 0
    with dist.Preemption() as preemption, shd.activation_sharding(self.mesh, self.rules):
      for step_no in range(self.start, t.steps):
        batch = shd.global_batch(next(self.it), self.batch_sh, cfg.data.global_batch_size)
        self.next_batch += 1
        if xla_flops is None:  # compiles the step once: the call below reuses the executable
          xla_flops = steplib.compiled_flops(self.train_fn, self.state, batch)
          if self.is_chief:
            self.info["xla_flops_per_step"] = xla_flops
            write_atomic(self.workdir / "run_info.json", json.dumps(self.info, indent=1))
        self.state, metrics = self.train_fn(self.state, batch)
        done = step_no + 1
        # Check the previous step's finiteness while this one runs (one step of lag, no stall).
        if prev is not None:
          self.check_finite(prev)
          self.watchdog.beat(f"step {done - 1}")  # that step's results reached the host
        prev = metrics
        steps_window += 1
        if done % t.log_every_steps == 0 or done == t.steps:
          last = self.log(done, metrics, time.perf_counter() - t_window, steps_window)
          if bar is not None:
            bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
          t_window, steps_window = time.perf_counter(), 0
        if bar is not None:
          bar.update(1)
        if t.eval_every_steps and done % t.eval_every_steps == 0 and done != t.steps:
          eval_result = self.evaluate(done)
        self.ckpt.commit_finished()
        stop = preemption.reached(done)
        slot_end = done == t.stop_at_step
        if stop or slot_end or done == t.steps or (
            t.checkpoint_every_steps and done % t.checkpoint_every_steps == 0):
          self.check_finite(metrics)
          self.save(done)
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
        self.check_finite(prev)
    if bar is not None:
      bar.close()
    final_step = int(jax.device_get(self.state["step"]))
    if not preempted and final_step == t.steps:
      eval_result = self.evaluate(final_step)
    return RunResult(self.workdir, final_step, last, eval_result, preempted, xla_flops)


def train_and_evaluate(cfg: Config, workdir: str | pathlib.Path,
                       devices: list | None = None, *, allow_data_change: bool = False,
                       step_timeout_s: float | None = None) -> RunResult:
  """Train `cfg` in `workdir` (resuming if it holds checkpoints) on `devices` (default: all).

  allow_data_change: resume although the data config changed since the checkpoint (see
  sparsejax.data.position.resume_batch). step_timeout_s: watchdog limit per step (None:
  DEFAULT_MULTIPROCESS_STEP_TIMEOUT_S with several processes, off with one; 0: off)."""
  run = _Run(cfg, pathlib.Path(workdir), devices, allow_data_change, step_timeout_s)
  with run.watchdog:
    run.restore_or_init()
    result = run.train()
    run.watchdog.beat("waiting for the last checkpoint save", slow=True)
    run.ckpt.close()
  run.writer.close()
  return result


def write_start_checkpoint(cfg: Config, workdir: str | pathlib.Path, init_params,
                           devices: list | None = None) -> pathlib.Path:
  """Step 0 of ``cfg``: ``init_params(spec, param_shardings)``, a fresh optimizer, no training."""
  if Checkpointer(workdir, async_save=False).committed_steps():
    raise ConfigError(f"--out {workdir} already holds a run; choose a new directory")
  run = _Run(cfg, pathlib.Path(workdir), devices, False, 0.0, init_params)
  with run.watchdog:
    run.restore_or_init()
    run.save(0)
    run.ckpt.close()
  run.writer.close()
  return run.workdir
