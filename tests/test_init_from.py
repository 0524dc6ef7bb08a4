"""Starting from another run's parameters: config.train.init_from, write_start_checkpoint (the
path upcycling and conversion take), host_to_device, configs/workdir.py."""

import functools
import json

import jax
import numpy as np
import pytest

from sparsejax.configure import load_config
from sparsejax.errors import CheckpointError, ConfigError
from sparsejax.parallel.mesh import make_mesh
from sparsejax.train import init_from
from sparsejax.train.checkpoint import Checkpointer
from sparsejax.train.loop import train_and_evaluate, write_start_checkpoint
from sparsejax.train.state import abstract_state, model_spec, param_shardings

STEPS = 3


def tiny(**overrides):
  base = {"train.steps": STEPS, "train.checkpoint_every_steps": STEPS,
          "train.log_every_steps": 1, "train.eval_every_steps": 0, "train.progress_bar": False,
          "optim.warmup_steps": 1}
  base.update(overrides)
  return load_config("configs/dense.py:tiny", **base)


def state_at(workdir, cfg, step, devices):
  spec = model_spec(cfg, 257)
  target, _ = abstract_state(spec, make_mesh(cfg.mesh, devices))
  ckpt = Checkpointer(workdir, async_save=False)
  state, _, _ = ckpt.restore(step, target)
  ckpt.close()
  return jax.device_get(state)


def test_init_from_starts_from_the_source_params_with_a_fresh_optimizer(
    tmp_path, default_dataset, one_device):
  src = tmp_path / "src"
  train_and_evaluate(tiny(), src, one_device)
  src_params = state_at(src, tiny(), STEPS, one_device)["params"]

  # write_start_checkpoint: step 0 holds the source's params bitwise, the optimizer is fresh
  cfg = tiny(**{"train.seed": 5, "train.steps": 2, "train.checkpoint_every_steps": 2})
  start = tmp_path / "start"
  write_start_checkpoint(cfg, start, functools.partial(init_from.load_params, str(src)),
                         one_device)
  state0 = state_at(start, cfg, 0, one_device)
  jax.tree.map(np.testing.assert_array_equal, state0["params"], src_params)
  assert int(state0["step"]) == 0
  moments = [x for x in jax.tree.leaves(state0["opt_state"]) if np.ndim(x) >= 1]
  assert moments and all(not np.any(x) for x in moments)
  assert json.loads((start / "config.json").read_text())["train"]["seed"] == 5

  # config.train.init_from takes the same path: training both for 2 steps is bitwise equal
  train_and_evaluate(cfg, start, one_device)
  ft = tmp_path / "ft"
  train_and_evaluate(load_config("configs/dense.py:tiny", **{
      **{k: v for k, v in _flat(cfg).items()}, "train.init_from": f"{src}:{STEPS}"}), ft,
      one_device)
  a, b = state_at(start, cfg, 2, one_device), state_at(ft, cfg, 2, one_device)
  jax.tree.map(np.testing.assert_array_equal, a["params"], b["params"])
  assert not np.array_equal(a["params"]["embed_VxD"], src_params["embed_VxD"])

  # the run's own checkpoint wins on resume; configs/workdir.py reads the run's config back
  assert load_config(f"configs/workdir.py:{ft}") == load_config(
      "configs/dense.py:tiny", **{**_flat(cfg), "train.init_from": f"{src}:{STEPS}"})

  # a model of another shape: one line naming the first parameter that differs
  wide = tiny(**{"model.d_model": 32, "model.num_heads": 2, "model.num_kv_heads": 1,
                 "train.init_from": str(src)})
  with pytest.raises(CheckpointError, match=r"init_from=.*parameter blocks/0/.* is shape"):
    train_and_evaluate(wide, tmp_path / "wide", one_device)
  # nothing was written for the refused run
  assert not list((tmp_path / "wide").glob("checkpoints/*"))
  with pytest.raises(ConfigError, match="already holds a run"):
    write_start_checkpoint(cfg, start, functools.partial(init_from.load_params, str(src)),
                           one_device)


def _flat(cfg):
  """The dotted overrides that rebuild ``cfg`` from configs/dense.py:tiny (train section)."""
  return {f"train.{k}": v for k, v in json.loads(cfg.to_json())["train"].items()
          } | {"optim.warmup_steps": cfg.optim.warmup_steps}


def test_missing_source_and_step_are_one_line_errors(tmp_path, default_dataset, one_device):
  with pytest.raises(FileNotFoundError, match="has no checkpoints/"):
    train_and_evaluate(tiny(**{"train.init_from": str(tmp_path / "nope")}), tmp_path / "a",
                       one_device)
  with pytest.raises(FileNotFoundError, match="nope/config.json does not exist"):
    load_config(f"configs/workdir.py:{tmp_path / 'nope'}")
  assert init_from.parse_source("runs/a:20") == (init_from.pathlib.Path("runs/a"), 20)
  assert init_from.parse_source("runs/a") == (init_from.pathlib.Path("runs/a"), None)
  assert init_from.parse_source("C:/x") == (init_from.pathlib.Path("C:/x"), None)


def test_host_to_device_places_slices_and_names_bad_leaves():
  cfg = tiny(**{"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2})
  devices = jax.devices()[:4]
  spec = model_spec(cfg, 257)
  shardings = param_shardings(spec, make_mesh(cfg.mesh, devices))
  rng = np.random.default_rng(0)
  host = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float64),
                      spec.abstract_params)
  placed = init_from.host_to_device(host, spec, shardings)
  for (path, x), h, sh in zip(jax.tree_util.tree_leaves_with_path(placed),
                              jax.tree.leaves(host), jax.tree.leaves(shardings)):
    assert x.dtype == np.float32 and x.sharding == sh, path
    np.testing.assert_array_equal(np.asarray(x), h.astype(np.float32))
  sharded = [x for x in jax.tree.leaves(placed) if not x.sharding.is_fully_replicated]
  assert sharded  # something is split, so slices (not whole arrays) went to devices

  missing = {k: v for k, v in host.items() if k != "embed_VxD"}
  with pytest.raises(ValueError, match=r"parameter embed_VxD \(384, 64\) is missing"):
    init_from.host_to_device(missing, spec, shardings)
  with pytest.raises(ValueError, match="host parameter extra is not a parameter"):
    init_from.host_to_device({**host, "extra": np.zeros(3)}, spec, shardings)
  bad = {**host, "embed_VxD": np.zeros((10, 64))}
  with pytest.raises(ValueError, match=r"embed_VxD has shape \(10, 64\); this model needs"):
    init_from.host_to_device(bad, spec, shardings)
