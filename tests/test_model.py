"""Model numerics: causality, attention / RoPE / RMSNorm against references, dtypes, remat,
per-layer registry patterns with aux losses, one-step golden metrics and gradient accumulation.

CPU compile time dominates, so models are built eagerly (cheap after the first build), and
several variants share one jit where the property allows it.
"""

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.config import ConfigError
from sparsejax.configure import replace
from sparsejax.configure import load_config
from sparsejax.layers import registry
from sparsejax.layers.family import Family
from sparsejax.layers.attention import DenseAttention
from sparsejax.layers.common import RMSNorm, param, rope
from sparsejax.layers.ffn import GatedFFN
from sparsejax.models.transformer import build_model
from sparsejax.train.optim import make_optimizer
from sparsejax.train.state import model_spec
from sparsejax.eval.core import make_eval_step
from sparsejax.models.forward import forward_sums
from sparsejax.train.step import make_train_step

VOCAB = 257                    # byte tokenizer + EOS; padded to 384 embedding rows
PADDED = 384
F32 = {"model.compute_dtype": "float32"}


def tiny(**overrides):
  return load_config("configs/dense.py:tiny", **{**F32, **overrides})


def split(model):
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def fresh_state(params, optimizer):
  """The train-state layout of sparsejax.train.state.init_state, from given params."""
  return {"params": params, "opt_state": optimizer.init(params),
          "step": jnp.zeros((), jnp.int32), "rng": jnp.zeros((2,), jnp.uint32),
          "nonfinite_total": jnp.zeros((), jnp.int32),
          "nonfinite_in_a_row": jnp.zeros((), jnp.int32)}


def tokens(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, size=shape), jnp.int32)


# ---------------------------------------------------------------------------------------------
# Causality (and independence of batch rows) through embed / decode
# ---------------------------------------------------------------------------------------------

CAUSAL_CASES = {"gqa": {"model.num_kv_heads": 2},
                "mqa_qk_norm": {"model.num_kv_heads": 1, "attention.qk_norm": True}}


@pytest.fixture(scope="module")
def causal_jacobians():
  """|d (r_t . logits[0, t]) / d x[b, s]| maxed over d_model, for each case, in one jit."""
  T = 16
  models = {k: split(build_model(tiny(**{**o, "model.init_std": 0.1}), VOCAB, seed=1))
            for k, o in CAUSAL_CASES.items()}
  tok = tokens((2, T), seed=1)
  proj = jnp.asarray(np.random.default_rng(2).normal(size=(T, PADDED)), jnp.float32)

  @jax.jit
  def jacobians(all_params):
    out = {}
    for name, params in all_params.items():
      model = nnx.merge(models[name][0], params)
      x = model.embed(tok)
      f = lambda x: jnp.einsum("tv,tv->t", model.decode(x)[0], proj)  # noqa: E731
      out[name] = jnp.max(jnp.abs(jax.jacrev(f)(x)), axis=-1)  # [t, b, s]
    return out
  return jax.device_get(jacobians({k: v[1] for k, v in models.items()}))


@pytest.mark.parametrize("case", list(CAUSAL_CASES))
def test_causality(causal_jacobians, case):
  J = causal_jacobians[case]
  T = J.shape[0]
  own = J[:, 0, :]  # [t, s]: logits at t w.r.t. inputs of the same row at s
  future = np.triu(np.ones((T, T), bool), k=1)
  assert np.all(own[future] == 0.0), "logits depend on future positions"
  assert np.all(own[~future] > 0.0), "logits ignore some past position"
  assert np.all(J[:, 1, :] == 0.0), "logits of row 0 depend on row 1 of the batch"


def test_causal_model_configs_are_what_they_claim():
  cfg = tiny(**CAUSAL_CASES["mqa_qk_norm"])
  assert cfg.num_kv_heads == 1 < cfg.model.num_heads
  attn = build_model(cfg, VOCAB).blocks[0].attn
  assert attn.q_norm is not None and attn.wk_DxKxH.shape == (64, 1, 16)


# ---------------------------------------------------------------------------------------------
# DenseAttention against a float64 numpy reference
# ---------------------------------------------------------------------------------------------

