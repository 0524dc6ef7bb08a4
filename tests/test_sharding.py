"""Mesh construction, logical-axis rules, real parameter sharding, sharded train steps that
agree with one device, and a checkpoint that restores onto a different device count.

Uses the 8 fake CPU devices of conftest.py. XLA compile time dominates: the step config below
is shared with the end-to-end run so that its init / train-step programs are compiled once
(persistent compilation cache).
"""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from sparsejax.layers import registry
from sparsejax.config import MeshConfig
from sparsejax.configure import replace
from sparsejax.configure import load_config
from sparsejax.eval.checkpoint import evaluate
from sparsejax.models.transformer import build_model
from sparsejax.parallel import sharding as shd
from sparsejax.parallel import mesh as mesh_lib
from sparsejax.train import step as steplib
from sparsejax.train.loop import train_and_evaluate
from sparsejax.train.optim import make_optimizer
from sparsejax.train.state import init_state, model_spec, state_shardings

VOCAB = 257  # the byte-level default dataset
PADDED = 384
BATCH, SEQ, STEPS = 8, 32, 3
# Float32 compute so that different reduction orders agree to ~1e-6. AdamW's eps is raised
# because with eps=1e-8 a coordinate whose gradient cancels to ~1e-8 moves by up to lr on
# rounding noise alone (the update is g / (|g| + eps)); 1e-3 keeps it a smooth function of g.
STEP_OVERRIDES = {"model.compute_dtype": "float32", "data.seq_len": SEQ, "optim.eps": 1e-3,
                  "train.steps": 4, "train.checkpoint_every_steps": 4,
                  "train.eval_every_steps": 0, "train.log_every_steps": 2}


@pytest.fixture(scope="module")
def cfg():
  return load_config("configs/dense.py:tiny", **STEP_OVERRIDES)


def mesh_of(devices=None, **sizes):
  return mesh_lib.make_mesh(MeshConfig(**sizes), devices)


# ---------------------------------------------------------------------------------------------
# make_mesh
# ---------------------------------------------------------------------------------------------

def test_eight_fake_devices():
  assert len(jax.devices()) == 8


@pytest.mark.parametrize("sizes, expected", [
    ({}, (8, 1, 1, 1)),
    ({"fsdp": 2, "tensor": 2}, (2, 2, 1, 2)),
    ({"data": 1, "fsdp": -1, "tensor": 2}, (1, 4, 1, 2)),
    ({"data": 2, "fsdp": 2, "expert": 2, "tensor": -1}, (2, 2, 2, 1)),
    ({"data": 1, "fsdp": 4, "tensor": 2}, (1, 4, 1, 2)),
])
def test_make_mesh_fills_minus_one(sizes, expected):
  mesh = mesh_of(**sizes)
  assert mesh.axis_names == mesh_lib.MESH_AXES
  assert tuple(mesh.shape[a] for a in mesh_lib.MESH_AXES) == expected
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_make_mesh_on_a_device_subset():
  devices = jax.devices()[2:6]
  mesh = mesh_of(devices, data=1, fsdp=-1)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 1}
  assert list(mesh.devices.flat) == devices


@pytest.mark.parametrize("sizes, devices", [
    ({"data": 2, "fsdp": 2}, 8),          # no -1 and 4 != 8
    ({"data": -1, "fsdp": 3}, 8),         # 3 does not divide 8
    ({"data": 2, "fsdp": 4, "tensor": 2}, 8),
    ({"data": 8}, 4),
])
def test_make_mesh_size_mismatch_is_one_line(sizes, devices):
  with pytest.raises(ValueError) as info:
    mesh_of(jax.devices()[:devices], **sizes)
  msg = str(info.value)
  assert "\n" not in msg and "config.mesh" in msg and str(devices) in msg


# ---------------------------------------------------------------------------------------------
# logical_to_spec / batch sharding
# ---------------------------------------------------------------------------------------------

RULES = registry.logical_rules(MeshConfig())


@pytest.fixture(scope="module")
def mesh222():
  return mesh_of(data=2, fsdp=2, tensor=2)


def test_rules_applied(mesh222):
  spec = lambda axes, shape: shd.logical_to_spec(axes, shape, mesh222, RULES)  # noqa: E731
  assert spec(("embed", "mlp"), (64, 192)) == P("fsdp", "tensor")
  assert spec(("vocab", "embed"), (384, 64)) == P("tensor", "fsdp")
  assert spec(("embed", "q_heads", "head_dim"), (64, 4, 16)) == P("fsdp", "tensor", None)
  assert spec(("norm",), (64,)) == P(None)
  assert spec((None, "mlp"), (3, 8)) == P(None, "tensor")
  assert spec(("act_batch", "act_length", "act_embed"), (8, 32, 64)) == P(("data", "fsdp"),
                                                                          None, None)


def test_size_one_mesh_axes_are_dropped():
  mesh = mesh_of(data=8)
  assert shd.logical_to_spec(("vocab", "embed"), (384, 64), mesh, RULES) == P(None, None)
  assert shd.logical_to_spec(("act_batch", "act_vocab"), (8, 384), mesh, RULES) == P("data",
                                                                                   None)


