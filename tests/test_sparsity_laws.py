"""Scaling laws of weight-sparse runs (issue 13, "Accounting and scaling laws"): synthetic
sparsity-sweep records (record.json files in a temporary sweep root) drawn from known laws ->
the average-parameter law L = E + A/N̄^α + B/D^β recovers its parameters with N̄ from a cubic GMP
schedule over [0.25T, 0.75T]; the Frantar et al. law recovers its parameters with the NON-ZERO N;
the two are compared on the same points; refusals without weight-sparse runs; runs without
weight_sparsity (MoE) never enter the pooled Frantar fit; the sweep report
(experiments/sparsity_report.py) answers the fixed-budget question and carries both laws."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from sparsejax.scaling import analyze as fitcli
from sparsejax.scaling import fit as fitlib
from sparsejax.scaling import avg_params, records as recordslib
from sparsejax.scaling import sparse_laws as sl
from sparsejax.scaling import sparse_fits
from sparsejax.scaling.sparse_fits import (AVG_PARAMS_NEEDS_WEIGHT_SPARSITY,
                                           FRANTAR_NEEDS_WEIGHT_SPARSITY)

REPO = pathlib.Path(__file__).resolve().parent.parent
PROG = "sparsejax.scaling.analyze"

# Generating laws (in the range of the papers' fits, not their values).
AVG = {"E": 1.8, "A": 400.0, "alpha": 0.34, "B": 410.0, "beta": 0.28}
FRANTAR = {"a_S": 300.0, "b_S": 0.8, "c_S": 100.0, "b_N": 0.35, "a_D": 2e8, "b_D": 0.4, "c": 1.7}
HEAD = 0.2                        # share of N in the (never pruned) output head
STEPS = 1000                      # T of the GMP schedule
LEVELS = (0.0, 0.5, 0.75, 0.875)  # final weight sparsity s_f of the targeted weights
SIZES = np.logspace(6, 8.5, 4)    # dense N (params_active_total)
TOKENS = np.logspace(8, 10.5, 4)  # D
SIGMA = 0.002                     # multiplicative log-normal loss noise of the noisy cases
# Tolerances. Noiseless: the polished L-BFGS optimum (absolute on exponents, relative on E, A,
# B; the fits land within 1e-6). Noisy (0.2%, 64 runs): about 3.5 standard deviations of the
# error over 8 noise seeds (alpha, beta: sd 0.0014, largest error 0.003; E: sd 0.6%, largest 0.9%).
EXACT_EXP, EXACT_REL = 1e-3, 1e-2
NOISY_EXP = {"alpha": 0.005, "beta": 0.005}
NOISY_E_REL = 0.02
# Fewer L-BFGS starts for the tests about comparison and reporting (the recovery tests use the
# CLI's default grids): these synthetic laws are found from them too, in a fraction of the time.
FEW_STARTS = {"approach3": {"alpha": (0.5,), "beta": (0.5,), "e": (0.0,), "a": (0.0, 10.0),
                            "b": (0.0, 10.0)},
              "sparse": {"p1": (0.0, 5.0), "e1": (1.0,), "p0": (0.0, 5.0), "alpha": (0.4,),
                         "q": (0.0, 10.0), "beta": (0.4,), "lc": (0.0,)}}


@pytest.fixture
def few_starts(monkeypatch):
  monkeypatch.setattr(fitlib, "DEFAULT_GRID", FEW_STARTS["approach3"])
  monkeypatch.setattr(sl, "DEFAULT_GRID", FEW_STARTS["sparse"])


def cubic_gmp(t, s_f, T=STEPS):
  """Zhu & Gupta's schedule over [0.25T, 0.75T]: 0 before, s_f after, cubic in between."""
  t0, t1 = 0.25 * T, 0.75 * T
  u = np.clip((np.asarray(t, dtype=np.float64) - t0) / (t1 - t0), 0.0, 1.0)
  return s_f * (1 - (1 - u) ** 3)


def mean_sparsity(s_f):
  return float(cubic_gmp(np.arange(STEPS), s_f).mean())


