"""Tests for sparsejax.data: tokenizers, corpus, prepare, datasets, iters."""

import json
import os
import pathlib
import pickle
import subprocess
import sys

import grain
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsejax.data import corpus
from sparsejax.data import tokenizers as toks
from sparsejax.data.dataset import (TokenDataset, WindowSource,
                                    make_eval_batches, make_train_iterator,
                                    num_eval_batches,
                                    resolve_eval_data)
from sparsejax.data.prepare import (METADATA, default_dataset_dir,
                                    ensure_default_dataset, prepare,
                                    read_metadata)

REPO = pathlib.Path(__file__).resolve().parents[1]
UNICODE = "naïve café — 東京 🚀 Ωμέγα\n\tdef f(x):\n  return x ** 2\n"
NO_THREADS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def _stdlib_texts(n=12):
  """A small, real corpus: the first n stdlib files of the json/email dirs."""
  root = corpus.stdlib_root()
  files = sorted((root / "json").glob("*.py")) + sorted(
      (root / "email").glob("*.py"))
  return [corpus.read_text(f) for f in files[:n]]


@pytest.fixture
def text_tree(tmp_path):
  """A folder with text files in several formats plus files to skip."""
  root = tmp_path / "corpus"
  (root / "sub").mkdir(parents=True)
  (root / ".git").mkdir()
  texts = _stdlib_texts(6)
  (root / "a.txt").write_text(texts[0] + UNICODE)
  (root / "b.md").write_text(texts[1])
  (root / "sub" / "c.py").write_text(texts[2])
  (root / "sub" / "d.rst").write_text(texts[3])
  (root / ".hidden.txt").write_text("skip me")
  (root / ".git" / "config.txt").write_text("skip me too")
  (root / "blob.bin").write_bytes(b"\x00\x01binary")
  records = [{"text": t, "meta": i} for i, t in enumerate(
      [texts[4], texts[5], UNICODE, "short line"])]
  (root / "data.jsonl").write_text(
      "\n".join(json.dumps(r) for r in records) + "\n\n")
  return root


def _expected_streams(inputs, tok, val_fraction):
  streams = {"train": [], "val": []}
  nbytes = {"train": 0, "val": 0}
  for doc_id, text in corpus.iter_documents(inputs):
    split = corpus.split_of(doc_id, val_fraction)
    streams[split] += [*tok.encode(text).tolist(), tok.eos_id]
    nbytes[split] += len(text.encode("utf-8"))
  return streams, nbytes


def _read_split(path, split):
  ds = TokenDataset(path, split)
  return ds.window(0, ds.num_tokens).tolist() if ds.num_tokens else []


@pytest.fixture
def byte_data(tmp_path):
  """A prepared byte dataset of ~30k train tokens in several shards."""
  src = tmp_path / "src"
  src.mkdir()
  for i, text in enumerate(_stdlib_texts(8)):
    (src / f"doc{i}.txt").write_text(text[:4000])
  return prepare([str(src)], tmp_path / "ds", val_fraction=0.3,
                 shard_tokens=5000)


# ---------------------------------------------------------------- tokenizers

@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_tokenizer_roundtrips_unicode(text):
  tok = toks.ByteTokenizer()
  ids = tok.encode(text)
  assert ids.ndim == 1 and len(ids) == len(text.encode("utf-8"))
  assert ids.size == 0 or (ids.min() >= 0 and ids.max() < 256)
  assert tok.decode(ids) == text
  assert tok.decode(np.append(ids, tok.eos_id)) == text  # eos is ignored
  assert (tok.vocab_size, tok.eos_id) == (257, 256)


