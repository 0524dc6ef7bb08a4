"""The functional train state and its shardings.

The whole state is one pytree of arrays (a plain dict), so jit, donation and Orbax see exactly
what the step needs:

    {"params": <pure dict>, "opt_state": <optax state>, "step": int32[],
     "rng": uint32[2], "nonfinite_total": int32[], "nonfinite_in_a_row": int32[]}

``rng`` is the run's base key; per-step randomness is ``fold_in(rng, step)`` so that resume is
exact without saving a key per step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sparsejax.config import Config
from sparsejax.finetune import hooks as finetune
from sparsejax.layers import registry
from sparsejax.models import layout
from sparsejax.models.transformer import Transformer, build_model, build_train_model
from sparsejax.parallel.sharding import logical_to_spec
from sparsejax.sparsity import hooks as sparsity, targets as sparse_targets
from sparsejax.train.optim import make_optimizer


@dataclasses.dataclass
class ModelSpec:
  """Everything static about a model: graph, abstract params, their logical axes.

  ``graphdef`` / ``abstract_params`` / ``logical_axes`` are the train layout (what the train
  state, checkpoints and the steps hold: with config.model.scan_layers the scanned segments
  stacked, ``scan/<start>/<j>``); ``abstract_model`` is the model per layer (``blocks/<i>``, what
  accounting reads). ``to_canonical`` / ``to_train`` convert params (or a whole state) between
  the two (identity without scanned segments)."""
  cfg: Config
  vocab_size: int                 # dataset vocabulary (before padding)
  graphdef: Any
  abstract_model: Transformer     # parameters are ShapeDtypeStructs, one block per layer
  abstract_params: dict           # pure dict of ShapeDtypeStruct
  logical_axes: dict              # pure dict of tuples (same structure as params)
  segments: tuple = ()            # scanned segments stored stacked (models/scan.py)

  def to_train(self, tree):
    return layout.to_train(tree, self.segments)

  def to_canonical(self, tree):
    return layout.to_canonical(tree, self.segments)


def model_spec(cfg: Config, vocab_size: int) -> ModelSpec:
  abstract = nnx.eval_shape(lambda: build_model(cfg, vocab_size))
  train = (nnx.eval_shape(lambda: build_train_model(cfg, vocab_size))
           if abstract.scan_segments(planned=True) else abstract)
  graphdef, state = nnx.split(train)
  logical: dict = {}
  for path, var in nnx.to_flat_state(nnx.split(train, nnx.Param)[1]):
    axes = var.get_metadata().get("logical_axes")
    if axes is None:
      raise ValueError(f"parameter {'/'.join(map(str, path))} has no logical axes; "
                       "create it with nnx.Param(..., logical_axes=(...))")
    node = logical
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = tuple(axes)
  params = nnx.to_pure_dict(state)
  if jax.tree.structure(params) != jax.tree.structure(
      logical, is_leaf=lambda x: isinstance(x, tuple)):
    raise ValueError("only nnx.Param variables may hold model state (found other variables)")
  return ModelSpec(cfg, vocab_size, graphdef, abstract, params, logical, train.scan_segments())


def param_shardings(spec: ModelSpec, mesh: Mesh) -> dict:
  rules = registry.logical_rules(spec.cfg.mesh)
  return jax.tree.map(
      lambda x, axes: NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules)),
      spec.abstract_params, spec.logical_axes, is_leaf=lambda x: isinstance(x, tuple))


def _opt_shardings(opt_state_shape, params_shape, p_shardings, mesh):
  """Optimizer moments mirror the parameters; everything else (counts) is replicated."""
  by_path = {jax.tree_util.keystr(p): (x.shape, s) for (p, x), s in zip(
      jax.tree_util.tree_leaves_with_path(params_shape), jax.tree.leaves(p_shardings))}

  def pick(path, x):
    key = jax.tree_util.keystr(path)
    for pkey, (shape, sharding) in by_path.items():
      if key.endswith(pkey) and tuple(x.shape) == tuple(shape):
        return sharding
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(pick, opt_state_shape)


def state_shardings(spec: ModelSpec, mesh: Mesh, optimizer: optax.GradientTransformation):
  p_sh = param_shardings(spec, mesh)
  if spec.cfg.sparsity.method != "none":  # N:M groups must not straddle a shard boundary
    sparse_targets.check_shards(spec.cfg, sparse_targets.find_targets(
        spec.cfg, spec.abstract_params), p_sh, mesh)
  opt_shape = jax.eval_shape(optimizer.init, spec.abstract_params)
  replicated = NamedSharding(mesh, P())
  opt_sh = finetune.opt_shardings(spec.cfg, _opt_shardings(
      opt_shape, spec.abstract_params, p_sh, mesh), spec.abstract_params, spec.logical_axes, mesh)
  return {"params": p_sh,
          "opt_state": opt_sh,
          "step": replicated, "rng": replicated, "nonfinite_total": replicated,
          "nonfinite_in_a_row": replicated}


def init_state(spec: ModelSpec, mesh: Mesh, optimizer=None, params=None):
  """Materialise a fresh train state directly into its shardings (no host-side full copy).
  ``params``: start from these (placed by the state's param shardings; config.train.init_from,
  upcycling, conversion) instead of a random initialisation; the optimizer state is fresh."""
  cfg = spec.cfg
  optimizer = optimizer or make_optimizer(cfg)
  shardings = state_shardings(spec, mesh, optimizer)

  def init(params):
    if params is None:
      params = nnx.to_pure_dict(nnx.split(build_train_model(cfg, spec.vocab_size,
                                                            seed=cfg.train.seed))[1])
    opt_state = optimizer.init(params)
    sparse = sparsity.find_state(opt_state)
    if sparse is not None:  # start from the masks' zeros (random / DST masks)
      params = sparsity.masked_params(sparsity.make_plan(cfg, params), params, sparse)
    return {"params": params, "opt_state": opt_state,
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(cfg.train.seed + 1)).astype(jnp.uint32),
            "nonfinite_total": jnp.zeros((), jnp.int32),
            "nonfinite_in_a_row": jnp.zeros((), jnp.int32)}
  if params is None:
    return jax.jit(lambda: init(None), out_shardings=shardings)(), shardings
  return jax.jit(init, in_shardings=(shardings["params"],), out_shardings=shardings)(
      params), shardings


def abstract_state(spec: ModelSpec, mesh: Mesh, optimizer=None):
  """ShapeDtypeStructs with shardings: the restore target for Orbax (any mesh)."""
  optimizer = optimizer or make_optimizer(spec.cfg)
  shardings = state_shardings(spec, mesh, optimizer)

  def shapes():
    params = spec.abstract_params
    return {"params": params, "opt_state": optimizer.init(params),
            "step": jnp.zeros((), jnp.int32), "rng": jnp.zeros((2,), jnp.uint32),
            "nonfinite_total": jnp.zeros((), jnp.int32),
            "nonfinite_in_a_row": jnp.zeros((), jnp.int32)}
  shape_tree = jax.eval_shape(shapes)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shape_tree, shardings), shardings
