"""LoRA (Hu et al. 2021) as an optax wrapper whose state holds the adapters.

For each target W (sparsejax/finetune/targets.py), seen as [adapters, in, out]:

    W_eff = W + s · A B,   s = lora_alpha / lora_rank,
    A [.., in, r] ~ N(0, 1/in),   B [.., r, out] = 0

so step 0 computes exactly the base model (W + 0 = W). The adapters and their AdamW state live
in the optimizer state (like weight sparsity's masks): checkpoints save them, a resume is
bitwise, and the params tree keeps the base model's structure, so ``config.train.init_from``
loads a base run unchanged. The train step's forward sees ``merged`` weights; with W frozen and
W_eff = W + s A B, the gradient the step computes for W is dL/dW_eff = G, from which the wrapper
forms the adapter gradients

    dL/dA = s · G Bᵀ,   dL/dB = s · Aᵀ G

runs the adapters' optimizer (the main lr schedule, ``optim.weight_decay``, ``optim.grad_clip``
over the adapters) and returns zero updates for every parameter: the base weights never change
and hold no Adam moments. Eval and export see the merged weights (``merged``). Adapters shard
like their weight: A takes the weight's input axes, B its output axes (``shardings``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from sparsejax.config import Config
from sparsejax.finetune.targets import LoraTarget, find_lora_targets
from sparsejax.layers import registry
from sparsejax.parallel.sharding import logical_to_spec
from sparsejax.sparsity.targets import at_path, nested

HIGHEST = jax.lax.Precision.HIGHEST  # no TF32 / bf16 passes on the small adapter products
SEED_OFFSET = 2  # adapter init key: train.seed + 2 (the model uses seed, the step RNG seed + 1)


class LoraState(NamedTuple):
  adapters: dict   # a sub-tree of the params: each target path -> {"a": A, "b": B}
  inner: Any       # the adapters' optimizer state


def scale(cfg: Config) -> float:
  return cfg.finetune.lora_alpha / cfg.finetune.lora_rank




def replace_leaves(params: dict, paths, values) -> dict:
  """A copy of ``params`` with the leaves at ``paths`` replaced (other leaves shared)."""
  new = dict(params)
  for path, v in zip(paths, values):
    node, src = new, params
    for k in path[:-1]:
      src = src[k]
      node[k] = dict(src) if node[k] is src else node[k]
      node = node[k]
    node[path[-1]] = v
  return new


def init_adapters(cfg: Config, targets: list[LoraTarget], params: dict) -> dict:
  r = cfg.finetune.lora_rank
  key = jax.random.key(cfg.train.seed + SEED_OFFSET)
  values = []
  for j, t in enumerate(targets):
    dtype = at_path(params, t.path).dtype
    fan_in = t.sizes()[1]
    a = jax.random.normal(jax.random.fold_in(key, j), t.a_shape(r), jnp.float32) * fan_in ** -0.5
    values.append({"a": a.astype(dtype), "b": jnp.zeros(t.b_shape(r), dtype)})
  return nested([t.path for t in targets], values)


def delta(t: LoraTarget, a, b, s: float):
  """s · A B in the weight's shape (float32)."""
  n, fan_in, fan_out = t.sizes()
  r = a.shape[-1]
  ab = jnp.einsum("nir,nro->nio", a.reshape(n, fan_in, r).astype(jnp.float32),
                  b.reshape(n, r, fan_out).astype(jnp.float32), precision=HIGHEST)
  return (s * ab).reshape(t.shape)


def merged(cfg: Config, params: dict, adapters: dict) -> dict:
  """The weights the adapted model computes with: W + s A B on every target."""
  targets = find_lora_targets(cfg, params)
  s = scale(cfg)
  out = []
  for t in targets:
    w, ad = at_path(params, t.path), at_path(adapters, t.path)
    out.append((w.astype(jnp.float32) + delta(t, ad["a"], ad["b"], s)).astype(w.dtype))
  return replace_leaves(params, [t.path for t in targets], out)


def adapter_grads(t: LoraTarget, g, ad: dict, s: float) -> dict:
  """(dL/dA, dL/dB) from G = dL/dW_eff."""
  n, fan_in, fan_out = t.sizes()
  a, b = ad["a"], ad["b"]
  r = a.shape[-1]
  g3 = g.reshape(n, fan_in, fan_out).astype(jnp.float32)
  a3 = a.reshape(n, fan_in, r).astype(jnp.float32)
  b3 = b.reshape(n, r, fan_out).astype(jnp.float32)
  da = s * jnp.einsum("nio,nro->nir", g3, b3, precision=HIGHEST)
  db = s * jnp.einsum("nir,nio->nro", a3, g3, precision=HIGHEST)
  return {"a": da.reshape(a.shape).astype(a.dtype), "b": db.reshape(b.shape).astype(b.dtype)}


def lora_optimizer(cfg: Config, adapter_tx: optax.GradientTransformation
                   ) -> optax.GradientTransformationExtraArgs:
  """Trains adapters with ``adapter_tx``; every parameter's update is zero (module docstring)."""

  def init(params):
    adapters = init_adapters(cfg, find_lora_targets(cfg, params), params)
    return LoraState(adapters, adapter_tx.init(adapters))

  def update(grads, state: LoraState, params=None, **extra):
    del params, extra
    targets = find_lora_targets(cfg, grads)
    s = scale(cfg)
    g = nested([t.path for t in targets],
               [adapter_grads(t, at_path(grads, t.path), at_path(state.adapters, t.path), s)
                for t in targets])
    u, inner = adapter_tx.update(g, state.inner, state.adapters)
    zeros = jax.tree.map(jnp.zeros_like, grads)
    return zeros, LoraState(optax.apply_updates(state.adapters, u), inner)

  return optax.GradientTransformationExtraArgs(init, update)


def adapter_shardings(cfg: Config, abstract_params: dict, logical_axes: dict, mesh) -> dict:
  """Each adapter's NamedSharding: A by the weight's input axes, B by its output axes."""
  r, rules = cfg.finetune.lora_rank, registry.logical_rules(cfg.mesh)
  targets = find_lora_targets(cfg, abstract_params, logical_axes)

  def sharding(axes, shape):
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))
  return nested([t.path for t in targets],
                [{"a": sharding(t.a_axes(), t.a_shape(r)), "b": sharding(t.b_axes(), t.b_shape(r))}
                 for t in targets])


def opt_shardings(cfg: Config, opt_sh: LoraState, abstract_params: dict, logical_axes: dict,
                  mesh) -> LoraState:
  """``opt_sh`` (the state's shardings, adapters replicated) with every adapter and every
  optimizer leaf mirroring one (same path suffix) sharded like the adapter."""
  ad_sh = adapter_shardings(cfg, abstract_params, logical_axes, mesh)
  by_path = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(ad_sh)}

  def pick(path, current):
    key = jax.tree_util.keystr(path)
    return next((s for k, s in by_path.items() if key.endswith(k)), current)
  return LoraState(ad_sh, jax.tree_util.tree_map_with_path(pick, opt_sh.inner))
