"""Hugging Face import / export (sparsejax/convert/) against transformers' own numbers.

The fixtures (tests/fixtures/hf/<arch>/: tiny random models saved by transformers 5.x, their
tokenizer, an input and transformers' float32 logits) come from tests/fixtures/hf/make_fixtures.py,
which needs torch; these tests do not. They check: (a) an imported fixture's logits equal
transformers' within 1e-4; (b) import -> export gives back the fixture's tensors exactly and an
equivalent config.json, also through a real workdir; (c) unsupported fields and models fail
with one line; (d) a converted workdir evaluates."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from sparsejax import configure
from sparsejax.convert import hf_config, hf_tokenizer, hf_weights, st_io
from sparsejax.convert.__main__ import main as convert_main
from sparsejax.convert.hf_export import export_hf
from sparsejax.convert.hf_import import import_hf, open_hf
from sparsejax.data import prepare as prepare_dataset
from sparsejax.data.tokenizers import ByteTokenizer, HFTokenizer
from sparsejax.errors import ConfigError
from sparsejax.eval.checkpoint import evaluate
from sparsejax.models import accounting
from sparsejax.models.transformer import build_model
from sparsejax.parallel import mesh as mesh_lib
from sparsejax.train.init_from import host_to_device, restore_params
from sparsejax.train.optim import decay_mask
from sparsejax.train.state import model_spec, param_shardings

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "hf"
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe")
# config.json keys whose value is not part of the model: where it came from, cache sizes, and
# settings the exporter derives from the run (eos from its tokenizer, max_window_layers once
# layer_types is explicit)
_NOT_MODEL = {"transformers_version", "dtype", "eos_token_id", "bos_token_id", "pad_token_id",
              "max_position_embeddings", "max_window_layers", "initializer_range", "use_cache"}


def _hf(arch: str) -> dict:
  return json.loads((FIXTURES / arch / "config.json").read_text())


def _host(arch: str):
  """(checkpoint, model spec, host params: numpy arrays) of a fixture."""
  ckpt = open_hf(FIXTURES / arch)
  spec = model_spec(ckpt.cfg, ckpt.cfg.model.vocab_size)
  return ckpt, spec, ckpt.host_params(spec)


@pytest.mark.parametrize("arch", ARCHS)
def test_import_matches_transformers_logits(arch, one_device):
  ckpt, spec, host = _host(arch)
  mesh = mesh_lib.make_mesh(ckpt.cfg.mesh, one_device)
  params = host_to_device(host, spec, param_shardings(spec, mesh))
  ids = np.load(FIXTURES / arch / "input_ids.npy")
  logits = np.asarray(nnx.merge(spec.graphdef, params)(ids))
  ref = np.load(FIXTURES / arch / "logits.npy")
  assert logits.shape == ref.shape
  np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_lazy_views_slice_like_the_full_tensor(arch):
  """A device's slice read from disk equals the slice of the whole converted leaf."""
  _, _, host = _host(arch)
  rng = np.random.default_rng(0)
  for view in jax.tree.leaves(host, is_leaf=lambda x: isinstance(x, st_io.Lazy)):
    full = np.asarray(view)
    for _ in range(2):
      index = []
      for n in view.shape:
        a = int(rng.integers(0, n))
        index.append(slice(a, int(rng.integers(a + 1, n + 1))))
      np.testing.assert_array_equal(view[tuple(index)], full[tuple(index)])


def _export(arch: str) -> tuple[dict, dict]:
  ckpt, spec, host = _host(arch)
  flat = {jax.tree_util.keystr(p, simple=True, separator="/"): x
          for p, x in jax.tree_util.tree_leaves_with_path(
              host, is_leaf=lambda x: isinstance(x, st_io.Lazy))}
  hf_weights.check_all_mapped(ckpt.cfg, ckpt.arch, flat)
  tensors = dict(hf_weights.export_tensors(ckpt.cfg, ckpt.arch, lambda p: np.asarray(flat[p])))
  rows = spec.abstract_params["embed_VxD"].shape[0]
  return tensors, hf_config.hf_from_config(ckpt.cfg, rows)


