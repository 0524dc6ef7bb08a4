"""``sparsejax convert --to-hf WORKDIR --out DIR [--step N]``: a committed checkpoint as a Hugging
Face model folder (config.json, safetensors, tokenizer) that transformers 5.x loads as is.

Which HF architecture (sparsejax/convert/hf_config.py ``hf_from_config``): dense models as
Llama (Mistral with a sliding window on every layer, Qwen2 with q/k/v biases, Qwen3 with
QK-norm), MoE models as Mixtral (softmax top-k renormalised, no shared expert, every layer MoE)
or else Qwen2-MoE (shared experts, dense layers, unnormalised gates, biases). Memory, PEER and
other block-sparse masks have no HF equivalent and are refused with one line before anything is
read. A weight-sparse run exports the weights it computes with (masked;
``init_from.restore_params`` reads them as sparsejax/eval/checkpoint.py does). All embedding rows
are exported (``vocab_size`` = the padded rows): the padded logits enter sparsejax's softmax, so
HF then computes the same distribution.

A capacity-dispatch MoE drops tokens over an expert's capacity; HF's MoE is dropless, so the two
agree wherever nothing was dropped (a warning says so).
"""

from __future__ import annotations

import json
import logging
import pathlib

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from sparsejax.configure import validate
from sparsejax.convert import hf_config, hf_tokenizer, hf_weights, st_io
from sparsejax.train.init_from import open_source, restore_params
from sparsejax.train.state import model_spec

_log = logging.getLogger("sparsejax")


def plan(workdir: str | pathlib.Path, step: int | None = None) -> tuple[dict, int]:
  """(HF config.json dict, step) of a run's committed checkpoint, without reading parameters;
  one ``ConfigError`` line when the model has no HF equivalent."""
  ckpt, step, meta = open_source(str(workdir), step)
  ckpt.close()
  cfg = validate(meta["config"])
  rows = model_spec(cfg, meta["vocab_size"]).abstract_params["embed_VxD"].shape[0]
  hf = hf_config.hf_from_config(cfg, rows)
  if "moe" in [f for _, f in cfg.layer_types()] and cfg.moe.dispatch == "capacity":
    _log.warning("config.moe.dispatch='capacity' drops tokens over capacity; the %s export is "
                 "dropless, so its logits match where no token was dropped", hf["model_type"])
  return hf, step


def export_hf(workdir: str | pathlib.Path, out: str | pathlib.Path, *, step: int | None = None,
              max_shard_bytes: int = 5 << 30, progress: bool = True) -> pathlib.Path:
  """Write ``out`` (module docstring); returns it."""
  out = pathlib.Path(out)
  if out.exists() and any(out.iterdir()):
    raise ValueError(f"--out {out} is not empty; choose a new directory")
  hf, step = plan(workdir, step)
  r = restore_params(workdir, step)
  flat = {jax.tree_util.keystr(p, simple=True, separator="/"): x  # per layer, also if scanned
          for p, x in jax.tree_util.tree_leaves_with_path(r.spec.to_canonical(r.params))}

  def get(path: str) -> np.ndarray:
    x = flat[path]
    if jax.process_count() > 1:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  hf_weights.check_all_mapped(r.cfg, hf["model_type"], flat)
  tensors = hf_weights.export_tensors(r.cfg, hf["model_type"], get)
  if jax.process_index() != 0:
    for _ in tensors:  # every process joins the gathers; process 0 writes
      pass
    return out
  out.mkdir(parents=True, exist_ok=True)
  bar = tqdm(tensors, desc="writing safetensors", unit=" tensors", disable=not progress,
             dynamic_ncols=True)
  st_io.write(out, bar, max_shard_bytes)
  hf["eos_token_id"] = hf_tokenizer.export(r.meta["dataset"], out)
  hf["dtype"] = str(next(iter(flat.values())).dtype)
  (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
  (out / "sparsejax_source.json").write_text(json.dumps(
      {"workdir": str(pathlib.Path(workdir).resolve()), "step": step,
       "config": r.cfg.to_dict()}, indent=1) + "\n")
  _log.info("exported %s step %d as %s to %s", workdir, step, hf["architectures"][0], out)
  return out