def test_bpe_training_is_deterministic_and_roundtrips(tmp_path):
  texts = _stdlib_texts()
  tok_a = toks.train_bpe(iter(texts), 400, tmp_path / "a" / "tokenizer.json")
  tok_b = toks.get_tokenizer("bpe:400", train_texts=iter(texts),
                             work_dir=tmp_path / "b")
  assert (tmp_path / "a/tokenizer.json").read_bytes() == (
      tmp_path / "b/tokenizer.json").read_bytes()
  assert tok_a.spec() == tok_b.spec()
  assert tok_a.vocab_size == 400 and tok_a.eos_id == 0
  for text in [texts[0], UNICODE, "", "x" * 1000]:
    ids = tok_a.encode(text)
    assert tok_a.decode(ids) == text
    assert tok_a.eos_id not in ids.tolist()
  assert len(tok_a.encode(texts[0])) < 0.7 * len(texts[0].encode())
  batch = tok_a.encode_batch([texts[1], UNICODE])
  assert [b.tolist() for b in batch] == [tok_a.encode(t).tolist()
                                         for t in (texts[1], UNICODE)]


def test_hf_tokenizer_json_path_and_spec_rebuild(tmp_path):
  trained = toks.train_bpe(iter(_stdlib_texts(4)), 300, tmp_path / "t.json")
  tok = toks.get_tokenizer(str(tmp_path / "t.json"))
  assert isinstance(tok, toks.HFTokenizer) and tok.eos_id == trained.eos_id
  assert tok.encode(UNICODE).tolist() == trained.encode(UNICODE).tolist()
  spec = json.loads(json.dumps(tok.spec()))
  (tmp_path / "ds").mkdir()
  (tmp_path / "ds" / spec["file"]).write_bytes(
      (tmp_path / "t.json").read_bytes())
  rebuilt = toks.tokenizer_from_spec(spec, tmp_path / "ds")
  assert rebuilt.spec() == tok.spec()
  assert rebuilt.decode(rebuilt.encode(UNICODE)) == UNICODE