def _assert_equivalent(exported: dict, fixture: dict) -> None:
  assert hf_config.config_from_hf(exported) == hf_config.config_from_hf(fixture)
  for key, value in exported.items():
    if key not in _NOT_MODEL and fixture.get(key) is not None:
      assert value == fixture[key], key


@pytest.mark.parametrize("arch", ARCHS)
def test_export_of_an_import_is_the_fixture(arch):
  tensors, hf = _export(arch)
  want = load_file(str(FIXTURES / arch / "model.safetensors"))
  assert sorted(tensors) == sorted(want)
  for name, x in want.items():
    assert tensors[name].dtype == x.dtype and tensors[name].shape == x.shape, name
    np.testing.assert_array_equal(tensors[name], x, err_msg=name)
  _assert_equivalent(hf, _hf(arch))


def test_fused_expert_layout_imports_like_the_legacy_one(tmp_path):
  """transformers 5.x holds experts as gate_up_proj [E, 2F, D] / down_proj [E, D, F] under
  mlp.; a checkpoint saved in that layout imports to the same parameters."""
  src = FIXTURES / "mixtral"
  legacy = load_file(str(src / "model.safetensors"))
  hf = _hf("mixtral")
  e, f = hf["num_local_experts"], hf["intermediate_size"]
  fused = {}
  for name, x in legacy.items():
    if ".experts." not in name:
      fused[name.replace("block_sparse_moe.", "mlp.")] = x
  for i in range(hf["num_hidden_layers"]):
    p = f"model.layers.{i}.block_sparse_moe.experts."
    w = {k: np.stack([legacy[f"{p}{j}.{k}.weight"] for j in range(e)]) for k in ("w1", "w2", "w3")}
    fused[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.concatenate([w["w1"], w["w3"]], 1)
    fused[f"model.layers.{i}.mlp.experts.down_proj"] = w["w2"]
  assert fused["model.layers.0.mlp.experts.gate_up_proj"].shape == (e, 2 * f, hf["hidden_size"])
  shutil.copyfile(src / "config.json", tmp_path / "config.json")
  save_file(fused, str(tmp_path / "model.safetensors"))
  a, b = open_hf(src), open_hf(tmp_path)
  spec = model_spec(a.cfg, a.cfg.model.vocab_size)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               a.host_params(spec), b.host_params(spec),
               is_leaf=lambda x: isinstance(x, st_io.Lazy))


