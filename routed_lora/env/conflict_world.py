"""The conflict world: the built-in search world with a tool language that differs from the reasoning language.

Why (issue 21): in the default world (:mod:`.world`) a search query is a copy of names the model has just read,
so the tool skill and the reasoning skill ask the shared parameters for the same thing (copy the name), and
every arm of the study reaches the 2-hop ceiling. Here the same content must be written in two languages
depending on the role of the token:

- every name word (first and last names, cities, countries, companies) has a **code**, a made-up word with a
  digit (``kaz4``): the retriever indexes each fact under its subject's code, never under the natural name, so a
  query must be written in codes (``<search> kaz4 bom7 born </search>``);
- questions and gold answers use natural names only; codes never appear in them;
- each passage mixes both: the subject in code, the object by its natural name *and* its code
  (``kaz4 bom7 was born in funmar code tiv2 .``);
- the expert's thoughts restate the fact in natural names only (``<think> zalgros gakdru was born in funmar .
  </think>``) and the answer is the natural name.

So after reading the same passage the reasoning role must write ``funmar`` (a thought, the answer) and the tool
role ``tiv2`` (the next query); and for the first query the tool must translate the question's natural name
word by word into codes (a cipher learnt from the training questions; a held-out person is a new combination of
known words, so the cipher generalises to them). One set of shared parameters has to map the same context to
different outputs by role: the conflict the DART claim is about, designed in rather than hoped for.

Everything else is the default world's (:func:`routed_lora.env.world.build_world`): entities, relations, the
held-out split by person, 1-hop and 2-hop questions, ``plan`` rows read by
:mod:`routed_lora.env.trajectories` (``query``: the scripted query in codes, ``fact``: the thought in natural
names, ``object``: the natural object). Built by ``routed-lora world build --kind conflict``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .world import QUESTIONS_1HOP, QUESTIONS_2HOP, RELATIONS, TEMPLATE_WORDS, World, _stopwords, build_world

# Words the conflict world's passages add to the templates (names must differ from them).
CODE_WORD = "code"

_CODE_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_CODE_VOWELS = ("a", "e", "i", "o", "u")


@dataclass
class ConflictWorld(World):
    codes: dict[str, str] = field(default_factory=dict)  # name word -> code
    kind: str = "conflict"

    def code(self, name: str) -> str:
        """The code of a name (each word translated: ``"zalgros gakdru"`` -> ``"kaz4 bom7"``)."""
        return " ".join(self.codes[w] for w in name.split())

    def passage(self, subject: str, relation: str) -> str:
        """The indexed text of a fact: subject in code, object by name and code."""
        tmpl, _ = RELATIONS[relation]
        obj = self.fact(subject, relation)
        return tmpl.format(s=self.code(subject), o=f"{obj} {CODE_WORD} {self.code(obj)}")

    def thought(self, subject: str, relation: str) -> str:
        """The expert's restatement of a fact: natural names only (the reasoning language)."""
        tmpl, _ = RELATIONS[relation]
        return tmpl.format(s=subject, o=self.fact(subject, relation))

    def query(self, subject: str, relation: str) -> str:
        """The scripted search query: the subject's code and the relation's keyword (the tool language)."""
        return f"{self.code(subject)} {RELATIONS[relation][1]}"


def _make_codes(rng: random.Random, n: int, banned: set[str]) -> list[str]:
    """``n`` distinct codes: two consonant-vowel syllables, a digit in between (``ka4z``, ``tu7mo``)."""
    out: list[str] = []
    seen = set(banned)
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200_000:
            raise RuntimeError(f"could not generate {n} distinct codes")
        c = (rng.choice(_CODE_ONSETS) + rng.choice(_CODE_VOWELS) + str(rng.randrange(10))
             + rng.choice(_CODE_ONSETS) + (rng.choice(_CODE_VOWELS) if rng.random() < 0.5 else ""))
        if c in seen:
            continue
        seen.add(c)
        out.append(c)
    return out


def build_conflict_world(seed: int = 0, **sizes) -> ConflictWorld:
    """The conflict world: the default world's entities and questions (same ``seed`` and ``sizes``), with codes
    for every name word, passages indexed by code, queries in codes and thoughts in natural names."""
    base = build_world(seed=seed, **sizes)
    rng = random.Random(f"codes-{seed}")
    words = base.first_names + base.last_names + base.countries + list(base.cities) + list(base.companies)
    banned = set(words) | TEMPLATE_WORDS | {CODE_WORD} | _stopwords()
    if CODE_WORD in words:  # cannot happen with the default syllables, but a name "code" would confuse passages
        raise ValueError(f"a generated name equals the template word {CODE_WORD!r}")
    codes = dict(zip(words, _make_codes(rng, len(words), banned)))
    world = ConflictWorld(base.seed, base.first_names, base.last_names, base.countries, base.cities, base.companies,
                          base.people, base.held_out_people, codes=codes)
    world.passages = _passages(world)
    # the same question rows as the default world (same rng draws), with the plan rewritten in the two languages
    world.train = [_recode(world, q) for q in base.train]
    world.test = [_recode(world, q) for q in base.test]
    return world


def _passages(world: ConflictWorld) -> list[dict]:
    out = []
    for p in world.people:
        for rel in ("born", "lives", "employer"):
            out.append({"id": str(len(out)), "contents": world.passage(p, rel)})
    for c in world.cities:
        out.append({"id": str(len(out)), "contents": world.passage(c, "country")})
    for c in world.companies:
        out.append({"id": str(len(out)), "contents": world.passage(c, "hq")})
    return out


def _recode(world: ConflictWorld, row: dict) -> dict:
    """A default-world question row with its plan in the conflict world's languages."""
    _, chain = {**QUESTIONS_1HOP, **QUESTIONS_2HOP}[row["kind"]]
    plan = []
    entity = row["subject"]
    for rel in chain:
        obj = world.fact(entity, rel)
        plan.append({"query": world.query(entity, rel), "fact": world.thought(entity, rel), "object": obj,
                     "passage": world.passage(entity, rel)})
        entity = obj
    assert [entity] == row["golden_answers"], (row, entity)
    return {**row, "plan": plan}


__all__ = ["CODE_WORD", "ConflictWorld", "build_conflict_world"]
