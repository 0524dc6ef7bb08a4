"""Mesh presets (config.mesh.preset), the dcn axis, golden sharding dumps, and one-device parity
of a tiny model trained two steps under every preset (8 fake CPU devices, conftest.py).

Golden files: tests/golden/sharding/<preset>.json, written by
``python tests/sharding_golden.py --write-golden`` (see that script's docstring).
"""

import collections
import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import sharding_golden as sg
from sparsejax.config import ConfigError, MeshConfig
from sparsejax.configure import load_config, validate
from sparsejax.layers import registry
from sparsejax.models.transformer import build_model
from sparsejax.parallel import mesh as mesh_lib
from sparsejax.parallel import mesh as mp
from sparsejax.parallel import sharding as shd
from sparsejax.train import step as steplib
from sparsejax.train.optim import make_optimizer
from sparsejax.train.state import model_spec, state_shardings

REPO = pathlib.Path(__file__).resolve().parent.parent
PRESETS = list(mp.PRESETS)


def _error(spec="configs/dense.py:tiny", **overrides) -> str:
  with pytest.raises(ConfigError) as info:
    load_config(spec, **overrides)
  msg = str(info.value)
  assert "\n" not in msg
  return msg


# ---------------------------------------------------------------------------------------------
# Config: presets resolve into explicit sizes at validation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset, dcn, data, fsdp, expert, tensor", [
    ("", 1, -1, 1, 1, 1),
    ("dp", 1, -1, 1, 1, 1),
    ("fsdp", 1, 1, -1, 1, 1),
    ("fsdp_tp", 1, 1, -1, 1, mp.DEFAULT_TENSOR),
    ("fsdp_ep", 1, 1, -1, mp.DEFAULT_EXPERT, 1),
    ("multislice", mp.DCN_AUTO, 1, -1, 1, 1),
])
def test_preset_resolves_into_sizes(preset, dcn, data, fsdp, expert, tensor):
  cfg = load_config("configs/moe.py:tiny", **{"mesh.preset": preset})
  m = cfg.mesh
  assert (m.preset, m.dcn, m.data, m.fsdp, m.expert, m.tensor) == (preset, dcn, data, fsdp,
                                                                   expert, tensor)
  assert validate(cfg.to_dict()) == cfg  # resolving again (checkpoint config.json)
  assert mp.resolve(m) == m


def test_chosen_sizes_come_from_config():
  cfg = load_config("configs/dense.py:tiny", **{"mesh.preset": "fsdp_tp", "mesh.tensor": 2})
  assert (cfg.mesh.fsdp, cfg.mesh.tensor) == (-1, 2)
  assert dict(mesh_lib.make_mesh(cfg.mesh).shape) == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 2}
  cfg = load_config("configs/moe.py:tiny", **{"mesh.preset": "fsdp_ep", "mesh.expert": 8})
  assert dict(mesh_lib.make_mesh(cfg.mesh).shape) == {"data": 1, "fsdp": 1, "expert": 8, "tensor": 1}
  cfg = load_config("configs/dense.py:tiny", **{"mesh.preset": "multislice", "mesh.dcn": 4})
  assert dict(mesh_lib.make_mesh(cfg.mesh).shape) == {"dcn": 4, "data": 1, "fsdp": 2, "expert": 1,
                                                 "tensor": 1}


@pytest.mark.parametrize("overrides, key", [
    ({"mesh.preset": "zero3"}, "config.mesh.preset"),
    ({"mesh.preset": "fsdp", "mesh.data": 2}, "config.mesh.data"),
    ({"mesh.preset": "dp", "mesh.tensor": 2}, "config.mesh.tensor"),
    ({"mesh.preset": "fsdp", "mesh.dcn": 2}, "config.mesh.dcn"),
    ({"mesh.preset": "fsdp_tp", "mesh.tensor": -1}, "config.mesh.tensor"),
    ({"mesh.dcn": -1}, "config.mesh.dcn"),
])
def test_bad_preset_settings_are_one_line_errors(overrides, key):
  assert _error(**overrides).startswith(key)


def test_family_checks_see_the_resolved_expert_size():
  # fsdp_ep's default E=4 does not divide 6 experts: the MoE check (which reads
  # config.mesh.expert) must catch it at validation, not deep inside a shard_map.
  msg = _error("configs/moe.py:tiny", **{"mesh.preset": "fsdp_ep", "moe.num_experts": 6})
  assert "config.moe.num_experts" in msg and "mesh.expert=4" in msg


