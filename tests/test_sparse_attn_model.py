"""Block-sparse attention inside the model: equals dense attention on a causal mask, respects
its window, counts FLOPs by density, and the tiny preset trains."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.configure import load_config
from sparsejax.layers import registry
from sparsejax.layers.attention import DenseAttention
from sparsejax.layers.block_sparse import BlockSparseAttention
from sparsejax.models import accounting as flops
from sparsejax.models.forward import forward_sums
from sparsejax.parallel import mesh as mesh_lib
from sparsejax.parallel import sharding as shd
from sparsejax.train import loop as looplib
from sparsejax.train.optim import make_optimizer
from sparsejax.train.state import init_state, model_spec

B, T = 2, 64


def layer_pair(mask: str, impl: str):
  cfg = load_config("configs/sparse_attn.py:tiny", **{
      "attention.mask": mask, "attention.sparse_impl": impl})
  dense = DenseAttention(cfg, 0, rngs=nnx.Rngs(params=0))
  sparse = BlockSparseAttention(cfg, 0, rngs=nnx.Rngs(params=0))
  return cfg, dense, sparse


@pytest.mark.parametrize("impl", ["xla", "interpret"])
def test_causal_block_sparse_equals_dense_attention(impl):
  _, dense, sparse = layer_pair("causal", impl)
  x = jax.random.normal(jax.random.key(0), (B, T, 64))
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  np.testing.assert_allclose(np.asarray(sparse(x, pos)), np.asarray(dense(x, pos)),
                             atol=2e-5, rtol=2e-5)


def test_window_layer_sees_only_its_window():
  _, _, sparse = layer_pair("causal&window:16", "xla")
  x = jax.random.normal(jax.random.key(1), (1, T, 64))
  pos = jnp.arange(T)[None]
  t = 40
  grad = jax.grad(lambda x: sparse(x, pos)[0, t].sum())(x)[0]
  visible = np.abs(np.asarray(grad)).sum(-1) > 0
  assert visible[t - 16: t + 1].all()
  assert not visible[: t - 16].any() and not visible[t + 1:].any()


def test_attention_flops_scale_with_density():
  cfg = load_config("configs/sparse_attn.py:tiny")
  spec = model_spec(cfg, 257)
  counts = flops.count(spec.abstract_model, cfg)
  layer = spec.abstract_model.blocks[0].attn
  density = layer.layout(T).density
  h, dh = cfg.model.num_heads, cfg.head_dim
  expected_attn = 4.0 * T * density * h * dh + 2.0 * T * h * dh  # local layer + dense causal
  matmul = counts.params_active_per_token
  assert counts.flops_per_token_fwd == pytest.approx(2.0 * matmul + expected_attn)
  assert density < 0.5


def test_tiny_preset_loss_falls(tmp_path, default_dataset):
  cfg = load_config("configs/sparse_attn.py:tiny", **{
      "train.steps": 60, "train.log_every_steps": 5, "train.eval_every_steps": 0,
      "train.checkpoint_every_steps": 0})
  looplib.train_and_evaluate(cfg, tmp_path, devices=jax.devices()[:1])
  curve = [r["loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").open()) if "loss" in r]
  assert curve[0] - np.mean(curve[-2:]) > 1.8, curve


def test_pallas_path_under_a_data_parallel_mesh_matches_one_device():
  """The kernel is a custom call: under a mesh the layer runs it per batch shard (shard_map)."""
  cfg = load_config("configs/sparse_attn.py:tiny", **{"attention.sparse_impl": "interpret"})
  spec = model_spec(cfg, 257)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 257, (8, T + 1)), jnp.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  losses = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    rules = registry.logical_rules(cfg.mesh)
    state, shardings = init_state(spec, mesh, make_optimizer(cfg))
    sharded = jax.device_put(batch, shd.batch_sharding(mesh, rules))
    with shd.activation_sharding(mesh, rules):
      fn = jax.jit(lambda p, b: forward_sums(spec.graphdef, p, b, 0.0)[0]["ce_sum"])
      if len(devices) > 1:
        assert "shard_map" in str(jax.make_jaxpr(fn)(state["params"], sharded))
      losses.append(float(fn(state["params"], sharded)))
  assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_block_sparse_attention_with_every_sparse_ffn_trains(tmp_path, default_dataset):
  """Local block-sparse attention composes with every sparse FFN family: one model with a MoE,
  a memory and a PEER block (their tiny presets' sizes), local attention in blocks 0 and 2."""
  cfg = load_config("configs/memory.py:tiny", **{
      "model.num_layers": 3, "ffn.overrides": ("0:moe", "1:memory", "2:peer"),
      "moe.num_experts": 8, "moe.top_k": 2, "peer.num_experts": 32 ** 2, "peer.num_heads": 2,
      "peer.top_k": 4, "peer.d_key": 32,
      "attention.pattern": ("block_sparse", "dense", "block_sparse"),
      "attention.mask": "causal&window:16",
      "attention.block_q": 16, "attention.block_kv": 16, "train.steps": 3,
      "optim.warmup_steps": 1, "train.log_every_steps": 1, "train.eval_every_steps": 0,
      "train.checkpoint_every_steps": 0, "train.progress_bar": False})
  assert cfg.layer_types() == [("block_sparse", "moe"), ("dense", "memory"),
                               ("block_sparse", "peer")]
  result = looplib.train_and_evaluate(cfg, tmp_path, devices=jax.devices()[:1])
  assert result.step == 3 and np.isfinite(result.last_metrics["loss"])
