"""MoE dispatch: capacity buffers (with expert parallelism over the ``expert`` mesh axis),
expert-choice buffers, and dropless sorted grouped matmuls (ragged_dot or the Pallas grouped
matmul, per batch shard). The router math is in routers.py, the layer in moe.py."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kernels_pallas.grouped_matmul.ops import grouped_matmul
from sparsejax.layers import kernel_impl
from sparsejax.parallel import sharding


def capacity(capacity_factor: float, seq_len: int, top_k: int, num_experts: int) -> int:
  """Slots per expert and sequence: min(T, ceil(cf * T * k / E)) (an expert sees a token once)."""
  return max(1, min(seq_len, math.ceil(capacity_factor * seq_len * top_k / num_experts)))


def _swiglu_buffers(buf_GxExCxD, wg, wu, wd, act, dt):
  g = jnp.einsum("gecd,edf->gecf", buf_GxExCxD, wg.astype(dt))
  u = jnp.einsum("gecd,edf->gecf", buf_GxExCxD, wu.astype(dt))
  return jnp.einsum("gecf,efd->gecd", act(g) * u, wd.astype(dt))


def _experts(buf_GxExCxD, wg, wu, wd, act, dt, axis_name):
  """Run expert e on buffer rows [:, e]. Under expert parallelism (axis_name set, weights are the
  local E/ep experts) buffers go to the devices owning their experts and back."""
  if axis_name is None:
    return _swiglu_buffers(buf_GxExCxD, wg, wu, wd, act, dt)
  recv = jax.lax.all_to_all(buf_GxExCxD, axis_name, split_axis=1, concat_axis=0, tiled=True)
  out = _swiglu_buffers(recv, wg, wu, wd, act, dt)  # [ep * G_local, E_local, C, D]
  return jax.lax.all_to_all(out, axis_name, split_axis=0, concat_axis=1, tiled=True)


def capacity_local(x_GxTxD, expert_GxTxK, slot_GxTxK, gate_GxTxK, wg, wu, wd, *, num_experts,
                    cap, act, dt, axis_name=None):
  g, t, d = x_GxTxD.shape
  k = expert_GxTxK.shape[-1]
  keep = slot_GxTxK < cap
  dest_GxTK = jnp.where(keep, expert_GxTxK * cap + slot_GxTxK, num_experts * cap).reshape(g, t * k)
  x_GxTKxD = jnp.broadcast_to(x_GxTxD[:, :, None], (g, t, k, d)).reshape(g, t * k, d)
  scatter = jax.vmap(lambda dest, xs: jnp.zeros((num_experts * cap + 1, d), dt).at[dest].add(xs))
  buf = scatter(dest_GxTK, x_GxTKxD.astype(dt))[:, :-1].reshape(g, num_experts, cap, d)
  out = _experts(buf, wg, wu, wd, act, dt, axis_name).reshape(g, num_experts * cap, d)
  out = jnp.concatenate([out, jnp.zeros((g, 1, d), out.dtype)], axis=1)  # dropped -> zeros
  y_GxTKxD = jax.vmap(lambda o, dest: o[dest])(out, dest_GxTK)
  gate = jnp.where(keep, gate_GxTxK, 0.0).astype(dt)
  return jnp.einsum("gtkd,gtk->gtd", y_GxTKxD.reshape(g, t, k, d), gate)


def expert_choice_local(x_GxTxD, tok_GxExC, gate_GxExC, wg, wu, wd, *, act, dt, axis_name=None):
  buf = jax.vmap(lambda x, tok: x[tok])(x_GxTxD.astype(dt), tok_GxExC)  # [G, E, C, D]
  out = _experts(buf, wg, wu, wd, act, dt, axis_name) * gate_GxExC[..., None].astype(dt)
  g, t, d = x_GxTxD.shape
  combine = jax.vmap(lambda tok, o: jnp.zeros((t, d), dt).at[tok.reshape(-1)].add(
      o.reshape(-1, d)))
  return combine(tok_GxExC, out)


def dropless(x_NxD, expert_NxK, gate_NxK, wg, wu, wd, *, num_experts, act, dt, impl="xla",
             tensor_axis=None):
  """Sort assignments by expert, grouped matmuls, unsort, combine with the gates.

  impl "xla": ``jax.lax.ragged_dot``; else kernels_pallas grouped_matmul with that impl
  ("pallas" / "interpret": Triton, "mosaic" / "mosaic_interpret": TPU; kernel_impl.resolve).
  ``tensor_axis``: inside shard_map with the expert hidden dimension F split over that mesh axis
  (wg / wu column shards, wd row shards), the partial outputs are summed over it.
  """
  n, k = expert_NxK.shape
  flat_e = expert_NxK.reshape(-1)
  order = jnp.argsort(flat_e, stable=True)
  xs = x_NxD.astype(dt)[order // k]
  sizes_E = jnp.zeros((num_experts,), jnp.int32).at[flat_e].add(1)
  if impl == "xla":
    mm = lambda a, w: jax.lax.ragged_dot(a, w.astype(dt), sizes_E)
  else:
    mm = lambda a, w: grouped_matmul(a, w.astype(dt), sizes_E, impl=impl)
  h = act(mm(xs, wg)) * mm(xs, wu)
  ys = mm(h, wd)
  if tensor_axis is not None:
    ys = jax.lax.psum(ys, tensor_axis)
  y_NKxD = jnp.zeros_like(ys).at[order].set(ys)
  return jnp.einsum("nkd,nk->nd", y_NKxD.reshape(n, k, -1), gate_NxK.astype(dt))


def dropless_sharded(x_NxD, expert_NxK, gate_NxK, wg, wu, wd, **kw):
  """``dropless`` with a kernel impl: per batch shard (tokens are sorted within a shard), the
  expert hidden dimension split over the mesh axis of "expert_mlp" (Megatron-style)."""
  rows = kernel_impl.batch_axis(x_NxD.shape[0])
  f_axis = kernel_impl.mesh_axis("expert_mlp", wg.shape[-1])
  tok = P(rows, None)
  fn = kernel_impl.per_shard(
      lambda *a: dropless(*a, tensor_axis=f_axis, **kw),
      in_specs=(tok, tok, tok, P(None, None, f_axis), P(None, None, f_axis),
                P(None, f_axis, None)),
      out_specs=tok)
  return fn(x_NxD, expert_NxK, gate_NxK, wg, wu, wd)


def ep_mesh(num_experts: int, batch: int):
  """(mesh, batch PartitionSpec entry) when expert parallelism applies to this call, else None."""
  active = sharding.active_mesh_rules()
  if active is None:
    return None
  mesh, rules = active
  ep = mesh.shape.get("expert", 1)
  if ep <= 1 or num_experts % ep:
    return None
  batch_axes = sharding.batch_sharding(mesh, rules).spec[0]
  if batch % sharding.batch_shards(mesh, rules):
    return None
  return mesh, batch_axes

