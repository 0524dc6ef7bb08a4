"""MoE family: routers, dispatch paths against a per-token reference, losses by hand, causality,
expert-choice leak, expert parallelism on 8 fake devices, and bitwise resume of a tiny training
(the tiny preset's falling loss and balanced routing: tests/test_sparse_layers_work.py)."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.layers import registry
from sparsejax.config import ConfigError, MeshConfig
from sparsejax.configure import load_config
from sparsejax.layers import routers
from sparsejax.layers.moe import MoE
from sparsejax.models.transformer import build_model
from sparsejax.parallel import sharding
from sparsejax.parallel import mesh as mesh_lib
from sparsejax.models import accounting as flops
from sparsejax.train import loop as looplib
from sparsejax.parallel.mesh import make_mesh
from sparsejax.train.checkpoint import Checkpointer
from sparsejax.train.state import abstract_state, model_spec

CFG = load_config("configs/moe.py:tiny")  # d=64, d_ff=192, E=8, k=2


def moe_cfg(**moe):
  """Tiny config with config.moe fields replaced (module-level tests: no config checks)."""
  return CFG.with_sections(moe=dataclasses.replace(CFG.moe, **moe))


def layer(seed=0, **moe):
  return MoE(moe_cfg(**moe), 0, rngs=nnx.Rngs(params=seed))


def x_input(b=2, t=8, seed=1):
  return jax.random.normal(jax.random.key(seed), (b, t, CFG.model.d_model), jnp.float32)


def run(m, x, **kw):
  y, inter = nnx.capture(m, nnx.Intermediate)(x, **kw)
  return y, {k: np.asarray(v[-1]) for k, v in nnx.to_pure_dict(inter).items()}


def reference(m, x):
  """Per-token loop: its top-k experts' SwiGLU outputs times the gates (+ shared experts)."""
  x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  w = {k: np.asarray(getattr(m, k)[...], np.float64) for k in
       ("router_DxE", "w_gate_ExDxF", "w_up_ExDxF", "w_down_ExFxD")}
  silu = lambda a: a / (1 + np.exp(-a))
  out = np.zeros_like(x)
  for n, xn in enumerate(x):
    logits = xn @ w["router_DxE"]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    top = np.argsort(-p, kind="stable")[:m.top_k]
    gates = p[top] / p[top].sum()
    for e, g in zip(top, gates):
      h = silu(xn @ w["w_gate_ExDxF"][e]) * (xn @ w["w_up_ExDxF"][e])
      out[n] += g * (h @ w["w_down_ExFxD"][e])
    if m.shared_gate_DxS is not None:
      h = silu(xn @ np.asarray(m.shared_gate_DxS[...])) * (xn @ np.asarray(m.shared_up_DxS[...]))
      out[n] += h @ np.asarray(m.shared_down_SxD[...])
  return out


def test_dropless_and_roomy_capacity_match_per_token_reference():
  x = x_input()
  m = layer(dispatch="dropless", num_shared_experts=1)
  y_dropless, sown = run(m, x)
  ref = reference(m, x).reshape(x.shape)
  np.testing.assert_allclose(y_dropless, ref, atol=1e-5, rtol=1e-4)
  assert float(sown["dropped_fraction"]) == 0.0
  # capacity_factor E/k gives C = T slots: nothing can overflow -> identical to dropless
  m_cap = layer(dispatch="capacity", capacity_factor=4.0, num_shared_experts=1)
  y_cap, sown_cap = run(m_cap, x)
  np.testing.assert_allclose(y_cap, y_dropless, atol=1e-6)
  assert float(sown_cap["dropped_fraction"]) == 0.0


def tied_router_layer(**moe):
  """Router weights 0: all scores tie, top_k picks experts 0 and 1 for every token, gates 1/2."""
  m = layer(**moe)
  m.router_DxE[...] = jnp.zeros_like(m.router_DxE[...])
  return m


