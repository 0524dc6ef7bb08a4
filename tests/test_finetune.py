"""Finetune modes (sparsejax/finetune/): sparse memory finetuning's TF-IDF row selection against
a numpy reference and its step (only the selected value rows move, even with Adam momentum on
others), memory_values (only the values), LoRA (step 0 = the base model, only adapters train,
adapter gradients = autodiff's, checkpoint round trip, eval / export see W + s A B, adapter
shardings), full (the plain step's program), the background-statistics command, and the
one-line config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sparsejax.config import ConfigError
from sparsejax.configure import check_resume, load_config
from sparsejax.finetune import background, hooks, lora, sparse_memory as sm
from sparsejax.finetune.targets import counts_key, find_lora_targets, memory_tables
from sparsejax.models.forward import forward_sums
from sparsejax.parallel.mesh import make_mesh
from sparsejax.train import init_from, step as steplib
from sparsejax.train.checkpoint import Checkpointer
from sparsejax.train.loop import write_start_checkpoint
from sparsejax.train.optim import make_optimizer
from sparsejax.train.state import abstract_state, init_state, model_spec

VOCAB = 257
BASE = {"train.steps": 10, "optim.warmup_steps": 1, "train.progress_bar": False,
        "train.eval_every_steps": 0}


def mem(**over):
  """configs/memory.py:tiny cut to one (memory) layer: a quarter less to compile."""
  return load_config("configs/memory.py:tiny", **{**BASE, "model.num_layers": 1,
                                                   "ffn.overrides": ("0:memory",), **over})


def batch(seed, b=4, t=32):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.integers(0, VOCAB, (b, t)), jnp.int32) for k in ("inputs", "targets")}


def setup(cfg, devices):
  spec = model_spec(cfg, VOCAB)
  opt = make_optimizer(cfg)
  state, _ = init_state(spec, make_mesh(cfg.mesh, devices), opt)
  return spec, opt, state, jax.jit(steplib.make_train_step(spec.graphdef, cfg, opt))


def flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def changed_rows(a, b):
  return np.any(np.asarray(a) != np.asarray(b), axis=1)


def reference_selection(counts, df, num_batches, top_t):
  """The paper's TF-IDF in float64, accessed rows only, ties to the lower row."""
  counts = np.asarray(counts, np.float64)
  tfidf = counts / counts.sum() * np.log((num_batches + 1) / (np.asarray(df) + 1.0))
  order = sorted(np.flatnonzero(counts > 0), key=lambda i: (-tfidf[i], i))
  out = np.zeros(len(counts), bool)
  out[order[:top_t]] = True
  return out


# ---- TF-IDF ----
def test_tfidf_selection_matches_numpy_reference():
  rng = np.random.default_rng(0)
  n, num_batches = 600, 10
  counts = rng.integers(1, 7, n) * (rng.random(n) < 0.6)
  df = rng.integers(0, num_batches + 1, n)
  select = jax.jit(sm.select_rows, static_argnums=2)
  for top_t in (1, 37, 200, 5000):
    got = np.asarray(select(jnp.asarray(counts, jnp.float32), jnp.asarray(sm.idf(df, num_batches)),
                            top_t))
    np.testing.assert_array_equal(got, reference_selection(counts, df, num_batches, top_t))
  # micro-batch averaging (counts / accum) ranks the same
  got = select(jnp.asarray(counts / 3.0, jnp.float32), jnp.asarray(sm.idf(df, num_batches)), 37)
  np.testing.assert_array_equal(got, reference_selection(counts, df, num_batches, 37))


def test_slot_in_every_background_batch_never_beats_an_unseen_slot():
  num_batches, n = 8, 64
  rng = np.random.default_rng(1)
  select = jax.jit(sm.select_rows, static_argnums=2)
  for trial in range(20):
    counts = rng.integers(0, 4, n)
    df = rng.integers(0, num_batches + 1, n)
    # the common slot sits at the lower row, which the tie-break would favour
    common, unseen = np.sort(rng.choice(n, 2, replace=False))
    counts[common] = counts[unseen] = rng.integers(1, 4)
    df[common], df[unseen] = num_batches, 0
    for top_t in (1, 2, 5, 10, 30, n):
      sel = np.asarray(select(jnp.asarray(counts), jnp.asarray(sm.idf(df, num_batches)), top_t))
      assert not (sel[common] and not sel[unseen]), (trial, top_t)
      assert sel.sum() == min(top_t, np.sum(counts > 0)) and not sel[counts == 0].any()


