"""Scanned layers: runs of identical blocks stored stacked and executed by one ``jax.lax.scan``
body, so neither the traced program nor the optimizer update grows with depth, and under FSDP
XLA gathers each layer's weights inside the loop body and frees them every iteration.

``config.model.scan_layers = True`` (off by default; on in the 8b / 70b-class presets, where the
layer loop lets XLA keep every layer's all-gathered FSDP weights alive: dense 70b on v5p-256 at
1 x 8192 tokens per chip is refused looped, 158.5 GiB of temporaries, and fits scanned at 47.3
GiB). Compile time is flat in depth (dense 1.3b shape on v5p-8: 70.6 CPU-s at 24 layers, 70.4
at 80; the loop 121.9 and 265.8; docs/compile_check.md).

Plan (``plan(blocks)``, once at model build): each block gets a signature (its NNX graph
definition plus its leaves' shapes and dtypes). Greedily from the first layer, the period
P <= ``MAX_PERIOD`` whose consecutive repeats cover the most layers becomes one scanned segment
of R >= 2 repeats of P blocks (a cycling ``pattern`` of P layer types is one segment with a
P-block body); layers that do not repeat (``ffn.first_k_dense``, ``ffn.overrides``) run as in
the loop. A block that holds a variable another block also holds (the memory family's shared
value pool) never scans: stacking would give each layer its own copy.

Storage (``stack_blocks``, the train layout; ``sparsejax/models/layout.py`` converts pure dicts):
the model is built per layer exactly as the loop builds it (same initial values), then the P
blocks of a segment that starts at layer S become ``scan/<S>/<j>`` (j < P) whose every parameter
is the stack of its R layers' values, [R, ...] with the logical axis "layers" (never sharded);
``blocks/<i>`` stays for the layers that are not scanned. The layout describes itself: layer
``S + k * P + j`` is repeat k of ``scan/<S>/<j>``.

Each block inside the body is called as the loop calls it: same RMS norms, same per-layer key
``fold_in(rng, layer)``, the configured remat policy around every block. What it sowed comes out
of the scan stacked over repeats and is sown on the template (``scan/<S>/<j>/...``): buffer
updates then match their stacked parameters, and ``forward.collect_sown`` gives aux losses and
metrics the per-layer names the loop gives them (``expand_sown``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

MAX_PERIOD = 8  # longest layer-pattern cycle looked for
LAYERS_AXIS = "layers"  # logical axis of the repeat dimension of stacked parameters


@dataclasses.dataclass(frozen=True)
class Segment:
  """Layers ``start .. start + period * repeats - 1``; ``repeats == 1`` runs them as a loop."""
  start: int
  period: int
  repeats: int

  @property
  def stop(self) -> int:
    return self.start + self.period * self.repeats

  def layer(self, k: int, j: int) -> int:
    """The layer that is repeat ``k`` of body block ``j``."""
    return self.start + k * self.period + j


def _signature(block: nnx.Module):
  graphdef, state = nnx.split(block)
  leaves = tuple((p, tuple(v.shape), str(v.dtype))
                 for p, v in jax.tree_util.tree_leaves_with_path(state))
  return graphdef, leaves


def _shared_ids(blocks) -> set[int]:
  """ids of variables that more than one block holds."""
  seen: dict[int, int] = {}
  for i, block in enumerate(blocks):
    for _, node in nnx.iter_graph(block):
      if isinstance(node, nnx.Variable):
        seen.setdefault(id(node), i)
        if seen[id(node)] != i:
          seen[id(node)] = -1
  return {k for k, v in seen.items() if v == -1}


def plan(blocks) -> tuple[Segment, ...]:
  """The scan segments of ``blocks`` (see the module docstring)."""
  shared = _shared_ids(blocks)
  sigs = []
  for i, block in enumerate(blocks):
    holds_shared = any(isinstance(n, nnx.Variable) and id(n) in shared
                       for _, n in nnx.iter_graph(block))
    sigs.append(("unique", i) if holds_shared else _signature(block))
  segments, i, n = [], 0, len(blocks)
  while i < n:
    best = (1, 1)  # (layers covered, period)
    for p in range(1, min(MAX_PERIOD, (n - i) // 2) + 1):
      r = 1
      while i + (r + 1) * p <= n and sigs[i + r * p:i + (r + 1) * p] == sigs[i:i + p]:
        r += 1
      if r >= 2 and r * p > best[0]:
        best = (r * p, p)
    covered, p = best
    segments.append(Segment(i, p, covered // p) if covered > 1 else Segment(i, 1, 1))
    i += covered
  return tuple(_merge_loops(segments))


def _merge_loops(segments):
  """Adjacent unscanned layers become one loop segment (period = its length, 1 repeat)."""
  out: list[Segment] = []
  for s in segments:
    if out and s.repeats == 1 and out[-1].repeats == 1:
      last = out.pop()
      s = Segment(last.start, last.period + s.period, 1)
    out.append(s)
  return out


def _variables(block: nnx.Module) -> list[nnx.Variable]:
  return [n for _, n in nnx.iter_graph(block) if isinstance(n, nnx.Variable)]


def stack_blocks(blocks: nnx.List, segments) -> nnx.List:
  """In place: every scanned segment's blocks leave ``blocks`` (None there) and come back as
  ``out[start] = nnx.List(P templates)`` whose variables hold the R repeats stacked. Returns
  ``out`` (length ``len(blocks)``, None where no segment starts)."""
  out: list = [None] * len(blocks)
  for seg in segments:
    if seg.repeats < 2:
      continue
    templates = []
    for j in range(seg.period):
      members = [_variables(blocks[seg.layer(k, j)]) for k in range(seg.repeats)]
      for n, var in enumerate(members[0]):
        var.set_value(jnp.stack([m[n].get_value() for m in members]))
        axes = var.get_metadata().get("logical_axes")
        if axes is not None:
          var.set_metadata(logical_axes=(LAYERS_AXIS, *axes))
      templates.append(blocks[seg.start + j])
    for layer in range(seg.start, seg.stop):
      blocks[layer] = None
    out[seg.start] = nnx.List(templates)
  return nnx.List(out)


def _resow(block: nnx.Module, intermediates) -> None:
  """Sow ``intermediates`` (a captured State of one block, leaves stacked over repeats) again
  on ``block``'s modules, unchanged."""
  for path, var in nnx.to_flat_state(intermediates):
    module = block
    for key in path[:-1]:
      module = module[key] if isinstance(key, int) else getattr(module, key)
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    for v in value if isinstance(value, tuple) else (value,):
      module.sow(nnx.Intermediate, str(path[-1]), v, capture_noop=True)


