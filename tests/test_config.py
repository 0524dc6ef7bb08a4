"""Config files, presets, validation errors, parameter / FLOP accounting and the CLI boundary."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

from sparsejax.config import Config, ConfigError
from sparsejax.configure import validate, replace
from sparsejax.configure import load_config, load_config_dict
from sparsejax.models import accounting as flops
from sparsejax.train.state import model_spec

REPO = pathlib.Path(__file__).resolve().parents[1]
# Model-family config files (configs/workdir.py reads a run's config.json: tests/test_init_from.py)
CONFIG_FILES = sorted(p for p in (REPO / "configs").glob("*.py") if p.stem != "workdir")
# Presets each config family documents; a family not listed here is loaded with its default
# preset, plus its own ``PRESETS`` list if the module defines one.
PRESETS = {"dense": ["tiny", "small", "125m", "350m", "760m", "1.3b", "8b", "70b"]}
BPE_VOCAB = 32768
SUBPROCESS_ENV = {**os.environ, "XLA_FLAGS": os.environ["SPARSEJAX_TEST_XLA_FLAGS"],
                  "JAX_PLATFORMS": "cpu"}


def _module(path: pathlib.Path):
  import importlib.util
  spec = importlib.util.spec_from_file_location(f"_test_cfg_{path.stem}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _all_specs():
  specs = []
  for path in CONFIG_FILES:
    rel = path.relative_to(REPO)
    presets = PRESETS.get(path.stem) or list(getattr(_module(path), "PRESETS", [])) or [""]
    specs += [f"{rel}:{p}" if p else str(rel) for p in presets]
  return specs


def test_config_files_are_discovered():
  assert "dense" in [p.stem for p in CONFIG_FILES]


@pytest.mark.parametrize("spec", _all_specs())
def test_every_preset_parses(spec):
  cfg = load_config(spec)
  assert isinstance(cfg, Config)
  # A validated config survives a JSON round trip (checkpoints store config.json).
  assert validate(json.loads(cfg.to_json())) == cfg
  if ":" in spec:
    assert cfg.name.endswith(spec.rsplit(":", 1)[1])


@pytest.mark.parametrize("spec", _all_specs())
def test_every_field_can_be_overridden_on_the_command_line(spec):
  """--config.<section>.<key>=v needs the key in the ConfigDict: every preset carries every field
  of every section (config files return with_defaults(c)), with the defaults of the dataclass
  where the file says nothing."""
  import dataclasses
  raw = load_config_dict(spec)
  default = Config()
  for section in dataclasses.fields(Config):
    value = getattr(default, section.name)
    if dataclasses.is_dataclass(value):
      missing = [f.name for f in dataclasses.fields(value) if f.name not in raw[section.name]]
      assert not missing, f"{spec}: config.{section.name} lacks {missing}"
  assert load_config(spec, **{"train.stop_at_step": 3}).train.stop_at_step == 3


def _documented_presets(path: pathlib.Path) -> list[str]:
  """Preset names listed in the module docstring's ``Presets`` section (2-space indent)."""
  doc = _module(path).__doc__ or ""
  section = doc.split("Presets", 1)[1] if "Presets" in doc else ""
  return [m.group(1) for m in re.finditer(r"^  (\S+)\s+\S", section, flags=re.M)]


def test_dense_documents_exactly_the_tested_presets():
  assert _documented_presets(REPO / "configs" / "dense.py") == PRESETS["dense"]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_unknown_preset_is_a_value_error_naming_it(path):
  with pytest.raises(ValueError, match="no_such_preset"):
    load_config(f"{path.relative_to(REPO)}:no_such_preset")


def test_missing_config_file_is_clear():
  with pytest.raises(FileNotFoundError, match="configs/nope.py"):
    load_config("configs/nope.py:tiny")


# ---------------------------------------------------------------------------------------------
# Parameter counts of the size presets (abstract: no memory, no compile)
# ---------------------------------------------------------------------------------------------

# Honest ranges around the named size (GPT-3 shapes; our vocab is 32768, not 50257, so the
# smallest model lands a bit under its name).
SIZE_RANGES = {"125m": (100e6, 150e6), "350m": (300e6, 420e6), "760m": (650e6, 900e6),
               "1.3b": (1.1e9, 1.55e9)}


