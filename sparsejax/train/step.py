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


def _collect_sown(intermediates) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Reduce what layers sowed: (sum of aux losses, {path: value} metrics)."""
  aux = jnp.zeros((), jnp.float32)
  metrics = {}
  for path, var in nnx.to_flat_state(intermediates):
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    value = value[-1] if isinstance(value, tuple) else value
    value = jnp.asarray(value, jnp.float32)
    if path[-1] == "aux_loss":
      aux = aux + value
    metrics["/".join(map(str, path))] = value
  return aux, metrics


def token_losses(logits_BxTxV, targets_BxT):
  """Per-token cross-entropy and logsumexp, float32."""
  logits = logits_BxTxV.astype(jnp.float32)
  lse_BxT = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
  return lse_BxT - target_logit, lse_BxT


def forward_sums(graphdef, params, batch, z_loss: float):
  """Sums over the batch (so micro-batches add up exactly) and sown values."""
  model = nnx.merge(graphdef, params)
  logits, intermediates = nnx.capture(model, nnx.Intermediate)(batch["inputs"])
  ce_BxT, lse_BxT = token_losses(logits, batch["targets"])
  w_BxT = batch.get("weights")
  if w_BxT is None:
    w_BxT = jnp.ones(ce_BxT.shape, jnp.float32)
  aux, sown = _collect_sown(intermediates)
  sums = {"ce_sum": jnp.sum(ce_BxT * w_BxT), "z_sum": jnp.sum(lse_BxT ** 2 * w_BxT),
          "count": jnp.sum(w_BxT), "correct": jnp.sum(
              (jnp.argmax(logits, -1) == batch["targets"]) * w_BxT)}
  return sums, aux, sown


def _rms(x):
  return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


def _per_leaf(fn, tree, prefix: str) -> dict[str, jax.Array]:
  return {prefix + jax.tree_util.keystr(p, simple=True, separator="/"): fn(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def make_train_step(graphdef, cfg, optimizer: optax.GradientTransformation):
  accum = cfg.train.grad_accum_steps
  z_coef = cfg.model.z_loss
  schedule = lr_schedule(cfg)

  def objective(params, micro, total_count):
    sums, aux, sown = forward_sums(graphdef, params, micro, z_coef)
    loss = (sums["ce_sum"] + z_coef * sums["z_sum"]) / total_count + aux / accum
    return loss, (sums, aux, sown)

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def train_step(state: dict[str, Any], batch: dict[str, jax.Array]):
    params = state["params"]
    b = batch["inputs"].shape[0]
    total_count = jnp.asarray(b * batch["inputs"].shape[1], jnp.float32)
    if accum == 1:
      (loss, (sums, aux, sown)), grads = grad_fn(params, batch, total_count)
    else:
      micro = jax.tree.map(lambda x: x.reshape(accum, b // accum, *x.shape[1:]), batch)

      def body(carry, mb):
        (l, (s, a, sw)), g = grad_fn(params, mb, total_count)
        return jax.tree.map(jnp.add, carry, (l, s, a, sw, g)), None

      first = jax.tree.map(lambda x: x[0], micro)
      (l0, (s0, a0, sw0)), g0 = grad_fn(params, first, total_count)
      rest = jax.tree.map(lambda x: x[1:], micro)
      (loss, sums, aux, sown, grads), _ = jax.lax.scan(body, (l0, s0, a0, sw0, g0), rest)
      aux, sown = aux / accum, jax.tree.map(lambda v: v / accum, sown)

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
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
               **_per_leaf(_rms, updates, "update_rms/")}
    return new_state, metrics

  return train_step


def make_eval_step(graphdef):
  def eval_step(params, batch):
    sums, _, _ = forward_sums(graphdef, params, batch, 0.0)
    return {k: sums[k] for k in ("ce_sum", "count", "correct")}
  return eval_step


def summarize_eval(sums: dict[str, float], bytes_per_token: float) -> dict[str, float]:
  """Token-mean loss (nats), perplexity and bits per UTF-8 byte of the evaluated text."""
  loss = sums["ce_sum"] / max(sums["count"], 1.0)
  return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
          "bits_per_byte": loss / math.log(2) / bytes_per_token,
          "accuracy": sums["correct"] / max(sums["count"], 1.0), "tokens": sums["count"]}
