"""Training loop: loss falls, bitwise resume, SIGTERM, NaN guard, torn checkpoints, bad inputs."""

import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import golden_losses as gl

from sparsejax.config import ConfigError
from sparsejax.configure import load_config
from sparsejax.eval.checkpoint import evaluate
from sparsejax.models import forward
from sparsejax.parallel.mesh import make_mesh
from sparsejax.train import loop as looplib
from sparsejax.train import step as steplib
from sparsejax.train.checkpoint import Checkpointer
from sparsejax.train.optim import make_optimizer
from sparsejax.train.state import abstract_state, init_state, model_spec

REPO = pathlib.Path(__file__).resolve().parent.parent
STEPS = 12


def tiny(**overrides):
  base = {"train.steps": STEPS, "train.checkpoint_every_steps": 4, "train.log_every_steps": 1,
          "train.eval_every_steps": 0, "train.progress_bar": False}
  base.update(overrides)
  return load_config("configs/dense.py:tiny", **base)


def final_params(workdir, cfg, step=None):
  ckpt = Checkpointer(workdir, async_save=False)
  step = ckpt.latest_step() if step is None else step
  spec = model_spec(cfg, 257)
  target, _ = abstract_state(spec, make_mesh(cfg.mesh, jax.devices()[:1]))
  state, data_state, _ = ckpt.restore(step, target)
  ckpt.close()
  return jax.tree.map(np.asarray, state["params"]), data_state


def losses(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [(r["step"], r["loss"]) for r in map(json.loads, filter(None, lines)) if "loss" in r]


def assert_trees_equal(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    assert np.array_equal(x, y), f"{jax.tree_util.keystr(path)} differs"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, default_dataset):
  """An uninterrupted 12-step run on one device."""
  workdir = tmp_path_factory.mktemp("baseline")
  cfg = tiny()
  result = looplib.train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])
  assert result.step == STEPS and not result.preempted
  return workdir, cfg


def test_loss_falls_on_default_corpus(tmp_path, default_dataset):
  cfg = tiny(**{"train.steps": 60, "train.log_every_steps": 5, "train.checkpoint_every_steps": 0})
  result = looplib.train_and_evaluate(cfg, tmp_path, devices=jax.devices()[:1])
  curve = [loss for _, loss in losses(tmp_path)]
  # Byte-level stdlib source: starts near ln(384) ~ 5.9 at init and ~5.2 by step 5; 60 steps of
  # the tiny model reach ~2.9 nats/byte. Stated margin: at least 1.8 nats below the first log.
  assert curve[0] - np.mean(curve[-2:]) > 1.8, curve
  assert result.eval_metrics["bits_per_byte"] < 5.5
  assert result.eval_metrics["perplexity"] == pytest.approx(np.exp(result.eval_metrics["loss"]))
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
  assert records[0]["step"] == 0 and records[0]["model/params_total"] > 0
  record = records[1]
  for key in ("step", "loss", "tokens_per_s", "perplexity", "bits_per_byte", "grad_norm", "lr",
              "flops_per_token"):
    assert key in record
  assert any(k.startswith("param_rms/") for k in record)
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_bitwise_resume(tmp_path, baseline):
  base_dir, cfg = baseline
  # Stop at step 5 (between checkpoints: the stop itself saves), then resume to the end.
  first = looplib.train_and_evaluate(tiny(**{"train.stop_at_step": 5}), tmp_path,
                                     devices=jax.devices()[:1])
  assert first.step == 5
  assert Checkpointer(tmp_path).committed_steps() == [4, 5]
  second = looplib.train_and_evaluate(cfg, tmp_path, devices=jax.devices()[:1])
  assert second.step == STEPS
  assert losses(tmp_path) == losses(base_dir)  # same steps, bit-identical float losses
  p_resumed, d_resumed = final_params(tmp_path, cfg)
  p_base, d_base = final_params(base_dir, cfg)
  assert_trees_equal(p_resumed, p_base)
  assert d_resumed == d_base  # grain iterator state


