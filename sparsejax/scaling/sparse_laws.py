"""Scaling laws with a sparsity axis, fitted like Chinchilla approach 3 (sparsejax.scaling.fit).

Two forms, both ``L = c + (coefficient of x) / N**alpha + (D term)``:

* Frantar et al. 2023, "Scaling Laws for Sparsely-Connected Foundation Models":
  ``L(S, N, D) = (a_S (1 - S)**b_S + c_S) * (1/N)**b_N + (a_D / D)**b_D + c`` with S the WEIGHT
  sparsity (the fraction of pruned weights) and N the non-zero parameters. The law was derived
  for unstructured / n:m weight pruning; it is fitted only on runs that record
  ``weight_sparsity`` (sparsejax.scaling.records). The conditional computation of MoE, PEER and
  memory layers (``1 - active/total``) is not weight sparsity and is not an input to it.
* Krajewski et al. 2024, "Scaling Laws for Fine-Grained Mixture of Experts":
  ``L(N, D, G) = c + (g / G**gamma + a) / N**alpha + b / D**beta`` with G the granularity.

Both are one seven-parameter core in log space, ``z = 1 - S`` (Frantar) or ``z = G``:
``log L = LSE(LSE(p1 + e1 log z, p0) - alpha log N,  q - beta log D,  log c)``
(``e1 = b_S`` resp. ``-gamma``; ``q = b_D log a_D`` resp. ``log b``). As in ``fit.py``, the Huber
loss (delta 1e-3) between this and ``log L`` is minimised with L-BFGS-B (analytic gradient) from
a grid of initialisations (coarse tolerances), the best start is polished tightly, and
``bootstrap > 0`` refits resampled points from the optimum for (5%, 95%) percentile intervals.

Both forms need the sparsity axis to vary: at least 3 distinct S (or G) values, else the three
coefficients of the x term are not identifiable and the fit raises ValueError.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import itertools
import pathlib
from typing import Mapping, Sequence

import numpy as np
from scipy.optimize import minimize

from sparsejax.scaling.fit import _as_positive_1d, _check_same_length

__all__ = ["SparseLawFit", "fit_frantar", "fit_granularity", "frantar_loss", "granularity_loss",
           "single_threaded_blas", "FORMS"]

_CORE = ("p1", "e1", "p0", "alpha", "q", "beta", "lc")
MIN_LEVELS = 3

# Initialisation grid of the core parameters (e1 in the form's own sign: b_S resp. gamma), 2**6 =
# 64 starts (about 1 s for 100 points): enough to recover the generating parameters of the
# synthetic tests; pass a larger grid for real data with an unusual scale.
DEFAULT_GRID: Mapping[str, Sequence[float]] = {
    "p1": (0.0, 5.0), "e1": (0.5, 1.5), "p0": (0.0, 5.0), "alpha": (0.2, 0.6),
    "q": (0.0, 10.0), "beta": (0.2, 0.6), "lc": (0.0,),
}

FORMS = {
    "frantar": {
        "title": "Frantar et al. 2023",
        "formula": "L = (a_S (1-S)^b_S + c_S) (1/N)^b_N + (a_D/D)^b_D + c",
        "x": "S", "params": ("a_S", "b_S", "c_S", "b_N", "a_D", "b_D", "c"),
        "exponents": ("b_S", "b_N", "b_D"),
    },
    "granularity": {
        "title": "Krajewski et al. 2024",
        "formula": "L = c + (g / G^gamma + a) / N^alpha + b / D^beta",
        "x": "G", "params": ("g", "gamma", "a", "alpha", "b", "beta", "c"),
        "exponents": ("gamma", "alpha", "beta"),
    },
}


def frantar_loss(S, N, D, *, a_S, b_S, c_S, b_N, a_D, b_D, c) -> np.ndarray:
  S, N, D = (np.asarray(v, dtype=np.float64) for v in (S, N, D))
  return (a_S * (1 - S) ** b_S + c_S) * (1 / N) ** b_N + (a_D / D) ** b_D + c


def granularity_loss(G, N, D, *, g, gamma, a, alpha, b, beta, c) -> np.ndarray:
  G, N, D = (np.asarray(v, dtype=np.float64) for v in (G, N, D))
  return c + (g / G ** gamma + a) / N ** alpha + b / D ** beta


# ----------------------------------------------------------------------------- BLAS threads

def _openblas_libs() -> list:
  """(get, set) thread-count functions of every OpenBLAS loaded in this process (Linux)."""
  try:
    maps = pathlib.Path("/proc/self/maps").read_text()
  except OSError:
    return []
  paths = sorted({line.split()[-1] for line in maps.splitlines()
                  if "openblas" in line.lower() and line.split()[-1].startswith("/")})
  out = []
  for path in paths:
    try:
      lib = ctypes.CDLL(path)
    except OSError:
      continue
    for prefix, suffix in itertools.product(("scipy_", ""), ("", "64_")):
      get = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
      set_ = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
      if get is not None and set_ is not None:
        out.append((get, set_))
        break
  return out


@contextlib.contextmanager
def single_threaded_blas():
  """One OpenBLAS thread meanwhile. L-BFGS-B on 5-7 parameters makes thousands of BLAS/LAPACK
  calls on tiny arrays, where threads only add synchronisation: on a loaded 2-core machine an
  approach-3 fit took 29 s with 2 OpenBLAS threads and 1.2 s with one. A no-op where no
  OpenBLAS is found (other BLAS, non-Linux)."""
  libs = _openblas_libs()
  before = [get() for get, _ in libs]
  for _, set_ in libs:
    set_(1)
  try:
    yield
  finally:
    for (_, set_), n in zip(libs, before):
      set_(n)


# ----------------------------------------------------------------------------- the core

def _softmax_lse(*terms):
  t = np.stack(terms)
  m = t.max(axis=0)
  ex = np.exp(t - m)
  s = ex.sum(axis=0)
  return m + np.log(s), ex / s


def _objective(theta, log_z, log_n, log_d, log_l, delta):
  """Summed Huber loss of ``log L_hat - log L`` and its gradient in the core parameters."""
  p1, e1, p0, alpha, q, beta, lc = theta
  u, v = _softmax_lse(p1 + e1 * log_z, np.full_like(log_z, p0))
  f, w = _softmax_lse(u - alpha * log_n, q - beta * log_d, np.full_like(log_z, lc))
  r = f - log_l
  absr = np.abs(r)
  loss = np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta)).sum()
  dr = np.clip(r, -delta, delta)
  w1 = dr * w[0]
  grad = np.array([(w1 * v[0]).sum(), (w1 * v[0] * log_z).sum(), (w1 * v[1]).sum(),
                   -(w1 * log_n).sum(), (dr * w[1]).sum(), -(dr * w[1] * log_d).sum(),
                   (dr * w[2]).sum()])
  return float(loss), grad


_COARSE = {"maxiter": 1000, "ftol": 1e-11, "gtol": 1e-8, "maxcor": 20}
_TIGHT = {"maxiter": 10000, "maxfun": 20000, "ftol": 1e-15, "gtol": 1e-13, "maxcor": 20}


def _lbfgs(theta0, data, delta, options):
  with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
    return minimize(_objective, np.asarray(theta0, dtype=np.float64), jac=True,
                    args=(*data, delta), method="L-BFGS-B", options=options)


def _finite(res) -> bool:
  return bool(np.all(np.isfinite(res.x)) and np.isfinite(res.fun))


# ----------------------------------------------------------------------------- fits

@dataclasses.dataclass(frozen=True)
class SparseLawFit:
  """A fitted sparse law: ``params`` by the paper's names; ``intervals`` maps each to its
  bootstrap (5%, 95%) percentiles (None without bootstrap)."""
  form: str                      # "frantar" or "granularity"
  params: dict[str, float]
  loss: float
  n_points: int
  n_inits: int
  converged: bool
  huber_delta: float
  levels: tuple[float, ...]      # distinct S (or G) values seen
  intervals: dict[str, tuple[float, float]] | None = None

  def predict(self, x, N, D) -> np.ndarray:
    """Loss at sparsity S (Frantar) or granularity G (Krajewski), N params, D tokens."""
    fn = frantar_loss if self.form == "frantar" else granularity_loss
    return fn(x, N, D, **self.params)

  def to_json(self) -> dict:
    return {"form": self.form, "formula": FORMS[self.form]["formula"], "params": self.params,
            "intervals": self.intervals, "loss": self.loss, "n_points": self.n_points,
            "n_inits": self.n_inits, "converged": self.converged,
            "huber_delta": self.huber_delta, "levels": list(self.levels)}


def _named(form: str, theta: np.ndarray) -> dict[str, np.ndarray]:
  """Core parameters (rows of ``theta``: (..., 7)) -> the form's named parameters."""
  p1, e1, p0, alpha, q, beta, lc = np.moveaxis(np.asarray(theta, dtype=np.float64), -1, 0)
  # degenerate bootstrap resamples can push a log-parameter past e^709: inf, reported as such
  with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
    if form == "frantar":
      return {"a_S": np.exp(p1), "b_S": e1, "c_S": np.exp(p0), "b_N": alpha,
              "a_D": np.exp(q / beta), "b_D": beta, "c": np.exp(lc)}
    return {"g": np.exp(p1), "gamma": -e1, "a": np.exp(p0), "alpha": alpha, "b": np.exp(q),
            "beta": beta, "c": np.exp(lc)}


