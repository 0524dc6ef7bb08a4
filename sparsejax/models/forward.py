"""The model's forward pass as the train and eval steps see it: loss sums over a batch and what
the layers sowed (aux losses, metrics, buffer updates; the protocol is in
sparsejax/layers/registry.py).

With ``config.model.loss_chunk = C > 0`` (read from the model, ``Transformer.loss_chunk``) the
head and the loss run in a scan over sequence chunks of C positions whose body is rematerialised
(nothing saved): per chunk only [B, C, V] float32 logits exist, in the forward and again in the
backward pass, never [B, T, V]. The sums equal the unchunked ones to float32 rounding (the
chunks add in a different order). Eval (sparsejax/eval/core.py) goes through the same path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.models import scan


UPDATE_PREFIX = "update__"  # sown "update__<buffer_x>" is added to the sibling param buffer_x


def collect_sown(intermediates, segments=()):
  """Reduce what layers sowed into (sum of aux losses, {path: value} metrics,
  {param path: additive buffer update}). ``segments``: the model's stacked scan segments; what
  their templates sowed (``scan/<S>/<j>/...``, one value per repeat) is summed into the aux
  loss and named per layer in the metrics, as the layer loop names it."""
  aux = jnp.zeros((), jnp.float32)
  metrics, updates = {}, {}
  for path, var in nnx.to_flat_state(intermediates):
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    value = value[-1] if isinstance(value, tuple) else value
    value = jnp.asarray(value, jnp.float32)
    name = str(path[-1])
    stacked = bool(segments) and path[0] == "scan"
    if name == "aux_loss":
      aux = aux + (jnp.sum(value) if stacked else value)
    if name.startswith(UPDATE_PREFIX):  # a stacked update matches its stacked parameter
      updates[tuple(path[:-1]) + (name[len(UPDATE_PREFIX):],)] = value
    elif stacked:
      for layer_path, v in scan.expand_sown(tuple(path), value, segments):
        metrics["/".join(map(str, layer_path))] = v
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
  targets_BxT = batch["targets"]
  w_BxT = batch.get("weights")
  if w_BxT is None:
    w_BxT = jnp.ones(targets_BxT.shape, jnp.float32)
  chunk = getattr(model, "loss_chunk", 0)
  if chunk:
    x_BxTxD, intermediates = nnx.capture(model.hidden, nnx.Intermediate)(
        model.embed(batch["inputs"]), tokens_BxT=batch["inputs"], rng=rng)
    sums = chunked_sums(model.head_logits, x_BxTxD, targets_BxT, w_BxT, chunk)
  else:
    logits, intermediates = nnx.capture(model, nnx.Intermediate)(batch["inputs"], rng=rng)
    sums = _sums(logits, targets_BxT, w_BxT)
  aux, sown, updates = collect_sown(intermediates, model.scan_segments())
  return sums, aux, sown, updates


def _sums(logits_BxTxV, targets_BxT, w_BxT) -> dict:
  ce_BxT, lse_BxT = token_losses(logits_BxTxV, targets_BxT)
  return {"ce_sum": jnp.sum(ce_BxT * w_BxT), "z_sum": jnp.sum(lse_BxT ** 2 * w_BxT),
          "count": jnp.sum(w_BxT), "correct": jnp.sum(
              (jnp.argmax(logits_BxTxV, -1) == targets_BxT) * w_BxT)}


def chunked_sums(head, x_BxTxD, targets_BxT, w_BxT, chunk: int) -> dict:
  """The `_sums` of ``head(x_BxTxD)`` computed over sequence chunks of ``chunk`` positions in a
  scan; each chunk's head + loss is under jax.checkpoint (nothing saveable), so the backward
  pass recomputes its [B, chunk, V] logits instead of keeping [B, T, V]."""
  b, t, d = x_BxTxD.shape
  if t % chunk:
    raise ValueError(f"config.model.loss_chunk: {chunk} does not divide the sequence length {t}")
  n = t // chunk
  x_NxBxCxD = jnp.moveaxis(x_BxTxD.reshape(b, n, chunk, d), 1, 0)
  y_NxBxC, w_NxBxC = (jnp.moveaxis(a.reshape(b, n, chunk), 1, 0) for a in (targets_BxT, w_BxT))

  @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
  def body(acc, xs):
    x_BxCxD, y_BxC, w_BxC = xs
    part = _sums(head(x_BxCxD), y_BxC, w_BxC)
    return {k: acc[k] + part[k] for k in acc}, None

  zero = jnp.zeros((), jnp.float32)
  sums, _ = jax.lax.scan(body, {k: zero for k in ("ce_sum", "z_sum", "count", "correct")},
                         (x_NxBxCxD, y_NxBxC, w_NxBxC.astype(jnp.float32)))
  return sums
