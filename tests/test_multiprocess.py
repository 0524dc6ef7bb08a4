"""Several processes on one machine: jax.distributed over localhost, fake CPU devices, gloo.

The children are started here with subprocess.Popen and the launch environment contract
(JAX_COORDINATOR_ADDRESS, SPARSEJAX_NUM_PROCESSES, SPARSEJAX_PROCESS_ID, SPARSEJAX_LOCAL_DEVICES),
each with a timeout, so a hang fails a test instead of hanging CI.

Equality: the reference is one process x 8 devices under jax.distributed, so its collectives
are gloo's like those of 2 processes x 4 devices; then losses and parameters agree bitwise
(measured, and asserted below). The default in-process run (no jax.distributed: XLA's own
in-process all-reduce) sums across devices in another order: its losses differ by at most one
float32 ulp (relative < 1e-7) over the first 6 steps of the tiny model (measured), checked with
rtol 1e-5 in test_in_process_run_matches_within_reduction_order.

Cost: ~135 CPU seconds with a cold compile cache (mostly the children's start-up and compiles).
"""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sparsejax.config import ConfigError
from sparsejax.configure import load_config
from sparsejax.data import make_train_iterator, position
from sparsejax.eval.checkpoint import evaluate
from sparsejax.parallel import distributed as dist
from sparsejax.parallel.mesh import make_mesh
from sparsejax.train import loop as looplib
from sparsejax.train.checkpoint import Checkpointer
from sparsejax.train.state import abstract_state, model_spec

REPO = pathlib.Path(__file__).resolve().parent.parent
STEPS = 20
OVERRIDES = {"train.steps": STEPS, "train.checkpoint_every_steps": 10, "train.log_every_steps": 1,
             "train.eval_every_steps": 0, "train.eval_batches": 1, "train.keep_checkpoints": 5,
             "train.progress_bar": False}
TIMEOUT = 150  # seconds for any one launch: a hang fails the test


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


# configs/dense.py's train section has no stop_at_step entry, so --config.train.stop_at_step
# cannot be given on the command line; this config file adds it.
CONFIG_FILE = """
from sparsejax.configure import load_config_dict
def get_config(arg=None):
  c = load_config_dict("configs/dense.py:tiny")
  c.train.stop_at_step = 0
  return c
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  path = tmp_path_factory.mktemp("config") / "tiny_stoppable.py"
  path.write_text(CONFIG_FILE)
  return path


def train_args(config, workdir, overrides=None, flags=()):
  over = {**OVERRIDES, **(overrides or {})}
  return (["--config", str(config), "--workdir", str(workdir)]
          + [f"--config.{k}={v}" for k, v in over.items()] + list(flags))


class Job:
  """`processes` copies of one command started with the env contract; output goes to files
  (no pipe can fill up and block a child)."""

  def __init__(self, args, processes: int, local_devices: int, logdir, *,
               module="sparsejax.train", script=None, extra_env=None):
    port = free_port()
    entry = [str(script)] if script else ["-m", module]
    self.logs = []
    self.procs = []
    logdir = pathlib.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    tag = f"{module.rsplit('.', 1)[-1]}-{port}"
    for pid in range(processes):
      env = {**os.environ, "XLA_FLAGS": os.environ["SPARSEJAX_TEST_XLA_FLAGS"],
             "JAX_PLATFORMS": "cpu",
             "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
             "SPARSEJAX_NUM_PROCESSES": str(processes), "SPARSEJAX_PROCESS_ID": str(pid),
             "SPARSEJAX_LOCAL_DEVICES": str(local_devices),
             "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5", **(extra_env or {})}
      out, err = logdir / f"{tag}.{pid}.out", logdir / f"{tag}.{pid}.err"
      self.logs.append((out, err))
      with out.open("w") as fo, err.open("w") as fe:
        self.procs.append(subprocess.Popen([sys.executable, *entry, *args], cwd=REPO, env=env,
                                           stdout=fo, stderr=fe, text=True))

  def running(self) -> bool:
    return all(p.poll() is None for p in self.procs)

  def finish(self, timeout=TIMEOUT):
    """[(returncode, stdout, stderr)] of every process; kills all and fails on a hang."""
    deadline = time.time() + timeout
    try:
      for p in self.procs:
        p.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      for p in self.procs:
        p.kill()
        p.wait()
      tails = [err.read_text()[-2000:] for _, err in self.logs]
      pytest.fail(f"processes still running after {timeout} s; stderr tails: {tails}")
    return [(p.returncode, out.read_text(), err.read_text())
            for p, (out, err) in zip(self.procs, self.logs)]


def summaries(stdout: str) -> list[dict]:
  """The JSON summary lines of a process's stdout (gloo prints its own lines there too)."""
  return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def run_ok(args, processes, local_devices, logdir, **kw):
  results = Job(args, processes, local_devices, logdir, **kw).finish()
  for rc, _, err in results:
    assert rc == 0, err[-3000:]
  return summaries(results[0][1])[-1], results