def _starts(form: str, grid) -> list[np.ndarray]:
  grid = DEFAULT_GRID if grid is None else grid
  missing = [k for k in _CORE if k not in grid or len(grid[k]) == 0]
  if missing:
    raise ValueError(f"grid is missing values for {missing} (core parameters {_CORE})")
  sign = 1.0 if form == "frantar" else -1.0   # grid e1 is b_S resp. gamma
  axes = [np.asarray(grid[k], dtype=np.float64) * (sign if k == "e1" else 1.0) for k in _CORE]
  return [np.array(p) for p in itertools.product(*axes)]


def _fit(form: str, log_z, N, D, L, levels, huber_delta, grid, bootstrap, seed) -> SparseLawFit:
  n = len(L)
  if len(levels) < MIN_LEVELS:
    raise ValueError(f"{FORMS[form]['x']} takes {len(levels)} distinct value(s); the "
                     f"{form} law needs at least {MIN_LEVELS}")
  if n < len(_CORE) + 1:
    raise ValueError(f"the {form} law needs at least {len(_CORE) + 1} points, got {n}")
  if not (np.isfinite(huber_delta) and huber_delta > 0):
    raise ValueError(f"huber_delta must be positive and finite, got {huber_delta}")
  if bootstrap < 0:
    raise ValueError(f"bootstrap must be >= 0, got {bootstrap}")
  data = (log_z, np.log(N), np.log(D), np.log(L))
  starts = _starts(form, grid)
  with single_threaded_blas():
    return _fit_core(form, data, levels, starts, huber_delta, bootstrap, seed)


