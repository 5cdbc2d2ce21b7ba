"""The demo's lm-eval tasks: built from GSM8K problems outside the demo corpus, well formed, seeded, and
found by lm-eval's task index in the directory the demo points `evaluate.lm_eval_include` at."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from finescope_core.config import EvalConfig
from finescope_core.demo import build_demo_corpus, gsm8k_records
from finescope_core.demo_lm_eval import ANSWER_TASK, DEMO_TASKS, MAX_ITEMS, NEXT_STEP_TASK
from finescope_core.evaluate import check_harness_config
from finescope_core.io import read_jsonl


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_demo_corpus(tmp_path_factory.mktemp("demo"), seed=0)


def test_tasks_use_only_problems_outside_the_corpus(built):
    assert built.lm_eval == built.corpus.parent / "lm_eval"
    corpus_ids = {r["id"] for r in read_jsonl(built.corpus)}
    by_id = {r["id"]: r for r in gsm8k_records()}
    mc = read_jsonl(built.lm_eval / f"{NEXT_STEP_TASK}.jsonl")
    gen = read_jsonl(built.lm_eval / f"{ANSWER_TASK}.jsonl")
    assert 0 < len(mc) <= MAX_ITEMS and 0 < len(gen) <= MAX_ITEMS
    assert not {i["id"] for i in mc + gen} & corpus_ids
    assert not {i["id"] for i in mc} & {i["id"] for i in gen}
    for item in mc:
        solution = by_id[item["id"]]["output"].splitlines()
        assert len(set(item["choices"])) == 4
        assert item["choices"][item["label"]] in solution  # the true next line is this problem's
        assert item["context"].startswith(f"Question: {by_id[item['id']]['instruction']}\nAnswer:")
        shown = item["context"].split("\nAnswer:", 1)[1].splitlines()[1:]
        assert shown == solution[: len(shown)] and solution[len(shown)] == item["choices"][item["label"]]
    # The labels are spread over the positions (shuffled), so always answering "A" is chance.
    assert len({i["label"] for i in mc}) == 4
    for item in gen:
        final = by_id[item["id"]]["output"].splitlines()[-1]
        assert final.replace(",", "") == f"#### {item['answer']}"
        assert item["prompt"].endswith(f"Question: {by_id[item['id']]['instruction']}\nAnswer:")
        shot = re.findall(r"#### .+", item["prompt"])
        assert len(shot) == 1  # one worked example in the GSM8K format, then the question


def test_yaml_points_at_the_absolute_data_and_lm_eval_finds_both_tasks(built):
    for name in DEMO_TASKS:
        doc = yaml.safe_load((built.lm_eval / f"{name}.yaml").read_text())
        data = Path(doc["dataset_kwargs"]["data_files"]["test"])
        assert doc["task"] == name and data.is_absolute() and data.is_file()
    gen = yaml.safe_load((built.lm_eval / f"{ANSWER_TASK}.yaml").read_text())
    assert gen["generation_kwargs"]["until"] and gen["generation_kwargs"]["max_gen_toks"] <= 128
    assert check_harness_config(
        EvalConfig(lm_eval_tasks=list(DEMO_TASKS), lm_eval_include=str(built.lm_eval))
    )


def test_same_seed_same_tasks_and_no_tasks_when_the_corpus_keeps_every_problem(built, tmp_path):
    again = build_demo_corpus(tmp_path / "again", seed=0)
    for name in DEMO_TASKS:
        assert read_jsonl(again.lm_eval / f"{name}.jsonl") == read_jsonl(built.lm_eval / f"{name}.jsonl")
    other = build_demo_corpus(tmp_path / "other", seed=1)
    assert read_jsonl(other.lm_eval / f"{NEXT_STEP_TASK}.jsonl") != read_jsonl(
        built.lm_eval / f"{NEXT_STEP_TASK}.jsonl"
    )
    assert build_demo_corpus(tmp_path / "all", per_source_cap={"gsm8k": None}).lm_eval is None
