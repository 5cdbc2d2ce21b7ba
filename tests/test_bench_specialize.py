"""bench/bench_specialize.py's domains: each builds, its held-out items are disjoint from everything
trained on (and pass the pipeline's own contamination check), and the text domain is plain text."""

import pytest

from bench.bench_specialize import grid_points, primary_metric
from bench.specialize_data import TEXT_SOURCE, build_domains, licence_families, texts
from finescope_core.data import load_records
from finescope_core.evaluate.contamination import check_contamination
from finescope_core.io import read_jsonl


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    return build_domains(tmp_path_factory.mktemp("bench"), ["math", "code", "text"], general=300)


@pytest.mark.parametrize("name", ["math", "code", "text"])
def test_held_out_items_are_in_neither_corpus_nor_seeds_and_pass_the_contamination_check(domains, name):
    d = domains[name]
    corpus = load_records([str(d.corpus)], role="corpus").records
    seeds = load_records([str(d.seeds)], role="seeds").records
    held = load_records([str(d.eval_file)], role="eval").records
    assert 8 <= len(seeds) <= 12 and len(held) >= 20
    trained = {r.text for r in corpus} | {r.text for r in seeds}
    assert not {r.text for r in held} & trained
    assert not {r.id for r in held} & {r.id for r in corpus}
    check = check_contamination([r.text for r in held], sorted(trained))
    if name == "text":  # whole licence families are held out: nothing shares a 13-gram
        assert check.dropped == 0, check.summary()
    else:  # the demo's eval files: a few HumanEval prompts share boilerplate, which the run itself drops
        assert len(check.kept) >= 0.9 * len(held), check.summary()


def test_the_text_domain_is_plain_text_mixed_into_other_prose(domains):
    d = domains["text"]
    for path in (d.corpus, d.seeds, d.eval_file):
        for row in read_jsonl(path):
            assert set(row) == {"id", "text", "source"}, (path, row)
    # the distributions' long descriptions (`readme`) depend on what is installed: a fresh CI venv had none
    assert {TEXT_SOURCE, "pydoc"} <= set(d.sources) <= {TEXT_SOURCE, "pydoc", "readme"}
    share = d.sources[TEXT_SOURCE] / sum(d.sources.values())
    assert 0.1 < share < 0.9
    assert {r["source"] for r in read_jsonl(d.seeds)} == {TEXT_SOURCE}
    assert len(texts(d.eval_file)) == len(read_jsonl(d.eval_file))


def test_licence_families_join_paragraphs_that_share_a_run_of_words():
    shared = "permission is hereby granted free of charge to any person obtaining"
    paras = [
        f"first {shared} a copy",
        f"second {shared} the software",
        "nothing in common with anything else",
    ]
    families = sorted(sorted(f) for f in licence_families(paras))
    assert families == [[0, 1], [2]]


def test_grid_points_cover_every_combination_and_the_primary_metric_follows_the_kind():
    points = grid_points(["finetune.lr=1e-4,2e-4", "finetune.kd_weight=0.5"])
    assert points == [
        {"finetune.lr": 1e-4, "finetune.kd_weight": 0.5},
        {"finetune.lr": 2e-4, "finetune.kd_weight": 0.5},
    ]
    assert primary_metric({}, "text") == "perplexity"
    assert primary_metric({}, "chat") == "chat_perplexity"
    assert primary_metric({"primary": "perplexity"}, "chat") == "perplexity"
