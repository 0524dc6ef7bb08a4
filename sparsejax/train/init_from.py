"""Start from another run's parameters: ``config.train.init_from = "WORKDIR[:STEP]"``, upcycling,
Hugging Face import and export.

* ``restore_params(source)`` reads a committed checkpoint's parameters (only ``state["params"]``:
  the optimizer state is not read, except for a weight-sparse run, whose computed weights need its
  masks) onto the current devices, with the run's own config (its mesh fitted to the device
  count: the saved mesh when it fits, else FSDP over all devices).
* ``load_params(source, target, shardings)`` restores them straight into another model spec's
  shapes and shardings (the path ``config.train.init_from`` takes): every parameter path and shape
  must agree, else one line names the first that does not.
* ``host_to_device(host, target, shardings)`` places a nested dict of host arrays (numpy,
  memmaps, safetensors slices: anything with ``shape``, ``dtype`` and slicing) onto the mesh;
  each device receives only its own slice, so the whole model never sits on one device.

The new run starts with a fresh optimizer, schedule, RNG and data stream (step 0); its own
checkpoints take precedence once it has any, so a resumed fine-tuning run never re-reads the
source.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
from typing import Any

import jax
import numpy as np

from sparsejax.config import Config, MeshConfig
from sparsejax.configure import validate
from sparsejax.errors import CheckpointError
from sparsejax.finetune import hooks as finetune
from sparsejax.layers import registry
from sparsejax.parallel import mesh as mesh_lib
from sparsejax.train.checkpoint import Checkpointer
from sparsejax.train.state import ModelSpec, abstract_state, model_spec, param_shardings

_log = logging.getLogger("sparsejax")


def parse_source(spec: str) -> tuple[pathlib.Path, int | None]:
  """``"runs/a"`` -> (runs/a, None = the latest committed step); ``"runs/a:200"`` -> step 200."""
  path, sep, step = spec.rpartition(":")
  if sep and step.isdigit() and path:
    return pathlib.Path(path), int(step)
  return pathlib.Path(spec), None


def fit_mesh(mesh_cfg: MeshConfig, n: int) -> MeshConfig:
  """The saved mesh when it fits ``n`` devices, else FSDP over all of them."""
  sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.expert, mesh_cfg.tensor]
  dcn = max(mesh_cfg.dcn, 1)  # 0 = one per slice / process: re-derived on this machine
  fixed = math.prod(s for s in sizes if s != -1) * dcn
  fits = n % fixed == 0 if -1 in sizes else math.prod(sizes) * dcn == n
  if fits:
    return mesh_cfg
  _log.info("saved mesh %s (dcn %d) does not fit %d devices; using FSDP over all devices",
            sizes, mesh_cfg.dcn, n)
  return MeshConfig(data=1, fsdp=-1, expert=1, tensor=1, dcn=1, rules=mesh_cfg.rules)


def open_source(source: str | pathlib.Path, step: int | None = None
                ) -> tuple[Checkpointer, int, dict]:
  """(checkpointer, committed step, its meta item) of ``"WORKDIR[:STEP]"`` (``step`` overrides
  the suffix), or a one-line error."""
  workdir, suffix = parse_source(str(source))
  given = f"--step {step}" if step is not None else f"step {suffix} of {source}"
  step = suffix if step is None else step
  if not (workdir / "checkpoints").is_dir():
    raise FileNotFoundError(f"{workdir} has no checkpoints/; train first with "
                            "`python -m sparsejax.train --config ... --workdir DIR`")
  ckpt = Checkpointer(workdir, async_save=False)
  committed = ckpt.committed_steps()
  if not committed:
    raise CheckpointError(f"no committed checkpoint in {ckpt.root}")
  step = committed[-1] if step is None else step
  if step not in committed:
    raise CheckpointError(f"{given} is not a committed checkpoint in {ckpt.root}; "
                          f"available: {committed}")
  return ckpt, step, ckpt.restore_meta(step)


@dataclasses.dataclass
class Restored:
  """A committed checkpoint's parameters on the current devices, with what using them needs:
  the validated config (mesh fitted), meta item, model spec, mesh and parameter shardings."""
  step: int
  cfg: Config
  meta: dict
  spec: Any
  params: Any
  mesh: Any
  param_shardings: Any

  @property
  def rules(self):
    """The logical-axis rules of the run's mesh config."""
    return registry.logical_rules(self.cfg.mesh)


def _read(ckpt: Checkpointer, step: int, cfg: Config, spec: ModelSpec, mesh, shardings=None):
  """The params of ``step`` in ``shardings`` (default: the spec's on ``mesh``); a weight-sparse
  or LoRA run's weights as it computes with them (masks / adapters from its optimizer state)."""
  if not finetune.needs_opt_state(cfg):
    shardings = shardings or param_shardings(spec, mesh)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          spec.abstract_params, shardings)
    return ckpt.restore_params(step, target)
  target, state_sh = abstract_state(spec, mesh)
  state, _, _ = ckpt.restore(step, target)
  params = finetune.jitted_inference_params(cfg, state_sh["params"])(
      state["params"], state["opt_state"], step)
  return params if shardings is None else jax.device_put(params, shardings)


