"""``python -m sparsejax.scaling.analyze``: a fake sweep root of synthetic records (two families
drawn from known Chinchilla-form laws, 3 isoFLOP budgets x 4 sizes, plus three bad records) ->
REPORT.md, fits.json and PNGs, recovered exponents, the problems listed; sparse-law recovery on
synthetic data; exit codes."""

import json
import subprocess
import sys

import numpy as np
import pytest

from sparsejax.scaling import analyze as fitcli
from sparsejax.scaling import family_fits
from sparsejax.scaling import sparse_laws as sl

PROG = "sparsejax.scaling.analyze"  # prefix of its stderr lines

# Two families: dense with the Hoffmann et al. approach-3 parameters, and a sparse family with
# 4x as many total as active parameters (S = 0.75) and its own law.
LAWS = {
    "dense": {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28, "total": 1.0},
    "moe": {"E": 1.60, "A": 300.0, "B": 500.0, "alpha": 0.30, "beta": 0.32, "total": 4.0},
}
BUDGETS = (1e18, 1e19, 1e20)      # recorded total_flops (6N + attention) per isoFLOP group
SPREAD = np.logspace(-0.6, 0.6, 4)  # model sizes around each budget's true N_opt
ATTN = 3e6                        # attention FLOPs per token / 6: total = 6 (N + ATTN) D
SIGMA = 0.002                     # multiplicative log-normal noise on the loss
# Absolute tolerances on the recovered exponents from 12 noisy runs per family (3 budgets x 4
# sizes; the bootstrap intervals are wide at this size, so these are set from the fits' spread):
A_TOL = 0.05                      # a = beta / (alpha + beta) of approaches 3 and 2
ALPHA_TOL = 0.08                  # alpha, beta of approach 3


def law_loss(law, N, D):
  return law["E"] + law["A"] / N ** law["alpha"] + law["B"] / D ** law["beta"]


def true_a(law):
  return law["beta"] / (law["alpha"] + law["beta"])


def n_opt(law, C):
  al, be = law["alpha"], law["beta"]
  g = (al * law["A"] / (be * law["B"])) ** (1 / (al + be))
  return g * (C / 6) ** true_a(law)


def write_record(root, name, rec):
  (root / name).mkdir(parents=True)
  (root / name / "record.json").write_text(json.dumps(rec) if isinstance(rec, dict) else rec)


HEAD = 0.2  # synthetic records: the output head is this fraction of params_active_total


def base_record(name, family, N, D, L, total):
  return {"name": name, "config_hash": "0" * 40, "family": family, "base": f"configs/{family}.py",
          "overrides": {}, "seed": 0, "params_total": total, "params_active_total": N,
          "params_active_non_embedding": (1 - HEAD) * N, "params_active_per_token": 1.1 * N,
          "granularity": None, "num_experts": None, "top_k": None,
          "flops_per_token": 6 * (N + ATTN), "steps": 100, "tokens": D,
          "total_flops": 6 * (N + ATTN) * D, "flops_convention": "6N+attention",
          "status": "done", "final_step": 100, "eval_loss": L, "wall_s": 10.0}


def make_sweep(root):
  rng = np.random.default_rng(0)
  for family, law in LAWS.items():
    for i, budget in enumerate(BUDGETS):
      for j, n in enumerate(n_opt(law, budget) * SPREAD):
        d = budget / (6 * (n + ATTN))
        loss = law_loss(law, n, d) * np.exp(SIGMA * rng.standard_normal())
        write_record(root, f"{family}-n{j}-b{i}",
                     base_record(f"{family}-n{j}-b{i}", family, n, d, loss, law["total"] * n))
  write_record(root, "broken", '{"name": "broken", "status": "do')
  write_record(root, "partial", {"name": "partial", "status": "done"})
  rec = base_record("stopped", "dense", 1e8, 1e9, 3.0, 1e8)
  write_record(root, "stopped", {**rec, "status": "incomplete"})
  return root


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory):
  return make_sweep(tmp_path_factory.mktemp("sweep"))


@pytest.fixture(scope="module")
def cli_run(sweep_root):
  proc = subprocess.run([sys.executable, "-m", PROG, "--root", str(sweep_root),
                         "--bootstrap", "30"], capture_output=True, text=True, timeout=300)
  return proc, sweep_root / "report"


