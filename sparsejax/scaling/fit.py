"""Scaling-law fits: Chinchilla approaches 2 and 3 (Hoffmann et al. 2022).

Approach 3 fits the parametric loss ``L(N, D) = E + A / N**alpha + B / D**beta`` by minimising
the Huber loss (delta 1e-3) between ``log L`` and
``LSE(a - alpha*log N, b - beta*log D, e)`` with ``A, B, E = exp(a), exp(b), exp(e)``, using
L-BFGS-B (analytic gradient) from a grid of initialisations and keeping the best. Compute
``C = 6*N*D`` is split optimally as ``N_opt = G*(C/6)**a``, ``D_opt = (C/6)**b / G`` with
``G = (alpha*A / (beta*B))**(1/(alpha+beta))``, ``a = beta/(alpha+beta)``,
``b = alpha/(alpha+beta)``.

Approach 2 fits, for every isoFLOP budget C, a parabola of L against log N, takes its minimum
N*(C), then fits ``log N* = a*log C + const`` (so ``D_opt = C/(6 N_opt)`` scales with ``b = 1-a``).
Where the budget is another compute measure than 6ND (the sweep's recorded total FLOPs, 6N +
attention), pass the runs' D too: each budget's D* is then read off its runs (a parabola of
log D against log N, least squares, at N*) and ``log D* = b*log C + const`` is fitted on its own.

Everything is numpy/scipy float64; no JAX.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Mapping, Sequence

import numpy as np
from scipy.optimize import minimize

__all__ = [
    "FitResult", "Approach2Result", "IsoFlopMinimum", "fit_approach3", "fit_approach2",
    "predict", "PAPER_GRID", "DEFAULT_GRID",
]

_PARAM_NAMES = ("a", "b", "e", "alpha", "beta")

# Hoffmann et al. 2022, appendix D.2: the initialisation grid for approach 3.
PAPER_GRID: Mapping[str, Sequence[float]] = {
    "alpha": tuple(np.arange(0.0, 2.01, 0.5)),
    "beta": tuple(np.arange(0.0, 2.01, 0.5)),
    "e": tuple(np.arange(-1.0, 1.01, 0.5)),
    "a": tuple(np.arange(0.0, 25.01, 5.0)),
    "b": tuple(np.arange(0.0, 25.01, 5.0)),
}
# A coarser grid (108 starts) that finds the same optimum on well-behaved data, much faster.
DEFAULT_GRID: Mapping[str, Sequence[float]] = {
    "alpha": (0.5, 1.5),
    "beta": (0.5, 1.5),
    "e": (-1.0, 0.0, 1.0),
    "a": (0.0, 10.0, 20.0),
    "b": (0.0, 10.0, 20.0),
}


# ----------------------------------------------------------------------------- validation

def _as_positive_1d(name: str, x) -> np.ndarray:
  arr = np.asarray(x, dtype=np.float64)
  if arr.ndim == 0:
    arr = arr.reshape(1)
  if arr.ndim != 1:
    raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"{name} contains NaN or inf")
  if np.any(arr <= 0):
    raise ValueError(f"{name} must be strictly positive (got min {arr.min():.6g})")
  return arr


def _check_same_length(**arrays: np.ndarray) -> int:
  lengths = {k: len(v) for k, v in arrays.items()}
  if len(set(lengths.values())) != 1:
    raise ValueError(f"inputs must have equal lengths, got {lengths}")
  return next(iter(lengths.values()))


# ----------------------------------------------------------------------------- approach 3

@dataclasses.dataclass(frozen=True)
class FitResult:
  """Approach-3 fit of ``L = E + A/N**alpha + B/D**beta`` (all float64).

  ``loss`` is the summed Huber objective at the optimum; ``intervals`` maps each of
  ``E, A, B, alpha, beta, a, b`` to its bootstrap (5%, 95%) percentiles (None without bootstrap).
  """
  E: float
  A: float
  B: float
  alpha: float
  beta: float
  loss: float
  n_points: int
  n_inits: int
  converged: bool
  huber_delta: float
  intervals: dict[str, tuple[float, float]] | None = None
  bootstrap_samples: np.ndarray | None = dataclasses.field(default=None, repr=False)

  @property
  def a(self) -> float:
    """Exponent of N_opt in C: ``beta / (alpha + beta)``."""
    return self.beta / (self.alpha + self.beta)

  @property
  def b(self) -> float:
    """Exponent of D_opt in C: ``alpha / (alpha + beta)``."""
    return self.alpha / (self.alpha + self.beta)

  @property
  def G(self) -> float:
    return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

  @property
  def theta(self) -> np.ndarray:
    """Log-space parameter vector ``(a=log A, b=log B, e=log E, alpha, beta)``."""
    return np.array([np.log(self.A), np.log(self.B), np.log(self.E), self.alpha, self.beta])

  def predict(self, N, D) -> np.ndarray:
    return predict(self, N, D)

  def optimal(self, C):
    """Compute-optimal ``(N_opt, D_opt)`` for budget(s) ``C = 6 N D``."""
    c6 = np.asarray(C, dtype=np.float64) / 6.0
    n_opt = self.G * c6 ** self.a
    d_opt = c6 ** self.b / self.G
    return n_opt, d_opt


def predict(result: FitResult, N, D) -> np.ndarray:
  """Loss predicted by an approach-3 fit (broadcasts N and D)."""
  N = np.asarray(N, dtype=np.float64)
  D = np.asarray(D, dtype=np.float64)
  return result.E + result.A / N ** result.alpha + result.B / D ** result.beta


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
  """Summed Huber loss of ``LSE(a - alpha logN, b - beta logD, e) - log L`` and its gradient."""
  a, b, e, alpha, beta = theta
  t = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # (3, n)
  m = t.max(axis=0)
  ex = np.exp(t - m)
  s = ex.sum(axis=0)
  lse = m + np.log(s)
  w = ex / s  # softmax weights = d lse / d t
  r = lse - log_l
  absr = np.abs(r)
  quad = absr <= delta
  loss = np.where(quad, 0.5 * r * r, delta * (absr - 0.5 * delta)).sum()
  dr = np.clip(r, -delta, delta)  # Huber derivative
  g1, g2, g3 = dr * w[0], dr * w[1], dr * w[2]
  grad = np.array([g1.sum(), g2.sum(), g3.sum(), -(g1 * log_n).sum(), -(g2 * log_d).sum()])
  return float(loss), grad


_COARSE = {"maxiter": 2000, "ftol": 1e-12, "gtol": 1e-9, "maxcor": 20}
# Tight enough that noiseless data is recovered to ~1e-6 despite the tiny Huber delta.
_TIGHT = {"maxiter": 10000, "maxfun": 20000, "ftol": 1e-15, "gtol": 1e-13, "maxcor": 20}


def _lbfgs(theta0, log_n, log_d, log_l, delta, options=_TIGHT):
  return minimize(_objective, np.asarray(theta0, dtype=np.float64), jac=True,
                  args=(log_n, log_d, log_l, delta), method="L-BFGS-B", options=options)


def _best_fit(starts, log_n, log_d, log_l, delta):
  """Run every start with moderate tolerances, then polish the best one tightly."""
  best = None
  for theta0 in starts:
    with np.errstate(over="ignore", invalid="ignore"):
      res = _lbfgs(theta0, log_n, log_d, log_l, delta, _COARSE)
    if not np.all(np.isfinite(res.x)) or not np.isfinite(res.fun):
      continue
    if best is None or res.fun < best.fun:
      best = res
  if best is None:
    return None
  polished = _lbfgs(best.x, log_n, log_d, log_l, delta)
  if np.all(np.isfinite(polished.x)) and np.isfinite(polished.fun) and polished.fun <= best.fun:
    return polished
  return best


def _grid_starts(grid) -> list[np.ndarray]:
  if grid is None:
    grid = DEFAULT_GRID
  elif isinstance(grid, str):
    if grid != "paper":
      raise ValueError(f"grid must be None, 'paper' or a mapping of {_PARAM_NAMES}, got {grid!r}")
    grid = PAPER_GRID
  missing = [k for k in _PARAM_NAMES if k not in grid or len(grid[k]) == 0]
  if missing:
    raise ValueError(f"grid is missing values for {missing}")
  axes = [np.asarray(grid[k], dtype=np.float64) for k in _PARAM_NAMES]
  return [np.array(p) for p in itertools.product(*axes)]


def _theta_to_params(theta: np.ndarray) -> dict[str, float]:
  a, b, e, alpha, beta = (float(v) for v in theta)
  return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)),
          "alpha": alpha, "beta": beta}


def fit_approach3(N, D, L, *, huber_delta: float = 1e-3, grid=None, bootstrap: int = 0,
                  seed: int = 0) -> FitResult:
  """Chinchilla approach 3: fit ``L = E + A/N**alpha + B/D**beta`` to runs ``(N, D, L)``.

  ``grid``: None (``DEFAULT_GRID``, 108 starts), ``"paper"`` (``PAPER_GRID``, 4500 starts) or a
  mapping from each of ``a, b, e, alpha, beta`` to its initial values. ``bootstrap > 0`` resamples
  the points with replacement that many times, refits each from the best fit, and reports the
  (5%, 95%) percentile interval of every parameter in ``result.intervals``.

  Raises ValueError for mismatched lengths, NaN/inf, non-positive values, fewer than 5 points,
  or when no start converges to a finite optimum.
  """
  N = _as_positive_1d("N", N)
  D = _as_positive_1d("D", D)
  L = _as_positive_1d("L", L)
  n = _check_same_length(N=N, D=D, L=L)
  if n < len(_PARAM_NAMES):
    raise ValueError(f"approach 3 needs at least {len(_PARAM_NAMES)} points (one per parameter), "
                     f"got {n}")
  if not (np.isfinite(huber_delta) and huber_delta > 0):
    raise ValueError(f"huber_delta must be positive and finite, got {huber_delta}")
  if bootstrap < 0:
    raise ValueError(f"bootstrap must be >= 0, got {bootstrap}")
  log_n, log_d, log_l = np.log(N), np.log(D), np.log(L)
  starts = _grid_starts(grid)
  best = _best_fit(starts, log_n, log_d, log_l, huber_delta)
  if best is None:
    raise ValueError("approach 3 fit failed: no initialisation reached a finite optimum")
  params = _theta_to_params(best.x)

  intervals = None
  samples = None
  if bootstrap:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(bootstrap):
      idx = rng.integers(0, n, size=n)
      res = _lbfgs(best.x, log_n[idx], log_d[idx], log_l[idx], huber_delta)
      rows.append(res.x)
    samples = np.asarray(rows, dtype=np.float64)
    samples = samples[np.all(np.isfinite(samples), axis=1)]
    if len(samples) == 0:
      raise ValueError("bootstrap failed: no resample reached a finite optimum")
    with np.errstate(over="ignore"):  # a degenerate resample may send log A past e^709: inf
      named = {
          "E": np.exp(samples[:, 2]), "A": np.exp(samples[:, 0]), "B": np.exp(samples[:, 1]),
          "alpha": samples[:, 3], "beta": samples[:, 4],
      }
    named["a"] = named["beta"] / (named["alpha"] + named["beta"])
    named["b"] = named["alpha"] / (named["alpha"] + named["beta"])
    intervals = {k: (float(np.percentile(v, 5)), float(np.percentile(v, 95)))
                 for k, v in named.items()}

  return FitResult(**params, loss=float(best.fun), n_points=n, n_inits=len(starts),
                   converged=bool(best.success), huber_delta=float(huber_delta),
                   intervals=intervals, bootstrap_samples=samples)


# ----------------------------------------------------------------------------- approach 2

@dataclasses.dataclass(frozen=True)
class IsoFlopMinimum:
  """Parabola ``L = c2 x^2 + c1 x + c0`` (x = log N) fitted to one isoFLOP budget."""
  C: float
  N_opt: float
  L_opt: float
  coeffs: tuple[float, float, float]  # (c2, c1, c0), numpy.polyfit order
  n_points: int
  log_n_range: tuple[float, float]
  positive_curvature: bool
  in_range: bool
  D_star: float | None = None  # D at N* read off the budget's runs (fit_approach2 with D)

  @property
  def ok(self) -> bool:
    """Usable for the power-law fit: convex and the minimum inside/near the sampled N range."""
    return self.positive_curvature and self.in_range

  @property
  def D_opt(self) -> float:
    """``D_star`` where the runs' D was given, else ``C / (6 N*)`` (C = 6ND)."""
    return self.D_star if self.D_star is not None else self.C / (6.0 * self.N_opt)


