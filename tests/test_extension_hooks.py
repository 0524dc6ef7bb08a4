"""The hooks sparse layer families plug into: per-layer types, call context (token ids, per-step
rng), shared modules, buffer updates, optimizer groups, vector metrics and key usage."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.config import ConfigError
from sparsejax.configure import load_config
from sparsejax.layers import registry
from sparsejax.layers.family import Family
from sparsejax.layers.ffn import GatedFFN
from sparsejax.parallel.mesh import make_mesh
from sparsejax.train import loop as looplib
from sparsejax.eval import core as evalcore
from sparsejax.train import step as steplib
from sparsejax.train.optim import make_optimizer, param_groups
from sparsejax.train.state import init_state, model_spec

B, T = 8, 64


class ProbeFFN(GatedFFN):
  """Dense FFN that also records what the framework hands it."""

  def __init__(self, cfg, layer_idx, *, rngs, shared=None):
    super().__init__(cfg, layer_idx, rngs=rngs)
    self.buffer_count_E = nnx.Param(jnp.zeros((3,)), logical_axes=(None,))
    if "table" not in shared:
      shared["table"] = nnx.Param(jnp.ones((4, cfg.model.d_model)), logical_axes=(None, "embed"))
    self.table = shared["table"]

  def __call__(self, x_BxTxD, tokens_BxT=None, rng=None):
    noise = 0.0 if rng is None else jax.random.uniform(rng, ())
    self.sow(nnx.Intermediate, "noise", jnp.asarray(noise, jnp.float32))
    self.sow(nnx.Intermediate, "token_sum", jnp.sum(tokens_BxT).astype(jnp.float32))
    self.sow(nnx.Intermediate, "load_vector", jnp.arange(1.0, 4.0))
    self.sow(nnx.Intermediate, "usage_rows", jnp.array([2.0, 0.0, 1.0, 1.0]))
    self.sow(nnx.Intermediate, "update__buffer_count_E", jnp.ones((3,)))
    return super().__call__(x_BxTxD) + jnp.sum(self.table[...]) * 0.0


@pytest.fixture
def probe():
  with registry.registered(Family("probe", "ffn", ProbeFFN)):
    yield


def probe_cfg(**over):
  base = {"ffn.overrides": ("1:probe",), "train.steps": 3, "optim.warmup_steps": 1,
          "optim.weight_decay": 0.5, "train.log_every_steps": 1, "train.eval_every_steps": 0,
          "train.checkpoint_every_steps": 0, "train.progress_bar": False}
  base.update(over)
  return load_config("configs/dense.py:tiny", **base)


def test_layer_types_patterns_first_k_dense_and_overrides():
  cfg = load_config("configs/dense.py:tiny", **{"model.num_layers": 4,
                                                "ffn.pattern": ("dense", "dense"),
                                                "ffn.overrides": ("3:dense",)})
  assert [f for _, f in cfg.layer_types()] == ["dense"] * 4
  for over, key in [({"ffn.overrides": ("9:dense",)}, "layer 9 does not exist"),
                    ({"ffn.overrides": ("x-dense",)}, "must look like"),
                    ({"ffn.overrides": ("1:nope",)}, "unknown ffn type 'nope'"),
                    ({"ffn.first_k_dense": 5}, "config.ffn.first_k_dense")]:
    with pytest.raises(ConfigError, match=key):
      load_config("configs/dense.py:tiny", **over)


def test_call_context_shared_modules_and_buffer_updates(probe):
  cfg = probe_cfg(**{"ffn.overrides": ("0:probe", "1:probe")})
  spec = model_spec(cfg, 257)
  assert [f for _, f in cfg.layer_types()] == ["probe", "probe"]
  # The shared table is stored once (under the first layer that uses it).
  assert "table" in spec.abstract_params["blocks"][0]["ffn"]
  assert "table" not in spec.abstract_params["blocks"][1]["ffn"]
  groups = param_groups(spec.abstract_params)
  assert groups["blocks"][1]["ffn"]["buffer_count_E"] == "frozen"
  assert groups["blocks"][1]["ffn"]["w_up_DxF"] == "default"
  mesh = make_mesh(cfg.mesh, jax.devices()[:1])
  opt = make_optimizer(cfg)
  state, _ = init_state(spec, mesh, opt)
  train = jax.jit(steplib.make_train_step(spec.graphdef, cfg, opt))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 257, (B, T + 1)), jnp.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  noises = []
  for _ in range(3):
    state, m = train(state, batch)
    noises.append(float(m["sown/blocks/1/ffn/noise"]))
  # Token ids reach the layer; a fresh per-step key each step; buffers move only by updates
  # (weight decay 0.5 and the optimizer never touch them).
  assert float(m["sown/blocks/1/ffn/token_sum"]) == float(jnp.sum(batch["inputs"]))
  assert len(set(noises)) == 3 and all(0.0 < n < 1.0 for n in noises)
  np.testing.assert_array_equal(np.asarray(state["params"]["blocks"][1]["ffn"]["buffer_count_E"]),
                                [3.0, 3.0, 3.0])
  assert "sown/blocks/1/ffn/usage_rows" not in m  # usage counts are eval-only
  assert "sown/blocks/1/ffn/update__buffer_count_E" not in m
  # Eval: deterministic (no rng) and usage counts come back for key-usage statistics.
  ev = jax.jit(evalcore.make_eval_step(spec.graphdef))(state["params"],
                                                      {**batch, "weights": jnp.ones((B, T))})
  np.testing.assert_array_equal(np.asarray(ev["usage"]["blocks/1/ffn/usage_rows"]),
                                [2.0, 0.0, 1.0, 1.0])


def test_grad_accumulation_averages_buffer_updates(probe):
  cfg = probe_cfg(**{"train.grad_accum_steps": 2})
  spec = model_spec(cfg, 257)
  opt = make_optimizer(cfg)
  state, _ = init_state(spec, make_mesh(cfg.mesh, jax.devices()[:1]), opt)
  tokens = jnp.zeros((B, T + 1), jnp.int32)
  state, _ = jax.jit(steplib.make_train_step(spec.graphdef, cfg, opt))(
      state, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
  np.testing.assert_array_equal(np.asarray(state["params"]["blocks"][1]["ffn"]["buffer_count_E"]),
                                [1.0, 1.0, 1.0])


def test_usage_summary_by_hand():
  out = evalcore.usage_summary(np.array([2.0, 0.0, 1.0, 1.0]))
  assert out["touched_fraction"] == 0.75
  p = np.array([0.5, 0.25, 0.25])
  assert out["kl_from_uniform"] == pytest.approx(float(np.sum(p * np.log(p * 4))), rel=1e-6)
  assert evalcore.usage_summary(np.ones(8))["kl_from_uniform"] == pytest.approx(0.0, abs=1e-7)


def test_vector_metrics_become_histograms_and_usage_reaches_eval(tmp_path, probe, default_dataset):
  result = looplib.train_and_evaluate(probe_cfg(), tmp_path, devices=jax.devices()[:1])
  record = [json.loads(x) for x in (tmp_path / "metrics.jsonl").open()][-2]
  assert record["sown/blocks/1/ffn/load_vector/max_over_mean"] == pytest.approx(1.5)
  assert "sown/blocks/1/ffn/load_vector" not in record
  assert result.eval_metrics["blocks/1/ffn/usage_rows/touched_fraction"] == 0.75
