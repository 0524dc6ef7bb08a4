"""MoE fidelity to the papers: MultiHash (Roller et al. 2021) costs one expert and sums one
segment of each hashed expert; fine-grained granularity (Krajewski et al. 2024 / DeepSeekMoE)
multiplies E and top-k by G at fixed expert parameters; `sparsejax info` prints the sizes."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.config import ConfigError, MeshConfig
from sparsejax.configure import load_config
from sparsejax.info import describe
from sparsejax.layers import registry, routers
from sparsejax.layers.moe import MoE, sizes
from sparsejax.models import accounting
from sparsejax.parallel import mesh as mesh_lib
from sparsejax.parallel import sharding
from sparsejax.train.state import model_spec

CFG = load_config("configs/moe.py:tiny")  # d=64, d_ff=192, E=8, k=2, 2 layers (both MoE)
D, F, E = 64, 192, 8
WEIGHTS = ("w_gate_ExDxF", "w_up_ExDxF", "w_down_ExFxD")


def moe_cfg(**moe):
  return CFG.with_sections(moe=dataclasses.replace(CFG.moe, **moe))


def layer(seed=0, **moe):
  return MoE(moe_cfg(**moe), 0, rngs=nnx.Rngs(params=seed))


def x_input(b=2, t=8, seed=1):
  return jax.random.normal(jax.random.key(seed), (b, t, D), jnp.float32)


def tokens_input(b=2, t=8, vocab=300, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, t)), jnp.int32)


def run(m, x, **kw):
  y, inter = nnx.capture(m, nnx.Intermediate)(x, **kw)
  return np.asarray(y), {k: np.asarray(v[-1]) for k, v in nnx.to_pure_dict(inter).items()}


def silu(a):
  return a / (1 + np.exp(-a))


def swiglu(x, wg, wu, wd):
  return (silu(x @ wg) * (x @ wu)) @ wd


def w64(m):
  return {k: np.asarray(getattr(m, k)[...], np.float64) for k in WEIGHTS}


# ---- MultiHash ----

def multihash_reference(m, x, tokens):
  """The paper's MultiHash in float64: the h hashes' experts each contribute segment j of their
  hidden units; full expert e is the concatenation of its stored segments e*h + j (hidden dim)."""
  h = m.hash_key[3]
  table = routers.hash_table(*m.hash_key)  # h x vocab, ids of the E full experts
  w = w64(m)
  full = {k: np.stack([np.concatenate([w[k][e * h + j] for j in range(h)],
                                      axis=0 if k == "w_down_ExFxD" else 1) for e in range(E)])
          for k in WEIGHTS}
  seg = F // h
  xs = np.asarray(x, np.float64).reshape(-1, D)
  out = np.zeros_like(xs)
  for n, (xn, tok) in enumerate(zip(xs, np.asarray(tokens).ravel())):
    for j in range(h):
      e, cols = table[j, tok % table.shape[1]], slice(j * seg, (j + 1) * seg)
      out[n] += swiglu(xn, full["w_gate_ExDxF"][e][:, cols], full["w_up_ExDxF"][e][:, cols],
                       full["w_down_ExFxD"][e][cols])
  return out.reshape(x.shape)


@pytest.mark.parametrize("h,dispatch", [(2, "dropless"), (2, "capacity"), (4, "capacity")])
def test_multihash_sums_one_segment_of_each_hashed_expert(h, dispatch):
  # capacity_factor E: C = ceil(E * T * h / (E * h)) = T slots, nothing is dropped
  m = layer(router="hash", num_hashes=h, top_k=h, hash_vocab_size=300, dispatch=dispatch,
            capacity_factor=float(E))
  assert m.w_gate_ExDxF.shape == (E * h, D, F // h)
  x, tokens = x_input(), tokens_input()
  y, sown = run(m, x, tokens_BxT=tokens)
  np.testing.assert_allclose(y, multihash_reference(m, x, tokens), atol=1e-5, rtol=1e-4)
  assert float(sown["dropped_fraction"]) == 0.0 and sown["expert_load"].shape == (E * h,)


def test_multihash_one_hash_is_plain_hash_routing():
  m = layer(router="hash", num_hashes=1, top_k=1, hash_vocab_size=300, dispatch="dropless")
  tokens = tokens_input()
  table = routers.hash_table(*m.hash_key)
  r = m.route(None, tokens.reshape(-1))[0]
  assert np.array_equal(r.expert_NxK[:, 0], table[0, np.asarray(tokens).ravel()])
  assert np.array_equal(r.gate_NxK, np.ones((16, 1), np.float32))
  x = x_input()
  y, _ = run(m, x, tokens_BxT=tokens)
  w = w64(m)
  ref = [swiglu(xn, *(w[k][e] for k in WEIGHTS)) for xn, e in
         zip(np.asarray(x, np.float64).reshape(-1, D), table[0, np.asarray(tokens).ravel()])]
  np.testing.assert_allclose(y.reshape(-1, D), np.stack(ref), atol=1e-5, rtol=1e-4)
  # hash j of an h-hash table is the same function for every h: MultiHash extends plain hashing
  assert np.array_equal(routers.random_hash_table(300, E, 1, 7)[0],
                        routers.random_hash_table(300, E, 3, 7)[0])


def test_multihash_costs_one_expert():
  counts = {}
  for h in (1, 2, 4):
    cfg = load_config("configs/moe.py:tiny", **{"moe.router": "hash", "moe.num_hashes": h,
                                                "moe.top_k": h})
    model = model_spec(cfg, 257).abstract_model
    assert model.blocks[0].ffn.active_params_per_token(64) == 3 * D * F  # one full expert
    counts[h] = accounting.count(model, cfg)
  for h in (2, 4):  # same FLOPs and parameters as one hash (averaging h experts cost h x)
    assert counts[h].params_active_per_token == counts[1].params_active_per_token
    assert counts[h].flops_per_token == counts[1].flops_per_token
    assert counts[h].params_total == counts[1].params_total


# ---- granularity ----

@pytest.mark.parametrize("g", [4])  # G=2: test_split_experts_reproduce_...
def test_granularity_multiplies_experts_and_top_k_at_fixed_expert_params(g):
  m1, mg, mg_cfg = layer(), layer(granularity=g), moe_cfg(granularity=g)
  assert (mg.num_experts, mg.top_k, mg.d_expert) == sizes(mg_cfg) == (E * g, 2 * g, F // g)
  expert_params = lambda m: sum(int(np.prod(getattr(m, k).shape)) for k in WEIGHTS)
  assert expert_params(mg) == expert_params(m1) == E * 3 * D * F
  assert mg.router_DxE.shape == (D, E * g)
  # active: same routed expert weights per token, only the router grows (D x E*G)
  assert mg.active_params_per_token(64) - D * E * g == m1.active_params_per_token(64) - D * E
  r, _ = mg.route(x_input().reshape(-1, D))
  assert r.expert_NxK.shape == (16, 2 * g)  # k*G choices reach the dispatch ...
  _, sown = run(mg, x_input())
  assert sown["expert_load"].shape == (E * g,)  # ... over E*G experts
  c1, cg = (accounting.count(model_spec(c, 257).abstract_model, c) for c in (CFG, mg_cfg))
  assert cg.params_total - c1.params_total == 2 * D * E * (g - 1)  # 2 MoE layers' routers
  assert cg.params_active_per_token - c1.params_active_per_token == 2 * D * E * (g - 1)


def split_into(m1, g, down_scale=1.0, **moe):
  """A granularity-g layer whose experts are m1's experts' hidden units cut into g pieces
  (expert e -> e*g + j; w_down pieces times ``down_scale``, a power of 2: exact) and whose router
  gives every piece its expert's logit."""
  mg = layer(granularity=g, **moe)
  s = F // g
  for k in WEIGHTS:
    w = np.asarray(getattr(m1, k)[...]) * (down_scale if k == "w_down_ExFxD" else 1.0)
    pieces = [w[e][s * j:s * (j + 1)] if k == "w_down_ExFxD" else w[e][:, s * j:s * (j + 1)]
              for e in range(E) for j in range(g)]
    getattr(mg, k)[...] = jnp.asarray(np.stack(pieces))
  mg.router_DxE[...] = jnp.repeat(m1.router_DxE[...], g, axis=1)
  return mg