def test_preset_rules_sit_between_defaults_and_config_rules():
  base = registry.logical_rules(MeshConfig())
  ep = registry.logical_rules(mp.resolve(MeshConfig(preset="fsdp_ep")))
  assert base["embed"] == "fsdp" and ep["embed"] == ("fsdp", "expert")
  assert {k: v for k, v in ep.items() if base.get(k) != v} == dict(mp.PRESETS["fsdp_ep"].rules)
  user = registry.logical_rules(MeshConfig(preset="fsdp_ep", rules=(("embed", "fsdp"),)))
  assert user["embed"] == "fsdp"
  assert "dcn" in base["act_batch"]  # every preset's batch spans the dcn axis when there is one


# ---------------------------------------------------------------------------------------------
# Meshes on 8 devices and the dcn axis
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_builds_its_golden_mesh(preset):
  golden = json.loads(sg.golden_path(preset).read_text())
  cfg = sg.golden_config("moe", preset)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  assert dict(mesh.shape) == golden["mesh"]
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
  rules = registry.logical_rules(cfg.mesh)
  batch_axes = shd.batch_sharding(mesh, rules).spec[0]
  assert shd.batch_shards(mesh, rules) == {"fsdp_tp": 2}.get(preset, 8)
  if preset == "multislice":
    assert mesh.axis_names == ("dcn",) + mesh_lib.MESH_AXES and batch_axes == ("dcn", "fsdp")
    # simulated slices: one process, devices cut into 2 contiguous groups of 4
    assert [sorted(d.id for d in mesh.devices[i].flat) for i in range(2)] == [[0, 1, 2, 3],
                                                                           [4, 5, 6, 7]]
  else:
    assert mesh.axis_names == mesh_lib.MESH_AXES


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  id: int
  process_index: int
  platform: str = "cpu"
  device_kind: str = "cpu"
  slice_index: int = 0


def _fakes(per_granule: list[int], platform="cpu"):
  out, i = [], 0
  for g, n in enumerate(per_granule):
    for _ in range(n):
      kw = {"slice_index": g} if platform == "tpu" else {}
      out.append(FakeDevice(i, 0 if platform == "tpu" else g, platform, platform, **kw))
      i += 1
  return out[::-1]  # input order must not matter


def _slices(arr, key="process_index"):
  return [sorted({getattr(d, key) for d in arr[i].flat}) for i in range(arr.shape[0])]


def test_dcn_auto_is_one_slice_per_process():
  devices = _fakes([4, 4])
  shape = mp.mesh_shape(MeshConfig(preset="multislice"), len(devices), mp.num_granules(devices))
  assert shape == {"dcn": 2, "data": 1, "fsdp": 4, "expert": 1, "tensor": 1}
  arr = mp.hybrid_device_array(shape, devices)  # create_hybrid_device_mesh, process granules
  assert arr.shape == (2, 1, 4, 1, 1) and _slices(arr) == [[0], [1]]


@pytest.mark.parametrize("per_granule, dcn, slices", [
    ([2, 2, 2, 2], 2, [[0, 1], [2, 3]]),  # several processes per slice (one process per GPU)
    ([4, 4], 4, [[0], [0], [1], [1]]),    # several slices per process
])
def test_dcn_groups_follow_processes(per_granule, dcn, slices):
  devices = _fakes(per_granule)
  cfg = MeshConfig(dcn=dcn, data=1, fsdp=-1)
  shape = mp.mesh_shape(cfg, len(devices), mp.num_granules(devices))
  assert _slices(mp.hybrid_device_array(shape, devices)) == slices


def test_dcn_groups_follow_tpu_slices():
  devices = _fakes([4, 4], platform="tpu")  # all in process 0; slice_index tells the slices
  shape = mp.mesh_shape(MeshConfig(dcn=4, data=1, fsdp=-1), 8)
  assert _slices(mp.hybrid_device_array(shape, devices), "slice_index") == [[0], [0], [1], [1]]
  assert mp.num_granules(devices) == 2


def test_dcn_that_splits_a_process_is_an_error():
  devices = _fakes([2, 2, 2])
  shape = mp.mesh_shape(MeshConfig(dcn=2, data=1, fsdp=-1), 6)
  with pytest.raises(ValueError, match=r"config\.mesh\.dcn: 2 groups of 3 devices would split"):
    mp.hybrid_device_array(shape, devices)
  with pytest.raises(ValueError, match=r"config\.mesh\.dcn: 3 slices do not divide the 8"):
    mesh_lib.make_mesh(MeshConfig(dcn=3))


# ---------------------------------------------------------------------------------------------
# Golden sharding dumps
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", PRESETS)
def test_sharding_matches_golden(preset):
  msg = sg.check_golden(preset)
  assert not msg, msg