def restore_params(source: str | pathlib.Path, step: int | None = None,
                   devices: list | None = None) -> Restored:
  """The parameters of ``"WORKDIR[:STEP]"`` (default: the latest committed step) on ``devices``
  (default: all)."""
  devices = list(devices) if devices is not None else jax.devices()
  ckpt, step, meta = open_source(source, step)
  cfg = validate(meta["config"])
  cfg = dataclasses.replace(cfg, mesh=fit_mesh(cfg.mesh, len(devices)))
  mesh = mesh_lib.make_mesh(cfg.mesh, devices)
  spec = model_spec(cfg, meta["vocab_size"])
  shardings = param_shardings(spec, mesh)
  params = _read(ckpt, step, cfg, spec, mesh, shardings)
  ckpt.close()
  return Restored(step, cfg, meta, spec, params, mesh, shardings)


def restore_state(ckpt: Checkpointer, step: int, spec: ModelSpec, mesh, optimizer):
  """(train state, meta, state shardings) of ``step`` for resuming ``spec``'s run. A checkpoint
  saved with the other ``config.model.scan_layers`` is read in its own layout and converted on
  the devices (parameters and optimizer moments), so a run may switch on resume."""
  target, shardings = abstract_state(spec, mesh, optimizer)
  saved = bool(ckpt.restore_meta(step)["config"].get("model", {}).get("scan_layers", False))
  cfg = spec.cfg
  if saved == cfg.model.scan_layers:
    state, _, meta = ckpt.restore(step, target)
    return state, meta, shardings
  other = model_spec(dataclasses.replace(
      cfg, model=dataclasses.replace(cfg.model, scan_layers=saved)), spec.vocab_size)
  state, _, meta = ckpt.restore(step, abstract_state(other, mesh, optimizer)[0])
  _log.info("checkpoint step %d was saved with model.scan_layers=%s: converting its layout",
            step, saved)
  convert = lambda s: spec.to_train(other.to_canonical(s))
  return jax.jit(convert, out_shardings=shardings)(state), meta, shardings


def _shapes(tree) -> dict[str, tuple]:
  return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(x.shape)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def check_same_shapes(have: dict, want: dict, what: str, fix: str) -> None:
  """One line naming the first parameter missing, extra or shaped differently between two
  abstract param trees (``what``: where ``have`` comes from; ``fix``: what to do)."""
  a, b = _shapes(have), _shapes(want)
  for key in sorted(set(a) | set(b)):
    if a.get(key) != b.get(key):
      got = "missing" if key not in a else f"shape {a[key]}"
      need = "no such parameter" if key not in b else f"shape {b[key]}"
      raise CheckpointError(f"{what}: parameter {key} is {got} but this model needs {need}; "
                            f"{fix}")


def load_params(source: str, target: ModelSpec, shardings: dict) -> dict:
  """``config.train.init_from``: the source run's params in ``target``'s shapes and
  ``shardings`` (dtypes cast to the target's)."""
  ckpt, step, meta = open_source(source)
  cfg = validate(meta["config"])
  spec = model_spec(cfg, meta["vocab_size"])
  check_same_shapes(spec.to_canonical(spec.abstract_params),
                    target.to_canonical(target.abstract_params),
                    f"config.train.init_from={source} (step {step})",
                    "start from a run with the same model shape, or upcycle / convert it first")
  mesh = jax.tree.leaves(shardings)[0].mesh
  if spec.segments == target.segments:
    params = _read(ckpt, step, cfg, spec, mesh, shardings)
  else:  # scanned in one run and not the other: restacked on the devices
    params = jax.jit(lambda p: target.to_train(spec.to_canonical(p)), out_shardings=shardings)(
        _read(ckpt, step, cfg, spec, mesh))
  ckpt.close()
  _log.info("initialised from %s step %d (fresh optimizer, schedule and data stream)",
            ckpt.workdir, step)
  return jax.tree.map(lambda x, s: x.astype(s.dtype), params, target.abstract_params)


def host_to_device(host: dict, target: ModelSpec, shardings: dict) -> dict:
  """A nested dict of host arrays with exactly ``target.abstract_params``' structure -> arrays
  placed by ``shardings``, each device given only its slice (cast to the param dtype). A tree
  stored per layer is stacked lazily into the target's train layout (scanned layers)."""
  if "scan" not in host:
    host = target.to_train(host)
  flat = {jax.tree_util.keystr(p, simple=True, separator="/"): x
          for p, x in jax.tree_util.tree_leaves_with_path(
              host, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))}
  want = _shapes(target.abstract_params)
  for key in sorted(set(flat) | set(want)):
    if key not in want:
      raise ValueError(f"host parameter {key} is not a parameter of this model")
    if key not in flat:
      raise ValueError(f"parameter {key} {want[key]} is missing from the host weights")
    if tuple(flat[key].shape) != want[key]:
      raise ValueError(f"parameter {key} has shape {tuple(flat[key].shape)}; this model needs "
                       f"{want[key]}")

  def place(path, abstract, sharding):
    src = flat[jax.tree_util.keystr(path, simple=True, separator="/")]
    dtype = abstract.dtype
    return jax.make_array_from_callback(
        abstract.shape, sharding, lambda idx: np.asarray(src[idx]).astype(dtype))
  return jax.tree_util.tree_map_with_path(place, target.abstract_params, shardings)
