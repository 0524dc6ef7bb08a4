"""Product-key families: product-key top-k vs brute force, PEER and memory layers vs O(N)
references, sparse gradients, the shared value pool and its optimizer group, causality,
column-sharded values on 8 fake devices. The tiny presets' falling loss: in the 300-step runs of
tests/test_sparse_layers_work.py; their bitwise resume: test_train.py's every-family test."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

from sparsejax.config import ConfigError
from sparsejax.configure import replace
from sparsejax.configure import load_config
from sparsejax.layers import product_keys as pk
from sparsejax.layers.memory import MemoryLayer, brute_force_reference
from sparsejax.layers.peer import PEER, dense_reference
from sparsejax.models.transformer import build_model
from sparsejax.parallel.sharding import activation_sharding
from sparsejax.parallel.mesh import make_mesh
from sparsejax.layers import registry
from sparsejax.train.optim import make_optimizer, param_groups
from sparsejax.train.state import model_spec, param_shardings
from sparsejax.train.step import make_train_step

VOCAB = 257
PEER_SMALL = {"peer.num_experts": 8 ** 2, "peer.num_heads": 2, "peer.top_k": 3, "peer.d_key": 8}


def peer_cfg(**o):
  return load_config("configs/peer.py:tiny", **o)


def memory_cfg(**o):
  return load_config("configs/memory.py:tiny", **o)


def randn(shape, seed, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def tokens(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, size=shape), jnp.int32)


def call(module, *args):
  """Run a module, discarding what it sows (usage counts)."""
  out, _ = nnx.capture(module, nnx.Intermediate)(*args)
  return out


def sown_counts(inter, name: str) -> dict[str, np.ndarray]:
  """{layer path: summed count vector} for every sown `name` (values are stacked per call)."""
  out = {}
  for path, var in nnx.to_flat_state(inter):
    if path[-1] == name:
      raw = var.get_value() if isinstance(var, nnx.Variable) else var
      raw = np.stack([np.asarray(r) for r in raw]) if isinstance(raw, tuple) else np.asarray(raw)
      out["/".join(map(str, path[:-1]))] = raw.reshape(-1, raw.shape[-1]).sum(0)
  return out


def flat_params(model):
  return {"/".join(map(str, k)): v for k, v in
          nnx.to_flat_state(nnx.split(model, nnx.Param)[1])}


# ---------------------------------------------------------------------------------------------
# Product-key top-k == brute force over all n² keys
# ---------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), k_frac=st.floats(0.0, 1.0), c=st.integers(1, 3),
       heads=st.integers(1, 2), shared=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_product_key_topk_equals_brute_force(n, k_frac, c, heads, shared, seed):
  k = 1 + int(k_frac * (n - 1))
  rng = np.random.default_rng(seed)
  # small integers: every sum is exact in float32 and ties are frequent
  q = rng.integers(-2, 3, size=(3, heads, 2 * c)).astype(np.float32)
  keys = rng.integers(-2, 3, size=(1 if shared else heads, 2, n, c)).astype(np.float32)
  scores, idx = jax.device_get(pk.product_key_topk(
      jnp.asarray(q[..., :c]), jnp.asarray(q[..., c:]), jnp.asarray(keys[:, 0]),
      jnp.asarray(keys[:, 1]), k))
  full = np.concatenate([np.repeat(keys[:, 0], n, axis=1), np.tile(keys[:, 1], (1, n, 1))], -1)
  full = np.broadcast_to(full, (heads, n * n, 2 * c))
  brute = np.einsum("thc,hnc->thn", q, full)                # all N = n² keys explicitly
  assert idx.shape == scores.shape == (3, heads, k) and idx.dtype == np.int32
  for t in range(3):
    for h in range(heads):
      expect = np.sort(brute[t, h])[::-1][:k]
      np.testing.assert_array_equal(scores[t, h], expect)          # same score multiset
      assert len(set(idx[t, h])) == k and np.all((0 <= idx[t, h]) & (idx[t, h] < n * n))
      np.testing.assert_array_equal(brute[t, h, idx[t, h]], scores[t, h])  # indices match


def test_product_key_config_errors():
  with pytest.raises(ConfigError, match="config.peer: 1000 keys is not a perfect square"):
    peer_cfg(**{"peer.num_experts": 1000})
  with pytest.raises(ConfigError, match=r"config.memory.top_k: 33 must be in \[1, sqrt"):
    memory_cfg(**{"memory.top_k": 33})
  with pytest.raises(ConfigError, match="config.memory.impl"):
    memory_cfg(**{"memory.impl": "triton"})
  assert memory_cfg(**{"memory.impl": "pallas"}).memory.impl == "pallas"
  # an unused family's section is not checked
  assert memory_cfg(**{"peer.num_experts": 1000}).peer.num_experts == 1000


# ---------------------------------------------------------------------------------------------
# Layers vs O(N) references; gradients reach exactly the selected rows
# ---------------------------------------------------------------------------------------------

def layer_checks(graphdef, state, x, r, reference):
  """(layer output, reference output, selected indices, grads of sum(output * r))."""
  layer = nnx.merge(graphdef, state)
  y = call(layer, x)
  grads = jax.grad(lambda s: jnp.sum(call(nnx.merge(graphdef, s), x) * r))(state)
  return y, reference(layer, x), layer.retrieve(x)[1], grads


PEER_VARIANTS = {
    "paper": {},
    "relu_shared_keys_layernorm": {"peer.score": "relu", "peer.shared_keys": True,
                                   "peer.query_norm": "layer", "peer.activation": "silu"},
}


@pytest.mark.parametrize("variant", list(PEER_VARIANTS))
def test_peer_matches_dense_reference_and_grads_are_sparse(variant):
  cfg = peer_cfg(**PEER_VARIANTS[variant])
  layer = PEER(cfg, 0, rngs=nnx.Rngs(params=3), shared={})
  x = randn((2, 8, cfg.model.d_model), seed=4)
  r = randn(x.shape, seed=5)
  graphdef, state = nnx.split(layer)
  y, ref, idx, grads = jax.jit(lambda s: layer_checks(graphdef, s, x, r, dense_reference))(state)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(y))) > 1e-4
  selected = np.zeros(cfg.peer.num_experts, bool)
  selected[np.asarray(idx).ravel()] = True
  assert 0 < selected.sum() < cfg.peer.num_experts
  for name in ("experts_in_NxD", "experts_out_NxD"):
    g = np.asarray(grads[name][...])
    touched = np.any(g != 0, axis=1)
    np.testing.assert_array_equal(touched, selected, err_msg=name)


MEMORY_VARIANTS = {
    "memory_plus_qk_norm": {},
    "pkm_gate_no_qk_norm": {"memory.memory_plus": False, "memory.qk_norm": False,
                            "memory.gate": True, "memory.shared_values": False},
}


@pytest.mark.parametrize("variant", list(MEMORY_VARIANTS))
def test_memory_matches_brute_force_and_grads_are_sparse(variant):
  cfg = memory_cfg(**MEMORY_VARIANTS[variant])
  layer = MemoryLayer(cfg, 1, rngs=nnx.Rngs(params=3), shared={})
  x = randn((2, 8, cfg.model.d_model), seed=6)
  r = randn(x.shape, seed=7)
  graphdef, state = nnx.split(layer)
  y, ref, idx, grads = jax.jit(
      lambda s: layer_checks(graphdef, s, x, r, brute_force_reference))(state)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(y))) > 1e-4
  selected = np.zeros(cfg.memory.num_slots, bool)
  selected[np.asarray(idx).ravel()] = True
  assert 0 < selected.sum() < cfg.memory.num_slots
  g = np.asarray(grads["values"]["values_NxD"][...])
  np.testing.assert_array_equal(np.any(g != 0, axis=1), selected)


def test_usage_counts_are_sown():
  cfg = memory_cfg(**{"ffn.overrides": ("0:peer", "1:memory"), **PEER_SMALL})
  graphdef, state = nnx.split(build_model(cfg, VOCAB))
  _, inter = jax.jit(lambda s: nnx.capture(nnx.merge(graphdef, s), nnx.Intermediate)(
      tokens((2, 16))))(state)
  usage_e = sown_counts(inter, "usage_experts")["blocks/0/ffn"]
  usage_s = sown_counts(inter, "usage_slots")["blocks/1/ffn"]
  assert usage_e.shape == (64,) and usage_e.sum() == 2 * 16 * 2 * 3
  assert usage_s.shape == (1024,) and usage_s.sum() == 2 * 16 * 2 * 8


# ---------------------------------------------------------------------------------------------
# Shared value pool and the value optimizer group
# ---------------------------------------------------------------------------------------------

TWO_MEMORY = {"ffn.overrides": ("0:memory", "1:memory")}


def test_shared_value_pool_is_one_parameter_and_accumulates_both_layers():
  cfg = memory_cfg(**TWO_MEMORY)
  model = build_model(cfg, VOCAB)
  assert model.blocks[0].ffn.values is model.blocks[1].ffn.values
  params = flat_params(model)
  values = [k for k in params if k.endswith("values_NxD")]
  assert len(values) == 1, values
  unshared = flat_params(build_model(replace(cfg, **{"memory.shared_values": False}), VOCAB))
  assert len([k for k in unshared if k.endswith("values_NxD")]) == 2

  graphdef, state = nnx.split(model)
  tok = tokens((2, 16), seed=8)

  def loss(s):
    logits, inter = nnx.capture(nnx.merge(graphdef, s), nnx.Intermediate)(tok)
    return jnp.mean(logits ** 2), inter
  grads, inter = jax.jit(jax.grad(loss, has_aux=True))(state)
  counts = sown_counts(inter, "usage_slots")
  used = [counts[f"blocks/{i}/ffn"] > 0 for i in (0, 1)]
  g = np.asarray([v for k, v in nnx.to_flat_state(grads) if k[-1] == "values_NxD"][0][...])
  touched = np.any(g != 0, axis=1)
  np.testing.assert_array_equal(touched, used[0] | used[1])
  assert np.any(used[0] & ~used[1]) and np.any(used[1] & ~used[0])  # both layers contribute


def test_values_use_their_own_optimizer_group():
  value_lr = 0.01
  cfg = memory_cfg(**{**TWO_MEMORY, "memory.value_lr": value_lr, "optim.weight_decay": 0.1,
                      "memory.value_weight_decay": 0.0, "optim.warmup_steps": 0})
  model = build_model(cfg, VOCAB)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  labels = {jax.tree_util.keystr(p): v
            for p, v in jax.tree_util.tree_leaves_with_path(param_groups(params))}
  assert [k for k, v in labels.items() if v == "memory_values"] == [
      k for k in labels if k.endswith("['values_NxD']")] and len(labels) > 10
  optimizer = make_optimizer(cfg)
  batch = {"inputs": tokens((4, 32), seed=9), "targets": tokens((4, 32), seed=10)}
  fresh = {"params": params, "opt_state": optimizer.init(params),
           "step": jnp.zeros((), jnp.int32), "rng": jnp.zeros((2,), jnp.uint32),
           "nonfinite_total": jnp.zeros((), jnp.int32),
           "nonfinite_in_a_row": jnp.zeros((), jnp.int32)}
  new = jax.jit(make_train_step(graphdef, cfg, optimizer))(fresh, batch)[0]
  # the slots the train step selected: training mode (an rng), i.e. batch-statistics centring
  _, inter = jax.jit(lambda p: nnx.capture(nnx.merge(graphdef, p), nnx.Intermediate)(
      batch["inputs"], rng=jax.random.key(0)))(params)
  used = sum(sown_counts(inter, "usage_slots").values()) > 0
  path = next(p for p, _ in jax.tree_util.tree_leaves_with_path(params)
              if jax.tree_util.keystr(p).endswith("['values_NxD']"))
  get = lambda tree: np.asarray(  # noqa: E731
      [v for p, v in jax.tree_util.tree_leaves_with_path(tree) if p == path][0])
  delta = np.abs(get(new["params"]) - get(params))
  # Adam's first update is lr * g / (|g| + eps): |delta| = value_lr wherever g is not tiny,
  # exactly 0 on rows no layer selected (no weight decay on values, no gradient).
  assert np.all(delta[~used] == 0.0)
  moved = delta[used]
  assert moved.max() <= value_lr * (1 + 1e-5)
  assert np.median(moved) == pytest.approx(value_lr, rel=1e-2)  # not optim.lr = 3e-3


# ---------------------------------------------------------------------------------------------
# Causality (PEER and memory models), value-sharded forward on 8 devices
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def causal_jacobians():
  T = 12
  cfgs = {"peer": peer_cfg(**{"model.init_std": 0.1}),
          "memory": memory_cfg(**{"model.init_std": 0.1, **TWO_MEMORY})}
  models = {k: nnx.split(build_model(c, VOCAB, seed=1)) for k, c in cfgs.items()}
  tok = tokens((2, T), seed=1)
  proj = randn((T, 384), seed=2)

  @jax.jit
  def jacobians(states):
    out = {}
    for name, s in states.items():
      graphdef = models[name][0]
      x = nnx.merge(graphdef, s).embed(tok)

      def f(x, graphdef=graphdef, s=s):
        model = nnx.merge(graphdef, s)
        logits, _ = nnx.capture(lambda x: model.decode(x), nnx.Intermediate)(x)
        return jnp.einsum("tv,tv->t", logits[0], proj)
      out[name] = jnp.max(jnp.abs(jax.jacrev(f)(x)), axis=-1)  # [t, b, s]
    return out
  return jax.device_get(jacobians({k: v[1] for k, v in models.items()}))


@pytest.mark.parametrize("family", ["peer", "memory"])
def test_causality(causal_jacobians, family):
  J = causal_jacobians[family]
  T = J.shape[0]
  future = np.triu(np.ones((T, T), bool), k=1)
  assert np.all(J[:, 0, :][future] == 0.0), "logits depend on future positions"
  assert np.all(J[:, 0, :][~future] > 0.0), "logits ignore some past position"
  assert np.all(J[:, 1, :] == 0.0), "logits of row 0 depend on row 1 of the batch"


def test_value_tables_shard_by_column_and_sharded_forward_matches():
  cfg = memory_cfg(**{"ffn.overrides": ("0:peer", "1:memory"), **PEER_SMALL,
                      "mesh.data": 1, "mesh.tensor": 8})
  mesh = make_mesh(cfg.mesh, jax.devices()[:8])
  spec = model_spec(cfg, VOCAB)
  shardings = param_shardings(spec, mesh)
  flat = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
  (values_key,) = [k for k in flat if k.endswith("['values_NxD']")]
  assert flat[values_key].spec == P(None, "tensor")
  assert flat["['blocks'][0]['ffn']['experts_in_NxD']"].spec == P(None, "tensor")
  assert flat["['blocks'][0]['ffn']['experts_out_NxD']"].spec == P(None, "tensor")
  model = build_model(cfg, VOCAB)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  tok = tokens((2, 16), seed=11)

  def forward(p):
    return call(nnx.merge(graphdef, p), tok)
  single = jax.jit(forward)(params)
  sharded_params = jax.device_put(params, shardings)
  local = sharded_params["blocks"][1]["ffn"]["values"]["values_NxD"]
  assert local.addressable_shards[0].data.shape == (1024, 64 // 8)  # all rows, D/8 columns
  with activation_sharding(mesh, registry.logical_rules(cfg.mesh)):
    out = jax.jit(forward, out_shardings=NamedSharding(mesh, P()))(sharded_params)
  np.testing.assert_allclose(np.asarray(out), np.asarray(single), rtol=1e-5, atol=1e-5)
