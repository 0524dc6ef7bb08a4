"""The pure train step over the functional state (see state.py); the eval step is in
sparsejax/eval/core.py.

Loss: token-mean cross-entropy in float32 + ``z_loss * mean(logsumexp^2)`` + the sum of every
``aux_loss`` a layer sowed (averaged over micro-batches). Gradient accumulation runs the
micro-batches with ``lax.scan`` inside the jitted step. A step whose loss or gradient norm is not
finite applies no update (parameters and optimizer state are kept) and is counted.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sparsejax.finetune import hooks as finetune
from sparsejax.models.forward import apply_buffer_updates, forward_sums
from sparsejax.sparsity import hooks as sparsity
from sparsejax.train.optim import lr_schedule


def _rms(x):
  return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


def _per_leaf(fn, tree, prefix: str) -> dict[str, jax.Array]:
  """``fn`` of every leaf, named by its path; a scanned layers' stacked leaf
  (``scan/<start>/<j>/...``) gives one value per layer, named as the layer loop names it."""
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    keys = [getattr(k, "key", k) for k in path]
    if keys[0] != "scan":
      out[prefix + jax.tree_util.keystr(path, simple=True, separator="/")] = fn(x)
      continue
    start, j, period = int(keys[1]), int(keys[2]), len(tree["scan"][keys[1]])
    values = jax.vmap(fn)(x)
    for k in range(x.shape[0]):
      name = "/".join(map(str, ("blocks", start + k * period + j, *keys[3:])))
      out[prefix + name] = values[k]
  return out


def jit_train_step(graphdef, cfg, optimizer: optax.GradientTransformation, state_shardings,
                   batch_sharding):
  """The train step jitted as every caller runs it (loop, sweep measurements, benchmarks):
  state and batch placed by their shardings, metrics replicated, the state donated. Call it
  inside ``activation_sharding`` so the activation constraints apply while it traces."""
  return jax.jit(make_train_step(graphdef, cfg, optimizer),
                 in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, None), donate_argnums=0)


def make_train_step(graphdef, cfg, optimizer: optax.GradientTransformation):
  accum = cfg.train.grad_accum_steps
  z_coef = cfg.model.z_loss
  schedule = lr_schedule(cfg)

  def objective(params, micro, total_count, rng, sparse_state, ft_state):
    if sparse_state is not None:  # weight sparsity: the masked (N:M: SR-STE) weights
      params = sparsity.forward_params(sparsity.make_plan(cfg, params), params, sparse_state)
    if ft_state is not None:  # LoRA: W + s A B (adapters from the optimizer state)
      params = finetune.forward_params(cfg, params, ft_state)
    sums, aux, sown, updates = forward_sums(graphdef, params, micro, z_coef, rng)
    sown = finetune.filter_sown(cfg, sown)  # no usage* counts (sparse_memory: the slot counts)
    loss = (sums["ce_sum"] + z_coef * sums["z_sum"]) / total_count + aux / accum
    return loss, (sums, aux, sown, updates)

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def train_step(state: dict[str, Any], batch: dict[str, jax.Array]):
    params = state["params"]
    sparse_state = sparsity.find_state(state["opt_state"])
    ft_state = finetune.forward_state(state["opt_state"])
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    b = batch["inputs"].shape[0]
    total_count = jnp.asarray(b * batch["inputs"].shape[1], jnp.float32)
    if accum == 1:
      (loss, (sums, aux, sown, updates)), grads = grad_fn(params, batch, total_count, step_rng,
                                                       sparse_state, ft_state)
    else:
      micro = jax.tree.map(lambda x: x.reshape(accum, b // accum, *x.shape[1:]), batch)

      def run(i, mb):
        return grad_fn(params, mb, total_count, jax.random.fold_in(step_rng, i), sparse_state,
                       ft_state)

      def body(carry, xs):
        i, mb = xs
        (l, (s, a, sw, up)), g = run(i, mb)
        return jax.tree.map(jnp.add, carry, (l, s, a, sw, up, g)), None

      (l0, (s0, a0, sw0, up0)), g0 = run(0, jax.tree.map(lambda x: x[0], micro))
      rest = (jnp.arange(1, accum), jax.tree.map(lambda x: x[1:], micro))
      (loss, sums, aux, sown, updates, grads), _ = jax.lax.scan(
          body, (l0, s0, a0, sw0, up0, g0), rest)
      aux, sown, updates = aux / accum, *jax.tree.map(lambda v: v / accum, (sown, updates))

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    extra, sown = finetune.update_args(cfg, sown)  # sparse_memory: slot counts -> optimizer
    opt_updates, new_opt = optimizer.update(grads, state["opt_state"], params, **extra)
    new_params = apply_buffer_updates(optax.apply_updates(params, opt_updates),
                                      finetune.buffer_updates(cfg, updates))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    in_a_row = jnp.where(finite, 0, state["nonfinite_in_a_row"] + 1)
    new_state = {**state,
                 "params": keep(new_params, params),
                 "opt_state": keep(new_opt, state["opt_state"]),
                 "step": state["step"] + 1,
                 "nonfinite_total": state["nonfinite_total"] + (~finite).astype(jnp.int32),
                 "nonfinite_in_a_row": in_a_row}
    ce = sums["ce_sum"] / sums["count"]
    metrics = {"loss": loss, "ce_loss": ce, "z_loss": sums["z_sum"] / sums["count"],
               "aux_loss": aux, "accuracy": sums["correct"] / sums["count"],
               "grad_norm": grad_norm,
               # the optimizer counts applied updates only (skipped steps do not advance it)
               "lr": schedule(state["step"] - state["nonfinite_total"]),
               "update_skipped": (~finite).astype(jnp.float32),
               "nonfinite_in_a_row": in_a_row, "nonfinite_total": new_state["nonfinite_total"],
               **{f"sown/{k}": v for k, v in sown.items()},
               **_per_leaf(_rms, new_params, "param_rms/"),
               **_per_leaf(_rms, opt_updates, "update_rms/")}
    metrics.update(finetune.metrics(new_state["opt_state"]))
    new_sparse = sparsity.find_state(new_state["opt_state"])
    if new_sparse is not None:
      metrics.update(sparsity.metrics(sparsity.make_plan(cfg, params), new_sparse,
                                      new_state["params"]))
    return new_state, metrics

  return train_step


def compiled_flops(jitted, *args, compiler_options: dict | None = None) -> float:
  """FLOPs of one call of `jitted` on `args` by XLA's cost analysis of the compiled program, per
  device. A loop body (lax.scan, e.g. gradient accumulation) is counted once per unrolled copy,
  not times its trip count."""
  cost = jitted.lower(*args).compile(compiler_options).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))