def test_cli_writes_report_json_and_pngs(cli_run):
  proc, out = cli_run
  assert proc.returncode == 0, proc.stderr
  report = (out / "REPORT.md").read_text()
  data = json.loads((out / "fits.json").read_text())
  pngs = ["loss_vs_compute.png", "isoflop_dense.png", "isoflop_moe.png",
          "optimal_allocation.png", "residuals.png"]
  for name in pngs:
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert f"]({name})" in report  # embedded with a relative link
  for section in ("## Sweep summary", "## Fitted parameters", "## Compute-optimal predictions",
                  "## Approach 2", "## Sparse scaling laws", "## Problems"):
    assert section in report
  assert data["conventions"]["n_field"] == "params_active_total"  # the default: --n total
  assert data["conventions"]["n"] == "total"
  assert "**N** = `params_active_total`, chosen by `--n total` (the default)" in report
  assert "output head at the true vocabulary" in report
  # The headline table goes to stdout as is, and appears in the report.
  headline = proc.stdout.strip()
  assert headline in report and headline.splitlines()[2].startswith("| family | runs | E |")
  assert [line.split(" | ")[0] for line in headline.splitlines()[4:]] == ["| dense", "| moe"]


def test_cli_recovers_exponents(cli_run):
  data = json.loads((cli_run[1] / "fits.json").read_text())
  assert set(data["families"]) == set(LAWS)
  for family, law in LAWS.items():
    f = data["families"][family]
    assert f["runs"] == 12 and len(f["budgets"]) == 3
    assert all(b["runs"] == 4 and b["sizes"] == 4 for b in f["budgets"])
    a3, a2 = f["approach3"], f["approach2"]
    assert abs(a3["alpha"] - law["alpha"]) < ALPHA_TOL, (family, a3)
    assert abs(a3["beta"] - law["beta"]) < ALPHA_TOL, (family, a3)
    assert abs(a3["a"] - true_a(law)) < A_TOL, (family, a3["a"])
    assert a3["b"] == pytest.approx(1 - a3["a"])
    assert abs(a2["a"] - true_a(law)) < A_TOL, (family, a2["a"])
    assert a2["n_used"] == 3 and all(m["ok"] for m in a2["minima"])
    assert f["warnings"] == []
    lo, hi = a3["intervals"]["a"]
    assert lo < a3["a"] < hi
    # Budgets are labelled by the quantity that grouped them: the records' total_flops.
    np.testing.assert_allclose([b["total_flops"] for b in f["budgets"]], BUDGETS, rtol=1e-9)
    assert all(b["C_6ND"] < b["total_flops"] for b in f["budgets"])  # 6ND leaves out attention
    assert a2["compute"] == "total_flops"
    np.testing.assert_allclose([m["total_flops"] for m in a2["minima"]], BUDGETS, rtol=1e-9)
    for m in a2["minima"]:  # D* read off the budget's runs at N* (a parabola in log-log: 0.5%)
      assert 6 * (m["N_opt"] + ATTN) * m["D_opt"] == pytest.approx(m["total_flops"], rel=5e-3)
    # Predictions: each budget plus 10x and 100x the largest; approach 3 at C = 6 N_opt D_opt,
    # approach 2 at F = total FLOPs, whose runs spend 6 (N + ATTN) D.
    labels = [p["label"] for p in f["predictions"]]
    assert labels == ["budget"] * 3 + ["10x largest", "100x largest"]
    largest = max(f["budgets"], key=lambda b: b["total_flops"])
    assert f["predictions"][-1]["C_6ND"] == pytest.approx(100 * largest["C_6ND"])
    assert f["predictions"][-1]["total_flops"] == pytest.approx(100 * largest["total_flops"])
    for p in f["predictions"]:
      a3p, a2p = p["approach3"], p["approach2"]
      assert 6 * a3p["N_opt"] * a3p["D_opt"] == pytest.approx(p["C_6ND"], rel=1e-9)
      # (the N* and D* lines are fitted apart, through noisy minima: consistent to 5%)
      assert 6 * (a2p["N_opt"] + ATTN) * a2p["D_opt"] == pytest.approx(p["total_flops"],
                                                                       rel=0.05)
      lo, hi = a3p["N_opt_ci"]
      assert lo <= a3p["N_opt"] <= hi
      # Within a factor 2 of the generating law's optimum (C here is 6ND, as in the law).
      assert 0.5 < a3p["N_opt"] / n_opt(law, p["C_6ND"]) < 2.0