def losses(workdir):
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [(r["step"], r["loss"]) for r in map(json.loads, filter(None, lines)) if "loss" in r]


def params_at(workdir, step):
  """Parameters of a committed step, restored in this process onto one device."""
  cfg = load_config("configs/dense.py:tiny")
  target, _ = abstract_state(model_spec(cfg, 257), make_mesh(cfg.mesh, jax.devices()[:1]))
  ckpt = Checkpointer(workdir, async_save=False)
  state, _, meta = ckpt.restore(step, target)
  ckpt.close()
  return jax.tree.map(np.asarray, state["params"]), meta


def assert_trees_equal(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    assert np.array_equal(x, y), f"{jax.tree_util.keystr(path)} differs"


def copy_step(src, dst, step):
  """A workdir holding only `step` of `src` (its checkpoint, marker, config and metrics)."""
  (dst / "commits").mkdir(parents=True)
  shutil.copytree(src / "checkpoints" / str(step), dst / "checkpoints" / str(step))
  shutil.copy(src / "commits" / f"{step}.json", dst / "commits" / f"{step}.json")
  for name in ("config.json", "metrics.jsonl"):
    shutil.copy(src / name, dst / name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, config, default_dataset):
  """An uninterrupted run: one process x 8 devices under jax.distributed (gloo collectives)."""
  workdir = tmp_path_factory.mktemp("reference")
  summary, _ = run_ok(train_args(config, workdir), 1, 8, tmp_path_factory.mktemp("logs"))
  assert summary["step"] == STEPS and not summary["preempted"]
  assert [s for s, _ in losses(workdir)] == list(range(1, STEPS + 1))
  return workdir


def test_sigterm_to_one_process_then_resume_on_another_process_count(tmp_path, config,
                                                                     reference):
  """2 x 4 from scratch; SIGTERM to process 1 only; both stop and save at one agreed step;
  the run resumes on 1 x 8 and every loss equals the uninterrupted run's, bitwise."""
  run = tmp_path / "run"
  job = Job(train_args(config, run), 2, 4, tmp_path)
  deadline = time.time() + TIMEOUT
  while time.time() < deadline and job.running():
    try:
      if any(step >= 2 for step, _ in losses(run)):
        break
    except (FileNotFoundError, json.JSONDecodeError):  # not there yet / line being written
      pass
    time.sleep(0.05)
  job.procs[1].send_signal(signal.SIGTERM)
  results = job.finish()
  for rc, _, err in results:
    assert rc == 0, err[-3000:]
  (summary,) = summaries(results[0][1])
  assert summary["preempted"] and 2 <= summary["step"] < STEPS, summary
  stopped = summary["step"]
  assert summaries(results[1][1]) == []  # only process 0 prints the summary
  for _, _, err in results:  # each process stopped at the same agreed step
    assert f"stopped at step {stopped} by SIGTERM (agreed by all processes)" in err
  ckpt = Checkpointer(run)
  assert ckpt.latest_step() == stopped
  meta = ckpt.restore_meta(stopped)
  assert meta["process_count"] == 2 and meta["devices"] == 8
  assert losses(run) == losses(reference)[:stopped]  # 2 x 4 == 1 x 8, bitwise

  # another process count: restore + seek the data by step
  summary, _ = run_ok(train_args(config, run), 1, 8, tmp_path)
  assert summary["step"] == STEPS and not summary["preempted"]
  assert losses(run) == losses(reference)
  assert_trees_equal(params_at(run, STEPS)[0], params_at(reference, STEPS)[0])


def test_one_process_checkpoint_continues_on_two_processes(tmp_path, config, reference):
  """A checkpoint written by 1 x 8 continues on 2 x 4 with the same batches and losses (and a
  periodic eval on both processes); the 2-process checkpoint then evaluates on 2 processes
  (the eval CLI) and in this process on one device."""
  run = tmp_path / "run"
  copy_step(reference, run, 10)
  summary, _ = run_ok(train_args(config, run, {"train.stop_at_step": 13,
                                               "train.eval_every_steps": 12}), 2, 4, tmp_path)
  assert summary["step"] == 13
  assert losses(run) == losses(reference)[:13]
  records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "eval/loss" in r] == [12]
  _, meta = params_at(run, 13)
  assert meta["process_count"] == 2 and meta["mesh"]["data"] == 8
  # The commit marker lists files process 1 wrote: it was written after both finished.
  files = json.loads((run / "commits" / "13.json").read_text())["files"]
  assert any("process_1" in f for f in files), sorted(files)

  one = evaluate(run, devices=jax.devices()[:1], max_batches=1)
  _, results = run_ok(["--workdir", str(run), "--max_batches", "1"], 2, 4, tmp_path,
                      module="sparsejax.eval")
  (two,) = summaries(results[0][1])
  assert summaries(results[1][1]) == []
  assert one["step"] == two["step"] == 13 and (one["devices"], two["devices"]) == (1, 8)
  # one device vs 8 gloo devices: the same tokens, summed in another order
  np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)