def _np_rope(x, pos, theta):
  """Rotate-half RoPE as a complex rotation of the pairs (x[i], x[i + h/2])."""
  h = x.shape[-1]
  freq = theta ** (-np.arange(0, h, 2, dtype=np.float64) / h)
  ang = pos[..., None].astype(np.float64) * freq          # [B, T, h/2]
  z = (x[..., : h // 2] + 1j * x[..., h // 2:]) * np.exp(1j * ang)[:, :, None, :]
  return np.concatenate([z.real, z.imag], axis=-1)


def _np_rms(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _np_attention(x, pos, attn, theta, eps, scale_mult=1.0):
  f64 = lambda a: np.asarray(a[...], np.float64)  # noqa: E731
  wq, wk, wv, wo = f64(attn.wq_DxHxK), f64(attn.wk_DxKxH), f64(attn.wv_DxKxH), f64(attn.wo_HxKxD)
  H, K, Dh = wq.shape[1], wk.shape[1], wq.shape[2]
  q = np.einsum("btd,dhk->bthk", x, wq)
  k = np.einsum("btd,dhk->bthk", x, wk)
  v = np.einsum("btd,dhk->bthk", x, wv)
  if attn.q_norm is not None:
    q, k = _np_rms(q, f64(attn.q_norm.scale), eps), _np_rms(k, f64(attn.k_norm.scale), eps)
  q, k = _np_rope(q, pos, theta), _np_rope(k, pos, theta)
  k, v = np.repeat(k, H // K, axis=2), np.repeat(v, H // K, axis=2)  # q head h -> kv h // (H/K)
  s = np.einsum("bthk,bshk->bhts", q, k) * scale_mult / math.sqrt(Dh)
  T = x.shape[1]
  s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  o = np.einsum("bhts,bshk->bthk", p, v)
  return np.einsum("bthk,hkd->btd", o, wo)


@pytest.mark.parametrize("kv_heads, qk_norm", [(4, False), (2, False), (1, False), (2, True)],
                         ids=["mha", "gqa2", "gqa4", "gqa2_qknorm"])
def test_attention_matches_reference(kv_heads, qk_norm):
  cfg = tiny(**{"model.num_kv_heads": kv_heads, "attention.qk_norm": qk_norm,
                "model.init_std": 0.15})
  attn = DenseAttention(cfg, 0, rngs=nnx.Rngs(params=3))
  if qk_norm:  # non-trivial norm scales
    attn.q_norm.scale[...] = jnp.linspace(0.5, 1.5, cfg.head_dim)
    attn.k_norm.scale[...] = jnp.linspace(1.5, 0.5, cfg.head_dim)
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 24, cfg.model.d_model)).astype(np.float32)
  pos = np.stack([np.arange(24), np.arange(24) + 7]).astype(np.int32)  # per-row offsets
  out = np.asarray(attn(jnp.asarray(x), jnp.asarray(pos)))
  assert out.dtype == np.float32 and out.shape == x.shape
  theta, eps = cfg.attention.rope_theta, cfg.model.norm_eps
  ref = _np_attention(x.astype(np.float64), pos, attn, theta, eps)
  scale = np.abs(ref).max()
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * scale)
  # The reference is sensitive: a wrong softmax scale would be caught by a wide margin.
  wrong = _np_attention(x.astype(np.float64), pos, attn, theta, eps, scale_mult=2.0)
  assert np.abs(wrong - ref).max() > 100 * 1e-5 * scale


# ---------------------------------------------------------------------------------------------
# RoPE and RMSNorm
# ---------------------------------------------------------------------------------------------

def test_rope_matches_reference_and_preserves_norms():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2, 16, 3, 16)).astype(np.float32)
  pos = np.stack([np.arange(16), np.arange(16) * 3 + 2]).astype(np.int32)
  y = np.asarray(rope(jnp.asarray(x), jnp.asarray(pos), 10000.0))
  np.testing.assert_allclose(y, _np_rope(x.astype(np.float64), pos, 10000.0), atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
  assert np.abs(y[:, 1:] - x[:, 1:]).max() > 0.1  # it really rotates
  np.testing.assert_array_equal(y[0, 0], x[0, 0])  # position 0 is the identity


def test_rope_dot_products_depend_only_on_offset():
  rng = np.random.default_rng(6)
  T = 16
  q = jnp.asarray(rng.normal(size=(1, T, 2, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, T, 2, 16)), jnp.float32)

  def dots(shift):
    pos = jnp.arange(T, dtype=jnp.int32)[None] + shift
    return np.asarray(jnp.einsum("bthd,bshd->bhts", rope(q, pos, 10000.0), rope(k, pos, 10000.0)))

  base = dots(0)
  for shift in (1, 5, 13):
    np.testing.assert_allclose(dots(shift), base, atol=1e-5 * np.abs(base).max())
  raw = np.asarray(jnp.einsum("bthd,bshd->bhts", q, k))
  # offset 0 (the diagonal) is the unrotated dot product; other offsets are not
  np.testing.assert_allclose(np.einsum("bhtt->bht", base), np.einsum("bhtt->bht", raw),
                             atol=1e-5 * np.abs(raw).max())
  assert np.abs(base - raw).max() > 0.1


def test_rmsnorm_matches_formula():
  norm = RMSNorm(16, eps=1e-6)
  scale = np.linspace(0.25, 2.0, 16).astype(np.float32)
  norm.scale[...] = jnp.asarray(scale)
  x = (np.random.default_rng(7).normal(size=(3, 5, 16)) * 3.0).astype(np.float32)
  ref = _np_rms(x.astype(np.float64), scale, 1e-6)
  np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), ref, rtol=1e-5, atol=1e-6)
  y16 = norm(jnp.asarray(x, jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), ref, rtol=2e-2, atol=2e-2)
  zeros = np.asarray(norm(jnp.zeros((2, 16), jnp.float32)))
  assert np.all(zeros == 0.0)  # eps keeps it finite