@dataclasses.dataclass(frozen=True)
class Approach2Result:
  """``N_opt = exp(n_intercept) * C**a`` and ``D_opt = exp(d_intercept) * C**b`` (``b = 1 - a``
  when C = 6ND; fitted on its own when the runs' D was given).

  ``minima`` lists every budget (sorted by C); only those with ``ok`` enter the fit.
  """
  minima: tuple[IsoFlopMinimum, ...]
  a: float
  n_intercept: float
  b: float
  d_intercept: float
  n_used: int

  @property
  def n_line(self) -> tuple[float, float]:
    """(slope, intercept) of ``log N_opt`` against ``log C``."""
    return self.a, self.n_intercept

  @property
  def d_line(self) -> tuple[float, float]:
    """(slope, intercept) of ``log D_opt`` against ``log C``."""
    return self.b, self.d_intercept

  def optimal(self, C):
    """Compute-optimal ``(N_opt, D_opt)`` from the fitted lines (``6 N D = C`` exactly when C
    is 6ND, i.e. when fitted without D)."""
    C = np.asarray(C, dtype=np.float64)
    return np.exp(self.n_intercept) * C ** self.a, np.exp(self.d_intercept) * C ** self.b


def fit_approach2(C, N, L, D=None, *, range_margin: float = 0.1,
                  rtol: float = 1e-6) -> Approach2Result:
  """Chinchilla approach 2 from isoFLOP runs ``(C, N, L)`` (and their tokens D, when C is not
  6ND).

  Runs are grouped by budget (C values equal within relative ``rtol``). For each group a parabola
  of L against log N is fitted (``numpy.polyfit`` deg 2); its vertex is the budget's N*(C), flagged
  not ok when the curvature is not positive or the vertex lies outside the sampled log N range
  widened by ``range_margin`` times its width on each side. A least-squares line through the ok
  ``(log C, log N*)`` pairs gives ``a``; ``b = 1 - a`` without D, else a line through the
  budgets' ``(log C, log D*)`` with D* from a least-squares parabola of log D on log N at N*.

  Raises ValueError for malformed inputs, a budget with fewer than 3 runs or fewer than 3 distinct
  N, or fewer than 2 usable budgets.
  """
  C = _as_positive_1d("C", C)
  N = _as_positive_1d("N", N)
  L = _as_positive_1d("L", L)
  _check_same_length(C=C, N=N, L=L)
  log_d = None if D is None else np.log(_as_positive_1d("D", D))
  if log_d is not None:
    _check_same_length(C=C, D=log_d)
  if range_margin < 0:
    raise ValueError(f"range_margin must be >= 0, got {range_margin}")

  log_c, log_n = np.log(C), np.log(N)
  order = np.argsort(log_c, kind="stable")
  groups: list[list[int]] = []
  for i in order:
    if groups and abs(log_c[i] - log_c[groups[-1][0]]) <= rtol:
      groups[-1].append(int(i))
    else:
      groups.append([int(i)])

  minima = []
  for idx in groups:
    idx = np.asarray(idx)
    c = float(np.exp(log_c[idx].mean()))
    x, y = log_n[idx], L[idx]
    if len(idx) < 3 or len(np.unique(x)) < 3:
      raise ValueError(f"isoFLOP budget C={c:.4g} has {len(np.unique(x))} distinct N; a parabola "
                       "needs at least 3")
    c2, c1, c0 = (float(v) for v in np.polyfit(x, y, 2))
    lo, hi = float(x.min()), float(x.max())
    positive = c2 > 0
    if positive:
      x_star = -c1 / (2.0 * c2)
      width = hi - lo
      in_range = lo - range_margin * width <= x_star <= hi + range_margin * width
      l_star = c0 - c1 * c1 / (4.0 * c2)
    else:
      x_star, in_range, l_star = float("nan"), False, float("nan")
    d_star = None
    if log_d is not None and positive:
      d_star = float(np.exp(np.polyval(np.polyfit(x, log_d[idx], 2), x_star)))
    minima.append(IsoFlopMinimum(C=c, N_opt=float(np.exp(x_star)), L_opt=float(l_star),
                                 coeffs=(c2, c1, c0), n_points=len(idx), log_n_range=(lo, hi),
                                 positive_curvature=bool(positive), in_range=bool(in_range),
                                 D_star=d_star))

  used = [m for m in minima if m.ok]
  if len(used) < 2:
    raise ValueError(f"approach 2 needs at least 2 budgets with a valid parabola minimum, got "
                     f"{len(used)} of {len(minima)}")
  xs = np.log([m.C for m in used])
  ys = np.log([m.N_opt for m in used])
  a, n_int = (float(v) for v in np.polyfit(xs, ys, 1))
  if log_d is None:  # log D* = log C - log 6 - log N* = (1 - a) log C - log 6 - n_int.
    b, d_int = 1.0 - a, float(-np.log(6.0) - n_int)
  else:
    b, d_int = (float(v) for v in np.polyfit(xs, np.log([m.D_opt for m in used]), 1))
  return Approach2Result(minima=tuple(minima), a=a, n_intercept=n_int, b=b,
                         d_intercept=d_int, n_used=len(used))