def test_torn_and_corrupt_checkpoints_are_skipped(tmp_path, baseline, caplog):
  base_dir, cfg = baseline
  looplib.train_and_evaluate(cfg, tmp_path, devices=jax.devices()[:1])
  ckpt = Checkpointer(tmp_path)
  assert ckpt.committed_steps() == [4, 8, 12]
  (tmp_path / "commits" / "12.json").unlink()  # torn: the save never committed
  victim = max((p for p in (tmp_path / "checkpoints" / "8").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated file
  with caplog.at_level(logging.WARNING):
    assert ckpt.latest_step() == 4
  assert "no commit marker" in caplog.text and "corrupt" in caplog.text
  with pytest.raises(Exception, match="not committed or is corrupt"):
    ckpt.restore(8, None)
  # Resuming from step 4 still lands bit-identically on the uninterrupted result.
  looplib.train_and_evaluate(cfg, tmp_path, devices=jax.devices()[:1])
  assert_trees_equal(final_params(tmp_path, cfg)[0], final_params(base_dir, cfg)[0])


def test_sigterm_saves_and_resume_matches(tmp_path, default_dataset):
  # Subprocesses (one CPU device each) for both runs: XLA:CPU may order a reduction
  # differently under another device count, so the reference runs in the same environment.
  # SIGTERM goes out once step 3 is logged; the run stops at the next step boundary (~step 5),
  # far from the end (a step with its log takes ~50 ms of CPU here).
  steps = 60
  overrides = {"train.steps": steps, "train.checkpoint_every_steps": 0,
               "train.log_every_steps": 1, "train.eval_every_steps": 0,
               "train.progress_bar": False}
  env = {**os.environ, "XLA_FLAGS": os.environ["SPARSEJAX_TEST_XLA_FLAGS"]}

  def cmd(workdir):
    return ([sys.executable, "-m", "sparsejax.train", "--config", "configs/dense.py:tiny",
             "--workdir", str(workdir)] + [f"--config.{k}={v}" for k, v in overrides.items()])

  ref, run = tmp_path / "ref", tmp_path / "run"
  proc = subprocess.Popen(cmd(run), cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    try:
      if any(step >= 3 for step, _ in losses(run)):
        break
    except (FileNotFoundError, json.JSONDecodeError):  # not there yet / line being written
      pass
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary["preempted"] and 3 <= summary["step"] < steps, summary
  assert "stopped at step" in err
  assert Checkpointer(run).latest_step() == summary["step"]
  for workdir in (run, ref):  # resume the stopped run; run the reference uninterrupted
    done = subprocess.run(cmd(workdir), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["step"] == steps
  assert losses(run) == losses(ref)
  cfg = tiny(**{"train.steps": steps})
  assert_trees_equal(final_params(run, cfg)[0], final_params(ref, cfg)[0])


def test_nonfinite_step_is_skipped_and_counted(default_dataset):
  cfg = tiny()
  spec = model_spec(cfg, 257)
  mesh = make_mesh(cfg.mesh, jax.devices()[:1])
  opt = make_optimizer(cfg)
  state, _ = init_state(spec, mesh, opt)
  step = jax.jit(steplib.make_train_step(spec.graphdef, cfg, opt))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 257, (8, 65)), jnp.int32)
  # Both batches carry loss weights (all ones = the unweighted loss): one compiled step.
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": jnp.ones((8, 64))}
  bad = {**batch, "weights": jnp.full((8, 64), jnp.nan)}
  after_bad, m = step(state, bad)
  assert float(m["update_skipped"]) == 1.0 and int(m["nonfinite_in_a_row"]) == 1
  assert_trees_equal(jax.tree.map(np.asarray, after_bad["params"]),
                     jax.tree.map(np.asarray, state["params"]))
  assert_trees_equal(jax.tree.map(np.asarray, after_bad["opt_state"]),
                     jax.tree.map(np.asarray, state["opt_state"]))
  after_good, m = step(after_bad, batch)
  assert float(m["update_skipped"]) == 0.0 and int(m["nonfinite_in_a_row"]) == 0
  assert int(after_good["nonfinite_total"]) == 1
  assert not np.array_equal(np.asarray(after_good["params"]["embed_VxD"]),
                            np.asarray(state["params"]["embed_VxD"]))


def test_nan_losses_abort_and_leave_workdir_loadable(tmp_path, monkeypatch, default_dataset):
  cfg = tiny(**{"train.max_nonfinite_in_a_row": 3})
  looplib.train_and_evaluate(tiny(**{"train.stop_at_step": 4}), tmp_path,
                             devices=jax.devices()[:1])
  real = forward.token_losses
  monkeypatch.setattr(forward, "token_losses",
                      lambda logits, targets: jax.tree.map(lambda x: x * jnp.nan,
                                                           real(logits, targets)))
  with pytest.raises(looplib.TrainingDiverged, match="3 consecutive steps"):
    looplib.train_and_evaluate(cfg, tmp_path, devices=jax.devices()[:1])
  monkeypatch.setattr(forward, "token_losses", real)
  ckpt = Checkpointer(tmp_path)
  assert ckpt.latest_step() == 4  # no checkpoint of a diverged state was written
  params, _ = final_params(tmp_path, cfg)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  result = evaluate(tmp_path, devices=jax.devices()[:1], max_batches=1)
  assert result["step"] == 4 and np.isfinite(result["loss"])


def test_missing_data_path_fails_cleanly(tmp_path):
  cfg = tiny(**{"data.path": str(tmp_path / "nowhere")})
  with pytest.raises(FileNotFoundError, match="sparsejax.data.prepare"):
    looplib.train_and_evaluate(cfg, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_resume_with_a_different_model_is_refused(tmp_path, baseline):
  base_dir, _ = baseline
  with pytest.raises(ConfigError, match="config.model.d_model"):
    looplib.train_and_evaluate(tiny(**{"model.d_model": 32}), base_dir)


def test_eval_cli_prints_one_json_line(tmp_path, baseline):
  base_dir, _ = baseline
  text = tmp_path / "doc.txt"
  text.write_text("def f(x):\n    return x + 1\n" * 200)
  env = {**os.environ, "XLA_FLAGS": os.environ["SPARSEJAX_TEST_XLA_FLAGS"]}
  for extra in ([], ["--data", str(text)], ["--step", "8"]):
    proc = subprocess.run([sys.executable, "-m", "sparsejax.eval", "--workdir", str(base_dir),
                           "--max_batches", "2", *extra], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["perplexity"] == pytest.approx(np.exp(result["loss"]))
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / np.log(2), rel=1e-2)  # bytes
  proc = subprocess.run([sys.executable, "-m", "sparsejax.eval", "--workdir", str(base_dir),
                         "--step", "7"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 2
  assert "--step 7 is not a committed checkpoint" in proc.stderr.strip().splitlines()[-1]


def test_dense_config_files_tiny_preset_matches_its_golden_losses(tmp_path, default_dataset):
  """configs/dense.py's tiny preset is the golden-loss case "dense": it trains to its recorded
  losses (tests/golden/family_losses.json) and writes one final checkpoint. The other config
  files' tiny presets train, resume and match theirs in test_bitwise_resume_every_family."""
  ref = gl.run_case("dense", tmp_path)
  golden = json.loads(gl.GOLDEN.read_text())
  assert not gl.compare(golden, {"dense": ref}), gl.compare(golden, {"dense": ref})
  assert np.isfinite(ref["loss"]).all() and len(ref["loss"]) == gl.STEPS
  assert Checkpointer(tmp_path / "dense").committed_steps() == [gl.STEPS]


def test_every_config_file_is_covered():
  # model-family files only (configs/workdir.py reads a run's config.json: test_init_from.py)
  names = {p.stem for p in (REPO / "configs").glob("*.py")} - {"workdir"}
  assert names == {"dense"} | set(GOLDEN_OF_CONFIG), "add the new config file's tiny preset to " \
      "tests/golden_losses.py CASES and GOLDEN_OF_CONFIG below"


# config file -> its golden-loss case (tests/golden_losses.py): the reference run of the
# bitwise-resume test below IS that case, so it is checked against the golden numbers here
GOLDEN_OF_CONFIG = {"moe": "moe", "peer": "peer", "memory": "memory",
                    "sparse_attn": "sparse_attn"}


@pytest.mark.parametrize("name", sorted(GOLDEN_OF_CONFIG))
def test_bitwise_resume_every_family(tmp_path, name, default_dataset):
  """For each family's tiny preset (dense: test_bitwise_resume, with more checks): the 6-step
  golden-loss case trains to its recorded losses (tests/golden/family_losses.json), writes one
  final checkpoint, and stopping at step 3 then resuming to 6 gives the same losses, bitwise
  the same parameters and the same data position."""
  case = GOLDEN_OF_CONFIG[name]
  path, overrides = gl.CASES[case]
  ref = gl.run_case(case, tmp_path)
  golden = json.loads(gl.GOLDEN.read_text())
  assert not gl.compare(golden, {case: ref}), gl.compare(golden, {case: ref})
  over = {**gl.COMMON, **overrides}
  cfg = load_config(path, **over)
  assert np.isfinite(ref["loss"]).all() and len(ref["loss"]) == gl.STEPS
  assert Checkpointer(tmp_path / case).committed_steps() == [gl.STEPS]
  one = jax.devices()[:1]
  looplib.train_and_evaluate(load_config(path, **{**over, "train.stop_at_step": 3}),
                             tmp_path / "run", devices=one)
  looplib.train_and_evaluate(cfg, tmp_path / "run", devices=one)
  assert losses(tmp_path / "run") == losses(tmp_path / case)
  (p_run, d_run), (p_ref, d_ref) = (final_params(tmp_path / w, cfg) for w in ("run", case))
  assert_trees_equal(p_run, p_ref)
  assert d_run == d_ref  # grain iterator state