def test_indivisible_dimension_is_replicated(mesh222):
  assert shd.logical_to_spec(("embed", "mlp"), (63, 192), mesh222, RULES) == P(None, "tensor")
  assert shd.logical_to_spec(("embed", "mlp"), (64, 191), mesh222, RULES) == P("fsdp", None)
  # act_batch wants data x fsdp = 4 ways; a batch of 6 is replicated (not split 2 ways)
  assert shd.logical_to_spec(("act_batch", None), (6, 8), mesh222, RULES) == P(None, None)


def _flat_axes(spec):
  out = []
  for entry in spec:
    out += [entry] if isinstance(entry, str) else list(entry or ())
  return out


def test_a_mesh_axis_is_never_used_twice(mesh222):
  assert shd.logical_to_spec(("embed", "embed"), (64, 64), mesh222, RULES) == P("fsdp", None)
  rules = {**RULES, "a": ("data", "fsdp"), "b": ("fsdp", "tensor")}
  assert shd.logical_to_spec(("a", "b"), (8, 8), mesh222, rules) == P(("data", "fsdp"),
                                                                      "tensor")
  names = sorted(RULES) + ["a", "b"]
  for combo in itertools.product(names, repeat=3):
    spec = shd.logical_to_spec(combo, (48, 48, 48), mesh222, rules)
    axes = _flat_axes(spec)
    assert len(axes) == len(set(axes)), (combo, spec)


def test_unknown_logical_name_is_a_clear_error(mesh222):
  with pytest.raises(ValueError, match=r"logical axis 'bogus' has no rule.*config\.mesh\.rules"):
    shd.logical_to_spec(("embed", "bogus"), (64, 8), mesh222, RULES)
  with pytest.raises(ValueError, match="do not match shape"):
    shd.logical_to_spec(("embed",), (64, 8), mesh222, RULES)


def test_config_rules_override_defaults(mesh222):
  rules = registry.logical_rules(MeshConfig(rules=(("embed", None), ("mlp", ("fsdp", "tensor")))))
  assert rules["vocab"] == "tensor"  # untouched defaults kept
  assert shd.logical_to_spec(("embed", "mlp"), (64, 192), mesh222, rules) == P(
      None, ("fsdp", "tensor"))


def test_batch_sharding(mesh222):
  sh = shd.batch_sharding(mesh222, RULES)
  assert sh.spec == P(("data", "fsdp"), None)
  assert shd.batch_shards(mesh222, RULES) == 4
  assert shd.batch_shards(mesh_of(data=1, fsdp=1, tensor=8), RULES) == 1


def test_constrain_is_a_no_op_outside_a_context(mesh222):
  x = jnp.ones((8, 4))
  assert shd.constrain(x, ("act_batch", None)) is x


# ---------------------------------------------------------------------------------------------
# Parameters are really sharded after init_state
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def host_params(cfg):
  """Unsharded reference params (the same seed init_state uses)."""
  params = nnx.to_pure_dict(nnx.split(build_model(cfg, VOCAB, seed=cfg.train.seed))[1])
  return jax.device_get(params)


EXPECTED = {  # path: (PartitionSpec on fsdp=4 x tensor=2, per-device shard shape)
    ("embed_VxD",): (P("tensor", "fsdp"), (192, 16)),
    ("blocks", 0, "ffn", "w_gate_DxF"): (P("fsdp", "tensor"), (16, 96)),
    ("blocks", 1, "ffn", "w_up_DxF"): (P("fsdp", "tensor"), (16, 96)),
    ("blocks", 1, "ffn", "w_down_FxD"): (P("tensor", "fsdp"), (96, 16)),
    ("blocks", 0, "attn", "wq_DxHxK"): (P("fsdp", "tensor", None), (16, 2, 16)),
    ("blocks", 0, "attn", "wk_DxKxH"): (P("fsdp", "tensor", None), (16, 1, 16)),
    ("blocks", 0, "attn", "wo_HxKxD"): (P("tensor", None, "fsdp"), (2, 16, 16)),
    ("final_norm", "scale"): (P(None), (64,)),
}


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def test_init_state_shards_params(cfg, host_params):
  mesh = mesh_of(data=1, fsdp=4, tensor=2)
  spec = model_spec(replace(cfg, **{"mesh.fsdp": 4, "mesh.tensor": 2}), VOCAB)
  state, shardings = init_state(spec, mesh)
  params = state["params"]
  for path, (pspec, shard_shape) in EXPECTED.items():
    arr = _get(params, path)
    assert arr.sharding.spec == pspec, path
    assert arr.sharding.mesh.shape == mesh.shape
    assert len(arr.addressable_shards) == 8
    assert {s.data.shape for s in arr.addressable_shards} == {shard_shape}, path
    full = np.asarray(arr)
    for s in arr.addressable_shards:  # each device holds its slice of the global array
      np.testing.assert_array_equal(np.asarray(s.data), full[s.index])
    distinct = {tuple((i.start, i.stop) for i in s.index) for s in arr.addressable_shards}
    n_blocks = int(np.prod([mesh.shape[a] for a in _flat_axes(pspec)]))
    assert len(distinct) == n_blocks  # 8: every device holds a different block
  # Adam moments mirror the parameter sharding; init is mesh-independent.
  moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.shape == (PADDED, 64)]
  assert len(moments) == 2  # Adam mu and nu of the embedding
  assert all(x.sharding.spec == P("tensor", "fsdp") for x in moments)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-7),
               params, host_params)
  assert jax.tree.structure(shardings["params"]) == jax.tree.structure(params)