# ---------------------------------------------------------------------------------------------
# Forward dtypes, tied / untied head, initial loss (one jit for all variants)
# ---------------------------------------------------------------------------------------------

FWD_VARIANTS = {"f32": {}, "bf16": {"model.compute_dtype": "bfloat16"},
                "untied": {"model.tie_embeddings": False}}


@pytest.fixture(scope="module")
def forwards():
  tok = tokens((2, 32), seed=8)
  models = {k: split(build_model(tiny(**o), VOCAB)) for k, o in FWD_VARIANTS.items()}

  @jax.jit
  def run(all_params):
    return {k: nnx.merge(models[k][0], p)(tok) for k, p in all_params.items()}
  logits = run({k: v[1] for k, v in models.items()})
  return {"tokens": tok, "params": {k: v[1] for k, v in models.items()},
          "logits": {k: np.asarray(v) for k, v in logits.items()},
          "dtypes": {k: v.dtype for k, v in logits.items()}}


def test_logits_are_float32_whatever_the_compute_dtype(forwards):
  assert forwards["dtypes"] == {k: jnp.float32 for k in FWD_VARIANTS}
  assert forwards["logits"]["f32"].shape == (2, 32, PADDED)


def test_bf16_compute_close_to_f32(forwards):
  p32, p16 = forwards["params"]["f32"], forwards["params"]["bf16"]
  jax.tree.map(np.testing.assert_array_equal, p32, p16)  # same init, only compute differs
  ls32 = jax.nn.log_softmax(forwards["logits"]["f32"], axis=-1)
  ls16 = jax.nn.log_softmax(forwards["logits"]["bf16"], axis=-1)
  diff = np.abs(np.asarray(ls32 - ls16)).max()
  assert 0.0 < diff < 0.1, diff  # > 0: bf16 really is used
  spread = np.asarray(ls32.max(-1) - ls32.min(-1)).min()
  assert spread > 0.1  # the tolerance is not vacuous at this init


def test_untied_head_adds_exactly_d_times_v_params(forwards):
  sizes = {}
  for tie in (True, False):
    spec = model_spec(tiny(**{"model.tie_embeddings": tie}), VOCAB)
    sizes[tie] = sum(math.prod(x.shape) for x in jax.tree.leaves(spec.abstract_params))
  assert sizes[False] - sizes[True] == 64 * PADDED
  untied = forwards["logits"]["untied"]
  assert np.all(np.isfinite(untied)) and untied.shape == forwards["logits"]["f32"].shape
  assert "head_DxV" in forwards["params"]["untied"]
  assert not np.allclose(untied, forwards["logits"]["f32"], atol=1e-3)


def test_initial_loss_is_about_log_vocab(forwards):
  logits = forwards["logits"]["f32"]
  targets = np.asarray(tokens((2, 32), seed=9))
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  ce = -np.take_along_axis(logp, targets[..., None], axis=-1).mean()
  assert abs(ce - math.log(PADDED)) < 0.3, ce


# ---------------------------------------------------------------------------------------------
# Rematerialisation does not change loss or gradients
# ---------------------------------------------------------------------------------------------