@pytest.mark.parametrize("preset", list(SIZE_RANGES))
def test_size_preset_param_counts(preset):
  cfg = load_config(f"configs/dense.py:{preset}")
  assert cfg.model.tie_embeddings
  counts = flops.count(model_spec(cfg, BPE_VOCAB).abstract_model, cfg)
  lo, hi = SIZE_RANGES[preset]
  assert lo <= counts.params_total <= hi, (preset, counts.params_total)
  d, layers = cfg.model.d_model, cfg.model.num_layers
  assert counts.params_embedding == cfg.padded_vocab(BPE_VOCAB) * d  # tied: one table
  # SwiGLU with d_ff ~ 8/3 d has the classic 12·L·d² non-embedding budget (+ rounding, norms).
  assert counts.params_non_embedding == pytest.approx(12 * layers * d * d, rel=0.03)
  assert counts.params_total == counts.params_embedding + counts.params_non_embedding


def test_size_presets_grow_monotonically():
  totals = [flops.count(model_spec(c, BPE_VOCAB).abstract_model, c).params_total
            for c in (load_config(f"configs/dense.py:{p}") for p in SIZE_RANGES)]
  assert totals == sorted(totals) and len(set(totals)) == len(totals)


# ---------------------------------------------------------------------------------------------
# FLOP accounting against an independent hand count
# ---------------------------------------------------------------------------------------------

def _hand_count(cfg, vocab):
  """Convention of sparsejax/models/accounting.py, recomputed from the config's dims: matmul
  weights only (norm scales, including qk-norm's, are parameters but not matmul weights)."""
  d, L, H = cfg.model.d_model, cfg.model.num_layers, cfg.model.num_heads
  K = cfg.model.num_kv_heads or H
  Dh = cfg.model.head_dim or d // H
  F = cfg.ffn.d_ff or math.ceil(int(8 * d / 3) / cfg.ffn.multiple_of) * cfg.ffn.multiple_of
  V = math.ceil(vocab / cfg.model.vocab_multiple_of) * cfg.model.vocab_multiple_of
  T = cfg.data.seq_len
  attn = d * H * Dh + 2 * d * K * Dh + H * Dh * d       # wq, wk, wv, wo
  ffn = 3 * d * F                                       # gate, up, down
  head = V * d                                          # output projection (tied or not)
  matmul = L * (attn + ffn) + head
  norms = L * 2 * d + d                                 # per block 2 RMSNorms + final
  if cfg.attention.qk_norm:
    norms += L * 2 * Dh                                 # q_norm, k_norm scales
  total = V * d + L * (attn + ffn) + norms + (0 if cfg.model.tie_embeddings else V * d)
  fwd = 2 * matmul + 2 * T * H * Dh * L                 # causal attention: 2·T·H·Dh per layer
  return dict(V=V, F=F, matmul=matmul, total=total, fwd=fwd, train=3 * fwd)


@pytest.mark.parametrize("tie, qk_norm", [(True, False), (False, False), (True, True)],
                         ids=["tied", "untied", "qk_norm"])
def test_flops_match_hand_count_tiny(tie, qk_norm):
  cfg = load_config("configs/dense.py:tiny", **{"model.tie_embeddings": tie,
                                                "attention.qk_norm": qk_norm})
  vocab = 257
  hand = _hand_count(cfg, vocab)
  assert (hand["V"], hand["F"]) == (384, 192)  # the tiny dims this hand count assumes
  c = flops.count(model_spec(cfg, vocab).abstract_model, cfg)
  assert c.params_total == hand["total"]
  assert c.params_active_per_token == hand["matmul"]
  assert c.flops_per_token_fwd == hand["fwd"]
  assert c.flops_per_token == hand["train"]
  d, T = cfg.model.d_model, cfg.data.seq_len
  H, Dh, L = cfg.model.num_heads, cfg.head_dim, cfg.model.num_layers
  assert c.flops_per_token == 6 * hand["matmul"] + 6 * T * H * Dh * L
  assert c.params_embedding == hand["V"] * d * (1 if tie else 2)
  assert c.params_non_embedding == hand["total"] - c.params_embedding
  assert set(c.as_metrics()) >= {"flops_per_token", "params_total"}


# ---------------------------------------------------------------------------------------------
# Validation: one-line errors naming the dotted key
# ---------------------------------------------------------------------------------------------

