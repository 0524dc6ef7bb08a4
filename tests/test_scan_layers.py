"""Scanned layers (config.model.scan_layers): the plan groups identical blocks (cycling patterns
as one multi-block body; non-repeating and shared-pool layers stay a loop); loss, gradients,
sown metrics / aux losses / buffer updates equal the layer loop's; the traced program does not
grow with depth; parameters are stored as in the loop, so a loop run resumes scanned on a
sharded mesh and continues as the uninterrupted loop run does.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.configure import load_config
from sparsejax.models.forward import forward_sums
from sparsejax.models.scan import Segment
from sparsejax.models.transformer import build_model
from sparsejax.train import loop as looplib

VOCAB, B, T = 257, 2, 32


def _models(preset: str, **overrides):
  base = {"model.compute_dtype": "float32", **overrides}
  loop = build_model(load_config(preset, **base), VOCAB)
  scanned = build_model(load_config(preset, **base, **{"model.scan_layers": True}), VOCAB)
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
  graphdef0, state = nnx.split(loop)
  graphdef1, state1 = nnx.split(scanned)
  # stored exactly as the loop stores them: same paths, shapes and dtypes
  assert (jax.tree.map(lambda x: (x.shape, x.dtype), nnx.to_pure_dict(state1))
          == jax.tree.map(lambda x: (x.shape, x.dtype), nnx.to_pure_dict(state)))
  params, batch = nnx.to_pure_dict(state), _batch()
  (loss0, (sown0, upd0)), grads0 = _value_and_grad(graphdef0, batch)(params)
  (loss1, (sown1, upd1)), grads1 = _value_and_grad(graphdef1, batch)(params)
  _close(loss1, loss0)
  assert sown1.keys() == sown0.keys() and upd1.keys() == upd0.keys()
  for k in sown0:
    _close(sown1[k], sown0[k])
  for k in upd0:
    _close(upd1[k], upd0[k])
  flat0 = dict(jax.tree_util.tree_leaves_with_path(grads0))
  for path, g1 in jax.tree_util.tree_leaves_with_path(grads1):
    _close(g1, flat0[path])
  assert np.abs(grads1["blocks"][len(grads1["blocks"]) - 1]["attn"]["wq_DxHxK"]).max() > 0


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
  graphdef, state = nnx.split(build_model(cfg, VOCAB))
  f = lambda p: forward_sums(graphdef, p, _batch(), 1e-4)[0]["ce_sum"]
  jaxpr = jax.make_jaxpr(jax.grad(f))(nnx.to_pure_dict(state))
  return str(jaxpr).count("dot_general")


def test_scanned_program_does_not_grow_with_depth():
  assert _dot_count(8, scan=True) == _dot_count(2, scan=True)
  assert _dot_count(8, scan=False) > _dot_count(2, scan=False)


def test_loop_run_resumes_scanned_on_a_sharded_mesh(tmp_path):
  base = {"train.steps": 6, "train.checkpoint_every_steps": 3, "train.log_every_steps": 1,
          "train.eval_every_steps": 0, "train.progress_bar": False, "model.num_layers": 3,
          "mesh.fsdp": 2, "mesh.tensor": 2}
  devices = jax.devices()[:4]
  looplib.train_and_evaluate(load_config("configs/dense.py:tiny", **base), tmp_path / "loop",
                             devices=devices)
  looplib.train_and_evaluate(load_config("configs/dense.py:tiny", **base,
                                         **{"train.stop_at_step": 3}), tmp_path / "mixed",
                             devices=devices)
  looplib.train_and_evaluate(load_config("configs/dense.py:tiny", **base,
                                         **{"model.scan_layers": True}), tmp_path / "mixed",
                             devices=devices)

  def losses(run):
    rows = map(json.loads, filter(None, (tmp_path / run / "metrics.jsonl").read_text().split(
        "\n")))
    return {r["step"]: r["loss"] for r in rows if "loss" in r}

  loop, mixed = losses("loop"), losses("mixed")
  assert sorted(mixed) == sorted(loop) == list(range(1, 7))
  np.testing.assert_allclose([mixed[s] for s in range(1, 7)], [loop[s] for s in range(1, 7)],
                             rtol=1e-5)
