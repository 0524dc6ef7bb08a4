"""Sparse upcycling (sparsejax/upcycle): the MoE built from a dense model computes the dense
model's logits and loss at step 0 where the mapping says it is exact (copy mode with
renormalised token-choice gates for any router, granular / unnormalised gates with the zero
router, MultiHash for any table), capacity dropping and expert choice break it, noise has the
stated size, refusals are one line, and the command writes a run that evaluates like its source
and trains on."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.configure import load_config, replace
from sparsejax.errors import ConfigError
from sparsejax.eval.checkpoint import evaluate
from sparsejax.models import accounting
from sparsejax.models.forward import token_losses
from sparsejax.models.transformer import build_model
from sparsejax.train.loop import train_and_evaluate
from sparsejax.upcycle import mapping
from sparsejax.upcycle.__main__ import main as upcycle_main
from sparsejax.upcycle.mapping import Options

V = 257
DENSE = load_config("configs/dense.py:tiny")   # d=64, d_ff=192, 2 layers, seq 64
MOE = load_config("configs/moe.py:tiny")       # the same with 8 experts of 192, top-2
D, F, L, E = 64, 192, 2, 8
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, 64)), jnp.int32)


def moe(**kw):
  return replace(MOE, **{f"moe.{k}": v for k, v in kw.items()})


def forward(cfg, params):
  """(logits, per-token cross-entropy) of ``cfg``'s model with ``params`` on TOKENS."""
  graphdef = nnx.split(build_model(cfg, V))[0]

  @jax.jit
  def fn(p):
    logits = nnx.merge(graphdef, p)(TOKENS[:, :-1])
    return logits, token_losses(logits, TOKENS[:, 1:])[0]
  return jax.device_get(fn(params))


@pytest.fixture(scope="module")
def dense():
  """A random dense tiny model: its params and (logits, cross-entropy)."""
  params = nnx.to_pure_dict(nnx.split(build_model(DENSE, V, seed=3))[1])
  return params, forward(DENSE, params)


def upcycled(src, cfg, options=Options(), router_std=None, seed=0):
  p = mapping.build_params(src, cfg, V, mapping.plan(DENSE, cfg, options), options)
  if router_std:  # any router: random weights, large enough to spread tokens over experts
    for i in range(L):
      r = p["blocks"][i]["ffn"]["router_DxE"]
      p["blocks"][i]["ffn"]["router_DxE"] = router_std * jax.random.normal(
          jax.random.key(seed + i), r.shape)
  return p