def _error(**overrides) -> str:
  with pytest.raises(ConfigError) as info:
    load_config("configs/dense.py:tiny", **overrides)
  msg = str(info.value)
  assert "\n" not in msg, msg
  return msg


def test_unknown_nested_key_names_dotted_key_and_allowed():
  msg = _error(**{"model.d_modle": 3})
  assert "config.model.d_modle" in msg
  allowed = msg.split("allowed keys of config.model:", 1)[1]
  assert "d_model" in [k.strip() for k in allowed.split(",")]


def test_unknown_key_in_a_config_dict():
  raw = load_config_dict("configs/dense.py:tiny")
  raw.model.d_modle = 3
  with pytest.raises(ConfigError, match=r"config\.model\.d_modle: unknown key.*d_model"):
    validate(raw)


def test_unknown_top_level_key():
  msg = _error(bogus=1)
  assert msg.startswith("config.bogus:") and "model" in msg and "train" in msg


def test_unknown_section():
  assert "config.modle.d_model" in _error(**{"modle.d_model": 64})


def test_section_given_a_scalar():
  raw = load_config_dict("configs/dense.py:tiny").to_dict()
  raw["model"] = 3
  with pytest.raises(ConfigError, match=r"^config\.model: expected a section"):
    validate(raw)


@pytest.mark.parametrize("key, value, expect", [
    ("model.num_layers", "x", "expected int"),
    ("model.num_layers", 2.5, "expected int"),
    ("model.tie_embeddings", 1, "expected bool"),
    ("optim.lr", "fast", "expected float"),
    ("optim.lr", True, "expected float"),
    ("data.path", 3, "expected str"),
])
def test_wrong_type(key, value, expect):
  msg = _error(**{key: value})
  assert msg.startswith(f"config.{key}:") and expect in msg


def test_numbers_are_coerced():
  cfg = load_config("configs/dense.py:tiny", **{"model.num_layers": 2.0, "optim.lr": 1})
  assert cfg.model.num_layers == 2 and type(cfg.model.num_layers) is int
  assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float


def test_bad_choice_lists_allowed():
  msg = _error(**{"model.remat": "sometimes"})
  assert msg.startswith("config.model.remat:")
  for choice in ("none", "full", "dots", "dots_no_batch"):
    assert choice in msg


@pytest.mark.parametrize("key, value", [("attention.type", "nope"), ("ffn.type", "nope"),
                                        ("ffn.pattern", ("dense", "nope"))])
def test_unknown_registry_type(key, value):
  msg = _error(**{key: value})
  assert msg.startswith(f"config.{key}:") and "'nope'" in msg and "dense" in msg


def test_pattern_string_is_split():
  cfg = load_config("configs/dense.py:tiny", **{"attention.pattern": "dense, dense"})
  assert cfg.attention.pattern == ("dense", "dense")
  assert cfg.layer_types() == [("dense", "dense")] * 2


@pytest.mark.parametrize("key, value, name", [
    ("attention.pattern", ("dense",) * 3, "config.attention.pattern"),
    ("ffn.pattern", ("dense",) * 4, "config.ffn.pattern"),
    ("model.num_kv_heads", 3, "config.model.num_kv_heads"),
    ("train.grad_accum_steps", 3, "config.train.grad_accum_steps"),
    ("optim.warmup_steps", 20, "config.optim.warmup_steps"),  # tiny: train.steps == 20
    ("optim.warmup_steps", 25, "config.optim.warmup_steps"),
    ("model.num_heads", 3, "config.model.num_heads"),
    ("model.d_model", 0, "config.model.d_model"),
])
def test_inconsistent_values(key, value, name):
  assert name in _error(**{key: value})


@pytest.mark.parametrize("key, value", [("model.head_dim", -16), ("ffn.d_ff", -64),
                                        ("ffn.multiple_of", 0)])
def test_nonpositive_shape_fields_rejected(key, value):
  # Shape fields must fail at validation with their key, not later inside model building
  # (ffn.multiple_of=0 is a ZeroDivisionError in Config.d_ff; negative sizes reach jax).
  assert _error(**{key: value}).startswith(f"config.{key}:")


def test_two_minus_one_mesh_axes():
  msg = _error(**{"mesh.data": -1, "mesh.fsdp": -1})
  assert msg.startswith("config.mesh") and "-1" in msg


