"""Chunked cross-entropy (config.model.loss_chunk): loss sums, gradients and sown values equal the
unchunked path to float32 rounding (tied and untied heads, weights with masked tokens, an MoE
model whose layers sow aux losses and metrics); the chunked program never holds a [B, T, V]
array; a chunk that does not divide the sequence is a one-line ConfigError.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.config import ConfigError
from sparsejax.configure import load_config
from sparsejax.eval.core import make_eval_step
from sparsejax.models.forward import forward_sums
from sparsejax.models.transformer import build_model

VOCAB, PADDED = 257, 384  # byte tokenizer + EOS; padded embedding rows
B, T, CHUNK = 2, 32, 8


def _batch(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  weights = (rng.random((B, T)) < 0.7).astype(np.float32)
  return {"inputs": jnp.asarray(rng.integers(0, VOCAB, (B, T)), jnp.int32),
          "targets": jnp.asarray(rng.integers(0, VOCAB, (B, T)), jnp.int32),
          "weights": jnp.asarray(weights)}


def _graphdefs(preset: str, **overrides):
  """(unchunked graphdef, chunked graphdef, shared params) of one model."""
  base = {"model.compute_dtype": "float32", **overrides}
  graphdef0, state = nnx.split(build_model(load_config(preset, **base), VOCAB))
  graphdef1, _ = nnx.split(build_model(load_config(preset, **base, **{"model.loss_chunk":
                                                                        CHUNK}), VOCAB))
  return graphdef0, graphdef1, nnx.to_pure_dict(state)


def _loss_fn(graphdef, batch):
  def f(p):
    sums, aux, sown, _ = forward_sums(graphdef, p, batch, 1e-4)
    loss = (sums["ce_sum"] + 1e-4 * sums["z_sum"]) / sums["count"] + aux
    return loss, (sums, aux, sown)
  return jax.value_and_grad(f, has_aux=True)


def _close(a, b, rel=1e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.max(np.abs(a - b)) <= rel * max(np.max(np.abs(b)), 1e-30), (a, b)


@pytest.mark.parametrize("preset,overrides", [
    ("configs/dense.py:tiny", {}),                                  # tied head
    ("configs/moe.py:tiny", {"model.tie_embeddings": False}),       # untied head, sown aux
])
def test_chunked_loss_grads_and_sown_match_unchunked(preset, overrides):
  graphdef0, graphdef1, params = _graphdefs(preset, **overrides)
  batch = _batch(seed=1)
  assert float(batch["weights"].sum()) < B * T  # some tokens are masked out
  out = jax.device_get(jax.jit(lambda p: (_loss_fn(graphdef0, batch)(p),
                                          _loss_fn(graphdef1, batch)(p)))(params))
  ((loss0, (sums0, aux0, sown0)), grads0), ((loss1, (sums1, aux1, sown1)), grads1) = out
  _close(loss1, loss0)
  for k in ("ce_sum", "z_sum", "count", "correct"):
    _close(sums1[k], sums0[k])
  assert sums1["count"] == sums0["count"] and sums1["correct"] == sums0["correct"]
  _close(aux1, aux0)
  assert sown1.keys() == sown0.keys() and (preset.endswith("dense.py:tiny") or sown0)
  for k in sown0:
    _close(sown1[k], sown0[k])
  flat0 = dict(jax.tree_util.tree_leaves_with_path(grads0))
  for path, g1 in jax.tree_util.tree_leaves_with_path(grads1):
    _close(g1, flat0[path])
  head = "embed_VxD" if preset.endswith("dense.py:tiny") else "head_DxV"
  assert np.abs(grads1[head]).max() > 0


def test_chunked_program_never_holds_full_logits_and_eval_agrees():
  graphdef0, graphdef1, params = _graphdefs("configs/dense.py:tiny",
                                            **{"model.tie_embeddings": False})
  batch = _batch(seed=2)
  full, chunk = f"f32[{B},{T},{PADDED}]", f"f32[{B},{CHUNK},{PADDED}]"
  jaxpr0 = str(jax.make_jaxpr(_loss_fn(graphdef0, batch))(params))
  jaxpr1 = str(jax.make_jaxpr(_loss_fn(graphdef1, batch))(params))
  assert full in jaxpr0 and chunk not in jaxpr0
  assert full not in jaxpr1 and chunk in jaxpr1 and "remat" in jaxpr1 and "scan" in jaxpr1
  ev0, ev1 = jax.device_get(jax.jit(lambda p: (make_eval_step(graphdef0)(p, batch),
                                               make_eval_step(graphdef1)(p, batch)))(params))
  for k in ("ce_sum", "count", "correct"):
    _close(ev1[k], ev0[k])


def test_loss_chunk_must_divide_seq_len():
  with pytest.raises(ConfigError, match=r"^config\.model\.loss_chunk: 48 must be 0 \(off\) or a "
                                        r"positive divisor of data\.seq_len 256$"):
    load_config("configs/dense.py:tiny", **{"model.loss_chunk": 48, "data.seq_len": 256})
  with pytest.raises(ConfigError, match=r"^config\.model\.loss_chunk: -1 must be"):
    load_config("configs/dense.py:tiny", **{"model.loss_chunk": -1})
  assert load_config("configs/dense.py:tiny", **{"model.loss_chunk": 64}).model.loss_chunk == 64