# ---- background command + sparse_memory step ----
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, default_dataset):
  """A memory run's step-0 checkpoint and its background statistics (2 batches of 4)."""
  run = tmp_path_factory.mktemp("pre")
  write_start_checkpoint(mem(), run, None, jax.devices()[:1])
  out = background.compute(run, batches=2, batch_size=4, devices=jax.devices()[:1],
                           progress=False)
  return run, out


def test_background_command_counts_document_frequencies(pretrained):
  run, out = pretrained
  assert out == run / sm.BACKGROUND_FILE
  n, df, meta = sm.load_background(out)
  assert n == 2 and list(df) == ["blocks/0/ffn/values/values_NxD"]
  d = df["blocks/0/ffn/values/values_NxD"]
  assert d.shape == (1024,) and d.min() >= 0 and d.max() == 2 and 0 < np.sum(d == 1)
  assert meta["batches"] == 2 and meta["batch_size"] == 4 and meta["tables"] == {
      "blocks/0/ffn/values/values_NxD": [0]}


def test_sparse_memory_step_moves_only_selected_rows(pretrained):
  run, _ = pretrained
  top_t = 40
  cfg = mem(**{"finetune.mode": "sparse_memory", "finetune.top_t": top_t,
               "train.init_from": str(run)})  # background "": the init_from run's file
  spec, _, s0, step = setup(cfg, jax.devices()[:1])
  n, df, _ = sm.load_background(run / sm.BACKGROUND_FILE)
  df = df["blocks/0/ffn/values/values_NxD"]
  count = jax.jit(lambda p, b: forward_sums(spec.graphdef, p, b, 0.0, jax.random.key(0))[2][
      counts_key(0)])

  def values(state):
    return np.asarray(state["params"]["blocks"][0]["ffn"]["values"]["values_NxD"])

  b1, b2 = batch(1), batch(2)
  want1 = reference_selection(count(s0["params"], b1), df, n, top_t)
  s1, m1 = step(s0, b1)
  np.testing.assert_array_equal(changed_rows(values(s0), values(s1)), want1)
  assert int(m1["finetune/rows_updated"]) == top_t == want1.sum()
  before, after = flat(s0["params"]), flat(s1["params"])
  for k in before:
    if "values_NxD" not in k:
      np.testing.assert_array_equal(before[k], after[k], err_msg=k)

  # step 2: rows selected at step 1 but not now carry Adam moments, and still do not move
  want2 = reference_selection(count(s1["params"], b2), df, n, top_t)
  s2, _ = step(s1, b2)
  np.testing.assert_array_equal(changed_rows(values(s1), values(s2)), want2)
  mu = [x for k, x in flat(s1["opt_state"]).items() if ".mu" in k and x.shape == (1024, 64)]
  assert len(mu) == 1
  idle = want1 & ~want2
  assert idle.any() and np.all(np.any(mu[0][idle] != 0, axis=1))


def test_layers_sharing_a_value_pool_add_their_counts(tmp_path):
  two = {"model.num_layers": 2, "ffn.overrides": ("0:memory", "1:memory")}
  for shared, want in ((True, {0: (0, 1)}), (False, {0: (0,), 1: (1,)})):
    cfg = mem(**two, **{"memory.shared_values": shared})
    assert memory_tables(cfg, model_spec(cfg, VOCAB).abstract_params) == {
        ("blocks", i, "ffn", "values", "values_NxD"): v for i, v in want.items()}
  bg = tmp_path / "bg.npz"
  sm.save_background(bg, 4, {"blocks/0/ffn/values/values_NxD": np.zeros(16, np.int64)}, {})
  cfg = mem(**two, **{"finetune.mode": "sparse_memory", "finetune.background": str(bg),
                      "finetune.top_t": 1})
  grads = {"blocks": {0: {"ffn": {"values": {"values_NxD": jnp.ones((16, 2))}}},
                      1: {"ffn": {"w_in_DxD": jnp.ones((2, 2))}}}}
  opt = sm.sparse_memory_optimizer(cfg, optax.identity())
  c0, c1 = np.zeros(16), np.zeros(16)
  c0[2], c0[7], c1[7] = 3, 2, 2  # layer 0 alone would pick row 2; together row 7 leads
  u, state = opt.update(grads, opt.init(grads), grads, slot_counts={
      counts_key(0): jnp.asarray(c0), counts_key(1): jnp.asarray(c1)})
  rows = np.flatnonzero(np.any(np.asarray(u["blocks"][0]["ffn"]["values"]["values_NxD"]), 1))
  assert rows.tolist() == [7] and not np.any(u["blocks"][1]["ffn"]["w_in_DxD"])
  assert (int(state.rows_accessed), int(state.rows_updated)) == (2, 1)