def test_capacity_overflow_drops_later_tokens_and_reports_fraction():
  x = x_input(b=2, t=8)
  # C = ceil(0.75 * 8 * 2 / 8) = 2 slots per expert and sequence: tokens 0, 1 of each sequence
  # keep both experts, tokens 2..7 are dropped (their routed output is exactly zero).
  m = tied_router_layer(dispatch="capacity", capacity_factor=0.75)
  y, sown = run(m, x)
  y_full, _ = run(tied_router_layer(dispatch="dropless"), x)
  np.testing.assert_allclose(y[:, :2], y_full[:, :2], atol=1e-6)
  assert np.all(np.asarray(y[:, 2:]) == 0.0) and np.any(np.asarray(y_full[:, 2:]) != 0)
  assert float(sown["dropped_fraction"]) == pytest.approx(6 / 8)
  np.testing.assert_allclose(sown["expert_load"], [0.5, 0.5] + [0.0] * 6)
  assert float(sown["load_max_over_mean"]) == pytest.approx(4.0)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_gradients_reach_exactly_the_selected_experts(dispatch):
  x = x_input(b=1, t=2, seed=3)  # 2 tokens x top-2: at most 4 of 8 experts are used
  m = layer(dispatch=dispatch, capacity_factor=4.0)
  r, _ = m.route(x.reshape(2, -1))
  used = set(np.asarray(r.expert_NxK).ravel().tolist())
  assert len(used) < 8
  graphdef, params = nnx.split(m, nnx.Param)

  def loss(p):
    return jnp.sum(nnx.merge(graphdef, p)(x) ** 2)

  grads = jax.grad(loss)(params)
  for name in ("w_gate_ExDxF", "w_up_ExDxF", "w_down_ExFxD"):
    g = np.asarray(grads[name][...])
    for e in range(8):
      assert (np.abs(g[e]).max() > 0) == (e in used), (name, e, used)


def test_hash_tables_deterministic_multi_hash_and_routing():
  a = routers.random_hash_table(1000, 8, 2, seed=5)
  b = routers.random_hash_table(1000, 8, 2, seed=5)
  assert np.array_equal(a, b) and not np.array_equal(a, routers.random_hash_table(1000, 8, 2, 6))
  assert np.all(a[0] != a[1])  # multi-hash: distinct experts per token id
  cfg = dataclasses.replace(moe_cfg(router="hash", num_hashes=2, top_k=2, hash_vocab_size=300,
                                    dispatch="dropless"))
  m1, m2 = (MoE(cfg, 3, rngs=nnx.Rngs(params=s)) for s in (0, 1))
  assert m1.router_DxE is None and m1.hash_key == m2.hash_key
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 300, (2, 8)), jnp.int32)
  r = m1.route(None, tokens.reshape(-1))[0]
  table = routers.hash_table(*m2.hash_key)
  # MultiHash: hash j routes to segment j of expert table[j, token] = segment expert e*2 + j
  assert np.array_equal(r.expert_NxK, table[:, np.asarray(tokens).ravel()].T * 2 + [0, 1])
  np.testing.assert_allclose(r.gate_NxK, 1.0)
  y, sown = run(m1, x_input(), tokens_BxT=tokens)
  assert y.shape == (2, 8, 64) and "load_balance_loss" not in sown and "aux_loss" in sown
  # the Transformer passes the token ids to layers that declare tokens_BxT
  model = build_model(load_config("configs/moe.py:tiny", **{
      "moe.router": "hash", "moe.hash_type": "balanced", "moe.num_hashes": 2}), 257)
  assert np.all(np.isfinite(model(tokens)))


def test_balanced_hash_balances_skewed_frequencies():
  v, e = 4000, 8
  freq = 1.0 / np.arange(1, v + 1) ** 0.8  # Zipf-like token counts
  freq = freq[np.random.default_rng(0).permutation(v)]

  def max_over_mean(table):
    load = np.bincount(table.ravel(), weights=np.tile(freq, table.shape[0]), minlength=e)
    return load.max() / load.mean()

  balanced = routers.balanced_hash_table(freq, e, 1)
  rand = routers.random_hash_table(v, e, 1, seed=0)
  assert max_over_mean(balanced) < 1.01 < 1.05 < max_over_mean(rand), (
      max_over_mean(balanced), max_over_mean(rand))
  two = routers.balanced_hash_table(freq, e, 2)
  assert np.all(two[0] != two[1]) and max_over_mean(two) < 1.01
  # uniform frequencies (no counts available): a round robin, equal id counts per expert
  assert np.all(np.bincount(routers.balanced_hash_table(np.ones(64), e, 1).ravel()) == 8)