def test_in_process_run_matches_within_reduction_order(tmp_path, reference):
  """No jax.distributed: XLA's in-process all-reduce over the 8 devices of this process. Same
  batches and math; only the cross-device summation order differs (see module docstring)."""
  cfg = load_config("configs/dense.py:tiny", **{**OVERRIDES, "train.stop_at_step": 4,
                                                "train.checkpoint_every_steps": 0})
  looplib.train_and_evaluate(cfg, tmp_path, devices=jax.devices())
  ours, ref = np.array(losses(tmp_path)), np.array(losses(reference)[:4])
  assert np.array_equal(ours[:, 0], ref[:, 0])
  np.testing.assert_allclose(ours[:, 1], ref[:, 1], rtol=1e-5, atol=0)


def test_stuck_process_ends_the_job_via_watchdog(tmp_path, config, default_dataset):
  """Process 1 hangs at step 3 (test fault in tests/mp_child.py); process 0 then waits in a
  collective. Both exit non-zero within the step timeout instead of hanging. The checkpoint
  committed before the hang (FSDP: both processes wrote shards) restores onto one device."""
  run = tmp_path / "run"
  # Synchronous saves: step 2 is committed before step 3 starts (an async save still being
  # finalised when the job dies has no commit marker and is, correctly, never restored).
  job = Job(train_args(config, run, {"train.checkpoint_every_steps": 2, "mesh.data": 1,
                                     "mesh.fsdp": -1, "train.async_checkpoint": False},
                       ["--step_timeout_s=5"]),
            2, 4, tmp_path, script=REPO / "tests" / "mp_child.py",
            extra_env={"MP_CHILD_STALL": "1:3"})
  (rc0, _, err0), (rc1, _, err1) = job.finish(timeout=120)
  assert "mp_child: process 1 hangs at step 3" in err1
  # Usually both watchdogs fire (75). If process 1's fires first, process 0 fails on the closed
  # connection; its watch is kept on error (it would otherwise wait ~100 s in jax's exit-time
  # shutdown barrier for the dead peer's heartbeat), so it still ends well before that.
  assert rc0 != 0 and rc1 != 0, (err0[-2000:], err1[-2000:])
  fired = [i for i, (rc, err) in enumerate(((rc0, err0), (rc1, err1)))
           if rc == dist.WATCHDOG_EXIT_CODE
           and f"watchdog: process {i} of 2 made no progress" in err and "after step 3" in err]
  assert fired, (err0[-2000:], err1[-2000:])
  # The cause: the 5 s step timeout, measured from the last progress before the hang; far below
  # jax's 100 s heartbeat timeout, which would otherwise have ended the job.
  for i in fired:
    idle, limit = map(float, re.search(r"made no progress for (\d+) s \(limit (\d+) s\)",
                                       (err0, err1)[i]).groups())
    assert limit == 5 and limit <= idle < 100  # (both printed rounded to whole seconds)
  assert Checkpointer(run).latest_step() == 2
  files = json.loads((run / "commits" / "2.json").read_text())["files"]
  assert any(f.startswith("state/ocdbt.process_1/") for f in files), sorted(files)
  params, meta = params_at(run, 2)
  assert meta["mesh"]["fsdp"] == 8
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


