"""The largest per-device batch that fits, in few compiles (sparsejax.compile_check.fits).

A compile costs minutes on a CPU host, so the search predicts instead of doubling from 1:

  1. compile b = 1 and b = 2; peak memory is taken as linear in b through those two points,
     peak(b) = peak(1) + (b - 1) * (peak(2) - peak(1)), and the prediction is the largest b with
     peak(b) <= the device's limit (capped at ``cap``);
  2. compile the prediction; if it fits, compile b + 1, which must not (unless b is the cap);
  3. when the prediction misses (it does not fit, or b + 1 fits too), bracket the answer with
     every compile so far as ``program.find_max_batch`` does (go up, at most doubling, until a
     batch does not fit or the cap is reached, then narrow the bracket), but step to where the
     line through the two nearest compiles' peaks reaches the limit (a secant) instead of
     doubling / halving blindly; a step that does not halve the bracket is followed by a
     midpoint, so the search stays within about twice bisection's compiles.

Peak memory is not linear from b = 1: on 8 x H100, dense 1.3b at seq 2048 needs 5.65 GiB at
b = 1, then 7.13 GiB + 2.45 GiB per sequence (b = 2 ... 37), so the prediction from b = 1, 2 was
37 and the answer is 23 (bisection took 8 compiles; the secant from b = 2, 37 finds it in 5).
Near the HBM limit the TPU compiler rematerialises to fit, so there peak grows less than
linearly. ``run(b)`` returns a compile-check record (``fits``, ``memory.peak_bytes``
when known, ``memory.limit_bytes``); it is the caller's, so a test can give a fake and a resumed
cell can answer from its cache.
"""

from __future__ import annotations

import math
from typing import Callable


def predict(rec1: dict, rec2: dict, cap: int) -> tuple[int, dict]:
  """(predicted largest b in [2, cap], the linear model) from the fitting records at b = 1, 2."""
  p1, p2 = rec1["memory"]["peak_bytes"], rec2["memory"]["peak_bytes"]
  limit = rec2["memory"]["limit_bytes"]
  slope = p2 - p1
  b = cap if slope <= 0 else math.floor(1 + (limit - p1) / slope)
  model = {"peak_at_1_bytes": p1, "bytes_per_sequence": slope, "limit_bytes": limit,
           "unclamped": b}
  return max(2, min(cap, b)), model


def _peak(rec: dict) -> float | None:
  return rec["memory"].get("peak_bytes")


def _secant(b1: int, b2: int, tried: dict[int, dict], limit: float) -> float | None:
  """The b where the line through the peaks at b1 and b2 reaches ``limit`` (None: unknown)."""
  p1, p2 = _peak(tried[b1]), _peak(tried[b2])
  if p1 is None or p2 is None or p2 <= p1:
    return None
  return b1 + (limit - p1) * (b2 - b1) / (p2 - p1)


def bracket(fits: Callable[[int], bool], tried: dict[int, dict], cap: int) -> int:
  """The largest fitting b given the compiles in ``tried`` (at least one fits).
  Up, while nothing above the largest fitting b (lo) is known not to fit: to where the line
  through the two largest fitting batches' peaks reaches the limit, at least twice the previous
  step up and at most 2 lo (2 lo without a line). Then narrow (lo, hi): where the line through
  their peaks reaches the limit, or the midpoint when a peak is unknown or the previous step did
  not halve the bracket."""
  limit = max(r["memory"]["limit_bytes"] for r in tried.values())
  halved, step_up = True, 0
  while True:
    lo = max(b for b, r in tried.items() if r["fits"])
    above = [b for b, r in tried.items() if not r["fits"] and b > lo]
    if not above:
      if lo >= cap:
        return lo
      fitting = sorted(b for b, r in tried.items() if r["fits"])
      guess = _secant(fitting[-2], lo, tried, limit) if len(fitting) > 1 else None
      target = 2 * lo if guess is None else max(round(guess), lo + 2 * step_up)
      b = max(lo + 1, min(target, 2 * lo, cap))
      step_up = b - lo
      fits(b)
      continue
    hi = min(above)
    if hi - lo == 1:
      return lo
    guess = _secant(lo, hi, tried, limit) if halved else None
    b = (lo + hi) // 2 if guess is None else min(max(round(guess), lo + 1), hi - 1)
    width = hi - b if fits(b) else b - lo
    halved = width <= (hi - lo) / 2


def search(run: Callable[[int], dict], cap: int) -> dict:
  """The largest per-device batch b <= cap whose step fits. Returns {"max_per_device_batch"
  (0: b = 1 does not fit), "capped", "predicted", "model", "method", "order" (the batches
  compiled, in order)}; the records stay with the caller."""
  if cap < 1:
    raise ValueError(f"the per-device batch cap must be >= 1, got {cap}")
  tried: dict[int, dict] = {}
  order: list[int] = []

  def fits(b: int) -> bool:
    if b not in tried:
      tried[b] = run(b)
      order.append(b)
    return bool(tried[b]["fits"])

  out = {"predicted": None, "model": None}
  if not fits(1):
    return {**out, "max_per_device_batch": 0, "capped": False, "order": order,
            "method": "b=1 does not fit"}
  if cap >= 2 and fits(2):
    pred, out["model"] = predict(tried[1], tried[2], cap)
    out["predicted"] = pred
    if fits(pred) and pred < cap:
      fits(pred + 1)
  best = bracket(fits, tried, cap)
  if out["predicted"] is None:
    method = "b=2 does not fit" if cap >= 2 else "cap is 1"
  elif best == out["predicted"]:  # it fitted and b + 1 did not (or it is the cap)
    method = "prediction verified"
  else:
    method = "prediction missed: secant / bisection"
  return {**out, "max_per_device_batch": best, "capped": best >= cap, "order": order,
          "method": method}
