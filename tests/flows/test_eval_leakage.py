"""Every kind of evaluation item is checked against the training texts, and its corpus duplicates
leave the curation pool: multiple-choice and numeric files and the lm-eval documents the project builds,
as well as the domain and general items."""

import json
import random

from finescope_core.config import FinescopeConfig
from finescope_core.data import load_records
from finescope_core.demo_lm_eval import ANSWER_TASK, NEXT_STEP_TASK, write_demo_harness_tasks
from finescope_core.evaluate.harness_docs import harness_texts
from finescope_core.evaluate.leakage import mc_text, numeric_text
from finescope_core.evaluate.split import EvalItem
from finescope_core.io import read_jsonl
from finescope_core.report.sections import _eval_sets_text
from tasks.evalset import EvalFiles, decontaminate, eval_files, holdout

WORDS = [f"w{i}" for i in range(400)]


def _sentence(rng: random.Random, n: int = 16) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _mc(rng: random.Random, n: int) -> list[dict]:
    return [
        {"question": _sentence(rng), "choices": [_sentence(rng, 3), _sentence(rng, 3)], "answer": 0}
        for _ in range(n)
    ]


def _numeric(rng: random.Random, n: int) -> list[dict]:
    return [{"question": _sentence(rng), "answer": f"{_sentence(rng, 8)} #### {i}"} for i in range(n)]


def test_mc_and_numeric_items_seen_in_training_are_dropped_and_counted():
    rng = random.Random(0)
    mc, numeric = _mc(rng, 6), _numeric(rng, 5)
    domain = [EvalItem(f"d{i}", _sentence(rng), "eval.jsonl") for i in range(4)]
    # Training holds MC item 2's question (a 13-gram), a re-cased copy of numeric item 4's answer (a near
    # duplicate of the item's text without its question would not be; the whole item is), and noise.
    training = [f"Q: {mc[2]['question']} A: yes", numeric_text(numeric[4]).upper() + " !", _sentence(rng)]
    files = EvalFiles(mc=mc, numeric=numeric)
    data = decontaminate(domain, [], training, {}, files)
    assert data.mc == [m for i, m in enumerate(mc) if i != 2]
    assert data.numeric == numeric[:4]
    assert data.info["mc"]["checked"] == 6 and data.info["mc"]["dropped_ngram"] == 1
    assert data.info["numeric"]["kept"] == 4
    assert data.info["numeric"]["dropped_ngram"] + data.info["numeric"]["dropped_near_duplicate"] == 1
    assert data.payload()["mc"] == data.mc and data.payload()["numeric"] == data.numeric
    text = _eval_sets_text(data.info)
    assert "- mc items: every item of evaluate.mc_file" in text and "5 kept of 6" in text
    assert "- numeric items: every item of evaluate.numeric_file" in text and "4 kept of 5" in text


def test_corpus_duplicates_of_mc_and_numeric_items_leave_the_curation_pool(tmp_path):
    rng = random.Random(1)
    mc, numeric = _mc(rng, 4), _numeric(rng, 4)
    rows = [{"id": f"r{i}", "text": _sentence(rng)} for i in range(30)]
    rows += [
        {"id": "has-mc", "text": "Question: " + mc_text(mc[1])},
        {"id": "has-numeric", "text": numeric[3]["question"] + " " + numeric[3]["answer"]},
    ]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "seeds.jsonl").write_text(json.dumps({"text": _sentence(rng)}) + "\n")
    cfg = FinescopeConfig(
        seeds=[str(tmp_path / "seeds.jsonl")],
        corpus=[str(tmp_path / "corpus.jsonl")],
        evaluate={"split_fraction": 0.001},
        store=str(tmp_path / "store"),
    )
    seeds = load_records(cfg.seeds, role="seeds")
    corpus = load_records(cfg.corpus, role="corpus")
    held = holdout(cfg, seeds, corpus, EvalFiles(mc=mc, numeric=numeric))
    assert held.file_duplicates == ["has-mc", "has-numeric"]
    assert held.duplicates_by_kind == {"mc": 1, "numeric": 1}
    assert set(held.excluded) == {"has-mc", "has-numeric"}


def _problems(rng: random.Random, n: int) -> list[dict]:
    """GSM8K-shaped records: a question and a worked solution ending in `#### N`."""
    return [
        {
            "id": f"p{i}",
            "instruction": _sentence(rng),
            "output": "\n".join([_sentence(rng, 8), _sentence(rng, 8), _sentence(rng, 8), f"#### {i}"]),
        }
        for i in range(n)
    ]


def test_lm_eval_documents_the_demo_builds_are_decontaminated_and_leave_the_pool(tmp_path):
    rng = random.Random(2)
    problems = _problems(rng, 12)
    include = write_demo_harness_tasks(tmp_path / "lm_eval", problems, seed=0)
    texts = harness_texts(str(include), [NEXT_STEP_TASK, ANSWER_TASK])
    steps, answers = (read_jsonl(include / f"{t}.jsonl") for t in (NEXT_STEP_TASK, ANSWER_TASK))
    assert [len(texts[NEXT_STEP_TASK]), len(texts[ANSWER_TASK])] == [len(steps), len(answers)]
    assert steps[1]["context"] in texts[NEXT_STEP_TASK][1]
    # Training holds next-step document 1 (its context and choices) and nothing of the answer task.
    training = [texts[NEXT_STEP_TASK][1] + " and more", _sentence(rng)]
    data = decontaminate(
        [EvalItem("d0", _sentence(rng), "eval.jsonl")], [], training, {}, EvalFiles(lm_eval=texts)
    )
    assert data.lm_eval_docs == {
        NEXT_STEP_TASK: [i for i in range(len(steps)) if i != 1],
        ANSWER_TASK: list(range(len(answers))),
    }
    assert data.info["lm_eval"]["tasks"][NEXT_STEP_TASK]["dropped_ngram"] == 1
    assert data.info["lm_eval"]["checked"] == len(steps) + len(answers)
    assert data.payload()["lm_eval_docs"] == data.lm_eval_docs
    assert "- lm_eval items: the documents of" in _eval_sets_text(data.info)

    # A corpus record holding an answer-task problem leaves the curation pool.
    asked = next(p for p in problems if p["instruction"] in answers[0]["prompt"].split("\n\n")[-1])
    rows = [{"id": f"r{i}", "text": _sentence(rng)} for i in range(20)]
    rows.append({"id": "has-doc", "instruction": asked["instruction"], "output": asked["output"]})
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "seeds.jsonl").write_text(json.dumps({"text": _sentence(rng)}) + "\n")
    cfg = FinescopeConfig(
        seeds=[str(tmp_path / "seeds.jsonl")],
        corpus=[str(tmp_path / "corpus.jsonl")],
        store=str(tmp_path / "store"),
        evaluate={
            "split_fraction": 0.001,
            "lm_eval_tasks": [NEXT_STEP_TASK, ANSWER_TASK],
            "lm_eval_include": str(include),
        },
    )
    files = eval_files(cfg)
    assert files.lm_eval == texts
    held = holdout(cfg, load_records(cfg.seeds, role="seeds"), load_records(cfg.corpus, role="corpus"), files)
    assert held.file_duplicates == ["has-doc"] and held.duplicates_by_kind == {"lm_eval": 1}
