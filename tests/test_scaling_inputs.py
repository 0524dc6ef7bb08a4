"""Scaling-fit inputs stated and consistent (issue 12 part 5): N counted both ways with the output
head at the TRUE vocabulary, both counts and the resolved MoE granularity in a sweep's records,
the fit's N chosen by flag (default total), old records still loading (with notes), approach-2
budgets in the quantity that grouped them, and the Frantar law refused without weight sparsity."""

import json
import pathlib

import numpy as np
import pytest

from sparsejax import sweep
from sparsejax.configure import load_config
from sparsejax.models import accounting
from sparsejax.scaling import analyze as fitcli
from sparsejax.scaling import fit as fitlib
from sparsejax.scaling import records as recordslib
from sparsejax.scaling.sparse_fits import FRANTAR_NEEDS_WEIGHT_SPARSITY
from sparsejax.sweep import runner
from sparsejax.train.state import model_spec

PROG = "sparsejax.scaling.analyze"


def _block_matmuls(cfg) -> int:
  """Hand count of one dense block's matmul weights (attention q, k, v, o + SwiGLU)."""
  d, H = cfg.model.d_model, cfg.model.num_heads
  K, Dh = cfg.model.num_kv_heads or H, cfg.head_dim
  return d * H * Dh + 2 * d * K * Dh + H * Dh * d + 3 * d * cfg.d_ff


# ----------------------------------------------------------------------------- accounting

@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_head_counted_at_true_vocab(tie):
  cfg = load_config("configs/dense.py:tiny", **{"model.tie_embeddings": tie})
  assert cfg.padded_vocab(259) == 384  # the padding this test is about: 125 rows never a target
  d, L = cfg.model.d_model, cfg.model.num_layers
  model = model_spec(cfg, 259).abstract_model
  c = accounting.count(model, cfg, vocab_size=259)
  body = L * _block_matmuls(cfg)
  assert c.params_active_non_embedding == body                  # Kaplan: no head, no embedding
  assert c.params_active_total == body + 259 * d                # Chinchilla: head at 259 rows
  assert c.params_active_per_token == body + 384 * d            # as executed: 384 rows
  assert (c.vocab_counted, c.vocab_rows) == (259, 384)
  # FLOPs count the executed (padded) head; storage counts hold the padded rows.
  T, H, Dh = cfg.data.seq_len, cfg.model.num_heads, cfg.head_dim
  assert c.flops_per_token == 6 * (body + 384 * d) + 6 * T * H * Dh * L
  assert c.params_embedding == 384 * d * (1 if tie else 2)
  # Without vocab_size: config.model.vocab_size when set, else the padded rows (said so).
  assert accounting.count(model, cfg).vocab_counted == 384
  cfg259 = load_config("configs/dense.py:tiny", **{"model.tie_embeddings": tie,
                                                   "model.vocab_size": 259})
  assert accounting.count(model_spec(cfg259, 259).abstract_model,
                          cfg259).params_active_total == body + 259 * d
  with pytest.raises(ValueError, match="does not fit the model's 384 embedding rows"):
    accounting.count(model, cfg, vocab_size=385)


# ----------------------------------------------------------------------------- records

MOE_G2 = '''
from sparsejax.configure import load_config_dict, with_defaults

def get_config(preset="tiny"):
  c = load_config_dict("{repo}/configs/moe.py:tiny")
  c.moe.granularity = 2   # the base config's own value: no override names it
  c.name = "moe-g2"
  return with_defaults(c)
'''


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
  base = tmp_path_factory.mktemp("cfg") / "moe_g2.py"
  base.write_text(MOE_G2.format(repo=pathlib.Path(__file__).resolve().parent.parent))
  runs = [sweep.Run("configs/dense.py:tiny", {"train.steps": 5}, name="dense"),
          sweep.Run(f"{base}:tiny", {"train.steps": 5}, name="moe-g2")]
  return {p.name: p for p in sweep.plan(runs)}


