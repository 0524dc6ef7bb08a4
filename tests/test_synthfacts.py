"""Synthetic facts: the seeded generator, held-out templates kept out of training text, the mixed
dataset (fraction, untouched val split, fingerprint / resume guard, off = unchanged), the
ranking eval (hand example, stub scorer, the real score step against a direct computation)
and one-line errors for bad settings."""

import filecmp
import hashlib
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.configure import load_config
from sparsejax.data import position, synthfacts as sf
from sparsejax.data.prepare import prepare, read_metadata
from sparsejax.data.corpus import stdlib_root, read_text
from sparsejax.data.dataset import TokenDataset
from sparsejax.data.tokenizers import ByteTokenizer
from sparsejax.errors import ConfigError
from sparsejax.eval import synthfacts as esf
from sparsejax.models.transformer import build_model
from sparsejax.train.loop import write_start_checkpoint

TOK = ByteTokenizer()


@pytest.fixture
def base(tmp_path):
  """A small prepared byte dataset (~24k train tokens over several shards, a val split)."""
  src = tmp_path / "src"
  src.mkdir()
  files = sorted((stdlib_root() / "json").glob("*.py")) + sorted(
      (stdlib_root() / "email").glob("*.py"))
  for i, f in enumerate(files[:10]):
    (src / f"doc{i}.txt").write_text(read_text(f)[:3000])
  return prepare([str(src)], tmp_path / "base", val_fraction=0.3, shard_tokens=5000)


def _documents(path, split="train"):
  ds = TokenDataset(path, split)
  tokens = ds.window(0, ds.num_tokens)
  ends = np.flatnonzero(tokens == ds.eos_id) + 1
  return [tokens[s:e] for s, e in zip(np.concatenate([[0], ends[:-1]]), ends)]


# ------------------------------------------------------------------------------ generator