def test_warmup_equal_steps_ok_for_constant_schedule():
  cfg = load_config("configs/dense.py:tiny",
                    **{"optim.schedule": "constant", "optim.warmup_steps": 20})
  assert cfg.optim.warmup_steps == cfg.train.steps


def test_replace_revalidates_and_copies():
  cfg = load_config("configs/dense.py:tiny")
  new = replace(cfg, **{"model.d_model": 128, "train.steps": 5})
  assert (new.model.d_model, new.train.steps) == (128, 5)
  assert (cfg.model.d_model, cfg.train.steps) == (64, 20)  # original untouched
  with pytest.raises(ConfigError, match="config.model.num_kv_heads"):
    replace(cfg, **{"model.num_kv_heads": 3})
  with pytest.raises(ConfigError, match="config.model.d_modle"):
    replace(cfg, **{"model.d_modle": 1})
  with pytest.raises(ConfigError, match="config.optim.warmup_steps"):
    replace(cfg, **{"train.steps": 2})  # tiny's warmup (2) is no longer < steps


def test_derived_quantities():
  cfg = load_config("configs/dense.py:tiny")
  assert (cfg.head_dim, cfg.num_kv_heads, cfg.d_ff) == (16, 2, 192)
  assert cfg.padded_vocab(257) == 384 and cfg.padded_vocab(256) == 256
  mixed = replace(cfg, **{"model.num_layers": 4, "attention.pattern": ("dense", "dense")})
  assert len(mixed.layer_types()) == 4


# ---------------------------------------------------------------------------------------------
# CLI boundary
# ---------------------------------------------------------------------------------------------

def _train_cli(*args, tmp_path):
  return subprocess.run(
      [sys.executable, "-m", "sparsejax.train", *args, "--workdir", str(tmp_path / "wd")],
      cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def cli_bad_override(tmp_path_factory):
  return _train_cli("--config", "configs/dense.py:tiny", "--config.model.d_modle=3",
                    tmp_path=tmp_path_factory.mktemp("cli"))


def test_cli_unknown_override_names_key(cli_bad_override):
  assert cli_bad_override.returncode != 0
  assert "d_modle" in cli_bad_override.stderr
  assert not (pathlib.Path(cli_bad_override.args[-1]) / "checkpoints").exists()


def test_cli_unknown_override_error_is_short(cli_bad_override):
  lines = [ln for ln in cli_bad_override.stderr.strip().splitlines() if ln.strip()]
  assert len(lines) <= 3 and "d_modle" in lines[-1], (
      f"a mistyped --config override should give a short error naming the key; got "
      f"{len(lines)} lines of stderr ending in: {lines[-1] if lines else ''}")


def test_cli_unknown_key_in_config_file(tmp_path):
  cfg_file = tmp_path / "bogus_cfg.py"
  cfg_file.write_text(
      "import importlib.util\n"
      f"_s = importlib.util.spec_from_file_location('_dense', {str(REPO / 'configs/dense.py')!r})\n"
      "_m = importlib.util.module_from_spec(_s)\n"
      "_s.loader.exec_module(_m)\n\n"
      "def get_config(preset='tiny'):\n"
      "  c = _m.get_config(preset)\n"
      "  c.model.bogus = 1\n"
      "  return c\n")
  r = _train_cli("--config", f"{cfg_file}:tiny", tmp_path=tmp_path)
  assert r.returncode == 2, r.stderr
  last = r.stderr.strip().splitlines()[-1]
  assert "config.model.bogus" in last and "d_model" in last
  assert "Traceback" not in r.stderr


def test_logging_writes_to_the_current_stderr(monkeypatch):
  """Commands run in-process (tests, notebooks): the stderr of the first setup_logging call may be
  swapped out and closed; records go to the stderr of the moment, never 'I/O on closed file'."""
  import io
  import logging
  from sparsejax.cli_common import setup_logging
  logger = logging.getLogger("sparsejax")
  monkeypatch.setattr(logger, "handlers", [])
  first = io.StringIO()
  monkeypatch.setattr(sys, "stderr", first)
  setup_logging()
  first.close()
  now = io.StringIO()
  monkeypatch.setattr(sys, "stderr", now)
  logger.warning("hello")
  assert now.getvalue().rstrip().endswith("WARNING sparsejax: hello")