def max_diff(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


@pytest.mark.parametrize("kw,options", [
    ({}, Options()),                                       # the paper's upcycling, top-2 of 8
    ({"num_shared_experts": 1}, Options()),                # + a shared expert (starts at 0)
    ({"router": "hash", "num_hashes": 2, "top_k": 2}, Options(mode="granular")),  # MultiHash
], ids=["copy", "copy_shared", "multihash"])
def test_exact_for_any_router(dense, kw, options):
  src, ref = dense
  for seed in (0, 10):  # two random routers (MultiHash: two random hash tables)
    cfg = moe(dispatch="dropless", **kw, **({"hash_seed": seed} if "router" in kw else {}))
    p = upcycled(src, cfg, options, router_std=None if "router" in kw else 1.0, seed=seed)
    np.testing.assert_allclose(forward(cfg, p)[0], ref[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(forward(cfg, p)[1], ref[1], rtol=0, atol=1e-6)
  if not kw:  # every expert is the dense FFN bitwise; params = dense + (E-1) FFNs + routers
    ffn = src["blocks"][0]["ffn"]
    for i in range(E):
      np.testing.assert_array_equal(p["blocks"][0]["ffn"]["w_down_ExFxD"][i], ffn["w_down_FxD"])
    ffn_params = 3 * D * F
    assert mapping.param_counts(p) == mapping.param_counts(src) + L * ((E - 1) * ffn_params
                                                                       + D * E)
    counts = accounting.count(nnx.eval_shape(lambda: build_model(cfg, V)), cfg, vocab_size=V)
    assert counts.params_total == mapping.param_counts(p)


@pytest.mark.parametrize("kw,mode,scale", [
    ({"granularity": 4}, "granular", 4.0),                          # 32 experts of 48, top-8
    ({"renormalize": False}, "copy", 4.0),                          # gates 1/8 each: s = E/k
    ({"granularity": 2, "score_fn": "sigmoid", "renormalize": False}, "granular", 1.0),
], ids=["granular_g4", "copy_unnormalised", "granular_sigmoid"])
def test_exact_with_zero_router_only(dense, kw, mode, scale):
  src, ref = dense
  cfg = moe(dispatch="dropless", **kw)
  (plan, *_) = mapping.plan(DENSE, cfg, Options(mode=mode))
  assert (plan.zero_router, plan.scale) == (True, scale)
  p = upcycled(src, cfg, Options(mode=mode))
  out = forward(cfg, p)
  np.testing.assert_allclose(out[0], ref[0], rtol=0, atol=1e-6)
  np.testing.assert_allclose(out[1], ref[1], rtol=0, atol=1e-6)
  # a random router picks other experts / gates: no longer the dense model (stated negative)
  assert max_diff(forward(cfg, upcycled(src, cfg, Options(mode=mode), router_std=1.0)),
                  ref) > 1e-3
  with pytest.raises(ConfigError, match=r"^--router_init normal: .* only with a zero router"):
    mapping.plan(DENSE, cfg, Options(mode=mode, router_init="normal"))


@pytest.mark.parametrize("kw,match", [
    ({"dispatch": "capacity", "capacity_factor": 0.25},
     r"^config\.moe\.dispatch='capacity': 4 slots per expert .* set config\.moe\.dispatch"),
    ({"router": "expert_choice"}, r"^router='expert_choice' gives a token 0 to E experts"),
], ids=["capacity", "expert_choice"])
def test_capacity_drops_and_expert_choice_break_exactness(dense, kw, match):
  src, ref = dense
  cfg = moe(**kw)
  with pytest.raises(ConfigError, match=match) as err:
    mapping.plan(DENSE, cfg, Options())
  assert "\n" not in str(err.value) and "--allow_inexact" in str(err.value)
  out = forward(cfg, upcycled(src, cfg, Options(allow_inexact=True), router_std=1.0))
  assert max_diff(out, ref) > 1e-3


def test_noise_has_the_stated_relative_size(dense):
  src, _ = dense
  cfg = moe(dispatch="dropless")
  clean = upcycled(src, cfg)["blocks"][1]["ffn"]
  noisy = upcycled(src, cfg, Options(noise=1e-2, seed=1))["blocks"][1]["ffn"]
  again = upcycled(src, cfg, Options(noise=1e-2, seed=1))["blocks"][1]["ffn"]
  other = upcycled(src, cfg, Options(noise=1e-2, seed=2))["blocks"][1]["ffn"]
  for dense_name, name in zip(("w_gate_DxF", "w_up_DxF", "w_down_FxD"),
                             ("w_gate_ExDxF", "w_up_ExDxF", "w_down_ExFxD")):
    w = np.asarray(src["blocks"][1]["ffn"][dense_name])
    delta = np.asarray(noisy[name]) - np.asarray(clean[name])
    for e in range(E):  # every expert: noise of RMS 1e-2 x RMS(w), drawn independently
      rel = np.sqrt(np.mean(delta[e] ** 2)) / np.sqrt(np.mean(w ** 2))
      assert 0.95e-2 < rel < 1.05e-2, (name, e, rel)
    assert abs(np.corrcoef(delta[0].ravel(), delta[1].ravel())[0, 1]) < 0.05
    np.testing.assert_array_equal(noisy[name], again[name])
    assert not np.array_equal(noisy[name], other[name])


def test_refusals_are_one_line():
  cases = [
      (lambda: mapping.check_compatible(DENSE, V, moe().with_sections(
          model=dataclasses.replace(MOE.model, num_kv_heads=4)), V),
       r"^config\.model\.num_kv_heads: 2 in the source run, 4 in the target; .*--config\."),
      (lambda: mapping.check_compatible(DENSE, V, MOE.with_sections(
          ffn=dataclasses.replace(MOE.ffn, activation="relu")), V),
       r"^config\.ffn\.activation: 'swiglu' in the source run, 'relu'"),
      (lambda: mapping.check_compatible(DENSE, V, MOE, 300), r"^vocabulary: .* 257 .* 300"),
      (lambda: mapping.plan(DENSE, moe(dispatch="dropless", granularity=2), Options()),
       r"^--mode copy: the target's experts are 96 wide .* use --mode granular"),
      (lambda: mapping.plan(DENSE, load_config("configs/memory.py:tiny"), Options()),
       r"^layer \d: the source's FFN is 'dense' and the target's 'memory'"),
      (lambda: mapping.plan(DENSE, DENSE, Options()), r"^the target config has no MoE layer"),
      (lambda: mapping.plan(DENSE, moe(dispatch="dropless", d_expert=96, top_k=1,
                                       renormalize=False), Options(mode="granular")),
       r"^top-k 1 \(top_k x granularity\) is not a multiple of the 2 chunks"),
  ]
  for fn, match in cases:
    with pytest.raises(ConfigError, match=match) as err:
      fn()
    assert "\n" not in str(err.value)


def test_command_writes_a_run_that_evaluates_like_its_source_and_trains_on(
    tmp_path, default_dataset, one_device, capsys):
  fast = {"train.steps": 3, "train.checkpoint_every_steps": 3, "train.log_every_steps": 1,
          "train.eval_every_steps": 0, "train.progress_bar": False, "optim.warmup_steps": 1}
  src, out = tmp_path / "dense", tmp_path / "moe"
  train_and_evaluate(load_config("configs/dense.py:tiny", **fast), src, one_device)
  capsys.readouterr()  # the source run's log lines (when an earlier test set up logging)

  assert upcycle_main(["--from", str(src), "--out", str(out)]) == 2
  assert capsys.readouterr().err.strip() == ("sparsejax upcycle: error: bad flag: --config "
                                             "required")
  assert upcycle_main(["--from", f"{src}:3", "--config", "configs/moe.py:tiny",
                       "--config.moe.dispatch=dropless", "--out", str(out),
                       *(f"--config.{k}={v}" for k, v in fast.items())]) == 0
  summary = json.loads((out / "upcycle.json").read_text())
  assert [lay["exact"] for lay in summary["layers"]] == ["exact for any router"] * L
  assert summary["params_target"] == summary["params_source"] + L * ((E - 1) * 3 * D * F + D * E)

  # the step-0 checkpoint restores and computes the source's loss (on every device here)
  before, after = (evaluate(w, step=s, max_batches=2, devices=one_device)
                   for w, s in ((src, 3), (out, 0)))
  assert after["loss"] == pytest.approx(before["loss"], abs=1e-6)
  assert after["tokens"] == before["tokens"] > 0

  # and training continues from it, as `python -m sparsejax.train --config
  # configs/workdir.py:OUT --workdir OUT` would
  result = train_and_evaluate(load_config(f"configs/workdir.py:{out}"), out, one_device)
  assert result.step == 3 and np.isfinite(result.last_metrics["loss"])
  assert result.eval_metrics["loss"] < before["loss"]  # the same val batches, 3 steps later