def test_golden_files_are_what_the_command_writes(tmp_path, capsys):
  assert sg.main(["--write-golden", "--dir", str(tmp_path)]) == 0
  for preset in PRESETS:
    assert (tmp_path / f"{preset}.json").read_text() == sg.golden_path(preset).read_text()
  assert sg.main(["--check", "--dir", str(tmp_path)]) == 0
  assert capsys.readouterr().out.count(": matches") == len(PRESETS)


def test_a_rule_that_replicates_a_large_tensor_fails_loudly():
  current = sg.golden_dump("fsdp", rules=(("embed", None),))
  msg = sg.check_golden("fsdp", current)
  lines = msg.splitlines()
  assert "differs from fsdp.json" in lines[0] and "--write-golden" in lines[0]
  embed = 32768 * 768
  assert f"rule change silently replicates dense:embed_VxD ({embed} params)" in msg
  assert f"rule change silently replicates moe:blocks/1/ffn/w_up_ExDxF ({64 * 768 * 512} " \
         "params)" in msg
  # small tensors are listed as changes but not flagged; flagged lines come first
  wq = next(line for line in lines if "dense:blocks/0/attn/wq_DxHxK" in line)
  assert wq == "  dense:blocks/0/attn/wq_DxHxK [768, 12, 64]: ['fsdp', None, None] -> " \
               "[None, None, None]"
  flagged = [i for i, line in enumerate(lines) if "silently replicates" in line]
  assert flagged == list(range(1, len(flagged) + 1))
  golden = json.loads(sg.golden_path("fsdp").read_text())["families"]
  expected = {f"{fam}:{name}" for fam, body in current["families"].items()
              for name, e in body["params"].items()
              if math.prod(e["shape"]) >= sg.LARGE and not any(e["spec"])
              and any(golden[fam]["params"][name]["spec"])}
  got = {lines[i].split("replicates ")[1].split(" (")[0] for i in flagged}
  assert got == expected and len(expected) >= 10


def test_compare_reports_added_removed_and_reshaped_params():
  golden = {"mesh": {"fsdp": 8}, "families": {"f": {"params": {
      "a": {"shape": [4096, 512], "spec": ["fsdp", None]},
      "b": {"shape": [8], "spec": [None]},
      "c": {"shape": [4096, 512], "spec": ["fsdp", None]}}}}}
  current = {"mesh": {"fsdp": 4}, "families": {"f": {"params": {
      "a": {"shape": [4096, 256], "spec": [None, None]},   # reshaped: listed, not flagged
      "c": {"shape": [4096, 512], "spec": ["fsdp", None]},
      "d": {"shape": [16], "spec": [None]}}}}}
  diffs = sg.compare(golden, current)
  assert diffs == ["mesh: {'fsdp': 8} -> {'fsdp': 4}",
                   "f:a: [4096, 512] ['fsdp', None] -> [4096, 256] [None, None]",
                   "f:b: removed (was [None])", "f:d: new parameter [16] [None]"]
  assert sg.compare(golden, golden) == []
  replicated = json.loads(json.dumps(golden))
  replicated["families"]["f"]["params"]["c"]["spec"] = [None, None]
  assert sg.compare(golden, replicated, large=4096 * 512) == [
      "rule change silently replicates f:c (2097152 params): ['fsdp', None] -> [None, None]"]
  assert sg.compare(golden, replicated, large=4096 * 512 + 1) == [
      "f:c [4096, 512]: ['fsdp', None] -> [None, None]"]


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "dp"])
def test_sharded_presets_leave_no_large_weight_replicated(preset):
  """Beyond 'unchanged': under every preset but dp each weight >= 1M elements is split over
  some axis. Product-key tables are the documented exception: PEER / memory value tables keep
  rows whole so lookups stay local (columns over tensor: split only under fsdp_tp), sub-keys
  are replicated (the fused top-k reads all of them per batch shard), and so is the query
  whitening covariance (``buffer_qcov_HxKxK``, H x d_key², 4 MiB on memory-125m: a frozen
  statistic every batch shard needs whole for its eigendecomposition)."""
  golden = json.loads(sg.golden_path(preset).read_text())
  tables = ("experts_in_NxD", "experts_out_NxD", "values_NxD")
  for family, body in golden["families"].items():
    for name, entry in body["params"].items():
      if math.prod(entry["shape"]) < sg.LARGE:
        continue
      if name.endswith(tables):
        assert entry["spec"] == ([None, "tensor"] if preset == "fsdp_tp" else [None, None])
      elif name.endswith(("subkeys_Hx2xSxC", "buffer_qcov_HxKxK")):
        assert not any(entry["spec"])
      else:
        assert any(entry["spec"]), (preset, family, name)
      assert "dcn" not in json.dumps(entry["spec"])  # never shard parameters over DCN