def test_generator_is_deterministic_under_a_seed():
  a, b, c = sf.make_facts(100, 3), sf.make_facts(100, 3), sf.make_facts(100, 4)
  assert a.entities == b.entities and a.values == b.values
  assert np.array_equal(a.value_idx, b.value_idx)
  assert a.entities != c.entities
  docs = [sf.training_documents(a, np.random.default_rng(7), repetitions=2) for _ in range(2)]
  assert docs[0] == docs[1] and len(docs[0]) == 200
  assert len(set(a.entities)) == len(a.entities) == math.ceil(100 / len(sf.RELATIONS))
  words = [w for vs in a.values.values() for w in vs]
  assert len(set(words)) == len(words) == sf.VALUES_PER_RELATION * len(sf.RELATIONS)
  assert a.num_facts == 100 and a.fact(99)[0] == a.entities[99 // len(sf.RELATIONS)]


def test_training_documents_render_every_fact_with_training_templates():
  facts = sf.make_facts(40, 0)
  docs = sf.training_documents(facts, np.random.default_rng(0), repetitions=3)
  assert len(docs) == 3 * 40 and all(sf.is_fact_text(d) for d in docs)
  for i in range(facts.num_facts):
    entity, relation, value = facts.fact(i)
    rendered = {sf.render(t, entity, value) for t in sf.RELATIONS[relation][0]}
    assert sum(d in rendered for d in docs) == 3  # once per repetition, its own value


def test_held_out_questions_never_occur_in_training_text():
  facts = sf.make_facts(64, 1)
  text = "\n".join(sf.training_documents(facts, np.random.default_rng(0), repetitions=8))
  held = sf.eval_items(facts, held_out=True)
  assert len(held) == 64 * 2
  for item in held:
    assert item.prompt not in text
    for piece in sf._pieces(item.template):  # pylint: disable=protected-access
      assert piece not in text, piece
  # ... while training-template prompts do occur (the check can see a hit): 1 - (3/4)^8 = 90%
  # of (fact, training template) pairs are rendered in 8 repetitions
  train = sf.eval_items(facts, held_out=False)
  assert sum(item.prompt in text for item in train) >= 0.85 * len(train)


# The offset-0 generator's output (facts of make_facts(100, 3) and two repetitions of their
# training documents) as it was before offsets existed: datasets and cache keys are unchanged.
OFFSET0_SHA1 = "696af05c555f3705240aaf7de3b99ba78d53dba5"


def test_offset_zero_is_the_generator_as_it_was():
  f = sf.make_facts(100, 3, offset=0)
  docs = sf.training_documents(f, np.random.default_rng(7), repetitions=2)
  key = json.dumps([[f.fact(i) for i in range(100)], f.values, docs])
  assert hashlib.sha1(key.encode()).hexdigest() == OFFSET0_SHA1
  assert sf._settings(64, 0.3, 0, 0) == sf._settings(64, 0.3, 0)  # pylint: disable=protected-access
  assert "offset" not in sf._settings(64, 0.3, 0)  # pylint: disable=protected-access


@pytest.mark.parametrize("n_a", [64, 60])  # a multiple of the relation count, and not
def test_offset_sets_are_disjoint_and_share_the_candidates(n_a):
  a, b = sf.make_facts(n_a, 0), sf.make_facts(64, 0, offset=n_a)
  names_a = {a.fact(i)[0] for i in range(a.num_facts)}
  names_b = {b.fact(j)[0] for j in range(b.num_facts)}
  assert len(names_b) == math.ceil((n_a + 64) / 8) - n_a // 8
  assert not names_a & names_b
  assert min(map(len, names_b)) > max(map(len, names_a))  # 3 syllables: never an offset-0 name
  words = {w for vs in a.values.values() for w in vs}
  assert not {n.lower() for n in names_b} & words
  assert b.values == a.values  # the same candidates: an eval ranks the same words
  relations = [b.fact(j)[1] for j in range(8)]
  assert relations == [list(sf.RELATIONS)[(n_a + j) % 8] for j in range(8)]
  items = sf.eval_items(b, held_out=False)
  assert [it.fact for it in items[::4]] == list(range(n_a, n_a + 64))
  docs = sf.training_documents(b, np.random.default_rng(0))
  assert all(sf.is_fact_text(d) for d in docs) and not any(n in " ".join(docs) for n in names_a)


def test_fact_i_is_the_same_whatever_the_offset():
  b = sf.make_facts(64, 0, offset=64)
  longer = sf.make_facts(200, 0, offset=64)
  later = sf.make_facts(40, 0, offset=100)  # another offset: another base set's value words
  for j in range(64):
    assert b.fact(j) == longer.fact(j)
  for i in range(100, 128):
    assert b.fact(i - 64)[:2] == later.fact(i - 100)[:2]
    assert b.value_idx[i - 64] == later.value_idx[i - 100]
  assert sf.make_facts(64, 1, offset=64).entities != b.entities  # the seed still matters


def test_mixed_dataset_of_an_offset_holds_only_its_facts(base, tmp_path):
  a = sf.mixed_dataset(base, 16, 0.3, 0, out=tmp_path / "a")
  b = sf.mixed_dataset(base, 16, 0.3, 0, out=tmp_path / "b", offset=16)
  assert read_metadata(b)["synthfacts"]["settings"]["offset"] == 16
  assert "offset" not in read_metadata(a)["synthfacts"]["settings"]
  assert position.dataset_fingerprint(TokenDataset(a)) != position.dataset_fingerprint(
      TokenDataset(b))
  facts = sf.make_facts(16, 0, offset=16)
  texts = [TOK.decode(d) for d in _documents(b)]
  rendered = {sf.render(t, e, v) for e, r, v in map(facts.fact, range(16))
              for t in sf.RELATIONS[r][0]}
  assert {t for t in texts if sf.is_fact_text(t)} <= rendered
  assert sf.mixed_dir(base, 16, 0.3, 0, 16).name.startswith("base-synthfacts16+16-")
  assert sf.mixed_dir(base, 16, 0.3, 0) != sf.mixed_dir(base, 16, 0.3, 0, 16)


# ------------------------------------------------------------------------------ mixing

def test_mixed_dataset_has_the_fraction_and_keeps_corpus_and_val(base, tmp_path):
  out = sf.mixed_dataset(base, 64, 0.3, 0, out=tmp_path / "mixed")
  docs = _documents(out)
  texts = [TOK.decode(d) for d in docs]
  fact = [sf.is_fact_text(t) for t in texts]
  fact_tokens = sum(len(d) for d, f in zip(docs, fact) if f)
  total = sum(len(d) for d in docs)
  assert abs(fact_tokens / total - 0.3) < 0.002
  meta = read_metadata(out)
  assert meta["synthfacts"]["fact_tokens"] == fact_tokens
  # the corpus documents are all there, unchanged (as a multiset), and facts are interleaved
  corpus = sorted(tuple(d) for d in _documents(base))
  assert sorted(tuple(d) for d, f in zip(docs, fact) if not f) == corpus
  assert not all(fact[:len(fact) // 2]) and any(fact[:len(fact) // 2])
  # every fact at least once
  facts = sf.make_facts(64, 0)
  seen = set(t for t, f in zip(texts, fact) if f)
  for i in range(64):
    e, r, v = facts.fact(i)
    assert seen & {sf.render(t, e, v) for t in sf.RELATIONS[r][0]}
  # the val split is a byte copy of the base dataset's
  for shard in meta["splits"]["val"]["shards"]:
    assert filecmp.cmp(base / shard["file"], out / shard["file"], shallow=False)
  assert meta["splits"]["val"] == read_metadata(base)["splits"]["val"]


def test_fingerprint_and_resume_guard_see_the_settings(base, tmp_path):
  prints = {}
  for key, (n, frac, seed) in {"a": (64, 0.3, 0), "seed": (64, 0.3, 1), "facts": (72, 0.3, 0),
                               "fraction": (64, 0.4, 0)}.items():
    out = sf.mixed_dataset(base, n, frac, seed, out=tmp_path / key)
    prints[key] = position.dataset_fingerprint(TokenDataset(out))
  prints["off"] = position.dataset_fingerprint(TokenDataset(base))
  # the same token counts with other settings (as two seeds could give) differ too
  twin = tmp_path / "twin"
  shutil.copytree(tmp_path / "a", twin)
  meta = read_metadata(twin)
  meta["synthfacts"]["settings"]["seed"] = 5
  (twin / "metadata.json").write_text(json.dumps(meta))
  prints["twin"] = position.dataset_fingerprint(TokenDataset(twin))
  assert len(set(prints.values())) == len(prints)
  cfg = load_config("configs/dense.py:tiny")
  saved = position.data_position(cfg, prints["a"], 10)
  with pytest.raises(ConfigError, match="the training dataset") as e:
    position.resume_batch(saved, position.data_position(cfg, prints["seed"], 0), 10, "w")
  assert "\n" not in str(e.value)
  assert position.resume_batch(saved, position.data_position(cfg, prints["a"], 0), 10, "w") == 10


def test_off_changes_nothing_and_on_resolves_the_cached_mix(base, tmp_path, monkeypatch,
                                                             default_dataset):
  cfg = load_config("configs/dense.py:tiny")
  assert cfg.data.synthfacts_facts == 0
  assert position.resolve_dataset(cfg) == default_dataset  # the same prepared folder as before
  assert "synthfacts" not in read_metadata(default_dataset)
  monkeypatch.setenv("SPARSEJAX_DATA_DIR", str(tmp_path / "root"))
  on = load_config("configs/dense.py:tiny", **{"data.path": str(base),
                                               "data.synthfacts_facts": 32})
  path = position.resolve_dataset(on)
  assert path.parent == tmp_path / "root" and path.name.startswith("base-synthfacts32-")
  mtime = (path / "metadata.json").stat().st_mtime_ns
  assert position.resolve_dataset(on) == path  # reused, not rebuilt
  assert (path / "metadata.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("overrides,key", [
    ({"data.synthfacts_fraction": 1.0}, "config.data.synthfacts_fraction"),
    ({"data.synthfacts_fraction": 0.0}, "config.data.synthfacts_fraction"),
    ({"data.synthfacts_fraction": -0.2}, "config.data.synthfacts_fraction"),
    ({"data.synthfacts_facts": sf.MAX_FACTS + 1}, "config.data.synthfacts_facts"),
    ({"data.synthfacts_facts": -1}, "config.data.synthfacts_facts"),
    ({"data.synthfacts_seed": -1}, "config.data.synthfacts_seed"),
])
def test_bad_settings_are_one_line_config_errors(overrides, key):
  """Refused when the config is validated (a sweep fails at planning, not at training)."""
  with pytest.raises(ConfigError) as e:
    load_config("configs/dense.py:tiny", **{"data.synthfacts_facts": 8, **overrides})
  assert str(e.value).startswith(key + ":") and "\n" not in str(e.value)


@pytest.mark.parametrize("facts,offset", [(8, -8), (8, sf.MAX_FACTS - 4), (0, 16)])
def test_bad_offsets_are_one_line_config_errors(facts, offset):
  """Refused at validation, before any dataset is built."""
  with pytest.raises(ConfigError) as e:
    load_config("configs/dense.py:tiny", **{"data.synthfacts_facts": facts,
                                            "data.synthfacts_offset": offset})
  assert str(e.value).startswith("config.data.synthfacts_offset:") and "\n" not in str(e.value)


def test_a_fraction_too_small_for_every_fact_is_refused(base, tmp_path):
  with pytest.raises(ConfigError, match="^config.data.synthfacts_fraction: 0.001 gives"):
    sf.mixed_dataset(base, 800, 0.001, 0, out=tmp_path / "m")


# ------------------------------------------------------------------------------ ranking eval

def test_rank_metrics_on_a_hand_example():
  scores = [[3, 1, 2], [0, 5, 1], [1, 1, 0], [2, 9, 2]]
  m = esf.rank_metrics(np.array(scores), np.array([0, 2, 0, 2]))
  # ranks 1, 2, 2 (a tie counts against the gold), 3
  assert m["acc"] == 0.25
  assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 2 + 1 / 3) / 4)
  assert m["items"] == 4


