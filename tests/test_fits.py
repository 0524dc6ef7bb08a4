"""The fits table (sparsejax/compile_check/fits*.py) and the presets it adds: parameter counts of
the published shapes against their papers / model cards (abstract, no compile); the batch search
against a fake compiler with a known answer (prediction, verification, fallback, cap); the
results cache (an interrupted cell resumes from its compiles, a finished one is skipped, a state
too big for HBM is never compiled); the pre-check's bytes per device; and one real cell, dense
tiny on v5p-8 with the TPU compiler (skipped without one, as tests/test_compile_check.py; fails
instead under SPARSEJAX_REQUIRE_TPU_COMPILE=1), whose markdown row must show the JSON's numbers.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import re

import pytest

from sparsejax.compile_check import fits, fits_report, fits_search
from sparsejax.compile_check.fits_grid import Cell, Row
from sparsejax.configure import load_config
from sparsejax.info import describe

REPO = pathlib.Path(__file__).resolve().parent.parent

# ---- published shapes ------------------------------------------------------------------------

# (total params, active params per token counting the input embedding row as the model cards
# do, or None); sources in the presets' docstrings:
#   Llama 3 (arXiv 2407.21783) / Meta-Llama-3-{8B,70B}: 8.03B, 70.6B
#   Mixtral of Experts (arXiv 2401.04088): 46.7B total, 12.9B active
#   Qwen1.5-MoE-A2.7B model card: 14.3B total, 2.7B activated
#   Memory Layers at Scale (arXiv 2412.09764): an 8B base + a 4096^2 x 4096 value pool; a 1.3B
#   base + an 8192^2 x 2048 pool (the memory parameters are the pool's: "64B" and "128B" there,
#   binary units; the bases are our dense presets)
PUBLISHED = {
    "configs/dense.py:8b": (8.03e9, None),
    "configs/dense.py:70b": (70.6e9, None),
    "configs/moe.py:mixtral_8x7b": (46.7e9, 12.9e9),
    "configs/moe.py:qwen_moe_a2.7b": (14.3e9, 2.7e9),
    "configs/memory.py:8b": (8.03e9 + 4096 ** 3, None),
    "configs/memory.py:1.3b_64m": (1.28e9 + 2048 * 8192 ** 2, None),
}


@pytest.mark.parametrize("spec", list(PUBLISHED))
def test_published_presets_match_their_parameter_counts(spec):
  cfg = load_config(spec)
  info = describe(cfg)  # what `python -m sparsejax.info --config <spec>` prints
  total, active = PUBLISHED[spec]
  assert info["params_total"] == pytest.approx(total, rel=0.02), info
  if active is not None:  # our active count leaves out the input embedding row a token reads
    with_embedding = info["params_active_per_token"] + info["vocab_rows"] * cfg.model.d_model
    assert with_embedding == pytest.approx(active, rel=0.02), info
  if spec.endswith(("8b", "70b")):
    assert (cfg.model.vocab_size, cfg.attention.rope_theta, cfg.data.seq_len) == (
        128256, 5e5, 8192)


# ---- the search, against a fake compiler ------------------------------------------------------

def _fake(peak, limit: float, oom_peak: bool = True):
  """run(b) of a compiler whose peak memory is peak(b) (not reported for a step that does not
  fit unless ``oom_peak``, as TPU messages without sizes); calls are counted."""
  calls = []

  def run(b):
    calls.append(b)
    p = peak(b)
    memory = {"limit_bytes": limit, **({"peak_bytes": p} if p <= limit or oom_peak else {})}
    return {"fits": p <= limit, "memory": memory}
  return run, calls


def _doubling_bisection_compiles(peak, limit, cap):
  """Compiles program.find_max_batch needs (doubling from 1, then bisection)."""
  n, lo, hi = 0, 0, 1
  while hi <= cap:
    n += 1
    if peak(hi) > limit:
      break
    lo, hi = hi, 2 * hi
  while lo and hi <= cap and hi - lo > 1:
    n, mid = n + 1, (lo + hi) // 2
    lo, hi = (mid, hi) if peak(mid) <= limit else (lo, mid)
  return n


def _truth(peak, limit, cap):
  return max([b for b in range(1, cap + 1) if peak(b) <= limit], default=0)


def test_linear_peak_is_found_by_the_prediction_and_one_check():
  run, calls = _fake(lambda b: 10 + 3 * b, 100)
  out = fits_search.search(run, cap=64)
  assert out["max_per_device_batch"] == 30 == _truth(lambda b: 10 + 3 * b, 100, 64)
  assert calls == out["order"] == [1, 2, 30, 31]
  assert out["method"] == "prediction verified" and not out["capped"]
  assert out["model"]["bytes_per_sequence"] == 3


@pytest.mark.parametrize("curve, limit, most", [
    # dense 1.3b on 8 x H100 as measured (docs/fits.md): 5.65 GiB at b = 1, then 7.13 + 2.449
    # GiB per sequence (within 0.3 GiB at b = 19, 23, 24, 25, 28, 37): the prediction from b = 1,
    # 2 (37) overshoots, the secant from b = 2, 37 lands on the answer, 23
    (lambda b: 5.65 if b == 1 else 7.13 + 2.449 * (b - 2), 59.36, 5),
    (lambda b: 10 + 3 * min(b, 12) + 1.5 * max(b - 12, 0), 100, 7),  # compiler remat: go up
    (lambda b: 10 + 3 * b + 0.2 * b * b, 100, 7),
])
def test_a_missed_prediction_is_corrected_in_fewer_compiles_than_bisection(curve, limit, most):
  run, calls = _fake(curve, limit)
  out = fits_search.search(run, cap=64)
  assert out["max_per_device_batch"] == _truth(curve, limit, 64)
  assert "missed" in out["method"] and len(calls) == len(set(calls))
  assert len(calls) <= most < _doubling_bisection_compiles(curve, limit, 64)


def test_edges_cap_and_nothing_fits():
  run, calls = _fake(lambda b: b, 1e9)
  out = fits_search.search(run, cap=16)
  assert (out["max_per_device_batch"], out["capped"], calls) == (16, True, [1, 2, 16])
  run, calls = _fake(lambda b: 50 + b, 10)
  assert fits_search.search(run, cap=64)["max_per_device_batch"] == 0 and calls == [1]
  run, calls = _fake(lambda b: 50 * b, 60)
  assert fits_search.search(run, cap=64)["max_per_device_batch"] == 1 and calls == [1, 2]


def test_search_matches_brute_force_on_random_convex_and_concave_curves():
  rng = random.Random(0)
  for _ in range(300):
    base, slope, bend = rng.uniform(0, 50), rng.uniform(0.1, 20), rng.uniform(-0.2, 0.5)
    curve = lambda b, base=base, slope=slope, bend=bend: base + slope * b + bend * b ** 1.5
    limit, cap = rng.uniform(20, 400), rng.choice([1, 2, 7, 64])
    run, calls = _fake(curve, limit, oom_peak=rng.random() < 0.5)
    assert fits_search.search(run, cap)["max_per_device_batch"] == _truth(curve, limit, cap)
    assert len(calls) == len(set(calls)) <= 2 * 7 + 3  # about twice bisection's at most


# ---- the cache: resume, skip, the state pre-check ---------------------------------------------

class _Killed(Exception):
  pass


def _plan(state_bytes=1, limit=100):
  return lambda cell: {"platform": "tpu", "batch_unit": 4, "name": "x", "params_total": 1,
                       "state": {"total_bytes": state_bytes}, "limit_bytes": limit}


def test_an_interrupted_cell_resumes_from_its_compiles_and_a_done_cell_is_skipped(tmp_path):
  cell, versions = Cell(Row("configs/dense.py:tiny", "fsdp"), "v5p-8"), {"jax": "x"}
  path = tmp_path / "fits.json"
  curve = lambda b: 10 + 3 * b + 0.2 * b * b  # noqa: E731 (the prediction misses: 6 compiles)
  whole = fits_search.search(_fake(curve, 100)[0], 64)
  fake, calls = _fake(curve, 100)

  def dies_after_3(c, plan, b):
    if len(calls) == 3:
      raise _Killed
    return fake(b)
  results = fits.Results(path)
  entry = fits.prepare(cell, results, versions, plan_fn=_plan())
  with pytest.raises(_Killed):
    fits.run_cell(cell, entry, results, dies_after_3)
  saved = json.loads(path.read_text())["cells"]
  assert [list(e["trials"]) for e in saved.values()] == [[str(b) for b in whole["order"][:3]]]

  again = fits.Results(path)  # a new process reading the file
  resumed = []
  entry = fits.prepare(cell, again, versions, plan_fn=_plan())
  entry = fits.run_cell(cell, entry, again,
                        lambda c, p, b: resumed.append(b) or fake(b))
  assert entry["status"] == "done" and resumed == whole["order"][3:]
  assert entry["search"] == whole and whole["max_per_device_batch"] == _truth(curve, 100, 64)
  third = fits.Results(path)
  entry = fits.prepare(cell, third, versions, plan_fn=_plan())
  fits.run_cell(cell, entry, third, lambda c, p, b: pytest.fail("a done cell was compiled"))
  other = fits.prepare(cell, third, {"jax": "y"}, plan_fn=_plan())  # new versions: a new cell
  assert "status" not in other and len(json.loads(path.read_text())["cells"]) == 2


def test_a_state_over_the_limit_is_not_compiled_and_errors_are_retried(tmp_path):
  cell = Cell(Row("configs/dense.py:tiny", "fsdp"), "v5p-8")
  results = fits.Results(tmp_path / "fits.json")
  entry = fits.prepare(cell, results, {}, plan_fn=_plan(state_bytes=101))
  fits.run_cell(cell, entry, results, lambda c, p, b: pytest.fail("compiled"))
  assert entry["status"] == "state_exceeds_limit" and not entry["trials"]
  assert "state alone" in fits_report.row("x", fits_report.summarize(entry))

  def broken(c, p, b):
    raise fits.CompileError("b=1: ValueError: no")
  cell2 = Cell(Row("configs/dense.py:tiny", "fsdp", variant="v"), "v5p-8")
  entry = fits.prepare(cell2, results, {}, plan_fn=_plan())
  fits.run_cell(cell2, entry, results, broken)
  assert entry["status"] == "error" and "ValueError: no" in entry["error"]
  fake, _ = _fake(lambda b: b, 1e9)
  fits.run_cell(cell2, entry, results, lambda c, p, b: fake(b))
  assert entry["status"] == "done" and entry["error"] is None


def test_precheck_bytes_follow_the_shardings():
  """fsdp over 4 chips splits the dense tiny weights 4 ways (norm scales replicated); the
  memory tiny value pool is replicated (rows: no mesh axis) unless its columns go to fsdp."""
  dense = fits.plan(Cell(Row("configs/dense.py:tiny", "fsdp"), "v5p-8"))
  state = dense["state"]
  assert state["params_bytes"] == pytest.approx(4 * dense["params_total"] / 4, rel=0.03)
  assert state["opt_state_bytes"] == pytest.approx(2 * state["params_bytes"], rel=0.01)
  assert dense["batch_unit"] == 4 and dense["limit_bytes"] == 102005473280
  mem = fits.plan(Cell(Row("configs/memory.py:tiny", "fsdp"), "v5p-8"))
  split = fits.plan(Cell(Row("configs/memory.py:tiny", "fsdp", (
      ("mesh.rules", (("mem_dim", "fsdp"),)),)), "v5p-8"))
  values = 4 * 32 ** 2 * 64  # float32 [N, D]
  assert mem["state"]["params_bytes"] - split["state"]["params_bytes"] == pytest.approx(
      values * 3 / 4, rel=0.01)


# ---- one real cell ----------------------------------------------------------------------------

def _tpu_compiler():
  env = fits.compiler_env("tpu", str(REPO / ".tpu-compiler"))
  if env is None:
    why = ("no TPU compiler environment: set SPARSEJAX_TPU_PYTHON or pip install --no-deps "
           "--target .tpu-compiler libtpu==0.0.48.1")
    if os.environ.get("SPARSEJAX_REQUIRE_TPU_COMPILE") == "1":
      pytest.fail(why)
    pytest.skip(why)
  return env


def test_real_cell_dense_tiny_v5p8_and_its_markdown_row(tmp_path):
  compilers = {"tpu": _tpu_compiler()}
  cell = Cell(Row("configs/dense.py:tiny", "fsdp"), "v5p-8")
  results = fits.Results(tmp_path / "fits.json")
  entry = fits.prepare(cell, results, fits.versions("tpu", compilers["tpu"]), cap=2)
  entry = fits.run_cell(cell, entry, results, lambda c, p, b: fits.subprocess_compile(
      c, p, b, compilers=compilers, timeout_s=300), cap=2)
  assert entry["status"] == "done", entry.get("error")
  assert entry["search"]["order"] == [1, 2] and entry["search"]["capped"]
  rec = entry["trials"]["2"]
  assert rec["fits"] and rec["global_batch"] == 8 and rec["per_device_batch"] == 2.0
  assert ("python -m sparsejax.compile_check --config configs/dense.py:tiny --target v5p-8 "
          "--global_batch=8 --config.mesh.preset=fsdp") in rec["fits_run"]["command"]
  assert entry["versions"]["libtpu"] == rec["versions"]["libtpu"]

  report = fits_report.write(json.loads((tmp_path / "fits.json").read_text()),
                             [(cell.row.id, "v5p-8")], tmp_path / "fits.md",
                             results_path="fits.json", cap=2)
  line = next(x for x in report.text.splitlines() if x.startswith("| dense:tiny |"))
  cols = [c.strip() for c in line.strip("|").split("|")]
  mem, by_kind = rec["memory"], rec["collectives"]["by_kind"]
  assert cols[5:10] == ["2 (cap)", "8", str(8 * rec["seq_len"]),
                        f"{mem['peak_bytes'] / 2 ** 30:.2f} GiB",
                        f"{100 * mem['peak_fraction_of_hbm']:.1f}%"]
  shown = dict(re.findall(r"(AG|RS|AR|A2A|CP) (\d+) \(", cols[10]))
  names = {"AG": "all-gather", "RS": "reduce-scatter", "AR": "all-reduce", "A2A": "all-to-all",
           "CP": "collective-permute"}
  assert shown and {k: int(v) for k, v in shown.items()} == {
      k: by_kind[names[k]]["count"] for k in shown}
  assert all(by_kind[n]["count"] == 0 for k, n in names.items() if k not in shown)
  assert cols[11].startswith(f"{rec['roofline_s'] * 1e3:.1f} ms (comm ")
  assert cols[13].startswith(f"{rec['compile_s']:.0f} s (2: ")
  assert "dense:tiny" in report.headline[0] and "2 x 64 tokens per device" in report.headline[0]