def record(name, family, N, D, s_f, loss, *, method="gmp", seed=0, **extra):
  """A done run's record as the sweep runner writes it for a weight-sparse run (s_f None: an
  ordinary run without the sparsity keys)."""
  rec = {"name": name, "config_hash": "0" * 40, "family": family, "base": f"configs/{family}.py",
         "overrides": {}, "seed": seed, "status": "done", "params_total": 1.5 * N,
         "params_active_total": N, "params_active_non_embedding": (1 - HEAD) * N,
         "params_active_per_token": 1.1 * N, "granularity": None, "num_experts": None,
         "top_k": None, "tokens": D, "total_flops": 6.3 * N * D, "flops_per_token": 6.3 * N,
         "eval_loss": float(loss), "wall_s": 1.0}
  if s_f is not None:
    targeted = (1 - HEAD) * N
    final, mean = s_f * targeted, mean_sparsity(s_f) * targeted
    rec.update(sparsity_method=method, weight_sparsity=s_f, params_pruned_final=final,
               params_pruned_mean=mean, flops_per_token_sparse=6.3 * N - 6 * final,
               total_flops_sparse=(6.3 * N - 6 * final) * D)
  return {**rec, **extra}


def write(root, rec):
  (root / rec["name"]).mkdir(parents=True)
  (root / rec["name"] / "record.json").write_text(json.dumps(rec))


def n_counts(N, s_f):
  """(N_nonzero, N̄) of a synthetic run."""
  t = (1 - HEAD) * N
  return N - s_f * t, N - mean_sparsity(s_f) * t


def make_sweep(root, law="avg", family="dense", sigma=0.0, seed=0, levels=LEVELS):
  rng = np.random.default_rng(seed)
  for s_f in levels:
    for i, N in enumerate(SIZES):
      for j, D in enumerate(TOKENS):
        nz, avg = n_counts(N, s_f)
        loss = (AVG["E"] + AVG["A"] / avg ** AVG["alpha"] + AVG["B"] / D ** AVG["beta"]
                if law == "avg" else float(sl.frantar_loss(s_f, nz, D, **FRANTAR)))
        loss *= np.exp(sigma * rng.standard_normal())
        write(root, record(f"{family}-s{s_f:g}-n{i}-d{j}", family, N, D, s_f, loss))
  return root


def test_cubic_schedule_mean_is_five_eighths_of_final():
  for s_f in LEVELS:
    assert abs(mean_sparsity(s_f) - 0.625 * s_f) <= 2e-3 * s_f
  assert cubic_gmp(0.25 * STEPS, 0.8) == 0 and cubic_gmp(0.75 * STEPS, 0.8) == pytest.approx(0.8)


def test_record_keys_documented_and_validated(tmp_path):
  for k in recordslib.SPARSITY_KEYS:
    assert k in recordslib.__doc__
  write(tmp_path, record("ok", "dense", 1e6, 1e9, 0.5, 3.0))
  write(tmp_path, record("bad", "dense", 1e6, 1e9, 0.5, 3.0, params_pruned_mean="many"))
  write(tmp_path, record("bad2", "dense", 1e6, 1e9, 0.5, 3.0, sparsity_method=5))
  recs, problems = recordslib.load_records(tmp_path)
  assert [r["name"] for r in recs] == ["ok"]
  assert [p[1] for p in problems] == ["params_pruned_mean is 'many', not a number or null",
                                      "sparsity_method is 5, not a string or null"]


def test_rows_carry_nonzero_and_average_n(tmp_path):
  write(tmp_path, record("sparse", "dense", 1e6, 1e9, 0.5, 3.0))
  write(tmp_path, record("plain", "dense", 1e6, 1e9, None, 3.0))
  old = record("old", "dense", 1e6, 1e9, 0.5, 3.0)
  del old["params_pruned_final"], old["params_pruned_mean"]
  write(tmp_path, old)
  write(tmp_path, record("gone", "dense", 1e6, 1e9, 0.5, 3.0, params_pruned_final=2e6))
  for n_field, n in (("params_active_total", 1e6), ("params_active_non_embedding", 0.8e6)):
    rows, problems = fitcli.collect(tmp_path, n_field=n_field)
    by = {r["name"]: r for r in rows}
    assert by["sparse"]["N"] == n
    assert by["sparse"]["N_nonzero"] == pytest.approx(n - 0.5 * 0.8e6, rel=1e-12)
    assert by["sparse"]["N_avg"] == pytest.approx(n - mean_sparsity(0.5) * 0.8e6, rel=1e-12)
    assert by["plain"]["N_nonzero"] == by["plain"]["N_avg"] == n and by["plain"]["S"] is None
    assert by["old"]["N_nonzero"] == n and by["old"]["pruned_source"] == avg_params.MISSING_PRUNED
    assert [p["name"] for p in problems] == ["gone"]
    assert "params_pruned_final = 2e+06 is not below N" in problems[0]["reason"]
  notes = fitcli._notes(rows, problems, "params_active_non_embedding")
  assert any(n.startswith("1 weight-sparse record(s) lack params_pruned_final") and "old" in n
             for n in notes)