@pytest.mark.parametrize("gold_best", [True, False])
def test_score_items_ranks_by_the_scorer(gold_best):
  facts = sf.make_facts(24, 2)
  items = sf.eval_items(facts)[:9]
  golds = {f"{it.prompt} {it.candidates[it.gold]}." for it in items}
  seen = []

  def stub(batch):  # 1 for the gold continuation (or 0 with gold_best False), else the other
    out = []
    for targets, weights in zip(batch["targets"], batch["weights"]):
      if not weights.any():
        out.append(np.nan)  # padding row: must be dropped
        continue
      last = np.flatnonzero(weights)[-1]
      seen.append(TOK.decode(targets[np.flatnonzero(weights)]))
      out.append(float((TOK.decode(targets[:last + 1]) in golds) == gold_best))
    return np.array(out)

  m = esf.score_items(stub, items, TOK, seq_len=64, batch_rows=7)  # 144 rows: last batch padded
  assert len(seen) == 9 * sf.VALUES_PER_RELATION
  assert all(s.startswith(" ") and s.endswith(".") for s in seen)  # scored: " value."
  assert m == ({"acc": 1.0, "mrr": 1.0, "items": 9} if gold_best else
               {"acc": 0.0, "mrr": 1 / sf.VALUES_PER_RELATION, "items": 9})