# ---- without spawning -------------------------------------------------------------------------

@pytest.mark.parametrize("env, expected", [
    ({}, dist.Plan("single")),
    ({"SPARSEJAX_LOCAL_DEVICES": "4"}, dist.Plan("single", local_devices=4)),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "SPARSEJAX_NUM_PROCESSES": "2",
      "SPARSEJAX_PROCESS_ID": "1", "SPARSEJAX_LOCAL_DEVICES": "4"},
     dist.Plan("explicit", "h:1", 2, 1, 4)),
    ({"SPARSEJAX_DISTRIBUTED": "auto"}, dist.Plan("auto")),
    ({"SPARSEJAX_DISTRIBUTED": "AUTO", "SPARSEJAX_NUM_PROCESSES": "4"},
     dist.Plan("auto", num_processes=4)),
    ({"SPARSEJAX_DISTRIBUTED": "off", "SPARSEJAX_PROCESS_ID": "3"}, dist.Plan("single")),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "SPARSEJAX_NUM_PROCESSES": "1",
      "SPARSEJAX_PROCESS_ID": "0", "SPARSEJAX_INIT_TIMEOUT_S": "30",
      "SPARSEJAX_HEARTBEAT_TIMEOUT_S": "20"},
     dist.Plan("explicit", "h:1", 1, 0, init_timeout_s=30, heartbeat_timeout_s=20)),
])
def test_env_contract_parses(env, expected):
  assert dist.parse_env(env) == expected


@pytest.mark.parametrize("env, message", [
    ({"SPARSEJAX_PROCESS_ID": "1"}, "SPARSEJAX_PROCESS_ID set but JAX_COORDINATOR_ADDRESS and "
                                    "SPARSEJAX_NUM_PROCESSES not"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "SPARSEJAX_NUM_PROCESSES": "2"},
     "SPARSEJAX_PROCESS_ID not"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "SPARSEJAX_DISTRIBUTED=auto"),
    ({"JAX_COORDINATOR_ADDRESS": "h", "SPARSEJAX_NUM_PROCESSES": "2",
      "SPARSEJAX_PROCESS_ID": "0"}, "must be host:port"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "SPARSEJAX_NUM_PROCESSES": "2",
      "SPARSEJAX_PROCESS_ID": "2"}, "SPARSEJAX_PROCESS_ID=2 must be < SPARSEJAX_NUM_PROCESSES=2"),
    ({"SPARSEJAX_NUM_PROCESSES": "two"}, "SPARSEJAX_NUM_PROCESSES='two' is not an integer"),
    ({"SPARSEJAX_NUM_PROCESSES": "0"}, "SPARSEJAX_NUM_PROCESSES=0 must be >= 1"),
    ({"SPARSEJAX_LOCAL_DEVICES": "0"}, "SPARSEJAX_LOCAL_DEVICES=0 must be >= 1"),
    ({"SPARSEJAX_DISTRIBUTED": "slurm"}, "use 'auto'"),
])
def test_half_specified_env_is_one_line_error(env, message):
  with pytest.raises(dist.DistributedEnvError) as e:
    dist.parse_env(env)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_local_devices_after_backend_start():
  """This process already has its 8 devices (conftest): a matching request is accepted, another
  count is refused in one line instead of silently training on the wrong devices."""
  jax.devices()
  assert dist.initialize_from_env({"SPARSEJAX_LOCAL_DEVICES": "8"}).mode == "single"
  with pytest.raises(RuntimeError, match="SPARSEJAX_LOCAL_DEVICES=4 came too late"):
    dist.initialize_from_env({"SPARSEJAX_LOCAL_DEVICES": "4"})
  with pytest.raises(dist.DistributedEnvError, match="JAX_PLATFORMS='gpu'"):
    dist.initialize_from_env({"SPARSEJAX_LOCAL_DEVICES": "4", "JAX_PLATFORMS": "gpu"})


