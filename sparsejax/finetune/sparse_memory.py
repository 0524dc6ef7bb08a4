"""Sparse memory finetuning (Lin et al. 2025, "Continual Learning via Sparse Memory Finetuning",
arXiv:2510.15103, Sec. 4): per batch, train only the memory value rows this batch accesses much
more than pretraining batches did.

TF-IDF per value row i of a table, the batch being the "document" and background batches of
pretraining data the "corpus" B:

    tf(i)  = c(i) / sum_j c(j)                   c(i): selections of slot i in this batch, summed
                                                 over every memory layer reading the table
    idf(i) = log((|B| + 1) / (df(i) + 1))        df(i): background batches that selected slot i

(the paper's form as reimplementations quote it; tf's normalisation does not change the
ranking, so rows are ranked by c(i) · idf(i), which also makes gradient accumulation's averaged
counts rank the same). Only rows with c(i) > 0 are eligible; the ``config.finetune.top_t``
highest (ties: lower row first) are selected, per table. A row accessed in every background
batch has idf 0 and so never outranks an unseen row with the same count.

The wrapper (outermost optimizer transform) zeroes the gradients of unselected rows, runs the
value group's AdamW (memory.value_lr, its clip and weight decay) and zeroes the *updates* of
unselected rows too, so Adam momentum and weight decay cannot move a row that was not selected
this step: it stays bitwise equal even when its moments are non-zero. Every other parameter's
update is zero (they are "frozen" for the optimizer, sparsejax/finetune/hooks.py).

Background statistics: an .npz written by ``python -m sparsejax.finetune.background`` with
``num_batches`` (|B|), ``tables`` (table paths such as blocks/1/ffn/values/values_NxD),
``df_<j>`` (int64 [rows] per table) and ``meta`` (JSON: source run, step, data, batches). It is
read when the train step is traced and enters it as a constant; evaluation never reads it.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax.config import Config
from sparsejax.errors import ConfigError
from sparsejax.finetune.targets import counts_key, memory_tables, path_name

BACKGROUND_FILE = "memory_background.npz"


class SparseMemoryState(NamedTuple):
  inner: Any               # the wrapped optimizer's state
  rows_accessed: jax.Array  # int32: value rows the last batch read (all tables)
  rows_updated: jax.Array   # int32: rows selected and updated at the last step


def idf(df, num_batches: int) -> np.ndarray:
  """log((|B| + 1) / (df + 1)), float32."""
  return np.log((num_batches + 1.0) / (np.asarray(df, np.float64) + 1.0)).astype(np.float32)


def scores(counts_N: jax.Array, idf_N: jax.Array) -> jax.Array:
  """c · idf for accessed rows, -inf for rows this batch did not read."""
  c = counts_N.astype(jnp.float32)
  return jnp.where(c > 0, c * idf_N, -jnp.inf)


def select_rows(counts_N: jax.Array, idf_N: jax.Array, top_t: int) -> jax.Array:
  """bool [N]: the top_t accessed rows by TF-IDF."""
  s = scores(counts_N, idf_N)
  top, idx = jax.lax.top_k(s, min(top_t, s.shape[0]))
  return jnp.zeros(s.shape, bool).at[idx].set(top > -jnp.inf)


def background_path(cfg: Config) -> pathlib.Path:
  """``config.finetune.background``, or the init_from run's WORKDIR/memory_background.npz."""
  if cfg.finetune.background:
    return pathlib.Path(cfg.finetune.background)
  path, sep, step = cfg.train.init_from.rpartition(":")
  workdir = path if sep and step.isdigit() and path else cfg.train.init_from
  return pathlib.Path(workdir) / BACKGROUND_FILE


@functools.lru_cache(maxsize=4)
def _load(path: str, mtime_ns: int) -> tuple[int, dict[str, np.ndarray], dict]:
  del mtime_ns  # part of the cache key: a rewritten file is read again
  with np.load(path) as f:
    names = [str(n) for n in f["tables"]]
    return (int(f["num_batches"]), {n: np.asarray(f[f"df_{j}"]) for j, n in enumerate(names)},
            json.loads(str(f["meta"])))


