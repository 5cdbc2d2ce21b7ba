"""Every kind of evaluation item is checked against the training texts, and its corpus duplicates
leave the curation pool: multiple-choice and numeric files as well as the domain and general items."""

import json
import random

from finescope_core.config import FinescopeConfig
from finescope_core.data import load_records
from finescope_core.evaluate.leakage import mc_text, numeric_text
from finescope_core.evaluate.split import EvalItem
from finescope_core.report_stage import _eval_sets_text
from tasks.evalset import EvalFiles, decontaminate, holdout

WORDS = [f"w{i}" for i in range(400)]


def _sentence(rng: random.Random, n: int = 16) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _mc(rng: random.Random, n: int) -> list[dict]:
    return [{"question": _sentence(rng), "choices": [_sentence(rng, 3), _sentence(rng, 3)], "answer": 0} for _ in range(n)]


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
    rows += [{"id": "has-mc", "text": "Question: " + mc_text(mc[1])},
             {"id": "has-numeric", "text": numeric[3]["question"] + " " + numeric[3]["answer"]}]  # fmt: skip
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "seeds.jsonl").write_text(json.dumps({"text": _sentence(rng)}) + "\n")
    cfg = FinescopeConfig(seeds=[str(tmp_path / "seeds.jsonl")], corpus=[str(tmp_path / "corpus.jsonl")],
                          evaluate={"split_fraction": 0.001}, store=str(tmp_path / "store"))  # fmt: skip
    seeds = load_records(cfg.seeds, role="seeds")
    corpus = load_records(cfg.corpus, role="corpus")
    held = holdout(cfg, seeds, corpus, EvalFiles(mc=mc, numeric=numeric))
    assert held.file_duplicates == ["has-mc", "has-numeric"]
    assert held.duplicates_by_kind == {"mc": 1, "numeric": 1}
    assert set(held.excluded) == {"has-mc", "has-numeric"}