def test_watchdog_fires_only_without_progress():
  fired = []
  with dist.StepWatchdog(0.3, slow_timeout_s=0.3, exit_fn=fired.append) as dog:
    for i in range(8):  # beats every 0.1 s: never fires
      time.sleep(0.1)
      dog.beat(f"step {i}")
    assert not fired
    dog.beat("step 8", slow=False)
    time.sleep(1.0)
  assert fired == [dist.WATCHDOG_EXIT_CODE]
  with dist.StepWatchdog(0.2, slow_timeout_s=5.0, exit_fn=fired.append) as dog:
    dog.beat("save", slow=True)
    time.sleep(0.6)  # a slow phase gets slow_timeout_s
  assert fired == [dist.WATCHDOG_EXIT_CODE]
  # Several processes: an error leaving the loop keeps the watch (the exit may hang on peers).
  with pytest.raises(KeyError):
    with dist.StepWatchdog(0.2, keep_on_error=True, exit_fn=fired.append) as dog:
      dog.beat("step 1")
      raise KeyError("boom")
  time.sleep(1.0)
  assert fired == [dist.WATCHDOG_EXIT_CODE] * 2


def test_iterator_seeks_to_a_step_on_any_process_count(default_dataset):
  """Global batch b is the same windows whether read by 1 process from the start, or by each of
  2 / 4 processes positioned directly at b (what a resume on another process count does)."""
  kw = dict(seq_len=64, global_batch_size=8, seed=3)
  one = make_train_iterator(default_dataset, process_index=0, process_count=1, **kw)
  batches = [next(one)["inputs"] for _ in range(6)]
  for count in (2, 4):
    parts = [make_train_iterator(default_dataset, process_index=p, process_count=count,
                                 start_batch=4, **kw) for p in range(count)]
    for b in (4, 5):
      rows = np.concatenate([next(it)["inputs"] for it in parts])
      assert np.array_equal(rows, batches[b])


def test_resume_batch_rules():
  now = position.data_position(load_config("configs/dense.py:tiny"), "abc", 0)
  saved = {**now, "next_batch": 6}
  assert position.resume_batch(saved, now, 6, "w") == 6
  assert position.resume_batch({"next_index": 5}, now, 5, "w") == 5  # pre-position checkpoints
  bigger = {**now, "global_batch_size": 16}
  with pytest.raises(ConfigError) as e:
    position.resume_batch(saved, bigger, 6, "w")
  msg = str(e.value)
  assert "config.data.global_batch_size: 16 now, 8 at step 6" in msg
  assert "--allow_data_change" in msg and "\n" not in msg
  # 6 batches of 8 = 48 sequences consumed: the new stream continues at batch 3 of 16
  assert position.resume_batch(saved, bigger, 6, "w", allow_data_change=True) == 3
  assert position.resume_batch(saved, {**now, "global_batch_size": 5}, 6, "w", True) == 10
  for key, value in (("seq_len", 32), ("seed", 1), ("dataset", "other")):
    with pytest.raises(ConfigError, match="cannot continue on the batches"):
      position.resume_batch(saved, {**now, key: value}, 6, "w")


def test_changed_batch_size_refuses_to_resume(tmp_path, reference):
  """The reference run's step 10 (global batch 8) resumed with global_batch_size 16: one line
  naming the key; the workdir is left as it was."""
  copy_step(reference, tmp_path, 10)
  metrics = (tmp_path / "metrics.jsonl").read_bytes()
  changed = load_config("configs/dense.py:tiny", **{**OVERRIDES, "data.global_batch_size": 16})
  with pytest.raises(ConfigError, match="config.data.global_batch_size: 16 now, 8 at step 10"):
    looplib.train_and_evaluate(changed, tmp_path, devices=jax.devices()[:1])
  assert Checkpointer(tmp_path).latest_step() == 10  # nothing was touched
  assert (tmp_path / "metrics.jsonl").read_bytes() == metrics