# ----------------------------------------------------------------------------- recovery

def _fit(data, form, scope):
  (fit,) = [f for f in data["sparse_laws"][form]["fits"] if f["scope"] == scope]
  return fit


def sparse_fit(root, mode, bootstrap=0):
  """The sparse laws of a sweep root as analyze fits them (rows from records; no family fits)."""
  rows, problems = fitcli.collect(root)
  assert problems == []
  by_family = {}
  for r in rows:
    by_family.setdefault(r["family"], []).append(r)
  return {"sparse_laws": fitcli.to_json(sparse_fits.fit_sparse(
      rows, by_family, mode, huber_delta=1e-3, bootstrap=bootstrap, seed=0))}


def test_avg_params_law_recovers_its_parameters(tmp_path):
  make_sweep(tmp_path)
  data = sparse_fit(tmp_path, "avg_params")
  assert list(data["sparse_laws"]) == ["avg_params"]
  fit = _fit(data, "avg_params", "dense")
  assert fit["n_points"] == len(LEVELS) * len(SIZES) * len(TOKENS)
  assert fit["levels"] == list(LEVELS)
  for k in ("alpha", "beta"):
    assert abs(fit["params"][k] - AVG[k]) < EXACT_EXP, (k, fit["params"])
  for k in ("E", "A", "B"):
    assert fit["params"][k] == pytest.approx(AVG[k], rel=EXACT_REL), (k, fit["params"])


def test_avg_params_law_with_noise_and_intervals(tmp_path):
  make_sweep(tmp_path, sigma=SIGMA, seed=3)
  data = sparse_fit(tmp_path, "avg_params", bootstrap=10)
  fit = _fit(data, "avg_params", "dense")
  for k, tol in NOISY_EXP.items():
    assert abs(fit["params"][k] - AVG[k]) < tol, (k, fit["params"])
    lo, hi = fit["intervals"][k]
    assert lo <= fit["params"][k] <= hi
  assert fit["params"]["E"] == pytest.approx(AVG["E"], rel=NOISY_E_REL)
  assert set(fit["intervals"]) == {"E", "A", "alpha", "B", "beta"}


def test_frantar_recovers_its_parameters_with_nonzero_n(tmp_path):
  make_sweep(tmp_path, law="frantar")
  data = sparse_fit(tmp_path, "frantar")
  fit = _fit(data, "frantar", "dense")
  assert fit["n_points"] == 64 and fit["levels"] == list(LEVELS)
  for k in sl.FORMS["frantar"]["exponents"]:
    assert abs(fit["params"][k] - FRANTAR[k]) < EXACT_EXP, (k, fit["params"])
  assert fit["params"]["c"] == pytest.approx(FRANTAR["c"], rel=EXACT_REL)
  assert data["sparse_laws"]["frantar"]["N"] == "N_nonzero"