def test_softmax_sigmoid_gates_and_renormalisation():
  logits = jax.random.normal(jax.random.key(0), (5, 8)) * 2
  for fn, s in (("softmax", jax.nn.softmax(logits)), ("sigmoid", jax.nn.sigmoid(logits))):
    raw = routers.token_choice(logits, 3, score_fn=fn, renormalize=False)
    idx = np.argsort(-np.asarray(s), axis=1, kind="stable")[:, :3]
    assert np.array_equal(raw.expert_NxK, idx)
    np.testing.assert_allclose(raw.gate_NxK, np.take_along_axis(np.asarray(s), idx, 1),
                               rtol=1e-6)
    norm = routers.token_choice(logits, 3, score_fn=fn, renormalize=True)
    np.testing.assert_allclose(norm.gate_NxK.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(norm.probs_NxE.sum(-1), 1.0, rtol=1e-6)
  # the bias (aux-loss-free balancing) changes the selection, not the gate values
  bias = jnp.zeros(8).at[7].set(10.0)
  biased = routers.token_choice(logits, 3, renormalize=False, bias_E=bias)
  assert np.all(np.any(np.asarray(biased.expert_NxK) == 7, axis=1))
  np.testing.assert_allclose(biased.gate_NxK, np.take_along_axis(
      np.asarray(jax.nn.softmax(logits)), np.asarray(biased.expert_NxK), 1), rtol=1e-6)
  load = jnp.array([0.5, 0.1, 0.2, 0.2])
  np.testing.assert_allclose(routers.update_expert_bias(jnp.zeros(4), load, 0.1),
                             [-0.1, 0.1, 0.1, 0.1])


def test_bias_balancing_buffer_gets_no_gradient_and_sows_its_update():
  m = layer(bias_balancing=True, bias_update_rate=0.1)
  x = x_input()
  graphdef, params = nnx.split(m, nnx.Param)
  grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2))(params)
  assert np.all(np.asarray(grads["buffer_expert_bias_E"][...]) == 0)
  _, sown = run(m, x)
  expected = 0.1 * np.sign(sown["expert_load"].mean() - sown["expert_load"])
  np.testing.assert_allclose(sown["update__buffer_expert_bias_E"], expected)


