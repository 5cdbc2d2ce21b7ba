"""The three domains of `bench_specialize.py`, built at run time from what is installed (no network).

* **math** and **code**: the demo's own domains (`finescope_core.demo.build_demo_corpus`): one mixed
  instruction corpus (GSM8K, HumanEval, GPQA, chatterbot), the hand-written seeds of the domain, and its
  held-out eval file (the domain source's records the corpus does not hold).
* **text**: plain `text` records. The domain is software-licence prose: paragraphs of the licence files
  that installed distributions ship (`*.dist-info/LICENSE`, `COPYING`, `NOTICE`). The general text
  around it is other prose: the Python language reference (`pydoc_data.topics`, stdlib) and the long
  descriptions (READMEs) of installed distributions. Licence paragraphs are grouped into families that
  share a run of `FAMILY_NGRAM` words (MIT copies, BSD variants, one licence's repeated clauses), and a
  whole family goes to either the held-out eval file or the training side, so no held-out paragraph
  shares a 13-gram with anything trained on; general paragraphs that quote licence text are dropped.

Every domain returns the same `DomainData`; `kind` says how its primary metric is read (`chat` for
instruction domains, `text` for plain text).
"""

from __future__ import annotations

import importlib.metadata
import random
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from finescope_core.demo import build_demo_corpus
from finescope_core.evaluate.contamination import ngrams, words
from finescope_core.io import read_jsonl, write_jsonl

DOMAINS = ("math", "code", "text")
"""The bench's domains, in table order."""
DOMAIN_KIND = {"math": "chat", "code": "chat", "text": "text"}
"""chat: instruction records (primary metric chat perplexity); text: plain text (raw-text perplexity)."""
TEXT_SOURCE = "licence"
"""The `source` of the text domain's records (general records are `pydoc` or `readme`)."""
FAMILY_NGRAM = 8
"""Licence paragraphs sharing a run of this many words are one family (shorter than the contamination
check's 13-gram, so families never share one)."""
MIN_WORDS, MAX_WORDS = 20, 160
"""A prose paragraph's length in words (shorter ones are headings and fragments; longer ones are cut by
`evaluate.max_length` anyway)."""
TEXT_SEEDS = 10
TEXT_EVAL_ITEMS = 150
"""Held-out licence paragraphs at most (whole families, seeded)."""
_LICENCE_FILE = re.compile(r"(^|/)(LICEN[CS]E|COPYING|NOTICE)[^/]*$", re.IGNORECASE)
_MARKUP = re.compile(r"```|>>>|\[!|^\s*[|#*=.:<>-]|\$ |\bhttps?://\S+\s*$", re.MULTILINE)


@dataclass(frozen=True)
class DomainData:
    """One domain's inputs for `finescope run`.

    Attributes:
        name: the domain (`DOMAINS`).
        kind: `DOMAIN_KIND[name]`.
        corpus: the mixed corpus (JSONL with `source`).
        seeds: the domain's ~10 seeds (JSONL).
        eval_file: the held-out domain items (`evaluate.eval_file`): in neither the corpus nor the seeds.
        sources: corpus records per source.
    """

    name: str
    kind: str
    corpus: Path
    seeds: Path
    eval_file: Path
    sources: dict[str, int]


def build_domains(
    out: Path,
    names: Iterable[str],
    *,
    general: int = 1200,
    per_source_cap: Mapping[str, int | None] | None = None,
    seed: int = 0,
) -> dict[str, DomainData]:
    """Build the named domains under `out` (`out/demo` for math and code, `out/text` for text).

    Args:
        general: general paragraphs in the text domain's corpus (the licence paragraphs come on top).
        per_source_cap: the demo corpus's records per source (`build_demo_corpus`), for smaller runs.
        seed: seeds every sample and split.
    """
    names = list(names)
    unknown = sorted(set(names) - set(DOMAINS))
    if unknown:
        raise ValueError(f"unknown domains {unknown}; choose from {list(DOMAINS)}")
    out = Path(out)
    built: dict[str, DomainData] = {}
    demo = [n for n in names if n != "text"]
    if demo:
        data = build_demo_corpus(out / "demo", seed=seed, per_source_cap=per_source_cap)
        for name in demo:
            built[name] = DomainData(
                name, DOMAIN_KIND[name], data.corpus, data.seeds[name], data.evals[name], data.sources
            )
    if "text" in names:
        built["text"] = build_text_domain(out / "text", general=general, seed=seed)
    return {n: built[n] for n in names}


def prose_paragraphs(text: str) -> Iterator[str]:
    """Paragraphs of running prose in `text` (blank-line separated, whitespace collapsed): between
    `MIN_WORDS` and `MAX_WORDS` words, mostly letters, without code, tables, headings or list markup."""
    for block in re.split(r"\n\s*\n", text):
        if _MARKUP.search(block):
            continue
        para = " ".join(block.split())
        n = len(para.split())
        letters = sum(c.isalpha() for c in para) / max(1, len(para.replace(" ", "")))
        if MIN_WORDS <= n <= MAX_WORDS and letters >= 0.8:
            yield para