@pytest.mark.parametrize("moe", [dict(dispatch="dropless"),
                                 dict(dispatch="capacity", capacity_factor=0.75)])
def test_split_experts_reproduce_the_granularity_one_layer(moe):
  """Top-(k*G) of the E*G pieces = the G pieces of each top-k expert (softmax p_e / G each), so
  after renormalisation every piece of expert e gets gate g_e / G: with pieces carrying G x w_down
  they sum to g_e * expert e. With capacity the pieces see the same tokens in the same order (and
  C = cf*T*kG/EG is unchanged), so the same assignments are dropped."""
  m1 = layer(**moe)
  m2 = split_into(m1, 2, down_scale=2.0, **moe)
  x = x_input(b=2, t=16)
  y1, s1 = run(m1, x)
  y2, s2 = run(m2, x)
  np.testing.assert_allclose(y2, y1, atol=1e-6, rtol=1e-5)
  assert float(s2["dropped_fraction"]) == pytest.approx(float(s1["dropped_fraction"]))
  if moe["dispatch"] == "capacity":
    assert float(s1["dropped_fraction"]) > 0
  assert float(s2["load_balance_loss"]) == pytest.approx(float(s1["load_balance_loss"]), rel=1e-5)


def test_expert_choice_split_experts_reproduce_the_granularity_one_layer():
  """Expert choice at G: E*G experts, the same capacity per expert (C = cf*T*k/E at any G), so
  each piece takes its expert's tokens; sigmoid scores are the same for every piece."""
  moe = dict(router="expert_choice", score_fn="sigmoid", capacity_factor=0.5)
  with pytest.warns(UserWarning, match="not causal"):
    m1 = layer(**moe)
    m2 = split_into(m1, 2, **moe)
  x = x_input(b=1, t=16)
  y1, s1 = run(m1, x)
  y2, s2 = run(m2, x)
  np.testing.assert_allclose(y2, y1, atol=1e-6, rtol=1e-5)
  assert 0 < float(s1["dropped_fraction"]) == pytest.approx(float(s2["dropped_fraction"]))
  assert m2.experts_per_token(16) == 2 * m1.experts_per_token(16)  # pieces half as wide