def test_load_balance_and_z_loss_by_hand():
  logits = jnp.array([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
  r = routers.token_choice(logits, 1)
  p = np.exp(np.asarray(logits))
  p /= p.sum(1, keepdims=True)
  f = np.array([1, 2, 0, 0]) / 3
  assert float(routers.load_balance_loss(r, 4)) == pytest.approx(4 * np.sum(f * p.mean(0)),
                                                                 rel=1e-6)
  lse = np.log(np.exp(np.asarray(logits)).sum(1))
  assert float(routers.z_loss(logits)) == pytest.approx(np.mean(lse ** 2), rel=1e-6)
  uniform = routers.Routing(jnp.arange(8).reshape(4, 2), jnp.full((4, 2), 0.5),
                            jnp.full((4, 8), 1 / 8), jnp.zeros((4, 8)))
  assert float(routers.load_balance_loss(uniform, 8)) == pytest.approx(1.0)
  # the layer sows coef * loss as aux_loss: a zero router routes uniformly in P, f = {0, 1}
  m = tied_router_layer(load_balance_loss=0.5, router_z_loss=0.25)
  _, sown = run(m, x_input())
  assert float(sown["load_balance_loss"]) == pytest.approx(8 * 0.5 * (1 / 8) * 2)
  assert float(sown["router_z_loss"]) == pytest.approx(math.log(8) ** 2, rel=1e-6)
  assert float(sown["aux_loss"]) == pytest.approx(0.5 * 1.0 + 0.25 * math.log(8) ** 2, rel=1e-6)
  assert float(sown["router_entropy"]) == pytest.approx(math.log(8), rel=1e-6)


def test_noisy_router_module_level_and_shazeer_losses():
  m = layer(router="noisy_token_choice", importance_loss=1.0, load_loss=1.0)
  m.noise_DxE[...] = jnp.full_like(m.noise_DxE[...], 0.05)
  x = x_input()
  y0, s0 = run(m, x)  # no key: clean logits (evaluation)
  y1, s1 = run(m, x, rng=jax.random.key(0))
  y2, _ = run(m, x, rng=jax.random.key(0))
  assert np.array_equal(y1, y2) and not np.allclose(y0, y1)
  assert "load_loss" in s1 and "load_loss" not in s0 and float(s1["importance_loss"]) > 0
  assert float(s1["aux_loss"]) == pytest.approx(
      0.01 * s1["load_balance_loss"] + 1e-3 * s1["router_z_loss"] + s1["importance_loss"]
      + s1["load_loss"], rel=1e-5)


def test_config_checks_are_one_line_and_name_the_key():
  cases = {"moe.top_k": (9, "config.moe.top_k"), "moe.granularity": (5, "config.moe.granularity"),
           "moe.capacity_factor": (0.0, "config.moe.capacity_factor"),
           "moe.load_loss": (0.1, "config.moe.load_loss"),
           "moe.num_hashes": (3, "config.moe.num_hashes"),
           "mesh.expert": (3, "config.moe.num_experts")}
  for key, (value, name) in cases.items():
    extra = {"moe.router": "hash"} if key == "moe.num_hashes" else {}
    with pytest.raises(ConfigError, match=name) as err:
      load_config("configs/moe.py:tiny", **{key: value, **extra})
    assert "\n" not in str(err.value)
  with pytest.raises(ConfigError, match="config.moe.bias_balancing"):
    load_config("configs/moe.py:tiny", **{"moe.bias_balancing": True,
                                          "moe.router": "expert_choice"})
  load_config("configs/moe.py:tiny", **{"moe.top_k": 9, "ffn.type": "dense"})  # MoE unused: ok


def test_active_params_per_token_and_flops():
  spec = model_spec(CFG, 257)
  counts = flops.count(spec.abstract_model, CFG)
  d, f, v = 64, 192, 384
  attn = d * d * 2 + 2 * d * 32  # q, o + k, v with 2 KV heads of 16
  per_layer = attn + d * 8 + 2 * 3 * d * f
  assert counts.params_active_per_token == v * d + 2 * per_layer
  assert counts.params_total == v * d + 2 * (attn + d * 8 + 8 * 3 * d * f + 2 * d) + d
  shared = load_config("configs/moe.py:350m")
  m = nnx.eval_shape(lambda: MoE(shared, 0, rngs=nnx.Rngs(params=0)))
  assert m.active_params_per_token(2048) == 1024 * 64 + 4 * 3 * 1024 * 688  # top-3 + 1 shared


def _model(**moe):
  cfg = moe_cfg(**moe)
  return build_model(cfg, 257, seed=0)


@pytest.mark.parametrize("moe", [dict(dispatch="dropless"),
                                 dict(dispatch="capacity", capacity_factor=0.5)])
def test_token_choice_model_is_causal(moe):
  model = _model(**moe)
  t, i = 16, 7
  x = jax.random.normal(jax.random.key(0), (2, t, 64))
  graphdef, params = nnx.split(model)

  def f(x):
    out, inter = nnx.capture(nnx.merge(graphdef, params).decode, nnx.Intermediate)(x)
    return jnp.sum(out[:, :i + 1]), inter

  g, inter = jax.grad(f, has_aux=True)(x)
  g = np.asarray(g)
  assert np.all(g[:, i + 1:] == 0.0) and np.abs(g[:, :i + 1]).max() > 0
  if moe["dispatch"] == "capacity":  # tokens really were dropped
    assert float(nnx.to_pure_dict(inter)["blocks"][0]["ffn"]["dropped_fraction"][-1]) > 0


def test_expert_choice_leaks_the_future():
  with pytest.warns(UserWarning, match="not causal"):
    m = layer(router="expert_choice", capacity_factor=0.5)  # C = 0.5 * 16 * 2 / 8 = 2 tokens
  x = x_input(b=1, t=16)
  x2 = x.at[:, 8:].multiply(5.0)  # change only later tokens
  y, sown = run(m, x)
  y2, _ = run(m, x2)
  assert not np.allclose(y[:, :8], y2[:, :8])  # earlier positions' outputs changed
  assert 0 < float(sown["dropped_fraction"]) < 1  # tokens nobody picked
  m_tc = layer(dispatch="capacity", capacity_factor=1.0)  # token choice: unaffected
  assert np.array_equal(run(m_tc, x)[0][:, :8], run(m_tc, x2)[0][:, :8])


@pytest.mark.parametrize("router,expert", [("token_choice", 4), ("token_choice", 8),
                                           ("expert_choice", 8)])
def test_expert_parallel_matches_single_device(router, expert):
  m = layer(router=router, dispatch="capacity", capacity_factor=1.0)
  x = x_input(b=8, t=8, seed=4)
  graphdef, params = nnx.split(m, nnx.Param)

  def loss(p, x):
    y = nnx.merge(graphdef, p)(x)
    return jnp.sum(y * jnp.cos(jnp.arange(64.0))), y

  (l1, y1), g1 = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, x)
  mesh = mesh_lib.make_mesh(MeshConfig(data=-1, expert=expert))
  with sharding.activation_sharding(mesh, registry.logical_rules(MeshConfig())):
    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    assert "all-to-all" in step.lower(params, x).compile().as_text()
    (l2, y2), g2 = step(params, x)
  np.testing.assert_allclose(y2, y1, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


# ---- training through the real loop ----

STEPS = 12


def tiny(**overrides):
  base = {"train.steps": STEPS, "train.checkpoint_every_steps": 4, "train.log_every_steps": 1,
          "train.eval_every_steps": 0, "train.progress_bar": False}
  base.update(overrides)
  return load_config("configs/moe.py:tiny", **base)


def records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
          if line]


def test_moe_bitwise_resume(tmp_path, default_dataset):
  """With the stochastic router (per-step rng) and bias balancing (sown buffer updates)."""
  extra = {"moe.router": "noisy_token_choice", "moe.bias_balancing": True,
           "moe.bias_update_rate": 0.01, "moe.load_loss": 0.01}
  base_dir, resumed = tmp_path / "base", tmp_path / "resumed"
  looplib.train_and_evaluate(tiny(**extra), base_dir, devices=jax.devices()[:1])
  first = looplib.train_and_evaluate(tiny(**{"train.stop_at_step": 5, **extra}), resumed,
                                     devices=jax.devices()[:1])
  assert first.step == 5
  looplib.train_and_evaluate(tiny(**extra), resumed, devices=jax.devices()[:1])
  key = lambda recs: [(r["step"], r["loss"]) for r in recs if "loss" in r]
  assert key(records(resumed)) == key(records(base_dir))
  assert len(key(records(base_dir))) == STEPS
  cfg = tiny(**extra)
  target, _ = abstract_state(model_spec(cfg, 257), make_mesh(cfg.mesh, jax.devices()[:1]))
  params = []
  for workdir in (base_dir, resumed):
    ckpt = Checkpointer(workdir, async_save=False)
    state, _, _ = ckpt.restore(STEPS, target)
    ckpt.close()
    params.append(state["params"])
  for a, b in zip(*map(jax.tree.leaves, params)):
    assert np.array_equal(a, b)
  bias = np.asarray(params[0]["blocks"][0]["ffn"]["buffer_expert_bias_E"])
  assert np.abs(bias).max() > 0 and np.all(np.abs(bias) <= 0.01 * STEPS + 1e-6)
  assert np.abs(np.asarray(params[0]["blocks"][0]["ffn"]["noise_DxE"])).max() > 0  # trained