def test_memory_values_trains_only_the_values():
  cfg = mem(**{"finetune.mode": "memory_values"})
  spec, _, s0, step = setup(cfg, jax.devices()[:1])
  s1, _ = step(s0, batch(3))
  before, after = flat(s0["params"]), flat(s1["params"])
  moved = [k for k in before if not np.array_equal(before[k], after[k])]
  assert moved == ["['blocks'][0]['ffn']['values']['values_NxD']"]
  # no Adam moments but the values' (every other leaf is "frozen")
  shapes = {x.shape for x in flat(s0["opt_state"]).values() if x.ndim}
  assert shapes == {(1024, 64)}


# ---- LoRA ----
def test_lora_step0_is_the_base_model_and_only_adapters_train(tmp_path):
  cfg = mem(**{"finetune.mode": "lora", "finetune.lora_rank": 4})
  spec, opt, s0, step = setup(cfg, jax.devices()[:1])
  params = s0["params"]
  merged0 = hooks.inference_params(cfg, params, s0["opt_state"])
  jax.tree.map(np.testing.assert_array_equal, merged0, params)
  logits = jax.jit(lambda p, x: nnx.merge(spec.graphdef, p)(x))
  np.testing.assert_array_equal(logits(merged0, batch(4)["inputs"]),
                                logits(params, batch(4)["inputs"]))

  s1, _ = step(s0, batch(4))
  jax.tree.map(np.testing.assert_array_equal, s1["params"], params)  # base and buffers frozen
  b0, b1 = flat(s0["opt_state"].adapters), flat(s1["opt_state"].adapters)
  bs = [k for k in b0 if k.endswith("['b']")]
  assert bs and all(not b0[k].any() and b1[k].any() for k in bs)
  targets = {"".join(f"[{k!r}]" for k in t.path) for t in find_lora_targets(cfg, params)}
  merged1 = flat(hooks.inference_params(cfg, s1["params"], s1["opt_state"]))
  base = flat(params)
  assert {k for k in base if not np.array_equal(base[k], merged1[k])} == targets
  # base weights hold no Adam state: every moment has an adapter's shape
  ad_shapes = {x.shape for x in b0.values()}
  assert {x.shape for x in flat(s0["opt_state"].inner).values() if x.ndim} == ad_shapes

  # checkpoint round trip: the restored state continues bitwise
  ckpt = Checkpointer(tmp_path, async_save=False)
  ckpt.save(1, s1, {}, {"config": cfg.to_dict(), "vocab_size": VOCAB})
  ckpt.close()
  target, _ = abstract_state(spec, make_mesh(cfg.mesh, jax.devices()[:1]), opt)
  ckpt = Checkpointer(tmp_path, async_save=False)
  restored, _, _ = ckpt.restore(1, target)
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, restored, s1)
  jax.tree.map(np.testing.assert_array_equal, step(restored, batch(5))[0], step(s1, batch(5))[0])
  # eval / export (python -m sparsejax.eval, synthfacts, init_from) read the merged weights
  exported = flat(init_from.restore_params(tmp_path, 1, jax.devices()[:1]).params)
  assert exported.keys() == merged1.keys()
  for k in exported:
    np.testing.assert_array_equal(exported[k], merged1[k], err_msg=k)


def test_lora_adapter_gradients_match_autodiff():
  cfg = load_config("configs/moe.py:tiny", **{**BASE, "finetune.mode": "lora"})
  spec = model_spec(cfg, VOCAB)
  ts = {t.path[-1]: t for t in find_lora_targets(cfg, spec.abstract_params, spec.logical_axes)}
  up, wo = ts["w_up_ExDxF"], ts["wo_HxKxD"]
  assert (up.batch, up.split, wo.batch, wo.split) == (1, 2, 0, 2)
  rng = np.random.default_rng(0)
  for t in (up, wo):
    a, b = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (t.a_shape(3), t.b_shape(3)))
    w, g = (jnp.asarray(rng.standard_normal(t.shape), jnp.float32) for _ in range(2))
    loss = lambda a, b: jnp.sum(g * (w + lora.delta(t, a, b, 0.5)))
    da, db = jax.grad(loss, argnums=(0, 1))(a, b)
    got = lora.adapter_grads(t, g, {"a": a, "b": b}, 0.5)
    np.testing.assert_allclose(got["a"], da, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["b"], db, rtol=1e-5, atol=1e-5)