def _distributions() -> list[importlib.metadata.Distribution]:
    """Installed distributions in a fixed order (by name), one per name."""
    seen: dict[str, importlib.metadata.Distribution] = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name and name not in seen:
            seen[name] = dist
    return [seen[k] for k in sorted(seen)]


def licence_paragraphs() -> list[str]:
    """Distinct prose paragraphs of every licence file the installed distributions ship."""
    out: dict[str, None] = {}
    for dist in _distributions():
        for file in sorted(dist.files or [], key=str):
            if not _LICENCE_FILE.search(str(file)):
                continue
            try:
                text = Path(str(dist.locate_file(file))).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            out.update(dict.fromkeys(prose_paragraphs(text)))
    return list(out)


def general_paragraphs() -> list[tuple[str, str]]:
    """(source, paragraph): the Python language reference's prose (`pydoc`) and the installed
    distributions' long descriptions (`readme`), distinct."""
    from pydoc_data.topics import topics

    out: dict[str, str] = {}
    for key in sorted(topics):
        for para in prose_paragraphs(topics[key]):
            out.setdefault(para, "pydoc")
    for dist in _distributions():
        for para in prose_paragraphs(dist.metadata.get_payload() or ""):  # type: ignore[attr-defined]
            out.setdefault(para, "readme")
    return [(source, para) for para, source in out.items()]


def licence_families(paragraphs: list[str]) -> list[list[int]]:
    """Indices of `paragraphs` grouped into families: connected by shared `FAMILY_NGRAM`-word runs."""
    parent = list(range(len(paragraphs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[tuple[str, ...], int] = {}
    for i, para in enumerate(paragraphs):
        for gram in ngrams(words(para), FAMILY_NGRAM):
            j = owner.setdefault(gram, i)
            parent[root(i)] = root(j)
    families: dict[int, list[int]] = {}
    for i in range(len(paragraphs)):
        families.setdefault(root(i), []).append(i)
    return list(families.values())


def _record(source: str, n: int, text: str, prefix: str = "") -> dict[str, str]:
    """A plain-text record; `prefix` names seeds and held-out items apart from corpus records."""
    return {"id": f"{prefix or source}-{n}", "text": text, "source": source}


def build_text_domain(out: Path, *, general: int = 1200, seed: int = 0) -> DomainData:
    """Write the text domain's corpus, seeds and eval file under `out` (see the module docstring).

    Raises:
        ValueError: too few licence paragraphs installed for seeds, corpus and held-out items.
    """
    licences = licence_paragraphs()
    families = licence_families(licences)
    random.Random(f"{seed}:families").shuffle(families)
    held: list[int] = []
    train: list[int] = []
    for family in families:  # whole families, until the eval file is full
        (
            held if len(held) + len(family) <= TEXT_EVAL_ITEMS and len(held) < len(licences) // 4 else train
        ).extend(family)
    if len(train) < 4 * TEXT_SEEDS or len(held) < 20:
        raise ValueError(
            f"only {len(licences)} licence paragraphs installed ({len(held)} held out, {len(train)} for "
            "training): the text domain needs more installed distributions with licence files"
        )
    domain_grams = set().union(*(ngrams(words(p), FAMILY_NGRAM) for p in licences))
    pool = [
        (src, p) for src, p in general_paragraphs() if ngrams(words(p), FAMILY_NGRAM).isdisjoint(domain_grams)
    ]
    picked = random.Random(f"{seed}:general").sample(pool, min(general, len(pool)))
    train.sort()
    seeds = set(random.Random(f"{seed}:seeds").sample(train, TEXT_SEEDS))
    corpus = [_record(TEXT_SOURCE, i, licences[i]) for i in train if i not in seeds]
    corpus += [_record(src, n, p) for n, (src, p) in enumerate(picked)]
    random.Random(seed).shuffle(corpus)
    out = Path(out)
    paths = {k: out / f"{k}.jsonl" for k in ("corpus", "seeds", "eval")}
    write_jsonl(corpus, paths["corpus"], atomic=True)
    write_jsonl(
        [_record(TEXT_SOURCE, i, licences[i], "seed") for i in sorted(seeds)], paths["seeds"], atomic=True
    )
    write_jsonl(
        [_record(TEXT_SOURCE, i, licences[i], "heldout") for i in sorted(held)], paths["eval"], atomic=True
    )
    sources: dict[str, int] = {}
    for rec in corpus:
        sources[rec["source"]] = sources.get(rec["source"], 0) + 1
    return DomainData(
        "text", "text", paths["corpus"], paths["seeds"], paths["eval"], dict(sorted(sources.items()))
    )


def texts(path: Path) -> list[str]:
    """Every string field of every record of a JSONL file, joined per record (for overlap checks)."""
    return [" ".join(str(v) for k, v in r.items() if k not in ("id", "source")) for r in read_jsonl(path)]
