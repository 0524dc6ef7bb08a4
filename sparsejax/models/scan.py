"""Scanned layers: runs of identical blocks executed by one ``jax.lax.scan`` body instead of one
traced copy per layer, so the traced program stops growing with depth and, under FSDP, XLA
gathers each layer's weights inside the loop body and frees them every iteration.

``config.model.scan_layers = True`` (off by default; on in the 8b / 70b-class presets, where the
layer loop lets XLA keep every layer's all-gathered FSDP weights alive: dense 70b on v5p-256 needs
158.5 GiB per chip looped, 60.8 GiB scanned). Parameters are stored exactly as in the
layer loop (``blocks/<i>/...``, one array per layer): a checkpoint, `init_from`, HF conversion,
upcycling, weight sparsity and LoRA all see the same state either way, and a run may switch on
resume. Inside the step the blocks of a run are stacked ([R, ...] per leaf) and the scan slices
them. Measured (benchmarks/scan_compile.py, docs/compile_check.md "Scanned layers"): the traced
program no longer grows with depth and XLA:CPU compiles the 80-layer gradient in half the time,
but the stacked copy of the parameters and of their gradient cost 2 x the blocks' parameter
bytes per device, and XLA:TPU compiles the full train step no faster at 24 layers and slower at
80 (the per-layer stack / unstack). Storing the scanned blocks stacked removes both costs; that is
the next step, not done here.

Plan (``plan(blocks)``, once at model build): each block gets a signature (its NNX graph
definition plus its leaves' shapes and dtypes). Greedily from the first layer, the period
P <= ``MAX_PERIOD`` whose consecutive repeats cover the most layers becomes one scanned segment
of R >= 2 repeats of P blocks (a cycling ``pattern`` of P layer types is one segment with a
P-block body); layers that do not repeat (``ffn.first_k_dense``, ``ffn.overrides``) run as in
the loop. A block that holds a variable another block also holds (the memory family's shared
value pool) never scans: stacking would give each layer its own copy.

Each block inside the body is called as the loop calls it: same RMS norms, same per-layer key
``fold_in(rng, layer)``, the configured remat policy around every block, and what it sowed is
returned by the scan and sown again on the real block, so `forward_sums` sees the same metrics,
aux losses and buffer updates under the same paths.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

MAX_PERIOD = 8  # longest layer-pattern cycle looked for


@dataclasses.dataclass(frozen=True)
class Segment:
  """Layers ``start .. start + period * repeats - 1``; ``repeats == 1`` runs them as a loop."""
  start: int
  period: int
  repeats: int

  @property
  def stop(self) -> int:
    return self.start + self.period * self.repeats


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


def _resow(block: nnx.Module, intermediates, index) -> None:
  """Sow ``intermediates`` (a captured State of one block, leaves stacked over repeats) again
  on ``block``'s modules, taking repeat ``index`` of every value."""
  for path, var in nnx.to_flat_state(intermediates):
    module = block
    for key in path[:-1]:
      module = module[key] if isinstance(key, int) else getattr(module, key)
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
      module.sow(nnx.Intermediate, str(path[-1]), v[index], capture_noop=True)


def run_segment(blocks, seg: Segment, call, x_BxTxD, rng):
  """Run layers ``seg`` of ``blocks`` in a scan. ``call(block, x, layer_rng) -> x`` is how the
  loop calls one block (remat included); the same function runs inside the body."""
  p, r = seg.period, seg.repeats
  graphdefs, states = [], []
  for j in range(p):
    split = [nnx.split(blocks[seg.start + k * p + j]) for k in range(r)]
    graphdefs.append(split[0][0])
    states.append(jax.tree.map(lambda *xs: jnp.stack(xs), *(s for _, s in split)))
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
  for k in range(r):
    for j in range(p):
      _resow(blocks[seg.start + k * p + j], sown[j], k)
  return x_BxTxD