def test_info_prints_any_configs_sharding():
  out = subprocess.run([sys.executable, "-m", "sparsejax.info", "--config",
                        "configs/dense.py:tiny", "--sharding", "--preset", "fsdp_tp",
                        "--devices", "16", "--vocab_size", "257"], cwd=REPO, capture_output=True,
                       text=True, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
  lines = [json.loads(x) for x in out.splitlines()]
  assert lines[0] == {"mesh": {"data": 1, "fsdp": 4, "expert": 1, "tensor": 4}}
  embed = next(x for x in lines[1:] if x["param"] == "embed_VxD")
  assert embed == {"param": "embed_VxD", "shape": [384, 64], "spec": ["tensor", "fsdp"]}


# ---------------------------------------------------------------------------------------------
# A tiny model trains the same under every preset as on one device
# ---------------------------------------------------------------------------------------------

VOCAB, BATCH, SEQ, STEPS = 257, 8, 32, 2
# As tests/test_sharding.py: float32 compute and a larger AdamW eps keep sharded and unsharded
# reductions within ~1e-6 of each other.
OVERRIDES = {"model.compute_dtype": "float32", "data.seq_len": SEQ, "optim.eps": 1e-3,
             "train.steps": 4}
FAMILY = collections.defaultdict(lambda: "configs/dense.py:tiny",
                                 fsdp_ep="configs/moe.py:tiny")  # capacity dispatch, 8 experts
EXTRA = {"multislice": {"mesh.dcn": 2}}


def _batch():
  toks = np.random.default_rng(0).integers(0, VOCAB, size=(BATCH, SEQ + 1))
  return {"inputs": toks[:, :-1].astype(np.int32), "targets": toks[:, 1:].astype(np.int32)}


def _train(cfg, mesh, host_params):
  """STEPS steps as sparsejax.train.loop runs them: state and batch shardings, rules context."""
  rules = registry.logical_rules(cfg.mesh)
  spec = model_spec(cfg, VOCAB)
  optimizer = make_optimizer(cfg)
  shardings = state_shardings(spec, mesh, optimizer)
  state = jax.device_put({"params": host_params, "opt_state": optimizer.init(host_params),
                          "step": np.zeros((), np.int32), "rng": np.zeros((2,), np.uint32),
                          "nonfinite_total": np.zeros((), np.int32),
                          "nonfinite_in_a_row": np.zeros((), np.int32)}, shardings)
  batch_sh = shd.batch_sharding(mesh, rules)
  batch = {k: jax.make_array_from_process_local_data(batch_sh, v, v.shape)
           for k, v in _batch().items()}
  losses = []
  with shd.activation_sharding(mesh, rules):
    fn = jax.jit(steplib.make_train_step(spec.graphdef, cfg, optimizer),
                 in_shardings=(shardings, batch_sh), out_shardings=(shardings, None))
    for _ in range(STEPS):
      state, metrics = fn(state, batch)
      losses.append(float(metrics["loss"]))
  return np.array(losses), jax.device_get(state["params"]), state["params"]


@pytest.fixture(scope="module")
def one_device_runs():
  """family -> (host params, losses, params after STEPS) on one device."""
  out = {}
  for family in sorted(set(FAMILY.values()) | {FAMILY["dp"]}):
    cfg = load_config(family, **OVERRIDES)
    host = jax.device_get(nnx.to_pure_dict(nnx.split(build_model(cfg, VOCAB, seed=0))[1]))
    losses, params, _ = _train(cfg, mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1]), host)
    assert np.all(np.diff(losses) < 0)  # the steps really train
    out[family] = (host, losses, params)
  return out


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_like_one_device(preset, one_device_runs):
  family = FAMILY[preset]
  cfg = load_config(family, **OVERRIDES, **{"mesh.preset": preset}, **EXTRA.get(preset, {}))
  host, losses_1, params_1 = one_device_runs[family]
  mesh = mesh_lib.make_mesh(cfg.mesh)
  losses, params, live = _train(cfg, mesh, host)
  np.testing.assert_allclose(losses, losses_1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), params,
               params_1)
  # the state really is laid out as the preset says (embedding: vocab over tensor, embed over
  # the preset's fsdp axes), not silently replicated
  want = {"dp": P(None, None), "fsdp": P(None, "fsdp"), "fsdp_tp": P("tensor", "fsdp"),
          "fsdp_ep": P(None, ("fsdp", "expert")), "multislice": P(None, "fsdp")}[preset]
  assert live["embed_VxD"].sharding.spec == want
  assert len({s.device for s in live["embed_VxD"].addressable_shards}) == 8