REMATS = ("none", "full", "dots", "dots_no_batch")


def test_remat_policies_match_no_remat():
  batch = {"inputs": tokens((2, 32), seed=10), "targets": tokens((2, 32), seed=11)}
  models = {r: split(build_model(tiny(**{"model.remat": r}), VOCAB)) for r in REMATS}
  params = models["none"][1]

  def loss_fn(graphdef):
    def f(p):
      sums, _, _, _ = forward_sums(graphdef, p, batch, 1e-4)
      return (sums["ce_sum"] + 1e-4 * sums["z_sum"]) / sums["count"]
    return jax.value_and_grad(f)

  def all_variants(p):
    return {r: loss_fn(models[r][0])(p) for r in REMATS}

  for r in REMATS:  # the policy really is in the traced program
    jaxpr = str(jax.make_jaxpr(loss_fn(models[r][0]))(params))
    assert ("remat" in jaxpr) == (r != "none"), r
  out = jax.device_get(jax.jit(all_variants)(params))
  loss0, grads0 = out["none"]
  for r in REMATS[1:]:
    loss, grads = out[r]
    assert loss == pytest.approx(loss0, rel=1e-6), r
    for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
      assert np.abs(g - g0).max() <= 1e-6 * np.abs(g0).max() + 1e-12, r


# ---------------------------------------------------------------------------------------------
# Per-layer patterns and sown aux losses (the extension point of MoE / memory layers)
# ---------------------------------------------------------------------------------------------

AUX_COEF = 0.25


class AuxFFN(nnx.Module):
  """A linear FFN that sows AUX_COEF * ||W||^2 as an aux loss."""

  def __init__(self, cfg, layer_idx, *, rngs, shared=None):
    d = cfg.model.d_model
    self.w_DxD = param(rngs, (d, d), ("embed", "mlp"), std=0.05)
    self.layer_idx = layer_idx

  def __call__(self, x_BxTxD):
    w = self.w_DxD[...]
    self.sow(nnx.Intermediate, "aux_loss", AUX_COEF * jnp.sum(w * w))
    return x_BxTxD @ w.astype(x_BxTxD.dtype)


@contextlib.contextmanager
def registered_ffn(name, ctor):
  with registry.registered(Family(name, "ffn", ctor)):
    yield name


def test_pattern_layer_with_sown_aux_loss():
  name = "test_aux_ffn"
  with registered_ffn(name, AuxFFN):
    # remat as in the size presets: sown values must survive nnx.remat too
    cfg = tiny(**{"ffn.pattern": ("dense", name), "optim.warmup_steps": 0,
                  "model.remat": "dots_no_batch"})
    assert cfg.layer_types() == [("dense", "dense"), ("dense", name)]
    model = build_model(cfg, VOCAB)
    assert isinstance(model.blocks[0].ffn, GatedFFN)
    assert isinstance(model.blocks[1].ffn, AuxFFN) and model.blocks[1].ffn.layer_idx == 1
    graphdef, params = split(model)
    w0 = np.asarray(params["blocks"][1]["ffn"]["w_DxD"], np.float64)
    expected_aux = AUX_COEF * np.sum(w0 * w0)
    optimizer = make_optimizer(cfg)
    batch = {"inputs": tokens((4, 32), seed=12), "targets": tokens((4, 32), seed=13)}
    step = jax.jit(make_train_step(graphdef, cfg, optimizer))
    new_state, m = jax.device_get(step(fresh_state(params, optimizer), batch))
  assert name not in registry.FFN
  with pytest.raises(ConfigError, match=name):
    tiny(**{"ffn.pattern": ("dense", name)})

  assert expected_aux > 0.1  # large enough that "loss includes it" is a real check
  assert m["aux_loss"] == pytest.approx(expected_aux, rel=1e-5)
  assert m["sown/blocks/1/ffn/aux_loss"] == pytest.approx(expected_aux, rel=1e-5)
  z_term = cfg.model.z_loss * m["z_loss"]
  assert m["loss"] - m["ce_loss"] - z_term == pytest.approx(expected_aux, abs=1e-5)
  # the aux loss is differentiated: weight decay alone would shrink W by lr*wd*|W| only
  w1 = np.asarray(new_state["params"]["blocks"][1]["ffn"]["w_DxD"])
  assert np.all(np.isfinite(w1)) and not np.allclose(w1, w0)