def test_score_step_is_the_continuation_log_probability():
  cfg = load_config("configs/dense.py:tiny")
  graphdef, state = nnx.split(build_model(cfg, 257, seed=0))
  params = nnx.to_pure_dict(state)  # as the train / eval steps hold them
  items = sf.eval_items(sf.make_facts(8, 0))[:2]
  rows = esf.encode_rows(items, TOK, 64)
  batch = {k: v[:8] for k, v in rows.items()}
  got = np.asarray(jax.jit(esf.make_score_step(graphdef))(params, batch))
  forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
  for r in (0, 5):  # a short and a long candidate: each unpadded, alone
    n = int(batch["weights"][r].sum())
    length = int(np.flatnonzero(batch["weights"][r])[-1]) + 1
    logits = forward(params, jnp.asarray(batch["inputs"][r:r + 1, :length]))
    logp = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)
    targets = batch["targets"][r, :length]
    want = float(jnp.sum(logp[jnp.arange(length), targets][length - n:]))
    assert got[r] == pytest.approx(want, rel=1e-4, abs=1e-4)
  # a row's score does not depend on the other rows of its batch
  alone = np.asarray(jax.jit(esf.make_score_step(graphdef))(
      params, {k: np.repeat(v[3:4], 8, axis=0) for k, v in batch.items()}))
  assert alone[0] == pytest.approx(got[3], rel=1e-5, abs=1e-5)


def test_the_eval_asks_about_any_fact_range(base, tmp_path, monkeypatch, one_device):
  """--task synthfacts: the run's own range by default, or --facts N --offset K (drawn with the
  run's seed); the ranking itself is stubbed (tested above)."""
  monkeypatch.setenv("SPARSEJAX_DATA_DIR", str(tmp_path / "root"))
  cfg = load_config("configs/dense.py:tiny", **{
      "data.path": str(base), "data.synthfacts_facts": 16, "data.synthfacts_offset": 16,
      "data.synthfacts_fraction": 0.3, "data.synthfacts_seed": 2})

  def init_params(spec, shardings):
    return jax.device_put(nnx.to_pure_dict(nnx.split(build_model(cfg, spec.vocab_size))[1]),
                          shardings)
  write_start_checkpoint(cfg, tmp_path / "run", init_params, one_device)
  asked = []
  monkeypatch.setattr(esf, "recall", lambda score_fn, facts, *a, **k: asked.append(facts) or {})
  own = esf.evaluate(tmp_path / "run", devices=one_device)
  earlier = esf.evaluate(tmp_path / "run", facts=16, offset=0, devices=one_device)
  assert (own["facts"], own["offset"], earlier["facts"], earlier["offset"]) == (16, 16, 16, 0)
  for got, want in zip(asked, (sf.make_facts(16, 2, offset=16), sf.make_facts(16, 2))):
    assert [got.fact(j) for j in range(16)] == [want.fact(j) for j in range(16)]