@pytest.mark.parametrize("law, better", [("avg", "avg_params"), ("frantar", "frantar")])
def test_both_laws_compared_on_the_same_points(tmp_path, few_starts, law, better):
  make_sweep(tmp_path, law=law)
  data = sparse_fit(tmp_path, "auto")
  assert list(data["sparse_laws"]) == ["frantar", "granularity", "avg_params"]
  (cmp_,) = data["sparse_laws"]["avg_params"]["comparison"]
  assert cmp_["scope"] == "dense" and cmp_["n_points"] == 64 and cmp_["better"] == better
  laws = cmp_["laws"]
  assert laws[better]["rmse_log_l"] < 1e-4  # the generating law fits exactly
  other = laws["frantar" if better == "avg_params" else "avg_params"]
  assert other["huber_per_point"] > 10 * laws[better]["huber_per_point"]
  assert other["rmse_log_l"] > 10 * laws[better]["rmse_log_l"]
  assert [p["name"] for p in cmp_["points"]] == sorted(p.name for p in tmp_path.iterdir())
  if law == "avg":  # the report's section and plot (sparsejax.scaling.report / plots)
    from sparsejax.scaling import plots, report  # defers matplotlib to the one case that draws
    data["conventions"] = fitcli.conventions("params_active_total", "eval_loss", bootstrap=0,
                                             huber_delta=1e-3, seed=0, budget_tol=0.3)
    text = "\n".join(report._sparse(data))
    assert "**Which weight-sparse law fits better**" in text
    assert "| dense | 64 |" in text and "| average-parameter |" in text
    assert plots.sparse_laws(data, tmp_path) == "sparse_laws.png"
    assert (tmp_path / "sparse_laws.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- scopes, refusals

def test_pooled_fits_take_only_weight_sparse_families(tmp_path):
  # Two weight-sparse families from the Frantar law, two levels each (too few to fit one family
  # alone; four pooled), and MoE runs without weight_sparsity whose losses would spoil the fit:
  # never an input, not even pooled.
  for fam, levels in (("a", LEVELS[:2]), ("b", LEVELS[2:])):
    for s_f in levels:
      for i, N in enumerate(SIZES):
        for j, D in enumerate(TOKENS[:3]):
          nz, _ = n_counts(N, s_f)
          write(tmp_path, record(f"{fam}-{s_f:g}-{i}-{j}", fam, N, D, s_f,
                                 sl.frantar_loss(s_f, nz, D, **FRANTAR)))
  for i, N in enumerate(SIZES):
    write(tmp_path, record(f"moe-{i}", "moe", N, 1e9, None, 9.0, granularity=1, num_experts=8,
                           top_k=2))
  data = sparse_fit(tmp_path, "frantar")
  (pooled,) = data["sparse_laws"]["frantar"]["fits"]
  assert pooled["scope"] == "all families" and pooled["n_points"] == 2 * 2 * 4 * 3
  assert pooled["levels"] == list(LEVELS)
  for k in sl.FORMS["frantar"]["exponents"]:
    assert abs(pooled["params"][k] - FRANTAR[k]) < EXACT_EXP, (k, pooled["params"])
  skipped = data["sparse_laws"]["frantar"]["skipped"]
  assert [s["scope"] for s in skipped] == ["a", "b"]
  assert all(s["reason"].startswith("S does not vary enough") for s in skipped)
  # The average-parameter law pools the same runs; one weight-sparse family: no pool at all.
  rows, _ = fitcli.collect(tmp_path)
  by_family = {f: [r for r in rows if r["family"] == f] for f in ("a", "b", "moe")}
  for form in ("frantar", "avg_params"):
    scopes = sparse_fits._sparse_scopes(by_family, form)
    assert [(s, len(rs)) for s, rs in scopes] == [("all families", 48), ("a", 24), ("b", 24)]
    assert all(r["family"] != "moe" for _, rs in scopes for r in rs)
    del_b = {f: rs for f, rs in by_family.items() if f != "b"}
    assert [s for s, _ in sparse_fits._sparse_scopes(del_b, form)] == ["a"]


@pytest.mark.parametrize("mode, message", [("avg_params", AVG_PARAMS_NEEDS_WEIGHT_SPARSITY),
                                           ("frantar", FRANTAR_NEEDS_WEIGHT_SPARSITY)])
def test_weight_sparse_laws_refused_without_weight_sparse_runs(tmp_path, capsys, mode, message):
  for i, N in enumerate(SIZES):  # MoE runs and a dense baseline at S = 0: nothing pruned
    write(tmp_path, record(f"moe-{i}", "moe", N, 1e9, None, 3.0, granularity=2))
    write(tmp_path, record(f"dense-{i}", "dense", N, 1e9, 0.0, 3.0))
  assert fitcli.main(["--root", str(tmp_path), "--no-plots", "--bootstrap", "0",
                      "--sparse", mode]) == 2
  assert capsys.readouterr().err.strip().splitlines() == [f"{PROG}: error: {message}"]
  assert not (tmp_path / "report").exists()
  fitcli.main(["--root", str(tmp_path), "--no-plots", "--bootstrap", "0"])  # auto: no law
  data = json.loads((tmp_path / "report" / "fits.json").read_text())
  assert "avg_params" not in data["sparse_laws"] and data["sparse_laws"]["frantar"]["fits"] == []


# ----------------------------------------------------------------------------- sweep report

def _report_module():
  spec = importlib.util.spec_from_file_location("sparsity_report",
                                                REPO / "experiments" / "sparsity_report.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_sparsity_report_answers_the_budget_question(tmp_path, few_starts):
  root, out = tmp_path / "root", tmp_path / "out"
  root.mkdir()
  # Loss from the average-parameter law; two seeds of every configuration with 0.2% noise.
  rng = np.random.default_rng(0)
  cleans = []
  for s_f in LEVELS:
    for i, N in enumerate(SIZES):
      for j, D in enumerate(TOKENS):
        _, avg = n_counts(N, s_f)
        clean = AVG["E"] + AVG["A"] / avg ** AVG["alpha"] + AVG["B"] / D ** AVG["beta"]
        cleans.append(clean)
        for seed in (0, 1):
          write(root, record(f"s{s_f:g}-n{i}-d{j}-seed{seed}", "dense", N, D, s_f,
                             clean * np.exp(SIGMA * rng.standard_normal()), seed=seed,
                             sparsity_method="gmp"))
  write(root, {**record("crashed", "dense", 1e6, 1e9, 0.5, 3.0), "status": "failed"})
  mod = _report_module()
  assert mod.main(["--root", str(root), "--out", str(out), "--bootstrap", "5", "--no-plots"]) == 0
  res = json.loads((out / "results.json").read_text())
  report = (out / "REPORT.md").read_text()
  assert len(res["runs"]) == 128 and [p["name"] for p in res["problems"]] == ["crashed"]
  # The seed noise is the generating noise, SIGMA x loss (pooled over 64 pairs: within ±25%).
  sigma = res["seed_noise"]["sigma"]
  expected = SIGMA * float(np.sqrt(np.mean(np.square(cleans))))
  assert res["seed_noise"]["dof"] == 64 and 0.75 < sigma / expected < 1.25
  # Dense-equivalent budgets group each (N, D) with all four levels; under this law pruning only
  # removes capacity at equal dense FLOPs, so dense wins every budget where levels compete.
  dense = res["best_at_budget"]["dense_equivalent"]
  assert {r["best"] for r in dense if r["runner_up"]} == {"dense"}
  assert all(r["observed_levels"] == ["dense", "gmp 0.5", "gmp 0.75", "gmp 0.875"]
             for r in dense)
  assert res["wins"]["dense_equivalent"] == {"dense": len([r for r in dense if r["runner_up"]])}
  # Sparse FLOPs: a run's sparse FLOPs follow its non-zero count, and the levels are read off
  # their frontiers; the answer is stated for both conventions.
  by = {r["name"]: r for r in res["runs"]}
  r = by["s0.5-n0-d0-seed0"]
  assert r["flops_sparse"] == pytest.approx((6.3 * r["N"] - 6 * 0.4 * r["N"]) * r["D"])
  assert res["wins"]["sparse"]
  assert "## Answer: which sparsity gives the lowest loss at a fixed FLOP budget?" in report
  assert "- **dense-equivalent FLOPs** (training FLOPs counting every weight" in report
  assert "- **sparse FLOPs** (training FLOPs counting only the weights non-zero" in report
  assert f"seed noise σ = {sigma:.3g}" in report
  # Both laws, fitted by the analyze CLI into OUT/fits, with their parameters in the report.
  fits = res["fits"]
  assert fits["exit_code"] == 0
  assert "**Which weight-sparse law fits better**" in (out / "fits" / "REPORT.md").read_text()
  (avg,) = [f for f in fits["avg_params"]["fits"] if f["scope"] == "dense"]
  assert abs(avg["params"]["alpha"] - AVG["alpha"]) < NOISY_EXP["alpha"]
  assert fits["frantar"]["fits"] and fits["comparison"][0]["better"] == "avg_params"
  for text in ("**Average-parameter law", "**Frantar et al. 2023**", "| dense | 128 |",
               "| dense | 128 | 1.8"):
    assert text in report, text
  # The plot (left out above: matplotlib's time): both FLOP axes, one curve per level.
  runs, _ = mod.load_runs(root, "eval_loss", "params_active_total")
  mod.plot(mod.configurations(runs), out / "loss_vs_flops.png")
  assert (out / "loss_vs_flops.png").read_bytes()[:4] == b"\x89PNG"


def test_frontier_interpolation():
  mod = _report_module()
  cs = [{"f": 1.0, "L": 4.0}, {"f": 4.0, "L": 2.0}, {"f": 2.0, "L": 5.0}, {"f": 8.0, "L": 2.5}]
  front = mod.frontier(cs, "f")
  assert front == [(1.0, 4.0), (4.0, 2.0)]  # beaten runs dropped
  assert mod.loss_at(front, 2.0) == pytest.approx(np.sqrt(8.0))  # log-log midpoint
  assert mod.loss_at(front, 0.5) is None and mod.loss_at(front, 5.0) is None