def test_record_carries_both_n_and_resolved_granularity(planned):
  dense, moe = (runner._base_record(planned[n]) for n in ("dense", "moe-g2"))
  cfg = planned["dense"].cfg
  d, body = cfg.model.d_model, cfg.model.num_layers * _block_matmuls(cfg)
  assert (dense["vocab_size"], dense["vocab_rows"]) == (257, 384)
  assert dense["params_active_non_embedding"] == body
  assert dense["params_active_total"] == body + 257 * d
  assert dense["params_active_per_token"] == body + 384 * d
  assert (dense["granularity"], dense["num_experts"], dense["top_k"]) == (None, None, None)
  mcfg = planned["moe-g2"].cfg
  assert moe["overrides"] == {"train.steps": 5} and mcfg.moe.granularity == 2
  assert (moe["granularity"], moe["num_experts"], moe["top_k"]) == \
      (2, mcfg.moe.num_experts, mcfg.moe.top_k)
  assert moe["params_active_total"] - moe["params_active_non_embedding"] == 257 * d
  # The dry-run table shows both N.
  text = sweep.table(list(planned.values()))
  assert "N total" in text.splitlines()[0] and f"{dense['params_active_total']:.3g}" in text


def _record(name, family, N, D=1e6, L=3.0, **extra):
  return {"name": name, "config_hash": "0" * 40, "family": family, "base": "configs/x.py",
          "overrides": {}, "status": "done", "params_active_total": N,
          "params_active_non_embedding": 0.75 * N, "params_active_per_token": 1.25 * N,
          "params_total": 4 * N, "granularity": None, "tokens": D, "total_flops": 7 * N * D,
          "eval_loss": L, **extra}


def _write(root, rec):
  (root / rec["name"]).mkdir(parents=True)
  (root / rec["name"] / "record.json").write_text(json.dumps(rec))


def test_granularity_from_record_reaches_the_fit(planned, tmp_path):
  rec = {**runner._base_record(planned["moe-g2"]), "status": "done", "eval_loss": 3.0}
  _write(tmp_path, rec)
  old = _record("old-moe", "moe", 1e5, overrides={"moe.granularity": 4})
  del old["granularity"]
  _write(tmp_path, old)
  rows, problems = fitcli.collect(tmp_path)
  assert problems == []
  by = {r["name"]: r for r in rows}
  assert (by["moe-g2"]["G"], by["moe-g2"]["G_source"]) == (2.0, "record")
  assert (by["old-moe"]["G"], by["old-moe"]["G_source"]) == (4.0, "overrides (old record)")
  notes = fitcli._notes(rows, problems, "params_active_total")
  assert len(notes) == 1 and "1 record(s) lack granularity" in notes[0] and "old-moe" in notes[0]


def test_old_records_load_and_malformed_new_keys_do_not(tmp_path):
  old = _record("old", "dense", 1e5)
  for k in recordslib.NEW_KEYS:
    old.pop(k, None)
  _write(tmp_path, old)
  _write(tmp_path, _record("bad", "dense", 1e5, granularity="four"))
  records, problems = recordslib.load_records(tmp_path)
  assert [r["name"] for r in records] == ["old"]
  assert problems == [(str(tmp_path / "bad" / "record.json"),
                       "granularity is 'four', not a number or null")]


# ----------------------------------------------------------------------------- N by flag

@pytest.fixture
def n_root(tmp_path):
  for i, n in enumerate((1e5, 2e5, 4e5)):
    _write(tmp_path, _record(f"new{i}", "dense", n))
  old = _record("old", "dense", 3e5)
  del old["params_active_total"], old["params_active_non_embedding"]
  _write(tmp_path, old)
  return tmp_path