# ---------------------------------------------------------------------------------------------
# One optimizer step: golden metrics, agreement with eval, gradient accumulation
# ---------------------------------------------------------------------------------------------

# Produced once by this file's `one_step` fixture: configs/dense.py:tiny with float32 compute
# and optim.warmup_steps=0 (so the first step has lr = 3e-3 rather than 0), seed 0, vocab 257,
# batch np.random.default_rng(0).integers(0, 257, (8, 65)) -> inputs [:, :-1], targets [:, 1:],
# jax 0.11.2 CPU. Values printed with repr() after one jitted make_train_step call; the loss and
# grad_norm were cross-checked against params from sparsejax.train.state.init_state (identical).
GOLDEN = {"loss": 5.972251892089844, "grad_norm": 0.5496601462364197,
          "param_rms/embed_VxD": 0.017844809219241142}


@pytest.fixture(scope="module")
def one_step():
  cfg = tiny(**{"optim.warmup_steps": 0})
  graphdef, params = split(build_model(cfg, VOCAB, seed=cfg.train.seed))
  optimizer = make_optimizer(cfg)
  toks = np.random.default_rng(0).integers(0, VOCAB, size=(8, 65))
  batch = {"inputs": jnp.asarray(toks[:, :-1], jnp.int32),
           "targets": jnp.asarray(toks[:, 1:], jnp.int32)}
  state = fresh_state(params, optimizer)
  step = jax.jit(make_train_step(graphdef, cfg, optimizer))
  new_state, metrics = jax.device_get(step(state, batch))
  return dict(cfg=cfg, graphdef=graphdef, optimizer=optimizer, batch=batch, state=state,
              new_state=new_state, metrics=metrics)


def test_golden_one_step_metrics(one_step):
  m = one_step["metrics"]
  assert m["lr"] == pytest.approx(3e-3)
  assert m["update_skipped"] == 0.0
  for key, value in GOLDEN.items():
    assert float(m[key]) == pytest.approx(value, rel=1e-4), key


def test_first_step_loss_equals_eval_loss(one_step):
  m = one_step["metrics"]
  sums = jax.device_get(jax.jit(make_eval_step(one_step["graphdef"]))(
      one_step["state"]["params"], one_step["batch"]))
  assert sums["count"] == 8 * 64
  assert m["ce_loss"] == pytest.approx(sums["ce_sum"] / sums["count"], rel=1e-6)
  assert m["accuracy"] == pytest.approx(sums["correct"] / sums["count"], abs=1e-7)
  z_term = one_step["cfg"].model.z_loss * m["z_loss"]
  assert z_term > 0 and m["loss"] == pytest.approx(m["ce_loss"] + z_term, rel=1e-6)
  assert m["aux_loss"] == 0.0


def test_grad_accumulation_matches_one_big_batch(one_step):
  # Adam's first update is lr * g / (|g| + eps): with eps = 1e-8 a coordinate whose gradient is
  # ~1e-8 flips by up to lr on rounding noise alone, so compare with eps = 1e-3, which keeps the
  # update a smooth function of the gradient (still the package's AdamW + clipping + decay).
  cfg1 = replace(one_step["cfg"], **{"optim.eps": 1e-3})
  cfg2 = replace(cfg1, **{"train.grad_accum_steps": 2})
  optimizer = make_optimizer(cfg1)
  graphdef = one_step["graphdef"]
  step1 = make_train_step(graphdef, cfg1, optimizer)
  step2 = make_train_step(graphdef, cfg2, optimizer)
  state = fresh_state(one_step["state"]["params"], optimizer)
  (new1, m1), (new2, m2) = jax.device_get(
      jax.jit(lambda s, b: (step1(s, b), step2(s, b)))(state, one_step["batch"]))
  assert m1["loss"] == pytest.approx(one_step["metrics"]["loss"], rel=1e-6)
  for key in ("loss", "ce_loss", "z_loss", "grad_norm", "accuracy"):
    assert m2[key] == pytest.approx(m1[key], rel=1e-6), key
  moved = 0.0
  for a, b, p0 in zip(jax.tree.leaves(new2["params"]), jax.tree.leaves(new1["params"]),
                      jax.tree.leaves(state["params"])):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    moved = max(moved, float(np.abs(b - np.asarray(p0)).max()))
  assert moved > 1e-3  # the step really updated the params (lr > 0)
