"""FFN activation sparsity (issue 13, part 4), from the papers' definitions: ReGLU / gated ReLU²
(Primer) / dReLU (Turbo Sparse) formulas, top-k ("lazy neuron") keeps at most k hidden units
per token with gradient only through them, k = F is the dense layer, exploitable FLOPs, the
logged non-zero and dead-neuron fractions, and one-line config errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sparsejax.config import ConfigError
from sparsejax.configure import load_config
from sparsejax.layers import ffn, registry
from sparsejax.models import accounting
from sparsejax.models.forward import forward_sums
from sparsejax.models.transformer import Transformer, build_model
from sparsejax.parallel.mesh import make_mesh
from sparsejax.parallel.sharding import activation_sharding
from sparsejax.train import loop as looplib
from sparsejax.train.state import model_spec, param_shardings

F = 192  # configs/dense.py:tiny: d_model 64 -> d_ff = 8/3 * 64 rounded up to 64


def cfg_of(**over):
  return load_config("configs/dense.py:tiny", **over)


def layer(activation="swiglu", topk=0, seed=0):
  cfg = cfg_of(**{"ffn.activation": activation, "ffn.activation_topk": topk})
  return ffn.GatedFFN(cfg, 0, rngs=nnx.Rngs(seed))


def x_of(b=2, t=5, seed=1):
  return jax.random.normal(jax.random.key(seed), (b, t, 64), jnp.float32)


def reference_hidden(m, x, activation):
  """The papers' formulas on gate = x W_gate, up = x W_up (plain jnp matmuls)."""
  gate, up = x @ m.w_gate_DxF[...], x @ m.w_up_DxF[...]
  relu = lambda v: jnp.maximum(v, 0.0)
  return {"relu": relu(gate) * up, "relu2": relu(gate) ** 2 * up,
          "drelu": relu(gate) * relu(up), "swiglu": gate / (1 + jnp.exp(-gate)) * up}[activation]


def test_tiny_preset_width():
  assert cfg_of().d_ff == F


@pytest.mark.parametrize("activation", ["relu", "relu2", "drelu", "swiglu"])
def test_activations_match_their_formulas(activation):
  m, x = layer(activation), x_of()
  h, want = m.hidden(x), reference_hidden(m, x, activation)
  np.testing.assert_allclose(h, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m(x), want @ m.w_down_FxD[...], rtol=1e-5, atol=1e-6)
  if activation != "swiglu":  # exact zeros wherever the formula's ReLU input is negative
    gate, up = x @ m.w_gate_DxF[...], x @ m.w_up_DxF[...]
    off = gate < -1e-4 if activation != "drelu" else (gate < -1e-4) | (up < -1e-4)
    assert off.any() and np.all(np.asarray(h)[np.asarray(off)] == 0)


@pytest.mark.parametrize("activation,k", [("swiglu", 1), ("swiglu", 48), ("relu", 48),
                                          ("geglu", 191), ("drelu", 7)])
def test_topk_keeps_at_most_k_largest_per_token(activation, k):
  m, x = layer(activation, topk=k), x_of()
  h = np.asarray(m.hidden(x)).reshape(-1, F)
  full = np.asarray(layer(activation).hidden(x)).reshape(-1, F)
  nnz = (h != 0).sum(-1)
  assert nnz.max() <= k
  if activation in ("swiglu", "geglu"):  # no exact zeros: exactly k survive
    assert np.all(nnz == k)
  for row, dense in zip(h, full):  # the kept entries are the k largest |h|, values unchanged
    kept = row != 0
    np.testing.assert_array_equal(row[kept], dense[kept])
    if kept.any() and not kept.all():
      assert np.abs(dense[kept]).min() >= np.abs(dense[~kept]).max()


def test_topk_ties_keep_the_lower_index():
  h = jnp.array([[0.5, -1.0, 1.0, 1.0, 0.25], [2.0, 2.0, 2.0, 2.0, 2.0]])
  np.testing.assert_array_equal(ffn.topk_mask(h, 2), [[0, 1, 1, 0, 0], [1, 1, 0, 0, 0]])


def test_topk_equal_to_width_is_the_dense_layer_exactly():
  x = x_of()
  np.testing.assert_array_equal(layer("swiglu", topk=F)(x), layer("swiglu")(x))
  np.testing.assert_array_equal(layer("relu", topk=F)(x), layer("relu")(x))


@pytest.mark.parametrize("activation", ["swiglu", "relu2"])
def test_dropped_units_get_exactly_zero_gradient(activation):
  """One token per call: d loss / d W_gate = x ⊗ d loss / d gate, so a column of the weight
  gradient is zero exactly when the pre-activation gradient of that unit is."""
  k = 16
  m = layer(activation, topk=k)
  graphdef, params = nnx.split(m, nnx.Param)
  r = jax.random.normal(jax.random.key(3), (1, 1, 64))

  def loss(p, x):
    return jnp.sum(nnx.merge(graphdef, p)(x) * r)

  grad_fn = jax.jit(jax.grad(loss))
  for t in range(4):
    x = x_of(1, 1, seed=10 + t)
    kept = np.asarray(m.hidden(x)).reshape(F) != 0
    g = grad_fn(params, x)
    g_gate, g_up = np.asarray(g["w_gate_DxF"][...]), np.asarray(g["w_up_DxF"][...])
    g_down = np.asarray(g["w_down_FxD"][...])
    assert 0 < kept.sum() <= k
    for grad_w in (g_gate[:, ~kept], g_up[:, ~kept], g_down[~kept]):
      assert np.all(grad_w == 0)
    assert np.all(np.abs(g_down[kept]).max(-1) > 0)  # the kept units do learn
    assert np.abs(g_up[:, kept]).max() > 0