def test_granularity_expert_parallel_matches_single_device():
  m = layer(granularity=2, dispatch="capacity", capacity_factor=1.0)  # 16 experts on 8 devices
  x = x_input(b=8, t=8, seed=4)
  graphdef, params = nnx.split(m, nnx.Param)
  y1 = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, x)
  mesh = mesh_lib.make_mesh(MeshConfig(data=-1, expert=8))
  with sharding.activation_sharding(mesh, registry.logical_rules(MeshConfig())):
    step = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))  # a new function: traced under EP
    assert "all-to-all" in step.lower(params, x).compile().as_text()
    y2 = step(params, x)
  np.testing.assert_allclose(y2, y1, atol=1e-6)


# ---- sparsejax info, config checks ----

def test_info_prints_the_sizes_granularity_implies():
  info = json.loads(json.dumps(describe(load_config("configs/moe.py:tiny",
                                                    **{"moe.granularity": 4}), 257)))
  router, experts = D * E * 4, E * 3 * D * F
  assert info["moe"] == {"routed_experts": 32, "experts_per_token": 8.0, "expert_width": 48,
                         "shared_width": 0, "layer_params_total": router + experts,
                         "layer_params_active": router + 2 * 3 * D * F}
  shared = describe(load_config("configs/moe.py:tiny", **{"moe.granularity": 2,
                                                          "moe.num_shared_experts": 1}), 257)
  assert shared["moe"]["shared_width"] == F  # the G=1 width
  assert "moe" not in describe(load_config("configs/dense.py:tiny"), 257)


@pytest.mark.parametrize("overrides,key", [
    ({"moe.d_expert": 100, "moe.granularity": 8}, "config.moe.granularity"),
    ({"moe.router": "hash", "moe.top_k": 1, "moe.granularity": 2}, "config.moe.granularity"),
    ({"moe.router": "hash", "moe.num_hashes": 5, "moe.top_k": 5}, "config.moe.num_hashes"),
    ({"moe.granularity": 2, "mesh.expert": 3}, "config.moe.num_experts"),
    ({"moe.top_k": 1}, "config.moe.renormalize"),
])
def test_bad_combinations_are_one_line_errors_naming_the_key(overrides, key):
  with pytest.raises(ConfigError) as err:
    load_config("configs/moe.py:tiny", **overrides)
  assert str(err.value).startswith(key) and "\n" not in str(err.value)


def test_checks_use_the_effective_sizes():
  # top-1 base at G=2 is top-2 of 16: renormalised gates are fine
  load_config("configs/moe.py:tiny", **{"moe.top_k": 1, "moe.granularity": 2})
  # 6 base experts x G=2 = 12 routed experts divide over mesh.expert=4 (6 alone would not)
  load_config("configs/moe.py:tiny", **{"moe.num_experts": 6, "moe.granularity": 2,
                                        "mesh.preset": "fsdp_ep"})
  # d_expert is the base width: 96 / G=2 -> experts of 48
  assert sizes(load_config("configs/moe.py:tiny", **{"moe.d_expert": 96, "moe.granularity": 2})
               ) == (16, 4, 48)
