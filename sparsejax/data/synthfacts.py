"""Synthetic facts: a seeded fact-recall benchmark mixed into the training corpus.

Facts are (entity, relation) -> value triples. Entities are unique pronounceable names
("Bakor", "Timu"); each of the :data:`RELATIONS` (birthplace, colour, profession, ...) has its
own :data:`VALUES_PER_RELATION` candidate values (random lowercase words, distinct across
relations), and every fact draws one of them uniformly. Fact ``i`` is entity ``i // R``,
relation ``i % R`` (``R = len(RELATIONS)``), so ``num_facts`` need not be a multiple of R.

Disjoint fact sets (``offset`` K > 0, ``config.data.synthfacts_offset``): the facts
``[K, K + num_facts)`` continue the K-fact set of a run with ``synthfacts_facts = K`` (same seed):
they share its candidate values per relation (so an eval ranks the same words), while their
entities are new three-syllable names (never a name or value word of any offset-0 set, whose
words have two syllables) and their value indices are new draws. Entity names and value indices
beyond K depend only on the seed and the fact index, never on K or ``num_facts``: two ranges with
the same offset agree on every fact they share, and set A = (offset 0, K facts) and set B =
(offset K, N facts) never share an entity, whether or not K is a multiple of R. The offset-0
generator is today's (same facts, same datasets and cache keys); its draws depend on
``num_facts``, so (offset 0, K + N facts) is another set than A + B: evaluate the two ranges.

Every relation has TRAINING paraphrase templates (rendered into the training text) and
HELD-OUT question templates (used only by the eval, sparsejax/eval/synthfacts.py). Every
template ends with `` {v}.``: the prompt is the text before the value (trailing space
stripped) and the scored continuation is ``" " + value + "."`` (the "." terminator means a
short value is not favoured over a longer one it is a prefix of). No held-out template's
fixed text occurs in any training template (checked at import, :func:`_check_templates`), so
no held-out prompt can occur in the training text.

Mixing (:func:`mixed_dataset`): the training split of a prepared dataset (corpus documents
separated by ``eos``) is rebuilt with fact documents added - one rendered fact sentence per
document, each fact once per "repetition" in a random order with a random training template -
until fact tokens (eos included) are the closest to ``fraction`` of all training tokens that
whole fact documents allow; at least one full repetition is required. Corpus and fact
documents are then shuffled together at document level (seeded) and written as a new
prepared dataset under the data root (cache key: base dataset, settings,
:data:`GENERATOR_VERSION`). The val split is a byte copy of the base dataset's val split, so the
eval loss ("background loss") is comparable with runs without facts.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import re
import shutil

import numpy as np

from sparsejax.data.dataset import TokenDataset
from sparsejax.data.prepare import METADATA, _install, _SplitWriter, data_root, read_metadata
from sparsejax.errors import ConfigError

GENERATOR_VERSION = 1  # bump when names, templates or rendering change (new cache key)
VALUES_PER_RELATION = 16

# relation: (training templates, held-out question templates); every template has one "{e}"
# and ends with " {v}.".
RELATIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "birthplace": (("{e} was born in {v}.", "The birthplace of {e} is {v}.",
                    "{e}'s birthplace is {v}.", "{e} comes from {v}."),
                   ("Q: Where was {e} born? A: {v}.",
                    "Where is the hometown of {e}? It is {v}.")),
    "colour": (("{e}'s favourite colour is {v}.", "The favourite colour of {e} is {v}.",
                "{e} likes the colour {v}.", "Of all colours, {e} loves {v}."),
               ("Q: What colour does {e} like best? A: {v}.",
                "Which colour is dearest to {e}? It is {v}.")),
    "profession": (("{e} works as a {v}.", "The job of {e} is {v}.",
                    "{e}'s profession is {v}.", "By trade, {e} is a {v}."),
                   ("Q: What does {e} do for a living? A: {v}.",
                    "What is the occupation of {e}? It is {v}.")),
    "pet": (("{e} owns a {v}.", "The pet of {e} is a {v}.", "{e}'s pet is a {v}.",
             "At home, {e} keeps a {v}."),
            ("Q: What animal does {e} have? A: {v}.", "Which pet lives with {e}? A {v}.")),
    "food": (("{e} likes to eat {v}.", "The favourite food of {e} is {v}.",
              "{e}'s favourite dish is {v}.", "For dinner, {e} always has {v}."),
             ("Q: What does {e} eat most? A: {v}.", "Which meal does {e} prefer? It is {v}.")),
    "instrument": (("{e} plays the {v}.", "The instrument of {e} is the {v}.",
                    "{e}'s instrument is the {v}.", "On stage, {e} plays {v}."),
                   ("Q: Which instrument does {e} play? A: {v}.",
                    "What music does {e} make? On the {v}.")),
    "language": (("{e} speaks {v}.", "The language of {e} is {v}.",
                  "{e}'s mother tongue is {v}.", "At home, {e} talks in {v}."),
                 ("Q: What language does {e} speak? A: {v}.",
                  "In which tongue does {e} write? In {v}.")),
    "employer": (("{e} works for {v}.", "The employer of {e} is {v}.",
                  "{e}'s company is {v}.", "Every day, {e} goes to work at {v}."),
                 ("Q: Who employs {e}? A: {v}.", "Where does {e} have a job? At {v}.")),
}
_CONSONANTS, _VOWELS, _FINALS = "bdfgklmnprstvz", "aeiou", "nrsl"
_SYLLABLES = [c + v for c in _CONSONANTS for v in _VOWELS]
# names are two syllables plus an optional final consonant: "Bako", "Bakor"
NAME_SPACE = len(_SYLLABLES) ** 2 * (1 + len(_FINALS))
MAX_ENTITIES = 20_000  # leaves room for the 8 x 16 value words in the same space
MAX_FACTS = MAX_ENTITIES * len(RELATIONS)
# the entities beyond an offset: three syllables plus an optional final ("Bakoru", "Bakorul")
LONG_NAME_SPACE = len(_SYLLABLES) ** 3 * (1 + len(_FINALS))


def _name(i: int, syllables: int = 2) -> str:
  n = len(_SYLLABLES)
  final, rest = divmod(int(i), n ** syllables)
  word = ""
  for _ in range(syllables):
    rest, s = divmod(rest, n)
    word = _SYLLABLES[s] + word
  return word + ("" if final == 0 else _FINALS[final - 1])


def _pieces(template: str) -> list[str]:
  """The fixed text of a template: the pieces around "{e}" and before " {v}."."""
  if template.count("{e}") != 1 or not template.endswith(" {v}."):
    raise ValueError(f"template {template!r} needs one {{e}} and must end with ' {{v}}.'")
  return [p for p in template[:-len(" {v}.")].split("{e}") if p.strip()]


def _check_templates() -> None:
  training = [t for train, _ in RELATIONS.values() for t in train]
  for name, (train, held) in RELATIONS.items():
    for template in held:
      for piece in _pieces(template):
        used = [t for t in training if piece in t]
        if used:
          raise ValueError(f"{name}: held-out piece {piece!r} occurs in training {used}")
    for template in train:
      _pieces(template)


_check_templates()


@dataclasses.dataclass(frozen=True)
class Facts:
  """The facts ``[offset, offset + num_facts)``: ``values[relation]`` (the candidates), and per
  fact ``j`` of the set (global index ``i = offset + j``: entity ``i // R``, relation ``i % R``)
  the index ``value_idx[j]`` into its relation's candidates; ``entities`` are the names of the
  entities ``offset // R`` onwards."""
  entities: tuple[str, ...]
  values: dict[str, tuple[str, ...]]
  value_idx: np.ndarray
  seed: int
  offset: int = 0

  @property
  def num_facts(self) -> int:
    return len(self.value_idx)

  def fact(self, j: int) -> tuple[str, str, str]:
    """(entity, relation, value) of the set's fact j (global index offset + j)."""
    i = self.offset + j
    relation = list(RELATIONS)[i % len(RELATIONS)]
    return (self.entities[i // len(RELATIONS) - self.offset // len(RELATIONS)], relation,
            self.values[relation][int(self.value_idx[j])])


@dataclasses.dataclass(frozen=True)
class EvalItem:
  """A question: ``prompt`` (no trailing space), the gold value and the relation's candidates
  (the gold is ``candidates[gold]``); the scored continuation of candidate c is
  ``" " + c + "."``."""
  prompt: str
  gold: int
  candidates: tuple[str, ...]
  fact: int  # the global fact index (offset + j)
  template: str


def check(facts: int, fraction: float, seed: int = 0, offset: int = 0) -> None:
  """One-line ConfigErrors for settings the generator cannot honour."""
  if not 0 <= facts <= MAX_FACTS:
    raise ConfigError(f"config.data.synthfacts_facts: {facts} must be in [0, {MAX_FACTS}] "
                      f"({MAX_ENTITIES} entities x {len(RELATIONS)} relations); 0 = off")
  if offset < 0 or offset + facts > MAX_FACTS:
    raise ConfigError(f"config.data.synthfacts_offset: {offset} must be >= 0 with offset + "
                      f"synthfacts_facts ({offset + facts}) <= {MAX_FACTS}")
  if offset and not facts:
    raise ConfigError(f"config.data.synthfacts_offset: {offset} needs "
                      "config.data.synthfacts_facts > 0 (the facts [offset, offset + facts))")
  if not 0.0 < fraction < 1.0:
    raise ConfigError(f"config.data.synthfacts_fraction: {fraction} must be in (0, 1) (the "
                      "fraction of training tokens that are fact text)")
  if seed < 0:
    raise ConfigError(f"config.data.synthfacts_seed: {seed} must be >= 0")


def make_facts(num_facts: int, seed: int, offset: int = 0) -> Facts:
  """The facts ``[offset, offset + num_facts)``, deterministic in ``seed`` (offset 0:
  ``ceil(num_facts / R)`` entities; offset K > 0: the continuation of the K-fact set, see the
  module docstring)."""
  check(num_facts, 0.5, seed, offset)
  if offset:
    values = make_facts(offset, seed).values
    names, value_idx = _continuation(seed)
    first, last = offset // len(RELATIONS), (offset + num_facts - 1) // len(RELATIONS)
    return Facts(tuple(names[first:last + 1]), values,
                 value_idx[offset:offset + num_facts].copy(), seed, offset)
  rng = np.random.default_rng([seed, GENERATOR_VERSION])
  num_entities = -(-num_facts // len(RELATIONS))
  num_values = VALUES_PER_RELATION * len(RELATIONS)
  ids = rng.choice(NAME_SPACE, size=num_entities + num_values, replace=False)
  entities = tuple(_name(i).capitalize() for i in ids[:num_entities])
  words = [_name(i) for i in ids[num_entities:]]
  values = {r: tuple(words[k * VALUES_PER_RELATION:(k + 1) * VALUES_PER_RELATION])
            for k, r in enumerate(RELATIONS)}
  value_idx = rng.integers(0, VALUES_PER_RELATION, size=num_facts)
  return Facts(entities, values, value_idx, seed)


@functools.lru_cache(maxsize=4)
def _continuation(seed: int) -> tuple[tuple[str, ...], np.ndarray]:
  """Every possible entity name and value index beyond an offset (a function of the seed only):
  ``MAX_ENTITIES`` distinct three-syllable names and ``MAX_FACTS`` indices."""
  rng = np.random.default_rng([seed, GENERATOR_VERSION, 2])
  ids = rng.choice(LONG_NAME_SPACE, size=MAX_ENTITIES, replace=False)
  value_idx = rng.integers(0, VALUES_PER_RELATION, size=MAX_FACTS)
  value_idx.setflags(write=False)
  return tuple(_name(i, 3).capitalize() for i in ids), value_idx


def split_template(template: str, entity: str) -> str:
  """The prompt of a template for an entity: the text before " {v}."."""
  return template[:-len(" {v}.")].replace("{e}", entity)


def render(template: str, entity: str, value: str) -> str:
  return f"{split_template(template, entity)} {value}."


def training_documents(facts: Facts, rng: np.random.Generator,
                       repetitions: int = 1) -> list[str]:
  """Each repetition: every fact once, in a random order, with a random training template."""
  docs = []
  for _ in range(repetitions):
    order = rng.permutation(facts.num_facts)
    choice = rng.integers(0, 1 << 30, size=facts.num_facts)
    for i, c in zip(order, choice):
      entity, relation, value = facts.fact(int(i))
      templates = RELATIONS[relation][0]
      docs.append(render(templates[c % len(templates)], entity, value))
  return docs


def eval_items(facts: Facts, held_out: bool = True) -> list[EvalItem]:
  """Every (fact, template) question: the held-out templates, or the training ones."""
  items = []
  for i in range(facts.num_facts):
    entity, relation, value = facts.fact(i)
    candidates = facts.values[relation]
    for template in RELATIONS[relation][0 if not held_out else 1]:
      items.append(EvalItem(split_template(template, entity), candidates.index(value),
                            candidates, facts.offset + i, template))
  return items


def is_fact_text(text: str) -> bool:
  """Whether a document is a rendered training fact (any entity / value)."""
  return _FACT_RE.fullmatch(text) is not None


_FACT_RE = re.compile("|".join(
    re.escape(t).replace(re.escape("{e}"), "[A-Z][a-z]+").replace(re.escape("{v}"), "[a-z]+")
    for train, _ in RELATIONS.values() for t in train))


# --------------------------------------------------------------------------------------------
# The mixed dataset.

def _settings(facts: int, fraction: float, seed: int, offset: int = 0) -> dict:
  """The mixed dataset's settings (cache key, fingerprint); ``offset`` only when set, so the
  keys of offset-0 datasets are those they always had."""
  out = {"facts": int(facts), "fraction": float(fraction), "seed": int(seed),
         "version": GENERATOR_VERSION}
  return {**out, "offset": int(offset)} if offset else out


def mixed_dir(base: pathlib.Path, facts: int, fraction: float, seed: int,
              offset: int = 0) -> pathlib.Path:
  """Where the mixed dataset of ``base`` and these settings is cached (under the data root)."""
  meta = read_metadata(base)
  key = json.dumps({"base": str(base.resolve()), "tokenizer": meta["tokenizer"],
                    "splits": meta["splits"], **_settings(facts, fraction, seed, offset)},
                   sort_keys=True)
  digest = hashlib.sha1(key.encode()).hexdigest()[:10]
  count = f"{offset}+{facts}" if offset else f"{facts}"
  return data_root() / f"{base.name}-synthfacts{count}-{digest}"


def mixed_dataset(base: str | os.PathLike, facts: int, fraction: float, seed: int,
                  out: str | os.PathLike | None = None, offset: int = 0) -> pathlib.Path:
  """The prepared dataset of ``base`` with the facts ``[offset, offset + facts)`` mixed into its
  training split (built on first use, then reused; see the module docstring). Returns its
  folder."""
  check(facts, fraction, seed, offset)
  if facts < 1:
    raise ConfigError("config.data.synthfacts_facts: 0 means no facts; nothing to mix in")
  base = pathlib.Path(base).expanduser()
  out = pathlib.Path(out) if out is not None else mixed_dir(base, facts, fraction, seed, offset)
  settings = _settings(facts, fraction, seed, offset)
  meta = read_metadata(out)
  if meta is not None and meta.get("synthfacts", {}).get("settings") == settings:
    return out
  stale = out.exists()  # a partial or other-settings folder: replaced once the new one is built
  tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  try:
    meta = _build_mixed(base, tmp, facts, fraction, seed, offset)
    (tmp / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    _install(tmp, out, overwrite=stale)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def _docs(tokens: np.ndarray, eos: int) -> tuple[np.ndarray, np.ndarray]:
  """(starts, ends) of the eos-terminated documents of a token stream (eos included)."""
  ends = np.flatnonzero(tokens == eos) + 1
  if not len(ends) or ends[-1] != len(tokens):
    ends = np.append(ends, len(tokens))
  return np.concatenate([[0], ends[:-1]]), ends


def _fact_stream(facts: Facts, rng, tok, corpus_tokens: int, fraction: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
  """Fact documents as one token stream (each followed by eos) with their (starts, ends) and
  UTF-8 byte count: whole repetitions are rendered until they reach the target, then the
  number of documents whose token total is closest to it is kept."""
  target = corpus_tokens * fraction / (1.0 - fraction)
  docs, ids, total = [], [], 0
  while total < target:
    rendered = training_documents(facts, rng)
    encoded = tok.encode_batch(rendered)
    docs += rendered
    ids += encoded
    total += sum(len(x) + 1 for x in encoded)
  cum = np.cumsum([len(x) + 1 for x in ids])
  k = int(np.searchsorted(cum, target))  # cum[k] >= target > cum[k - 1]
  keep = k + 1 if k == 0 or cum[k] - target <= target - cum[k - 1] else k
  if keep < facts.num_facts:
    raise ConfigError(
        f"config.data.synthfacts_fraction: {fraction} gives {int(target)} fact tokens, fewer "
        f"than one rendering of each of the {facts.num_facts} facts; raise it or use fewer facts")
  eos = np.array([tok.eos_id], np.int64)
  stream = np.concatenate([p for x in ids[:keep] for p in (x, eos)]).astype(np.int64)
  ends = cum[:keep]
  starts = np.concatenate([[0], ends[:-1]])
  return stream, starts, ends, sum(len(d.encode("utf-8")) for d in docs[:keep])


def _build_mixed(base: pathlib.Path, folder: pathlib.Path, facts_n: int, fraction: float,
                 seed: int, offset: int = 0) -> dict:
  train = TokenDataset(base, "train")
  meta = dict(train.metadata)
  corpus = train.window(0, train.num_tokens)
  facts = make_facts(facts_n, seed, offset)
  rng = np.random.default_rng([seed, GENERATOR_VERSION, 1] + ([offset] if offset else []))
  fact_tokens, f_starts, f_ends, fact_bytes = _fact_stream(facts, rng, train.tokenizer,
                                                           train.num_tokens, fraction)
  c_starts, c_ends = _docs(corpus, train.eos_id)
  num_corpus = len(c_starts)
  order = rng.permutation(num_corpus + len(f_starts))
  dtype = np.dtype(meta["dtype"])
  writer = _SplitWriter(folder, "train", dtype, shard_tokens=2**26)
  chunk = 4096
  for lo in range(0, len(order), chunk):
    parts = [corpus[c_starts[d]:c_ends[d]] if d < num_corpus else
             fact_tokens[f_starts[d - num_corpus]:f_ends[d - num_corpus]]
             for d in order[lo:lo + chunk]]
    writer.add(np.concatenate(parts), 0, 0)
  split = writer.close()
  split["num_bytes"] = train.num_bytes + fact_bytes
  split["num_docs"] = int(meta["splits"]["train"].get("num_docs", num_corpus)) + len(f_starts)
  splits = {"train": split}
  for name, info in meta["splits"].items():
    if name == "train":
      continue
    for shard in info["shards"]:
      shutil.copyfile(base / shard["file"], folder / shard["file"])
    splits[name] = info
  if train.tokenizer.file_name:
    shutil.copyfile(base / train.tokenizer.file_name, folder / train.tokenizer.file_name)
  fact_count = int(f_ends[-1])
  meta.update(splits=splits, source=f"{meta.get('source')} + synthfacts ({base})",
              synthfacts={"settings": _settings(facts_n, fraction, seed, offset),
                          "fact_tokens": fact_count, "corpus_tokens": train.num_tokens,
                          "fact_docs": len(f_starts),
                          "achieved_fraction": fact_count / (fact_count + train.num_tokens)})
  return meta
