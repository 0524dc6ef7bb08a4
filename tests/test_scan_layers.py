"""Scanned layers (config.model.scan_layers): the plan groups identical blocks (cycling patterns
as one multi-block body; non-repeating and shared-pool layers stay a loop); the train layout
stores each segment stacked with the loop's initial values; loss, gradients, sown metrics / aux
losses / buffer updates and per-layer metric names equal the layer loop's; the traced program
(forward, backward and optimizer update) does not grow with depth; checkpoints convert between
the layouts, so a run switches on resume (loop -> scan -> loop on a sharded mesh) and continues
as the uninterrupted loop run does; per-layer weight addressing is refused.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sparsejax.configure import load_config
from sparsejax.errors import ConfigError
from sparsejax.models import layout
from sparsejax.models.forward import forward_sums
from sparsejax.models.scan import Segment
from sparsejax.models.transformer import build_model, build_train_model
from sparsejax.train import init_from, loop as looplib, optim, state as state_lib, step as steplib

VOCAB, B, T = 257, 2, 32


def _models(preset: str, **overrides):
  base = {"model.compute_dtype": "float32", **overrides}
  loop = build_model(load_config(preset, **base), VOCAB)
  scanned = build_train_model(load_config(preset, **base, **{"model.scan_layers": True}), VOCAB)
  return loop, scanned


def _batch(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.integers(0, VOCAB, (B, T)), jnp.int32)
          for k in ("inputs", "targets")}


def _value_and_grad(graphdef, batch):
  def f(p):
    sums, aux, sown, updates = forward_sums(graphdef, p, batch, 1e-4, jax.random.key(7))
    return sums["ce_sum"] / sums["count"] + aux, (sown, updates)
  return jax.jit(jax.value_and_grad(f, has_aux=True))


def _close(a, b, rel=1e-6):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape
  assert np.max(np.abs(a - b), initial=0) <= rel * max(np.max(np.abs(b), initial=0), 1e-30)


CASES = [
    # preset, overrides, the scanned model's segments (start, period, repeats)
    ("configs/dense.py:tiny", {"model.num_layers": 4, "model.remat": "full"}, [(0, 1, 4)]),
    ("configs/moe.py:tiny", {"model.num_layers": 5, "ffn.first_k_dense": 1},
     [(0, 1, 1), (1, 1, 4)]),
    ("configs/moe.py:tiny", {"model.num_layers": 4, "ffn.pattern": ("dense", "moe"),
                             "model.remat": "dots", "moe.bias_balancing": True}, [(0, 2, 2)]),
    ("configs/sparse_attn.py:tiny", {"model.num_layers": 4}, [(0, 2, 2)]),
    ("configs/peer.py:tiny", {"model.num_layers": 3}, [(0, 1, 3)]),
]


@pytest.mark.parametrize("preset,overrides,segments", CASES,
                         ids=["dense", "moe-first-dense", "moe-pattern", "sparse-attn", "peer"])
def test_scanned_forward_and_gradients_match_the_loop(preset, overrides, segments):
  loop, scanned = _models(preset, **overrides)
  assert [(s.start, s.period, s.repeats) for s in scanned._segments] == segments
  segs = scanned.scan_segments()
  graphdef0, state = nnx.split(loop)
  graphdef1, state1 = nnx.split(scanned)
  params, batch = nnx.to_pure_dict(state), _batch()
  stacked = nnx.to_pure_dict(state1)
  # the train layout holds exactly the loop's initial values, stacked per segment
  assert jax.tree.structure(layout.to_train(params, segs)) == jax.tree.structure(stacked)
  for a, b in zip(jax.tree.leaves(layout.to_train(params, segs)), jax.tree.leaves(stacked)):
    np.testing.assert_array_equal(a, b)
  if segs:
    assert "scan" in stacked and all(seg.start in stacked["scan"] for seg in segs)
  (loss0, (sown0, upd0)), grads0 = _value_and_grad(graphdef0, batch)(params)
  (loss1, (sown1, upd1)), grads1 = _value_and_grad(graphdef1, batch)(stacked)
  _close(loss1, loss0)
  assert sown1.keys() == sown0.keys()
  for k in sown0:
    _close(sown1[k], sown0[k])
  # buffer updates: a stacked update per stacked parameter, one row per layer of the loop's
  per_layer = {}
  for path, v in upd1.items():
    if path[0] == "scan":
      seg = next(s for s in segs if s.start == path[1])
      per_layer.update({("blocks", seg.layer(k, path[2])) + path[3:]: v[k]
                        for k in range(seg.repeats)})
    else:
      per_layer[path] = v
  assert per_layer.keys() == upd0.keys()
  for k in upd0:
    _close(per_layer[k], upd0[k])
  want = layout.to_train(grads0, segs)
  assert jax.tree.structure(want) == jax.tree.structure(grads1)
  for g0, g1 in zip(jax.tree.leaves(want), jax.tree.leaves(grads1)):
    _close(g1, g0)
  last = grads0["blocks"][len(grads0["blocks"]) - 1]["attn"]["wq_DxHxK"]
  assert np.abs(last).max() > 0
  # per-leaf metrics name the scanned layers as the loop does, with the same values
  rms = lambda x: jnp.sqrt(jnp.mean(jnp.square(x)))
  m0, m1 = steplib._per_leaf(rms, grads0, "g/"), steplib._per_leaf(rms, grads1, "g/")
  assert m1.keys() == m0.keys()
  for k in m0:
    _close(m1[k], m0[k], rel=1e-5)
  # optimizer groups and the decay mask are the loop's, stacked
  cfg = load_config(preset, **{"model.compute_dtype": "float32", **overrides})
  for fn in (optim.param_groups, optim.decay_mask):
    assert fn(stacked, cfg=cfg) == layout.to_train(fn(params, cfg=cfg), segs)
  # and a stacked state (params and optimizer moments, masked groups too) converts back exactly
  opt = optim.make_optimizer(cfg).init(stacked)
  back = layout.to_canonical({"params": stacked, "opt": opt}, segs)
  assert jax.tree.structure(back["opt"]) == jax.tree.structure(
      optim.make_optimizer(cfg).init(params))
  for a, b in zip(jax.tree.leaves(back["params"]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_plan_keeps_shared_and_layer_seeded_blocks_out_of_scans():
  # memory tiny: the memory layer holds the shared value pool -> never stacked
  _, memory = _models("configs/memory.py:tiny", **{"model.num_layers": 4})
  assert memory._segments == (Segment(0, 2, 1), Segment(2, 1, 2))
  # BigBird's random blocks are seeded per layer: no two attention layers are identical
  _, bigbird = _models("configs/sparse_attn.py:tiny", **{
      "model.num_layers": 4, "attention.mask": "bigbird:16:16:1:16"})
  assert bigbird._segments == (Segment(0, 4, 1),)
  # ffn.overrides in the middle: the loop runs them, the runs around them scan
  _, mixed = _models("configs/moe.py:tiny", **{
      "model.num_layers": 8, "ffn.type": "dense", "ffn.overrides": ("3:moe",)})
  assert mixed._segments == (Segment(0, 1, 3), Segment(3, 1, 1), Segment(4, 1, 4))


def _dot_count(num_layers: int, scan: bool) -> int:
  cfg = load_config("configs/dense.py:tiny", **{
      "model.num_layers": num_layers, "model.scan_layers": scan, "model.remat": "full"})
  graphdef, state = nnx.split(build_train_model(cfg, VOCAB))
  params, tx = nnx.to_pure_dict(state), optim.make_optimizer(cfg)

  def step(p, opt):  # gradient and optimizer update, as the train step runs them
    g = jax.grad(lambda p: forward_sums(graphdef, p, _batch(), 1e-4)[0]["ce_sum"])(p)
    updates, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, updates), opt
  jaxpr = str(jax.make_jaxpr(step)(params, tx.init(params)))
  return jaxpr.count("dot_general") + jaxpr.count(" mul ")


def test_scanned_program_does_not_grow_with_depth():
  assert _dot_count(8, scan=True) == _dot_count(2, scan=True)
  assert _dot_count(8, scan=False) > _dot_count(2, scan=False)


def test_run_switches_layout_on_resume_on_a_sharded_mesh(tmp_path):
  base = {"train.steps": 6, "train.checkpoint_every_steps": 2, "train.log_every_steps": 1,
          "train.eval_every_steps": 0, "train.progress_bar": False, "model.num_layers": 3,
          "mesh.fsdp": 2, "mesh.tensor": 2}
  devices = jax.devices()[:4]
  run = lambda workdir, **kw: looplib.train_and_evaluate(
      load_config("configs/dense.py:tiny", **base, **kw), tmp_path / workdir, devices=devices)
  run("loop")
  run("mixed", **{"train.stop_at_step": 2})                            # loop, steps 1-2
  run("mixed", **{"train.stop_at_step": 4, "model.scan_layers": True})  # scanned, 3-4
  run("mixed")                                                         # loop again, 5-6

  def rows(name):
    lines = (tmp_path / name / "metrics.jsonl").read_text().split("\n")
    return {r["step"]: r for r in map(json.loads, filter(None, lines)) if "loss" in r}

  loop, mixed = rows("loop"), rows("mixed")
  assert sorted(mixed) == sorted(loop) == list(range(1, 7))
  np.testing.assert_allclose([mixed[s]["loss"] for s in range(1, 7)],
                             [loop[s]["loss"] for s in range(1, 7)], rtol=1e-5)
  assert mixed[3].keys() == loop[3].keys()  # per-layer metric names while scanned
  assert "param_rms/blocks/2/attn/wq_DxHxK" in mixed[3]
  # config.train.init_from a per-layer run into the scanned layout: the same weights, stacked
  cfg = load_config("configs/dense.py:tiny", **base, **{"model.scan_layers": True})
  spec = state_lib.model_spec(cfg, VOCAB)
  mesh = jax.make_mesh((2, 2), ("fsdp", "tensor"), devices=devices)
  shardings = state_lib.param_shardings(spec, mesh)
  got = init_from.load_params(str(tmp_path / "loop"), spec, shardings)
  src = init_from.restore_params(str(tmp_path / "loop"), devices=devices)
  want = spec.to_train(src.params)
  assert jax.tree.structure(got) == jax.tree.structure(want) and "scan" in got
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("override", [{"sparsity.method": "gmp"},
                                      {"finetune.mode": "lora"}])
def test_per_layer_weight_addressing_is_refused_when_scanned(override):
  with pytest.raises(ConfigError, match="model.scan_layers"):
    load_config("configs/dense.py:tiny", **{"model.scan_layers": True, **override})
