"""The model's forward pass as the train and eval steps see it: loss sums over a batch and what
the layers sowed (aux losses, metrics, buffer updates; the protocol is in
sparsejax/layers/registry.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


UPDATE_PREFIX = "update__"  # sown "update__<buffer_x>" is added to the sibling param buffer_x


def collect_sown(intermediates):
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


def apply_buffer_updates(params: dict, updates: dict) -> dict:
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
  aux, sown, updates = collect_sown(intermediates)
  sums = {"ce_sum": jnp.sum(ce_BxT * w_BxT), "z_sum": jnp.sum(lse_BxT ** 2 * w_BxT),
          "count": jnp.sum(w_BxT), "correct": jnp.sum(
              (jnp.argmax(logits, -1) == batch["targets"]) * w_BxT)}
  return sums, aux, sown, updates