def run_stacked(templates, seg: Segment, call, x_BxTxD, rng):
  """Layers ``seg`` from their stacked ``templates`` in one scan. ``call(block, x, layer_rng)
  -> x`` is how the loop calls one block (remat included); the same function runs inside the
  body on the repeat's slice of every parameter."""
  p, r = seg.period, seg.repeats
  split = [nnx.split(t) for t in templates]
  graphdefs, states = [g for g, _ in split], [s for _, s in split]
  layers_RxP = jnp.arange(seg.start, seg.stop, dtype=jnp.int32).reshape(r, p)

  def body(x, xs):
    states_p, layers_P = xs
    sown = []
    for j in range(p):
      block = nnx.merge(graphdefs[j], states_p[j])
      layer_rng = None if rng is None else jax.random.fold_in(rng, layers_P[j])
      x, inter = nnx.capture(call, nnx.Intermediate)(block, x, layer_rng)
      sown.append(inter)
    return x, sown

  x_BxTxD, sown = jax.lax.scan(body, x_BxTxD, (states, layers_RxP))
  for j in range(p):
    _resow(templates[j], sown[j])
  return x_BxTxD


def expand_sown(path: tuple, value_R, segments) -> list[tuple[tuple, jax.Array]]:
  """A value sown under ``scan/<S>/<j>/...`` ([R, ...], one per repeat) -> the per-layer
  (``blocks/<layer>/...`` path, value) pairs the layer loop would have sown."""
  seg = next(s for s in segments if s.start == int(path[1]) and s.repeats > 1)
  j, rest = int(path[2]), tuple(path[3:])
  return [(("blocks", seg.layer(k, j)) + rest, value_R[k]) for k in range(seg.repeats)]