def test_bfloat16_checkpoint_reads(tmp_path):
  """Most published checkpoints are bf16: read as ml_dtypes.bfloat16, then cast to the params'
  float32 by host_to_device."""
  tensors = load_file(str(FIXTURES / "llama" / "model.safetensors"))
  save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()},
            str(tmp_path / "model.safetensors"))
  shutil.copyfile(FIXTURES / "llama" / "config.json", tmp_path / "config.json")
  ckpt = open_hf(tmp_path)
  host = ckpt.host_params(model_spec(ckpt.cfg, ckpt.cfg.model.vocab_size))
  assert host["embed_VxD"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(
      np.asarray(host["embed_VxD"]).astype(np.float32),
      tensors["model.embed_tokens.weight"].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_sharded_safetensors_round_trip(tmp_path):
  tensors = {f"t{i}": np.full((3, 4), i, np.float32) for i in range(5)}
  files = st_io.write(tmp_path, iter(tensors.items()), max_shard_bytes=100)
  assert len(files) == 3 and (tmp_path / st_io.INDEX).is_file()
  reader = st_io.Reader(tmp_path)
  assert reader.names() == set(tensors)
  for name, x in tensors.items():
    np.testing.assert_array_equal(reader.full(name), x)


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory) -> pathlib.Path:
  """A tiny dataset prepared with the fixtures' tokenizer (the converted run's data)."""
  root = tmp_path_factory.mktemp("bpe")
  text = root / "corpus.txt"
  text.write_text(pathlib.Path(json.__file__).read_text() * 2)
  return prepare_dataset([str(text)], root / "data",
                         tokenizer=str(FIXTURES / "llama" / "tokenizer.json"))


@pytest.mark.parametrize("arch,scan", [("qwen2_moe", False), ("mixtral", True)],
                         ids=["loop", "scanned"])
def test_workdir_round_trip_evaluates(tmp_path, bpe_data, one_device, arch, scan):
  """HF -> sparsejax workdir (checkpoint, config, tokenizer) -> eval -> HF: the fixture again;
  scanned (mixtral: two identical layers), the checkpoint holds the layers stacked (lazily from
  the HF views) and the export unstacks them."""
  work = import_hf(FIXTURES / arch, tmp_path / "run", data_path=str(bpe_data),
                   overrides={"data.seq_len": 16, "data.global_batch_size": 2,
                              "model.scan_layers": scan},
                   devices=one_device, progress=False)
  if scan:  # the layers as the checkpoint holds them: one stack
    assert sorted(restore_params(work, devices=one_device).params) == [
        "embed_VxD", "final_norm", "head_DxV", "scan"]
  saved = json.loads((work / "config.json").read_text())
  assert saved["data"]["tokenizer"] == str(work / "tokenizer.json")
  assert saved["model"]["compute_dtype"] == "float32"
  result = evaluate(work, max_batches=1, devices=one_device)
  assert result["step"] == 0 and 0 < result["loss"] < 3 * np.log(300)
  out = export_hf(work, tmp_path / "hf", progress=False)
  got, want = load_file(str(out / "model.safetensors")), load_file(
      str(FIXTURES / arch / "model.safetensors"))
  assert got.keys() == want.keys()
  assert all(np.array_equal(got[k], want[k]) for k in want)
  _assert_equivalent(json.loads((out / "config.json").read_text()), _hf(arch))
  assert (out / "tokenizer.json").read_bytes() == (FIXTURES / arch / "tokenizer.json").read_bytes()


_BAD_HF = [
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     "rope_type"),
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("llama", {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "model_type"),
    ("qwen3", {"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ("qwen2_moe", {"shared_expert_intermediate_size": 36}, "shared_expert_intermediate_size"),
    ("qwen2", {"layer_types": ["full_attention", "chunked_attention"]}, "layer_types"),
]


@pytest.mark.parametrize("arch,change,field", _BAD_HF)
def test_unsupported_hf_fields_fail_with_one_line(arch, change, field):
  with pytest.raises(ConfigError) as e:
    hf_config.config_from_hf({**_hf(arch), **change})
  assert field in str(e.value) and "\n" not in str(e.value)


_BAD_EXPORT = [
    ({"ffn.type": "memory"}, "memory"),
    ({"ffn.type": "peer"}, "peer"),
    ({"attention.type": "block_sparse", "attention.mask": "bigbird:64:16:2:16"}, "mask"),
    ({"attention.type": "block_sparse", "attention.mask": "causal&window:7",
      "attention.pattern": ("dense", "block_sparse")}, "sliding window on some layers"),
    ({"attention.qk_norm": True, "attention.qkv_bias": True}, "qk_norm with qkv_bias"),
    ({"ffn.activation": "drelu"}, "activation"),
    ({"ffn.type": "moe", "moe.router": "hash", "moe.top_k": 1}, "router='hash'"),
]


@pytest.mark.parametrize("overrides,text", _BAD_EXPORT)
def test_models_without_hf_equivalent_are_refused(overrides, text):
  cfg = configure.replace(configure.validate(configure.with_defaults({})), **overrides)
  with pytest.raises(ConfigError) as e:
    hf_config.hf_from_config(cfg, 384)
  assert text in str(e.value) and "\n" not in str(e.value)


def test_unmapped_tensor_is_refused(tmp_path):
  """A tensor the config does not explain (an o_proj bias under attention_bias=False) fails
  with one line naming it, instead of being silently dropped."""
  tensors = load_file(str(FIXTURES / "llama" / "model.safetensors"))
  tensors["model.layers.1.self_attn.o_proj.bias"] = np.zeros(32, np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  shutil.copyfile(FIXTURES / "llama" / "config.json", tmp_path / "config.json")
  ckpt = open_hf(tmp_path)
  with pytest.raises(ValueError, match="o_proj.bias has no sparsejax parameter"):
    ckpt.host_params(model_spec(ckpt.cfg, ckpt.cfg.model.vocab_size))


def test_cli_refusal_is_one_line(tmp_path, capsys):
  shutil.copytree(FIXTURES / "llama", tmp_path / "hf")
  bad = {**_hf("llama"), "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}
  (tmp_path / "hf" / "config.json").write_text(json.dumps(bad))
  with pytest.raises(SystemExit) as e:
    convert_main(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and len(err.splitlines()) == 1
  assert err.startswith("sparsejax convert: error: ConfigError:") and "rope_scaling" in err
  assert not (tmp_path / "run").exists()


def test_byte_tokenizer_json_gives_byte_ids(tmp_path):
  tok = HFTokenizer(hf_tokenizer.byte_tokenizer(tmp_path / "tokenizer.json"))
  text = "def f(x):\n\treturn 'héllo – 世界' \r\n"
  np.testing.assert_array_equal(tok.encode(text), ByteTokenizer().encode(text))
  assert (tok.eos_id, tok.vocab_size) == (ByteTokenizer.eos_id, ByteTokenizer.vocab_size)
  assert tok.decode(tok.encode(text)) == text


def test_qkv_bias_and_shared_gate_options():
  """The two options the converter added: off by default, zero-initialised / one-line checks,
  sharded by their logical axes, never weight-decayed (biases), counted by accounting."""
  base = configure.validate(configure.with_defaults({}))
  assert not base.attention.qkv_bias and not base.moe.shared_expert_gate
  cfg = configure.replace(base, **{"attention.qkv_bias": True, "ffn.type": "moe",
                                   "moe.num_shared_experts": 1, "moe.shared_expert_gate": True,
                                   "model.vocab_size": 257})
  spec = model_spec(cfg, 257)
  attn, ffn = spec.logical_axes["blocks"][0]["attn"], spec.logical_axes["blocks"][0]["ffn"]
  assert attn["q_bias_HxK"] == ("q_heads", "head_dim")
  assert attn["k_bias_KxH"] == attn["v_bias_KxH"] == ("kv_heads", "head_dim")
  assert ffn["shared_expert_gate_Dx1"] == ("embed", None)
  decay = decay_mask(spec.abstract_params, cfg)["blocks"][0]
  assert not any(decay["attn"][k] for k in ("q_bias_HxK", "k_bias_KxH", "v_bias_KxH"))
  model = build_model(cfg, 257)
  assert not np.any(np.asarray(model.blocks[0].attn.q_bias_HxK[...]))
  plain = configure.replace(cfg, **{"attention.qkv_bias": False, "moe.shared_expert_gate": False})
  a = accounting.count(build_model(cfg, 257), cfg, vocab_size=257)
  b = accounting.count(build_model(plain, 257), plain, vocab_size=257)
  d, layers = cfg.model.d_model, cfg.model.num_layers
  biases = layers * (cfg.model.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
  assert a.params_total - b.params_total == biases + layers * d
  assert a.params_active_total - b.params_active_total == layers * d  # biases are no matmul
  with pytest.raises(ConfigError, match="shared_expert_gate") as e:
    configure.replace(base, **{"ffn.type": "moe", "moe.shared_expert_gate": True})
  assert "\n" not in str(e.value)