def test_lora_adapters_shard_like_their_weight():
  cfg = load_config("configs/dense.py:tiny", **{**BASE, "finetune.mode": "lora",
                                                "mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2})
  spec = model_spec(cfg, VOCAB)
  mesh = make_mesh(cfg.mesh, jax.devices()[:4])
  opt = make_optimizer(cfg)
  sh = hooks.opt_shardings(cfg, jax.tree.map(lambda _: "replicated", jax.eval_shape(
      opt.init, spec.abstract_params)), spec.abstract_params, spec.logical_axes, mesh)
  up = sh.adapters["blocks"][0]["ffn"]["w_up_DxF"]
  assert tuple(up["a"].spec) == ("fsdp", None) and tuple(up["b"].spec) == (None, "tensor")
  mu = [s for k, s in jax.tree_util.tree_leaves_with_path(sh.inner)
        if jax.tree_util.keystr(k).endswith("['w_up_DxF']['b']")]
  assert mu and all(tuple(s.spec) == (None, "tensor") for s in mu)


# ---- full: the plain step ----
def test_full_mode_traces_the_plain_step(monkeypatch):
  cfg = mem()
  spec = model_spec(cfg, VOCAB)
  opt = make_optimizer(cfg)
  state = jax.eval_shape(lambda: init_state(spec, make_mesh(cfg.mesh, jax.devices()[:1]),
                                            opt)[0])
  trace = lambda: str(jax.make_jaxpr(steplib.make_train_step(spec.graphdef, cfg, opt))(
      state, batch(6)))
  ours = trace()
  # the step as it was before the finetune hooks
  monkeypatch.setattr(hooks, "forward_state", lambda opt_state: None)
  monkeypatch.setattr(hooks, "filter_sown", lambda cfg, sown: {
      k: v for k, v in sown.items() if not k.rsplit("/", 1)[-1].startswith("usage")})
  monkeypatch.setattr(hooks, "update_args", lambda cfg, sown: ({}, sown))
  monkeypatch.setattr(hooks, "buffer_updates", lambda cfg, updates: updates)
  monkeypatch.setattr(hooks, "metrics", lambda opt_state: {})
  assert trace() == ours
  assert hooks.wrap_optimizer(cfg, opt) is opt


# ---- config errors ----
@pytest.mark.parametrize("over, match", [
    ({"finetune.mode": "memory_values"}, r"^config.finetune.mode: 'memory_values' .* no memory"),
    ({"finetune.mode": "sparse_memory", "ffn.overrides": ("1:memory",)},
     r"^config.finetune.background: sparse_memory needs"),
    ({"finetune.mode": "lora", "finetune.lora_targets": ("moe",)},
     r"^config.finetune.lora_targets: \['moe'\] selects no matrix"),
    ({"finetune.mode": "lora", "finetune.lora_targets": ("nope",)},
     r"^config.finetune.lora_targets: 'nope' is unknown"),
    ({"finetune.mode": "lora", "sparsity.method": "gmp"}, r"^config.finetune.mode: .*sparsity"),
    ({"finetune.mode": "lora", "finetune.lora_rank": 0}, r"^config.finetune.lora_rank"),
])
def test_bad_combinations_are_one_line_errors(over, match):
  with pytest.raises(ConfigError, match=match) as e:
    load_config("configs/dense.py:tiny", **over)
  assert "\n" not in str(e.value)


def test_missing_background_file_and_resume_guard(tmp_path):
  cfg = mem(**{"finetune.mode": "sparse_memory", "finetune.background": str(tmp_path / "x.npz")})
  with pytest.raises(FileNotFoundError, match=r"^config.finetune.background: .*x.npz not found"):
    sm.idf_tables(cfg, model_spec(cfg, VOCAB).abstract_params)
  with pytest.raises(ConfigError, match=r"^config.finetune.mode: 'full' in the checkpoint"):
    check_resume(mem().to_dict(), mem(**{"finetune.mode": "memory_values"}), "w")
  with pytest.raises(ConfigError, match=r"^config.finetune.lora_rank: 8 in the checkpoint"):
    check_resume(mem(**{"finetune.mode": "lora"}).to_dict(),
                 mem(**{"finetune.mode": "lora", "finetune.lora_rank": 4}), "w")
  old = mem().to_dict()
  del old["finetune"]  # a run saved before the section existed resumes under mode full
  check_resume(old, mem(), "w")