def test_hf_tokenizer_without_eos_gets_one_added(tmp_path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  hf = Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  hf.train_from_iterator(_stdlib_texts(3), trainer=trainers.BpeTrainer(
      vocab_size=300, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  hf.save(str(tmp_path / "noeos.json"))
  tok = toks.get_tokenizer(str(tmp_path / "noeos.json"))
  assert tok.eos_token == "<|endoftext|>"
  assert tok.eos_id == tok.vocab_size - 1 == 300
  assert tok.decode(tok.encode(UNICODE)) == UNICODE


def _train_sentencepiece(tmp_path, **kwargs):
  import sentencepiece as spm
  text_file = tmp_path / "sp.txt"
  text_file.write_text("\n".join(_stdlib_texts(6)))
  spm.SentencePieceTrainer.train(
      input=str(text_file), model_prefix=str(tmp_path / "sp"), vocab_size=100,
      model_type="bpe", normalization_rule_name="identity",
      add_dummy_prefix=False, remove_extra_whitespaces=False,
      minloglevel=2, **kwargs)
  return tmp_path / "sp.model"


def test_sentencepiece_model_roundtrips(tmp_path):
  tok = toks.get_tokenizer(str(_train_sentencepiece(tmp_path)))
  assert isinstance(tok, toks.SentencePieceTokenizer)
  assert tok.vocab_size == 100 and 0 <= tok.eos_id < 100
  line = "def loads(s, *, cls=None):    return value"  # no newline: SP splits
  # its training text into lines, so "\n" is not in its vocabulary
  ids = tok.encode(line)
  assert ids.ndim == 1 and tok.decode(ids) == line
  assert tok.decode(np.append(ids, tok.eos_id)) == line


def test_sentencepiece_without_eos_uses_vocab_size(tmp_path):
  tok = toks.get_tokenizer(str(_train_sentencepiece(tmp_path, eos_id=-1)))
  assert (tok.eos_id, tok.vocab_size) == (100, 101)
  line = "import json"
  assert tok.decode(np.append(tok.encode(line), tok.eos_id)) == line


def test_unknown_tokenizer_spec_raises():
  with pytest.raises(ValueError, match=r"unknown tokenizer spec 'wordpiece'.*"
                     r"'byte', 'bpe'"):
    toks.get_tokenizer("wordpiece")
  with pytest.raises(ValueError, match="unknown tokenizer spec"):
    prepare(None, "/nonexistent/never", tokenizer="bpe:lots")


# -------------------------------------------------------------------- corpus

def test_default_corpus_files_are_the_stdlib():
  files = corpus.default_corpus_files()
  root = corpus.stdlib_root()
  assert len(files) > 500
  rels = [f.relative_to(root).as_posix() for f in files]
  assert rels == sorted(rels) and all(r.endswith(".py") for r in rels)
  assert not any("site-packages" in r or "dist-packages" in r for r in rels)
  assert {"os.py", "json/__init__.py"} <= set(rels)
  val = [r for r in rels if corpus.split_of(r, 0.02) == "val"]
  assert 0.005 < len(val) / len(rels) < 0.05


def test_split_of_is_stable():
  # Pinned values: datasets must split identically on every machine.
  expected = {("collections/__init__.py", 0.02): "val",
              ("json/__init__.py", 0.02): "train",
              ("typing.py", 0.02): "train", ("typing.py", 0.5): "val",
              ("os.py", 0.5): "train"}
  for _ in range(3):
    assert {k: corpus.split_of(*k) for k in expected} == expected
  assert corpus.split_of("anything", 0.0) == "train"
  assert corpus.split_of("anything", 1.0) == "val"


def test_iter_documents_folder_policy(text_tree):
  docs = list(corpus.iter_documents([str(text_tree)]))
  ids = [d for d, _ in docs]
  assert ids == ["a.txt", "b.md", "data.jsonl:1", "data.jsonl:2",
                 "data.jsonl:3", "data.jsonl:4", "sub/c.py", "sub/d.rst"]
  assert dict(docs)["data.jsonl:3"] == UNICODE
  single = list(corpus.iter_documents([str(text_tree / "blob.bin")]))
  assert single[0][0] == "blob.bin" and "binary" in single[0][1]


def test_missing_input_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match="input not found: .*nope"):
    list(corpus.iter_documents([str(tmp_path / "nope")]))
  with pytest.raises(FileNotFoundError, match="input not found"):
    prepare([str(tmp_path / "nope")], tmp_path / "out")
  assert not (tmp_path / "out").exists()
  assert not list(tmp_path.glob("out.tmp-*"))


def test_folder_without_text_files_raises(tmp_path):
  (tmp_path / "bin").mkdir()
  (tmp_path / "bin" / "x.so").write_bytes(b"\x7fELF")
  with pytest.raises(ValueError, match="no documents found in inputs: .*bin"):
    prepare([str(tmp_path / "bin")], tmp_path / "out")
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("line", ["not json", '{"body": "x"}', '{"text": 3}'])
def test_bad_jsonl_line_raises(tmp_path, line):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine"}\n' + line + "\n")
  with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*'text'"):
    list(corpus.iter_documents([str(bad)]))


# ------------------------------------------------------------------- prepare

def test_prepare_counts_and_streams(text_tree, tmp_path):
  out = prepare([str(text_tree)], tmp_path / "ds", val_fraction=0.5)
  streams, nbytes = _expected_streams([str(text_tree)], toks.ByteTokenizer(),
                                      0.5)
  assert streams["train"] and streams["val"]
  meta = read_metadata(out)
  assert meta["dtype"] == "uint16" and meta["eos_id"] == 256
  assert meta["tokenizer"] == {"kind": "byte", "vocab_size": 257,
                               "eos_id": 256}
  for split in ("train", "val"):
    info = meta["splits"][split]
    assert info["num_tokens"] == len(streams[split])
    assert info["num_bytes"] == nbytes[split]
    assert info["num_docs"] == streams[split].count(256)
    raw = np.memmap(out / info["shards"][0]["file"], dtype="<u2", mode="r")
    assert raw.tolist() == streams[split]
    ds = TokenDataset(out, split)
    assert ds.bytes_per_token == pytest.approx(nbytes[split] / ds.num_tokens)
  assert sorted(p.name for p in out.iterdir()) == [
      METADATA, "train-00000.bin", "val-00000.bin"]
  # Deterministic: a second build is byte-identical.
  again = prepare([str(text_tree)], tmp_path / "ds2", val_fraction=0.5)
  for name in ("train-00000.bin", "val-00000.bin"):
    assert (out / name).read_bytes() == (again / name).read_bytes()


def test_prepare_bpe_trains_on_train_split_only(text_tree, tmp_path):
  out = prepare([str(text_tree)], tmp_path / "ds", tokenizer="bpe:320",
                val_fraction=0.5)
  meta = read_metadata(out)
  assert meta["tokenizer"]["kind"] == "hf" and meta["vocab_size"] == 320
  train_texts = [t for d, t in corpus.iter_documents([str(text_tree)])
                 if corpus.split_of(d, 0.5) == "train"]
  reference = toks.train_bpe(iter(train_texts), 320, tmp_path / "ref.json")
  assert (out / "tokenizer.json").read_bytes() == (
      tmp_path / "ref.json").read_bytes()
  ds = TokenDataset(out, "val")
  streams, _ = _expected_streams([str(text_tree)], reference, 0.5)
  assert ds.window(0, ds.num_tokens).tolist() == streams["val"]
  assert ds.tokenizer.spec() == meta["tokenizer"]


def test_prepare_with_tokenizer_files_copies_them(tmp_path, text_tree):
  sp_model = _train_sentencepiece(tmp_path)
  out = prepare([str(text_tree)], tmp_path / "sp_ds", tokenizer=str(sp_model))
  assert (out / "tokenizer.model").read_bytes() == sp_model.read_bytes()
  ds = TokenDataset(out, "train")
  assert isinstance(ds.tokenizer, toks.SentencePieceTokenizer)
  assert ds.tokenizer.spec() == read_metadata(out)["tokenizer"]
  assert ds.window(0, ds.num_tokens).max() < ds.vocab_size


def test_single_document_input_gets_both_splits(tmp_path):
  text = _stdlib_texts(1)[0]
  (tmp_path / "one.txt").write_text(text)
  out = prepare([str(tmp_path / "one.txt")], tmp_path / "ds",
                val_fraction=0.1)
  train, val = _read_split(out, "train"), _read_split(out, "val")
  assert train[-1] == val[-1] == 256
  assert bytes(train[:-1] + val[:-1]).decode() == text
  assert len(val) == pytest.approx(0.1 * len(text), rel=0.05, abs=10)


def test_prepare_is_idempotent_and_overwrite_rebuilds(text_tree, tmp_path):
  out = prepare([str(text_tree)], tmp_path / "ds", val_fraction=0.5)
  stamp = (out / METADATA).stat().st_mtime_ns
  before = read_metadata(out)
  assert prepare([str(text_tree)], out, val_fraction=0.5) == out
  assert (out / METADATA).stat().st_mtime_ns == stamp
  prepare([str(text_tree)], out, val_fraction=0.0, overwrite=True)
  after = read_metadata(out)
  assert after["splits"]["val"]["num_tokens"] == 0
  assert after["splits"]["train"]["num_tokens"] == sum(
      before["splits"][s]["num_tokens"] for s in ("train", "val"))
  assert not list(tmp_path.glob("ds.*"))  # no tmp/old folders left behind
  with pytest.raises(ValueError, match="tokenized with byte, not bpe:300"):
    prepare([str(text_tree)], out, tokenizer="bpe:300")


def test_interrupted_prepare_is_not_a_dataset(text_tree, tmp_path):
  # What an interrupted prepare leaves: a tmp sibling with shards, no metadata.
  partial = tmp_path / "ds.tmp-12345"
  partial.mkdir()
  (partial / "train-00000.bin").write_bytes(b"\x00" * 64)
  with pytest.raises(FileNotFoundError, match="has no metadata.json"):
    TokenDataset(partial)
  assert read_metadata(partial) is None
  out = prepare([str(text_tree)], tmp_path / "ds")
  assert TokenDataset(out).num_tokens > 0
  # A non-empty folder without metadata is neither read nor clobbered.
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match="not a prepared dataset.*--overwrite"):
    prepare([str(text_tree)], foreign)
  assert (foreign / "notes.txt").exists()
  prepare([str(text_tree)], foreign, overwrite=True)
  assert read_metadata(foreign) is not None


def test_dataset_errors(byte_data, tmp_path):
  with pytest.raises(FileNotFoundError, match="dataset folder not found.*"
                     "sparsejax.data.prepare"):
    TokenDataset(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no metadata.json"):
    TokenDataset(tmp_path / "empty")
  with pytest.raises(ValueError, match="split 'test' not in"):
    TokenDataset(byte_data, "test")
  shard = byte_data / "train-00001.bin"
  shard.write_bytes(shard.read_bytes()[:-2])
  with pytest.raises(ValueError, match=r"train-00001\.bin is truncated"):
    TokenDataset(byte_data, "train")
  shard.unlink()
  with pytest.raises(FileNotFoundError, match=r"shard missing: .*00001\.bin"):
    TokenDataset(byte_data, "train")
  (byte_data / METADATA).write_text('{"format": "other/v9"}')
  with pytest.raises(ValueError, match="not format 'sparsejax.tokens/v1'"):
    TokenDataset(byte_data, "val")


def test_shards_and_windows_across_boundaries(byte_data):
  meta = read_metadata(byte_data)
  shards = meta["splits"]["train"]["shards"]
  assert len(shards) > 2 and all(s["num_tokens"] == 5000 for s in shards[:-1])
  stream = np.concatenate([np.fromfile(byte_data / s["file"], "<u2")
                           for s in shards]).astype(np.int32)
  ds = TokenDataset(byte_data, "train")
  assert ds.num_tokens == len(stream)
  for start, length in [(0, 10), (4990, 20), (4999, 10001), (0, len(stream))]:
    window = ds.window(start, length)
    assert window.dtype == np.int32
    np.testing.assert_array_equal(window, stream[start:start + length])
  with pytest.raises(IndexError):
    ds.window(len(stream) - 5, 6)


@pytest.mark.slow
def test_prepare_default_corpus(tmp_path, monkeypatch):
  monkeypatch.setenv("SPARSEJAX_DATA_DIR", str(tmp_path))
  out = ensure_default_dataset()
  assert out == default_dataset_dir() and out.parent == tmp_path
  meta = read_metadata(out)
  files = corpus.default_corpus_files()
  splits = meta["splits"]
  assert sum(s["num_docs"] for s in splits.values()) == len(files)
  total_bytes = sum(len(corpus.read_text(f).encode()) for f in files)
  assert sum(s["num_bytes"] for s in splits.values()) == total_bytes
  assert sum(s["num_tokens"] for s in splits.values()) == total_bytes + len(
      files)
  assert splits["val"]["num_tokens"] > 0
  assert "stdlib" in meta["source"]


def test_default_dataset_dir(monkeypatch, tmp_path):
  monkeypatch.setenv("SPARSEJAX_DATA_DIR", str(tmp_path))
  tag = f"py{sys.version_info[0]}{sys.version_info[1]}"
  assert default_dataset_dir() == tmp_path / f"stdlib-{tag}-byte"
  assert default_dataset_dir("bpe") == tmp_path / f"stdlib-{tag}-bpe8192"
  assert default_dataset_dir("bpe:512").name.endswith("-bpe512")


def test_cli_prepares_and_prints_summary(text_tree, tmp_path):
  out = tmp_path / "cli_ds"
  cmd = [sys.executable, "-m", "sparsejax.data.prepare", "--input",
         str(text_tree), "--out", str(out), "--val_fraction", "0.5"]
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                        check=True)
  assert "train" in done.stdout and "bytes/token" in done.stdout
  assert str(out) in done.stdout and "RuntimeWarning" not in done.stderr
  assert read_metadata(out)["splits"]["val"]["num_tokens"] > 0
  # Missing inputs are an error even when --out already holds a dataset.
  bad = subprocess.run(cmd[:3] + ["--input", str(tmp_path / "nope"), "--out",
                                  str(out)],
                       cwd=REPO, capture_output=True, text=True)
  assert bad.returncode != 0 and "input not found" in bad.stderr
  assert "Traceback" not in bad.stderr


# ------------------------------------------------------------- windows/iters

def test_window_source_is_contiguous_with_stride(byte_data):
  ds = TokenDataset(byte_data, "train")
  source = WindowSource(byte_data, 64)
  assert len(source) == (ds.num_tokens - 1) // 64
  stream = ds.window(0, ds.num_tokens)
  for i in (0, 1, len(source) // 2, len(source) - 1):
    w = source[i]
    assert w.shape == (65,) and w.dtype == np.int32
    np.testing.assert_array_equal(w, stream[i * 64:i * 64 + 65])
  np.testing.assert_array_equal(source[1][0], source[0][-1])
  with pytest.raises(IndexError):
    source[len(source)]
  with pytest.raises(ValueError, match=rf"has {ds.num_tokens} tokens; "
                     rf"seq_len={ds.num_tokens} needs at least"):
    WindowSource(byte_data, ds.num_tokens)


def test_window_source_pickles_without_memmaps(byte_data):
  source = WindowSource(byte_data, 16)
  expected = source[5]
  clone = pickle.loads(pickle.dumps(source))
  assert len(pickle.dumps(source)) < 4096  # the token data is not copied
  np.testing.assert_array_equal(clone[5], expected)


def _batches(it, n):
  return [next(it) for _ in range(n)]


def test_train_iterator_batches(byte_data):
  it = make_train_iterator(byte_data, seq_len=32, global_batch_size=8, seed=3)
  assert isinstance(it, grain.DatasetIterator)  # process 0 of 1 by default
  source = WindowSource(byte_data, 32)
  all_windows = sorted(map(tuple, (source[i].tolist()
                                   for i in range(len(source)))))
  steps = len(source) // 8 + 1
  rows = []
  for batch in _batches(it, steps):
    assert set(batch) == {"inputs", "targets"}
    for key in ("inputs", "targets"):
      assert batch[key].shape == (8, 32) and batch[key].dtype == np.int32
    np.testing.assert_array_equal(batch["targets"][:, :-1],
                                  batch["inputs"][:, 1:])
    rows += [tuple(i) + (t[-1],) for i, t in zip(batch["inputs"].tolist(),
                                                 batch["targets"].tolist())]
  # The first epoch is a permutation of all windows, and not the identity.
  assert sorted(rows[:len(source)]) == all_windows
  assert rows[:len(source)] != [tuple(source[i].tolist())
                                for i in range(len(source))]


def test_unshuffled_iterator_reads_windows_in_order(byte_data):
  it = make_train_iterator(byte_data, seq_len=16, global_batch_size=4, seed=0,
                           process_index=0, process_count=1, shuffle=False,
                           read_options=NO_THREADS)
  source = WindowSource(byte_data, 16)
  batch = next(it)
  for r in range(4):
    np.testing.assert_array_equal(batch["inputs"][r], source[r][:-1])


@pytest.mark.parametrize("skip", [3, 40])  # 40 crosses an epoch boundary
def test_iterator_state_resumes_bit_identically(byte_data, skip):
  kwargs = dict(seq_len=64, global_batch_size=8, seed=7, process_index=0,
                process_count=1)
  it = make_train_iterator(byte_data, **kwargs)
  _batches(it, skip)
  state = it.get_state()
  restored_state = json.loads(json.dumps(state))
  expected = _batches(it, 5)
  resumed = make_train_iterator(byte_data, **kwargs)
  resumed.set_state(restored_state)
  for want, got in zip(expected, _batches(resumed, 5)):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_concatenate_to_global_batch(byte_data, process_count):
  kwargs = dict(seq_len=32, global_batch_size=8, seed=11,
                read_options=NO_THREADS)
  single = make_train_iterator(byte_data, process_index=0, process_count=1,
                               **kwargs)
  parts = [make_train_iterator(byte_data, process_index=p,
                               process_count=process_count, **kwargs)
           for p in range(process_count)]
  for _ in range(6):
    want = next(single)
    got = [next(part) for part in parts]
    assert got[0]["inputs"].shape == (8 // process_count, 32)
    for key in ("inputs", "targets"):
      np.testing.assert_array_equal(
          np.concatenate([g[key] for g in got]), want[key])


def test_indivisible_global_batch_raises(byte_data):
  with pytest.raises(ValueError, match=r"global_batch_size=6 is not a "
                     r"positive multiple of process_count=4"):
    make_train_iterator(byte_data, seq_len=16, global_batch_size=6, seed=0,
                        process_index=0, process_count=4)


@pytest.mark.parametrize("batch_size,max_batches", [(4, None), (7, None),
                                                    (4, 2), (4, 5)])
def test_eval_batches_cover_every_window_once(byte_data, batch_size,
                                              max_batches):
  """All windows once, in order; a max_batches subset takes whole batches spread over the
  split (its first and its last batch included), never the split's start alone."""
  source = WindowSource(byte_data, 32, split="val")
  batches = make_eval_batches(byte_data, seq_len=32, batch_size=batch_size,
                              max_batches=max_batches)
  total = num_eval_batches(byte_data, seq_len=32, batch_size=batch_size)
  assert total == -(-len(source) // batch_size)
  chosen = list(range(total))
  if max_batches is not None and max_batches < total:
    chosen = sorted({round(x) for x in np.linspace(0, total - 1, max_batches)})
    assert chosen[0] == 0 and chosen[-1] == total - 1 and len(chosen) == max_batches
  expected = [w for b in chosen for w in range(b * batch_size,
                                                min((b + 1) * batch_size, len(source)))]
  assert len(batches) == len(chosen)
  rows = []
  for batch in batches:
    assert batch["inputs"].shape == batch["weights"].shape == (batch_size, 32)
    assert batch["weights"].dtype == np.float32
    np.testing.assert_array_equal(batch["targets"][:, :-1],
                                  batch["inputs"][:, 1:])
    for r in range(batch_size):
      if batch["weights"][r].all():
        rows.append(np.append(batch["inputs"][r], batch["targets"][r, -1]))
      else:
        assert not batch["weights"][r].any()
  assert len(rows) == len(expected)
  for i, row in zip(expected, rows):
    np.testing.assert_array_equal(row, source[i])


def test_resolve_eval_data(byte_data, text_tree, tmp_path):
  byte = toks.ByteTokenizer()
  assert resolve_eval_data(byte_data, byte, tmp_path / "cache") == (
      byte_data, "val")
  assert resolve_eval_data(byte_data, byte.spec(), tmp_path / "cache") == (
      byte_data, "val")
  for raw in (text_tree, text_tree / "data.jsonl"):
    path, split = resolve_eval_data(raw, byte, tmp_path / "cache")
    assert split == "eval" and path.parent == tmp_path / "cache"
    want = []
    for _, text in corpus.iter_documents([str(raw)]):
      want += [*byte.encode(text).tolist(), byte.eos_id]
    assert _read_split(path, "eval") == want
    assert resolve_eval_data(raw, byte, tmp_path / "cache") == (path, split)
  bpe_dir = tmp_path / "bpe_model"
  bpe = toks.train_bpe(iter(_stdlib_texts(3)), 300, bpe_dir / "tokenizer.json")
  path, _ = resolve_eval_data(text_tree / "a.txt", bpe.spec(),
                              tmp_path / "cache", base_dir=bpe_dir)
  ds = TokenDataset(path, "eval")
  assert ds.tokenizer.spec() == bpe.spec()
  assert ds.tokenizer.decode(ds.window(0, ds.num_tokens)) == (
      text_tree / "a.txt").read_text()
  with pytest.raises(ValueError, match="tokenizer mismatch"):
    resolve_eval_data(byte_data, bpe, tmp_path / "cache")
  with pytest.raises(FileNotFoundError, match="eval data not found"):
    resolve_eval_data(tmp_path / "nope", byte, tmp_path / "cache")


def test_package_reexports():
  import sparsejax.data as data
  for name in ("Tokenizer", "get_tokenizer", "tokenizer_from_spec",
               "TokenDataset", "make_train_iterator", "make_eval_batches",
               "prepare", "ensure_default_dataset", "default_dataset_dir",
               "resolve_eval_data"):
    assert callable(getattr(data, name)), name
  assert data.prepare is prepare
  assert os.path.basename(data.tokenizers.__file__) == "tokenizers.py"
