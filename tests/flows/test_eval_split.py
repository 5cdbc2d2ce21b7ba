"""The evaluation split never reaches training: one tiny `specialize` run (with both baselines and
`prune.data: random`) and curation by every method, checked on ids and on 13-grams; a planted near
copy of a split record in the training data is dropped from evaluation and counted."""

import json
import random

import pytest
from tiny_run import TINY_LORA

from finescope_core.config import FinescopeConfig
from finescope_core.evaluate import metrics_schema_errors
from finescope_core.evaluate.contamination import NGRAM, ngrams, words
from finescope_core.evaluate.split import split_position
from finescope_core.io import read_jsonl
from finescope_core.tiny import save_tiny
from flows.curate import curate_flow
from flows.specialize import specialize_flow
from tasks.caching import artifact_dir
from tasks.context import RunContext, open_store
from tasks.data import load_data
from tasks.prune import baseline_records, curated_records, pruning_texts, training_pool

MATH = [f"m{i}" for i in range(150)] + ["sum", "plus", "add", "number", "total", "equals"]
CHAT = [f"g{i}" for i in range(150)] + ["hello", "friend", "greet", "hi", "welcome", "smile"]
SPLIT = 0.25


def _sentence(rng: random.Random, vocab: list[str], n: int) -> str:
    return " ".join(rng.choice(vocab) for _ in range(n))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalsplit")
    save_tiny(root / "model", "qwen2", hidden=64, layers=2, heads=8, kv_heads=4, intermediate=256)
    rng = random.Random(0)
    rows = [
        {
            "id": f"q{i}",
            "instruction": f"What is {i} plus {i + 1}? {_sentence(rng, MATH, 14)}",
            "output": f"{2 * i + 1} {_sentence(rng, MATH, 14)}",
        }
        for i in range(40)
    ]
    rows += [
        {
            "id": f"c{i}",
            "instruction": f"Say hello to friend {i}. {_sentence(rng, CHAT, 14)}",
            "output": f"Hello! {_sentence(rng, CHAT, 14)}",
        }
        for i in range(40)
    ]
    # A near copy (other punctuation and case) of a split record, outside the split: the `corpus`
    # baseline trains on it, so the split record must be dropped from evaluation as contaminated.
    planted = next(r for r in rows if split_position(r["id"], 0) < SPLIT)
    copy_id = next(f"planted{i}" for i in range(100) if split_position(f"planted{i}", 0) >= SPLIT)
    copy = {
        "id": copy_id,
        "instruction": planted["instruction"].upper() + "!!",
        "output": planted["output"] + " .",
    }
    rows.append(copy)
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "seeds.jsonl").write_text(
        json.dumps({"instruction": "What is 100 plus 7? sum plus add", "output": "107"}) + "\n"
    )
    cfg = FinescopeConfig(
        model=str(root / "model"),
        seeds=[str(root / "seeds.jsonl")],
        corpus=[str(root / "corpus.jsonl")],
        store=str(root / "store"),
        device="cpu",
        output=str(root / "out"),
        curate={
            "final_size": 20,
            "top_m": 20,
            "k_act": 16,
            "reference_size": 8,
            "max_length": 32,
            "sae": {"d_sae": 32, "steps": 20, "batch_size": 16},
        },
        prune={"ratio": 0.2, "max_length": 32, "data": "random"},
        teacher={"max_new_tokens": 4, "batch_size": 16},
        finetune={**TINY_LORA, "batch_size": 8, "max_length": 384},
        evaluate={
            "split_fraction": SPLIT,
            "domain_items": 8,
            "max_length": 384,
            "baselines": ["random", "corpus"],
            "bootstrap_resamples": 200,
        },
    )
    return cfg, specialize_flow(cfg), planted


def _grams(texts) -> set:
    return set().union(*(ngrams(words(t), NGRAM) for t in texts))


def test_no_split_record_reaches_any_training_input(run):
    cfg, result, planted = run
    store = open_store(cfg)
    corpus, seeds = (
        load_data(RunContext.of(cfg), result.curate.corpus),
        load_data(RunContext.of(cfg), result.curate.seeds),
    )
    split = set(result.curate.held_out.split)
    assert planted["id"] in split and len(split) >= 10
    # Every split record but the planted twin (whose copy outside the split is training data: the
    # contamination check drops it from evaluation, see below) shares no 13-gram with any training input.
    split_texts = [r.text for r in corpus.records if r.id in split and r.id != planted["id"]]
    split_grams = _grams(split_texts)
    assert split_grams

    curated = curated_records(RunContext.of(cfg), result.curate.corpus, result.curate.curated)
    prune_texts = pruning_texts(
        cfg.prune,
        RunContext.of(cfg),
        result.curate.corpus,
        result.curate.curated,
        seeds=result.curate.seeds,
        excluded=result.curate.held_out.excluded,
    )
    pool = training_pool(corpus.records, seeds.records, result.curate.held_out.excluded)
    by_variant = {
        "": curated,
        **{n: baseline_records(n, pool, len(curated), cfg.seed) for n in ("random", "corpus")},
    }
    for name, records in by_variant.items():
        distilled = read_jsonl(artifact_dir(store, result.variants[name].distilled) / "distilled.jsonl")
        assert [r["id"] for r in distilled] == [
            r.id for r in records
        ]  # the teacher read exactly these records
        assert not split & {r.id for r in records}, name
        texts = [r.text for r in records] + [f"{d['prompt']} {d['response'] or ''}" for d in distilled]
        assert not split_grams & _grams(texts), name
    assert not split_grams & _grams(prune_texts)
    by_text = {r.text: r.id for r in corpus.records}
    assert not split & {by_text[t] for t in prune_texts}


def test_curation_by_every_method_skips_the_split(run):
    cfg, result, _ = run
    split = set(result.curate.held_out.split)
    for method in ("sae", "sentence", "activation", "random"):
        other = cfg.model_copy(update={"curate": cfg.curate.model_copy(update={"method": method})})
        curated = curate_flow(other, export=False)
        assert curated.held_out.split == result.curate.held_out.split  # method-independent
        ids = {r["id"] for r in read_jsonl(artifact_dir(open_store(cfg), curated.curated) / "curated.jsonl")}
        assert ids and not ids & split, method


def test_metrics_carry_intervals_and_the_planted_copy_is_dropped(run):
    cfg, result, planted = run
    metrics = result.metrics
    assert metrics_schema_errors(metrics) == []
    info = metrics["evaluation"]
    dropped = [d["id"] for d in info["domain"]["dropped_items"] + info["general"]["dropped_items"]]
    assert dropped == [planted["id"]]
    assert (
        sum(info[s]["dropped_ngram"] + info[s]["dropped_near_duplicate"] for s in ("domain", "general")) == 1
    )
    assert info["split"]["records"] == len(result.curate.held_out.split)
    for name, m in metrics["models"].items():
        assert {"perplexity", "chat_perplexity"} <= set(m["ci"]), name
        assert m["n"]["perplexity"] == info["domain"]["kept"]
    report = (artifact_dir(open_store(cfg), result.report) / "report.md").read_text()
    assert "tuned vs base" in report and "tuned-corpus vs tuned" in report and "[" in report