def test_cli_lists_problems(cli_run, sweep_root):
  proc, out = cli_run
  data = json.loads((out / "fits.json").read_text())
  reasons = {p["name"]: p["reason"] for p in data["problems"]}
  assert set(reasons) == {"broken", "partial", "stopped"}
  assert "unreadable JSON" in reasons["broken"]
  assert "missing keys" in reasons["partial"]
  assert "'incomplete'" in reasons["stopped"]
  report = (out / "REPORT.md").read_text()
  err_lines = proc.stderr.splitlines()
  for name, reason in reasons.items():
    assert f"- `{name}` (" in report and reason in report
    assert sum(f"left out {name}: {reason}" in line for line in err_lines) == 1


def test_sparse_laws_skipped_with_reason(cli_run):
  # The moe family has 4x as many total as active parameters: not weight sparsity, so auto
  # skips the Frantar law (one line in the report, nothing on stderr) and fits nothing.
  proc, out = cli_run
  data = json.loads((out / "fits.json").read_text())
  frantar = data["sparse_laws"]["frantar"]
  assert frantar["fits"] == []
  (skip,) = frantar["skipped"]
  assert skip["reason"].startswith("no run records weight_sparsity > 0")
  assert f"- not fitted for all families: {skip['reason']}" in (out / "REPORT.md").read_text()
  assert "weight_sparsity" not in proc.stderr
  assert data["sparse_laws"]["granularity"]["fits"] == []
  assert all(r["S"] is None and r["G"] is None for r in data["runs"])


def test_fit_output_is_deterministic(cli_run, sweep_root, tmp_path, capsys):
  # In-process run with another --out: same fits to full precision, same PNG bytes as the
  # subprocess run (cli_run writes sweep_root/report; needed here, not just earlier by chance).
  assert cli_run[0].returncode == 0, cli_run[0].stderr
  assert fitcli.main(["--root", str(sweep_root), "--out", str(tmp_path), "--bootstrap", "30",
                      "--sparse", "none"]) == 0
  a = json.loads((tmp_path / "fits.json").read_text())
  b = json.loads((sweep_root / "report" / "fits.json").read_text())
  assert a["families"] == b["families"] and a["sparse_laws"] == {}
  assert (tmp_path / "residuals.png").read_bytes() == \
      (sweep_root / "report" / "residuals.png").read_bytes()
  assert "Not requested (--sparse none)" in (tmp_path / "REPORT.md").read_text()
  capsys.readouterr()


