"""Optimizer parameter groups (sparsejax/train/optim.py + the families' ParamGroup records):
memory values on the main schedule scaled to their own peak, with their own weight decay; key /
query / expert lr multipliers reaching exactly their leaves (memory and PEER side by side);
the decay mask inside every group; buffers frozen.

Adam's first update with zero moments is ``lr * g / (|g| + eps)`` per element (bias-corrected),
the same number for every leaf fed the same gradient, so ratios of updates are ratios of lrs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.config import ConfigError
from sparsejax.configure import load_config
from sparsejax.train.optim import group_hypers, lr_schedule, make_optimizer, param_groups
from sparsejax.train.state import model_spec

VOCAB = 257
NO_CLIP = {"optim.grad_clip": 0.0}


def _cfg(path, **over):
  return load_config(path, **{"train.steps": 40, "optim.warmup_steps": 5, **over})


def _params(cfg, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype),
                      model_spec(cfg, VOCAB).abstract_params)


def _flat(tree):
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _update(cfg, params, grads, step=0):
  """The optimizer's update at ``step`` from zero moments (every count set to ``step``)."""
  opt = make_optimizer(cfg)

  def run(params, grads):
    state = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.full_like(x, step) if jax.tree_util.keystr(p).endswith(".count") else x,
        opt.init(params))
    return opt.update(grads, state, params)[0]
  return {k: np.asarray(v) for k, v in _flat(jax.jit(run)(params, grads)).items()}


