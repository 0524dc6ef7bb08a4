"""``sparsejax convert --from-hf DIR --out WORKDIR``: a Hugging Face decoder checkpoint as a
sparsejax run at step 0.

The HF ``config.json`` becomes a validated Config (sparsejax/convert/hf_config.py; compute dtype
float32 unless asked), the tokenizer is copied into the workdir and ``data.tokenizer`` points at
it, and the safetensors weights are read lazily (sparsejax/convert/st_io.py) and placed with
``init_from.host_to_device``: each device reads only its own slice from disk, so the model never
sits whole on one device. ``train.loop.write_start_checkpoint`` then writes a committed step-0
checkpoint with a fresh optimizer, ``config.json`` and ``run_info.json``:

    python -m sparsejax.train --config configs/workdir.py:WORKDIR --workdir WORKDIR   trains it
    python -m sparsejax.eval --workdir WORKDIR                                       evaluates it
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import shutil
from typing import Any

import jax
from tqdm import tqdm

from sparsejax import configure
from sparsejax.config import Config
from sparsejax.convert import hf_config, hf_tokenizer, hf_weights
from sparsejax.convert.st_io import Lazy, Reader
from sparsejax.data import tokenizers as toks
from sparsejax.data.prepare import read_metadata
from sparsejax.train.init_from import host_to_device
from sparsejax.train.loop import write_start_checkpoint
from sparsejax.train.state import ModelSpec

_log = logging.getLogger("sparsejax")


@dataclasses.dataclass
class HFCheckpoint:
  """A HF model folder opened for conversion: its config.json, architecture, the sparsejax
  Config it maps to, and its safetensors reader (no tensor read yet)."""
  folder: pathlib.Path
  hf: dict
  arch: str
  cfg: Config
  reader: Reader

  def host_params(self, spec: ModelSpec, bar: tqdm | None = None) -> dict:
    """Lazy views of every parameter, per layer (``blocks/<i>``; read on slicing;
    ``bar`` counts the values read)."""
    tree = hf_weights.import_tree(self.reader, self.cfg, self.arch,
                                  spec.to_canonical(spec.abstract_params))
    if bar is None:
      return tree

    def counted(view: Lazy) -> Lazy:
      def fetch(bounds):
        out = view.fetch(bounds)
        bar.update(out.size)
        return out
      return Lazy(view.shape, view.dtype, fetch)
    return jax.tree.map(counted, tree, is_leaf=lambda x: isinstance(x, Lazy))

  def init_params(self, spec: ModelSpec, shardings: dict, progress: bool = False) -> dict:
    """The parameters on the mesh (what ``write_start_checkpoint`` calls). The bar counts the
    values this process reads: each device's slice, so replicated weights count once per device."""
    with tqdm(unit=" values", unit_scale=True, desc="reading HF weights", dynamic_ncols=True,
              disable=not progress) as bar:
      return host_to_device(self.host_params(spec, bar), spec, shardings)


def open_hf(folder: str | pathlib.Path, *, compute_dtype: str = "float32",
            data: dict | None = None) -> HFCheckpoint:
  """Read ``folder``'s config.json and open its weights; a one-line error for anything the
  converter does not implement."""
  folder = pathlib.Path(folder)
  if not (folder / "config.json").is_file():
    raise FileNotFoundError(f"{folder} has no config.json: point --from-hf at a Hugging Face "
                            "model folder (save_pretrained output)")
  hf = json.loads((folder / "config.json").read_text())
  cfg = hf_config.config_from_hf(hf, compute_dtype=compute_dtype, data=data)
  return HFCheckpoint(folder, hf, hf_config.arch_of(hf), cfg, Reader(folder))


def _check_data(cfg: Config, tokenizer: pathlib.Path) -> None:
  """The tokenizer's ids fit the model's vocabulary, and a given dataset was made with it."""
  tok = toks.get_tokenizer(str(tokenizer))
  if tok.vocab_size > cfg.model.vocab_size:
    raise ValueError(f"{tokenizer.name} has {tok.vocab_size} ids (eos added if it had none) "
                     f"but the model's vocab_size is {cfg.model.vocab_size}")
  if cfg.data.path:
    meta = read_metadata(cfg.data.path)
    if meta is None:
      raise FileNotFoundError(f"--data_path {cfg.data.path} is not a prepared dataset")
    if meta["tokenizer"].get("sha256") != getattr(tok, "sha256", None):
      raise ValueError(f"--data_path {cfg.data.path} was not tokenised with {tokenizer.name} of "
                       "this model; prepare it with --tokenizer <that file>")


def import_hf(folder: str | pathlib.Path, out: str | pathlib.Path, *,
              compute_dtype: str = "float32", data_path: str = "",
              overrides: dict[str, Any] | None = None, devices: list | None = None,
              progress: bool = True) -> pathlib.Path:
  """Convert a HF model folder into the sparsejax workdir ``out`` (module docstring).
  ``data_path``: a prepared dataset tokenised with the model's tokenizer (default: the embedded
  corpus, prepared with it on first use); ``overrides``: dotted config settings for the run
  (``{"data.seq_len": 512, "optim.lr": 1e-4}``; not the model's shape)."""
  folder, out = pathlib.Path(folder), pathlib.Path(out).resolve()
  if out.exists() and any(out.iterdir()):
    raise ValueError(f"--out {out} is not empty; choose a new directory")
  source = hf_tokenizer.find(folder)
  data = {"tokenizer": str(out / source.name),
          "path": str(pathlib.Path(data_path).resolve()) if data_path else ""}
  ckpt = open_hf(folder, compute_dtype=compute_dtype, data=data)  # refusals before any write
  if overrides:
    ckpt.cfg = configure.replace(ckpt.cfg, **overrides)
  _check_data(ckpt.cfg, source)
  out.mkdir(parents=True, exist_ok=True)
  shutil.copyfile(source, out / source.name)
  _log.info("converting %s (%s, %d layers) into %s", folder, ckpt.arch,
            ckpt.cfg.model.num_layers, out)
  write_start_checkpoint(ckpt.cfg, out, lambda spec, sh: ckpt.init_params(spec, sh, progress),
                         devices)
  (out / "hf_source.json").write_text(json.dumps(
      {"from": str(folder.resolve()), "model_type": ckpt.arch, "config": ckpt.hf}, indent=1))
  return out