# ---------------------------------------------------------------------------------------------
# A sharded train step equals the one-device step
# ---------------------------------------------------------------------------------------------

def _batch():
  toks = np.random.default_rng(0).integers(0, VOCAB, size=(BATCH, SEQ + 1))
  return {"inputs": toks[:, :-1].astype(np.int32), "targets": toks[:, 1:].astype(np.int32)}


def run_steps(cfg, host_params, mesh, steps=STEPS):
  """As sparsejax.train.loop does: jit with state / batch shardings under the rules context."""
  rules = registry.logical_rules(cfg.mesh)
  spec = model_spec(cfg, VOCAB)
  optimizer = make_optimizer(cfg)
  shardings = state_shardings(spec, mesh, optimizer)
  host_state = {"params": host_params, "opt_state": optimizer.init(host_params),
                "step": np.zeros((), np.int32), "rng": np.zeros((2,), np.uint32),
                "nonfinite_total": np.zeros((), np.int32),
                "nonfinite_in_a_row": np.zeros((), np.int32)}
  state = jax.device_put(host_state, shardings)
  batch_sh = shd.batch_sharding(mesh, rules)
  batch = {k: jax.make_array_from_process_local_data(batch_sh, v, v.shape)
           for k, v in _batch().items()}
  losses = []
  with shd.activation_sharding(mesh, rules):
    fn = jax.jit(steplib.make_train_step(spec.graphdef, cfg, optimizer),
                 in_shardings=(shardings, batch_sh), out_shardings=(shardings, None),
                 donate_argnums=0)
    for _ in range(steps):
      state, metrics = fn(state, batch)
      losses.append(float(metrics["loss"]))
  emb = state["params"]["embed_VxD"]
  return {"losses": np.array(losses), "params": jax.device_get(state["params"]),
          "embed_spec": emb.sharding.spec, "grad_norm": float(metrics["grad_norm"])}


@pytest.fixture(scope="module")
def baseline(cfg, host_params):
  return run_steps(cfg, host_params, mesh_of(jax.devices()[:1]))


@pytest.mark.parametrize("sizes", [{"data": 8}, {"data": 1, "fsdp": 8},
                                   {"data": 2, "fsdp": 2, "tensor": 2},
                                   {"data": 1, "fsdp": 4, "tensor": 2}],
                         ids=["data8", "fsdp8", "d2f2t2", "f4t2"])
def test_sharded_steps_match_one_device(cfg, host_params, baseline, sizes):
  mesh = mesh_of(**sizes)
  out = run_steps(cfg, host_params, mesh)
  expected_spec = shd.logical_to_spec(("vocab", "embed"), (384, 64), mesh, registry.logical_rules(cfg.mesh))
  assert out["embed_spec"] == expected_spec  # state stayed sharded through the steps
  assert np.all(np.diff(baseline["losses"]) < 0)  # the steps really train (lr > 0 after warmup)
  np.testing.assert_allclose(out["losses"], baseline["losses"], rtol=1e-5)
  assert out["grad_norm"] == pytest.approx(baseline["grad_norm"], rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
               out["params"], baseline["params"])


# ---------------------------------------------------------------------------------------------
# End to end: train on fsdp=4 x tensor=2, evaluate the checkpoint on 1 and on 8 devices
# ---------------------------------------------------------------------------------------------

def test_train_sharded_then_evaluate_on_other_meshes(cfg, default_dataset, tmp_path):
  run_cfg = replace(cfg, **{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2})
  workdir = tmp_path / "run"
  result = train_and_evaluate(run_cfg, workdir)
  assert result.step == 4 and not result.preempted
  info = json.loads((workdir / "run_info.json").read_text())
  assert info["devices"] == 8 and info["mesh"] == {"data": 1, "fsdp": 4, "expert": 1,
                                                   "tensor": 2}
  assert np.isfinite(result.last_metrics["loss"])

  one = evaluate(workdir, devices=jax.devices()[:1], max_batches=2)
  eight = evaluate(workdir, devices=jax.devices(), max_batches=2)
  assert (one["step"], one["devices"], eight["devices"]) == (4, 1, 8)
  # two batches spread over the split (the last one partly padded): the same tokens everywhere
  assert one["batches"] == eight["batches"] == 2 and one["split_batches"] > 2
  assert one["tokens"] == eight["tokens"] == result.eval_metrics["tokens"] <= 2 * BATCH * SEQ
  assert one["loss"] == pytest.approx(eight["loss"], rel=1e-5)
  # the in-run final eval (same val batches, params still in memory) agrees with the restore
  assert result.eval_metrics["loss"] == pytest.approx(eight["loss"], rel=1e-5)
  assert 0 < one["loss"] < 6.5
