"""A generated world for search-augmented QA: people, cities, countries and companies, one passage per fact, and
1-hop and 2-hop questions that need the search tool, with a held-out split.

Design (see DESIGN.md §3b):

- every name is made of made-up words of at least 3 letters that are neither English stopwords (``bm25s`` drops
  them) nor template words, so BM25 sees every name;
- a person is ``first last`` with both parts drawn from small shared pools, so a held-out person is a new
  combination of words whose embeddings were trained on other people;
- cities, countries and companies are single words, so the bridge entity of a 2-hop question is a single token
  (copying a two-token bridge was the bottleneck of the throwaway study);
- no fact relates two people (bag-of-words BM25 confuses "A managed by B" with "C managed by A"); every relation
  has its own keyword (born, lives, employed, headquartered, country) and the scripted search query is
  ``<subject words> <keyword>``, which ranks the fact's passage first;
- the held-out split is by person (all questions about a held-out person are held out) plus a share of the
  city / company questions; train and test questions are disjoint.

``build_world(seed=0)`` returns a :class:`World`; ``write_world(world, out_dir)`` writes ``corpus.jsonl``
(``{"id", "contents"}``), ``train.jsonl`` and ``test.jsonl`` (``question``, ``golden_answers``, ``hops`` and the
scripted search plan used by :mod:`routed_lora.env.trajectories`), and ``world.json`` (the entities).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Syllables for made-up words. Consonant-vowel-consonant pieces give pronounceable words of 5 to 9 letters.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr", "st")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "n", "r", "l", "k", "s", "x", "m")

# Words used by the templates (questions, passages, thoughts, prompt, passage formatting). Generated names must
# differ from all of them.
TEMPLATE_WORDS = {
    "where", "was", "born", "in", "which", "city", "does", "live", "lives", "company", "employs", "is", "employed",
    "by", "country", "the", "headquartered", "that", "a", "question", "doc", "title", "search", "for", "answer",
    "of", "found", "i", "need", "so",
}

RELATIONS = {
    # relation: (passage template, search keyword)
    "born": ("{s} was born in {o} .", "born"),
    "lives": ("{s} lives in {o} .", "lives"),
    "employer": ("{s} is employed by {o} .", "employed"),
    "hq": ("{s} is headquartered in {o} .", "headquartered"),
    "country": ("{s} is a city in the country {o} .", "country"),
}

# question kind: (question template, chain of relations)
QUESTIONS_1HOP = {
    "born_city": ("where was {s} born ?", ("born",)),
    "live_city": ("in which city does {s} live ?", ("lives",)),
    "employer": ("which company employs {s} ?", ("employer",)),
    "city_country": ("in which country is {s} ?", ("country",)),
    "company_hq": ("in which city is {s} headquartered ?", ("hq",)),
}
QUESTIONS_2HOP = {
    "born_country": ("in which country was {s} born ?", ("born", "country")),
    "live_country": ("in which country does {s} live ?", ("lives", "country")),
    "employer_hq": ("in which city is the company that employs {s} headquartered ?", ("employer", "hq")),
}


def _stopwords() -> set[str]:
    try:
        from bm25s.stopwords import STOPWORDS_EN

        return set(STOPWORDS_EN)
    except Exception:  # bm25s missing: the world can still be built
        return {"a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it", "no",
                "not", "of", "on", "or", "such", "that", "the", "their", "then", "there", "these", "they", "this",
                "to", "was", "will", "with"}


@dataclass
class World:
    seed: int
    first_names: list[str]
    last_names: list[str]
    countries: list[str]
    cities: dict[str, str]  # city -> country
    companies: dict[str, str]  # company -> headquarters city
    people: dict[str, dict[str, str]]  # "first last" -> {"born": city, "lives": city, "employer": company}
    held_out_people: list[str]
    passages: list[dict] = field(default_factory=list)  # {"id", "contents"}
    train: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)

    def fact(self, subject: str, relation: str) -> str:
        """The object of ``relation`` for ``subject``."""
        if relation in ("born", "lives", "employer"):
            return self.people[subject][relation]
        if relation == "hq":
            return self.companies[subject]
        if relation == "country":
            return self.cities[subject]
        raise KeyError(relation)

    def texts(self) -> list[str]:
        """Every text of the world (passages, questions), for building a vocabulary."""
        out = [p["contents"] for p in self.passages]
        out += [q["question"] for q in self.train + self.test]
        return out


def _make_words(rng: random.Random, n: int, taken: set[str], min_len: int = 4, max_len: int = 8) -> list[str]:
    words: list[str] = []
    banned = taken | TEMPLATE_WORDS | _stopwords()
    tries = 0
    while len(words) < n:
        tries += 1
        if tries > 100_000:
            raise RuntimeError(f"could not generate {n} distinct names")
        k = rng.choice((2, 2, 3))
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(k))
        if not (min_len <= len(w) <= max_len) or w in banned:
            continue
        banned.add(w)
        words.append(w)
    taken.update(words)
    return words


def build_world(
    seed: int = 0,
    *,
    n_first: int = 24,
    n_last: int = 24,
    n_people: int = 400,
    n_countries: int = 8,
    n_cities: int = 40,
    n_companies: int = 30,
    held_out_frac: float = 0.2,
) -> World:
    """Generate a world. Deterministic in ``seed`` and the sizes."""
    if n_people > n_first * n_last:
        raise ValueError(f"n_people={n_people} exceeds the {n_first * n_last} first/last name combinations")
    rng = random.Random(seed)
    taken: set[str] = set()
    first = _make_words(rng, n_first, taken)
    last = _make_words(rng, n_last, taken)
    countries = _make_words(rng, n_countries, taken)
    city_names = _make_words(rng, n_cities, taken)
    company_names = _make_words(rng, n_companies, taken)

    # every country gets at least one city, every city at least one company headquarters if possible
    cities = {c: countries[i % n_countries] if i < n_countries else rng.choice(countries)
              for i, c in enumerate(city_names)}
    companies = {c: city_names[i % n_cities] if i < n_cities else rng.choice(city_names)
                 for i, c in enumerate(company_names)}

    combos = [(f, l) for f in first for l in last]
    rng.shuffle(combos)
    people: dict[str, dict[str, str]] = {}
    for f, l in combos[:n_people]:
        people[f"{f} {l}"] = {
            "born": rng.choice(city_names),
            "lives": rng.choice(city_names),
            "employer": rng.choice(company_names),
        }
    names = list(people)
    n_held = int(round(held_out_frac * n_people))
    held = _pick_held_out(rng, names, n_held, first, last)

    world = World(seed, first, last, countries, cities, companies, people, sorted(held))
    world.passages = _passages(world)
    world.train, world.test = _questions(world, rng, set(held), held_out_frac)
    return world


def _pick_held_out(rng: random.Random, names: list[str], n_held: int, first: list[str], last: list[str]) -> list[str]:
    """Held-out people, chosen so that every first and last name still occurs among the training people."""
    order = names[:]
    rng.shuffle(order)
    held: list[str] = []
    count_f = {f: 0 for f in first}
    count_l = {l: 0 for l in last}
    for n in names:
        f, l = n.split()
        count_f[f] += 1
        count_l[l] += 1
    for n in order:
        if len(held) == n_held:
            break
        f, l = n.split()
        if count_f[f] > 1 and count_l[l] > 1:
            held.append(n)
            count_f[f] -= 1
            count_l[l] -= 1
    return held


def _passages(world: World) -> list[dict]:
    out = []

    def add(subject: str, rel: str):
        tmpl, _ = RELATIONS[rel]
        out.append({"id": str(len(out)), "contents": tmpl.format(s=subject, o=world.fact(subject, rel))})

    for p in world.people:
        for rel in ("born", "lives", "employer"):
            add(p, rel)
    for c in world.cities:
        add(c, "country")
    for c in world.companies:
        add(c, "hq")
    return out


def _question(world: World, kind: str, subject: str) -> dict:
    tmpl, chain = {**QUESTIONS_1HOP, **QUESTIONS_2HOP}[kind]
    plan = []
    entity = subject
    for rel in chain:
        obj = world.fact(entity, rel)
        plan.append({
            "query": f"{entity} {RELATIONS[rel][1]}",
            "fact": RELATIONS[rel][0].format(s=entity, o=obj),
            "object": obj,
        })
        entity = obj
    return {
        "question": tmpl.format(s=subject),
        "golden_answers": [entity],
        "hops": len(chain),
        "kind": kind,
        "subject": subject,
        "plan": plan,
    }


def _questions(world: World, rng: random.Random, held: set[str], held_out_frac: float):
    train, test = [], []
    person_kinds = ("born_city", "live_city", "employer", "born_country", "live_country", "employer_hq")
    for p in world.people:
        for kind in person_kinds:
            (test if p in held else train).append(_question(world, kind, p))
    entity_qs = [_question(world, "city_country", c) for c in world.cities]
    entity_qs += [_question(world, "company_hq", c) for c in world.companies]
    rng.shuffle(entity_qs)
    n_test = int(round(held_out_frac * len(entity_qs)))
    test += entity_qs[:n_test]
    train += entity_qs[n_test:]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)


def write_world(world: World, out_dir: str | Path) -> dict[str, Path]:
    """Write ``corpus.jsonl``, ``train.jsonl``, ``test.jsonl`` and ``world.json`` under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.jsonl" for name in ("corpus", "train", "test")}
    _write_jsonl(paths["corpus"], world.passages)
    _write_jsonl(paths["train"], world.train)
    _write_jsonl(paths["test"], world.test)
    meta = asdict(world)
    for k in ("passages", "train", "test"):
        meta.pop(k)
    meta["sizes"] = {"passages": len(world.passages), "train": len(world.train), "test": len(world.test)}
    paths["world"] = out / "world.json"
    paths["world"].write_text(json.dumps(meta, indent=1))
    return paths