def test_exit_code_no_usable_records(tmp_path, capsys):
  write_record(tmp_path, "only", '{"oops"')
  assert fitcli.main(["--root", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 2 and err[0].startswith(f"{PROG}: left out only: unreadable JSON")
  assert err[1].startswith(f"{PROG}: error: no usable record") and "only:" in err[1]
  assert fitcli.main(["--root", str(tmp_path / "missing")]) == 2
  assert "is not a directory" in capsys.readouterr().err
  assert not (tmp_path / "report").exists()
  # `sparsejax fit` forwards to the same main.
  from sparsejax import cli
  with pytest.raises(SystemExit) as e:
    cli.main(["sparsejax", "fit", "--root", str(tmp_path / "missing")])
  assert e.value.code == 2 and "is not a directory" in capsys.readouterr().err


def test_missing_loss_field_is_a_problem(sweep_root, capsys):
  # The fake records have no eval_loss_smoothed: every done run is left out, saying so.
  assert fitcli.main(["--root", str(sweep_root), "--loss", "eval_loss_smoothed",
                      "--out", str(sweep_root / "unused")]) == 2
  err = capsys.readouterr().err.splitlines()
  assert f"{PROG}: left out dense-n0-b0: no eval_loss_smoothed" in err
  assert err[-1].startswith(f"{PROG}: error: no usable record")


def test_too_few_runs_is_exit_1_with_reasons(tmp_path, capsys):
  law = LAWS["dense"]
  for j, n in enumerate(n_opt(law, 1e19) * SPREAD[:2]):
    d = 1e19 / (6 * n)
    write_record(tmp_path, f"d{j}", base_record(f"d{j}", "dense", n, d, law_loss(law, n, d), n))
  assert fitcli.main(["--root", str(tmp_path), "--no-plots", "--bootstrap", "0"]) == 1
  data = json.loads((tmp_path / "report" / "fits.json").read_text())
  f = data["families"]["dense"]
  assert "at least 5 points" in f["approach3"]["skipped"]
  assert "approach 2 needs 2" in f["approach2"]["skipped"]
  assert "2 distinct size(s)" in f["approach2"]["skipped_budgets"][0]["reason"]
  capsys.readouterr()


def test_degenerate_fits_are_flagged():
  fam = {"approach3": {"E": 1e-170, "alpha": 30.9, "beta": 0.07},
         "approach2": {"a": -0.13, "n_used": 2}}
  text = "\n".join(family_fits.fit_warnings(fam, min_loss=3.2))
  for part in ("alpha = 30.9 is outside (0, 2]", "E = 1e-170 is ~0", "looks degenerate",
               "a = -0.13 is outside (0, 1)", "2 budgets"):
    assert part in text
  assert "beta" not in text
  fine = {"approach3": {"E": 1.7, "alpha": 0.34, "beta": 0.28}, "approach2": {"skipped": "x"}}
  assert family_fits.fit_warnings(fine, min_loss=2.0) == []


def test_isoflop_budget_grouping():
  rows = [{"total_flops": f, "N": float(i)} for i, f in enumerate([1.0, 1.2, 1.29, 3.0, 3.5, 9.0])]
  groups = family_fits.isoflop_budgets(rows, tol=0.3)
  assert [[r["total_flops"] for r in g] for g in groups] == [[1.0, 1.2, 1.29], [3.0, 3.5], [9.0]]
  assert len(family_fits.isoflop_budgets(rows, tol=0.1)) == 5


def test_importing_fit_does_not_import_matplotlib_or_jax():
  code = ("import sys, sparsejax.scaling.analyze, sparsejax.scaling.report, "
          "sparsejax.scaling.sparse_laws; "
          "assert 'matplotlib' not in sys.modules; "
          "assert not [m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'optax')]")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ----------------------------------------------------------------------------- sparse laws

# Test parameters in the range of the papers' fits (not their exact values).
FRANTAR = {"a_S": 300.0, "b_S": 0.8, "c_S": 100.0, "b_N": 0.35, "a_D": 2e8, "b_D": 0.4, "c": 1.7}
KRAJEWSKI = {"g": 2.1, "gamma": 0.58, "a": 18.1, "alpha": 0.115, "b": 30.8, "beta": 0.147,
             "c": 0.47}
SPARSE_NOISELESS_TOL = 1e-3  # exponents from noiseless data (absolute)
# Exponents from 0.2% noise, 100 runs (absolute): about 3.5 standard deviations of the error over
# 8 noise seeds. gamma is weakly determined (g / G^gamma is at most 11% of the N coefficient).
SPARSE_NOISY_TOL = {"b_S": 0.04, "b_N": 0.01, "b_D": 0.02, "gamma": 0.15, "alpha": 0.01,
                    "beta": 0.02}


def sparse_grid(levels):
  n, d, x = np.meshgrid(np.logspace(7, 10, 5), np.logspace(9, 11, 4), levels)
  return x.ravel(), n.ravel(), d.ravel()


@pytest.mark.parametrize("form, truth, levels", [
    ("frantar", FRANTAR, [0.0, 0.5, 0.75, 0.875, 0.9375]),
    ("granularity", KRAJEWSKI, [1.0, 2.0, 4.0, 8.0, 16.0]),
])
def test_sparse_law_recovery(form, truth, levels):
  x, n, d = sparse_grid(levels)
  loss_fn = sl.frantar_loss if form == "frantar" else sl.granularity_loss
  fitter = sl.fit_frantar if form == "frantar" else sl.fit_granularity
  clean = loss_fn(x, n, d, **truth)
  exact = fitter(x, n, d, clean)
  for k in sl.FORMS[form]["exponents"]:
    assert abs(exact.params[k] - truth[k]) < SPARSE_NOISELESS_TOL, (k, exact.params)
  np.testing.assert_allclose(exact.predict(x, n, d), clean, rtol=1e-5)
  noisy = clean * np.exp(0.002 * np.random.default_rng(1).standard_normal(clean.shape))
  r = fitter(x, n, d, noisy, bootstrap=10)
  for k in sl.FORMS[form]["exponents"]:
    assert abs(r.params[k] - truth[k]) < SPARSE_NOISY_TOL[k], (k, r.params)
    lo, hi = r.intervals[k]
    assert lo <= r.params[k] <= hi
  assert r.levels == tuple(levels) and r.n_points == len(x)
  assert json.loads(json.dumps(r.to_json()))["form"] == form


def test_sparse_law_gradient_matches_finite_differences():
  rng = np.random.default_rng(0)
  data = (np.log(rng.uniform(0.1, 1, 30)), np.log(rng.uniform(1e6, 1e9, 30)),
          np.log(rng.uniform(1e8, 1e10, 30)), np.log(rng.uniform(2, 4, 30)))
  for delta in (1e-3, 10.0):  # linear and quadratic Huber branches
    # Around a realistic point (p1, e1, p0, alpha, q, beta, log c), so every term matters.
    theta = np.array([3.0, 0.8, 2.0, 0.3, 5.0, 0.3, 0.5]) + 0.1 * rng.normal(size=7)
    _, grad = sl._objective(theta, *data, delta)
    eps = 1e-6
    num = [(sl._objective(theta + eps * e, *data, delta)[0] -
            sl._objective(theta - eps * e, *data, delta)[0]) / (2 * eps) for e in np.eye(7)]
    np.testing.assert_allclose(grad, num, rtol=1e-5, atol=1e-9)
    assert np.all(np.abs(grad) > 1e-6)  # no term is negligible at this point


def test_sparse_law_errors_and_sparsity():
  x, n, d = sparse_grid([0.0, 0.5])
  with pytest.raises(ValueError, match="S takes 2 distinct value"):
    sl.fit_frantar(x, n, d, sl.frantar_loss(x, n, d, **FRANTAR))
  with pytest.raises(ValueError, match=r"S \(sparsity\) must lie in \[0, 1\)"):
    sl.fit_frantar(np.full(20, 1.0), n, d, np.full(20, 2.0))
  with pytest.raises(ValueError, match="G must be strictly positive"):
    sl.fit_granularity(np.zeros(20), n, d, np.full(20, 2.0))
  assert not hasattr(sl, "sparsity")  # 1 - active/total is no input to the Frantar law


@pytest.mark.parametrize("form", ["frantar", "granularity"])
def test_cli_fits_a_sparse_law_where_its_axis_varies(tmp_path, form):
  """Noiseless runs from a known sparse law: the weight sparsity S varies across three families
  (Frantar, pooled scope; record field weight_sparsity) or G within one family (record field
  granularity); the CLI's fit recovers the exponents."""
  from sparsejax.scaling import report
  law = LAWS["dense"]
  points = [(n, budget / (6 * (n + ATTN))) for budget in BUDGETS
            for n in n_opt(law, budget) * SPREAD]
  if form == "frantar":
    truth, scope = FRANTAR, "all families"
    for family, s in (("dense", 0.0), ("moe2", 0.5), ("moe4", 0.75)):
      for i, (n, d) in enumerate(points):
        loss = float(sl.frantar_loss(s, n, d, **FRANTAR))
        rec = base_record(f"{family}-{i}", family, n, d, loss, n / (1 - s))
        write_record(tmp_path, f"{family}-{i}", {**rec, "weight_sparsity": s})
    for i, (n, d) in enumerate(points[:3]):  # activation-sparse MoE runs: no Frantar input
      rec = base_record(f"moe-{i}", "moe", n, d, float(sl.frantar_loss(0.75, n, d, **FRANTAR)),
                        4 * n)
      write_record(tmp_path, f"moe-{i}", {**rec, "granularity": 1})
  else:
    truth, scope = KRAJEWSKI, "moe"
    for g in (1, 2, 4):
      for i, (n, d) in enumerate(points):
        rec = base_record(f"moe-g{g}-{i}", "moe", n, d,
                          float(sl.granularity_loss(g, n, d, **KRAJEWSKI)), n)
        write_record(tmp_path, f"moe-g{g}-{i}", {**rec, "granularity": g})
  data = fitcli.to_json(fitcli.analyze(tmp_path, bootstrap=0, sparse=form))
  assert list(data["sparse_laws"]) == [form]
  (fit,) = data["sparse_laws"][form]["fits"]
  assert fit["scope"] == scope and fit["n_points"] == 36 and len(fit["levels"]) == 3
  for k in sl.FORMS[form]["exponents"]:
    assert abs(fit["params"][k] - truth[k]) < 1e-2, (k, fit["params"])
  assert f"| {scope} | 36 |" in report.render(data, [])
