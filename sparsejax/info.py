"""``python -m sparsejax.info --config configs/<family>.py:<preset> [--config.a.b=v]``: analytic
parameter / FLOP / bytes accounting of a config as one JSON line, without building weights
(the model is traced abstractly with nnx.eval_shape). With an MoE layer, "moe" holds the sizes
config.moe implies (granularity G: E*G routed experts, k*G per token, width / G).

``--sharding [--devices N] [--preset P]``: instead, every parameter's shape and PartitionSpec on
an abstract mesh of N devices (no devices needed): one JSON line for the mesh, one per parameter.
"""

from __future__ import annotations

import json

import jax
from absl import app, flags
from ml_collections import config_flags

from sparsejax.cli_common import flags_parser, one_line_errors
from sparsejax.configure import replace, validate
from sparsejax.layers import moe
from sparsejax.models import accounting
from sparsejax.parallel import mesh as mesh_lib
from sparsejax.train.state import model_spec, param_shardings

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and preset",
                                          lock_config=True)
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "Vocabulary size (0: the config's, else 257 for "
                              "byte-level / 32768 for BPE presets)")
_SHARDING = flags.DEFINE_bool("sharding", False, "Print every parameter's sharding instead")
_DEVICES = flags.DEFINE_integer("devices", 8, "--sharding: devices of the abstract mesh")
_PRESET = flags.DEFINE_string("preset", None, "--sharding: config.mesh.preset to use")


def _runs(names: list[str]) -> str:
  """["a", "a", "b"] -> "0-1:a 2:b" (attention/ffn type per layer range)."""
  out, start = [], 0
  for i in range(1, len(names) + 1):
    if i == len(names) or names[i] != names[start]:
      span = f"{start}-{i - 1}" if i - 1 > start else f"{start}"
      out.append(f"{span}:{names[start]}")
      start = i
  return " ".join(out)


def default_vocab(cfg) -> int:
  return cfg.model.vocab_size or (257 if cfg.data.tokenizer == "byte" else
                                  int(cfg.data.tokenizer.split(":")[-1])
                                  if ":" in cfg.data.tokenizer else 8192)


def _moe_sizes(model, seq_len: int) -> dict | None:
  """What granularity / MultiHash make of config.moe, for the first MoE layer (all MoE layers
  share config.moe): routed experts, experts per token, widths, the layer's total / active
  params. None when no layer is an MoE."""
  for block in model.blocks:
    if isinstance(block.ffn, moe.MoE):
      return block.ffn.summary(seq_len)
  return None


def describe(cfg, vocab_size: int = 0) -> dict:
  vocab = vocab_size or default_vocab(cfg)
  model = model_spec(cfg, vocab).abstract_model
  counts = accounting.count(model, cfg, vocab_size=vocab)
  moe_sizes = _moe_sizes(model, cfg.data.seq_len)
  return {"name": cfg.name, "vocab_size": vocab, "padded_vocab": cfg.padded_vocab(vocab),
          "layers": _runs([f"{a}/{f}" for a, f in cfg.layer_types()]),
          "seq_len": cfg.data.seq_len,
          **{k: float(v) for k, v in counts.as_metrics().items()},
          **({"moe": moe_sizes} if moe_sizes else {}),
          "flops_convention": "6*active matmul params + causal attention 6*T*H*Dh per layer"}


def spec_to_json(spec) -> list:
  return [list(e) if isinstance(e, tuple) else e for e in spec]


def sharding_table(cfg, num_devices: int, vocab_size: int, granules: int = 1) -> dict:
  """{"mesh": axis sizes, "params": {path: {"shape", "spec"}}} of `cfg` on `num_devices`
  devices, from abstract shapes only (nothing materialised, no devices needed)."""
  shape = mesh_lib.mesh_shape(cfg.mesh, num_devices, granules)
  mesh = jax.sharding.AbstractMesh(tuple(shape.values()), tuple(shape),
                                   axis_types=(jax.sharding.AxisType.Auto,) * len(shape))
  spec = model_spec(cfg, vocab_size)
  shardings = param_shardings(spec, mesh)
  params = {}
  for (path, x), sh in zip(jax.tree_util.tree_leaves_with_path(spec.abstract_params),
                           jax.tree.leaves(shardings)):
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    params[name] = {"shape": list(x.shape), "spec": spec_to_json(sh.spec)}
  return {"mesh": shape, "params": params}


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with one_line_errors("sparsejax.info"):
    cfg = validate(_CONFIG.value)
    if not _SHARDING.value:
      print(json.dumps(describe(cfg, _VOCAB.value)))
      return
    if _PRESET.value is not None:
      cfg = replace(cfg, **{"mesh.preset": _PRESET.value})
    table = sharding_table(cfg, _DEVICES.value, _VOCAB.value or default_vocab(cfg))
    print(json.dumps({"mesh": table["mesh"]}))
    for name, entry in table["params"].items():
      print(json.dumps({"param": name, **entry}))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=flags_parser("sparsejax.info"))
