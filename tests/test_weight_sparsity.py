"""Weight sparsity in the train step (sparsejax/sparsity/transform.py), checked against the
papers' definitions on a small dense model: GMP's cubic schedule reaches exactly round((1 -
s_t) n) weights per layer at each update and pruned weights stay exactly 0 with zero Adam
moments (Zhu & Gupta 2017; masks in the optimizer state, jaxpruner's design); s_f = 0 is the
dense run bitwise; N:M holds in every forward (SR-STE, Zhou et al. 2021); RigL / SET keep each
layer's count, start grown weights and their moments at 0, and stop at T_end (Evci et al.
2020); the masks are the same on 8 devices (fsdp x tensor) as on one; N:M groups that would
straddle a shard are refused. The pure mask algebra is in tests/test_sparsity_masks.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax.config import ConfigError
from sparsejax.configure import load_config
from sparsejax.layers import registry
from sparsejax.parallel import mesh as mesh_lib, sharding as shd
from sparsejax.sparsity import hooks as sp, masks as mk
from sparsejax.train.optim import make_optimizer
from sparsejax.train.state import init_state, model_spec, state_shardings
from sparsejax.train.step import jit_train_step

VOCAB = 257
SMALL = {"model.d_model": 32, "data.seq_len": 32, "data.global_batch_size": 4,
         "optim.warmup_steps": 2, "train.log_every_steps": 4}


def _cfg(**over):
  return load_config("configs/dense.py:tiny", **{**SMALL, "train.steps": 16, **over})


def _batches(n, cfg, seed=0):
  rng = np.random.default_rng(seed)
  b, t = cfg.data.global_batch_size, cfg.data.seq_len
  for _ in range(n):
    x = rng.integers(0, VOCAB, (b, t + 1), dtype=np.int32)
    yield {"inputs": x[:, :-1], "targets": x[:, 1:]}


class Trainer:
  """The real jitted train step (state, shardings, optimizer) on ``devices``."""

  def __init__(self, cfg, devices=None):
    self.cfg = cfg
    devices = devices or jax.devices()[:1]
    self.mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    self.rules = registry.logical_rules(cfg.mesh)
    self.spec = model_spec(cfg, VOCAB)
    opt = make_optimizer(cfg)
    self.state, sh = init_state(self.spec, self.mesh, opt)
    self.batch_sh = shd.batch_sharding(self.mesh, self.rules)
    with shd.activation_sharding(self.mesh, self.rules):
      self.step_fn = jit_train_step(self.spec.graphdef, cfg, opt, sh, self.batch_sh)
    self.plan = sp.make_plan(cfg, self.spec.abstract_params)

  def step(self, batch):
    with shd.activation_sharding(self.mesh, self.rules):
      batch = shd.global_batch(batch, self.batch_sh, self.cfg.data.global_batch_size)
      self.state, metrics = self.step_fn(self.state, batch)
    return metrics

  def masks(self):
    return [np.asarray(m) for m in sp.leaves(self.state["opt_state"].masks, self.plan.targets)]

  def weights(self):
    return [np.asarray(w) for w in sp.leaves(self.state["params"], self.plan.targets)]

  def moments(self):
    """Every optimizer-state leaf mirroring a target (Adam mu / nu), per target."""
    out = [[] for _ in self.plan.targets]
    flat = jax.tree_util.tree_leaves_with_path(self.state["opt_state"].inner)
    for i, t in enumerate(self.plan.targets):
      key = jax.tree_util.keystr(tuple(jax.tree_util.DictKey(k) for k in t.path))
      out[i] = [np.asarray(x) for p, x in flat
                if jax.tree_util.keystr(p).endswith(key) and x.shape == t.shape]
    return out


def test_gmp_counts_zeros_and_moments_follow_the_cubic_schedule():
  s_f, steps = 0.75, 16
  cfg = _cfg(**{"sparsity.method": "gmp", "sparsity.sparsity": s_f, "train.steps": steps,
                "sparsity.start_fraction": 0.25, "sparsity.end_fraction": 0.75,
                "sparsity.update_every": 2})
  tr = Trainer(cfg)
  t0, t1 = 4, 12
  seen = set()
  for t, batch in enumerate(_batches(steps, cfg)):
    before = tr.masks()
    tr.step(batch)
    s_t = mk.gmp_sparsity(t, s_f, t0, t1, 2)
    for target, m_old, m, w, moms in zip(tr.plan.targets, before, tr.masks(), tr.weights(),
                                         tr.moments()):
      n = target.size
      if t0 <= t <= t1 and ((t - t0) % 2 == 0 or t == t1):   # an update step
        assert m.sum() == round((1 - s_t) * n), (t, target.name)
        seen.add(t)
      else:
        np.testing.assert_array_equal(m, m_old)
      assert not np.any(m & ~m_old), "a pruned weight came back"
      assert np.all(w[~m] == 0), (t, target.name)
      assert len(moms) == 2 and all(np.all(x[~m] == 0) for x in moms)
  assert seen == {4, 6, 8, 10, 12}
  assert tr.masks()[0].mean() == pytest.approx(1 - s_f, abs=1e-3)


def test_gmp_at_zero_sparsity_is_the_dense_run_bitwise():
  dense = Trainer(_cfg(**{"train.steps": 6}))
  sparse = Trainer(_cfg(**{"train.steps": 6, "sparsity.method": "gmp", "sparsity.sparsity": 0.0,
                           "sparsity.start_fraction": 0.0, "sparsity.update_every": 1}))
  for batch in _batches(6, dense.cfg):
    dense.step(batch)
    sparse.step(batch)
  for a, b in zip(jax.tree.leaves(dense.state["params"]), jax.tree.leaves(sparse.state["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nm_holds_in_every_forward_and_dense_weights_train():
  cfg = _cfg(**{"sparsity.method": "nm", "train.steps": 6})
  tr = Trainer(cfg)
  for batch in _batches(6, cfg):
    w_before = tr.weights()
    tr.step(batch)
    for t, m, w in zip(tr.plan.targets, tr.masks(), w_before):
      # the mask the forward used: 2 of every 4 along the contraction axis, the largest |w|
      np.testing.assert_array_equal(m, np.asarray(mk.nm_mask(jnp.asarray(w), 2, 4, t.axis)))
      groups = np.moveaxis(m, t.axis, -1).reshape(-1, 4).sum(-1)
      assert np.all(groups == 2)
  # the stored weights stay dense (STE); the eval / export weights are N:M
  assert all(np.count_nonzero(w) == w.size for w in tr.weights())
  eff = sp.inference_params(cfg, tr.state["params"], tr.state["opt_state"], step=6)
  for t in tr.plan.targets:
    w = np.asarray(sp.leaves(eff, [t])[0])
    assert np.all(np.moveaxis(w != 0, t.axis, -1).reshape(-1, 4).sum(-1) <= 2)


def test_nm_masked_decay_after_clip_is_added_to_the_clipped_gradients():
  """2:4-pretraining variant: the optimizer sees clip(g) + lambda (1 - M) W, exactly."""
  lam, over = 0.3, {"sparsity.method": "nm", "optim.grad_clip": 1e-3}
  spec = model_spec(_cfg(**over), VOCAB)
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype),
                        spec.abstract_params)
  grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)
  after = make_optimizer(_cfg(**{**over, "sparsity.nm_decay": "after_clip",
                                 "sparsity.nm_lambda": lam}))
  plain = make_optimizer(_cfg(**{**over, "sparsity.nm_lambda": 0.0,
                                 "optim.grad_clip": 0.0}))   # clipped by hand below
  plan = sp.make_plan(_cfg(**over), params)
  norm = jnp.sqrt(sum(jnp.sum(g.astype(jnp.float32) ** 2) for g in jax.tree.leaves(grads)))
  clipped = jax.tree.map(lambda g: g * (1e-3 / norm), grads)
  by_hand = sp.replace_targets(clipped, plan.targets, [
      g + lam * (~mk.nm_mask(w, 2, 4, t.axis)).astype(g.dtype) * w for t, g, w in zip(
          plan.targets, sp.leaves(clipped, plan.targets), sp.leaves(params, plan.targets))])
  u_after = jax.jit(lambda: after.update(grads, after.init(params), params)[0])()
  u_plain = jax.jit(lambda: plain.update(by_hand, plain.init(params), params)[0])()
  for a, b in zip(jax.tree.leaves(u_after), jax.tree.leaves(u_plain)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-9)
  assert not np.allclose(np.asarray(sp.leaves(u_after, plan.targets)[0]), np.asarray(
      sp.leaves(jax.jit(lambda: plain.update(clipped, plain.init(params), params)[0])(),
                plan.targets)[0]))


def test_nm_srste_gradient_adds_lambda_times_pruned_weights():
  """Through the forward hook: dL/dW = dL/dW~ (at the masked weights) + lambda (1 - M) W."""
  lam = 0.25
  cfg = _cfg(**{"sparsity.method": "nm", "sparsity.nm_lambda": lam})
  spec = model_spec(cfg, VOCAB)
  opt = make_optimizer(cfg)
  params = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(1).standard_normal(x.shape),
                                              x.dtype) * 0.1, spec.abstract_params)
  state = opt.init(params)
  plan = sp.make_plan(cfg, params)
  c = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(2).standard_normal(x.shape),
                                         x.dtype), params)
  loss = lambda p: sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(c)))
  g = jax.grad(lambda p: loss(sp.forward_params(plan, p, state)))(params)
  for t in plan.targets:
    w, cw, gw = (np.asarray(sp.leaves(x, [t])[0]) for x in (params, c, g))
    m = np.asarray(mk.nm_mask(jnp.asarray(w), 2, 4, t.axis))
    np.testing.assert_array_equal(gw, cw + np.float32(lam) * (~m) * w)


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_dst_keeps_counts_grows_from_zero_and_stops_at_t_end(method):
  steps = 10
  tr = Trainer(_cfg(**{"sparsity.method": method, "sparsity.sparsity": 0.5, "train.steps": steps,
                       "sparsity.update_every": 2, "sparsity.end_fraction": 0.8,
                       "sparsity.drop_fraction": 0.5}))
  changed = set()
  for t, batch in enumerate(_batches(steps, tr.cfg)):
    before = tr.masks()
    tr.step(batch)
    for target, m_old, m, w, moms in zip(tr.plan.targets, before, tr.masks(), tr.weights(),
                                         tr.moments()):
      assert m.sum() == m_old.sum() == round(0.5 * target.size), (t, target.name)
      grown = m & ~m_old
      if grown.any():
        changed.add(t)
        assert np.all(w[grown] == 0) and all(np.all(x[grown] == 0) for x in moms)
      assert np.all(w[~m] == 0)
      if t >= 8 or t % 2 or t == 0:   # T_end = 8: nothing changes after it, nor off-grid
        np.testing.assert_array_equal(m, m_old)
  assert changed == {2, 4, 6}


@pytest.mark.parametrize("method, extra", [
    ("nm", {}), ("gmp", {}), ("gmp", {"sparsity.block": "4x4"}), ("rigl", {}), ("set", {}),
    ("momentum", {}), ("oneshot", {"sparsity.start_fraction": 0.125}), ("random", {})])
def test_mask_updates_on_8_devices_equal_one_device(method, extra):
  """The wrapper's update on the same params and gradients, sharded fsdp 4 x tensor 2 as the
  train state is, gives the 1-device masks; the masks' shardings are their parameters'. Also:
  one-shot prunes to the final count at its step (2 of 16), a random mask keeps its count,
  4x4 blocks are whole."""
  over = {"sparsity.method": method, "sparsity.sparsity": 0.5, "sparsity.update_every": 1,
          "sparsity.start_fraction": 0.0, **extra}
  cfg1 = _cfg(**over)
  cfg8 = _cfg(**over, **{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2})
  spec = model_spec(cfg1, VOCAB)
  rng = np.random.default_rng(5)
  params = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype),
                        spec.abstract_params)
  grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)
  out = []
  for cfg, devices in ((cfg1, jax.devices()[:1]), (cfg8, jax.devices()[:8])):
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    opt = make_optimizer(cfg)
    sh = state_shardings(model_spec(cfg, VOCAB), mesh, opt)
    state = jax.jit(opt.init, out_shardings=sh["opt_state"])(params)
    state = state._replace(count=jnp.asarray(2, jnp.int32))   # an update step of every method
    p, g = jax.device_put((params, grads), (sh["params"], sh["params"]))
    new = jax.jit(lambda g, s, p: opt.update(g, s, p)[1],
                  out_shardings=sh["opt_state"])(g, state, p)
    plan = sp.make_plan(cfg, params)
    masks = sp.leaves(new.masks, plan.targets)
    for m, ps in zip(masks, sp.leaves(sh["params"], plan.targets)):
      assert m.sharding == ps
    out.append([np.asarray(m) for m in masks])
  assert any(not a.all() for a in out[0])
  for a, b in zip(*out):
    np.testing.assert_array_equal(a, b)
  if method in ("oneshot", "random"):
    assert all(a.sum() == a.size // 2 for a in out[0])
  if "sparsity.block" in extra:
    for t, a in zip(plan.targets, out[0]):
      blocks = np.asarray(mk.reduce_blocks(jnp.asarray(a), (4, 4), t.axis))
      np.testing.assert_array_equal(np.asarray(mk.expand_blocks(blocks, (4, 4), t.axis,
                                                                t.shape)), a)


def test_nm_group_straddling_a_shard_is_refused():
  cfg = _cfg(**{"sparsity.method": "nm", "sparsity.m": 64, "sparsity.n": 32,
                "sparsity.targets": ("ffn",), "model.d_model": 64, "mesh.data": 1,
                "mesh.tensor": 2})
  with pytest.raises(ConfigError, match=r"w_down_FxD axis 0 .* straddle"):
    Trainer(cfg, devices=jax.devices()[:2])


def test_nm_dense_phase_trains_and_evaluates_dense():
  cfg = _cfg(**{"sparsity.method": "nm", "sparsity.dense_fraction": 0.25})   # steps 12.. dense
  params = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(4).standard_normal(x.shape),
                                              x.dtype), model_spec(cfg, VOCAB).abstract_params)
  opt = make_optimizer(cfg)
  state = opt.init(params)
  plan = sp.make_plan(cfg, params)
  assert plan.dense_start == 12
  sparse = sp.forward_params(plan, params, state._replace(count=jnp.asarray(11)))
  dense = sp.forward_params(plan, params, state._replace(count=jnp.asarray(12)))
  w, ws, wd = (np.asarray(sp.leaves(x, plan.targets)[0]) for x in (params, sparse, dense))
  assert np.count_nonzero(ws) == w.size // 2
  np.testing.assert_array_equal(wd, w)
  for step, nonzero in ((11, w.size // 2), (16, w.size)):
    eff = sp.inference_params(cfg, params, state, step=step)
    assert np.count_nonzero(np.asarray(sp.leaves(eff, plan.targets)[0])) == nonzero


def test_bad_sparsity_configs_fail_with_one_line():
  with pytest.raises(ConfigError, match="config.sparsity.m"):
    Trainer(_cfg(**{"sparsity.method": "nm", "sparsity.m": 5, "sparsity.n": 2}))
  with pytest.raises(ConfigError, match="config.sparsity.targets"):
    Trainer(_cfg(**{"sparsity.method": "gmp", "sparsity.targets": ("moe",)}))
  with pytest.raises(ConfigError, match="config.sparsity.block"):
    Trainer(_cfg(**{"sparsity.method": "gmp", "sparsity.block": "3x7"}))


@pytest.mark.slow
@pytest.mark.parametrize("family, over", [
    ("moe", {"mesh.data": 1, "mesh.fsdp": 2, "mesh.expert": 2, "mesh.tensor": 2}),
    ("peer", None), ("memory", None)])
def test_every_family_prunes_its_projections_on_a_mesh(family, over):
  """The family's prunable leaves (MoE experts and shared experts, PEER / memory query and
  Memory+ projections) are pruned (MoE: on 8 devices with expert parallelism exactly as on
  one; the dense layers' mesh case is the RigL test above)."""
  common = {**SMALL, "train.steps": 4, "sparsity.method": "gmp", "sparsity.sparsity": 0.5,
            "sparsity.start_fraction": 0.0, "sparsity.end_fraction": 0.0,
            "sparsity.targets": (family,)}
  one = Trainer(load_config(f"configs/{family}.py:tiny", **common))
  many = one if over is None else Trainer(load_config(f"configs/{family}.py:tiny", **common,
                                                      **over), devices=jax.devices()[:8])
  names = {t.name.rsplit("/", 1)[-1] for t in one.plan.targets}
  expected = {"moe": {"w_gate_ExDxF", "w_up_ExDxF", "w_down_ExFxD"},
              "peer": {"w_query_DxHxK"}, "memory": {"w_query_DxHxK", "w_in_DxD", "w_out_DxD"}}
  assert expected[family] <= names and all(t.family.endswith(family) for t in one.plan.targets)
  for batch in _batches(4, one.cfg):
    one.step(batch)
    if many is not one:
      many.step(batch)
  for t, a, b, w in zip(one.plan.targets, one.masks(), many.masks(), many.weights()):
    np.testing.assert_array_equal(a, b)
    assert a.sum() == round(0.5 * t.size) and np.all(w[~b] == 0)


def test_flip_rate_is_the_fraction_of_mask_bits_changed_since_the_last_log():
  cfg = _cfg(**{"sparsity.method": "gmp", "sparsity.sparsity": 0.75, "train.steps": 8,
                "sparsity.start_fraction": 0.0, "sparsity.end_fraction": 1.0,
                "sparsity.update_every": 1, "train.log_every_steps": 3})
  params = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(6).standard_normal(x.shape),
                                              x.dtype), model_spec(cfg, VOCAB).abstract_params)
  opt = make_optimizer(cfg)
  plan = sp.make_plan(cfg, params)
  update = jax.jit(opt.update)
  state = opt.init(params)
  at_log = [np.asarray(m) for m in sp.leaves(state.masks, plan.targets)]
  flips = [0.0] * len(plan.targets)
  for t in range(8):
    grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    masks = [np.asarray(m) for m in sp.leaves(state.masks, plan.targets)]
    if (t + 1) % 3 == 0 or t + 1 == 8:   # logged steps: 3, 6 and the last
      flips = [float(np.mean(a != b)) for a, b in zip(at_log, masks)]
      at_log = masks
    got = [float(f) for f in sp.leaves(state.flip_rate, plan.targets)]
    np.testing.assert_allclose(got, flips, rtol=1e-6)
  assert min(flips) > 0
