"""Pure-dict parameter layouts: per layer (``blocks/<i>/...``, what the model is built as and what
conversion, upcycling and export read) and the train layout of scanned layers (``scan/<S>/<j>``
stacks, see sparsejax/models/scan.py). ``to_train`` / ``to_canonical`` convert, given the
model's scan segments, a params dict or every params dict inside a larger tree (the optimizer
state's moments mirror the params), so a whole checkpoint converts in one call.

Leaves may be jax arrays (stacked / sliced by jnp), ShapeDtypeStructs (shapes only), host arrays
(numpy, memmaps, safetensors views: stacked lazily by ``HostStack``, so a device reads only its
own slice of the layers it holds) or per-leaf labels (one label stands for the whole stack).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _is_params(x) -> bool:
  return isinstance(x, dict) and "final_norm" in x and "embed_VxD" in x


class HostStack:
  """Lazy ``np.stack(parts)``: ``shape`` / ``dtype`` and slicing, reading only what is asked."""

  def __init__(self, parts):
    self.parts = list(parts)
    self.shape = (len(self.parts), *self.parts[0].shape)
    self.dtype = self.parts[0].dtype

  def __getitem__(self, idx):
    idx = idx if isinstance(idx, tuple) else (idx,)
    first, rest = idx[0], idx[1:]
    if isinstance(first, int):
      return np.asarray(self.parts[first][rest])
    return np.stack([np.asarray(self.parts[k][rest])
                     for k in range(*first.indices(len(self.parts)))])


def _stack(*xs):
  x = xs[0]
  if not hasattr(x, "shape"):  # a per-leaf label (optimizer group, decay flag): one per stack
    if any(y != x for y in xs):
      raise ValueError(f"to_train: the layers of one scanned stack disagree ({x!r} vs others)")
    return x
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(xs), *x.shape), x.dtype)
  if isinstance(x, jax.Array):
    return jnp.stack(xs)
  return HostStack(xs)


def _unstack(x, r: int) -> list:
  if not hasattr(x, "shape"):
    return [x] * r
  if isinstance(x, jax.ShapeDtypeStruct):
    return [jax.ShapeDtypeStruct(x.shape[1:], x.dtype)] * r
  return [x[k] for k in range(r)]


def _leaf(x) -> bool:  # arrays, ShapeDtypeStructs, HostStacks, lazy host views
  return hasattr(x, "shape") and hasattr(x, "dtype")


def _params_to_train(params: dict, segments) -> dict:
  blocks = dict(params.get("blocks", {}))
  if "scan" in params:
    raise ValueError("to_train: these parameters are already in the scanned (train) layout")
  scan: dict = {}
  for seg in segments:
    if seg.repeats < 2:
      continue
    body = {}
    for j in range(seg.period):
      members = [blocks.pop(seg.layer(k, j)) for k in range(seg.repeats)]
      body[j] = jax.tree.map(_stack, *members, is_leaf=_leaf)
    scan[seg.start] = body
  out = {k: v for k, v in params.items() if k != "blocks"}
  if blocks:
    out["blocks"] = blocks
  out["scan"] = scan
  return out


def _params_to_canonical(params: dict, segments) -> dict:
  if "scan" not in params:
    return params
  blocks = dict(params.get("blocks", {}))
  by_start = {s.start: s for s in segments if s.repeats > 1}
  if set(map(int, params["scan"])) != set(by_start):
    raise ValueError(f"to_canonical: scanned segments at layers {sorted(map(int, params['scan']))}"
                     f" but the model scans at {sorted(by_start)}")
  for start, body in params["scan"].items():
    seg = by_start[int(start)]
    for j, tree in body.items():
      leaves, treedef = jax.tree.flatten(tree, is_leaf=_leaf)
      per_leaf = [_unstack(x, seg.repeats) for x in leaves]
      for k in range(seg.repeats):
        blocks[seg.layer(k, int(j))] = jax.tree.unflatten(treedef, [x[k] for x in per_leaf])
  out = {k: v for k, v in params.items() if k not in ("blocks", "scan")}
  out["blocks"] = dict(sorted(blocks.items()))
  return out


def to_train(tree, segments):
  """Every params dict in ``tree`` from per-layer to stacked storage of ``segments``."""
  if not any(s.repeats > 1 for s in segments):
    return tree
  return jax.tree.map(lambda p: _params_to_train(p, segments) if _is_params(p) else p, tree,
                      is_leaf=_is_params)


def to_canonical(tree, segments):
  """Every params dict in ``tree`` back to per-layer storage (identity where it already is)."""
  return jax.tree.map(lambda p: _params_to_canonical(p, segments) if _is_params(p) else p, tree,
                      is_leaf=_is_params)