def _fit_core(form, data, levels, starts, huber_delta, bootstrap, seed) -> SparseLawFit:
  n = len(data[0])
  best = None
  for theta0 in starts:
    res = _lbfgs(theta0, data, huber_delta, _COARSE)
    if _finite(res) and (best is None or res.fun < best.fun):
      best = res
  if best is None:
    raise ValueError(f"{form} fit failed: no initialisation reached a finite optimum")
  polished = _lbfgs(best.x, data, huber_delta, _TIGHT)
  if _finite(polished) and polished.fun <= best.fun:
    best = polished
  params = {k: float(v) for k, v in _named(form, best.x).items()}

  intervals = None
  if bootstrap:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(bootstrap):
      idx = rng.integers(0, n, size=n)
      res = _lbfgs(best.x, tuple(a[idx] for a in data), huber_delta, _TIGHT)
      if _finite(res):
        rows.append(res.x)
    if not rows:
      raise ValueError(f"{form} bootstrap failed: no resample reached a finite optimum")
    named = _named(form, np.asarray(rows))
    intervals = {}
    for k, v in named.items():
      v = v[np.isfinite(v)]
      intervals[k] = ((float(np.percentile(v, 5)), float(np.percentile(v, 95))) if len(v)
                      else (float("nan"), float("nan")))
  return SparseLawFit(form=form, params=params, loss=float(best.fun), n_points=n,
                      n_inits=len(starts), converged=bool(best.success),
                      huber_delta=float(huber_delta), levels=tuple(levels),
                      intervals=intervals)


def _levels(x: np.ndarray) -> tuple[float, ...]:
  """Distinct values, merging those equal to 6 significant digits (float noise in ratios)."""
  return tuple(float(v) for v in np.unique(np.round(x, 6)))


def fit_frantar(S, N, D, L, *, huber_delta: float = 1e-3, grid=None, bootstrap: int = 0,
                seed: int = 0) -> SparseLawFit:
  """Fit Frantar et al.'s ``L(S, N, D)`` to runs (S in [0, 1), N non-zero params, D tokens)."""
  S = np.asarray(S, dtype=np.float64).reshape(-1)
  if not np.all(np.isfinite(S)) or np.any(S < 0) or np.any(S >= 1):
    raise ValueError("S (sparsity) must lie in [0, 1)")
  N, D, L = (_as_positive_1d(k, v) for k, v in (("N", N), ("D", D), ("L", L)))
  _check_same_length(S=S, N=N, D=D, L=L)
  return _fit("frantar", np.log1p(-S), N, D, L, _levels(S), huber_delta, grid, bootstrap, seed)


def fit_granularity(G, N, D, L, *, huber_delta: float = 1e-3, grid=None, bootstrap: int = 0,
                    seed: int = 0) -> SparseLawFit:
  """Fit Krajewski et al.'s ``L(N, D, G)`` to runs (G granularity > 0, N params, D tokens)."""
  G, N, D, L = (_as_positive_1d(k, v) for k, v in (("G", G), ("N", N), ("D", D), ("L", L)))
  _check_same_length(G=G, N=N, D=D, L=L)
  return _fit("granularity", np.log(G), N, D, L, _levels(G), huber_delta, grid, bootstrap, seed)