@pytest.mark.parametrize("argv, field, scale", [
    ([], "params_active_total", 1.0),
    (["--n", "total"], "params_active_total", 1.0),
    (["--n", "non_embedding"], "params_active_non_embedding", 0.75),
    (["--n-field", "params_active_per_token"], "params_active_per_token", 1.25),
])
def test_analyze_picks_n_by_flag(n_root, capsys, argv, field, scale):
  # Three runs fit nothing (exit 1) but fits.json and REPORT.md are written with the inputs.
  assert fitcli.main(["--root", str(n_root), "--no-plots", "--bootstrap", "0", *argv]) == 1
  data = json.loads((n_root / "report" / "fits.json").read_text())
  conv = data["conventions"]
  assert conv["n_field"] == field and conv["n_default_field"] == "params_active_total"
  new = sorted(r["N"] for r in data["runs"] if r["name"].startswith("new"))
  assert new == [scale * n for n in (1e5, 2e5, 4e5)]
  assert all(r["C"] == 6 * r["N"] * r["D"] for r in data["runs"])
  report = (n_root / "report" / "REPORT.md").read_text()
  assert f"**N** = `{field}`" in report and conv["N"] in report
  err = capsys.readouterr().err
  if field == "params_active_per_token":  # the old record's only N: it is fitted
    assert "old" in [r["name"] for r in data["runs"]] and data["notes"] == []
  else:  # left out, saying why, with a note in the report
    (p,) = data["problems"]
    assert p["name"] == "old" and p["reason"].startswith(f"no {field} (record written before")
    assert f"left out old: no {field}" in err
    assert data["notes"][0].startswith(f"1 record(s) lack {field}") and data["notes"][0] in report


def test_n_flags_are_exclusive(n_root, capsys):
  with pytest.raises(SystemExit) as e:
    fitcli.main(["--root", str(n_root), "--n", "total", "--n-field", "params_total"])
  assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


# ----------------------------------------------------------------------------- sparse laws

def test_frantar_refused_without_weight_sparsity(tmp_path, capsys):
  # MoE records: 4x as many total as active parameters (activation sparsity 0.75), G = 1, 2, 4.
  for g in (1, 2, 4):
    for i, n in enumerate((1e5, 2e5, 4e5)):
      _write(tmp_path, _record(f"moe-g{g}-{i}", "moe", n, granularity=g, num_experts=8, top_k=2))
  assert fitcli.main(["--root", str(tmp_path), "--no-plots", "--bootstrap", "0",
                      "--sparse", "frantar"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"{PROG}: error: {FRANTAR_NEEDS_WEIGHT_SPARSITY}"]
  assert not (tmp_path / "report").exists()
  # auto: no error, the law skipped with its reason in the report.
  fitcli.main(["--root", str(tmp_path), "--no-plots", "--bootstrap", "0"])
  data = json.loads((tmp_path / "report" / "fits.json").read_text())
  assert data["sparse_laws"]["frantar"]["fits"] == []
  assert "weight_sparsity" not in capsys.readouterr().err
  assert "no run records weight_sparsity > 0" in (tmp_path / "report" / "REPORT.md").read_text()
  assert sorted({r["G"] for r in data["runs"]}) == [1.0, 2.0, 4.0]


# ----------------------------------------------------------------------------- approach 2

def test_approach2_in_total_flops_reads_d_off_the_runs():
  """Iso-F runs with F = 6 (N + A) D (attention A per token / 6) and a loss with its minimum at a
  known N*(F): with D given, D* at the minimum spends the budget F; without D, D* = F / 6N*
  overstates it (the old 6ND reading of a total-FLOPs budget)."""
  A, budgets, n_star = 3e6, (1e17, 1e18, 1e19), lambda F: 1e-3 * F ** 0.5
  F, N, L, D = [], [], [], []
  for f in budgets:
    for n in n_star(f) * np.logspace(-0.5, 0.5, 5):
      F.append(f), N.append(n), D.append(f / (6 * (n + A)))
      L.append(2.0 + 0.1 * np.log(n / n_star(f)) ** 2)
  with_d = fitlib.fit_approach2(F, N, L, D)
  without = fitlib.fit_approach2(F, N, L)
  assert with_d.a == pytest.approx(0.5, abs=1e-9) and without.b == pytest.approx(0.5)
  for m in with_d.minima:
    assert m.N_opt == pytest.approx(n_star(m.C), rel=1e-9)
    assert 6 * (m.N_opt + A) * m.D_opt == pytest.approx(m.C, rel=2e-3)
  for m in without.minima:
    assert 6 * (m.N_opt + A) * m.D_opt > 1.5 * m.C  # A is close to or above N* here
  # b is the D* line's own slope (attention makes D* grow faster than F / 6N*), not 1 - a.
  slope = np.polyfit(np.log(budgets), np.log([m.D_opt for m in with_d.minima]), 1)[0]
  assert with_d.b == pytest.approx(slope, rel=1e-9) and with_d.b > 1 - with_d.a + 0.05