def _leaf(flat, *parts):
  hits = [v for k, v in flat.items() if all(p in k for p in parts)]
  assert len(hits) == 1, (parts, [k for k in flat if all(p in k for p in parts)])
  return np.asarray(hits[0])


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd"])
def test_value_group_lr_is_peak_mult_times_main_schedule(schedule):
  steps, warm = 40, 5
  cfg = _cfg("configs/memory.py:tiny", **{"optim.schedule": schedule, "optim.lr": 1e-3,
                                          "memory.value_lr": 4e-3, "memory.key_lr_mult": 2.0,
                                          "memory.query_lr_mult": 0.5,
                                          "memory.value_lr_schedule": "main"})
  main, hypers = lr_schedule(cfg), group_hypers(cfg)
  for step in (0, warm - 1, warm, steps // 2, steps - 1):
    for group, mult in (("memory_values", 4.0), ("memory_keys", 2.0), ("memory_queries", 0.5),
                        ("peer_keys", 1.0), ("default", 1.0)):
      assert float(hypers[group]["lr"](step)) == pytest.approx(mult * float(main(step)),
                                                               rel=1e-6), (group, step)
  assert float(main(warm - 1)) == pytest.approx(1e-3) and float(main(0)) < 1e-3
  assert float(main(steps - 1)) < 0.25e-3  # decayed
  # ... and the optimizer applies it: value update / default update = 4 at every step
  cfg = _cfg("configs/memory.py:tiny", **{**NO_CLIP, "optim.schedule": schedule,
                                          "optim.lr": 1e-3, "optim.weight_decay": 0.0,
                                          "memory.value_lr": 4e-3, "memory.value_grad_clip": 0.0,
                                          "memory.value_lr_schedule": "main"})
  params = _params(cfg)
  grads = jax.tree.map(jnp.ones_like, params)
  for step in (0, warm - 1, steps - 1):
    up = _update(cfg, params, grads, step)
    ratio = _leaf(up, "values_NxD") / _leaf(up, "blocks'][1]['ffn']['w_in_DxD")[0, 0]
    np.testing.assert_allclose(ratio, 4.0, rtol=1e-6)
  # the constant option (PKM): the values' lr does not follow the schedule
  const = group_hypers(_cfg("configs/memory.py:tiny", **{"memory.value_lr_schedule": "constant",
                                                        "memory.value_lr": 4e-3}))
  lr = const["memory_values"]["lr"]
  assert [float(lr(s) if callable(lr) else lr) for s in (0, warm, steps - 1)] == [4e-3] * 3


def test_value_weight_decay_and_decay_mask_in_every_group():
  cfg = _cfg("configs/memory.py:tiny", **{**NO_CLIP, "optim.lr": 1e-3, "optim.weight_decay": 0.1,
                                          "memory.value_lr": 4e-3,
                                          "memory.value_lr_schedule": "main",
                                          "memory.value_weight_decay": 0.05,
                                          "memory.query_lr_mult": 3.0})
  params = _params(cfg)
  flat = _flat(params)
  zero = jax.tree.map(jnp.zeros_like, params)  # no gradient: the update is the decay alone
  up = _update(cfg, params, zero, step=10)
  lr_v = float(group_hypers(cfg)["memory_values"]["lr"](10))
  lr = float(lr_schedule(cfg)(10))
  v = _leaf(flat, "values_NxD")
  np.testing.assert_allclose(_leaf(up, "values_NxD"), -lr_v * 0.05 * v, rtol=1e-5)
  wq = _leaf(flat, "ffn']['w_query_DxHxK")
  np.testing.assert_allclose(_leaf(up, "ffn']['w_query_DxHxK"), -3 * lr * 0.1 * wq, rtol=1e-5)
  assert not _leaf(up, "query_scale_HxK").any()  # a scale: never decayed, in its group too
  assert not _leaf(up, "blocks'][1]['ffn_norm']['scale']").any()
  off = _update(_cfg("configs/memory.py:tiny", **{**NO_CLIP, "memory.value_weight_decay": 0.0}),
                params, zero, step=10)
  assert not _leaf(off, "values_NxD").any()
  # PEER: the query-norm bias and scale sit in "peer_queries" and are not decayed either
  pcfg = _cfg("configs/peer.py:tiny", **{**NO_CLIP, "peer.query_norm": "layer",
                                         "optim.weight_decay": 0.1})
  pparams = _params(pcfg)
  pup = _update(pcfg, pparams, jax.tree.map(jnp.zeros_like, pparams), step=10)
  labels = _flat(param_groups(pparams, pcfg))
  assert labels["['blocks'][0]['ffn']['query_bias_HxK']"] == "peer_queries"
  assert not _leaf(pup, "[0]['ffn']['query_bias_HxK']").any()
  assert not _leaf(pup, "[0]['ffn']['query_scale_HxK']").any()
  assert _leaf(pup, "[0]['ffn']['experts_in_NxD']").any()


def test_key_query_expert_multipliers_reach_their_leaves():
  # layer 0: PEER, layer 1: memory; both have w_query_DxHxK / query_scale_HxK / subkeys_*
  base = {**NO_CLIP, "ffn.overrides": ("1:memory",), "optim.weight_decay": 0.0,
          "memory.value_grad_clip": 0.0, "memory.value_weight_decay": 0.0,
          "optim.warmup_steps": 0}
  mults = {"memory.key_lr_mult": 2.0, "memory.query_lr_mult": 3.0, "peer.key_lr_mult": 5.0,
           "peer.query_lr_mult": 0.5, "peer.expert_lr_mult": 7.0}
  cfg1 = _cfg("configs/peer.py:tiny", **base)
  cfg2 = _cfg("configs/peer.py:tiny", **base, **mults)
  params = _params(cfg1)
  labels = _flat(param_groups(params, cfg1))
  want = {"[0]['ffn']['subkeys_Gx2xSxC']": ("peer_keys", 5.0),
          "[0]['ffn']['w_query_DxHxK']": ("peer_queries", 0.5),
          "[0]['ffn']['query_scale_HxK']": ("peer_queries", 0.5),
          "[0]['ffn']['experts_in_NxD']": ("peer_experts", 7.0),
          "[0]['ffn']['experts_out_NxD']": ("peer_experts", 7.0),
          "[1]['ffn']['subkeys_Hx2xSxC']": ("memory_keys", 2.0),
          "[1]['ffn']['w_query_DxHxK']": ("memory_queries", 3.0),
          "[1]['ffn']['query_scale_HxK']": ("memory_queries", 3.0),
          "[1]['ffn']['values']['values_NxD']": ("memory_values", 1.0)}
  grads = _params(cfg1, seed=1)  # one gradient for both optimizers
  u1, u2 = _update(cfg1, params, grads), _update(cfg2, params, grads)
  seen = set()
  for key, label in labels.items():
    if label == "frozen":
      continue
    suffix = next((s for s in want if key.endswith(s)), None)
    group, mult = want[suffix] if suffix else ("default", 1.0)
    assert label == group, key
    seen.add(suffix)
    big = np.abs(u1[key]) > 1e-6 * np.abs(u1[key]).max()  # skip elements with a tiny gradient
    np.testing.assert_allclose(u2[key][big] / u1[key][big], mult, rtol=1e-5, err_msg=key)
  assert seen >= set(want)
  # without a config the layer's family is unknown: both layers' queries land in one group
  blind = _flat(param_groups(params))
  assert (blind["['blocks'][0]['ffn']['w_query_DxHxK']"] ==
          blind["['blocks'][1]['ffn']['w_query_DxHxK']"])


@pytest.mark.parametrize("mode", ["batch", "running", "whiten"])
def test_no_group_touches_buffers(mode):
  cfg = _cfg("configs/peer.py:tiny", **{"ffn.overrides": ("1:memory",), "optim.weight_decay": 0.5,
                                        "memory.value_weight_decay": 0.5, "peer.key_lr_mult": 3.0,
                                        "memory.query_center": mode, "peer.query_center": mode})
  params = _params(cfg)
  labels = _flat(param_groups(params, cfg))
  buffers = [k for k in labels if "['buffer_" in k]
  assert len(buffers) == 4 and all(labels[k] == "frozen" for k in buffers)  # 2 layers x 2
  up = _update(cfg, params, _params(cfg, seed=2), step=3)  # gradient and decay everywhere
  for k in buffers:
    assert not up[k].any(), k
  assert all(up[k].any() for k in labels if k not in buffers)


@pytest.mark.parametrize("key", ["memory.key_lr_mult", "memory.query_lr_mult",
                                 "memory.value_weight_decay", "peer.expert_lr_mult"])
def test_negative_group_knobs_are_refused_in_one_line(key):
  path = "configs/memory.py:tiny" if key.startswith("memory") else "configs/peer.py:tiny"
  with pytest.raises(ConfigError, match=rf"^config\.{key.replace('.', r'\.')}: must be >= 0, "
                     r"got -1\.0$"):
    load_config(path, **{key: -1.0})