def load_background(path: pathlib.Path) -> tuple[int, dict[str, np.ndarray], dict]:
  """(|B|, {table path: df}, meta) of a background statistics file."""
  if not path.is_file():
    raise FileNotFoundError(f"config.finetune.background: {path} not found; write it with "
                            "`python -m sparsejax.finetune.background --workdir PRETRAIN_RUN` "
                            "or point config.finetune.background at one")
  return _load(str(path), path.stat().st_mtime_ns)


def save_background(path: pathlib.Path, num_batches: int, df: dict[str, np.ndarray],
                    meta: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  arrays = {f"df_{j}": np.asarray(v, np.int64) for j, v in enumerate(df.values())}
  tmp = path.with_name(path.name + ".tmp.npz")
  np.savez(tmp, num_batches=np.int64(num_batches), tables=np.array(list(df)),
           meta=np.array(json.dumps(meta)), **arrays)
  tmp.replace(path)


def idf_tables(cfg: Config, abstract_params: dict) -> dict[tuple, np.ndarray]:
  """Table path -> idf (float32 [rows]) from the background file; one line when it does not
  fit this model."""
  path = background_path(cfg)
  n, df, _ = load_background(path)
  out = {}
  for table in memory_tables(cfg, abstract_params):
    name = path_name(table)
    rows = abstract_params
    for k in table:
      rows = rows[k]
    if name not in df or df[name].shape != (rows.shape[0],):
      have = {k: v.shape for k, v in df.items()}
      raise ConfigError(f"config.finetune.background: {path} holds tables {have}, this model "
                        f"needs {name} with {rows.shape[0]} rows; recompute it for the run "
                        "this one starts from")
    out[table] = idf(df[name], n)
  return out


def _mask_rows(x, keep_N):
  return jnp.where(keep_N.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x))


def _only(tree, tables: dict[tuple, Any], fn):
  """``fn(leaf, table)`` on the value tables, zeros on every other leaf."""
  def leaf(path, x):
    keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
    return fn(x, keys) if keys in tables else jnp.zeros_like(x)
  return jax.tree_util.tree_map_with_path(leaf, tree)


def sparse_memory_optimizer(cfg: Config, inner: optax.GradientTransformation
                            ) -> optax.GradientTransformationExtraArgs:
  """``update(grads, state, params, slot_counts={sown counts name: [rows]})`` (module
  docstring)."""
  top_t = cfg.finetune.top_t

  def init(params):
    zero = jnp.zeros((), jnp.int32)
    return SparseMemoryState(inner.init(params), zero, zero)

  def update(grads, state: SparseMemoryState, params=None, *, slot_counts=None, **extra):
    del extra
    if slot_counts is None:
      raise ValueError("finetune.mode sparse_memory: the optimizer update needs the batch's "
                       "slot_counts (the memory layers' sown usage_slots)")
    tables = memory_tables(cfg, grads)
    idfs = idf_tables(cfg, grads)
    keep, accessed = {}, jnp.zeros((), jnp.int32)
    for table, layers in tables.items():
      counts = sum(slot_counts[counts_key(i)] for i in layers)
      keep[table] = select_rows(counts, jnp.asarray(idfs[table]), top_t)
      accessed = accessed + jnp.sum(counts > 0, dtype=jnp.int32)
    grads = _only(grads, keep, lambda g, t: _mask_rows(g, keep[t]))
    updates, new_inner = inner.update(grads, state.inner, params)
    updates = _only(updates, keep, lambda u, t: _mask_rows(u, keep[t]))
    updated = sum(jnp.sum(k, dtype=jnp.int32) for k in keep.values())
    return updates, SparseMemoryState(new_inner, accessed, updated)

  return optax.GradientTransformationExtraArgs(init, update)