def test_dense_default_sows_nothing_sparse_sows_fractions():
  x = x_of()
  _, sown = nnx.capture(layer("swiglu"), nnx.Intermediate)(x)
  assert not nnx.to_flat_state(sown)
  m = layer("relu")
  _, sown = nnx.capture(m, nnx.Intermediate)(x)
  got = {str(p[-1]): np.asarray(v.get_value()[-1]) for p, v in nnx.to_flat_state(sown)}
  fired = np.asarray(m.hidden(x)) != 0
  assert got["act_nonzero"] == pytest.approx(fired.mean(), abs=1e-7)
  np.testing.assert_array_equal(got["usage_neurons"], fired.sum((0, 1)))


def test_topk_on_a_tensor_parallel_mesh_matches_one_device():
  """The hidden units are split over tensor=2: the per-token top-k still sees all F of them."""
  cfg = cfg_of(**{"ffn.activation": "relu2", "ffn.activation_topk": F // 4, "mesh.data": 2,
                  "mesh.fsdp": 2, "mesh.tensor": 2})
  graphdef, state = nnx.split(build_model(cfg, 257, seed=3))
  params = nnx.to_pure_dict(state)
  tok = jnp.asarray(np.random.default_rng(0).integers(0, 257, (4, 33)), jnp.int32)
  data = {"inputs": tok[:, :-1], "targets": tok[:, 1:]}

  def loss(p, d):  # forward only: the mask is a stop-gradient constant either way
    sums, _, sown, _ = forward_sums(graphdef, p, d, 0.0)
    return sums["ce_sum"] / sums["count"], sown

  (want, want_sown) = jax.jit(loss)(params, data)
  mesh = make_mesh(cfg.mesh, jax.devices()[:8])
  sharded = jax.device_put(params, param_shardings(model_spec(cfg, 257), mesh))
  with activation_sharding(mesh, registry.logical_rules(cfg.mesh)):
    got, got_sown = jax.jit(loss)(
        sharded, jax.device_put(data, NamedSharding(mesh, P(("data", "fsdp")))))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert set(got_sown) == set(want_sown) and len(want_sown) == 4  # 2 layers x 2 sown values
  for k in want_sown:  # the same units kept per token: the same firing counts
    np.testing.assert_allclose(got_sown[k], want_sown[k], rtol=1e-6, err_msg=k)


def counts(**over):
  cfg = cfg_of(**over)
  model = nnx.eval_shape(lambda: Transformer(cfg, vocab_size=257, rngs=nnx.Rngs(0)))
  return accounting.count(model, cfg, vocab_size=257), cfg


def test_exploitable_flops():
  dense, cfg = counts()
  assert dense.flops_per_token_exploitable == dense.flops_per_token
  relu, _ = counts(**{"ffn.activation": "relu"})  # data-dependent zeros: not counted
  assert relu.flops_per_token_exploitable == relu.flops_per_token == dense.flops_per_token
  k, d, layers = F // 4, cfg.model.d_model, cfg.model.num_layers
  top, _ = counts(**{"ffn.activation_topk": k})
  assert top.flops_per_token == dense.flops_per_token
  # training FLOPs of one FFN: dense 18·D·F; top-k 4·D·F (gate / up forward) + 14·D·k
  assert top.flops_per_token_exploitable == dense.flops_per_token - layers * 14 * d * (F - k)
  assert top.as_metrics()["flops_per_token_exploitable"] == top.flops_per_token_exploitable
  full, _ = counts(**{"ffn.activation_topk": F})
  assert full.flops_per_token_exploitable == dense.flops_per_token


@pytest.mark.parametrize("over,needle", [
    ({"ffn.activation_topk": -1}, "config.ffn.activation_topk=-1 must be in [0, d_ff=192]"),
    ({"ffn.activation_topk": F + 1}, "config.ffn.activation_topk=193 must be in"),
    ({"ffn.type": "moe", "ffn.activation_topk": 4}, "config.ffn.activation_topk=4 applies"),
    ({"ffn.type": "moe", "ffn.activation": "drelu"}, "config.ffn.activation='drelu'"),
    ({"ffn.activation": "relu3"}, "config.ffn.activation"),
])
def test_bad_activation_config_is_one_line(over, needle):
  with pytest.raises(ConfigError) as e:
    cfg_of(**over)
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_tiny_relu_run_logs_nonzero_and_dead_fractions(tmp_path, default_dataset):
  cfg = cfg_of(**{"ffn.activation": "relu", "train.steps": 4, "optim.warmup_steps": 1,
                  "train.log_every_steps": 2, "train.eval_every_steps": 0,
                  "train.checkpoint_every_steps": 0, "train.eval_batches": 1,
                  "train.grad_accum_steps": 2})  # sown scalars averaged over micro-batches
  result = looplib.train_and_evaluate(cfg, tmp_path, devices=jax.devices()[:1])
  records = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if "loss" in r]
  for i in range(cfg.model.num_layers):
    name = f"sown/blocks/{i}/ffn/act_nonzero"
    assert all(0 < r[name] < 1 for r in train), name
    dead = result.eval_metrics[f"blocks/{i}/ffn/dead_fraction"]
    assert 0 <= dead <= 1
    assert dead == pytest.approx(1 - result.eval_metrics[  # touched_fraction: float32
        f"blocks/{i}/ffn/usage_neurons/touched_fraction"], abs=1e-6)
  assert not any("usage_neurons" in k for r in train for k in r)  # eval-only count vector
  eval_rec = [r for r in records if "eval/loss" in r][-1]
  assert "eval/blocks/0/ffn/dead_fraction" in eval_rec
