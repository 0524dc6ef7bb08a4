"""Pure train / eval steps over the functional state (see state.py).

Loss: token-mean cross-entropy in float32 + ``z_loss * mean(logsumexp^2)`` + the sum of every
``aux_loss`` a layer sowed (averaged over micro-batches). Gradient accumulation runs the
micro-batches with ``lax.scan`` inside the jitted step. A step whose loss or gradient norm is not
finite applies no update (parameters and optimizer state are kept) and is counted.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sparsejax.train.optim import lr_schedule


UPDATE_PREFIX = "update__"  # sown "update__<buffer_x>" is added to the sibling param buffer_x


def _collect_sown(intermediates):
  """Reduce what layers sowed into (sum of aux losses, {path: value} metrics,
  {param path: additive buffer update})."""
  aux = jnp.zeros((), jnp.float32)
  metrics, updates = {}, {}
  for path, var in nnx.to_flat_state(intermediates):
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    value = value[-1] if isinstance(value, tuple) else value
    value = jnp.asarray(value, jnp.float32)
    name = str(path[-1])
    if name == "aux_loss":
      aux = aux + value
    if name.startswith(UPDATE_PREFIX):
      updates[tuple(path[:-1]) + (name[len(UPDATE_PREFIX):],)] = value
    else:
      metrics["/".join(map(str, path))] = value
  return aux, metrics, updates


def _apply_buffer_updates(params: dict, updates: dict) -> dict:
  """Add sown buffer updates to their parameters (non-gradient state, e.g. MoE router bias)."""
  if not updates:
    return params
  flat = {tuple(getattr(k, "key", k) for k in p): x
          for p, x in jax.tree_util.tree_leaves_with_path(params)}
  for path, delta in updates.items():
    if path not in flat:
      raise KeyError(f"sown update for {'/'.join(map(str, path))}: no such parameter")
    flat[path] = flat[path] + delta.astype(flat[path].dtype)
  return jax.tree_util.tree_map_with_path(
      lambda p, _: flat[tuple(getattr(k, "key", k) for k in p)], params)


def token_losses(logits_BxTxV, targets_BxT):
  """Per-token cross-entropy and logsumexp, float32."""
  logits = logits_BxTxV.astype(jnp.float32)
  lse_BxT = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
  return lse_BxT - target_logit, lse_BxT


def forward_sums(graphdef, params, batch, z_loss: float, rng=None):
  """Sums over the batch (so micro-batches add up exactly) and sown values. `rng` is a key for
  stochastic layers (training only; None = deterministic)."""
  model = nnx.merge(graphdef, params)
  logits, intermediates = nnx.capture(model, nnx.Intermediate)(batch["inputs"], rng=rng)
  ce_BxT, lse_BxT = token_losses(logits, batch["targets"])
  w_BxT = batch.get("weights")
  if w_BxT is None:
    w_BxT = jnp.ones(ce_BxT.shape, jnp.float32)
  aux, sown, updates = _collect_sown(intermediates)
  sums = {"ce_sum": jnp.sum(ce_BxT * w_BxT), "z_sum": jnp.sum(lse_BxT ** 2 * w_BxT),
          "count": jnp.sum(w_BxT), "correct": jnp.sum(
              (jnp.argmax(logits, -1) == batch["targets"]) * w_BxT)}
  return sums, aux, sown, updates


def _rms(x):
  return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


def _per_leaf(fn, tree, prefix: str) -> dict[str, jax.Array]:
  return {prefix + jax.tree_util.keystr(p, simple=True, separator="/"): fn(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


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

  def objective(params, micro, total_count, rng):
    sums, aux, sown, updates = forward_sums(graphdef, params, micro, z_coef, rng)
    sown = {k: v for k, v in sown.items() if not k.rsplit("/", 1)[-1].startswith("usage")}
    loss = (sums["ce_sum"] + z_coef * sums["z_sum"]) / total_count + aux / accum
    return loss, (sums, aux, sown, updates)

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def train_step(state: dict[str, Any], batch: dict[str, jax.Array]):
    params = state["params"]
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    b = batch["inputs"].shape[0]
    total_count = jnp.asarray(b * batch["inputs"].shape[1], jnp.float32)
    if accum == 1:
      (loss, (sums, aux, sown, updates)), grads = grad_fn(params, batch, total_count, step_rng)
    else:
      micro = jax.tree.map(lambda x: x.reshape(accum, b // accum, *x.shape[1:]), batch)

      def run(i, mb):
        return grad_fn(params, mb, total_count, jax.random.fold_in(step_rng, i))

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
    opt_updates, new_opt = optimizer.update(grads, state["opt_state"], params)
    new_params = _apply_buffer_updates(optax.apply_updates(params, opt_updates), updates)
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
    return new_state, metrics

  return train_step


def make_eval_step(graphdef):
  """Sums for loss / accuracy plus every sown ``usage*`` count vector (key usage)."""
  def eval_step(params, batch):
    sums, _, sown, _ = forward_sums(graphdef, params, batch, 0.0)
    usage = {k: v for k, v in sown.items() if k.rsplit("/", 1)[-1].startswith("usage")}
    return {**{k: sums[k] for k in ("ce_sum", "count", "correct")}, "usage": usage}
  return eval_step


def usage_summary(counts) -> dict[str, float]:
  """Fraction of entries touched and KL(usage || uniform) in nats, for one count vector."""
  counts = jnp.asarray(counts, jnp.float32)
  total = jnp.maximum(counts.sum(), 1.0)
  p = counts / total
  kl = jnp.sum(jnp.where(p > 0, p * jnp.log(p * counts.size), 0.0))
  return {"touched_fraction": float(jnp.mean(counts > 0)), "kl_from_uniform": float(kl)}


def summarize_eval(sums: dict[str, float], bytes_per_token: float) -> dict[str, float]:
  """Token-mean loss (nats), perplexity and bits per UTF-8 byte of the evaluated text."""
  loss = sums["ce_sum"] / max(sums["count"], 1.0)
  return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
          "bits_per_byte": loss / math.log(2) / bytes_per_token,
          "accuracy": sums["correct"] / max(sums["count"], 1.0), "tokens": sums["count"]}
