"""Family records: a new family is one record (docs/ARCHITECTURE.md "How to add a family" walks
through this test's toy family), the resume guard compares every parameter-shaping field of the
sections in use, and a bad attention mask fails at validation before any dataset or workdir."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from sparsejax.config import ConfigError, field
from sparsejax.configure import load_config, load_config_dict, validate
from sparsejax.layers import registry
from sparsejax.layers.common import DTYPES, param
from sparsejax.layers.family import Family, LayerCost, ParamGroup
from sparsejax.models import accounting
from sparsejax.parallel.sharding import constrain
from sparsejax.train import loop as looplib
from sparsejax.train.optim import make_optimizer, param_groups
from sparsejax.train.state import model_spec, param_shardings

REPO = pathlib.Path(__file__).resolve().parent.parent


# ---- the toy family of the docs: a "low-rank" FFN, y = (relu(x A) * s) B ----

@dataclasses.dataclass(frozen=True)
class LowRankConfig:
  rank: int = field(8, shapes=True)   # shapes the parameters: compared on resume
  scale_lr: float = 1e-2              # the scale vector's own optimizer group


class LowRankFFN(nnx.Module):
  def __init__(self, cfg, layer_idx, *, rngs, shared=None):
    d, r, pdt = cfg.model.d_model, cfg.lowrank.rank, DTYPES[cfg.model.param_dtype]
    self.a_DxR = param(rngs, (d, r), ("embed", "lowrank"), std=0.02, dtype=pdt)
    self.b_RxD = param(rngs, (r, d), ("lowrank", "embed"), std=0.02, dtype=pdt)
    self.lrscale_R = nnx.Param(jnp.ones((r,), pdt), logical_axes=("lowrank",))

  def __call__(self, x_BxTxD):
    h = jax.nn.relu(x_BxTxD @ self.a_DxR[...]) * self.lrscale_R[...]
    return constrain(h @ self.b_RxD[...], ("act_batch", "act_length", "act_embed"))


def _check(cfg):
  if cfg.lowrank.rank < 1:
    raise ConfigError(f"config.lowrank.rank: must be >= 1, got {cfg.lowrank.rank}")


TOY = Family("lowrank", "ffn", LowRankFFN, section=("lowrank", LowRankConfig), check=_check,
             rules=(("lowrank", "tensor"),),
             param_groups=(ParamGroup("lowrank_scale", "lrscale_",
                                      lambda cfg: {"lr": cfg.lowrank.scale_lr, "grad_clip": 0.0,
                                                   "weight_decay": 0.0}),),
             cost=lambda layer, seq_len: LayerCost(active_params=2 * layer.a_DxR.shape[0] *
                                                   layer.a_DxR.shape[1]),
             shapes=("model", "lowrank"))


@pytest.fixture
def toy():
  with registry.registered(TOY):
    yield


def test_a_new_family_is_one_record(toy):
  raw = load_config_dict("configs/dense.py:tiny")  # with_defaults now has a lowrank section
  assert raw.lowrank.rank == 8
  raw.ffn.overrides = ("1:lowrank",)
  raw.lowrank.rank = 4  # what --config.lowrank.rank=4 does
  cfg = validate(raw)
  assert cfg.lowrank == LowRankConfig(rank=4)
  assert cfg.layer_types() == [("dense", "dense"), ("dense", "lowrank")]
  spec = model_spec(cfg, 257)
  assert spec.abstract_params["blocks"][1]["ffn"]["a_DxR"].shape == (64, 4)
  groups = param_groups(spec.abstract_params)["blocks"][1]["ffn"]
  assert groups == {"a_DxR": "default", "b_RxD": "default", "lrscale_R": "lowrank_scale"}
  make_optimizer(cfg).init(spec.abstract_params)  # the group has its own AdamW
  mesh = jax.sharding.AbstractMesh((2, 4), ("fsdp", "tensor"))
  sh = param_shardings(spec, mesh)["blocks"][1]["ffn"]["a_DxR"]
  assert tuple(sh.spec) == ("fsdp", "tensor")  # embed -> fsdp (core rule), lowrank -> tensor
  counts = accounting.count(spec.abstract_model, cfg)
  dense_cfg = validate({**cfg.to_dict(), "ffn": {**cfg.to_dict()["ffn"], "overrides": ()}})
  dense = accounting.count(model_spec(dense_cfg, 257).abstract_model, dense_cfg)
  ffn_dense = 3 * 64 * cfg.d_ff
  assert dense.params_active_per_token - counts.params_active_per_token == ffn_dense - 2 * 64 * 4
  with pytest.raises(ConfigError, match=r"^config\.lowrank\.rank: must be >= 1, got 0$"):
    validate({**cfg.to_dict(), "lowrank": {"rank": 0}})


def test_unregistered_section_is_an_unknown_key():
  with pytest.raises(ConfigError, match=r"^config\.lowrank: unknown key; allowed keys of config"):
    validate({"lowrank": {"rank": 4}})


def test_conflicting_rules_are_refused():
  bad = dataclasses.replace(TOY, name="lowrank2", section=None, rules=(("embed", "tensor"),))
  with pytest.raises(ValueError, match="'embed' -> 'tensor' conflicts"):
    registry.register(bad)
  assert "lowrank2" not in registry.FFN


# ---- resume guard ----

def _tiny_moe_run(workdir, **over):
  # one block: the guard compares config fields; a second block would only add compile time
  cfg = load_config("configs/moe.py:tiny", **{
      "model.num_layers": 1,
      "train.steps": 2, "train.checkpoint_every_steps": 2, "train.eval_every_steps": 0,
      "train.eval_batches": 1, "train.async_checkpoint": False, "optim.warmup_steps": 1, **over})
  return looplib.train_and_evaluate(cfg, workdir, devices=jax.devices()[:1]), cfg


def test_resume_guard_names_a_changed_family_field(tmp_path, default_dataset, caplog):
  _tiny_moe_run(tmp_path)
  with pytest.raises(ConfigError) as e:
    _tiny_moe_run(tmp_path, **{"moe.num_experts": 16, "train.steps": 4})
  msg = str(e.value)
  assert msg.startswith("config.moe.num_experts: 8 in the checkpoint, 16 now: it shapes the "
                        "parameters of the run in ")
  assert "\n" not in msg
  # fields that do not shape parameters may change; the run resumes and says what changed
  result, _ = _tiny_moe_run(tmp_path, **{"moe.top_k": 1, "moe.renormalize": False,
                                         "model.remat": "full",
                                         "train.steps": 3})
  assert result.step == 3
  assert "config.moe.top_k: 2 in the checkpoint, 1 now" in caplog.text


def test_resume_guard_ignores_unused_sections(tmp_path):
  from sparsejax.config import resume_changes
  cfg = load_config("configs/dense.py:tiny")
  saved = cfg.to_dict()
  saved["moe"] = {**saved["moe"], "num_experts": 64}
  assert resume_changes(saved, cfg, registry.resume_sections(cfg)) == ([], [])
  moe = load_config("configs/moe.py:tiny")
  shaping, _ = resume_changes({**moe.to_dict(), "moe": saved["moe"]}, moe,
                              registry.resume_sections(moe))
  assert shaping == ["config.moe.num_experts: 64 in the checkpoint, 8 now"]


# ---- the attention mask is checked at validation ----

def test_bad_mask_is_one_line_at_validation():
  with pytest.raises(ConfigError) as e:
    load_config("configs/sparse_attn.py:tiny", **{"attention.mask": "causal&windw:16"})
  assert str(e.value).startswith("config.attention.mask: 'causal&windw:16' is not a valid mask")
  assert "\n" not in str(e.value)


def test_bad_mask_cli_touches_no_workdir(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "sparsejax.train", "--config", "configs/sparse_attn.py:tiny",
       "--config.attention.mask=bogus:3", f"--workdir={workdir}",
       "--config.data.path=/nonexistent/dataset"],
      cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("sparsejax.train: error: ConfigError: config.attention.mask: 'bogus:3'")
  assert not workdir.exists()


def test_config_json_keeps_the_section_layout(tmp_path):
  cfg = load_config("configs/memory.py:tiny")
  d = json.loads(cfg.to_json())
  assert {"model", "attention", "ffn", "data", "optim", "train", "mesh", "moe", "peer",
          "memory", "name"} <= set(d)
  assert validate(d) == cfg
